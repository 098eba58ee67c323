"""``torch_collage.explain``: place a model and report what was chosen, why, and how fast it ran."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torch_collage.choose import AGREED_BEFORE
from torch_collage.entry import make_backend
from torch_collage.fresh_entry import fresh_entry
from torch_collage.options import CollageOptions
from torch_collage.place import Placer
from torch_collage.report import GraphReport, PartitionReport

__all__ = ["ExplainReport", "explain"]


@dataclass(frozen=True)
class ExplainReport:
    """The placements of every graph of one model (several when dynamo breaks the graph)."""

    graphs: list[GraphReport]

    @property
    def partitions(self) -> list[PartitionReport]:
        return [p for g in self.graphs for p in g.partitions]

    @property
    def backends_used(self) -> list[str]:
        return list(dict.fromkeys(p.backend for p in self.partitions))

    @property
    def predicted_ms(self) -> float:
        return sum(g.predicted_ms for g in self.graphs)

    @property
    def measured_ms(self) -> float:
        return sum(g.measured_ms for g in self.graphs)

    @property
    def candidates_measured(self) -> int:
        return sum(g.measured for g in self.graphs)

    @property
    def partitions_loaded(self) -> int:
        """Partitions loaded from the compiled cache (see [Note: compiled artifacts]), not compiled."""
        return sum(g.loaded for g in self.graphs)

    @property
    def search_s(self) -> float:
        return sum(g.search_s for g in self.graphs)

    def to_markdown(self) -> str:
        lines = [
            f"**Collage placement**: backends {', '.join(self.backends_used) or '-'}; predicted "
            f"{self.predicted_ms:.3f} ms, measured {self.measured_ms:.3f} ms; {self.candidates_measured} "
            f"timings, {self.partitions_loaded} partitions loaded compiled, search {self.search_s:.1f} s",
            "",
        ]
        for i, g in enumerate(self.graphs):
            lines += [f"### Graph {i} ({g.kind}): chose {g.chosen}", "", _singles_line(g), ""]
            if g.shape_range:  # [Note: shape ranges] in shapes.py
                lines += [f"Placed once for every size of {g.shape_range}.", ""]
            if g.placed_like:  # [Note: a graph generalised to a range is placed like the graph it came from]
                lines += [
                    "Not searched: placed like the graph of the same ops placed before at input sizes "
                    f"{g.placed_like} (a size in this range).",
                    "",
                ]
            if g.rewrites:  # [Note: rewrites before placing] in rewrite.py
                done = ", ".join(f"{n} {kind}" for kind, n in g.rewrites.items())
                lines += [f"Rewritten before placing (exact, see docs/collage.md): {done}.", ""]
            lines += [f"- {b} failed on the whole graph: {r}" for b, r in g.whole_graph_failures.items()]
            lines += [""] if g.whole_graph_failures else []
            if g.noisy:
                lines += [f"{g.noisy} timing(s) ran while the machine was busy: used here, not cached.", ""]
            lines += _budget_lines(g)
            if g.recheck:
                lines += [_recheck_line(g), ""]
            if g.searched and math.isfinite(g.searched_ms):
                lines += [f"The search's placement: {g.searched}, predicted {g.searched_ms:.3f} ms.", ""]
            if g.end_to_end_ms:
                lines += [_e2e_line(g), ""]
            lines += _segment_lines(g)
            lines += ["| # | backend | ms | runner-up | nodes |", "|---|---|---|---|---|"]
            for k, p in enumerate(g.partitions):
                up = f"{p.runner_up} ({p.runner_up_ms:.3f})" if p.runner_up and p.runner_up_ms else "-"
                lines.append(f"| {k} | {p.backend} | {p.measured_ms:.3f} | {up} | {', '.join(p.nodes)} |")
            lines.append("")
        return "\n".join(lines)

    def save(self, path: str) -> None:
        """A picture of each graph's partitions coloured by backend (format from the suffix: svg, png)."""
        from torch_collage.render import render_placement

        render_placement(self.graphs, Path(path))


def _segment_lines(g: GraphReport) -> list[str]:
    """Each consecutive segment's time per backend ([Note: coarse segments]), best in bold."""
    if not g.segments:
        return []
    names = sorted({b for s in g.segments for b in s.ms})
    lines = [f"| segment | ops | {' | '.join(names)} |", "|---|---|" + "---|" * len(names)]
    for s in g.segments:
        cells = [
            "-" if b not in s.ms else (f"**{s.ms[b]:.3f}**" if b == s.best else f"{s.ms[b]:.3f}")
            for b in names
        ]
        lines.append(f"| {s.first} .. {s.last} | {s.units} | {' | '.join(cells)} |")
    return [*lines, ""]


def _budget_lines(g: GraphReport) -> list[str]:
    """What the time budget left unmeasured and what the bounds ruled out ([Note: the compile
    budget] in timing.py, [Note: candidates worth measuring] in measure.py)."""
    lines = []
    if g.unmeasured:
        what = "; ".join(f"{name} ({n})" if n > 1 else name for name, n in g.unmeasured.items())
        lines.append(f"Not measured within the {g.budget_s:g} s budget (search {g.search_s:.1f} s): {what}.")
    if g.pruned:
        lines.append(f"{g.pruned} candidate(s) not measured: their bound showed they could not win.")
    return [*lines, ""] if lines else []


def _recheck_line(g: GraphReport) -> str:
    """The warm compile's re-check of its cached choice ([Note: quiet measurements] in timing.py)."""
    if g.recheck == AGREED_BEFORE:
        return "Cached choice not re-checked: a re-check of it on these cached costs agreed before."
    times = "; ".join(f"{name} {ms:.3f} ms" for name, ms in g.recheck_ms.items())
    again = ", measured again" if g.recheck.startswith("contradicted") else ""
    return f"Cached choice re-checked side by side: {g.recheck}{again}" + (f" ({times})." if times else ".")


def _e2e_line(g: GraphReport) -> str:
    """The end-to-end check's contenders, fastest first ([Note: end-to-end check] in place.py)."""
    ranked = sorted(g.end_to_end_ms.items(), key=lambda kv: kv[1])
    return "End to end, timed side by side: " + "; ".join(f"{name} {ms:.3f} ms" for name, ms in ranked)


def _singles_line(g: GraphReport) -> str:
    parts = [
        f"{b} {ms:.3f} ms" if math.isfinite(ms) else f"{b} failed" for b, ms in g.single_backend_ms.items()
    ]
    return "Whole graph on one backend: " + ("; ".join(parts) or "-")


def explain(
    model: nn.Module | Callable[..., Any], *example_inputs: Any, placer: Placer | None = None, **options: Any
) -> ExplainReport:
    """Place ``model`` for ``example_inputs`` (inference, under ``no_grad``) with Collage ``options``
    (the keys of ``torch.compile(..., backend="collage", options=...)``) and report the placement.
    ``placer``: a ``torch_collage.place.Placer`` of your own (its own measurement count and
    collaborators); the process's default one when None."""
    parsed = CollageOptions.from_mapping(options)
    graphs: list[GraphReport] = []
    backend = make_backend(parsed, graphs.append, placer)
    compiled = torch.compile(fresh_entry(model, "collage_explain"), backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(*example_inputs)
    return ExplainReport(graphs)
