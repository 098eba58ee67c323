"""Timeline picture of a simulated step (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path

from torch_graphpipe.simulator import SimulationResult

__all__ = ["plot_timeline"]


def plot_timeline(result: SimulationResult, path: str | Path, *, title: str = "") -> Path:
    """One row per stage; forward boxes (F, FL) light, backward boxes (B, BL) dark, weight-gradient
    boxes (W) hatched, hue by micro-batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    num_stages = len(result.timeline)
    num_mb = 1 + max((e.microbatch for row in result.timeline for e in row), default=0)
    cmap = plt.get_cmap("tab20" if num_mb > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(max(6.0, result.iteration_time and 10.0), 0.5 * num_stages + 1.2))
    for row in result.timeline:
        for e in row:
            colour = cmap(e.microbatch % cmap.N)
            ax.barh(
                e.stage,
                e.end - e.start,
                left=e.start,
                height=0.8,
                color=colour,
                alpha=0.55 if e.kind in ("F", "FL") else 1.0,
                hatch="///" if e.kind == "W" else None,
                edgecolor="black",
                linewidth=0.5,
            )
            ax.text(
                (e.start + e.end) / 2,
                e.stage,
                f"{e.kind}{e.microbatch}",
                ha="center",
                va="center",
                fontsize=7,
            )
    ax.set_yticks(range(num_stages), [f"stage {s}" for s in range(num_stages)])
    ax.invert_yaxis()
    ax.set_xlabel("time")
    ax.set_title(title or f"iteration {result.iteration_time:.4g}, bubble {result.bubble_fraction:.0%}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
