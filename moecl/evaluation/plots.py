"""Annotated heatmaps of accuracy matrices and routing confusions (matplotlib, Agg, no pyplot state).

Figures are built on ``matplotlib.figure.Figure`` directly so nothing touches pyplot's global figure
registry or the user's interactive backend; the same figure can go to a PNG or to TensorBoard.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..runstate.atomic import atomic_write


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def heatmap_figure(matrix: Any, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
                   fmt: str = "{:.1f}", vmin: Optional[float] = None, vmax: Optional[float] = None,
                   cmap: str = "viridis", colorbar_label: str = "", xlabel: str = "",
                   ylabel: str = ""):
    """A heatmap with every cell annotated; None / NaN cells stay blank. Returns the Figure."""
    a = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=np.float64)
    rows, cols = a.shape
    fig = _figure(max(4.0, 1.6 + 0.72 * cols), max(2.6, 1.6 + 0.42 * rows))
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(a)
    finite = a[np.isfinite(a)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    image = ax.imshow(masked, cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1.0, aspect="auto")
    ax.set_xticks(range(cols), labels=list(col_labels), rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(rows), labels=list(row_labels))
    ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    fontsize = 9 if cols <= 12 else 7
    for i in range(rows):
        for j in range(cols):
            if np.isfinite(a[i, j]):
                r, g, b, _ = image.cmap(image.norm(a[i, j]))
                color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, fmt.format(a[i, j]), ha="center", va="center", color=color, fontsize=fontsize)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    if colorbar_label:
        bar.set_label(colorbar_label)
    return fig


def accuracy_heatmap(matrix: Any, col_labels: Sequence[str], title: str, row_labels: Optional[Sequence[str]] = None):
    """Accuracy matrix (%) with rows = after training task i, columns = test sets."""
    rows = len(matrix)
    labels = row_labels if row_labels is not None else [f"after {i + 1}" for i in range(rows)]
    return heatmap_figure(matrix, labels, col_labels, title, vmin=0.0, vmax=100.0,
                          colorbar_label="top-1 accuracy (%)", xlabel="test set", ylabel="trained up to")


def routing_heatmap(confusion: Any, row_labels: Sequence[str], route_labels: Sequence[str], title: str):
    """Routing confusion shown as the percentage of each test set's images taking each route."""
    c = np.asarray(confusion, dtype=np.float64)
    totals = c.sum(axis=1, keepdims=True)
    pct = np.divide(100.0 * c, totals, out=np.full(c.shape, np.nan), where=totals > 0)
    return heatmap_figure(pct, row_labels, route_labels, title, fmt="{:.0f}", vmin=0.0, vmax=100.0,
                          cmap="Blues", colorbar_label="images of the test set (%)", xlabel="route taken",
                          ylabel="test set")


def summary_figure(series: Sequence[dict], title: str):
    """Methods side by side: Transfer and Last as bars, and the mean accuracy on the tasks seen so far
    after each task as lines. ``series``: [{"name", "transfer", "last", "seen": [...]}, ...]."""
    fig = _figure(max(8.0, 4.0 + 0.9 * len(series)), 3.8)
    bars, lines = fig.subplots(1, 2)
    x = np.arange(len(series))
    for k, (key, label) in enumerate((("transfer", "Transfer"), ("last", "Last"))):
        values = [np.nan if s.get(key) is None else float(s[key]) for s in series]
        drawn = bars.bar(x + (k - 0.5) * 0.38, values, width=0.38, label=label)
        bars.bar_label(drawn, fmt="%.1f", fontsize=7, padding=1)
    bars.set_xticks(x, labels=[s["name"] for s in series], rotation=30, ha="right", rotation_mode="anchor")
    bars.set_ylim(0, 118)
    bars.set_ylabel("top-1 accuracy (%)")
    bars.set_title("Transfer and Last")
    bars.legend(fontsize=8, loc="upper center", ncol=2)
    for s in series:
        lines.plot(range(1, len(s["seen"]) + 1), s["seen"], marker="o", label=s["name"])
    lines.set_xlabel("tasks learned")
    lines.set_ylabel("accuracy on tasks seen so far (%)")
    lines.set_ylim(0, 118)
    lines.set_title("as tasks are learned")
    lines.xaxis.get_major_locator().set_params(integer=True)
    lines.legend(fontsize=7, loc="upper center", ncol=2)
    fig.suptitle(title)
    return fig


def figure_to_array(fig) -> np.ndarray:
    """Rendered RGB pixels [H, W, 3] uint8 (what TensorBoard's add_image takes with dataformats='HWC')."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_png(fig, path: Path) -> Path:
    """Write the figure as a PNG atomically (temp file + rename), so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path
