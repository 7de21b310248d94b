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
from matplotlib.lines import Line2D
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


@dataclass
class Curve:
    """One line of a curve panel: ``y`` against ``x`` (NaN: no value there), ``band`` the half-width of an
    interval around ``y`` (shaded; NaN: none there)."""

    x: np.ndarray
    y: np.ndarray
    band: np.ndarray | None = None


@dataclass
class CurvePanel:
    """A panel of ``curve_grid``: one ``Curve`` per label; ``log``: a logarithmic y axis (where every
    value is positive)."""

    title: str
    curves: dict[str, Curve]
    log: bool = False


def curve_figure(
    panels: Sequence[CurvePanel],
    stopped: Sequence[str] = (),
    title: str = "",
    xlabel: str = "edits",
    columns: int = 3,
) -> Figure:
    """The figure of ``curve_grid`` (not saved)."""
    if not panels:
        raise ValueError("no curve panels")
    labels = list(dict.fromkeys(label for panel in panels for label in panel.curves))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    xs = np.concatenate([np.asarray(c.x, dtype=float) for panel in panels for c in panel.curves.values()])
    xs = xs[np.isfinite(xs)]
    pad = 0.03 * float(np.ptp(xs)) if xs.size else 0.0
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(4.2 * columns, 3.0 * rows + 0.4 + 0.25 * len(labels)), layout="constrained")
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, columns, i + 1)
        positive = True
        for label, curve in panel.curves.items():
            x, y = np.asarray(curve.x, dtype=float), np.asarray(curve.y, dtype=float)
            if x.shape != y.shape:
                raise ValueError(
                    f"panel {panel.title!r}, {label!r}: {x.shape[0]} x values, {y.shape[0]} y values"
                )
            colour = colours[label]
            ax.plot(x, y, marker="o", markersize=3, color=colour, label=label)
            if curve.band is not None:
                band = np.asarray(curve.band, dtype=float)
                ax.fill_between(x, y - band, y + band, color=colour, alpha=0.15, linewidth=0)
            finite = np.isfinite(y)
            positive &= bool((y[finite] > 0).all())
            if label in stopped and finite.any():
                last = np.flatnonzero(finite)[-1]
                ax.plot(x[last], y[last], marker="X", markersize=10, color=colour, markeredgecolor="black")
        if panel.log and positive:
            ax.set_yscale("log")
        if pad > 0:  # every panel over the same range of x
            ax.set_xlim(float(xs.min()) - pad, float(xs.max()) + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_title(panel.title, fontsize=9)
        ax.tick_params(labelsize=8)
    handles = [
        Line2D([], [], color=colours[label], marker="o", markersize=3, label=label) for label in labels
    ]
    if any(label in stopped for label in labels):
        handles.append(
            Line2D([], [], color="grey", marker="X", markersize=8, linestyle="none", markeredgecolor="black",
                   label="collapsed (stream stopped)")
        )  # fmt: skip
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def curve_grid(
    panels: Sequence[CurvePanel],
    path: str | Path,
    stopped: Sequence[str] = (),
    title: str = "",
    xlabel: str = "edits",
    columns: int = 3,
) -> Path:
    """A grid of panels of curves against a shared x (a stream's number of edits, the same range in every
    panel): each label keeps its colour in every panel, one legend for the figure; a label in ``stopped``
    ends with a cross at its last value (the stream stopped there: the model collapsed)."""
    return save_figure(curve_figure(panels, stopped, title, xlabel, columns), path)
