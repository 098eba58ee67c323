"""Standalone reproduction of an OpenVINO CPU-plugin crash, for an upstream report.

    python benchmarks/repro_openvino_snippets.py                  # the default grid
    python benchmarks/repro_openvino_snippets.py --batches 4 --widths 64 --blocks 2

Nothing from torch_collage is used: a plain ``nn.Sequential`` of residual blocks
(``x + Linear(GELU(Linear(LayerNorm(x))))``) goes through ``torch.export``, ``ov.convert_model``,
``model.reshape`` to a static shape and ``core.compile_model(model, "CPU", {...})``, each case in a
fresh child process so that a crash is recorded rather than fatal. Every case is compiled twice,
with OpenVINO's defaults and with ``SNIPPETS_MODE=DISABLE``; a crash with the first and a clean
compile with the second points at the plugin's snippets (fused-subgraph) code generator.

Seen on a 2-core AMD EPYC with AVX-512 and openvino 2026.4.1: two or more blocks at batch 4 or 8
(widths 16-256) die with SIGSEGV inside ``compile_model``. torch_collage works around it by compiling
in a helper process ([Note: OpenVINO compiles in a helper process] in
torch_collage/backends/openvino.py). Writes ``benchmarks/results/openvino_snippets_<hardware>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import itertools
import platform
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

_CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    import openvino as ov

    batch, width, blocks, snippets = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

    class Block(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

        def forward(self, x):
            return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))

    torch.manual_seed(0)
    model = nn.Sequential(*(Block(width) for _ in range(blocks))).eval()
    x = torch.randn(batch, width)
    program = torch.export.export(model, (x,))
    ov_model = ov.convert_model(program, example_input=(x,))
    ov_model.reshape({ov_model.inputs[0]: ov.PartialShape([batch, width])})
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "f32"}
    if snippets == "disable":
        config["SNIPPETS_MODE"] = "DISABLE"
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    got = torch.from_numpy(compiled(x.numpy())[0].copy())
    with torch.no_grad():
        err = (got - model(x)).abs().max().item()
    print(f"max_abs_err={err:.1e}")
    """
)


def _run(batch: int, width: int, blocks: int, snippets: str, timeout_s: float) -> str:
    cmd = [sys.executable, "-c", _CHILD, str(batch), str(width), str(blocks), snippets]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"timeout after {timeout_s:.0f} s"
    if done.returncode < 0:
        return f"crash ({signal.Signals(-done.returncode).name})"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"error: {last[:100]}"
    return "ok, " + done.stdout.strip().replace("max_abs_err=", "max abs err ")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=_ints, default=_ints("2,4,8,16"))
    parser.add_argument("--widths", type=_ints, default=_ints("64,512"))
    parser.add_argument("--blocks", type=_ints, default=_ints("1,2"))
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--hardware", default="cpu")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    rows = []
    for batch, width, blocks in itertools.product(args.batches, args.widths, args.blocks):
        default = _run(batch, width, blocks, "default", args.timeout_s)
        disabled = _run(batch, width, blocks, "disable", args.timeout_s)
        rows.append((batch, width, blocks, default, disabled))
        print(
            f"batch {batch:3d} width {width:4d} blocks {blocks}: default: {default}; SNIPPETS_MODE=DISABLE: {disabled}"
        )

    versions = {p: importlib.metadata.version(p) for p in ("openvino", "torch")}
    lines = [
        f"# OpenVINO snippets crash — {args.hardware}",
        "",
        f"Produced by: `python benchmarks/repro_openvino_snippets.py --hardware {args.hardware}` on "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC",
        "",
        f"CPU: {_cpu()} (AVX-512: {'yes' if _avx512() else 'no'}); openvino {versions['openvino']}, "
        f"torch {versions['torch']}, Python {platform.python_version()}.",
        "",
        "Each case is `nn.Sequential` of `blocks` residual blocks `x + fc2(gelu(fc1(layer_norm(x))))` "
        "(hidden 4 x width), exported with `torch.export`, converted with `ov.convert_model`, reshaped "
        "to the static shape (batch, width) and compiled for CPU (LATENCY hint, 2 threads, f32), in a "
        "fresh child process; the output is compared with PyTorch's.",
        "",
        "| batch | width | blocks | defaults | SNIPPETS_MODE=DISABLE |",
        "|---|---|---|---|---|",
        *(f"| {b} | {w} | {k} | {d} | {s} |" for b, w, k, d, s in rows),
        "",
    ]
    out = Path(args.out_dir) / f"openvino_snippets_{args.hardware}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
