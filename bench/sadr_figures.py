"""Figures 6 and 7 of the SADR paper from the points of ``bench/sadr_grid.py``.

    python bench/sadr_figures.py --steps 20 --cases 30 --layers 20-29  # bench/sadr_figures.sh runs its points

Only the grid points over ``--cases`` cases are drawn. Figure 6 analogue: ES, PS, RS and DNS against
gamma, selective heads vs all heads (SADR on ``--layers``, the preset's lr and KL factor,
``--steps``). Figure 7 analogue: edit success (mean of EM and PM) against RM and against DNM, when
varying SADR's gamma versus varying the editor's own steps, learning rate and KL factor (gamma 0).
Writes ``docs/figures/sadr_fig6.png``, ``docs/figures/sadr_fig7.png`` and the plotted series to
``bench/results/sadr_figures.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from attnedit.analysis.plots import save_figure
from attnedit.editing.registry import load_preset


def _plain(p: dict, layers: str | None = None) -> bool:
    """The editor's own lr and KL factor; SADR on ``layers`` (any range for gamma 0, where SADR is off)."""
    same_layers = layers is None or p["gamma"] == 0 or p.get("layers", "all") == layers
    return same_layers and p.get("lr") is None and p.get("kl_factor") is None


# each curve of figure 7 labels its points with the setting it varies
_VARIED = {"SADR gamma": "gamma", "ROME steps": "steps", "ROME lr": "lr", "ROME KL factor": "kl_factor"}


def _series(points: list[dict], steps: int, layers: str, preset: dict) -> dict[str, list[dict]]:
    """The curves of figure 7: each a list of points sorted along the varied setting; a point that does
    not set lr or the KL factor has the ``preset`` value."""
    out = {
        "SADR gamma": sorted(
            (p for p in points if _plain(p, layers) and p["heads"] == "selective" and p["steps"] == steps),
            key=lambda p: p["gamma"],
        ),
        "ROME steps": sorted((p for p in points if _plain(p) and p["gamma"] == 0), key=lambda p: p["steps"]),
    }
    base = [p for p in points if _plain(p) and p["gamma"] == 0 and p["steps"] == steps][:1]
    for label in ("ROME lr", "ROME KL factor"):
        key = _VARIED[label]
        other = "kl_factor" if key == "lr" else "lr"
        varied = [
            p
            for p in points
            if p["gamma"] == 0 and p["steps"] == steps and p.get(key) is not None and p.get(other) is None
        ]
        if varied:
            out[label] = sorted(varied + base, key=lambda p, key=key: _value(p, key, preset))
    return {k: v for k, v in out.items() if v}


def _value(p: dict, key: str, preset: dict) -> float:
    return p[key] if p.get(key) is not None else preset[key]


def _success(p: dict) -> float:
    return (p["EM"] + p["PM"]) / 2


def figure6(points: list[dict], steps: int, layers: str, path: Path) -> dict:
    fig = Figure(figsize=(10, 3.2))
    data = {}
    for i, metric in enumerate(("ES", "PS", "RS", "DNS")):
        ax = fig.add_subplot(1, 4, i + 1)
        for heads in ("selective", "all"):
            row = sorted(
                (p for p in points if _plain(p, layers) and p["heads"] == heads and p["steps"] == steps),
                key=lambda p: p["gamma"],
            )
            if not row:
                continue
            x = [p["gamma"] for p in row]
            y = [p[metric] for p in row]
            data.setdefault(heads, {"gamma": x})[metric] = y
            ax.plot(x, y, marker="o", markersize=3, label=f"{heads} heads")
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlabel("gamma")
        ax.set_title(metric, fontsize=10)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"SADR: selective vs all heads (ROME, {steps} steps, SADR layers {layers})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return data


def figure7(points: list[dict], steps: int, layers: str, preset: dict, path: Path) -> dict:
    series = _series(points, steps, layers, preset)
    fig = Figure(figsize=(9, 3.6))
    data = {}
    for i, metric in enumerate(("RM", "DNM")):
        ax = fig.add_subplot(1, 2, i + 1)
        for label, row in series.items():
            x = [p[metric] for p in row]
            y = [_success(p) for p in row]
            (line,) = ax.plot(x, y, marker="o", markersize=3, label=label)
            key = _VARIED[label]
            for xi, yi, p in zip(x, y, row, strict=True):
                v = _value(p, key, preset)
                ax.annotate(
                    f"{v:g}",
                    (xi, yi),
                    fontsize=6,
                    color=line.get_color(),
                    xytext=(3, 2),
                    textcoords="offset points",
                )
            data.setdefault(
                label,
                {
                    "points": [
                        {k: _value(p, k, preset) for k in ("steps", "gamma", "lr", "kl_factor")} for p in row
                    ],
                    "success": y,
                },
            )[metric] = x
        ax.set_xlabel(f"{metric} (specificity magnitude)")
        ax.set_ylabel("edit success: mean of EM, PM")
        ax.legend(fontsize=7)
    fig.suptitle(f"trade-off: SADR gamma vs ROME's own settings ({steps} steps where fixed)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", default="bench/results/sadr_grid_rome.json")
    ap.add_argument("--steps", type=int, default=20, help="the steps of the gamma curves")
    ap.add_argument("--cases", type=int, required=True, help="draw the grid points over this many cases")
    ap.add_argument("--layers", default="all", help="SADR layer range of the gamma curves (A-B or all)")
    ap.add_argument("--preset", default="smollm2-135m", help="the ROME preset the grid ran (sadr_grid.py's)")
    ap.add_argument("--figures", default="docs/figures")
    ap.add_argument("--out", default="bench/results/sadr_figures.json")
    args = ap.parse_args()
    grid = json.loads(Path(args.grid).read_text())
    points = [p for p in grid["points"] if not np.isnan(p.get("ES", np.nan)) and p["cases"] == args.cases]
    if not points:
        raise SystemExit(f"{args.grid}: no grid point over {args.cases} cases")
    # the grid runs ROME at its SmolLM2 preset: the lr and KL factor of points that do not set them
    preset = load_preset("rome", args.preset, preset=args.preset)["params"]
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    result = {
        "grid": args.grid,
        "steps": args.steps,
        "cases": args.cases,
        "layers": args.layers,
        "figure6": figure6(points, args.steps, args.layers, figures / "sadr_fig6.png"),
        "figure7": figure7(points, args.steps, args.layers, preset, figures / "sadr_fig7.png"),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1)[:2000])


if __name__ == "__main__":
    main()
