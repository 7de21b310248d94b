"""Typed edit cases and the loaders that turn every supported file format into them.

Formats: ROME/MEMIT CounterFact, the SADR merged CounterFact file, KnowEdit (WikiData_counterfact,
ZsRE), the MEND-format CounterFact, the MEMIT zsRE format and BMIKE-53 CounterFact (bilingual: each
case carries its translation, ``EditCase.translations``). A malformed record raises
``DataFormatError`` naming the file, the record index and the field. Data sets by name:
``core.datasets``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any  # parsed JSON (what json.loads returns): each reader checks the shape it needs

from attnedit.core.datasets import DATASETS, dataset_files, resolve
from attnedit.core.download import sha256_of
from attnedit.core.tokens import SubjectNotFoundError, fill_prompt

logger = logging.getLogger(__name__)


class DataFormatError(ValueError):
    """A record does not have the shape its format requires."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt`` contains ``subject`` (or a ``{}`` slot); o_new replaces o_true."""

    prompt: str
    subject: str
    target_new: str
    target_true: str

    @property
    def text(self) -> str:
        """The prompt with the subject filled in (a prompt without a ``{}`` slot is its own text)."""
        # a plain prompt is returned as it is, without looking for the subject: the request of a
        # translation (``EditCase.translations``) may lack its subject, and its text is still its prompt
        return fill_prompt(self.prompt, self.subject)[0] if "{}" in self.prompt else self.prompt

    @property
    def edit_sentence(self) -> str:
        """``"{prompt} {o_new}."``: prepended to prompts in the distracted tasks."""
        return f"{self.text} {self.target_new}."


@dataclass(frozen=True)
class Probe:
    """A prompt and its expected answer (``aliases`` are other accepted spellings)."""

    prompt: str
    target: str
    aliases: tuple[str, ...] = ()
    # the probe's key in its record where the format groups probes (KnowEdit portability: Reasoning,
    # Subject_Aliasing, Logical_Generalization; locality: Relation_Specificity, Forgetfulness); "" = none.
    # KnowEdit's metrics average within each key first (``metrics.knowedit_case_value``)
    kind: str = ""


@dataclass(frozen=True)
class CommonsenseProbe:
    goal: str
    right: str
    wrong: str


@dataclass(frozen=True)
class EditCase:
    """An edit request with every probe set used to evaluate it."""

    case_id: str
    request: EditRequest
    rewrite: tuple[Probe, ...]  # ES: the request prompt(s), target o_new
    paraphrase: tuple[Probe, ...] = ()
    reasoning: tuple[Probe, ...] = ()
    subject_alias: tuple[Probe, ...] = ()
    neighborhood: tuple[Probe, ...] = ()
    relation: tuple[Probe, ...] = ()
    commonsense: tuple[CommonsenseProbe, ...] = ()
    generation: tuple[str, ...] = ()
    portability: tuple[Probe, ...] = ()  # KnowEdit
    locality: tuple[Probe, ...] = ()  # KnowEdit
    source: str = ""  # "file#index"
    language: str = ""  # ISO 639 code of the case's texts; "" = unknown (monolingual data)
    # the same fact in other languages (language -> a complete case without translations of its own);
    # the evaluator scores them too, under ``METRIC@LANG`` keys. Not hashed: a dict is not hashable.
    translations: dict[str, EditCase] = field(default_factory=dict, hash=False)

    @property
    def languages(self) -> tuple[str, ...]:
        """The case's own language, then its translations' (sorted); () for a case without a language."""
        return (self.language, *sorted(self.translations)) if self.language else ()

    def in_language(self, lang: str) -> EditCase:
        """The case in language ``lang``: itself for ``""`` or its own language, else its translation."""
        if lang in ("", self.language):
            return self
        if lang not in self.translations:
            have = ", ".join(self.languages) or "none (monolingual case)"
            raise ValueError(f"case {self.case_id!r} has no {lang!r} version; its languages: {have}")
        return self.translations[lang]


