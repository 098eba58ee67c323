"""Draw placed graphs with matplotlib: one box per partition, coloured by backend, edges between them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch_collage.report import GraphReport

__all__ = ["render_placement"]

_COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def render_placement(graphs: Sequence[GraphReport], path: Path) -> None:
    """Write ``path`` (svg/png/pdf by suffix): partitions top to bottom in execution order per graph."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(p.backend for g in graphs for p in g.partitions)) or ["eager"]
    colour = {b: _COLOURS[i % len(_COLOURS)] for i, b in enumerate(backends)}
    rows = max((len(g.partitions) for g in graphs), default=1)
    fig, ax = plt.subplots(figsize=(4.5 * max(1, len(graphs)), 0.6 * rows + 1.5))
    for col, g in enumerate(graphs):
        _draw_graph(ax, g, col * 4.5, colour)
    for b, c in colour.items():
        ax.plot([], [], "s", color=c, label=b)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xlim(-0.5, 4.5 * max(1, len(graphs)))
    ax.set_ylim(-rows - 0.5, 1)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _draw_graph(ax: Any, g: GraphReport, x0: float, colour: dict[str, str]) -> None:
    ax.text(x0, 0.5, f"{g.kind}: {g.chosen}, {g.measured_ms:.2f} ms", fontsize=9, weight="bold")
    for k, p in enumerate(g.partitions):
        label = ", ".join(p.nodes[:3]) + (f" +{len(p.nodes) - 3}" if len(p.nodes) > 3 else "")
        ax.text(
            x0,
            -k - 0.5,
            f"{p.backend}: {label}",
            fontsize=7,
            color="white",
            bbox={"facecolor": colour[p.backend], "edgecolor": "black", "boxstyle": "round"},
        )
    for i, j in g.edges:
        if j != i + 1:
            ax.annotate(
                "",
                xy=(x0 - 0.1, -j - 0.5),
                xytext=(x0 - 0.1, -i - 0.5),
                arrowprops={"arrowstyle": "->", "connectionstyle": "arc3,rad=0.3", "lw": 0.6},
            )
