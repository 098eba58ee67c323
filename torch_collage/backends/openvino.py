"""OpenVINO on CPU: ``torch.export`` -> ``openvino.convert_model`` -> ``Core().compile_model``.

The ExportedProgram route converts more than handing ``convert_model`` the module (which traces
with TorchScript): it took MLPs, conv nets with BatchNorm, transformer encoders with int64 tokens
and ATen-level GraphModules (from ``torch.export(...).module()``, ``make_fx`` or aot_autograd),
where TorchScript tracing failed on half of them. Shapes are made static from the example inputs:
the CPU plugin refuses a Convolution whose weight (a graph input in ATen graphs) has a dynamic shape.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from torch_collage.backends._export import ExportedGraph, GraphIO, export_graph, quiet_treespec_deprecation
from torch_collage.backends.base import BackendCompileError, runner_spec

if TYPE_CHECKING:
    import openvino as ov

__all__ = ["SPEC", "CompileHelper", "OpenVinoBackend", "pause_openvino_telemetry"]

logger = logging.getLogger(__name__)

_NAME = "openvino"
_OP_PATTERNS = (
    re.compile(r"No conversion rule found for operations: ([\w.:]+)"),
    re.compile(r"Unsupported operation of type: \w+ name: [^/\s]*/([\w:]+\.\w+\.\w+)/"),
    re.compile(r"Unsupported operation of type: (\w+)"),
)


@dataclass(frozen=True, kw_only=True)
class OpenVinoBackend:
    """OpenVINO's CPU plugin, whole graph, static shapes, inference only.

    The compiled callable accepts CPU tensors of the example inputs' shapes and dtypes (else
    ``ValueError``), returns fresh tensors each call, records no autograd graph, and is not
    thread-safe (it reuses one infer request).
    """

    # False: INFERENCE_PRECISION_HINT=f32. The plugin's default on this CPU is bf16, whose outputs
    # differed from eager by 4e-3; True leaves the plugin's default.
    allow_low_precision: bool = False
    num_threads: int | None = None  # INFERENCE_NUM_THREADS; None: torch.get_num_threads() at compile time
    # compile in a helper process and import the result, so that a crash of OpenVINO's compiler
    # fails this graph instead of killing the caller; [Note: OpenVINO compiles in a helper process]
    compile_in_helper: bool = True
    # the helper process to compile in; None: the one this process shares ([Note: OpenVINO compiles in
    # a helper process])
    helper: CompileHelper | None = None

    def __post_init__(self) -> None:
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")

    @property
    def name(self) -> str:
        return _NAME

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("openvino") is None:
            return False, "openvino is not installed (pip install torch-collage[openvino])"
        return True, ""

    def version(self) -> str:
        ok, reason = self.available()
        if not ok:
            raise RuntimeError(reason)
        return f"openvino {importlib.metadata.version('openvino')} (torch {torch.__version__})"

    def compile(self, module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> _OvRunner:
        return self._compile(module, example_inputs)

    def compile_graph_dynamic(
        self, gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], dims: tuple[tuple[int, ...], ...]
    ) -> _OvRunner:
        """``gm`` exported and converted with dynamic dimensions at ``dims`` (per input): one compiled
        model for every size there ([Note: shape ranges] in torch_collage/shapes.py)."""
        return self._compile(gm, example_inputs, dims)

    def _compile(
        self,
        module: nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        dims: tuple[tuple[int, ...], ...] = (),
    ) -> _OvRunner:
        start = time.perf_counter()
        graph = export_graph(_NAME, module, example_inputs, dims=dims)
        try:
            model = _convert(graph, example_inputs)
            blob: bytes | None = None
            if self.compile_in_helper:
                compiled, blob = (self.helper or _HELPER).compile(model, self._config())
            else:
                compiled = _core().compile_model(model, "CPU", self._config())
            runner = _OvRunner(compiled, graph, blob)
            runner(*example_inputs)  # warm-up: first-inference allocations happen here
        except BackendCompileError:
            raise
        except Exception as exc:
            raise BackendCompileError.from_exception(_NAME, exc, _OP_PATTERNS) from exc
        logger.debug(
            "%s: compiled %s in %.2f s", self.name, type(module).__name__, time.perf_counter() - start
        )
        return runner

    def load(self, directory: Path, example_inputs: tuple[torch.Tensor, ...]) -> _OvRunner:
        """The runner ``_OvRunner.save`` wrote to ``directory``, compiled for this backend's threads
        and precision (an import, no conversion or compilation); run once on ``example_inputs``."""
        graph = GraphIO.from_json((directory / _IO_FILE).read_text())
        graph.signature.prepare(example_inputs)  # ValueError unless it was saved for these shapes
        blob = directory / _BLOB_FILE
        compiled = _core().import_model(io.BytesIO(blob.read_bytes()), "CPU", self._config())
        runner = _OvRunner(compiled, graph, blob)  # the file, not its bytes: [Note: the blob a runner keeps]
        runner(*example_inputs)
        return runner

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": self.num_threads or torch.get_num_threads(),
        }
        if not self.allow_low_precision:
            config["INFERENCE_PRECISION_HINT"] = "f32"
        return config


# [Note: OpenVINO compiles in a helper process]
# OpenVINO's CPU plugin can crash the process compiling a graph it converted without complaint. On
# the 2-core AMD EPYC (AVX-512) machine with openvino 2026.4.1, a LayerNorm residual MLP of two or
# more blocks, reshaped to static shapes with a batch of 4 or 8 (widths 16 to 256; batches 2, 12,
# 16 and 32 compile), dies with a segmentation fault inside ``compile_model``; with
# ``SNIPPETS_MODE=DISABLE`` it compiles, so the fault is in the plugin's fused-subgraph code
# generator. Disabling snippets everywhere would cost: whole models ran up to 4-5% slower without
# them (residual_mlp at batch 32 1.046x, bert at batch 8 1.040x, paired medians of 6 rounds). A
# collage search compiles hundreds of subgraphs, so a crash of one must not take the user's
# process down. The backend therefore saves the converted model (``ov.save_model``, weights kept in
# f32) to a scratch directory, a long-lived helper process (``_ov_compile_worker.py``: OpenVINO
# only, no torch) compiles it with the same configuration and exports the compiled blob, and this
# process imports the blob (``import_model``: no second compilation). When the helper dies, the
# graph fails with a ``BackendCompileError`` naming the signal, collage gives the candidate an
# infinite cost, and the next compile starts a new helper. ``compile_in_helper=False`` compiles in
# process.


_WORKER = os.path.join(os.path.dirname(__file__), "_ov_compile_worker.py")


class CompileHelper:
    """The helper process of [Note: OpenVINO compiles in a helper process], started on first use and
    again after it died. ``command`` starts it (default: ``_ov_compile_worker.py`` by path)."""

    def __init__(self, command: Sequence[str] | None = None) -> None:
        self.command = list(command) if command is not None else [sys.executable, _WORKER]
        self._proc: subprocess.Popen[str] | None = None
        self._pid = 0  # the process that started it (a forked child starts its own)
        self._lock = threading.Lock()

    def compile(self, model: ov.Model, config: dict[str, Any]) -> tuple[ov.CompiledModel, bytes]:
        """``model`` compiled for the CPU with ``config``, and the exported blob it was imported from."""
        import openvino as ov

        parent = _scratch_dir()
        with self._lock, tempfile.TemporaryDirectory(prefix=f"{_SCRATCH}{os.getpid()}-", dir=parent) as tmp:
            xml, blob = os.path.join(tmp, "model.xml"), os.path.join(tmp, "model.blob")
            ov.save_model(model, xml, compress_to_fp16=False)
            request = json.dumps({"xml": xml, "blob": blob, "config": {k: str(v) for k, v in config.items()}})
            proc = self._process()
            try:
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(request + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            except OSError:  # a broken pipe: the helper is gone
                line = ""
            if not line:
                self._proc = None
                code = proc.wait()
                raise BackendCompileError(
                    _NAME, f"OpenVINO's compiler crashed in the helper process ({_exit_reason(code)})"
                )
            reply = json.loads(line)
            if not reply["ok"]:
                raise RuntimeError(reply["error"])
            with open(blob, "rb") as f:
                data = f.read()
            return _core().import_model(io.BytesIO(data), "CPU", config), data

    def _process(self) -> subprocess.Popen[str]:
        if self._proc is None or self._pid != os.getpid() or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            self._pid = os.getpid()
        return self._proc

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and self._pid == os.getpid() and proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()  # the helper's loop ends at end of input
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


_HELPER = CompileHelper()
atexit.register(_HELPER.close)


# [Note: scratch directories of dead processes]
# The saved model and its blob go to /dev/shm, which is memory: Llama's decode graph with 0.5 GB of
# weights left 3.5 GB there. A process killed while compiling (the kernel's OOM killer, a SIGKILL
# from a job runner) never removes its temporary directory, and what it left stays in memory until
# reboot; two killed benchmark runs left 6.1 GB, and the third run was killed for memory in turn.
# So each directory is named after the process that made it (collage-ov-<pid>-...), and the first
# compile of a process removes the directories, in its scratch parent, of its own user's processes
# that are gone.
_SCRATCH = "collage-ov-"


def _scratch_dir() -> str | None:
    """A memory-backed directory for the saved models when there is one (``/dev/shm``), else the
    default; swept once per process ([Note: scratch directories of dead processes])."""
    parent = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    _sweep_dead(parent or tempfile.gettempdir())
    return parent


@functools.cache
def _sweep_dead(parent: str) -> int:
    """Remove ``parent``'s scratch directories of this user's processes that no longer run; how many."""
    removed = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            pid = entry.name[len(_SCRATCH) :].split("-", 1)[0]
            if not entry.name.startswith(_SCRATCH) or not pid.isdigit() or _alive(int(pid)):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False) and entry.stat().st_uid == os.getuid():
                    shutil.rmtree(entry.path)
                    removed += 1
    if removed:
        logger.info("openvino: removed %d scratch directories of processes that are gone", removed)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


@functools.cache
def _core() -> ov.Core:
    import openvino as ov

    return ov.Core()


def _convert(graph: ExportedGraph, example_inputs: tuple[torch.Tensor, ...]) -> ov.Model:
    """The ExportedProgram as an OpenVINO model with every input's shape fixed to the example's, but
    for the dimensions the export made dynamic."""
    import openvino as ov

    with pause_openvino_telemetry(), quiet_treespec_deprecation():
        model = ov.convert_model(graph.program, example_input=example_inputs)
    positions = graph.match_inputs([port.get_names() for port in model.inputs])
    sig = graph.signature
    model.reshape(
        {
            port: ov.PartialShape(
                [-1 if sig.dynamic and d in sig.dynamic[pos] else n for d, n in enumerate(sig.shapes[pos])]
            )
            for port, pos in zip(model.inputs, positions)
        }
    )
    return model


# Set to 1 to let OpenVINO send its usage telemetry for collage's conversions too.
TELEMETRY_ENV = "TORCH_COLLAGE_OPENVINO_TELEMETRY"


@contextlib.contextmanager
def pause_openvino_telemetry() -> Iterator[None]:
    """Pause OpenVINO's usage telemetry while collage converts a graph.

    [Note: OpenVINO telemetry]
    Unless the user opted out (``opt_in_out --opt_out``) or runs in CI, every ``convert_model``
    queues analytics events, and openvino_telemetry sends each from a background thread by
    *forking the whole process* (``multiprocessing.Process``, so a request with no network cannot
    hang it) and joining the child with a timeout. A collage search converts hundreds of graphs:
    each fork of a multi-GB process copies its page tables and leaves every page copy-on-write
    while the child lives, so calls timed in the parent meanwhile ran 2-4x slower in bursts
    (OpenVINO's whole resnet18 in a benchmark process: 82, 78, 78, 199, 235, 124, 84 ms on
    consecutive calls of an 80 ms graph; its whole resnext50 measured 317-460 ms in the search
    against 202 ms side by side afterwards, so the search chose another backend). The events describe collage's internal
    conversions, not the user's, so collage turns consent off on the telemetry singleton for the
    conversion and restores it after; ``TORCH_COLLAGE_OPENVINO_TELEMETRY=1`` leaves it alone.
    """
    if os.environ.get(TELEMETRY_ENV) == "1":
        yield
        return
    try:
        from openvino.tools.ovc.telemetry_utils import init_ovc_telemetry

        # the singleton convert_model will use, initialised under the name it uses ("OVC"), so
        # that convert_model does not initialise it again (which would recompute the consent)
        telemetry = init_ovc_telemetry()
        consent = telemetry.consent
    except Exception as exc:  # a telemetry stub or another layout: nothing to pause
        logger.debug("torch_collage: OpenVINO telemetry not paused: %s", exc)
        yield
        return
    telemetry.consent = False
    try:
        yield
    finally:
        telemetry.consent = consent


_IO_FILE = "io.json"
_BLOB_FILE = "model.blob"


class _OvRunner:
    """Calls one compiled model through a reused infer request, sharing memory with torch tensors."""

    # [Note: the blob a runner keeps]
    # A model imported from a blob exports one that ``import_model`` then refuses ("Unable to read
    # the model", openvino 2026.4.1), so an imported runner saves the blob it was imported from. That
    # blob is as large as the weights. A runner compiled in the helper process keeps its bytes until
    # ``save`` writes them, then lets them go. A runner loaded from the compiled-partition store kept
    # the file's bytes too, and is never saved again (its entry exists): every warm compile held a
    # second copy of the weights for as long as the model lived (full mlp: 25 MB). It keeps the
    # file's path instead, and ``save`` copies the file while it is still there. The collage cost
    # model calls ``release_saved_copy`` once a runner is saved or will never be (store off, or
    # entry already there), so a fresh runner's bytes do not outlive that either.
    def __init__(
        self, compiled: ov.CompiledModel, graph: GraphIO, blob: bytes | Path | None = None
    ) -> None:  # fmt: skip
        import openvino as ov

        self._tensor = ov.Tensor
        self._graph = graph.io if isinstance(graph, ExportedGraph) else graph  # running needs no program
        self._compiled = compiled
        self._blob = blob
        self._imported = blob is not None
        self._request = compiled.create_infer_request()
        self._positions = graph.match_inputs([port.get_names() for port in compiled.inputs])
        self._n_outputs = len(compiled.outputs)
        if self._n_outputs != graph.num_outputs:
            raise BackendCompileError(
                _NAME, f"the OpenVINO model has {self._n_outputs} outputs, the module {graph.num_outputs}"
            )

    def __call__(self, *args: torch.Tensor) -> Any:
        tensors = self._graph.signature.prepare(args)
        request = self._request
        for index, pos in enumerate(self._positions):
            request.set_input_tensor(index, self._tensor(tensors[pos].numpy(), shared_memory=True))
        request.infer()
        return self._graph.unflatten(self._copy_outputs())

    def save(self, directory: Path) -> bool:
        """Write the compiled model (``export_model``'s blob) and its interface to ``directory``;
        ``OpenVinoBackend.load`` reads them back. See [Note: compiled artifacts] in artifacts.py.
        An imported model saves once (its blob is let go after); False afterwards: nothing to save."""
        if self._imported:  # [Note: the blob a runner keeps]
            if isinstance(self._blob, Path):
                if not self._blob.is_file():  # pruned from the store meanwhile
                    return False
                shutil.copyfile(self._blob, directory / _BLOB_FILE)
            elif self._blob is None:
                return False
            else:
                (directory / _BLOB_FILE).write_bytes(self._blob)
            self._blob = None
        else:
            blob = io.BytesIO()  # export_model and import_model take BytesIO only
            self._compiled.export_model(blob)
            (directory / _BLOB_FILE).write_bytes(blob.getbuffer())
        (directory / _IO_FILE).write_text(self._graph.to_json())
        return True

    def release_saved_copy(self) -> None:
        """Drop the blob kept for ``save`` (``save`` then has nothing to write); see
        [Note: the blob a runner keeps]."""
        self._blob = None

    def _copy_outputs(self) -> Sequence[torch.Tensor]:
        # the request's output buffers are reused by the next call: copy them out
        return [
            torch.from_numpy(self._request.get_output_tensor(i).data.copy()) for i in range(self._n_outputs)
        ]

    def __repr__(self) -> str:
        return f"<openvino runner: {len(self._positions)} inputs, {self._n_outputs} outputs>"


SPEC = runner_spec(_NAME, OpenVinoBackend)