@dataclass
class Dataset:
    """Cases loaded from one file, with what the run manifest records about it."""

    path: str
    format: str
    sha256: str
    cases: list[EditCase] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # errors of records left out with skip_invalid
    # multilingual data only (the run manifest records these when ``language`` is set)
    language: str = ""  # the edit language: every case's own language
    question_template: str | None = None  # what wrapped every question prompt ("{}" = the plain question)
    # language -> ids of the cases whose request prompt in that language lacks the subject (translations
    # only: an edit-language prompt without its subject is an invalid record); every translation language
    subject_missing: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cases)


class _Record:
    """Field access on one raw record that names file, index and field in every error."""

    def __init__(self, raw: object, where: str):
        if not isinstance(raw, dict):
            raise DataFormatError(f"{where}: record is {type(raw).__name__}, expected an object")
        self.raw, self.where = raw, where

    def fail(self, field_name: str, problem: str) -> DataFormatError:
        return DataFormatError(f"{self.where}: field {field_name!r}: {problem}")

    def get(self, dotted: str, required: bool = True) -> Any:
        node: Any = self.raw
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                if required:
                    raise self.fail(dotted, "missing")
                return None
            node = node[part]
        return node

    def text(self, dotted: str, required: bool = True) -> str:
        value = self.get(dotted, required)
        if value is None and not required:
            return ""
        if not isinstance(value, str) or not value.strip():
            raise self.fail(dotted, f"expected a non-empty string, got {value!r}")
        return value

    def texts(self, dotted: str) -> list[str]:
        value = self.get(dotted)
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise self.fail(dotted, "expected a list of non-empty strings")
        return value

    def probes(self, key: str, default_target: str | None = None) -> tuple[Probe, ...]:
        """Merged-format ``{"prompts": [...], "targets": [...]}`` probe sets (absent -> empty)."""
        if key not in self.raw:
            return ()
        prompts = self.texts(f"{key}.prompts")
        if default_target is not None and "targets" not in self.raw[key]:
            targets = [default_target] * len(prompts)
        else:
            targets = self.texts(f"{key}.targets")
        if len(targets) != len(prompts):
            raise self.fail(f"{key}.targets", f"{len(targets)} targets for {len(prompts)} prompts")
        return tuple(Probe(p, t) for p, t in zip(prompts, targets, strict=True))

    def answers(self, dotted: str, value: object) -> tuple[str, ...]:
        """KnowEdit answers: a string, a list of strings, or a list of alias lists (first answer kept)."""
        if isinstance(value, str) and value.strip():
            return (value,)
        if isinstance(value, list) and value:
            first = value[0]
            if isinstance(first, list) and first and all(isinstance(v, str) for v in first):
                return tuple(first)
            if all(isinstance(v, str) for v in value) and value[0].strip():
                return tuple(value)
        raise self.fail(dotted, f"expected an answer string or list of aliases, got {value!r}")

    def request(self, prompt: str, subject: str, new: str, true: str) -> EditRequest:
        request = EditRequest(
            prompt=self.text(prompt), subject=self.text(subject), target_new=self.text(new), target_true=true
        )
        return self.editable(request, prompt, new)

    def editable(self, request: EditRequest, prompt: str, new: str) -> EditRequest:
        """``request`` when it can be edited (subject in the prompt, o_new not o_true), else the error
        naming the field ``prompt`` or ``new`` it was read from."""
        try:
            fill_prompt(request.prompt, request.subject)
        except SubjectNotFoundError as err:
            raise self.fail(prompt, str(err)) from None
        # the same test as editing.base.validate_request, here so that --skip-invalid can skip it
        true = request.target_true
        if true and request.target_new.strip().lower() == true.strip().lower():
            raise self.fail(new, f"equals target_true ({request.target_new!r}): nothing to edit")
        return request


