"""Grouped bar charts of latency relative to a baseline series, drawn with matplotlib's Agg backend."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

__all__ = ["PlotSpec", "plot_relative", "relative_values"]

Row = Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class PlotSpec:
    """How rows become bars: one group of bars per distinct ``group_keys``, one bar per series."""

    group_keys: tuple[str, ...] = ("model", "batch")  # row keys naming an x-axis group
    series_key: str = "backend"  # row key naming the bar within a group (colour)
    value_key: str = "median_ms"  # row key holding the latency (lower is better)
    baseline: str | None = "eager"  # series every bar is divided by; None: the group's best "ok" bar
    status_key: str = "status"  # row key whose value "ok" marks a valid bar
    ylabel: str = "latency relative to eager (lower is better)"
    log_scale: bool = True  # log y-axis, so 2x faster and 2x slower look alike


def _group_label(row: Row, keys: Sequence[str]) -> str:
    parts = [str(row.get(k)) if k != "batch" else f"b={row.get(k)}" for k in keys]
    return "\n".join(parts)


def _reference(rows: Sequence[Row], spec: PlotSpec) -> float | None:
    ok = [r for r in rows if r.get(spec.status_key) == "ok" and _finite(r.get(spec.value_key))]
    base = [r[spec.value_key] for r in ok if r.get(spec.series_key) == spec.baseline]
    if base:
        return float(base[0])
    return min((float(r[spec.value_key]) for r in ok), default=None)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _value(row: Row, spec: PlotSpec) -> float | None:
    value: Any = row.get(spec.value_key)
    if row.get(spec.status_key) == "fail" or not _finite(value):
        return None
    return float(value)


def relative_values(rows: Sequence[Row], spec: PlotSpec) -> dict[str, dict[str, float | None]]:
    """{group label: {series: value / reference or None when the row has no usable value}}."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(_group_label(row, spec.group_keys), []).append(row)
    out: dict[str, dict[str, float | None]] = {}
    for label, members in groups.items():
        ref = _reference(members, spec)
        out[label] = {}
        for row in members:
            value = _value(row, spec)
            out[label][str(row.get(spec.series_key))] = value / ref if value is not None and ref else None
    return out


def _series_order(rows: Sequence[Row], spec: PlotSpec) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.setdefault(str(row.get(spec.series_key)), None)
    return list(seen)


def _statuses(rows: Sequence[Row], spec: PlotSpec) -> dict[tuple[str, str], str]:
    return {
        (_group_label(r, spec.group_keys), str(r.get(spec.series_key))): str(r.get(spec.status_key))
        for r in rows
    }


def _draw_bars(ax: Any, rows: Sequence[Row], spec: PlotSpec) -> list[Patch]:
    values = relative_values(rows, spec)
    series = _series_order(rows, spec)
    statuses = _statuses(rows, spec)
    width = 0.8 / max(len(series), 1)
    colours = plt.get_cmap("tab10")
    for j, name in enumerate(series):
        for i, (label, per_series) in enumerate(values.items()):
            x = i - 0.4 + width * (j + 0.5)
            value = per_series.get(name)
            status = statuses.get((label, name))
            if status is None:
                continue
            if value is None:
                ax.plot([x], [1.0], marker="x", color="red", markersize=9, markeredgewidth=2)
                continue
            hatch = "//" if status != "ok" else None
            ax.bar([x], [value], width=width, color=colours(j % 10), hatch=hatch, edgecolor="black")
            ax.annotate(f"{value:.2g}", (x, value), ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(range(len(values)), list(values), fontsize=8)
    return [Patch(facecolor=colours(j % 10), edgecolor="black", label=n) for j, n in enumerate(series)]


def plot_relative(rows: Sequence[Row], spec: PlotSpec, path: str | Path, *, title: str = "") -> Path:
    """Save a grouped bar chart of each row's value relative to its group's reference to ``path``.

    Failed rows are a red x at 1.0; rows whose status is neither "ok" nor "fail" (a mismatch) are
    drawn hatched. A dashed line marks 1.0 (the baseline).
    """
    n_groups = len({_group_label(r, spec.group_keys) for r in rows})
    fig, ax = plt.subplots(figsize=(min(max(6.0, 1.2 * n_groups + 3), 30.0), 4.8))
    try:
        handles = _draw_bars(ax, rows, spec)
        if spec.log_scale:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))  # 0.5, not 5x10^-1
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_ylim(top=max(ax.get_ylim()[1], 1.0) * (2.0 if spec.log_scale else 1.15))
        ax.set_ylabel(spec.ylabel)
        ax.set_title(f"{title}  (x = failed, hatched = output mismatch)" if title else "")
        if handles:
            ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)
