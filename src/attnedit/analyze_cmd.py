"""``attnedit analyze trace | substitute | drift | patch``: the SADR paper's section 3 analyses of data.

Every subcommand writes into its ``--out`` directory::

    manifest.json   model fingerprint, analysis and its options, method, hyper-parameters, data sha256, seed
    cases.jsonl     one JSON line per finished case (appended and fsynced one by one)
    NAME.json       every case's record plus the aggregates the figures show (NAME = the subcommand)
    *.png           the figures

Resuming: the same command again skips the cases already in ``cases.jsonl`` (a torn last line is cut off);
a directory holding a run with other settings is refused, as ``attnedit eval`` does.

Token alignment (heatmap rows, ROME's averaging): per prompt, the edited subject's FIRST occurrence gives
``first subject`` (its first token), ``middle subject`` (tokens strictly between first and last, averaged),
``last subject``, ``first subsequent`` (the token after the subject, unless it is the last token),
``further`` (tokens after that up to, not including, the last token, averaged) and ``last`` (the prompt's
last token). Tokens before the subject are left out. A prompt without the subject only contributes to
``further`` (every token but the last) and ``last``. Rows no prompt has stay NaN (blank in the figures).
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    no_args_is_help=True,
    help="The SADR paper's analyses (causal tracing, contaminating substitution, attention drift, "
    "attention patching) over a data set, with figures.",
)
logger = logging.getLogger("attnedit")

CASES = "cases.jsonl"
MANIFEST = "manifest.json"
POSITIONS = ("first subject", "middle subject", "last subject", "first subsequent", "further", "last")
TASKS = {"DNS": "Distract-Neighborhood", "RS": "Relation"}
TARGETS = ("o_true", "o_edit")
# what must match to continue in an output directory; the case range (--first, --limit) need not: records
# are per case, so a run can be extended to more cases, and only the selected cases are aggregated
IDENTITY = ("analysis", "model", "method", "hyperparameters", "data", "seed", "options")


class AnalysisConflictError(RuntimeError):
    """The output directory holds an analysis run with different settings."""


# --- token alignment and aggregation (pure) ----------------------------------------------------------


def token_positions(n_tokens: int, first: int, last: int) -> list[list[int]]:
    """Token indices of each of ``POSITIONS`` for a prompt of ``n_tokens`` whose subject spans tokens
    ``first..last`` (``first < 0``: no subject)."""
    end = n_tokens - 1
    if first < 0:
        return [[], [], [], [], list(range(end)), [end]]
    return [
        [first],
        list(range(first + 1, last)),
        [last],
        [last + 1] if last + 1 < end else [],
        list(range(last + 2, end)),
        [end],
    ]


def aligned(values: Any, first: int, last: int) -> Any:
    """``values[layer, token]`` averaged over each of ``POSITIONS``: ``[len(POSITIONS), n_layers]``."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    out = np.full((len(POSITIONS), values.shape[0]), np.nan)
    for row, tokens in enumerate(token_positions(values.shape[1], first, last)):
        if tokens:
            out[row] = values[:, tokens].mean(axis=1)
    return out