def _merged(rec: _Record, case_id: str) -> EditCase:
    req = rec.request(
        "requested_rewrite.prompt",
        "requested_rewrite.subject",
        "requested_rewrite.target_new",
        rec.text("requested_rewrite.target_true"),
    )
    rewrite = rec.probes("rewrite", default_target=req.target_new) or (Probe(req.text, req.target_new),)
    commonsense: tuple[CommonsenseProbe, ...] = ()
    if "o-commonsense" in rec.raw:
        goal = rec.get("o-commonsense.prompts")
        goals = [goal] if isinstance(goal, str) else goal
        if not isinstance(goals, list) or not goals or not all(isinstance(g, str) for g in goals):
            raise rec.fail("o-commonsense.prompts", "expected a string or a list of strings")
        right, wrong = rec.text("o-commonsense.right"), rec.text("o-commonsense.wrong")
        commonsense = tuple(CommonsenseProbe(g, right, wrong) for g in goals)
    generation = tuple(rec.texts("generation.prompts")) if "generation" in rec.raw else ()
    return EditCase(
        case_id=case_id,
        request=req,
        rewrite=tuple(Probe(p.prompt, req.target_new) for p in rewrite),
        paraphrase=rec.probes("p-paraphrase"),
        reasoning=rec.probes("p-reasoning"),
        subject_alias=rec.probes("p-subject_alias"),
        neighborhood=rec.probes("l-neighbor"),
        relation=rec.probes("l-relation"),
        commonsense=commonsense,
        generation=generation,
    )


def _counterfact(rec: _Record, case_id: str) -> EditCase:
    """ROME's and MEMIT's CounterFact record: the request (its objects as ``{"str": ...}``), paraphrase
    prompts (answer o_new), neighbourhood prompts (other subjects, answer o_true) and generation prompts.
    (Its ``attribute_prompts`` serve ROME's generation consistency, which attnedit does not compute.)"""
    req = rec.request(
        "requested_rewrite.prompt",
        "requested_rewrite.subject",
        "requested_rewrite.target_new.str",
        rec.text("requested_rewrite.target_true.str"),
    )
    return EditCase(
        case_id=case_id,
        request=req,
        rewrite=(Probe(req.text, req.target_new),),
        paraphrase=tuple(Probe(p, req.target_new) for p in rec.texts("paraphrase_prompts")),
        neighborhood=tuple(Probe(p, req.target_true) for p in rec.texts("neighborhood_prompts")),
        generation=tuple(rec.texts("generation_prompts")) if "generation_prompts" in rec.raw else (),
    )


def _knowedit_probes(rec: _Record, key: str) -> tuple[tuple[str, tuple[Probe, ...]], ...]:
    block = rec.get(key, required=False) or {}
    if not isinstance(block, dict):
        raise rec.fail(key, "expected an object of probe lists")
    out = []
    for kind, items in block.items():
        if not isinstance(items, list):
            raise rec.fail(f"{key}.{kind}", "expected a list")
        probes = []
        for j, item in enumerate(items):
            where = f"{key}.{kind}[{j}]"
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise rec.fail(f"{where}.prompt", "missing or not a string")
            answers = rec.answers(f"{where}.ground_truth", item.get("ground_truth"))
            probes.append(Probe(item["prompt"], answers[0], answers[1:], kind=kind))
        out.append((kind, tuple(probes)))
    return tuple(out)


def _knowedit(rec: _Record, case_id: str) -> EditCase:
    true = rec.answers("ground_truth", rec.get("ground_truth"))[0]
    req = rec.request("prompt", "subject", "target_new", true)
    rephrase = rec.get("rephrase", required=False) or rec.get("rephrase_prompt", required=False)
    if rephrase is not None and not isinstance(rephrase, str):
        raise rec.fail("rephrase", "expected a string")
    portability = _knowedit_probes(rec, "portability")
    locality = _knowedit_probes(rec, "locality")
    return EditCase(
        case_id=case_id,
        request=req,
        rewrite=(Probe(req.text, req.target_new),),
        paraphrase=(Probe(rephrase, req.target_new),) if rephrase else (),
        subject_alias=next((p for k, p in portability if k == "Subject_Aliasing"), ()),
        portability=tuple(p for _, probes in portability for p in probes),
        locality=tuple(p for _, probes in locality for p in probes),
    )


