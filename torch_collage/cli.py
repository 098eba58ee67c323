"""``python -m torch_collage``: the backends on this machine, the cost cache, and a zoo model's placement.

    python -m torch_collage backends                  # registered backends: available, version, why not
    python -m torch_collage cache                     # what the cost cache holds (default cache_dir)
    python -m torch_collage cache --clear             # delete its costs and compiled partitions
    python -m torch_collage explain mlp --size tiny --backends eager,inductor,onnxruntime --save p.png

``explain`` places a model of ``torch_zoo`` with ``torch_collage.explain`` and prints the
report; for your own model call ``torch_collage.explain(model, *inputs, **options)`` from Python.
Exit status: 0 on success, 2 on bad arguments (with the reason on stderr).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch_collage.cache import CachedCost

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ValueError as exc:  # bad option values, unknown model or backend names
        print(f"torch_collage {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    from torch_collage.options import CollageOptions, default_cache_dir

    defaults = CollageOptions.__dataclass_fields__
    parser = argparse.ArgumentParser(
        prog="python -m torch_collage",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backends", help="list the registered backends and whether each is available here")
    p.set_defaults(run=_backends)

    p = sub.add_parser("cache", help="show (or --clear) the cost cache and the compiled partitions")
    p.add_argument("--cache-dir", default=default_cache_dir(), help="default: %(default)s")
    p.add_argument("--clear", action="store_true", help="delete the costs and the compiled partitions")
    p.add_argument(
        "--reasons", type=int, default=5, help="most frequent rejection reasons (and widest spreads) to show"
    )
    p.set_defaults(run=_cache)

    p = sub.add_parser("explain", help="place a zoo model and print the report")
    p.add_argument("model", help="a torch_zoo model name (e.g. mlp, dlrm, bert)")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny")
    p.add_argument("--batch", type=int, default=None, help="default: the zoo's batch for the size")
    p.add_argument("--backends", default="", help="comma-separated; default: every available backend")
    p.add_argument("--max-depth", type=int, default=defaults["max_depth"].default)
    p.add_argument("--segments", type=int, default=0)
    p.add_argument("--search", choices=("dp", "dp+refine"), default="dp")
    p.add_argument("--time-budget-s", type=float, default=defaults["time_budget_s"].default)
    p.add_argument("--cache-dir", default=default_cache_dir(), help="default: %(default)s")
    p.add_argument("--save", default=None, help="write the placement picture here (.png or .svg)")
    p.set_defaults(run=_explain)
    return parser


def _backends(args: argparse.Namespace) -> int:
    from torch_collage.backends.registry import list_backends

    rows = [
        (info.name, "yes" if info.available else "no", info.version or "-", info.fusion, info.reason or "-")
        for info in list_backends().values()
    ]
    _print_table(("backend", "available", "version", "fusion", "why not"), rows)
    return 0


def _cache(args: argparse.Namespace) -> int:
    from torch_collage.artifacts import ArtifactStore
    from torch_collage.cache import CostCache, cost_cache_path

    root = Path(args.cache_dir).expanduser()
    db = cost_cache_path(str(root))
    store = ArtifactStore(str(root), max_mb=1)  # the size limit plays no part in reading or clearing
    if args.clear:
        removed = [p for p in root.glob(f"{db.stem}.*") if p.is_file()]  # the database, set-aside copies
        for path in removed:
            path.unlink()
        had = store.count()
        if store.root.is_dir():
            shutil.rmtree(store.root)
        print(f"cleared {root}: {len(removed)} cost file(s), {had} compiled partition(s)")
        return 0
    print(f"cache directory: {root}")
    if not db.is_file():
        print("no cost cache here yet (it is created by the first collage compile that uses it)")
    else:
        cache = CostCache(str(root))
        try:
            stats = cache.stats(top_reasons=args.reasons)
        finally:
            cache.close()
        span = (
            f"; entries from {_when(stats.oldest)} to {_when(stats.newest)}"
            if stats.oldest is not None and stats.newest is not None
            else ""
        )
        print(
            f"costs: {stats.measured} measured, {stats.rejected} rejected, {stats.outcomes} search outcomes "
            f"({_size(db.stat().st_size)}){span}"
        )
        if stats.degraded:
            print(f"the cost file is {stats.degraded}")
        if stats.unreadable:
            print(f"{stats.unreadable} damaged row(s) are read as misses and overwritten when measured again")
        if stats.reasons:
            _print_table(("rejections", "reason"), [(str(n), _shorten(r)) for r, n in stats.reasons])
        if stats.high_spread:
            _print_high_spread(stats.high_spread, args.reasons)
    print(f"compiled partitions: {store.count()} ({_size(store.size_bytes())}) under {store.root}")
    return 0


def _print_high_spread(costs: Sequence[CachedCost], shown: int) -> None:
    """The costs whose timed repeats disagreed most ([Note: quiet measurements] in timing.py)."""
    from torch_collage.cache import HIGH_SPREAD

    print(
        f"{len(costs)} cost(s) whose repeats spread more than {HIGH_SPREAD:.0%} of their median "
        "(taken while something else ran?); `cache --clear` measures them again:"
    )
    rows = [(f"{c.spread:.0%}", f"{c.ms:.3f}", _shorten(c.label or "(no label)")) for c in costs[:shown]]
    _print_table(("spread", "ms", "what"), rows)


def _explain(args: argparse.Namespace) -> int:
    import torch_collage
    from torch_zoo import get_model

    zoo = get_model(args.model)
    model, inputs = zoo.build(args.size), zoo.example_inputs(args.size, args.batch)
    options = {
        "max_depth": args.max_depth,
        "segments": args.segments,
        "search": args.search,
        "time_budget_s": args.time_budget_s,
        "cache_dir": args.cache_dir,
    }
    if args.backends:
        options["backends"] = [b.strip() for b in args.backends.split(",") if b.strip()]
    report = torch_collage.explain(model, *inputs, **options)
    print(report.to_markdown())
    if args.save:
        report.save(args.save)
        print(f"placement picture: {args.save}")
    return 0


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _shorten(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
