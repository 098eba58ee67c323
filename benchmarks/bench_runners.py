"""Each runtime alone against the same runtime inside collage, whole graph, side by side.

    python benchmarks/bench_runners.py                              # the default models and backends
    python benchmarks/bench_runners.py --models conv_mlp --backends onnxruntime --rounds 20

Issue 25 item 6: a whole graph placed on one backend must run within 3% of that runtime used
directly the way its own documentation shows, through ``compile_exported``, and within dynamo's
frame of it through ``torch.compile``. Per (model, backend) three callables are timed in the same
paired rounds (``harness.measure_rounds``, order rotated):

- ``alone``: ONNX Runtime: an ``InferenceSession`` (default ``SessionOptions``) of the module's
  ``torch.onnx.export``, fed ``x.numpy()``; OpenVINO: ``convert_model(module, example_input=...)``
  and ``Core().compile_model(..., "CPU", {"INFERENCE_PRECISION_HINT": "f32"})`` called on the
  tensors (f32 as collage runs it: the CPU plugin's default here is bf16); Inductor:
  ``torch.compile(module, backend="inductor")``.
- ``collage compile_exported``: ``compile_exported(model, *inputs, backends=[name], mode="fast")``.
- ``collage torch.compile``: ``torch.compile(model, backend="collage", options={"backends": [name],
  "mode": "fast"})``.

Per model one more row, ``dynamo frame``: ``torch.compile`` through aot_autograd with a compiler
whose graph returns outputs computed once, i.e. what dynamo's frame and aot_autograd's wrapper cost
one call of this model. The ``torch.compile`` rows report their paired ratio to ``alone`` both as
is and with that frame taken off (``ratio less frame``). Ratios are medians over rounds of per-round
median ratios ([Note: paired ratio] in harness.py). Writes ``benchmarks/results/runners_<hardware>``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: find the packages

from benchmarks.checks import compare_to_float64, float64_reference
from benchmarks.harness import (
    Column,
    PlotSpec,
    ResultTable,
    load_note,
    machine_info,
    measure_rounds,
    paired_ratio,
    pool,
    print_header,
    progress,
    write_results,
)
from torch_collage.entry import make_backend
from torch_collage.exported import compile_exported
from torch_collage.fresh_entry import fresh_entry
from torch_collage.options import CollageOptions
from torch_collage.report import GraphReport
from torch_collage.timing import torch_threads
from torch_zoo import get_model

__all__ = ["ConvMLP", "main", "parse_args"]

BACKENDS = ("onnxruntime", "openvino", "inductor")
# (model, size, batch): a small MLP, a small-batch conv net, an encoder, and a model the zoo lacks
MODELS: dict[str, tuple[str, int]] = {
    "mlp": ("full", 32),
    "resnet18": ("full", 1),
    "bert": ("full", 1),
    "conv_mlp": ("full", 8),
}
ALONE, EXPORTED, COMPILED, FRAME = (
    "alone",
    "collage compile_exported",
    "collage torch.compile",
    "dynamo frame",
)


class ConvMLP(nn.Module):
    """A conv trunk (BatchNorm, stride-2 convs, adaptive pooling) and a GELU MLP head: not a zoo model,
    so no part of collage was tuned on it. (B, 3, 32, 32) -> (B, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(1024, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def build(name: str, size: str, batch: int, seed: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model (eval mode, weights from seed 0) and inputs drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    if name == "conv_mlp":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = ConvMLP()
            for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
                assert bn.running_mean is not None and bn.running_var is not None
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
        return module.eval(), (torch.randn(batch, 3, 32, 32, generator=gen),)
    zoo = get_model(name)
    return zoo.build(size, seed=0), zoo.example_inputs(size, batch, seed=seed)  # type: ignore[arg-type]


def ort_alone(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
    """ONNX Runtime as its documentation shows it used from PyTorch: export, default session, numpy feed."""
    import onnxruntime as ort

    program = torch.onnx.export(module, inputs, dynamo=True, verbose=False)
    assert program is not None
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]

    def call(*args: torch.Tensor) -> Any:
        return session.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})

    return call


def openvino_alone(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
    """OpenVINO as its documentation shows: ``convert_model`` of the module, ``compile_model``, call."""
    import openvino as ov

    from torch_collage.backends.openvino import pause_openvino_telemetry

    with pause_openvino_telemetry():
        model = ov.convert_model(module, example_input=inputs)
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def call(*args: torch.Tensor) -> Any:
        return [torch.from_numpy(v) for v in compiled(list(args)).values()]  # numpy, copied out

    return call


def inductor_alone(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
    compiled = torch.compile(fresh_entry(module, "runners_inductor"), backend="inductor", dynamic=False)
    compiled(*inputs)
    return compiled


ALONE_BUILDERS = {"onnxruntime": ort_alone, "openvino": openvino_alone, "inductor": inductor_alone}


def dynamo_frame(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
    """``torch.compile`` through aot_autograd (as collage is) with a graph that returns the outputs of
    its first call: a call costs dynamo's frame and aot_autograd's wrapper, no model."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(gm: torch.fx.GraphModule, _: Sequence[Any]) -> Callable[..., Any]:
        outputs: list[Any] = []

        def run(*args: Any) -> Any:
            if not outputs:
                outputs.append(gm(*args))
            return outputs[0]

        return make_boxed_func(run)

    backend = aot_autograd(fw_compiler=compiler, inference_compiler=compiler)
    compiled = torch.compile(fresh_entry(module, "runners_frame"), backend=backend, dynamic=False)
    compiled(*inputs)
    return compiled


def collage_compiled(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    backend: str,
    cache_dir: str,
    reports: list[GraphReport],
) -> Callable[..., Any]:
    """``torch.compile(model, backend="collage", options=...)``, through ``make_backend`` (what the
    "collage" entry point returns) to keep each graph's report."""
    options = CollageOptions(backends=(backend,), mode="fast", cache_dir=cache_dir, progress=False)
    compiled = torch.compile(
        fresh_entry(module, "runners_collage"), backend=make_backend(options, reports.append)
    )
    compiled(*inputs)
    return compiled


def placed(reports: Sequence[GraphReport]) -> str:
    """Each graph's partitions' backends ("onnxruntime", "eager", "inductor+eager"), graphs by ";"."""
    return "; ".join("+".join(p.backend for p in g.partitions) for g in reports)


def _compile(
    what: str, make: Callable[[], Callable[..., Any]]
) -> tuple[Callable[..., Any] | None, dict[str, Any]]:
    start = time.perf_counter()
    try:
        fn = make()
    except Exception as exc:  # a row says what failed; the others still run
        progress(f"  {what}: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None, {"status": "fail", "error": f"{type(exc).__name__}: {exc}"}
    return fn, {"status": "ok", "compile_s": time.perf_counter() - start}


def _check(
    fn: Callable[..., Any], check: tuple[torch.Tensor, ...], reference: tuple[Any, Any]
) -> dict[str, Any]:
    out = fn(*check)
    if isinstance(out, list):  # ONNX Runtime alone returns numpy arrays
        out = [torch.from_numpy(o) if not isinstance(o, torch.Tensor) else o for o in out]
        out = out[0] if len(out) == 1 else tuple(out)
    result = compare_to_float64(reference[0], reference[1], out)
    return {
        "status": "ok" if result.ok else "mismatch",
        "max_abs_err": result.max_abs_err,
        "error": result.message,
    }


def _makers(
    backend: str,
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    cache_dir: str,
    reports: dict[str, list[GraphReport]],
) -> dict[str, Callable[[], Callable[..., Any]]]:
    """How to build each row's callable on ``backend``; collage's placements go to ``reports``."""

    def alone() -> Callable[..., Any]:
        return ALONE_BUILDERS[backend](copy.deepcopy(module), inputs)

    def exported() -> Callable[..., Any]:
        fn = compile_exported(
            module, *inputs, backends=[backend], mode="fast", cache_dir=cache_dir, progress=False
        )
        reports[EXPORTED].extend(fn.report.graphs)
        return fn

    def compiled() -> Callable[..., Any]:
        return collage_compiled(module, inputs, backend, cache_dir, reports[COMPILED])

    return {ALONE: alone, EXPORTED: exported, COMPILED: compiled}


def run_model(name: str, args: argparse.Namespace, table: ResultTable, cache_dir: str) -> None:
    size, batch = MODELS[name]
    module, inputs = build(name, size, batch, seed=0)
    check = build(name, size, batch, seed=1)[1]  # fresh inputs, unseen when compiling
    reference = (float64_reference(module, check), module(*check))
    frame, frame_row = _compile(f"{name} {FRAME}", lambda: dynamo_frame(module, inputs))
    frame_ms: list[float] | None = None
    for backend in args.backends:
        progress(f"{name} (batch {batch}) on {backend}")
        reports: dict[str, list[GraphReport]] = {EXPORTED: [], COMPILED: []}
        makers = _makers(backend, module, inputs, cache_dir, reports)
        fns: dict[str, Callable[..., Any]] = {}
        rows: dict[str, dict[str, Any]] = {}
        for what, make in makers.items():
            fn, row = _compile(f"{name} {backend} {what}", make)
            if fn is not None:
                row |= _check(fn, check, reference)
                fns[what] = fn
            rows[what] = {"model": name, "batch": batch, "backend": backend, "row": what} | row
            if reports.get(what):
                rows[what]["placed"] = placed(reports[what])
        if frame is not None:
            fns[FRAME] = frame
        blocks = measure_rounds(
            {k: functools.partial(fn, *inputs) for k, fn in fns.items()},
            rounds=args.rounds,
            repeats=args.repeats,
            warmup=args.warmup,
            threads=args.threads,
            max_time_s=args.max_block_s,
        )
        medians = {k: [m.median_ms for m in ms] for k, ms in blocks.items()}
        if FRAME in medians and frame_ms is None:
            frame_ms = medians[FRAME]
            pooled = pool(blocks[FRAME])
            frame_row |= {"model": name, "batch": batch, "backend": "-", "row": FRAME}
            frame_row |= {"median_ms": pooled.median_ms, "p20_ms": pooled.p20_ms, "iqr_ms": pooled.iqr_ms}
            table.add(**frame_row)
        for what, row in rows.items():
            if what in blocks:
                m = pool(blocks[what])
                row |= {
                    "median_ms": m.median_ms,
                    "p20_ms": m.p20_ms,
                    "iqr_ms": m.iqr_ms,
                    "round_ms": medians[what],
                }
                if ALONE in medians and what != ALONE:
                    row["ratio"] = paired_ratio(medians[what], medians[ALONE])
                    if what == COMPILED and FRAME in medians:
                        less = [c - f for c, f in zip(medians[what], medians[FRAME], strict=True)]
                        row["ratio_less_frame"] = paired_ratio(less, medians[ALONE])
            table.add(**row)
        ratios = ", ".join(f"{k} {r['ratio']:.3f}x" for k, r in rows.items() if "ratio" in r)
        progress(f"  {ratios}  (load {Path('/proc/loadavg').read_text().split()[0]})")


COLUMNS = (
    Column("model", "model"),
    Column("batch", "batch"),
    Column("backend", "backend"),
    Column("row", "row"),
    Column("status", "status"),
    Column("median_ms", "median ms", "{:.3f}"),
    Column("p20_ms", "p20 ms", "{:.3f}"),
    Column("iqr_ms", "IQR ms", "{:.3f}"),
    Column("ratio", "ratio to alone", "{:.3f}x"),
    Column("ratio_less_frame", "ratio less frame", "{:.3f}x"),
    Column("placed", "placed on"),
    Column("max_abs_err", "max abs err", "{:.1e}"),
    Column("compile_s", "compile s", "{:.1f}"),
    Column("error", "error"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated")
    parser.add_argument("--rounds", type=int, default=12, help="paired rounds (order rotated each round)")
    parser.add_argument("--repeats", type=int, default=600, help="timed calls per callable over all rounds")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before each block")
    parser.add_argument("--max-block-s", type=float, default=2.0, help="cap on one timed block")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--hardware", default="cpu", help="results file suffix")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.backends = [b for b in args.backends.split(",") if b]
    for m in args.models:
        if m not in MODELS:
            parser.error(f"unknown model {m!r}; valid: {', '.join(MODELS)}")
    for b in args.backends:
        if b not in BACKENDS:
            parser.error(f"unknown backend {b!r}; valid: {', '.join(BACKENDS)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine_info()
    print_header(info)
    loads = [Path("/proc/loadavg").read_text().strip()]
    print(f"/proc/loadavg before: {loads[0]}")
    table = ResultTable(COLUMNS)
    with (
        tempfile.TemporaryDirectory(prefix="bench-runners-") as cache_dir,
        torch.no_grad(),
        torch_threads(args.threads),
    ):
        for name in args.models:
            run_model(name, args, table, cache_dir)
    loads.append(Path("/proc/loadavg").read_text().strip())
    print(f"/proc/loadavg after: {loads[1]}")
    notes = [
        load_note(info),
        f"/proc/loadavg before: {loads[0]}; after: {loads[1]}.",
        f"{args.rounds} paired rounds, {args.repeats} timed calls per callable in all, order rotated; "
        f"{args.threads} threads for torch and every runtime; inference under torch.no_grad(); a fresh "
        "cost cache (mode='fast': each backend's whole graph measured once, then placed).",
        "ratio to alone: median over rounds of the round's median over alone's (< 1: collage faster). "
        "ratio less frame: the same after taking the dynamo frame row's per-round median off.",
        "OpenVINO alone runs in f32 (INFERENCE_PRECISION_HINT), as collage does; the CPU plugin's "
        "default on this CPU is bf16.",
    ]
    out = {"out_dir": args.out_dir} if args.out_dir else {}
    write_results(
        "runners",
        args.hardware,
        info,
        table,
        notes=notes,
        plot=PlotSpec(
            group_keys=("model", "backend"),
            series_key="row",
            baseline=ALONE,
            ylabel="latency relative to the runtime alone (lower is better)",
        ),
        extra={"loadavg": loads},
        **out,
    )


if __name__ == "__main__":
    main()
