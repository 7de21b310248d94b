"""Figures of ``attnedit analyze``: pure functions, arrays in, PNG path out.

Figures are drawn on a bare ``matplotlib.figure.Figure`` (the Agg canvas, no pyplot state), so they work
without a display and leave any interactive backend of the caller alone. NaN cells (e.g. a token position
no case has) are left blank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 120


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (parents created): every figure of the package and of bench/."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _label_and_save(fig: Figure, ax: Any, path: str | Path, title: str, xlabel: str, ylabel: str) -> Path:
    """Axis labels, title and legend of a one-axes figure, then save it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


@dataclass
class HeatmapPanel:
    """One heatmap: ``values[row, layer]`` with a title."""

    title: str
    values: np.ndarray


def heatmaps(
    panels: Sequence[HeatmapPanel],
    row_labels: Sequence[str],
    path: str | Path,
    title: str = "",
    colorbar: str = "",
    columns: int = 2,
    diverging: bool = True,
) -> Path:
    """A grid of heatmaps sharing their row labels (token positions) and x axis (layer / window centre).
    ``diverging`` centres the colour scale of each panel on zero (effects); otherwise it starts at the
    panel's minimum (probabilities)."""
    if not panels:
        raise ValueError("no heatmap panels")
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(4.6 * columns, 0.45 * len(row_labels) * rows + 1.6 * rows))
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, columns, i + 1)
        values = np.ma.masked_invalid(np.asarray(panel.values, dtype=float))
        if values.ndim != 2 or values.shape[0] != len(row_labels):
            expected = f"[{len(row_labels)}, layers]"
            raise ValueError(f"panel {panel.title!r}: expected {expected}, got {values.shape}")
        finite = values.compressed()
        if diverging:
            bound = float(np.abs(finite).max()) if finite.size else 1.0
            bound = bound or 1.0
            image = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound)
        else:
            image = ax.imshow(values, aspect="auto", cmap="Purples")
        ax.set_yticks(range(len(row_labels)), list(row_labels), fontsize=8)
        n_layers = values.shape[1]
        step = max(1, n_layers // 10)
        ax.set_xticks(range(0, n_layers, step))
        ax.set_xlabel("layer (window centre)", fontsize=8)
        ax.set_title(panel.title, fontsize=9)
        fig.colorbar(image, ax=ax, label=colorbar, shrink=0.85)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def layer_lines(
    series: Mapping[str, np.ndarray],
    path: str | Path,
    title: str = "",
    ylabel: str = "",
    xlabel: str = "layer",
) -> Path:
    """One line per series against the layer index (e.g. ROME's per-layer MLP vs attention effects)."""
    if not series:
        raise ValueError("no series to plot")
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    for label, values in series.items():
        values = np.asarray(values, dtype=float)
        ax.plot(np.arange(len(values)), values, marker="o", markersize=3, label=label)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _label_and_save(fig, ax, path, title, xlabel, ylabel)


@dataclass
class LinePanel:
    """Curves against the layer (window centre) and horizontal reference levels."""

    title: str
    lines: dict[str, np.ndarray]
    references: dict[str, float] = field(default_factory=dict)


def line_panels(
    panels: Sequence[LinePanel],
    path: str | Path,
    title: str = "",
    ylabel: str = "",
    xlabel: str = "layer (window centre)",
) -> Path:
    """Side-by-side panels of curves with dashed reference lines in the curves' colours order
    (figure 5 of the SADR paper: patched P(o_true), P(o_edit) with the unpatched levels)."""
    if not panels:
        raise ValueError("no line panels")
    fig = Figure(figsize=(5.2 * len(panels), 3.8))
    styles = ("--", ":", "-.")
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for label, values in panel.lines.items():
            values = np.asarray(values, dtype=float)
            ax.plot(np.arange(len(values)), values, marker="o", markersize=3, label=label)
        for k, (label, level) in enumerate(panel.references.items()):
            if level is not None and np.isfinite(level):
                color = f"C{k % 2}"
                ax.axhline(float(level), linestyle=styles[(k // 2) % len(styles)], color=color, label=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel.title, fontsize=10)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def scatter(
    groups: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
) -> Path:
    """A scatter plot with one colour per group of (x, y) points (figure 4: KL drift vs P(o_edit))."""
    if not groups:
        raise ValueError("no points to plot")
    fig = Figure(figsize=(5.2, 4))
    ax = fig.add_subplot(1, 1, 1)
    for label, (x, y) in groups.items():
        ax.scatter(np.asarray(x, dtype=float), np.asarray(y, dtype=float), s=12, alpha=0.7, label=label)
    return _label_and_save(fig, ax, path, title, xlabel, ylabel)
