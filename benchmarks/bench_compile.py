"""Cold compile time of collage against its budget, beside Inductor's, on models users bring.

    python benchmarks/bench_compile.py                          # HF BERT (4 layers) and resnet18
    python benchmarks/bench_compile.py --models bert4 --budgets default,20,10

Each model is compiled with ``torch.compile(model, backend="collage", options=...)`` on a fresh cost
cache (a cold search), once with collage's default options and once per ``--budgets`` value of
``time_budget_s``; the compile time is the first call's wall time, everything included (dynamo,
search, compiles, end-to-end check). Beside it, ``torch.compile``'s default (Inductor) on the same
call. Then every compiled callable is timed side by side with eager, so a fast compile that placed
badly shows. Writes ``benchmarks/results/compile_<hardware>.*``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
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
    measure_rounds,
    paired_ratio,
    print_header,
    progress,
    write_results,
)
from torch_collage.entry import make_backend
from torch_collage.options import CollageOptions
from torch_collage.report import GraphReport

COLUMNS = (
    Column("model", "model"),
    Column("run", "run"),
    Column("budget_s", "budget s", "{:g}"),
    Column("compile_s", "first call s", "{:.1f}"),
    Column("vs_budget", "/ budget", "{:.2f}"),
    Column("searches", "graphs searched"),
    Column("unmeasured", "left out for the budget"),
    Column("placement", "placement"),
    Column("median_ms", "ms per call", "{:.2f}"),
    Column("vs_eager", "speedup vs eager", "{:.2f}x"),
)


def _bert4() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """A 4-layer BERT encoder (hidden 256, 4 heads, FFN 1024) from transformers, batch 4 x 64 tokens."""
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (4, 64))
    return model, (ids, torch.ones_like(ids))


def _zoo(name: str) -> Callable[[], tuple[torch.nn.Module, tuple[Any, ...]]]:
    def build() -> tuple[torch.nn.Module, tuple[Any, ...]]:
        from torch_zoo import get_model

        zm = get_model(name)
        return zm.build("full").eval(), tuple(zm.example_inputs("full"))

    return build


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, tuple[Any, ...]]]] = {
    "bert4": _bert4,
    "resnet18": _zoo("resnet18"),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bert4,resnet18", help=f"comma-separated, of: {', '.join(MODELS)}")
    p.add_argument("--budgets", default="default,20", help="time_budget_s values; 'default': collage's own")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--hardware", default="cpu")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    args = p.parse_args(argv)
    for name in args.models.split(","):
        if name not in MODELS:
            p.error(f"--models: unknown model {name!r}; valid: {', '.join(MODELS)}")
    for budget in args.budgets.split(","):
        if budget != "default":
            try:
                if float(budget) <= 0:
                    raise ValueError
            except ValueError:
                p.error(f"--budgets: {budget!r} is neither 'default' nor a positive number of seconds")
    return args


def _call(fn: Callable[..., Any], inputs: tuple[Any, ...]) -> Any:
    return fn(*inputs)


def _first_call(fn: Callable[..., Any], inputs: tuple[Any, ...]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn(*inputs)
    return time.perf_counter() - start


def rows_for(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each compile on a copy of the model of its own (no dynamo reset: compiled callables stay
    compiled for the timing after), its cost cache kept until then."""
    model, inputs = MODELS[name]()
    fns: dict[str, Callable[[], Any]] = {"eager": functools.partial(_call, model, inputs)}
    rows: list[dict[str, Any]] = []
    progress(f"{name}: inductor")
    inductor = torch.compile(copy.deepcopy(model))
    seconds = _first_call(inductor, inputs)
    fns["inductor"] = functools.partial(_call, inductor, inputs)
    rows.append({"model": name, "run": "inductor", "compile_s": seconds})
    with contextlib.ExitStack() as caches:
        for budget in args.budgets.split(","):
            label = "collage (defaults)" if budget == "default" else f"collage, time_budget_s={budget}"
            progress(f"{name}: {label}")
            cache_dir = caches.enter_context(tempfile.TemporaryDirectory(prefix="collage-compile-"))
            options = CollageOptions(cache_dir=cache_dir, progress=False)
            if budget != "default":
                options = dataclasses.replace(options, time_budget_s=float(budget))
            reports: list[GraphReport] = []
            compiled = torch.compile(copy.deepcopy(model), backend=make_backend(options, sink=reports.append))
            seconds = _first_call(compiled, inputs)
            fns[label] = functools.partial(_call, compiled, inputs)
            rows.append({
                "model": name, "run": label, "budget_s": options.time_budget_s, "compile_s": seconds,
                "vs_budget": seconds / options.time_budget_s,
                "searches": sum(r.measured > 0 for r in reports),
                "unmeasured": sum(sum(r.unmeasured.values()) for r in reports),
                "placement": "; ".join(r.chosen for r in reports),
            })  # fmt: skip
        progress(f"{name}: timing the compiled calls side by side")
        with torch.no_grad():
            blocks = measure_rounds(fns, rounds=args.rounds, repeats=args.repeats, warmup=2)
    eager = [m.median_ms for m in blocks["eager"]]
    out = [
        {
            "model": name,
            "run": "eager",
            "status": "-",
            "median_ms": sorted(eager)[len(eager) // 2],
            "vs_eager": 1.0,
        }
    ]
    for row in rows:
        ms = [m.median_ms for m in blocks[row["run"]]]
        out.append({**row, "status": "ok", "median_ms": sorted(ms)[len(ms) // 2],
                    "vs_eager": 1 / paired_ratio(ms, eager)})  # fmt: skip
    return out


def summary(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for row in rows:
        if row["run"].startswith("collage"):
            over = row["vs_budget"] - 1
            verdict = f"{over:.0%} over its budget" if over > 0 else "within its budget"
            lines.append(f"{row['model']}, {row['run']}: first call {row['compile_s']:.1f} s, {verdict}")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine_info()
    print_header(info)
    table = ResultTable(COLUMNS)
    for name in args.models.split(","):
        for row in rows_for(name, args):
            table.add(**{"budget_s": math.nan, "vs_budget": math.nan, "searches": "", "unmeasured": "",
                         "placement": "", "compile_s": math.nan, **row})  # fmt: skip
    notes = [
        f"Cold compiles: a fresh cost cache per collage run (Inductor's own on-disk caches as they were); "
        f"'first call s' is the first call's wall time, everything included; {torch.get_num_threads()} "
        f"threads; calls then timed side by side with eager, {args.rounds} rounds of {args.repeats} calls.",
        *summary(table.rows),
        load_note(info),
    ]
    plot = PlotSpec(group_keys=("model",), series_key="run", value_key="compile_s", baseline=None,
                    ylabel="first call time relative to the fastest compile")  # fmt: skip
    write_results("compile", args.hardware, info, table, notes=notes, out_dir=args.out_dir, plot=plot)


if __name__ == "__main__":
    main()
