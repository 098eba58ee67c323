"""The ``collage`` dynamo backend: ``torch.compile(model, backend="collage", options={...})``.

aot_autograd lowers the captured graph to ATen; the forward and the backward graph (or the
inference graph under ``no_grad``) are each placed. Placement happens on a graph's first call, when
real input tensors are at hand (aot_autograd hands compilers fake ones). A graph with symbolic
shapes is placed once for its range of sizes ([Note: shape ranges] in shapes.py).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import _disable_current_modes

from torch_collage.assembly import AssembledGraph
from torch_collage.backends.registry import check_names
from torch_collage.freeze import FrozenInputs, freeze_inputs, static_input_indices, written_inputs
from torch_collage.options import CollageOptions
from torch_collage.place import Placer, place_graph
from torch_collage.report import GraphReport
from torch_collage.shapes import RangeKey, describe_range, flexible, has_symbolic_inputs

__all__ = ["collage_backend", "make_backend"]

logger = logging.getLogger(__name__)

ReportSink = Callable[[GraphReport], None]


class _Placed:
    """One placement: the assembled graph and, for a frozen graph, what was frozen."""

    def __init__(self, runner: AssembledGraph, frozen: FrozenInputs | None) -> None:
        self.runner, self.frozen = runner, frozen

    def __call__(self, *args: Any) -> Any:
        return self.runner(*(self.frozen.dynamic(args) if self.frozen else args))

    def still_valid(self, args: Sequence[Any]) -> bool:
        return self.frozen is None or self.frozen.still_valid(args)


class _LazyPlacer:
    """Places ``gm`` on its first call for each input signature, then runs the assembled graph.

    Inputs at ``static`` (parameters of an inference graph) are frozen into the graph when placing;
    see [Note: freezing] in freeze.py. See [Note: call overhead] for what a call checks.
    """

    def __init__(
        self, gm: fx.GraphModule, options: CollageOptions, kind: str, sink: ReportSink | None,
        static: tuple[int, ...] = (), placer: Placer | None = None,
    ) -> None:  # fmt: skip
        written = _written_indices(gm)  # state, never frozen: [Note: inputs the graph writes]
        self.static = tuple(i for i in static if i not in written)
        self.gm, self.options, self.kind, self.sink, self.placer = gm, options, kind, sink, placer
        self._placed: dict[str, _Placed] = {}
        self._last: _Placed | None = None
        self._symbolic = has_symbolic_inputs(gm)
        self._range_key = RangeKey(gm) if self._symbolic else None
        self._lock = threading.Lock()

    # [Note: call overhead]
    # A placed call runs in front of every compiled partition, so it must cost next to nothing:
    # formatting the full signature of dlrm's 70 inputs took 0.11 ms, 4% of its 2.4 ms OpenVINO
    # run. When the graph has no symbolic shapes, dynamo's guards already pin every input's shape,
    # stride and dtype, so the last placement is reused after checking only that frozen inputs are
    # unchanged (identity and version counter, ~4 us). Graphs with symbolic shapes (dynamo's
    # automatic dynamic shapes) key placements by their inputs without the symbolic sizes, one
    # placement for the graph's range ([Note: shape ranges] in shapes.py).
    # On a small model the frame itself is half the call, and each Python layer shows: the zoo's HF
    # GPT-2 (2-core Xeon, 28 frozen weights) ran 265 us a call through collage with the whole graph
    # on Inductor against 250 us through Inductor, the layers between aot_autograd and Inductor's
    # code costing ~15 us. So the call is boxed without make_boxed_func's unpacking layer
    # (``_BoxedPlacer``), one whole-graph step skips the slot loop (``AssembledGraph._direct``), and
    # a frozen Inductor partition enters ``no_grad`` only when grad is on (3 us). Paired, 5 rounds:
    # collage/Inductor 1.02-1.07 before on GPT-2 and Llama (ONNX Runtime chosen), 0.99-1.01 after.
    # Every Python frame counts here, and on Python 3.11 a comprehension is one: the per-call
    # getters are ``operator.itemgetter``s and the ONNX Runtime feed a loop. 20th percentile of call
    # time over Inductor's (bench_collage_hf): GPT-2 1.04-1.07 before; after, over four runs with
    # the same placement, GPT-2 0.94-1.04 and Llama 1.00-1.04, as much as the runs vary.
    #
    # [Note: skipping dynamo's module guards]
    # Most of what dynamo's frame costs a collage call is its guards on the module's parameters
    # (AMD EPYC, OpenVINO placement: dlrm at batch 1 1.00 ms plain, 0.88 ms with
    # `guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe`, 0.87 ms without dynamo
    # through compile_exported; mmt 9.8, 8.9, 8.3 ms). The filter is "unsafe" because dynamo then
    # no longer notices changed module state. For the weights collage froze, the check above
    # covers it: the frame still gathers the parameters from the module on every call, so an
    # in-place update or a replaced parameter places the graph again. What it does not cover is
    # other module state (``train()``/``eval()``, hooks, Python attributes read in ``forward``).
    def __call__(self, *args: Any) -> Any:
        placed = self._last
        if placed is None or self._symbolic or not placed.still_valid(args):
            placed = self._lookup(args)
        return placed(*args)

    def boxed(self) -> _BoxedPlacer:
        """This placer in aot_autograd's boxed calling convention (one list of inputs)."""
        return _BoxedPlacer(self)

    def _lookup(self, args: Sequence[Any]) -> _Placed:
        key = self._range_key(args) if self._range_key is not None else ""
        placed = self._placed.get(key)
        if placed is None or not placed.still_valid(args):
            with self._lock:
                placed = self._placed.get(key)
                if placed is None or not placed.still_valid(args):
                    placed = self._search(args)
                    self._placed[key] = placed
        self._last = placed
        return placed

    def _search(self, args: Sequence[Any]) -> _Placed:
        gm, frozen = self.gm, None
        if self.static:
            frozen = FrozenInputs.of(args, self.static)
            gm = freeze_inputs(self.gm, args, self.static)
        dynamic = frozen.dynamic(args) if frozen else args
        # aot_autograd's first call runs under an analysis dispatch mode; measure outside it
        with _disable_current_modes():
            assembled, report = place_graph(gm, dynamic, self.options, self.kind, self.placer)
            sizes = describe_range(gm, dynamic) if self._symbolic else ""
            if sizes:
                assembled = flexible(gm, assembled, dynamic, self.options)
                report = dataclasses.replace(report, shape_range=sizes)
        logger.info(
            "torch_collage: %s graph placed: %s (%.1f s)%s",
            self.kind,
            assembled,
            report.search_s,
            f" for sizes {sizes}" if sizes else "",
        )
        if self.sink is not None:
            self.sink(report)
        return _Placed(assembled, frozen)


