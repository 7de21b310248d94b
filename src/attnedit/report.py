"""Reports: merge run directories (shards of one run become one row) into a Table-3-shaped table."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from attnedit.metrics import summarize
from attnedit.runner import MANIFEST, selected_records

TABLE_COLUMNS = ("AvgS", "ES", "PS", "NS", "RS", "DNS", "FL")
MAGNITUDE_COLUMNS = ("EM", "PM", "NM", "RM", "DNM", "RM_onew", "DNM_onew")
EXTRA_COLUMNS = ("DRS", "RES", "ALIAS", "OS", "DOS", "PPL")


@dataclass
class ReportRow:
    label: str
    run_dirs: list[str]
    manifest: dict
    summary: dict


def _shard_key(manifest: dict) -> tuple:
    return (
        manifest.get("label"),
        manifest["model"]["fingerprint"],
        json.dumps(manifest.get("hyperparameters"), sort_keys=True),
        manifest["data"]["sha256"],
        manifest.get("limit"),
        manifest.get("first", 0),
        json.dumps(manifest.get("eval"), sort_keys=True),
    )


def collect(run_dirs: list[str | Path]) -> list[ReportRow]:
    """One row per distinct run; shards of the same run (same settings) are merged, duplicates refused."""
    groups: dict[tuple, list[tuple[Path, dict]]] = {}
    for d in map(Path, run_dirs):
        if not (d / MANIFEST).is_file():
            raise FileNotFoundError(f"{d}: no {MANIFEST}; not a run directory")
        manifest = json.loads((d / MANIFEST).read_text())
        groups.setdefault(_shard_key(manifest), []).append((d, manifest))
    rows = []
    for members in groups.values():
        shards = [(m["shard"]["index"], m["shard"]["count"]) for _, m in members]
        if len(set(shards)) != len(shards):
            raise ValueError(f"the same shard appears twice among {[str(d) for d, _ in members]}")
        records, seen = [], set()
        for d, _ in members:
            for r in selected_records(d):
                if r["case_id"] in seen:
                    raise ValueError(f"case {r['case_id']!r} appears in more than one shard ({d})")
                seen.add(r["case_id"])
                records.append(r)
        manifest = members[0][1]
        counts = {c for _, c in shards}
        complete = len(counts) == 1 and len(shards) == counts.pop()
        summary = summarize(records)
        summary["_cases"] = len(records)
        summary["_complete_shards"] = complete
        rows.append(
            ReportRow(
                manifest.get("label") or manifest["method"], [str(d) for d, _ in members], manifest, summary
            )
        )
    return rows


def _cell(entry: dict | None, digits: int = 1) -> str:
    if not entry or entry.get("mean") is None:
        return "-"
    if entry.get("ci95") is None:
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} ± {entry['ci95']:.{digits}f}"


def columns(magnitudes: bool = False, extra: bool = False) -> tuple[str, ...]:
    return TABLE_COLUMNS + (MAGNITUDE_COLUMNS if magnitudes else ()) + (EXTRA_COLUMNS if extra else ())


def markdown_table(rows: list[ReportRow], cols: tuple[str, ...]) -> str:
    head = "| Method | cases | " + " | ".join(cols) + " |"
    sep = "|---|---:|" + "---:|" * len(cols)
    lines = [head, sep]
    for row in rows:
        cells = [_cell(row.summary.get(c), 2 if c == "PPL" else 1) for c in cols]
        lines.append(f"| {row.label} | {row.summary['_cases']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_table(rows: list[ReportRow], cols: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "cases", *[f"{c}{s}" for c in cols for s in ("", "_ci95", "_n")]])
    for row in rows:
        values = []
        for c in cols:
            e = row.summary.get(c) or {}
            values += [e.get("mean"), e.get("ci95"), e.get("n")]
        writer.writerow([row.label, row.summary["_cases"], *values])
    return buf.getvalue()


def write_report(rows: list[ReportRow], out_dir: str | Path, cols: tuple[str, ...]) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "csv": out / "report.csv", "json": out / "report.json"}
    paths["md"].write_text(markdown_table(rows, cols) + "\n")
    paths["csv"].write_text(csv_table(rows, cols))
    paths["json"].write_text(
        json.dumps(
            [
                {
                    "label": r.label,
                    "run_dirs": r.run_dirs,
                    "summary": r.summary,
                    "manifest": {
                        k: r.manifest.get(k) for k in ("model", "method", "hyperparameters", "data", "seed")
                    },
                }
                for r in rows
            ],
            indent=1,
        )
    )
    return paths
