"""Reports: merge run directories (shards of one run become one row) into a Table-3-shaped table."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnedit.evaluation.metrics import (
    GENERATION_METRICS,
    KNOWEDIT_METRICS,
    PAIRED_MAGNITUDES,
    PAIRED_SCORES,
    paired_difference,
    summarize,
)
from attnedit.evaluation.records import CaseRecord, PairedDifference
from attnedit.runs.rundir import ADDED_LATER, ADDED_LATER_PARTS, MANIFEST, RunDir

logger = logging.getLogger(__name__)

TABLE_COLUMNS = ("AvgS", "ES", "PS", "NS", "RS", "DNS", "FL", *GENERATION_METRICS)
MAGNITUDE_COLUMNS = ("EM", "PM", "NM", "RM", "DNM", "RM_onew", "DNM_onew")
EXTRA_COLUMNS = ("DRS", "RES", "ALIAS", "OS", "DOS", "PPL")
KNOWEDIT_COLUMNS = (*KNOWEDIT_METRICS, "KE_FLU")


@dataclass
class ReportRow:
    """One row of a report: a run (its shards merged), its pooled summary and its records in case order."""

    label: str
    run_dirs: list[str]
    manifest: dict[str, Any]
    summary: dict[str, Any]  # metrics.summarize's entries plus "_cases" and "_complete_shards"
    records: list[CaseRecord] = field(default_factory=list, repr=False)


def _shard_key(manifest: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        manifest.get("label"),
        manifest["model"]["fingerprint"],
        json.dumps(manifest.get("hyperparameters"), sort_keys=True),
        manifest["data"]["sha256"],
        manifest["data"].get("language"),  # multilingual data: the same file edited in another language
        manifest["data"].get("question_template"),
        manifest.get("limit"),
        manifest.get("first", 0),
        # the same method and settings in another mode (batch vs a stream) or batch size is another run
        manifest.get("mode"),
        manifest.get("batch_size") if manifest.get("mode") != "single" else None,
        json.dumps(manifest.get("stream", ADDED_LATER["stream"]), sort_keys=True),
        # a manifest from before an evaluation setting implies its old value: a shard resumed since (its
        # manifest now states that value) still merges with the shards that were not
        json.dumps({**ADDED_LATER_PARTS["eval"], **(manifest.get("eval") or {})}, sort_keys=True),
    )


def collect(run_dirs: Sequence[str | Path]) -> list[ReportRow]:
    """One row per distinct run; shards of the same run (same settings) are merged, duplicates refused."""
    groups: dict[tuple[Any, ...], list[tuple[RunDir[CaseRecord], dict[str, Any]]]] = {}
    for d in map(RunDir[CaseRecord], run_dirs):
        manifest = d.read_manifest()
        if manifest is None:
            raise FileNotFoundError(f"{d.path}: no {MANIFEST}; not a run directory")
        groups.setdefault(_shard_key(manifest), []).append((d, manifest))
    rows = []
    for members in groups.values():
        shards = [(m["shard"]["index"], m["shard"]["count"]) for _, m in members]
        if len(set(shards)) != len(shards):
            raise ValueError(f"the same shard appears twice among {[str(d.path) for d, _ in members]}")
        records: list[CaseRecord] = []
        seen: set[str] = set()
        for d, _ in members:
            for r in d.selected_records():
                if r["case_id"] in seen:
                    raise ValueError(f"case {r['case_id']!r} appears in more than one shard ({d.path})")
                seen.add(r["case_id"])
                records.append(r)
        manifest = members[0][1]
        counts = {c for _, c in shards}
        complete = len(counts) == 1 and len(shards) == counts.pop()
        ranges = [m.get("case_ids") for _, m in members]
        expected = sum(len(ids) for ids in ranges if ids is not None)
        if all(ids is not None for ids in ranges) and len(records) < expected:
            logger.warning(
                "%s: unfinished run: %d of the %d cases of its range have a record",
                ", ".join(str(d.path) for d, _ in members),
                len(records),
                expected,
            )
        summary: dict[str, Any] = {**summarize(records), "_cases": len(records), "_complete_shards": complete}
        rows.append(
            ReportRow(
                manifest.get("label") or manifest["method"],
                [str(d.path) for d, _ in members],
                manifest,
                summary,
                records,
            )
        )
    _tell_apart(rows)
    _warn_on_different_data(rows)
    return rows


def distinct_names(paths: Sequence[str | Path]) -> list[str]:
    """The shortest trailing parts of ``paths`` that tell them apart: their directory names, or more of
    their paths where names repeat (``a/run``, ``b/run``)."""
    parts = [Path(p).parts for p in paths]
    for k in range(1, max((len(x) for x in parts), default=0) + 1):
        names = ["/".join(x[-k:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def _tell_apart(rows: list[ReportRow]) -> None:
    """Rows that share a label (the same method with other settings, data or model) are labelled
    ``label [run directory]`` (its first shard's name, or as much of its path as tells the rows apart),
    so that each row of a table can be told apart."""
    by_label: dict[str, list[ReportRow]] = {}
    for row in rows:
        by_label.setdefault(row.label, []).append(row)
    for same in by_label.values():
        if len(same) > 1:
            for row, name in zip(same, distinct_names([r.run_dirs[0] for r in same]), strict=True):
                row.label = f"{row.label} [{name}]"


def _warn_on_different_data(rows: list[ReportRow]) -> None:
    """One warning when the rows were computed on different data files (sha256): their numbers are not
    comparable case by case."""
    by_data: dict[str, list[str]] = {}
    for row in rows:
        by_data.setdefault(row.manifest["data"]["sha256"], []).append(row.label)
    if len(by_data) > 1:
        logger.warning(
            "the rows were computed on different data files: %s",
            "; ".join(f"{sha[:12]}: {', '.join(labels)}" for sha, labels in by_data.items()),
        )


def _cell(entry: Mapping[str, Any] | None, digits: int = 1) -> str:
    if not entry or entry.get("mean") is None:
        return "-"
    if entry.get("ci95") is None:
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} ± {entry['ci95']:.{digits}f}"


def columns(magnitudes: bool = False, extra: bool = False, rows: Sequence[ReportRow] = ()) -> tuple[str, ...]:
    """The table's columns; given the ``rows``, followed by those of their translation languages
    (``language_columns``)."""
    cols = TABLE_COLUMNS + (MAGNITUDE_COLUMNS if magnitudes else ()) + (EXTRA_COLUMNS if extra else ())

    # KnowEdit-style data (portability or locality probes: KnowEdit, zsRE, BMIKE-53): its metrics too, where
    # some row has a value (every case has KE_EDIT, so that alone says nothing about the data)
    def has(col: str) -> bool:
        return any((r.summary.get(col) or {}).get("mean") is not None for r in rows)

    if has("KE_PORT") or has("KE_LOC"):
        cols += tuple(c for c in KNOWEDIT_COLUMNS if has(c))
    return cols + language_columns(rows, cols)


def language_columns(rows: Sequence[ReportRow], cols: tuple[str, ...]) -> tuple[str, ...]:
    """``KEY@LANG`` columns of multilingual runs: per translation language of the rows' summaries (in
    their order), each comparison column of ``cols`` that some row has a value for. () when no row has
    a translation."""
    languages: dict[str, None] = {}
    for row in rows:
        for key in row.summary:
            if "@" in key:
                languages.setdefault(key.partition("@")[2], None)
    out = []
    for lang in languages:
        for col in cols:
            key = f"{col}@{lang}"
            if any((row.summary.get(key) or {}).get("mean") is not None for row in rows):
                out.append(key)
    return tuple(out)


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


def paired(
    rows: list[ReportRow], against: str, magnitudes: bool = False
) -> dict[str, dict[str, PairedDifference]]:
    """Every other row minus the row labelled ``against``, on the cases both hold (paired bootstrap);
    ``magnitudes``: EM, PM, NM, RM, DNM too; the KnowEdit metrics where the records have them; the
    generation scores (GES, GPS) where both rows' records have them; each in every translation language
    the records hold."""
    base = [r for r in rows if r.label == against]
    if len(base) != 1:
        labels = ", ".join(r.label for r in rows)
        which = "no" if not base else "more than one"
        raise ValueError(f"--against {against!r}: {which} row has this label (rows: {labels})")
    names = PAIRED_SCORES + (PAIRED_MAGNITUDES if magnitudes else ())
    if any({"KE_PORT", "KE_LOC"} & set(r.get("knowedit", {})) for r in base[0].records):  # as ``columns``
        names += KNOWEDIT_METRICS
    # translations (multilingual data): the same scores in every language the base run's records hold
    langs = sorted({key.partition("@")[2] for r in base[0].records for key in r["comparisons"]} - {""})

    def scores(row: ReportRow) -> tuple[str, ...]:
        # the generation scores only where both runs computed them (runs made before them, or with
        # --no-generation-score, have none)
        both = all(any("generation_score" in r for r in x.records) for x in (base[0], row))
        mine = names + (GENERATION_METRICS if both else ())
        return mine + tuple(f"{name}@{lang}" for lang in langs for name in mine)

    return {
        r.label: paired_difference(base[0].records, r.records, scores(r)) for r in rows if r is not base[0]
    }


def paired_table(differences: dict[str, dict[str, PairedDifference]], against: str) -> str:
    """Markdown: per row and score, the difference in points and relative, with 95% intervals."""

    def cell(d: PairedDifference | None) -> str:
        if not d:
            return "-"
        lo, hi = d["diff_ci"]
        text = f"{d['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}]"
        if d["relative"] is not None and d["relative_ci"] is not None:
            rlo, rhi = d["relative_ci"]
            text += f"; {d['relative']:+.0f}% [{rlo:+.0f}, {rhi:+.0f}]"
        return text

    known = PAIRED_SCORES + PAIRED_MAGNITUDES + KNOWEDIT_METRICS + GENERATION_METRICS
    found = {s for d in differences.values() for s in d}
    # the edit language's scores first, then each translation's (``ES@fr``, ...), each in the known order
    names = sorted(found, key=lambda s: (s.partition("@")[2], known.index(s.partition("@")[0])))
    lines = [f"| Method - {against} | cases | " + " | ".join(names) + " |"]
    lines.append("|---|---:|" + "---:|" * len(names))
    for label, by_score in differences.items():
        cases = next((d["cases"] for d in by_score.values()), 0)
        cells = " | ".join(cell(by_score.get(s)) for s in names)
        lines.append(f"| {label} | {cases} | {cells} |")
    return "\n".join(lines)


def write_report(
    rows: list[ReportRow],
    out_dir: str | Path,
    cols: tuple[str, ...],
    differences: tuple[str, dict[str, dict[str, PairedDifference]]] | None = None,
) -> dict[str, Path]:
    """report.md/.csv/.json; with ``differences`` (the ``against`` label and ``paired(rows, against)``),
    also paired.md/.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "csv": out / "report.csv", "json": out / "report.json"}
    if differences is not None:
        against, by_row = differences
        paths |= {"paired_md": out / "paired.md", "paired_json": out / "paired.json"}
        paths["paired_md"].write_text(paired_table(by_row, against) + "\n")
        paths["paired_json"].write_text(json.dumps({"against": against, "rows": by_row}, indent=1))
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