class _BoxedPlacer:
    """A ``_LazyPlacer`` called the way aot_autograd calls a boxed compiled graph: with one list.

    ``make_boxed_func`` would add a call layer that unpacks the list; here the placed call is
    inlined, since every call of the compiled model runs it ([Note: call overhead]).
    """

    def __init__(self, lazy: _LazyPlacer) -> None:
        self.lazy = lazy
        # an instance attribute: aot_autograd wraps the backward's callable with functools.wraps,
        # which copies the instance's __dict__ to the wrapper, not its class's attributes
        self._boxed_call = True

    def __call__(self, args: list[Any]) -> Any:
        lazy = self.lazy
        placed = lazy._last
        if placed is None or lazy._symbolic or not placed.still_valid(args):
            placed = lazy._lookup(args)
        frozen = placed.frozen
        return placed.runner(*(frozen.dynamic(args) if frozen is not None else args))


def _written_indices(gm: fx.GraphModule) -> set[int]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    written = set(written_inputs(gm.graph))
    return {i for i, n in enumerate(placeholders) if n in written}


def make_backend(
    options: CollageOptions, sink: ReportSink | None = None, placer: Placer | None = None
) -> Callable[..., Any]:
    """A dynamo backend placing with ``options`` and ``placer`` (the default one when None); ``sink``
    receives each graph's report. Unknown backend names in ``options.backends`` raise ``ValueError``
    here, where a compile starts."""
    check_names(options.backends)

    def compiler(kind: str) -> Callable[[fx.GraphModule, Sequence[Any]], Callable[..., Any]]:
        def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
            del example_inputs  # fake tensors; placement waits for real ones
            static = static_input_indices() if kind == "inference" and options.freeze else ()
            return _LazyPlacer(gm, options, kind, sink, static, placer).boxed()

        return compile_graph

    return aot_autograd(
        fw_compiler=compiler("forward"),
        bw_compiler=compiler("backward"),
        inference_compiler=compiler("inference"),
        keep_inference_input_mutations=True,
    )


def collage_backend(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None
) -> Callable[..., Any]:
    """Dynamo backend entry point (``torch_dynamo_backends`` group, name ``collage``)."""
    parsed = CollageOptions.from_mapping(options)
    return make_backend(parsed)(gm, example_inputs)
