"""Matplotlib PNG plots for run comparisons (Agg canvas, no global backend switch, no display needed).

All values are percentages; None = missing (drawn as a gap / no bar). Labels in `dashed` (e.g. the
paper's published series) are drawn hatched / dashed so they stand apart from measured runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def grouped_bars(groups: Sequence[str], series: dict[str, Sequence[float | None]], path: str | Path,
                 title: str, ylabel: str, dashed: Sequence[str] = ()) -> Path:
    """Bars: one group per entry of `groups`, one bar per series (values aligned with groups)."""
    n = max(len(series), 1)
    width = 0.8 / n
    fig = Figure(figsize=(max(6.0, 1.2 * len(groups) * max(1, n / 3)) + 2.5, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for j, (label, values) in enumerate(series.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i, v in enumerate(values) if v is not None]
        ys = [v for v in values if v is not None]
        bars = ax.bar(xs, ys, width, label=label, hatch="//" if label in dashed else None,
                      edgecolor="black", linewidth=0.4)
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if series:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_ffp_stages(series: dict[str, dict[str, float | None]], path: str | Path,
                    dashed: Sequence[str] = ()) -> Path:
    """FFP distribution: share (%) of wrong answers whose first failure is early / mid / late."""
    stages = ("early", "mid", "late")
    return grouped_bars(stages, {k: [v.get(s) for s in stages] for k, v in series.items()}, path,
                        "First Failure Point of wrong answers", "share of wrong answers (%)", dashed)


def plot_far_curves(series: dict[str, Sequence[float | None]], path: str | Path,
                    centers: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), dashed: Sequence[str] = ()) -> Path:
    """Failure Accumulation Rate (%) against FFP bin centres, one line per series."""
    fig = Figure(figsize=(8.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for label, values in series.items():
        pts = [(c, v) for c, v in zip(centers, values) if v is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                    linestyle="--" if label in dashed else "-")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("First Failure Point (bin centre)")
    ax.set_ylabel("Failure Accumulation Rate (%)")
    ax.set_title("Failure accumulation after the first invalid step")
    if series:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_accuracy(datasets: Sequence[str], series: dict[str, Sequence[float | None]], path: str | Path,
                  dashed: Sequence[str] = ()) -> Path:
    """Accuracy (%) per data set, one bar per run."""
    return grouped_bars(datasets, series, path, "Answer accuracy", "accuracy (%)", dashed)