def _mend_counterfact(rec: _Record, case_id: str) -> EditCase:
    req = rec.request("prompt", "subject", "target_new", rec.text("ground_truth"))
    return EditCase(
        case_id=case_id,
        request=req,
        rewrite=(Probe(req.text, req.target_new),),
        paraphrase=(Probe(rec.text("rephrase_prompt"), req.target_new),),
        neighborhood=(Probe(rec.text("locality_prompt"), rec.text("locality_ground_truth")),),
    )


def _memit_zsre(rec: _Record, case_id: str) -> EditCase:
    answers = rec.get("answers")
    if not isinstance(answers, list) or not answers or not isinstance(answers[0], str):
        raise rec.fail("answers", "expected a non-empty list of strings")
    req = rec.request("src", "subject", "alt", answers[0])
    return EditCase(
        case_id=case_id,
        request=req,
        rewrite=(Probe(req.text, req.target_new),),
        paraphrase=(Probe(rec.text("rephrase"), req.target_new),),
        locality=(Probe(rec.text("loc"), rec.text("loc_ans")),),
    )


BMIKE53 = "bmike53"
# the fields of each language's side of a BMIKE-53 record
BMIKE53_FIELDS = ("src", "rephrase", "old", "alt", "loc", "loc_ans", "port", "port_ans")
BMIKE53_LANGUAGE = "en"  # the default edit language of BMIKE-53 data
# wraps every BMIKE-53 prompt by default ("{}" = the plain question): SmolLM2 answers the wrapped questions
# more often (docs/benchmarks.md, "BMIKE-53 prompts: the question wrapper")
DEFAULT_QUESTION_TEMPLATE = "Question: {} Answer:"
_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})?")


def _is_bilingual(record: object) -> bool:
    """A BMIKE-53 record: exactly two keys, both language codes, each an object with a question
    (``src``) and its two answers (``alt``, ``old``)."""
    return (
        isinstance(record, dict)
        and len(record) == 2
        and all(isinstance(k, str) and _LANGUAGE_CODE.fullmatch(k) for k in record)
        and all(isinstance(v, dict) and {"src", "alt", "old"} <= v.keys() for v in record.values())
    )


def question_wrapper(template: str) -> Callable[[str], str]:
    """The function that puts a question into ``template`` (its one ``{}``); ``ValueError`` otherwise."""
    if template.count("{}") != 1:
        raise ValueError(f"question template {template!r} needs exactly one {{}} (the question's place)")
    before, after = template.split("{}")
    return lambda question: before + question + after


def _subject_as_written(prompt: str, subject: str) -> str:
    """``subject`` as the prompt spells it: BMIKE-53 capitalises a subject on its own ("The U-Men") but
    not inside a question ("... was the U-Men founded?"), so a match that differs only in case takes the
    prompt's spelling. Unchanged when there is no such match (the caller then decides)."""
    if subject in prompt or len(prompt.lower()) != len(prompt) or len(subject.lower()) != len(subject):
        return subject  # (lower() keeps offsets only where it keeps lengths)
    start = prompt.lower().find(subject.lower())
    return subject if start < 0 else prompt[start : start + len(subject)]


def _bmike53_side(rec: _Record, lang: str, wrap: Callable[[str], str], primary: bool) -> EditCase:
    """One language's side of a BMIKE-53 record as a case. The edit language's request must be editable
    (``_Record.editable``); a translation's request is built as it is, its subject possibly absent from
    its prompt (what ``Dataset.subject_missing`` lists)."""
    text = {name: rec.text(f"{lang}.{name}") for name in ("subject", *BMIKE53_FIELDS)}
    src = wrap(text["src"])
    request = EditRequest(
        prompt=src,
        subject=_subject_as_written(text["src"], text["subject"]),  # the question's, not the wrapper's
        target_new=text["alt"],
        target_true=text["old"],
    )
    if primary:
        request = rec.editable(request, f"{lang}.src", f"{lang}.alt")
    case_id = rec.get(f"{lang}.case_id", required=False)
    return EditCase(
        case_id="" if case_id is None else str(case_id),
        request=request,
        rewrite=(Probe(src, text["alt"]),),
        paraphrase=(Probe(wrap(text["rephrase"]), text["alt"]),),
        neighborhood=(Probe(wrap(text["loc"]), text["loc_ans"]),),
        portability=(Probe(wrap(text["port"]), text["port_ans"]),),
        language=lang,
    )


