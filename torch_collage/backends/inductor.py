"""TorchInductor: whole modules through ``torch.compile(backend="inductor")``, Collage partitions (ATen
graphs) through ``compile_fx`` without a dynamo frame of their own; optionally with weight freezing."""

from __future__ import annotations

import copy
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import fx, nn

from torch_collage.backends.base import BackendCompileError, runner_spec
from torch_collage.fresh_entry import fresh_entry

__all__ = ["SPEC", "InductorBackend", "inductor_compile", "inductor_compile_graph"]

logger = logging.getLogger(__name__)

_COMPILERS = ("g++", "c++", "clang++")  # Inductor's CPU code is C++
# Inductor's LoweringException names the node's target
_OP_PATTERNS = (re.compile(r"target: (?:torch\.ops\.)?(\w+\.\w+\.\w+)"),)


@dataclass(frozen=True, kw_only=True)
class InductorBackend:
    """``torch.compile(..., backend="inductor", dynamic=False)``, compiled and warmed up in ``compile``.

    Each ``compile`` compiles afresh, behind a code object of its own ([Note: one code object per
    compile]); dynamo's caches are never reset, since that would throw away every other compiled
    model in the process (including the one Collage is assembling). With ``freezing``, Inductor
    folds parameters into the graph as constants: the callable then always runs under
    ``torch.no_grad()`` (freezing is inference-only) and must not be used after the weights change.
    """

    freezing: bool = False  # Inductor's `freezing` for whole modules (partitions are always frozen)
    takes_scalars: ClassVar[bool] = True  # dynamo guards integer inputs: [Note: baked sizes] in base.py

    @property
    def name(self) -> str:
        return "inductor"

    def available(self) -> tuple[bool, str]:
        if not any(shutil.which(cxx) for cxx in _COMPILERS):
            return False, f"no C++ compiler ({', '.join(_COMPILERS)}) on PATH; Inductor's CPU code needs one"
        return True, ""

    def version(self) -> str:
        return f"torch {torch.__version__} inductor"

    def compile(self, module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
        return inductor_compile(self.name, module, example_inputs, freezing=self.freezing)

    def compile_graph(self, gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> Callable[..., Any]:
        """An ATen graph (a Collage partition), called without a dynamo frame of its own
        ([Note: partitions without an inner frame]), its tensor attributes frozen ([Note: frozen
        partitions])."""
        return inductor_compile_graph(self.name, gm, example_inputs, freezing=True)

    def compile_graph_dynamic(
        self, gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], dims: tuple[tuple[int, ...], ...]
    ) -> Callable[..., Any]:
        """An ATen graph compiled once for every size of the dimensions ``dims`` (per input), frozen
        ([Note: shape ranges] in torch_collage/shapes.py)."""
        return inductor_compile_dynamic(self.name, gm, example_inputs, dims, freezing=True)

    def graph_version(self) -> str:
        """The version of what ``compile_graph`` builds (it freezes; ``compile`` may not)."""
        return f"{self.version()}; frozen partitions"


def inductor_compile(
    backend: str,
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    freezing: bool = False,
    options: dict[str, str | int | bool | Callable[..., Any]] | None = None,
) -> Callable[..., Any]:
    """``torch.compile(module, backend="inductor", dynamic=False)``, compiled now (on ``example_inputs``)
    rather than on the first call; failures become ``BackendCompileError`` of ``backend``. Inductor
    generates C++ for CPU inputs and Triton for CUDA inputs; ``options`` are Inductor config options."""
    start = time.perf_counter()
    all_options: dict[str, str | int | bool | Callable[..., Any]] = {"freezing": freezing, **(options or {})}
    compiled = torch.compile(
        fresh_entry(module, "collage_inductor_entry"), backend="inductor", options=all_options, dynamic=False
    )
    runner: Callable[..., Any] = _NoGradRunner(compiled) if freezing else compiled
    try:
        # Inductor compiles lazily, on the first call: do it now. [Note: freezing needs the global flag]
        with torch._inductor.config.patch(freezing=freezing):
            runner(*example_inputs)
    except Exception as exc:
        raise BackendCompileError.from_exception(backend, exc, _OP_PATTERNS) from exc
    logger.debug("%s: compiled %s in %.2f s", backend, type(module).__name__, time.perf_counter() - start)
    return runner


def inductor_compile_dynamic(
    backend: str,
    gm: fx.GraphModule,
    example_inputs: tuple[torch.Tensor, ...],
    dims: tuple[tuple[int, ...], ...],
    *,
    freezing: bool = False,
) -> Callable[..., Any]:
    """``torch.compile`` of ``gm`` with the dimensions ``dims`` of each input marked dynamic (dynamo's
    symbolic shapes: one compile for the range), compiled now on ``example_inputs``. It keeps a dynamo
    frame, which a partition compiled for one size avoids ([Note: partitions without an inner frame])."""
    start = time.perf_counter()
    compiled = torch.compile(
        fresh_entry(gm, "collage_inductor_dynamic"), backend="inductor", options={"freezing": freezing}
    )
    runner = _NoGradRunner(compiled)
    marked = []
    for x, dynamic in zip(example_inputs, dims, strict=True):
        alias = x.detach().view_as(x)  # the mark stays on this alias, not on the caller's tensor
        for d in dynamic:
            torch._dynamo.mark_dynamic(alias, d)
        marked.append(alias)
    try:
        with torch._inductor.config.patch(freezing=freezing):
            runner(*marked)
    except Exception as exc:
        raise BackendCompileError.from_exception(backend, exc, _OP_PATTERNS) from exc
    logger.debug("%s: compiled a graph for a range of sizes in %.2f s", backend, time.perf_counter() - start)
    return runner


# [Note: frozen partitions]
# The tensors a Collage partition reads as ``get_attr`` are constants: weights Collage froze into an
# inference graph (guarded by their version counters, [Note: freezing] in freeze.py; a changed
# weight places the graph again, compiling afresh) or constants of the traced program. Compiled
# without Inductor's freezing they were still passed to the kernels as inputs on every call, and
# Inductor's CPU code neither folded nor pre-packed them: collage on Inductor alone ran mlp at
# batch 32 in 2.24 ms, 1.44 ms with freezing, against OpenVINO's 1.49 ms (gpt2 at batch 8: 19.1 ->
# 17.9 ms against OpenVINO's 18.7; resnet18 at batch 8: 89.0 -> 80.7, OpenVINO 75.5). So partitions
# are always compiled with freezing. A training graph's parameters are placeholders, not
# attributes, and are left alone. The whole-model baseline (``compile``) keeps the ``freezing``
# field, as users choose it.


# [Note: partitions without an inner frame]
# A Collage partition is already an ATen graph, and the placed model already runs behind dynamo's
# frame (or none, through compile_exported). Compiled with torch.compile, an Inductor partition ran
# a second frame of its own on every call: guards on the partition module's frozen weights, the
# bytecode gathering them. At batch 1, torch.compile(backend="inductor") on the whole model beat
# collage's placement through torch.compile on 4 of 6 models (dlrm: 1.46 against 1.72 ms), while
# Inductor's partitions were timed with the extra frame and lost to OpenVINO. So partitions go to
# Inductor's compile_fx directly (it lowers with aot_autograd as torch.compile's Inductor backend
# does) under no_grad, since a partition is a piece of an already-differentiated graph; the whole
# model baseline (``compile``) stays torch.compile, as users run it. Graphs taking non-tensor
# inputs (symbolic sizes) keep the torch.compile path, whose guards recompile for new values.
def inductor_compile_graph(
    backend: str,
    gm: fx.GraphModule,
    example_inputs: tuple[Any, ...],
    *,
    freezing: bool = False,
    options: dict[str, str | int | bool | Callable[..., Any]] | None = None,
) -> Callable[..., Any]:
    """Inductor's ``compile_fx`` on ``gm``, compiled now; see [Note: partitions without an inner frame]."""
    if not all(isinstance(x, torch.Tensor) for x in example_inputs):
        return inductor_compile(backend, gm, example_inputs, freezing=freezing, options=options)
    from torch._inductor.compile_fx import compile_fx

    start = time.perf_counter()
    # compile_fx rewrites the graph it is given; the copy shares gm's (frozen) tensors
    graph_copy = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    try:
        with torch.no_grad(), torch._inductor.config.patch({"freezing": freezing, **(options or {})}):
            compiled = compile_fx(graph_copy, list(example_inputs))
            runner = _NoGradRunner(cast(Callable[..., Any], compiled))
            runner(*example_inputs)
    except Exception as exc:
        raise BackendCompileError.from_exception(backend, exc, _OP_PATTERNS) from exc
    logger.debug(
        "%s: compiled a %d-node graph in %.2f s", backend, len(gm.graph.nodes), time.perf_counter() - start
    )
    return runner


# [Note: freezing needs the global flag]
# Dynamo decides while tracing whether parameters become graph attributes (which Inductor's
# freezing folds into constants) or graph inputs (which it cannot), and it reads the *global*
# `torch._inductor.config.freezing` for that; torch.compile's `options` only reach Inductor after
# tracing. With options alone, the "frozen" MLP ran plain addmm on parameter inputs. So the first
# call, which traces, runs with the global flag patched on. A later recompile (new shapes, new grad
# mode) traces without it: still correct, just not frozen.


class _NoGradRunner:
    """Calls ``fn`` under ``torch.no_grad()``, so a frozen graph is used in whatever mode the caller is."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    def __call__(self, *args: Any) -> Any:
        if not torch.is_grad_enabled():  # entering no_grad costs ~3 us a call
            return self._fn(*args)
        with torch.no_grad():
            return self._fn(*args)

    def __repr__(self) -> str:
        return f"<no_grad {self._fn!r}>"


# Partitions are always frozen ([Note: frozen partitions]); ``get_backend("inductor", freezing=True)``
# freezes whole modules too.
# Inductor generates and builds C++ per graph: on the 2-core machine its whole-graph compiles took
# ~0.1 s per ATen op (resnet18 ~20 s), against ~0.02 for ONNX Runtime and OpenVINO (no prior given:
# measured first).
SPEC = runner_spec("inductor", InductorBackend, compile_s_per_op=0.1, threads="torch")
