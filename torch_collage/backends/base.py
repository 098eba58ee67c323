"""What every backend is: the ``Backend`` runner protocol, the ``BackendSpec`` that makes a backend
placeable (which nodes it claims, how it fuses, how it compiles a partition), and the one error a
failed compile raises. The lowest layer of ``torch_collage``: it imports nothing of the project."""

from __future__ import annotations

import json
import operator
import os
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import fx, nn

__all__ = [
    "CACHE_ENV",
    "Backend",
    "BackendCompileError",
    "BackendInfo",
    "BackendSpec",
    "CompileFn",
    "DynamicCompileFn",
    "Fusion",
    "LoadFn",
    "NodePredicate",
    "OpRule",
    "SaveFn",
    "default_cache_dir",
    "deterministic",
    "node_tensor_meta",
    "op_name",
    "runner_spec",
    "size_arithmetic",
]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CLASS_PREFIX = re.compile(r"^<class '[\w.]+'>: ")  # how torch.onnx's error summary starts its lines
_MAX_REASON_CHARS = 500

CACHE_ENV = "TORCH_COLLAGE_CACHE_DIR"


def default_cache_dir() -> str:
    """``$TORCH_COLLAGE_CACHE_DIR``, else ``~/.cache/torch_collage``: the cost cache's directory, and
    the root of backends' own compile caches when they are given none."""
    return os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "torch_collage")


@runtime_checkable
class Backend(Protocol):
    """A runtime that can run a whole module (or, later, one partition of it) on this machine.

    ``compile`` takes an ``nn.Module`` or an ATen-level ``torch.fx.GraphModule`` and a tuple of
    example tensors; the callable it returns takes tensors of the same shapes, dtypes and devices
    positionally and returns what the module returns (a tensor, or a tuple/list of tensors).
    """

    @property
    def name(self) -> str:
        """The registry name, e.g. ``"onnxruntime"``."""
        ...

    def available(self) -> tuple[bool, str]:
        """``(True, "")``, or ``(False, why)`` with an install hint. Pure and cheap: imports nothing heavy."""
        ...

    def version(self) -> str:
        """The versions that decide what ``compile`` produces, e.g. ``"onnxruntime 1.32.0 (...)"``.

        Used as part of a cache key. Raises ``RuntimeError`` when the backend is not available.
        """
        ...

    def compile(self, module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
        """Compile ``module`` for ``example_inputs``; raise ``BackendCompileError`` when it cannot."""
        ...


class BackendCompileError(RuntimeError):
    """A backend could not compile a module.

    ``backend`` is the backend's name, ``op`` the ATen/ONNX/OpenVINO op that failed when the
    backend's message names one (else ``None``), ``reason`` a one-line summary. The original
    exception is chained as ``__cause__``.
    """

    def __init__(self, backend: str, reason: str, op: str | None = None) -> None:
        self.backend = backend
        self.op = op
        self.reason = reason
        where = f"op {op}: " if op else ""
        super().__init__(f"{backend} could not compile the model: {where}{reason}")

    @classmethod
    def from_exception(
        cls, backend: str, exc: BaseException, op_patterns: Sequence[re.Pattern[str]] = ()
    ) -> BackendCompileError:
        """Summarise ``exc``: the first line that matches one of ``op_patterns`` becomes the reason and
        names the op (the pattern's groups joined by "."); else the exception's first line."""
        text = _ANSI.sub("", str(exc))
        lines = [_CLASS_PREFIX.sub("", line.strip()) for line in text.splitlines() if line.strip()]
        for pattern in op_patterns:
            for line in lines:
                match = pattern.search(line)
                if match:
                    return cls(
                        backend, _clip(line), op=_normalise_op(".".join(g for g in match.groups() if g))
                    )
        first = lines[0] if lines else ""
        return cls(backend, _clip(f"{type(exc).__name__}: {first}"))


def _normalise_op(op: str) -> str:
    """``aten::relu`` (TorchScript spelling) -> ``aten.relu``; ``aten.relu.default`` unchanged."""
    return op.strip().rstrip(",").replace("::", ".")


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


# --- capability specs: what the search may place on a backend ------------------------------------

Fusion = Literal["single", "elementwise_epilogue", "region"]
CompileFn = Callable[[fx.GraphModule, tuple[torch.Tensor, ...]], Callable[..., Any]]
# (graph, example tensors, each input's dynamic dimensions) -> a callable for every size of those
# dimensions; see [Note: shape ranges] in torch_collage/shapes.py
DynamicCompileFn = Callable[
    [fx.GraphModule, tuple[torch.Tensor, ...], tuple[tuple[int, ...], ...]], Callable[..., Any]
]
SaveFn = Callable[[Callable[..., Any], Path], bool]  # (compiled callable, empty directory) -> saved?
LoadFn = Callable[[Path, tuple[torch.Tensor, ...]], Callable[..., Any]]  # (directory, example inputs)
NodePredicate = Callable[[fx.Node], bool]

# Ops no exported-graph runtime should be handed: randomness differs from eager's by construction.
# An ATen or prims op says so with its ``nondeterministic_seeded`` tag (``uniform``, ``normal``,
# ``exponential``, ``multinomial``, ``randperm``...); names catch the targets that carry no tags.
_RANDOM_OPS = ("rand", "randn", "bernoulli", "native_dropout", "randint", "philox", "seed")


def op_name(node: fx.Node) -> str:
    """``"aten.addmm"`` for ``aten.addmm.default`` (the overload packet's name); the target's name otherwise."""
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return f"{packet._qualified_op_name.replace('::', '.')}"
    return getattr(target, "__name__", str(target))


def node_tensor_meta(node: fx.Node) -> list[torch.Tensor]:
    """The (fake) tensors ``node`` produces according to its ``meta["val"]`` (empty if it has none)."""
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    return [v for v in vals if isinstance(v, torch.Tensor)]


def deterministic(node: fx.Node) -> bool:
    """``node`` is no random op (dropout, ``rand``, ``uniform``...): an exported-graph runtime may run it."""
    if torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ()):
        return _draws_nothing(node)
    name = str(node.target)
    return not any(tag in name for tag in _RANDOM_OPS)


