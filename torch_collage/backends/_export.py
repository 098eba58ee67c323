"""``torch.export`` step shared by the runtimes that take a whole exported graph (ONNX Runtime on CPU
and CUDA, OpenVINO, TensorRT), and the static signature their compiled callables check each call against."""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import OutputKind, TensorArgument
from torch.utils import _pytree as pytree

from torch_collage.backends.base import BackendCompileError

__all__ = [
    "WHOLE_GRAPH",
    "ExportedGraph",
    "GraphIO",
    "StaticSignature",
    "export_graph",
    "exported_dynamic_dims",
    "holds_whole_graph",
    "quiet_treespec_deprecation",
]

# ``GraphModule.meta`` key: True on a graph that collage places whole on one backend, so that no
# other partition runs beside its runner (a runtime may then keep the cores between calls; see
# [Note: ORT call path] in onnxruntime.py). Set by whoever hands the graph to ``compile``.
WHOLE_GRAPH = "torch_collage.whole_graph"


def holds_whole_graph(module: nn.Module) -> bool:
    """Whether ``module`` is marked as a whole graph placed on one backend (``WHOLE_GRAPH``)."""
    meta = getattr(module, "meta", None)
    return isinstance(meta, dict) and meta.get(WHOLE_GRAPH) is True


@dataclass(frozen=True)
class StaticSignature:
    """The shapes, dtypes and device type a compiled callable was specialised to."""

    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    device: str = "cpu"  # device type every input must be on: "cpu" or "cuda"
    # per input, the dimensions compiled for any size (an export with dynamic dimensions); () : none
    dynamic: tuple[frozenset[int], ...] = ()

    @classmethod
    def of(
        cls, tensors: Sequence[torch.Tensor], device: str = "cpu", dynamic: Sequence[Collection[int]] = ()
    ) -> StaticSignature:
        dyn = tuple(frozenset(d) for d in dynamic) if any(dynamic) else ()
        return cls(tuple(t.shape for t in tensors), tuple(t.dtype for t in tensors), device, dyn)

    def _fits(self, i: int, shape: torch.Size) -> bool:
        """Whether ``shape`` is input ``i``'s compiled shape but for its dynamic dimensions."""
        want = self.shapes[i]
        if not self.dynamic or len(shape) != len(want):
            return False
        free = self.dynamic[i]
        return all(d in free or a == b for d, (a, b) in enumerate(zip(shape, want)))

    def prepare(self, args: Sequence[Any]) -> list[torch.Tensor]:
        """Check ``args`` against the signature; return them detached and contiguous."""
        if len(args) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} input tensors, got {len(args)}")
        out = []
        cpu = self.device == "cpu"  # ``is_cpu`` is 6x faster than ``device.type`` (50 against 300 ns)
        for i, (arg, shape, dtype) in enumerate(zip(args, self.shapes, self.dtypes, strict=True)):
            if (
                not isinstance(arg, torch.Tensor)
                or (arg.shape != shape and not self._fits(i, arg.shape))
                or arg.dtype != dtype
            ):
                got = (
                    f"{tuple(arg.shape)} {arg.dtype}" if isinstance(arg, torch.Tensor) else type(arg).__name__
                )
                raise ValueError(
                    f"input {i}: compiled for shape {tuple(shape)} {dtype}, got {got}; compile again for new shapes"
                )
            if not arg.is_cpu if cpu else arg.device.type != self.device:
                raise ValueError(
                    f"input {i}: expected a {self.device.upper()} tensor, got one on {arg.device}"
                )
            out.append((arg.detach() if arg.requires_grad else arg).contiguous())  # detach: 350 ns
        return out


