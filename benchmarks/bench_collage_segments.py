"""How much could a coarse mix of backends gain? Each zoo model cut into segments, each timed on each backend.

    python benchmarks/bench_collage_segments.py                        # 5 models, 4 segments
    python benchmarks/bench_collage_segments.py --models gpt2:8 --segments 6

For each model, ``torch_collage.explain`` with ``segments=K`` ([Note: coarse segments]) times every
interval between K-1 cuts of the ATen graph on every backend (beside the whole graph on each and
singletons on eager). The table lists the K consecutive segments and each backend's time for them.
Per model the notes give: the best single backend's whole graph; the sum of its segments (the cost
of cutting alone, boundaries included); the sum of the best backend per segment (the most a mix of
these segments could gain, ignoring that its boundaries also cut fusion); the placement the search
then chose and its end-to-end time. Writes ``benchmarks/results/collage_segments_<hardware>.*``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: find the packages

from benchmarks.harness import (
    DEFAULT_OUT_DIR,
    Column,
    PlotSpec,
    ResultTable,
    load_note,
    machine_info,
    print_header,
    progress,
    write_results,
)
from torch_collage import explain
from torch_zoo import get_model

COLUMNS = (
    Column("model", "model"),
    Column("batch", "batch"),
    Column("segment", "segment"),
    Column("ops", "ops"),
    Column("backend", "backend"),
    Column("median_ms", "ms", "{:.3f}"),
    Column("vs_best", "vs best backend on it", "{:.2f}x"),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models", default="gpt2:8,bert:8,mobilenet_v2:8,resnet18:8,dlrm:32", help="name:batch,..."
    )
    p.add_argument("--segments", type=int, default=4)
    p.add_argument("--backends", default="inductor,onnxruntime,openvino")
    p.add_argument("--time-budget-s", type=float, default=60.0)
    p.add_argument("--hardware", default="cpu")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    return p.parse_args(argv)


def model_rows(name: str, batch: int, args: argparse.Namespace, cache_dir: str) -> tuple[list[dict], str]:
    """The segment rows of one model and its summary line."""
    spec = get_model(name)
    torch.manual_seed(0)
    model, inputs = spec.build("full").eval(), spec.example_inputs("full", batch)
    report = explain(
        model, *inputs, backends=args.backends.split(","), segments=args.segments, search="dp",
        max_depth=1, time_budget_s=args.time_budget_s, cache_dir=cache_dir,
    )  # fmt: skip
    if len(report.graphs) != 1:
        return [], f"{name} b={batch}: {len(report.graphs)} graphs (graph breaks); not summarised"
    (g,) = report.graphs
    rows = []
    for s in g.segments:
        best = min(s.ms.values()) if s.ms else math.nan
        for backend, ms in sorted(s.ms.items()):
            rows.append({"model": name, "batch": batch, "segment": f"{s.first}..{s.last}", "ops": s.units,
                         "backend": backend, "status": "ok", "median_ms": ms, "vs_best": ms / best})  # fmt: skip
    singles = {b: ms for b, ms in g.single_backend_ms.items() if math.isfinite(ms) and b != "eager"}
    if not singles or not g.segments:
        return rows, f"{name} b={batch}: no whole-graph or segment times"
    top = min(singles, key=lambda b: singles[b])
    cut = sum(s.ms.get(top, math.inf) for s in g.segments)
    oracle = sum(min(s.ms.values(), default=math.inf) for s in g.segments)
    line = (
        f"{name} b={batch}: best single {top} {singles[top]:.3f} ms whole; its {len(g.segments)} segments "
        f"add up to {cut:.3f} ms ({cut / singles[top]:.2f}x whole); the best backend per segment adds up "
        f"to {oracle:.3f} ms ({singles[top] / oracle:.3f}x faster than {top} whole, before boundaries); "
        f"search placed {g.searched} (predicted {g.searched_ms:.3f} ms); end-to-end check chose "
        f"{g.chosen} at {g.measured_ms:.3f} ms"
    )
    return rows, line


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine_info()
    print_header(info)
    table = ResultTable(COLUMNS)
    lines = []
    with tempfile.TemporaryDirectory(prefix="collage-segments-") as cache_dir:  # a cold search each run
        for item in args.models.split(","):
            name, batch = item.split(":")
            progress(f"{name} b={batch}: timing {args.segments} segments on {args.backends}")
            rows, line = model_rows(name, int(batch), args, cache_dir)
            for row in rows:
                table.add(**row)
            lines.append(line)
            progress(line)
    notes = [
        f"{args.segments} segments per model, cut where fewest tensors cross near even splits in ops; "
        f"explain(..., segments={args.segments}, search='dp', max_depth=1); inference; "
        f"{torch.get_num_threads()} threads; each time is the median of one candidate measurement.",
        *lines,
        load_note(info),
    ]
    plot = PlotSpec(group_keys=("model", "segment"), series_key="backend", baseline=None,
                    ylabel="time relative to the fastest backend on the segment")  # fmt: skip
    write_results(
        "collage_segments", args.hardware, info, table, notes=notes, out_dir=args.out_dir, plot=plot
    )


if __name__ == "__main__":
    main()