def _draws_nothing(node: fx.Node) -> bool:
    """A seeded op whose arguments turn its randomness off: ``dropout(x, p, train=False)`` (an
    exported eval graph keeps it), ``rrelu(..., training=False)``, attention with ``dropout_p=0``."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return False
    switches = []
    for i, arg in enumerate(schema.arguments):
        if arg.name in ("train", "training", "dropout_p"):
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name, arg.default_value)
            switches.append(value is False if arg.name != "dropout_p" else value == 0)
    return bool(switches) and all(switches)


@dataclass(frozen=True, kw_only=True)
class OpRule:
    """One supported ATen op (``"aten.addmm"``) with optional predicates on its tensor outputs."""

    op: str  # overload packet name, e.g. "aten.mm"; "*" matches every op
    dtypes: frozenset[torch.dtype] | None = None  # allowed output dtypes; None: any
    min_rank: int = 0  # smallest allowed output rank
    max_rank: int | None = None  # largest allowed output rank; None: any
    where: NodePredicate | None = None  # extra predicate on the node (shapes, attributes, ...)

    def matches(self, node: fx.Node) -> bool:
        if self.op not in ("*", op_name(node)):
            return False
        for t in node_tensor_meta(node):
            if self.dtypes is not None and t.dtype not in self.dtypes:
                return False
            if t.dim() < self.min_rank or (self.max_rank is not None and t.dim() > self.max_rank):
                return False
        return self.where is None or self.where(node)


def _always() -> tuple[bool, str]:
    return True, ""


@dataclass(frozen=True, kw_only=True)
class BackendSpec:
    """A placeable backend. ``supports`` is a collection of ``OpRule``/op names or a node predicate."""

    name: str  # registry name
    compile: CompileFn  # FX GraphModule (ATen) + example inputs -> callable returning a tuple of tensors
    supports: Collection[OpRule | str] | NodePredicate = ("*",)  # which nodes it can run
    fusion: Fusion = "region"  # single ops, an op + elementwise epilogue, or convex regions
    max_depth: int | None = None  # most ops per candidate for this backend; None: the option's max_depth
    available: Callable[[], tuple[bool, str]] = _always  # (ok, reason why not)
    version: Callable[[], str] = lambda: "0"  # part of every cache key
    patterns: tuple[
        tuple[str, ...], ...
    ] = ()  # op chains fused as one candidate, e.g. ("aten.mm", "aten.relu")
    mutating_ok: bool = False  # may run ops that mutate inputs or return non-tensors (eager does)
    # Optional: write a compiled callable into a directory (False: this one cannot be saved), and
    # rebuild it from there, so that a warm compile skips compiling; see [Note: compiled artifacts].
    save: SaveFn | None = None
    load: LoadFn | None = None
    # Optional: the whole-module runner, ``runner(**its_options) -> Backend`` (``get_backend``).
    runner: Callable[..., Backend] | None = None
    # Optional: compile a partition once for every size of its dynamic dimensions (its inputs are
    # tensors only); without it, a graph with symbolic shapes compiles the partition per size.
    compile_dynamic: DynamicCompileFn | None = None
    # Optional prior: seconds per ATen op that compiling a whole graph takes on this backend, used
    # to order and budget the first whole graphs before any was measured on this machine.
    compile_s_per_op: float | None = None
    # The thread pool its CPU work runs on: "torch" for torch's intra-op pool (eager, Inductor's C++
    # kernels, torch_cp's kernel); empty for a pool of its own. Partitions on one pool hand the cores
    # over for free; see [Note: fewer runtimes] in measure.py.
    threads: str = ""
    rules: tuple[OpRule, ...] = field(init=False, default=())

    @property
    def pool(self) -> str:
        """The thread pool its partitions run on: ``threads``, else its own (its name)."""
        return self.threads or self.name

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"backend name must be a non-empty string, got {self.name!r}")
        if self.fusion not in ("single", "elementwise_epilogue", "region"):
            raise ValueError(f"fusion must be single, elementwise_epilogue or region, got {self.fusion!r}")
        if not callable(self.supports):
            rules = tuple(r if isinstance(r, OpRule) else OpRule(op=str(r)) for r in self.supports)
            object.__setattr__(self, "rules", rules)

    def supports_node(self, node: fx.Node) -> bool:
        """Whether this backend may run ``node`` (a ``call_function`` node of an ATen graph). Size
        arithmetic of a graph with symbolic shapes (``s0 * s1``, ``sym_size``) goes with any backend:
        it is computed inside the partition, or folded where the sizes are baked ([Note: baked
        sizes])."""
        if size_arithmetic(node):
            return True
        if not self.mutating_ok and (_mutates(node) or not _tensor_valued(node)):
            return False
        if callable(self.supports):
            return bool(self.supports(node))
        return any(rule.matches(node) for rule in self.rules)


_SIZE_OPS = frozenset(
    {
        operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg,
        torch.sym_max, torch.sym_min, torch.ops.aten.sym_size.int, torch.ops.aten.sym_stride.int,
        torch.ops.aten.sym_numel.default, torch.ops.aten.sym_storage_offset.default,
    }
)  # fmt: skip


def size_arithmetic(node: fx.Node) -> bool:
    """``node`` computes an integer size from sizes (or reads one off a tensor)."""
    val = node.meta.get("val")
    return (
        node.op == "call_function"
        and node.target in _SIZE_OPS
        and isinstance(val, (torch.SymInt, int))
        and not isinstance(val, bool)
    )


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _tensor_valued(node: fx.Node) -> bool:
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    return bool(vals) and all(isinstance(v, torch.Tensor) for v in vals)


def runner_spec(
    name: str,
    runner: Callable[..., Backend],
    *,
    supports: Collection[OpRule | str] | NodePredicate = deterministic,
    fusion: Fusion = "region",
    patterns: tuple[tuple[str, ...], ...] = (),
    max_depth: int | None = None,
    compile_s_per_op: float | None = None,
    threads: str = "",
) -> BackendSpec:
    """The spec of a runtime that runs whole ATen graphs: a partition goes to the runner's
    ``compile_graph`` where it has one (``compile`` otherwise); a runner with ``load`` saves its
    compiled partitions through their own ``save(directory)`` ([Note: compiled artifacts])."""
    backend = runner()
    compile_graph = getattr(backend, "compile_graph", None)  # ATen graphs without the module path
    compile_fn = compile_graph if compile_graph is not None else _runner_compile(backend)
    if not getattr(backend, "takes_scalars", False):
        compile_fn = _baking_scalars(compile_fn)
    return BackendSpec(
        name=name,
        compile=compile_fn,
        compile_dynamic=getattr(backend, "compile_graph_dynamic", None),
        compile_s_per_op=compile_s_per_op,
        threads=threads,
        supports=supports,
        fusion=fusion,
        max_depth=max_depth,
        patterns=patterns,
        available=backend.available,
        version=getattr(backend, "graph_version", backend.version),  # compile_graph may differ
        save=_save_runner if hasattr(backend, "load") else None,
        load=_loading_scalars(backend.load) if hasattr(backend, "load") else None,
        runner=runner,
    )


def _runner_compile(backend: Backend) -> CompileFn:
    def compile_fn(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
        return backend.compile(gm, tuple(example_inputs))

    return compile_fn


def _baking_scalars(compile_fn: CompileFn) -> CompileFn:
    """``compile_fn`` for graphs that may take integers (sizes of a graph with symbolic shapes): they
    are baked into a copy of the graph as constants, and the compiled callable checks that each call
    passes the same values ([Note: baked sizes])."""

    def compile_baked(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> Callable[..., Any]:
        scalars = {i: x for i, x in enumerate(example_inputs) if not isinstance(x, torch.Tensor)}
        if not scalars:
            return compile_fn(gm, example_inputs)
        keep = [i for i in range(len(example_inputs)) if i not in scalars]
        baked = bake_inputs(gm, scalars)
        fn = compile_fn(baked, tuple(example_inputs[i] for i in keep))
        return _BakedScalars(fn, keep, scalars)

    return compile_baked


# [Note: baked sizes]
# A graph with symbolic shapes takes its sizes as integer inputs (``view(x, [s0, 64])``); the
# runtimes that take an exported graph take tensors only. Compiled for one size, such a partition
# has its integers baked in as constants, and its callable raises ``ValueError`` when called with
# other values, so a call at another size can never run the graph of the old one; compiling per
# size or for the whole range is the caller's business ([Note: shape ranges] in shapes.py).


def bake_inputs(gm: fx.GraphModule, values: dict[int, Any]) -> fx.GraphModule:
    """A copy of ``gm`` whose placeholders at ``values``' positions are replaced by those constants."""
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    position = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if position in values:
                env[node] = values[position]
            else:
                env[node] = graph.node_copy(node)
            position += 1
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    baked = fx.GraphModule(gm, graph)
    baked.meta.update(gm.meta)  # marks such as a whole graph's ([Note: ORT call path])
    return baked


