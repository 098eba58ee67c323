"""Hugging Face ``generate()`` with a collage-compiled ``forward``: total time, searches, tokens.

    python benchmarks/bench_generate.py                    # Llama-architecture, 32 new tokens
    python benchmarks/bench_generate.py --models llama,gpt2 --tokens 16 --options '{"mode": "fast"}'

Each model of ``torch_zoo.hf`` (small config, random weights, DynamicCache) generates ``--tokens``
greedy tokens from a random prompt: eagerly, then with ``model.forward`` compiled by
``torch.compile(..., backend="collage", dynamic=...)`` on a cold cost cache (a fresh directory), then
compiled afresh on the same, now warm, cache, twice (the first warm compile re-checks its cached
choices side by side; the second finds that re-check kept). Reported per run: the total wall time including every
compile, its ratio to eager's, how many graphs were placed (searches) and how many timings they ran,
and whether the tokens equal eager's. A graph placed from cached costs alone (no timing) is placed
but not searched. With ``dynamic=True`` the prompt and the decode steps each get
a graph with symbolic sizes, placed once for their range ([Note: shape ranges] in
torch_collage/shapes.py); with dynamo's default (automatic dynamic shapes) the first decode step is
a static graph of its own, searched, and the decode graph for every cache length is placed like it. Writes ``benchmarks/results/generate_<hardware>.*``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
from torch_collage.entry import make_backend
from torch_collage.options import CollageOptions
from torch_collage.report import GraphReport
from torch_zoo.hf import ARCHITECTURES

COLUMNS = (
    Column("model", "model"),
    Column("backend", "run"),
    Column("dynamic", "dynamic"),
    Column("total_s", "total s", "{:.2f}"),
    Column("vs_eager", "x eager's time", "{:.1f}x"),
    Column("placed", "graphs placed"),
    Column("searches", "searches"),
    Column("timings", "timings run"),
    Column("tokens_equal", "tokens = eager"),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama", help="comma-separated torch_zoo.hf decoder names")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per generate()")
    p.add_argument("--prompt", type=int, default=8, help="prompt length")
    p.add_argument("--options", default="{}", help="collage options as JSON (default: collage's defaults)")
    p.add_argument("--hardware", default="cpu")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    args = p.parse_args(argv)
    args.collage_options = json.loads(args.options)
    return args


def _generate(model: torch.nn.Module, ids: torch.Tensor, tokens: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
        )
    return out, time.perf_counter() - start


def _collage_run(
    model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace, cache_dir: str, dynamic: bool | None
) -> tuple[torch.Tensor, float, list[GraphReport]]:
    reports: list[GraphReport] = []
    options = CollageOptions(**{"cache_dir": cache_dir, "progress": False, **args.collage_options})
    eager_forward = model.forward
    model.forward = torch.compile(
        eager_forward, backend=make_backend(options, sink=reports.append), dynamic=dynamic
    )
    try:
        out, seconds = _generate(model, ids, args.tokens)
    finally:
        model.forward = eager_forward
        torch._dynamo.reset()  # the next run compiles afresh (its cost cache decides whether it searches)
    return out, seconds, reports


def _inductor_run(
    model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace, dynamic: bool | None
) -> tuple[torch.Tensor, float]:
    """The same generate() with ``forward`` under ``torch.compile``'s defaults (Inductor), for scale:
    Inductor's own caches (its FX graph cache on disk) are left as they are."""
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, dynamic=dynamic)
    try:
        return _generate(model, ids, args.tokens)
    finally:
        model.forward = eager_forward
        torch._dynamo.reset()


def rows_for(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = ARCHITECTURES[name][0]().eval()
    ids = torch.randint(1, 200, (1, args.prompt))
    _generate(model, ids, 2)  # warm eager's first-call costs
    want, eager_s = _generate(model, ids, args.tokens)
    rows = [dict(model=name, backend="eager", dynamic="-", run="eager", status="ok", total_s=eager_s,
                 vs_eager=1.0, placed=0, searches=0, timings=0, tokens_equal=True)]  # fmt: skip
    for dynamic in (True, None):
        label = "True" if dynamic else "automatic"
        progress(f"{name}: inductor, dynamic={dynamic}")
        got, seconds = _inductor_run(model, ids, args, dynamic)
        rows.append(dict(
            model=name, backend="inductor", dynamic=label, run=f"inductor, dynamic={label}",
            status="ok" if torch.equal(got, want) else "tokens differ", total_s=seconds,
            vs_eager=seconds / eager_s, placed=None, searches=None, timings=None,
            tokens_equal=bool(torch.equal(got, want)),
        ))  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="collage-generate-") as cache_dir:
            for run in ("collage cold", "collage warm", "collage warm again"):
                progress(f"{name}: {run}, dynamic={dynamic}")
                got, seconds, reports = _collage_run(model, ids, args, cache_dir, dynamic)
                equal = bool(torch.equal(got, want))
                rows.append(dict(
                    model=name, backend=run, dynamic=label, run=f"{run}, dynamic={label}",
                    status="ok" if equal else "tokens differ", total_s=seconds,
                    vs_eager=seconds / eager_s, placed=len(reports),
                    searches=sum(r.measured > 0 and not r.placed_like for r in reports),
                    timings=sum(r.measured for r in reports), tokens_equal=equal,
                ))  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine_info()
    print_header(info)
    table = ResultTable(COLUMNS)
    for name in args.models.split(","):
        for row in rows_for(name, args):
            table.add(**row)
    notes = [
        f"{args.tokens} greedy tokens from a {args.prompt}-token random prompt, DynamicCache; collage options: "
        f"{json.dumps(args.collage_options) or 'defaults'}; {torch.get_num_threads()} threads. Total time "
        "includes every search and compile; 'warm' compiles afresh on the cost cache the cold run filled. "
        "The inductor rows are torch.compile's default backend on the same calls, its on-disk caches as "
        "they were (warm after the first run on this machine).",
        load_note(info),
    ]
    plot = PlotSpec(group_keys=("model",), series_key="run", value_key="total_s",
                    baseline="eager", ylabel="total time relative to eager")  # fmt: skip
    write_results("generate", args.hardware, info, table, notes=notes, out_dir=args.out_dir, plot=plot)


if __name__ == "__main__":
    main()
