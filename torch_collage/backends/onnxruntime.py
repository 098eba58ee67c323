"""ONNX Runtime on CPU: ``torch.export`` -> ``torch.onnx.export`` (in memory) -> ``InferenceSession``.

torch 2.13 has no "onnxrt" dynamo backend any more, so this backend runs the session itself.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx, nn

from torch_collage.backends._export import (
    ExportedGraph,
    GraphIO,
    export_graph,
    holds_whole_graph,
    quiet_treespec_deprecation,
)
from torch_collage.backends.base import BackendCompileError, runner_spec

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["SPEC", "OnnxRuntimeBackend"]

logger = logging.getLogger(__name__)

_NAME = "onnxruntime"
_REQUIRED = ("onnxruntime", "onnx", "onnxscript")
OP_PATTERNS = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>"),
    re.compile(r"call_function\[target=torch\.ops\.([\w.]+)\]"),
    re.compile(r"Could not find an implementation for (\w+)\("),  # ORT: a kernel missing for an ONNX op
    re.compile(r"of operator \((\w+)\) in node"),  # ORT: the exported model is invalid at that op
)


@dataclass(frozen=True, kw_only=True)
class OnnxRuntimeBackend:
    """ONNX Runtime's CPU execution provider, whole graph, static shapes, inference only.

    The compiled callable accepts CPU tensors of the example inputs' shapes and dtypes (else
    ``ValueError``), returns fresh tensors each call and records no autograd graph. With
    ``io_binding`` it reuses one binding and is not thread-safe. ``compile`` takes a whole module;
    collage hands its partitions to ``compile_graph``.
    """

    # let intra-op threads spin-wait for work between and after calls: True always, False never,
    # None only in a runner that holds a whole model (``compile``) or a graph collage places whole
    # (marked ``WHOLE_GRAPH``); see [Note: ORT call path]
    allow_spinning: bool | None = None
    io_binding: bool = False  # bind torch buffers with IOBinding, not session.run(numpy); see the Note
    num_threads: int | None = None  # intra-op threads; None: torch.get_num_threads() at compile time

    def __post_init__(self) -> None:
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")

    @property
    def name(self) -> str:
        return _NAME

    def available(self) -> tuple[bool, str]:
        missing = [pkg for pkg in _REQUIRED if importlib.util.find_spec(pkg) is None]
        if missing:
            return False, f"{', '.join(missing)} not installed (pip install torch-collage[onnx])"
        return True, ""

    def version(self) -> str:
        ok, reason = self.available()
        if not ok:
            raise RuntimeError(reason)
        v = importlib.metadata.version
        return f"onnxruntime {v('onnxruntime')} (torch {torch.__version__}, onnxscript {v('onnxscript')})"

    def spins(self, whole: bool) -> bool:
        """Whether a session for a whole model or graph (``whole``), or for a part of one, spins."""
        return self.allow_spinning if self.allow_spinning is not None else whole

    def compile(self, module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> _OrtRunner:
        """A whole module: nothing else runs between its calls but the caller's own code."""
        return self._compile(module, example_inputs, spinning=self.spins(True))

    def compile_graph(self, gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> _OrtRunner:
        """A collage partition: spinning only where it is marked as the whole graph."""
        return self._compile(gm, example_inputs, spinning=self.spins(holds_whole_graph(gm)))

    def compile_graph_dynamic(
        self, gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], dims: tuple[tuple[int, ...], ...]
    ) -> _OrtRunner:
        """``gm`` exported with dynamic axes at ``dims`` (per input): one session for every size
        there ([Note: shape ranges] in torch_collage/shapes.py). Not with ``io_binding``, whose
        output buffers have one size."""
        if self.io_binding:
            raise BackendCompileError(_NAME, "io_binding binds outputs of one size; compile per size")
        return self._compile(gm, example_inputs, dims, spinning=self.spins(holds_whole_graph(gm)))

    def graph_version(self) -> str:
        """The version of what ``compile_graph`` builds: sessions of whole graphs spin (their costs differ)."""
        return f"{self.version()}; whole graphs spin"

    def _compile(
        self,
        module: nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        dims: tuple[tuple[int, ...], ...] = (),
        *,
        spinning: bool,
    ) -> _OrtRunner:
        start = time.perf_counter()
        graph = export_graph(_NAME, module, example_inputs, dims=dims)
        try:
            model = to_onnx(graph)
            runner = _OrtRunner(self._session(model, spinning), graph, self.io_binding, model, spinning)
            runner.warm_up(example_inputs)
        except BackendCompileError:
            raise
        except Exception as exc:
            raise BackendCompileError.from_exception(_NAME, exc, OP_PATTERNS) from exc
        logger.debug(
            "%s: compiled %s in %.2f s", self.name, type(module).__name__, time.perf_counter() - start
        )
        return runner

    def load(self, directory: Path, example_inputs: tuple[torch.Tensor, ...]) -> _OrtRunner:
        """The runner ``_OrtRunner.save`` wrote to ``directory`` (a session on the saved ONNX model: no
        export), for this backend's threads, spinning as it did unless ``allow_spinning`` says; run
        once on ``example_inputs``."""
        graph = GraphIO.from_json((directory / _IO_FILE).read_text())
        graph.signature.prepare(example_inputs)  # ValueError unless it was saved for these shapes
        model = (directory / _MODEL_FILE).read_bytes()
        saved = directory / _SESSION_FILE
        whole = saved.is_file() and json.loads(saved.read_text()).get("spinning") is True
        spinning = self.spins(whole)
        runner = _OrtRunner(self._session(model, spinning), graph, self.io_binding, spinning=spinning)
        runner.warm_up(example_inputs)
        return runner

    def _session(self, model: bytes, spinning: bool) -> ort.InferenceSession:
        import onnxruntime as ort

        opts = session_options(self.num_threads or torch.get_num_threads(), spinning)
        return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def session_options(num_threads: int, allow_spinning: bool) -> ort.SessionOptions:
    """Session options shared by the CPU and CUDA backends: sequential execution, every graph
    optimisation, ``num_threads`` intra-op threads, errors-only logging, spinning as asked."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = num_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: unused-initializer warnings are noise here
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return opts


# [Note: ORT call path]
# Measured on the project's 2-core CPU (onnxruntime 1.32, torch 2.13); the machine is shared, so
# the figures are paired rounds in one process, with the load they were taken under.
# - Spinning (session.intra_op.allow_spinning). Between the ops of one call a worker that blocked
#   must be woken for the next parallel op; spinning workers wait on the core instead, and keep it
#   after the call until their spin runs out. A conv+MLP (batch 8, 13 ONNX ops, 20 paired rounds, load
#   8): 5th percentile of calls 0.38 ms spinning (ORT's default) against 0.51 ms not; at load 5.6 the
#   20th percentile 0.40 against 0.77 ms, the 1.6x that made collage's ORT slower than ORT alone.
#   Tiny MLP (batch 8, 64->256->64): 10.5-11 us against 20-21 us. But a torch op right after a
#   spinning call waits for the core: a 128x128 matmul after each call of that conv+MLP took 6.3 ms
#   (20th percentile, load 7) against 0.83 ms after a session that does not spin; earlier, quieter:
#   a 0.16 ms 256x256 matmul ran in 0.7-5.0 ms. ``session.force_spinning_stop`` (spin within a call,
#   stop when it returns) kept none of the gain (5th percentile 0.71 ms). So a session spins only
#   where nothing of collage's runs between its calls: a whole module given to ``compile``, or a
#   graph collage places whole on this backend, which the caller marks (``WHOLE_GRAPH`` in
#   ``GraphModule.meta``). Its caller's own torch code after the call pays what it pays after ORT
#   alone. A partition beside others never spins: neighbours follow it in every call. On a machine
#   busy with other processes spinning loses instead (zoo bert, batch 1, load 3.8: 20.5 ms spinning
#   against 6.4 ms not), as it does for ORT alone; the whole-graph choice follows ORT's default.
# - IOBinding vs session.run, interleaved A/B, best round median: tiny MLP 13.6 us vs 10.7 us (binding
#   each input and a fresh output per call costs more Python calls than the output copy it saves), MLP
#   4.42 vs 4.31 ms, encoder 9.6 vs 10.4 ms (that run was under load: within noise). session.run takes
#   numpy views of the inputs without copying and returns fresh arrays, wrapped by torch.from_numpy.
#   Default session.run; IOBinding stays as an option.
# - The graph collage exports (ATen, after freezing) gave the same ONNX ops as the module's own
#   ``torch.onnx.export`` on that conv+MLP and on the zoo's BERT (235 nodes each); the same session
#   options ran them alike (BERT 0.98x).


# torch.onnx warns once per torchvision op, on every export, that torchvision is not installed.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def to_onnx(graph: ExportedGraph, backend: str = _NAME) -> bytes:
    """Export in memory (no files): the serialised ONNX model. Failures keep torch.onnx's message,
    whose summary names the ATen op that has no ONNX function; they are reported as ``backend``'s.

    [Note: a fresh ONNX registry per export]
    ``torch.onnx.export`` builds its registry of ATen -> ONNX functions afresh on every call (0.4 s
    of a small MLP's 0.56 s export). Sharing one registry between exports through the exporter's
    core would save that, but in a process that had exported other graphs, exporting mmt's whole
    graph then sat in onnxscript's rewriter for minutes (25 s on the public path). What exports share
    through the registry is not known, so each export builds its own.
    """
    try:
        with quiet_treespec_deprecation():
            program = torch.onnx.export(graph.program, dynamo=True, verbose=False)
    except Exception as exc:
        raise BackendCompileError.from_exception(backend, exc, OP_PATTERNS) from exc
    assert program is not None
    return program.model_proto.SerializeToString()


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


_IO_FILE = "io.json"
_MODEL_FILE = "model.onnx"
_SESSION_FILE = "session.json"  # how the saved runner's session was set up: {"spinning": bool}


class _OrtRunner:
    """Calls one ``InferenceSession`` with torch tensors; inputs are matched by name because the
    exporter may drop inputs the graph does not use.

    ``model`` (the serialised ONNX model) is kept for ``save`` and dropped once saved: a session
    cannot give its model back, and exporting again is what saving is meant to spare.
    """

    def __init__(
        self, session: ort.InferenceSession, graph: GraphIO, io_binding: bool, model: bytes | None = None,
        spinning: bool = False,
    ) -> None:  # fmt: skip
        self._session = session
        self.spinning = spinning  # whether the session's intra-op threads spin-wait ([Note: ORT call path])
        self._graph = graph.io if isinstance(graph, ExportedGraph) else graph  # running needs no program
        self._model = model
        sig = graph.signature
        names = [i.name for i in session.get_inputs()]
        self._inputs = list(zip(names, graph.match_inputs([[n] for n in names]), strict=True))
        self._input_np_dtypes = {pos: numpy_dtype(sig.dtypes[pos]) for _, pos in self._inputs}
        self._output_names = [o.name for o in session.get_outputs()]
        if len(self._output_names) != graph.num_outputs:
            raise BackendCompileError(
                _NAME, f"the ONNX model has {len(self._output_names)} outputs, the module {graph.num_outputs}"
            )
        self._outputs: list[tuple[torch.Size, torch.dtype, np.dtype]] = []  # set by warm_up
        self._binding = session.io_binding() if io_binding else None

    def warm_up(self, example_inputs: Sequence[torch.Tensor]) -> None:
        """One run through ``session.run``: records the outputs' shapes and dtypes for IOBinding."""
        outs = self._run_numpy(self._graph.signature.prepare(example_inputs))
        self._outputs = [(o.shape, o.dtype, numpy_dtype(o.dtype)) for o in outs]
        if self._binding is not None:
            self._run_bound(self._graph.signature.prepare(example_inputs))

    def save(self, directory: Path) -> bool:
        """Write the ONNX model and its interface to ``directory`` (False if already saved once);
        ``OnnxRuntimeBackend.load`` reads them back. See [Note: compiled artifacts] in artifacts.py."""
        if self._model is None:
            return False
        (directory / _MODEL_FILE).write_bytes(self._model)
        (directory / _IO_FILE).write_text(self._graph.to_json())
        (directory / _SESSION_FILE).write_text(json.dumps({"spinning": self.spinning}))
        self._model = None
        return True

    def release_saved_copy(self) -> None:
        """Drop the ONNX model kept for ``save`` (collage calls this once the runner is saved or will
        not be; see [Note: the blob a runner keeps] in openvino.py)."""
        self._model = None

    def __call__(self, *args: torch.Tensor) -> Any:
        tensors = self._graph.signature.prepare(args)
        flat = self._run_numpy(tensors) if self._binding is None else self._run_bound(tensors)
        return self._graph.unflatten(flat)

    def _run_numpy(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        # loops and map, not comprehensions: on Python 3.11 each comprehension is a frame of its
        # own, and inside a compiled call every frame costs ([Note: call overhead] in entry.py)
        feed = {}
        for name, pos in self._inputs:
            feed[name] = tensors[pos].numpy()
        return list(map(torch.from_numpy, self._session.run(self._output_names, feed)))

    def _run_bound(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        binding = self._binding
        assert binding is not None
        for name, pos in self._inputs:
            t = tensors[pos]
            binding.bind_input(name, "cpu", 0, self._input_np_dtypes[pos], tuple(t.shape), t.data_ptr())
        outs = []
        for name, (shape, dtype, np_dtype) in zip(self._output_names, self._outputs, strict=True):
            out = torch.empty(shape, dtype=dtype)
            binding.bind_output(name, "cpu", 0, np_dtype, tuple(shape), out.data_ptr())
            outs.append(out)
        self._session.run_with_iobinding(binding)
        return outs

    def __repr__(self) -> str:
        spin = ", spinning" if self.spinning else ""
        return f"<onnxruntime runner: {len(self._inputs)} inputs, {len(self._output_names)} outputs{spin}>"


SPEC = runner_spec(_NAME, OnnxRuntimeBackend)