class _BakedScalars:
    """Calls ``fn`` with the tensor inputs at ``keep`` after checking the baked ``scalars``."""

    def __init__(self, fn: Callable[..., Any], keep: Sequence[int], scalars: dict[int, Any]) -> None:
        self._fn, self._keep, self._scalars = fn, tuple(keep), dict(scalars)

    def __call__(self, *args: Any) -> Any:
        for i, value in self._scalars.items():
            if args[i] != value:
                raise ValueError(
                    f"input {i}: compiled for the size {value!r}, got {args[i]!r}; compile again for new sizes"
                )
        return self._fn(*[args[i] for i in self._keep])

    def release_saved_copy(self) -> None:
        release = getattr(self._fn, "release_saved_copy", None)
        if callable(release):
            release()

    def save(self, directory: Path) -> bool:
        """The runner's own ``save``, plus the baked values (``_loading_scalars`` reads them back)."""
        if not _save_runner(self._fn, directory):
            return False
        (directory / _SCALARS_FILE).write_text(json.dumps({str(i): v for i, v in self._scalars.items()}))
        return True


_SCALARS_FILE = "baked_sizes.json"


def _loading_scalars(load: LoadFn) -> LoadFn:
    """``load`` for example inputs that may hold the integers a saved ``_BakedScalars`` baked in:
    they must equal the saved ones (else ``ValueError``, and the caller compiles again)."""

    def load_baked(directory: Path, example_inputs: tuple[Any, ...]) -> Callable[..., Any]:
        scalars = {i: x for i, x in enumerate(example_inputs) if not isinstance(x, torch.Tensor)}
        if not scalars:
            return load(directory, example_inputs)
        saved = {int(i): v for i, v in json.loads((directory / _SCALARS_FILE).read_text()).items()}
        if saved != scalars:
            raise ValueError(f"saved for the sizes {saved}, asked for {scalars}")
        keep = [i for i in range(len(example_inputs)) if i not in scalars]
        return _BakedScalars(load(directory, tuple(example_inputs[i] for i in keep)), keep, scalars)

    return load_baked


def _save_runner(fn: Callable[..., Any], directory: Path) -> bool:
    """A runner's own ``save(directory)``, where it has one (see [Note: compiled artifacts])."""
    save = getattr(fn, "save", None)
    return bool(save(directory)) if callable(save) else False


@dataclass(frozen=True)
class BackendInfo:
    """``list_backends()`` entry: whether the backend can be used here, and why not."""

    name: str
    available: bool
    reason: str  # empty when available
    fusion: Fusion
    version: str  # empty when unavailable