def _bmike53(
    rec: _Record,
    case_id: str,
    language: str = BMIKE53_LANGUAGE,
    question_template: str = DEFAULT_QUESTION_TEMPLATE,
) -> EditCase:
    """A BMIKE-53 record: the side in ``language`` is the case, the other side its translation. The
    case id is the record's ``case_id`` (``case_id``, the record index, where it has none)."""
    if language not in rec.raw:
        raise rec.fail(language, f"missing: the record's languages are {', '.join(map(str, rec.raw))}")
    others = [key for key in rec.raw if key != language]
    if len(others) != 1 or not _LANGUAGE_CODE.fullmatch(str(others[0])):
        raise rec.fail(str(others), f"expected one other language code beside {language!r}")
    other = others[0]
    wrap = question_wrapper(question_template)
    case = _bmike53_side(rec, language, wrap, primary=True)
    translation = _bmike53_side(rec, other, wrap, primary=False)
    if case.case_id and translation.case_id and case.case_id != translation.case_id:
        problem = f"{translation.case_id!r} differs from the {language!r} side's {case.case_id!r}"
        raise rec.fail(f"{other}.case_id", problem)
    case_id = case.case_id or translation.case_id or case_id
    return replace(case, case_id=case_id, translations={other: replace(translation, case_id=case_id)})


# format name -> (keys that identify it, record parser); BMIKE-53 is told by its shape (``_is_bilingual``)
FORMATS: dict[str, tuple[frozenset[str], Callable[[_Record, str], EditCase]]] = {
    "counterfact": (
        frozenset({"requested_rewrite", "paraphrase_prompts", "neighborhood_prompts"}),
        _counterfact,
    ),
    "merged": (frozenset({"requested_rewrite"}), _merged),
    "knowedit": (frozenset({"subject", "prompt", "target_new", "ground_truth", "locality"}), _knowedit),
    "mend_counterfact": (
        frozenset({"prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt"}),
        _mend_counterfact,
    ),
    "memit_zsre": (frozenset({"src", "subject", "alt", "answers", "rephrase", "loc"}), _memit_zsre),
    BMIKE53: (frozenset(), _bmike53),
}

SAMPLE_DATA = "sample"  # name of the shipped sample set


def sample_path() -> Path:
    """Path of the sample set shipped in the package (written for attnedit, merged format)."""
    return Path(str(resources.files("attnedit") / "resources" / "sample_counterfact.json"))


FORMAT_TITLES = {
    "counterfact": "ROME/MEMIT CounterFact",
    "merged": "SADR's merged CounterFact",
    "knowedit": "KnowEdit WikiData_counterfact / ZsRE",
    "mend_counterfact": "MEND/EasyEdit CounterFact",
    "memit_zsre": "MEMIT/MEND zsRE",
    BMIKE53: "BMIKE-53, bilingual",
}
"""Each format ``load_cases`` reads, as errors name it."""


def _foreign_format(record: object) -> str | None:
    """What a record of a well-known format that holds no single edit request is, else None."""
    if isinstance(record, str):
        return "a text corpus (one text per record)"
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("requested_rewrite"), list):
        return "MQuAKE-style data (a list of rewrites per record, multi-hop questions)"
    if {"known_id", "attribute", "template"} <= record.keys():
        return "ROME's known facts (facts a model knows, for tracing; no edit request)"
    if {"goal", "sol1", "sol2"} <= record.keys():
        return "PIQA questions (commonsense; no edit request)"
    if set(record) <= {"text", "Text", "Corpus", "id", "title"} and ({"text", "Text"} & record.keys()):
        return "a text corpus (one text per record)"
    return None


