"""The helper process that compiles OpenVINO models for ``OpenVinoBackend``: run as a script (by path,
so it imports OpenVINO but neither torch nor torch_collage). See [Note: OpenVINO compiles in a
helper process] in openvino.py.

Protocol, one JSON object per line: a request ``{"xml": path, "blob": path, "config": {...}}`` on
stdin; the reply ``{"ok": true}`` (the compiled model exported to ``blob``) or ``{"ok": false,
"error": "..."}`` on stdout. A crash of the compiler ends the process; the parent sees end of file.
"""

from __future__ import annotations

import io
import json
import os
import sys


def main() -> None:
    # run by path, Python put this directory first on sys.path, where openvino.py and triton.py
    # (collage's backends) would shadow the real packages
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    import openvino as ov

    core = ov.Core()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            compiled = core.compile_model(core.read_model(request["xml"]), "CPU", request["config"])
            blob = io.BytesIO()  # export_model writes to BytesIO only
            compiled.export_model(blob)
            with open(request["blob"], "wb") as f:
                f.write(blob.getbuffer())
            reply: dict[str, object] = {"ok": True}
        except Exception as exc:  # the parent turns it into a BackendCompileError
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