@dataclass(frozen=True)
class GraphIO:
    """How a compiled runtime's flat inputs and outputs map to the module's: enough to call a runtime
    model that was saved and loaded again, without the program it was exported from.

    The runtime returns each distinct output tensor once, as a flat tuple (OpenVINO's converter fails
    on a graph that returns one tensor twice, as aot_autograd's forward graphs do when a user output is
    also saved for backward); ``unflatten`` rebuilds what the module returns.
    """

    input_names: tuple[str, ...]  # the program's user-input placeholder names, in positional order
    output_map: tuple[int, ...]  # for each leaf of the module's output, the index of its runtime output
    out_spec: pytree.TreeSpec  # how those leaves fold back into what the module returns
    signature: StaticSignature

    @property
    def num_outputs(self) -> int:
        """How many outputs the runtime's model has (distinct output tensors)."""
        return len(set(self.output_map))

    def match_inputs(self, runtime_inputs: Sequence[Collection[str]]) -> list[int]:
        """The positional index of each runtime input, given each one's tensor name(s).

        By name where a name matches; otherwise by position when the runtime kept every input (the
        ONNX exporter renames an input that is also an output, ``x`` -> ``x_orig``, but keeps the order).
        """
        positions = []
        for i, names in enumerate(runtime_inputs):
            known = [self.input_names.index(n) for n in names if n in self.input_names]
            if known:
                positions.append(known[0])
            elif len(runtime_inputs) == len(self.input_names):
                positions.append(i)
            else:
                raise KeyError(
                    f"runtime input {sorted(names)} is none of the exported inputs {self.input_names}"
                )
        return positions

    def unflatten(self, runtime_outputs: Sequence[torch.Tensor]) -> Any:
        if self._returns_flat_tuple:  # every call of a collage partition: 1.7 us -> 0.1 us
            return tuple(runtime_outputs)
        return pytree.tree_unflatten([runtime_outputs[i] for i in self.output_map], self.out_spec)

    @functools.cached_property
    def _returns_flat_tuple(self) -> bool:
        """The module returns a tuple of distinct tensors, in the runtime's order (ATen graphs do)."""
        n = len(self.output_map)
        return self.output_map == tuple(range(n)) and self.out_spec == pytree.tree_structure(tuple(range(n)))

    def to_json(self) -> str:
        """Everything but the program, as JSON (``from_json`` reads it back)."""
        sig = self.signature
        return json.dumps(
            {
                "input_names": list(self.input_names),
                "output_map": list(self.output_map),
                "out_spec": pytree.treespec_dumps(self.out_spec),
                "shapes": [list(s) for s in sig.shapes],
                "dtypes": [str(d).removeprefix("torch.") for d in sig.dtypes],
                "device": sig.device,
                "dynamic": [sorted(d) for d in sig.dynamic],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> GraphIO:
        """Read ``to_json``'s output; ``ValueError`` when it is not that."""
        try:
            d = json.loads(text)
            dtypes = [getattr(torch, name) for name in d["dtypes"]]
            if not all(isinstance(t, torch.dtype) for t in dtypes):
                raise TypeError(f"not dtypes: {d['dtypes']}")
            dynamic = tuple(frozenset(int(x) for x in dims) for dims in d.get("dynamic", []))
            signature = StaticSignature(
                tuple(torch.Size(s) for s in d["shapes"]), tuple(dtypes), d["device"], dynamic
            )
            return cls(
                tuple(d["input_names"]),
                tuple(d["output_map"]),
                pytree.treespec_loads(d["out_spec"]),
                signature,
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a saved graph interface: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class ExportedGraph(GraphIO):
    """A module exported with ``torch.export`` for fixed example inputs, with its runtime interface."""

    program: ExportedProgram

    @property
    def io(self) -> GraphIO:
        """The interface without the program (what a saved runtime model keeps)."""
        return GraphIO(self.input_names, self.output_map, self.out_spec, self.signature)

    def output_meta(self) -> list[tuple[torch.Size, torch.dtype]]:
        """Shape and dtype of each distinct output, in the runtime's output order (from the program's
        fake values), so that callers can allocate output buffers before running."""
        nodes = {n.name: n for n in self.program.graph.nodes}
        specs = [s for s in self.program.graph_signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
        vals = [nodes[spec.arg.name].meta["val"] for spec in specs]
        return [(v.shape, v.dtype) for v in vals]


class _DistinctOutputs(nn.Module):
    """``inner`` returning only the output leaves at positions ``keep``, as a flat tuple."""

    def __init__(self, inner: nn.Module, keep: Sequence[int]) -> None:
        super().__init__()
        self.inner = inner
        self.keep = tuple(keep)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves = pytree.tree_leaves(self.inner(*args))
        return tuple(leaves[i] for i in self.keep)


def export_graph(
    backend: str,
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    device: str = "cpu",
    dims: Sequence[Sequence[int]] = (),
) -> ExportedGraph:
    """``torch.export.export`` ``module`` on ``example_inputs`` (twice when it returns a tensor more
    than once); failures become ``BackendCompileError``. Every input must be on ``device`` ("cpu" or
    "cuda"), and the compiled callable's signature checks each call's inputs against it. ``dims``
    (per input) are exported as dynamic dimensions where the program allows it; the signature then
    accepts any size there (``BackendCompileError`` when the export made none of them dynamic)."""
    _check_example_inputs(backend, example_inputs, device)
    if isinstance(module, fx.GraphModule):
        module = reshapes_for_views(module)
    dynamic = _dynamic_shapes(dims) if any(dims) else None
    program = _export(backend, module, example_inputs, dynamic)
    out_spec = program.call_spec.out_spec
    output_map, keep = _distinct(_user_output_names(backend, program))
    if len(keep) < len(output_map):
        program = _export(backend, _DistinctOutputs(module, keep), example_inputs, dynamic)
    exported = exported_dynamic_dims(program) if dynamic else ()
    if dynamic and not any(exported):
        raise BackendCompileError(backend, "the export specialised every dynamic dimension")
    return ExportedGraph(
        program=program,
        input_names=tuple(program.graph_signature.user_inputs),
        output_map=output_map,
        out_spec=out_spec,
        signature=StaticSignature.of(example_inputs, device, exported),
    )


# [Note: views become reshapes for the exporters]
# An ATen graph's ``view`` is valid for the strides eager gave its input, and torch.export traces
# with those. But the runtimes' converters decompose the exported program again with their own
# tables (OpenVINO's frontend calls ``run_decompositions``), and a decomposition may give an
# intermediate other strides than eager's kernel did: a 4-layer BERT's whole graph failed in
# OpenVINO's conversion with "Cannot view a tensor with shape [4, 64, 256] and strides (256, 1024,
# 1) as (256, 256)". A runtime copies values anyway and an exported partition is functional (no
# op writes through a view), so ``view`` and ``_unsafe_view`` are handed over as ``reshape``,
# which is the same view where the strides allow one and a copy where they do not.
#
# [Note: grouped attention for the exporters]
# Collage hands grouped-query attention to the backends as CPU flash attention reading K and V with
# fewer heads than the queries ([Note: rewrites before placing] in torch_collage/rewrite.py). The
# ONNX exporter's translation of that node assumes equal heads (ONNX Runtime refused a Llama decode
# step's MatMul: "Incompatible dimensions"), so an exporter gets K and V expanded to the query heads
# first (``repeat_interleave`` over heads, the order the kernel reads them in): the runtime then
# computes what it computed before the rewrite.
_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)
_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _flash_cpu_expanded(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    """CPU flash attention with K and V expanded to the query's heads ([Note: grouped attention for
    the exporters])."""
    if key.shape[1] != query.shape[1]:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return _FLASH_CPU(query, key, value, *args, **kwargs)


def reshapes_for_views(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``, or a copy of it whose ``view`` nodes are ``reshape`` nodes ([Note: views become
    reshapes for the exporters]) and whose CPU flash attention expands grouped K and V ([Note:
    grouped attention for the exporters])."""
    swaps: dict[Any, Callable[..., Any]] = {
        **dict.fromkeys(_VIEWS, torch.ops.aten.reshape.default),
        _FLASH_CPU: _flash_cpu_expanded,
    }
    if not any(n.op == "call_function" and n.target in swaps for n in gm.graph.nodes):
        return gm
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.op == "call_function" and node.target in swaps:
            env[node].target = swaps[node.target]
    return fx.GraphModule(gm, graph)


def _dynamic_shapes(dims: Sequence[Sequence[int]]) -> tuple[dict[int, Any] | None, ...]:
    """``torch.export``'s ``dynamic_shapes`` for positional inputs: ``Dim.AUTO`` at ``dims`` (the
    export keeps a dimension static where the program needs it to be)."""
    auto = torch.export.Dim.AUTO
    return tuple({d: auto for d in ds} if ds else None for ds in dims)


def exported_dynamic_dims(program: ExportedProgram) -> tuple[frozenset[int], ...]:
    """Per user input of ``program``, the dimensions it exported with a symbolic size."""
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    out = []
    for name in program.graph_signature.user_inputs:
        val = nodes[name].meta.get("val")
        shape = val.shape if isinstance(val, torch.Tensor) else ()
        out.append(frozenset(d for d, size in enumerate(shape) if isinstance(size, torch.SymInt)))
    return tuple(out)


@contextlib.contextmanager
def quiet_treespec_deprecation() -> Iterator[None]:
    """Silence the FutureWarning about ``LeafSpec`` that torch's own export code trips (torch.export,
    ``run_decompositions``, the ONNX exporter, OpenVINO's converter through them): it names no user
    code, and a collage search would print it once per candidate."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
        yield


def _export(
    backend: str, module: nn.Module, example_inputs: tuple[torch.Tensor, ...], dynamic: Any = None
) -> ExportedProgram:
    try:
        with quiet_treespec_deprecation():
            return torch.export.export(module, tuple(example_inputs), dynamic_shapes=dynamic)
    except Exception as exc:
        raise BackendCompileError.from_exception(backend, exc) from exc


def _user_output_names(backend: str, program: ExportedProgram) -> list[str]:
    specs = [s for s in program.graph_signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    if not all(isinstance(spec.arg, TensorArgument) for spec in specs):
        raise BackendCompileError(backend, "only modules whose outputs are all tensors are supported")
    return [spec.arg.name for spec in specs]


def _distinct(names: Sequence[str]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(output_map, keep)``: ``keep`` the first position of each distinct name, ``output_map`` each
    position's index into ``keep``."""
    first: dict[str, int] = {}
    for name in names:
        first.setdefault(name, len(first))
    keep = tuple(names.index(name) for name in first)
    return tuple(first[name] for name in names), keep


def _check_example_inputs(backend: str, example_inputs: tuple[torch.Tensor, ...], device: str) -> None:
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"example_inputs[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != device:
            where = "CPU" if device == "cpu" else device.upper()
            raise BackendCompileError(backend, f"runs on {where} only; example_inputs[{i}] is on {t.device}")