def _formats_read() -> str:
    return "; ".join(f"{name} ({title})" for name, title in FORMAT_TITLES.items())


def detect_format(record: object, where: str) -> str:
    """The format of a data file from its first record (``where``: that record, for the error). A record
    of a well-known format we do not read is refused as that format, never as a missing field."""
    foreign = _foreign_format(record)
    if foreign is not None:
        raise DataFormatError(
            f"{where}: this is {foreign}, which attnedit does not read as edit cases; it reads: "
            f"{_formats_read()}"
        )
    if _is_bilingual(record):
        return BMIKE53
    if isinstance(record, dict):
        for name, (keys, _) in FORMATS.items():
            if keys and keys <= record.keys():
                return name
    found = f"an object with keys {sorted(record)}" if isinstance(record, dict) else type(record).__name__
    raise DataFormatError(f"{where}: cannot tell the format of {found}; attnedit reads: {_formats_read()}")


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes."""
    return sha256_of(Path(path))


def _read_text(file: Path) -> str:
    """A data file's text; a file that is not UTF-8 is an error naming it."""
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _parse_json(text: str, file: Path, line: int | None = None) -> Any:
    """JSON of a whole file (``line`` None) or of line ``line`` of a JSON-lines file; an error names
    the file and the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        at = (
            f"line {line}, column {err.colno}"
            if line is not None
            else f"line {err.lineno}, column {err.colno}"
        )
        raise DataFormatError(f"{file}: invalid JSON at {at}: {err.msg}") from None


def _json_lines(text: str, file: Path) -> list[tuple[int, Any]]:
    """(line number, record) of each non-empty line of a JSON-lines file."""
    return [
        (i + 1, _parse_json(line, file, i + 1)) for i, line in enumerate(text.splitlines()) if line.strip()
    ]


def load_cases(
    path: str | Path,
    format: str | None = None,
    skip_invalid: bool = False,
    language: str | None = None,
    question_template: str | None = None,
) -> Dataset:
    """Load every case of a data file: a path, a registered data set's name (``core.datasets``: found
    in ``$ATTNEDIT_DATA``, the cache, or downloaded), or ``"sample"``, the shipped sample set.

    A malformed record raises ``DataFormatError``; with ``skip_invalid`` it is left out, logged, and
    listed in ``Dataset.skipped`` (which the run manifest records).

    Multilingual (BMIKE-53) data only: ``language`` is the edit language, the side of each record that
    becomes the case (default ``"en"``); the other side is its translation. ``question_template`` wraps
    every prompt, ``{}`` being the question (default ``DEFAULT_QUESTION_TEMPLATE``; ``"{}"``: the plain
    questions). Cases whose translation's prompt lacks the subject are kept and listed in
    ``Dataset.subject_missing``. Other formats refuse both settings.
    """
    file = sample_path() if str(path) == SAMPLE_DATA else resolve(path)
    registered = DATASETS.get(str(path))
    if registered is not None and file == Path(path):
        registered = None  # a file of that name: the file
    if registered is not None and registered.format not in FORMATS:
        raise DataFormatError(
            f"data set {registered.name!r} holds {registered.title} (format {registered.format}), not edit "
            f"cases; edit-case sets: {', '.join(n for n, d in DATASETS.items() if d.format in FORMATS)}"
        )
    format = format or (registered.format if registered is not None else None)
    text = _read_text(file)
    if file.suffix == ".jsonl":
        numbered = _json_lines(text, file)
        raw = [record for _, record in numbered]
        wheres = [f"{file}[line {n}]" for n, _ in numbered]  # errors name the file's own line numbers
    else:
        raw = _parse_json(text, file)
        wheres = [f"{file}[{i}]" for i in range(len(raw))] if isinstance(raw, list) else []
    if not isinstance(raw, list) or not raw:
        raise DataFormatError(f"{file}: expected a non-empty JSON list of records")
    name = format or detect_format(raw[0], wheres[0])
    if name not in FORMATS:
        raise DataFormatError(f"{file}: unknown format {name!r}; known formats: {', '.join(FORMATS)}")
    parse = FORMATS[name][1]
    multilingual: dict[str, str] = {}
    if name == BMIKE53:
        language = language or BMIKE53_LANGUAGE
        question_template = DEFAULT_QUESTION_TEMPLATE if question_template is None else question_template
        question_wrapper(question_template)  # a bad template is refused before any record is read
        if isinstance(raw[0], dict) and language not in raw[0]:
            have = ", ".join(map(str, raw[0])) if _is_bilingual(raw[0]) else "none"
            raise ValueError(f"{file}: no {language!r} side to edit in; the data's languages: {have}")
        parse = partial(_bmike53, language=language, question_template=question_template)
        multilingual = {"language": language, "question_template": question_template}
    elif language is not None or question_template is not None:
        given = "an edit language" if language is not None else "a question template"
        raise ValueError(f"{file}: {given} applies to multilingual ({BMIKE53}) data only, not {name!r} data")
    cases, skipped, seen = [], [], set()
    for index, item in enumerate(raw):
        try:
            rec = _Record(item, wheres[index])
            case = parse(rec, str(item.get("case_id", index)))
            if case.case_id in seen:
                raise rec.fail("case_id", f"duplicate case_id {case.case_id!r}")
            seen.add(case.case_id)
        except DataFormatError as err:
            if not skip_invalid:
                raise
            skipped.append(str(err))
            continue
        cases.append(_with_source(case, f"{file.name}#{index}"))
    if skipped:
        logger.warning("%s: skipped %d malformed records, first: %s", file, len(skipped), skipped[0])
    dataset = Dataset(path=str(file), format=name, sha256=file_sha256(file), cases=cases, skipped=skipped)
    if multilingual:
        dataset.language = multilingual["language"]
        dataset.question_template = multilingual["question_template"]
        dataset.subject_missing = subject_missing(cases)
        counts = "; ".join(f"{lang}: {len(ids)}" for lang, ids in dataset.subject_missing.items())
        logger.log(
            logging.WARNING if any(dataset.subject_missing.values()) else logging.INFO,
            "%s: cases whose translated prompt lacks the subject (kept, evaluated as usual, listed in the "
            "manifest): %s of %d",
            file,
            counts,
            len(cases),
        )
    return dataset


def _with_source(case: EditCase, source: str) -> EditCase:
    """``case`` (and its translations: the same record) with its ``source``."""
    if case.translations:
        translations = {lang: replace(t, source=source) for lang, t in case.translations.items()}
        return replace(case, source=source, translations=translations)
    return replace(case, source=source)


def subject_missing(cases: list[EditCase]) -> dict[str, list[str]]:
    """Per translation language (sorted), the ids of the cases whose request prompt in that language
    does not contain the subject (the test the edit language's requests must pass)."""
    missing: dict[str, list[str]] = {}
    for case in cases:
        for lang in case.languages[1:]:
            request = case.translations[lang].request
            ids = missing.setdefault(lang, [])
            try:
                fill_prompt(request.prompt, request.subject)
            except SubjectNotFoundError:
                ids.append(case.case_id)
    return dict(sorted(missing.items()))


def corpus_path(name: str | Path) -> Path:
    """A text corpus by name: ``"sample"`` is the shipped PPL corpus, anything else a file path."""
    if str(name) == SAMPLE_DATA:
        return sample_path().with_name("sample_ppl_corpus.json")
    return Path(name)


def load_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Texts of a corpus (a file path or a registered data set's name): a JSON list (strings or objects
    with ``text``/``Text``), JSON lines (the same per line), or plain text (one text per non-empty
    line). Used for PPL and statistics."""
    file = resolve(path)

    def text_of(record: object, where: str) -> str:
        if isinstance(record, dict):
            record = record.get("text", record.get("Text"))
        if not isinstance(record, str) or not record.strip():
            raise DataFormatError(f"{where}: text is empty, missing or not a string")
        return record

    if file.suffix == ".json":
        raw = _parse_json(_read_text(file), file)
        if not isinstance(raw, list):
            raise DataFormatError(f"{file}: expected a JSON list of texts")
        texts = [text_of(r, f"{file}[{i}]") for i, r in enumerate(raw[:limit] if limit else raw)]
    elif file.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(_read_text(file).splitlines()):
            if line.strip():
                texts.append(text_of(_parse_json(line, file, i + 1), f"{file}[line {i + 1}]"))
                if limit and len(texts) >= limit:
                    break
    else:
        texts = [line.strip() for line in _read_text(file).splitlines() if line.strip()]
    return texts[:limit] if limit else texts


# -- general-ability data (read by a stream's checkpoints; not edit cases) --------------------------------


@dataclass(frozen=True)
class PiqaQuestion:
    """One PIQA question: the goal, its two solutions and the index (0 or 1) of the right one."""

    index: int
    goal: str
    solutions: tuple[str, str]
    label: int


@dataclass(frozen=True)
class KnownFact:
    """One of ROME's known facts: a prompt the model completes (``prompt``) with ``attribute``."""

    index: int
    subject: str
    prompt: str
    attribute: str


def _piqa_labels(questions: Path) -> Path | None:
    """The labels file of a PIQA questions file: the registered set's second file, or beside the file as
    ``NAME_labels.lst`` / ``NAME-labels.lst`` (upstream: ``valid.jsonl`` and ``valid-labels.lst``)."""
    for name in (f"{questions.stem}_labels.lst", f"{questions.stem}-labels.lst"):
        if (questions.parent / name).is_file():
            return questions.parent / name
    return None


def load_piqa(spec: str | Path = "piqa", limit: int | None = None) -> list[PiqaQuestion]:
    """PIQA questions with their labels: a registered name (``piqa``: the validation split, questions and
    labels files) or a JSON-lines file of ``goal``/``sol1``/``sol2`` records whose labels are a ``label``
    field in each record or a labels file beside it (``NAME_labels.lst``, one 0/1 per line)."""
    name = str(spec)
    if not Path(name).is_file() and name in DATASETS:
        questions, *rest = dataset_files(name)
        labels_file: Path | None = rest[0] if rest else None
    else:
        questions = resolve(spec)
        labels_file = _piqa_labels(questions)
    records = _json_lines(_read_text(questions), questions)
    labels: list[str] | None = None
    if labels_file is not None:
        labels = [line.strip() for line in _read_text(labels_file).splitlines() if line.strip()]
        if len(labels) != len(records):
            raise DataFormatError(
                f"{labels_file}: {len(labels)} labels for the {len(records)} questions of {questions}"
            )
    out: list[PiqaQuestion] = []
    for k, (line, raw_record) in enumerate(records[:limit] if limit else records):
        where = f"{questions}[line {line}]"
        record = _Record(raw_record, where)
        raw: object = labels[k] if labels is not None else record.get("label", required=False)
        if str(raw) not in ("0", "1"):
            source = f"{labels_file} line {k + 1}" if labels is not None else f"{where}: field 'label'"
            raise DataFormatError(
                f"{source}: a PIQA label is 0 or 1, not {raw!r}"
                + ("" if labels is not None else f" (or put the labels in {questions.stem}_labels.lst)")
            )
        solutions = (record.text("sol1"), record.text("sol2"))
        out.append(PiqaQuestion(k, record.text("goal"), solutions, int(str(raw))))
    return out


def load_known_facts(spec: str | Path = "rome-known", limit: int | None = None) -> list[KnownFact]:
    """ROME's known facts (a registered name, ``rome-known``, or a JSON list of records with ``subject``,
    ``prompt`` and ``attribute``)."""
    file = resolve(spec)
    raw = _parse_json(_read_text(file), file)
    if not isinstance(raw, list):
        raise DataFormatError(f"{file}: expected a JSON list of known facts")
    facts = []
    for k, raw_record in enumerate(raw[:limit] if limit else raw):
        record = _Record(raw_record, f"{file}[{k}]")
        facts.append(KnownFact(k, record.text("subject"), record.text("prompt"), record.text("attribute")))
    return facts