def _nanmean(arrays: Sequence[Any], shape: tuple[int, ...]) -> Any:
    import numpy as np

    if not arrays:
        return np.full(shape, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN
        return np.nanmean(np.stack([np.asarray(a, dtype=float) for a in arrays]), axis=0)


def _json_ready(value: Any) -> Any:
    from attnedit.analysis import json_ready  # lazy: the CLI imports this module at start-up

    return json_ready(value)


def _array(value: Any) -> Any:
    """A JSON list back to a float array (None -> NaN)."""
    import numpy as np

    return np.array(value, dtype=float)


# --- the run directory --------------------------------------------------------------------------------


@dataclass
class Setting:
    """What one ``attnedit analyze`` invocation runs; ``method=None`` analyses the unedited model only."""

    analysis: str
    data: str
    model: str
    out: Path
    first: int = 0
    limit: int | None = None
    seed: int = 0
    options: dict = field(default_factory=dict)
    method: str | None = None
    preset: str | None = None
    params: dict = field(default_factory=dict)


@dataclass
class Session:
    setting: Setting
    cases: list
    bundle: Any
    editor: Any
    records: dict[str, dict]  # case_id -> record, those already in cases.jsonl


def _manifest(setting: Setting, bundle: Any, dataset: Any, editor: Any) -> dict:
    from attnedit import __version__
    from attnedit.runner import data_manifest, environment_manifest, model_manifest

    return {
        "attnedit_version": __version__,
        "analysis": setting.analysis,
        "model": model_manifest(bundle),
        "method": editor.name if editor is not None else "none",
        "hyperparameters": editor.hyperparameters() if editor is not None else {},
        "data": data_manifest(dataset),
        "first": setting.first,
        "limit": setting.limit,
        "seed": setting.seed,
        "options": setting.options,
        **environment_manifest(),
    }


def start(setting: Setting) -> Session:
    """Load data, model and editor; write (or check) the manifest; read the finished cases."""
    import numpy as np
    import torch

    from attnedit.data import load_cases
    from attnedit.editing import make_editor
    from attnedit.models import load_model
    from attnedit.runner import check_resumable, records_of_cases, write_manifest

    if setting.first < 0:
        raise ValueError("--first must be at least 0")
    if setting.limit is not None and setting.limit < 1:
        raise ValueError("--limit must be at least 1")
    random.seed(setting.seed)
    np.random.seed(setting.seed)
    torch.manual_seed(setting.seed)
    dataset = load_cases(setting.data)
    cases = dataset.cases[setting.first :]
    cases = cases[: setting.limit] if setting.limit else cases
    if not cases:
        raise ValueError(f"{dataset.path}: no cases from index {setting.first} ({len(dataset)} cases)")
    bundle = load_model(setting.model)
    editor = None
    if setting.method is not None:
        if setting.method == "none":
            raise ValueError(f"analyze {setting.analysis} needs an edit: give --method (e.g. rome)")
        editor = make_editor(setting.method, bundle.name, setting.preset, setting.params)
    manifest = json.loads(json.dumps(_manifest(setting, bundle, dataset, editor)))
    out = setting.out
    out.mkdir(parents=True, exist_ok=True)
    check_resumable(out, manifest, IDENTITY, AnalysisConflictError)
    write_manifest(out, manifest)  # with the current case range
    ids = [c.case_id for c in cases]
    records = {r["case_id"]: r for r in records_of_cases(out / CASES, ids, repair=True)}
    if records:
        logger.info("resuming %s: %d of %d cases already done", out, len(records), len(cases))
    return Session(setting, cases, bundle, editor, records)


def run_cases(session: Session, compute: Callable[[Any], dict]) -> list[dict]:
    """``compute`` each case not done yet, appending its record; all records in case order."""
    from tqdm.auto import tqdm

    from attnedit.runner import append_record

    done = session.records
    bar = tqdm(
        total=len(session.cases), initial=len(done), desc=f"analyze {session.setting.analysis}", unit="case"
    )
    with open(session.setting.out / CASES, "a", encoding="utf-8") as fh, bar:
        for case in session.cases:
            if case.case_id in done:
                continue
            try:
                record = compute(case)
            except (ValueError, KeyError, IndexError) as err:
                raise ValueError(f"case {case.case_id} ({case.source}): {err}") from err
            record = _json_ready({"case_id": case.case_id, "source": case.source, **record})
            append_record(fh, record, allow_nan=False)
            done[case.case_id] = record
            bar.update(1)
    return [done[c.case_id] for c in session.cases]


def finish(session: Session, records: list[dict], aggregate: dict, figures: Sequence[Path]) -> Path:
    """Write NAME.json (atomically) and print where everything is."""
    out, name = session.setting.out, session.setting.analysis
    result = {
        "analysis": name,
        "manifest": MANIFEST,
        "n_cases": len(records),
        "positions": list(POSITIONS),
        "aggregate": aggregate,
        "figures": [Path(f).name for f in figures],
        "cases": records,
    }
    path = out / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_ready(result), allow_nan=False))
    tmp.replace(path)
    typer.echo(f"{name}: {len(records)} cases -> {path}")
    for figure in figures:
        typer.echo(f"figure: {figure}")
    return path


def _subject_span(bundle: Any, prompt: str, subject: str, n_tokens: int) -> list[int]:
    """[first, last] token of the subject's first occurrence in ``prompt``; [-1, -1] when absent."""
    from attnedit.tokens import SubjectNotFoundError, locate_subject

    if subject not in prompt:
        return [-1, -1]
    try:
        span = locate_subject(bundle.tokenizer, prompt, subject)
    except SubjectNotFoundError:
        return [-1, -1]
    if len(span.input_ids) != n_tokens:
        return [-1, -1]
    return [span.first_token, span.last_token]


