"""Result tables and the writer every ``bench_*.py`` shares: JSON, markdown, PNG and a stdout table.

A ``ResultTable`` is a list of row dicts plus the declared columns that say how each key is printed.
``write_results`` writes ``<out_dir>/<theme>_<hardware>.{json,md,png}``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.plotting import PlotSpec, plot_relative

__all__ = [
    "BASELINE_COLUMNS",
    "DEFAULT_OUT_DIR",
    "Column",
    "ResultTable",
    "format_markdown",
    "format_text",
    "invocation",
    "write_results",
]

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Column:
    """One declared column: the row key, its printed header and a format for non-missing values."""

    key: str  # key in each row dict
    header: str  # printed column title
    fmt: str = "{}"  # str.format pattern for a present value; None/NaN print as "-"

    def render(self, value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return self.fmt.format(value)


BASELINE_COLUMNS: tuple[Column, ...] = (
    Column("model", "model"),
    Column("batch", "batch"),
    Column("backend", "backend"),
    Column("status", "status"),
    Column("median_ms", "median ms", "{:.3f}"),
    Column("iqr_ms", "IQR ms", "{:.3f}"),
    Column("speedup", "speedup vs eager", "{:.2f}x"),
    Column("max_abs_err", "max abs err", "{:.1e}"),
    Column("compile_s", "compile s", "{:.1f}"),
    Column("error", "error"),
)


@dataclass
class ResultTable:
    """Rows as dicts; ``columns`` declares what is printed (rows may carry more keys, kept in JSON)."""

    columns: Sequence[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        keys = [c.key for c in self.columns]
        if len(set(keys)) != len(keys):
            raise ValueError(f"columns must have distinct keys, got {keys}")

    def add(self, **row: Any) -> dict[str, Any]:
        """Append a row; keys not declared as columns are kept but not printed."""
        self.rows.append(row)
        return row

    def to_dict(self) -> dict[str, Any]:
        return {"columns": [c.key for c in self.columns], "rows": self.rows}


def _cells(table: ResultTable, max_error_chars: int) -> list[list[str]]:
    out = []
    for row in table.rows:
        cells = [c.render(row.get(c.key)) for c in table.columns]
        out.append([" ".join(s.split())[:max_error_chars] for s in cells])
    return out


def format_markdown(table: ResultTable, *, max_error_chars: int = 120) -> str:
    """The table in GitHub markdown; cell text is flattened to one line and '|' escaped."""
    header = "| " + " | ".join(c.header for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    lines = [header, rule]
    for cells in _cells(table, max_error_chars):
        lines.append("| " + " | ".join(s.replace("|", "\\|") for s in cells) + " |")
    return "\n".join(lines)


def format_text(table: ResultTable, *, max_error_chars: int = 60) -> str:
    """The table as aligned plain text for a terminal."""
    rows = [[c.header for c in table.columns], *_cells(table, max_error_chars)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(table.columns))]
    lines = ["  ".join(s.ljust(w) for s, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def invocation() -> str:
    """The command line that started this process, as one could paste it into a shell."""
    argv = [Path(sys.executable).name, *sys.argv]
    return " ".join(shlex.quote(a) for a in argv)


def _machine_markdown(info: Mapping[str, Any]) -> str:
    lines = ["| key | value |", "|---|---|"]
    for key, value in info.items():
        text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)
        text = text.replace("|", "\\|")
        lines.append(f"| {key} | {text} |")
    return "\n".join(lines)


def _markdown_document(
    title: str, command: str, info: Mapping[str, Any], table: ResultTable, notes: Sequence[str], png: str
) -> str:
    parts = [
        f"# {title}",
        f"Produced by: `{command}` on {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        "## Machine",
        _machine_markdown(info),
        "## Results",
        format_markdown(table),
        f"![{title}]({png})",
    ]
    if notes:
        parts += ["## Notes", "\n".join(f"- {n}" for n in notes)]
    return "\n\n".join(parts) + "\n"


def _write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_results(
    theme: str,
    hardware: str,
    info: Mapping[str, Any],
    table: ResultTable,
    *,
    notes: Iterable[str] = (),
    command: str | None = None,
    out_dir: str | Path = DEFAULT_OUT_DIR,
    plot: PlotSpec | None = None,
    extra: Mapping[str, Any] | None = None,
    echo: bool = True,
) -> dict[str, Path]:
    """Write ``<theme>_<hardware>.{json,md,png}`` under ``out_dir``; return the paths by suffix.

    ``plot`` says how to draw the PNG (default: ``PlotSpec()``, latency of each backend relative to
    eager, grouped by model and batch). ``extra`` is stored in the JSON only. With ``echo`` the table
    is also printed to stdout.
    """
    for name, value in (("theme", theme), ("hardware", hardware)):
        if not value or "/" in value or value != value.strip():
            raise ValueError(f"{name} must be a non-empty name without '/', got {value!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{theme}_{hardware}"
    paths = {s: out / f"{stem}.{s}" for s in ("json", "md", "png")}
    command = command or invocation()
    notes = list(notes)
    payload = {"theme": theme, "hardware": hardware, "command": command, "created": time.time()}
    payload |= {"machine": dict(info), **table.to_dict(), "notes": notes, "extra": dict(extra or {})}
    _write_json_atomic(paths["json"], payload)
    plot_relative(table.rows, plot or PlotSpec(), paths["png"], title=f"{theme} on {hardware}")
    doc = _markdown_document(f"{theme} — {hardware}", command, info, table, notes, paths["png"].name)
    paths["md"].write_text(doc)
    if echo:
        print(format_text(table))
    return paths
