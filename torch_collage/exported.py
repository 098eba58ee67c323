"""``torch_collage.compile_exported``: place a model captured by ``torch.export``, called without dynamo.

[Note: exported entry]
Through ``torch.compile`` every call first runs dynamo's frame: its guards and the bytecode that
gathers the module's parameters as graph inputs. Timed from inside collage's placer on the Intel
machine (OpenVINO placement, 2 threads), the frame and aot_autograd's wrapper cost 0.17-0.21 ms of
dlrm's 3.7 ms call at batch 32 (70 graph inputs), and 1.1-1.2 ms of mmt's 13 ms call at batch 1
(540 graph inputs), where the guards are 0.65-0.75 ms of it
(``set_stance(skip_guard_eval_unsafe=True)`` left 0.36 ms); inside the placer, its check of the
536 frozen weights adds 0.15-0.27 ms. Guards and check cost several times more after the model has
run than hot (mmt's guards: 0.58 against 0.15 ms): the run evicts the parameters' metadata from the
caches. Any torch.compile backend pays the frame; a deployed inference model need not. ``compile_exported`` captures the model once
with ``torch.export`` (static shapes, like the runtimes it places on), lowers it to the same ATen
level as aot_autograd's inference graphs (``run_decompositions({})``), and places that graph with
the same machinery as the dynamo backend (``entry._LazyPlacer``: frozen parameters, re-placed from
cached costs when one changes). A call flattens its inputs, checks their shapes and dtypes against
the export's, and runs the placement: tens of microseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from torch_collage.backends._export import StaticSignature, exported_dynamic_dims, quiet_treespec_deprecation
from torch_collage.backends.registry import check_names
from torch_collage.entry import _LazyPlacer
from torch_collage.explain import ExplainReport
from torch_collage.options import CollageOptions
from torch_collage.report import GraphReport

__all__ = ["ExportedCollage", "compile_exported"]


class ExportedCollage:
    """A model placed by Collage from its ``torch.export`` graph: call it like the model.

    Inference only (outputs record no autograd graph). Inputs must have the example inputs' shapes
    and dtypes (``ValueError`` otherwise: compile again for new shapes). ``report`` is the
    placement, as ``torch_collage.explain`` gives it. Parameters are compiled in as constants; an
    in-place update of one (or of a buffer) makes the next call place the graph again from cached
    costs.
    """

    def __init__(
        self, placer: _LazyPlacer, template: list[Any], user: Sequence[int], in_spec: pytree.TreeSpec,
        out_spec: pytree.TreeSpec, example: Sequence[torch.Tensor], reports: list[GraphReport],
        dynamic: Sequence[frozenset[int]] = (), ranges: Sequence[tuple[int, int, int, int | None]] = (),
    ) -> None:  # fmt: skip
        self._placer, self._template, self._user = placer, template, tuple(user)
        self._in_spec, self._out_spec = in_spec, out_spec
        device = example[0].device.type if example else "cpu"
        self._signature = StaticSignature.of(example, device, dynamic)
        self._ranges = tuple(ranges)  # (input, dim, min, max) of each dynamic dimension
        self._reports = reports
        # [Note: exported call path] The common call passes exactly the example's tensors,
        # positionally, and gets one tensor back: it skips flattening ``(args, kwargs)``, comparing
        # tree specs and unflattening the output. Measured around the placed callable: the wrapper of
        # tiny dlrm (14 inputs) went from 52 to 27 us, tiny mlp's from 22 to 7 us. Any other call
        # takes the general path and its errors.
        self._flat_call = in_spec == pytree.tree_flatten((tuple(example), {}))[1]
        self._single_output = out_spec.is_leaf()

    @property
    def report(self) -> ExplainReport:
        """The current placement (made at compile time; made again after weights changed)."""
        return ExplainReport(self._reports[-1:])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._flat_call and not kwargs and len(args) == len(self._user) and _all_tensors(args):
            flat: Sequence[Any] = args  # see [Note: exported call path]
        else:
            flat, spec = pytree.tree_flatten((args, kwargs))
            if spec != self._in_spec:
                raise TypeError(f"called with inputs structured as {spec}, compiled for {self._in_spec}")
        values = self._template.copy()
        for pos, arg in zip(self._user, self._signature.prepare(flat)):  # ValueError naming the input
            values[pos] = arg
        for i, dim, low, high in self._ranges:
            size = flat[i].shape[dim]
            if size < low or (high is not None and size > high):
                raise ValueError(
                    f"input {i}: size {size} of dimension {dim} is outside the exported range "
                    f"[{low}, {high if high is not None else 'inf'}]; export again with a wider Dim"
                )
        if torch.is_grad_enabled():  # entering no_grad costs ~2 us a call; skip it where grad is off
            with torch.no_grad():
                out = self._placer(*values)
        else:
            out = self._placer(*values)
        if self._single_output:
            return out[0]
        return pytree.tree_unflatten(list(out), self._out_spec)

    def __repr__(self) -> str:
        runner = self._placer._last.runner if self._placer._last else "not placed"
        return f"ExportedCollage({runner})"


def _dimension_ranges(program: torch.export.ExportedProgram) -> list[tuple[int, int, int, int | None]]:
    """``(input, dim, min, max)`` of each user input dimension ``program`` exported as a symbol
    (``max`` None: unbounded), from its range constraints."""
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    out: list[tuple[int, int, int, int | None]] = []
    for i, name in enumerate(program.graph_signature.user_inputs):
        val = nodes[name].meta.get("val")
        for dim, size in enumerate(val.shape if isinstance(val, torch.Tensor) else ()):
            if not isinstance(size, torch.SymInt):
                continue
            vr = program.range_constraints.get(size.node.expr)
            if vr is None:
                continue
            low = int(vr.lower) if vr.lower.is_Integer else 0
            out.append((i, dim, low, int(vr.upper) if vr.upper.is_Integer else None))
    return out


def _all_tensors(args: Sequence[Any]) -> bool:
    # a plain loop: all() over a generator costs a few us more per call (see freeze.FrozenInputs)
    for arg in args:  # noqa: SIM110
        if not isinstance(arg, torch.Tensor):
            return False
    return True


def compile_exported(
    model: nn.Module, *example_inputs: Any, dynamic_shapes: Any = None, **options: Any
) -> ExportedCollage:
    """Capture ``model`` with ``torch.export`` for ``example_inputs`` and place its inference graph
    with Collage ``options`` (the keys of ``torch.compile(..., backend="collage", options=...)``).

    The returned callable runs without dynamo (see [Note: exported entry]). Shapes are static unless
    ``dynamic_shapes`` (``torch.export.export``'s argument, e.g. ``{"x": {1: Dim("seq", min=2,
    max=512)}}``) makes some dynamic: the graph is then placed once, at the example's sizes, and
    runs at every size of the range ([Note: shape ranges] in shapes.py). A model that mutates its
    buffers or inputs when called (BatchNorm in training mode, say) raises ``ValueError``: call
    ``model.eval()`` first.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    parsed = CollageOptions.from_mapping(options)
    check_names(parsed.backends)
    with torch.no_grad(), quiet_treespec_deprecation():
        program = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
        program = program.run_decompositions({})
    sig = program.graph_signature
    side_effects = [s for s in sig.output_specs if s.kind != OutputKind.USER_OUTPUT]
    if side_effects:
        kinds = sorted({s.kind.name.lower() for s in side_effects})
        raise ValueError(
            f"model mutates state when called ({', '.join(kinds)}: {side_effects[0].target}); "
            "compile_exported runs inference only: call model.eval() and avoid in-place updates of inputs"
        )
    template: list[Any] = []
    user: list[int] = []
    static: list[int] = []
    for i, spec in enumerate(sig.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            user.append(i)
            template.append(None)
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            value = program.state_dict.get(spec.target)
            template.append(program.constants[spec.target] if value is None else value)
            static.append(i)
        else:
            raise ValueError(f"unsupported export input {spec.kind.name} ({spec.target})")
    flat, in_spec = pytree.tree_flatten((tuple(example_inputs), {}))
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    if len(tensors) != len(flat) or len(flat) != len(user):
        raise TypeError("example_inputs must be tensors (nested in tuples, lists or dicts)")
    reports: list[GraphReport] = []
    frozen = tuple(static) if parsed.freeze else ()
    placer = _LazyPlacer(program.graph_module, parsed, "inference", reports.append, frozen)
    dynamic = exported_dynamic_dims(program) if dynamic_shapes is not None else ()
    compiled = ExportedCollage(
        placer, template, user, in_spec, program.call_spec.out_spec, tensors, reports, dynamic,
        _dimension_ranges(program),
    )  # fmt: skip
    compiled(*example_inputs)  # place now: compile cost up front, as with any ahead-of-time compile
    return compiled