def _kinds(text: str) -> tuple[str, ...]:
    from attnedit.analysis import TRACE_KINDS

    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    bad = [k for k in kinds if k not in TRACE_KINDS]
    if bad or not kinds:
        raise ValueError(f"--kinds: comma-separated among {', '.join(TRACE_KINDS)}, not {text!r}")
    return kinds


def _layers(text: str | None) -> list[int] | None:
    """``--drift-layers``: ``A-B`` (inclusive) or ``A,B,C``; None = every layer."""
    if not text:
        return None
    try:
        if "-" in text:
            a, b = (int(x) for x in text.split("-"))
            return list(range(a, b + 1))
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--drift-layers expects FIRST-LAST or a comma list, not {text!r}") from None


def _guarded(body: Callable[[], None]) -> None:
    try:
        body()
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        logger.error("%s", err)
        raise typer.Exit(2) from None


def _prepare(verbose: bool, threads: int | None, param: list[str] | None) -> dict[str, str]:
    from attnedit.cli import _overrides, _setup  # lazy: cli imports this module

    _setup(verbose, threads)
    return _overrides(param)


# --- options shared by the subcommands ----------------------------------------------------------------

Data = Annotated[str, typer.Argument(help="data file, or 'sample' for the shipped sample set")]
Model = Annotated[str, typer.Option(help="embedded name, local HF directory or hub id")]
Method = Annotated[str, typer.Option(help="rome | memit | pmet | ft, optionally +sadr (rome+sadr)")]
Preset = Annotated[str | None, typer.Option(help="preset name or JSON file (default: by model)")]
Param = Annotated[
    list[str] | None, typer.Option("--param", "-p", help="override a preset field: KEY=VALUE (repeatable)")
]
First = Annotated[int, typer.Option(help="skip the cases before this index")]
Limit = Annotated[int | None, typer.Option(help="first N cases only (counted from --first)")]
Threads = Annotated[int | None, typer.Option(help="torch CPU threads")]
Seed = Annotated[int, typer.Option(help="random seed (trace: the noise seed; recorded in the manifest)")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v")]


Out = Annotated[Path, typer.Option("--out", help="output directory (manifest, cases.jsonl, JSON, PNG)")]


# --- 1. causal tracing --------------------------------------------------------------------------------


@app.command("trace")
def trace_command(
    data: Data = "sample",
    model: Model = "smollm2-135m",
    kinds: Annotated[str, typer.Option(help="module kinds to restore: layer,mlp,attn")] = "layer,mlp,attn",
    window: Annotated[int, typer.Option(help="layers restored together for mlp and attn (ROME: 10)")] = 10,
    layer_window: Annotated[int, typer.Option(help="layers restored together for 'layer' (ROME: 1)")] = 1,
    samples: Annotated[int, typer.Option(help="noise samples per case")] = 10,
    noise: Annotated[
        float | None, typer.Option(help="noise std (default: 3 x the embeddings' std, as ROME)")
    ] = None,
    first: First = 0,
    limit: Limit = None,
    out: Out = Path("runs/analyze/trace"),
    threads: Threads = None,
    seed: Seed = 0,
    verbose: Verbose = False,
) -> None:
    """ROME's causal tracing of the UNEDITED model on each case's request prompt with o_true: average
    indirect effects per module kind (heatmaps over aligned tokens) and the per-layer MLP vs attention
    effects at the subject's last token."""
    _prepare(verbose, threads, None)

    def body() -> None:
        from attnedit import analysis as A
        from attnedit import plots

        chosen = _kinds(kinds)
        if samples < 1:
            raise ValueError("--samples must be at least 1")
        windows = {k: (layer_window if k == "layer" else window) for k in chosen}
        options = {"kinds": list(chosen), "windows": windows, "samples": samples, "noise": noise}
        session = start(Setting("trace", data, model, out, first, limit, seed, options))
        bundle = session.bundle

        def compute(case: Any) -> dict:
            req = case.request
            record: dict[str, Any] = {"restored": {}, "layer_effects": {}}
            for w in dict.fromkeys(windows.values()):
                group = [k for k in chosen if windows[k] == w]
                trace = A.causal_trace(
                    bundle, req.prompt, req.subject, req.target_true, group, w, noise, samples, seed
                )
                for key in ("prompt", "subject", "target", "tokens", "subject_first", "subject_last"):
                    record[key] = getattr(trace, key)
                record.update(noise=trace.noise, clean=trace.clean, corrupted=trace.corrupted)
                record["restored"].update(trace.restored)
                record["layer_effects"].update(A.layer_effects(trace))
            return record

        records = run_cases(session, compute)
        n_layers = bundle.adapter.n_layers
        aggregate: dict[str, Any] = {
            "clean": _nanmean([r["clean"] for r in records], ()),
            "corrupted": _nanmean([r["corrupted"] for r in records], ()),
            "indirect_effect": {},
            "restored": {},
            "layer_effects": {},
        }
        for kind in chosen:
            grids = [
                aligned(_array(r["restored"][kind]), r["subject_first"], r["subject_last"]) for r in records
            ]
            corrupted = [_array(r["corrupted"]) for r in records]
            shape = (len(POSITIONS), n_layers)
            aggregate["restored"][kind] = _nanmean(grids, shape)
            aggregate["indirect_effect"][kind] = _nanmean(
                [g - c for g, c in zip(grids, corrupted, strict=True)], shape
            )
            aggregate["layer_effects"][kind] = _nanmean(
                [_array(r["layer_effects"][kind]) for r in records], (n_layers,)
            )
        names = {"layer": "hidden states", "mlp": "MLP", "attn": "attention"}
        figures = [
            plots.heatmaps(
                [
                    plots.HeatmapPanel(f"{names[k]} (window {windows[k]})", aggregate["indirect_effect"][k])
                    for k in chosen
                ],
                POSITIONS,
                out / "trace_heatmaps.png",
                title=f"causal tracing, {len(records)} cases: average indirect effect on P(o_true)",
                colorbar="restored - corrupted P",
                columns=3,
            ),
            plots.layer_lines(
                {names[k]: aggregate["layer_effects"][k] for k in chosen if k != "layer"}
                or {names[k]: aggregate["layer_effects"][k] for k in chosen},
                out / "trace_layers.png",
                title="indirect effect at the subject's last token",
                ylabel="restored - corrupted P(o_true)",
            ),
        ]
        finish(session, records, _json_ready(aggregate), figures)

    _guarded(body)


# --- 2. contaminating substitution --------------------------------------------------------------------


def _task_prompts(records: Sequence[dict], task: str) -> list[tuple[dict, int]]:
    """(record, prompt index) of every prompt of ``task`` in ``records``."""
    return [(r, i) for r in records for i, m in enumerate(r["metrics"]) if m == task]


def _edited_session(
    name: str,
    data: str,
    model: str,
    method: str,
    preset: str | None,
    params: dict,
    out: Path,
    first: int,
    limit: int | None,
    seed: int,
    options: dict,
) -> Session:
    return start(Setting(name, data, model, out, first, limit, seed, options, method, preset, params))


def _specificity(case: Any) -> Any:
    from attnedit.analysis import specificity_prompts

    sp = specificity_prompts(case, tuple(TASKS))
    if not sp.prompts:
        logger.warning("case %s has no Distract-Neighborhood or Relation prompts: skipped", case.case_id)
    return sp


@app.command("substitute")
def substitute_command(
    data: Data = "sample",
    model: Model = "smollm2-135m",
    method: Method = "rome",
    preset: Preset = None,
    param: Param = None,
    kinds: Annotated[str, typer.Option(help="module kinds substituted: attn,mlp,layer")] = "attn,mlp",
    window: Annotated[int, typer.Option(help="layers substituted together (the paper: 6)")] = 6,
    first: First = 0,
    limit: Limit = None,
    out: Out = Path("runs/analyze/substitute"),
    threads: Threads = None,
    seed: Seed = 0,
    verbose: Verbose = False,
) -> None:
    """Contaminating substitution (SADR section 3.2, figures 3 and 9): edit, record the edited model's module
    outputs on the Distract-Neighborhood and Relation prompts, revert, and run the unedited model with them
    substituted over a window of layers at each token; the effect on P(o_true) and P(o_edit)."""
    overrides = _prepare(verbose, threads, param)

    def body() -> None:
        from attnedit import analysis as A
        from attnedit import plots

        chosen = _kinds(kinds)
        options = {"kinds": list(chosen), "window": window}
        session = _edited_session(
            "substitute", data, model, method, preset, overrides, out, first, limit, seed, options
        )
        bundle = session.bundle

        def compute(case: Any) -> dict:
            sp = _specificity(case)
            if not sp.prompts:
                return {"skipped": "no Distract-Neighborhood or Relation prompts"}
            edit = session.editor.apply(bundle, [case])
            try:
                recorded = A.record_outputs(bundle, sp.prompts, chosen)
            finally:
                edit.revert()
            effects = A.substitute_outputs(bundle, recorded, sp.targets, window, chosen)
            any_kind = effects[chosen[0]]
            return {
                "subject": sp.subject,
                "metrics": sp.metrics,
                "prompts": sp.prompts,
                "targets": sp.targets,
                "tokens": any_kind.tokens,
                "subject_tokens": [
                    _subject_span(bundle, p, sp.subject, len(t))
                    for p, t in zip(sp.prompts, any_kind.tokens, strict=True)
                ],
                "base": any_kind.base,
                "values": {kind: effects[kind].values for kind in chosen},
            }

        records = run_cases(session, compute)
        used = [r for r in records if "skipped" not in r]
        n_layers = bundle.adapter.n_layers
        shape = (len(POSITIONS), n_layers)
        aggregate: dict[str, Any] = {"effects": {}, "base": {}, "n_prompts": {}}
        prompts_of = {task: _task_prompts(used, task) for task in TASKS}
        for task, at in prompts_of.items():
            aggregate["n_prompts"][task] = len(at)
            aggregate["base"][task] = _nanmean([_array(r["base"][i]) for r, i in at], (2,))
        for kind in chosen:
            aggregate["effects"][kind] = {}
            for task, at in prompts_of.items():
                aggregate["effects"][kind][task] = {}
                for t, target in enumerate(TARGETS):
                    grids = [
                        aligned(
                            _array(r["values"][kind][i])[..., t] - r["base"][i][t], *r["subject_tokens"][i]
                        )
                        for r, i in at
                    ]
                    aggregate["effects"][kind][task][target] = _nanmean(grids, shape)
        names = {"layer": "hidden states", "mlp": "MLP", "attn": "attention"}
        figures = [
            plots.heatmaps(
                [
                    plots.HeatmapPanel(
                        f"{TASKS[task]}: effect on P({target})", aggregate["effects"][kind][task][target]
                    )
                    for task in TASKS
                    for target in TARGETS
                ],
                POSITIONS,
                out / f"substitute_{kind}.png",
                title=f"contaminating substitution of edited {names[kind]} outputs (window {window}), "
                f"{len(used)} cases",
                colorbar="substituted - unedited P",
            )
            for kind in chosen
        ]
        finish(session, records, _json_ready(aggregate), figures)

    _guarded(body)


# --- 3. attention drift -------------------------------------------------------------------------------


def correlation_table(correlations: dict[str, dict[str, dict]]) -> str:
    """Markdown table: one row per factor, Pearson r and p with P(o_edit) per task."""
    from attnedit.analysis import FACTORS

    def cell(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    head = "| factor | " + " | ".join(f"{TASKS[t]} r | {TASKS[t]} p" for t in correlations) + " |"
    rule = "|---|" + "---|---|" * len(correlations)
    rows = [head, rule]
    for factor in FACTORS:
        cells = []
        for task in correlations:
            c = correlations[task][factor]
            cells += [cell(c["r"], ".3f"), cell(c["p"], ".2g")]
        rows.append(f"| {factor} | " + " | ".join(cells) + " |")
    n = ", ".join(f"{TASKS[t]}: n = {next(iter(correlations[t].values()))['n']}" for t in correlations)
    return "\n".join(rows) + f"\n\nPearson correlation with the edited model's P(o_edit) per prompt ({n}).\n"


@app.command("drift")
def drift_command(
    data: Data = "sample",
    model: Model = "smollm2-135m",
    method: Method = "rome",
    preset: Preset = None,
    param: Param = None,
    drift_layers: Annotated[
        str | None, typer.Option(help="layers the factors sum over: FIRST-LAST or A,B,C (default: all)")
    ] = None,
    first: First = 0,
    limit: Limit = None,
    out: Out = Path("runs/analyze/drift"),
    threads: Threads = None,
    seed: Seed = 0,
    verbose: Verbose = False,
) -> None:
    """Attention drift (SADR section 3.3, figure 4, tables 2 and 4): per case the unedited and edited
    last-token attention on the Distract-Neighborhood and Relation prompts, the drift factors, and their
    Pearson correlation with the edited P(o_edit) per task."""
    overrides = _prepare(verbose, threads, param)

    def body() -> None:
        import numpy as np

        from attnedit import analysis as A
        from attnedit import plots

        layers = _layers(drift_layers)
        options = {"drift_layers": layers}
        session = _edited_session(
            "drift", data, model, method, preset, overrides, out, first, limit, seed, options
        )
        bundle = session.bundle
        if layers is not None and not all(0 <= x < bundle.adapter.n_layers for x in layers):
            n = bundle.adapter.n_layers
            raise ValueError(f"--drift-layers {drift_layers!r}: the model has {n} layers")

        def compute(case: Any) -> dict:
            sp = _specificity(case)
            keep = [i for i, p in enumerate(sp.prompts) if sp.subject in p]
            for i in sorted(set(range(len(sp.prompts))) - set(keep)):
                logger.warning("case %s: subject not in %s prompt %r: left out", case.case_id, *_at(sp, i))
            if not keep:
                return {"skipped": "no Distract-Neighborhood or Relation prompt containing the subject"}
            prompts = [sp.prompts[i] for i in keep]
            targets = [sp.targets[i] for i in keep]
            unedited = A.record_last_token_attention(bundle, prompts, sp.subject, targets)
            edit = session.editor.apply(bundle, [case])
            try:
                edited = A.record_last_token_attention(bundle, prompts, sp.subject, targets)
            finally:
                edit.revert()
            factors = A.drift_factors(unedited, edited, layers)
            return {
                "subject": sp.subject,
                "metrics": [sp.metrics[i] for i in keep],
                "prompts": prompts,
                "targets": targets,
                "subject_last": unedited.subject_last,
                "p_unedited": unedited.target_probs,
                "p_edited": edited.target_probs,
                "factors": {name: getattr(factors, name) for name in A.FACTORS},
                "factor_layers": factors.layers,
                "kl_per_layer": A.attention_drift(unedited, edited).sum(axis=2),
            }

        records = run_cases(session, compute)
        used = [r for r in records if "skipped" not in r]
        aggregate: dict[str, Any] = {"outcome": "edited P(o_edit)", "correlations": {}, "means": {}}
        points = {}
        for task in TASKS:
            at = _task_prompts(used, task)
            outcome = np.array([r["p_edited"][i][1] for r, i in at], dtype=float)
            factor_values = {f: np.array([r["factors"][f][i] for r, i in at], dtype=float) for f in A.FACTORS}
            aggregate["correlations"][task] = {
                f: A.pearson(values, outcome).to_json() for f, values in factor_values.items()
            }
            aggregate["means"][task] = {
                "n": len(at),
                "p_edit_edited": _nanmean(list(outcome), ()),
                "p_edit_unedited": _nanmean([r["p_unedited"][i][1] for r, i in at], ()),
                **{f: _nanmean(list(v), ()) for f, v in factor_values.items()},
            }
            points[TASKS[task]] = (factor_values["kl"], outcome)
        aggregate = _json_ready(aggregate)
        table = correlation_table(aggregate["correlations"])
        (out / "drift_correlations.md").write_text(table)
        figures = [
            plots.scatter(
                points,
                out / "drift_kl.png",
                title=f"attention drift vs P(o_edit), {len(used)} cases",
                xlabel="attention drift: sum of KL(W || W*)",
                ylabel="edited P(o_edit)",
            )
        ]
        finish(session, records, aggregate, figures)
        typer.echo(table)

    _guarded(body)


def _at(sp: Any, i: int) -> tuple[str, str]:
    return TASKS.get(sp.metrics[i], sp.metrics[i]), sp.prompts[i]


# --- 4. attention patching ----------------------------------------------------------------------------


@app.command("patch")
def patch_command(
    data: Data = "sample",
    model: Model = "smollm2-135m",
    method: Method = "rome",
    preset: Preset = None,
    param: Param = None,
    window: Annotated[int, typer.Option(help="layers patched together (the paper: 10)")] = 10,
    queries: Annotated[str, typer.Option(help="all (whole attention matrices, the paper) | last")] = "all",
    scores: Annotated[
        bool, typer.Option(help="also the single-entry variant: the last token's score on each token")
    ] = False,
    first: First = 0,
    limit: Limit = None,
    out: Out = Path("runs/analyze/patch"),
    threads: Threads = None,
    seed: Seed = 0,
    verbose: Verbose = False,
) -> None:
    """Attention patching (SADR section 3.4, figure 5; --scores: appendix D.2, figure 10): run the edited
    model with the unedited attention over a window of layers; P(o_true) and P(o_edit) against the window
    centre, with the unpatched edited and the unedited levels."""
    overrides = _prepare(verbose, threads, param)

    def body() -> None:
        from attnedit import analysis as A
        from attnedit import plots

        if queries not in A.PATCH_QUERIES:
            raise ValueError(f"--queries must be one of {', '.join(A.PATCH_QUERIES)}, not {queries!r}")
        options = {"window": window, "queries": queries, "scores": scores}
        session = _edited_session(
            "patch", data, model, method, preset, overrides, out, first, limit, seed, options
        )
        bundle = session.bundle

        def compute(case: Any) -> dict:
            sp = _specificity(case)
            if not sp.prompts:
                return {"skipped": "no Distract-Neighborhood or Relation prompts"}
            unedited = A.record_last_token_attention(bundle, sp.prompts, None, sp.targets).target_probs
            recorded = A.record_attention(bundle, sp.prompts)
            edit = session.editor.apply(bundle, [case])
            try:
                curves = A.patch_attention(bundle, recorded, sp.targets, window, queries)
                single = A.patch_attention_scores(bundle, recorded, sp.targets, window) if scores else None
            finally:
                edit.revert()
            record = {
                "subject": sp.subject,
                "metrics": sp.metrics,
                "prompts": sp.prompts,
                "targets": sp.targets,
                "tokens": curves.tokens,
                "p_unedited": unedited,
                "p_edited": curves.base,
                "curves": curves.values,
            }
            if single is not None:
                record["scores"] = single.values
                record["subject_tokens"] = [
                    _subject_span(bundle, p, sp.subject, len(t))
                    for p, t in zip(sp.prompts, curves.tokens, strict=True)
                ]
            return record

        records = run_cases(session, compute)
        used = [r for r in records if "skipped" not in r]
        n_layers = bundle.adapter.n_layers
        aggregate: dict[str, Any] = {"curves": {}, "p_edited": {}, "p_unedited": {}, "n_prompts": {}}
        if scores:
            aggregate["scores"] = {}
        panels, score_panels = [], []
        for task in TASKS:
            at = _task_prompts(used, task)
            aggregate["n_prompts"][task] = len(at)
            curve = _nanmean([_array(r["curves"][i]) for r, i in at], (n_layers, 2))
            edited = _nanmean([_array(r["p_edited"][i]) for r, i in at], (2,))
            unedited = _nanmean([_array(r["p_unedited"][i]) for r, i in at], (2,))
            aggregate["curves"][task] = {target: curve[:, t] for t, target in enumerate(TARGETS)}
            aggregate["p_edited"][task] = {target: edited[t] for t, target in enumerate(TARGETS)}
            aggregate["p_unedited"][task] = {target: unedited[t] for t, target in enumerate(TARGETS)}
            panels.append(
                plots.LinePanel(
                    f"{TASKS[task]} ({len(at)} prompts)",
                    {f"patched P({target})": curve[:, t] for t, target in enumerate(TARGETS)},
                    {
                        **{f"edited P({target})": float(edited[t]) for t, target in enumerate(TARGETS)},
                        **{f"unedited P({target})": float(unedited[t]) for t, target in enumerate(TARGETS)},
                    },
                )
            )
            if scores:
                aggregate["scores"][task] = {}
                for t, target in enumerate(TARGETS):
                    grids = [
                        aligned(_array(r["scores"][i])[..., t] - r["p_edited"][i][t], *r["subject_tokens"][i])
                        for r, i in at
                    ]
                    mean = _nanmean(grids, (len(POSITIONS), n_layers))
                    aggregate["scores"][task][target] = mean
                    score_panels.append(plots.HeatmapPanel(f"{TASKS[task]}: effect on P({target})", mean))
        figures = [
            plots.line_panels(
                panels,
                out / "patch_curves.png",
                title=f"attention patching ({queries} queries, window {window}), {len(used)} cases",
                ylabel="P",
            )
        ]
        if scores:
            figures.append(
                plots.heatmaps(
                    score_panels,
                    POSITIONS,
                    out / "patch_scores.png",
                    title=f"single-entry attention patching (window {window}), {len(used)} cases",
                    colorbar="patched - edited P",
                )
            )
        finish(session, records, _json_ready(aggregate), figures)

    _guarded(body)
