"""The per-case record of an evaluation: what ``Evaluator`` computes, the runner adds to, ``results.jsonl``
stores (one JSON object a line), and ``metrics.summarize``/``paired_difference`` and reports read.

Records stay plain dicts (``TypedDict``s), so a line on disk is exactly ``json.dumps`` of the record and
reading one back is ``json.loads``: the types name and document the keys, they change no byte. Keys that
only some stages or some cases write are ``NotRequired``; the stage that writes each is noted beside it.
"""

# no ``from __future__ import annotations``: TypedDict reads NotRequired off evaluated annotations only
from typing import NotRequired, TypedDict


class ComparisonNLLs(TypedDict):
    """One comparison metric of one case: per prompt, the mean NLL of the right and the wrong answer
    (``right_nll[i]`` and ``wrong_nll[i]`` belong to the same prompt)."""

    right_nll: list[float]
    wrong_nll: list[float]


class Perplexity(TypedDict):
    """Summed NLL and token count of the perplexity corpus on the model the case was evaluated on."""

    nll: float
    tokens: int


class EditInfo(TypedDict, total=False):
    """What the editing method reported for the case's request (single and batch mode, when it reports)."""

    steps: int
    final_loss: float
    loss_parts: dict[str, float | list[float]]  # a loss term's diagnostics may be vectors


class Reference(TypedDict):
    """What KnowEdit locality compares against, taken on the unedited model (``Evaluator.reference``):
    per locality probe, the argmax token ids over its target."""

    locality_argmax: list[list[int]]


class CaseRecord(TypedDict):
    """One case's line of ``results.jsonl``, keys in the order they are written.

    Multilingual data (cases with translations, ``EditCase.translations``): ``comparisons`` and
    ``knowedit`` also hold each translation's metrics under ``METRIC@LANG`` keys (``ES@fr``, ``PS@fr``,
    ``NS@fr``, ``KE_PORT@fr``, ...), after the edit language's own (the plain keys), languages in the
    order of ``EditCase.languages``. KnowEdit locality (``KE_LOC``) is the edit language's only. Records
    of monolingual cases have no ``@`` key.
    """

    # Evaluator.score
    case_id: str
    source: str  # "file#index"
    comparisons: dict[str, ComparisonNLLs]  # metric (ES, PS, ...; metrics.COMPARISON_METRICS; ES@fr) -> NLLs
    knowedit: NotRequired[dict[str, list[float]]]  # KE_EDIT, ...: per-probe token accuracy; only if any
    # KE_PORT, KE_LOC, ... whose probes have keys (KnowEdit's Reasoning, Relation_Specificity, ...): per
    # probe, its key, parallel to ``knowedit[metric]``; a metric without an entry has one key per case
    knowedit_keys: NotRequired[dict[str, list[str]]]
    knowedit_protocol: NotRequired[
        str
    ]  # with ``knowedit``: metrics.KNOWEDIT_PROTOCOL (absent: scored before it)
    seconds_scoring: NotRequired[float]
    # the generation scores (EvalConfig.generation_score; absent when off and in records made before it):
    # per score (metrics.GENERATION_METRICS; GES@fr), per prompt 1.0 when the model's greedy continuation
    # starts with the target (metrics.generation_hit), else 0.0; the continuations, parallel to them
    generation_score: NotRequired[dict[str, list[float]]]
    generated_answers: NotRequired[dict[str, list[str]]]
    seconds_generation_score: NotRequired[float]  # the case's decoding batch
    ppl: NotRequired[Perplexity]  # with a perplexity corpus only
    # the runner (runs.runner): the case's share of its edit, the evaluation time, the edit's report
    seconds_eval: NotRequired[float]
    seconds_edit: NotRequired[float]  # NaN for an edit re-applied from a file that lacks its time
    edit: NotRequired[EditInfo]  # single and batch mode
    edits_applied: NotRequired[int]  # sequential mode: edits on the model when the case was evaluated
    # the runner: what the record was computed with (a resumed run refuses a record that differs; records
    # written before these keys existed lack them)
    method: NotRequired[str]  # the editor's name (manifest "method")
    hparams_hash: NotRequired[str]  # rundir.short_hash of the manifest's "hyperparameters"
    request_hash: NotRequired[str]  # rundir.short_hash of the case's edit request (prompt, subject, targets)
    # Evaluator.add_fluency (with fluency on, for cases with fluency prompts)
    fluency: NotRequired[list[float]]  # per generation: n-gram entropy (metrics.ngram_entropy)
    generations: NotRequired[list[str]]  # prompt + generated text
    seconds_generation: NotRequired[float]  # the decoding batch's time divided among its cases
    # Evaluator.add_fluency, KnowEdit's fluency (KE_FLU; cases with KnowEdit probes): per rewrite prompt,
    # the n-gram entropy of its top-k sampled text and the text (prompt + continuation)
    knowedit_fluency: NotRequired[list[float]]
    knowedit_generations: NotRequired[list[str]]


class MetricEntry(TypedDict):
    """One pooled number of a summary: mean, 95% half-width (None where undefined) and count."""

    mean: float | None
    ci95: float | None
    n: int
    protocol: NotRequired[str]  # KE_ entries: the protocol that defines them (metrics.KNOWEDIT_PROTOCOL)


Summary = dict[str, MetricEntry]  # metric name (ES, EM, AvgS, FL, PPL, KE_EDIT, GES, ES@fr, ...) -> entry


class PairedDifference(TypedDict):
    """One score of ``metrics.paired_difference``: rates in percent, differences in points, relative ones
    in percent of ``base``, each difference with its 95% interval."""

    base: float
    other: float
    diff: float
    diff_ci: list[float]
    relative: float | None
    relative_ci: list[float] | None
    cases: int
    prompts: int
