"""Typed edit cases and the loaders that turn every supported file format into them.

Formats: the SADR merged CounterFact file, KnowEdit (WikiData_counterfact, ZsRE), the MEND-format
CounterFact and the MEMIT zsRE format. A malformed record raises ``DataFormatError`` naming the
file, the record index and the field.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

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
        """The prompt with the subject filled in."""
        return fill_prompt(self.prompt, self.subject)[0]

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


@dataclass
class Dataset:
    """Cases loaded from one file, with what the run manifest records about it."""

    path: str
    format: str
    sha256: str
    cases: list[EditCase] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # errors of records left out with skip_invalid

    def __len__(self) -> int:
        return len(self.cases)


class _Record:
    """Field access on one raw record that names file, index and field in every error."""

    def __init__(self, raw: Any, where: str):
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

    def answers(self, dotted: str, value: Any) -> tuple[str, ...]:
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
        try:
            fill_prompt(request.prompt, request.subject)
        except SubjectNotFoundError as err:
            raise self.fail(prompt, str(err)) from None
        # the same test as editing.base.validate_request, here so that --skip-invalid can skip it
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
            probes.append(Probe(item["prompt"], answers[0], answers[1:]))
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


# format name -> (keys that identify it, record parser)
FORMATS: dict[str, tuple[frozenset[str], Callable[[_Record, str], EditCase]]] = {
    "merged": (frozenset({"requested_rewrite"}), _merged),
    "knowedit": (frozenset({"subject", "prompt", "target_new", "ground_truth", "locality"}), _knowedit),
    "mend_counterfact": (
        frozenset({"prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt"}),
        _mend_counterfact,
    ),
    "memit_zsre": (frozenset({"src", "subject", "alt", "answers", "rephrase", "loc"}), _memit_zsre),
}

SAMPLE_DATA = "sample"  # name of the shipped sample set


def sample_path() -> Path:
    """Path of the sample set shipped in the package (written for attnedit, merged format)."""
    return Path(str(resources.files("attnedit") / "resources" / "sample_counterfact.json"))


def detect_format(record: Any, where: str) -> str:
    """The format of a data file from its first record (``where``: that record, for the error)."""
    if isinstance(record, dict):
        for name, (keys, _) in FORMATS.items():
            if keys <= record.keys():
                return name
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataFormatError(
        f"{where}: cannot tell the format from keys {keys}; known formats: {', '.join(FORMATS)}"
    )


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def load_cases(path: str | Path, format: str | None = None, skip_invalid: bool = False) -> Dataset:
    """Load every case of a data file (``"sample"`` names the shipped sample set).

    A malformed record raises ``DataFormatError``; with ``skip_invalid`` it is left out, logged, and
    listed in ``Dataset.skipped`` (which the run manifest records).
    """
    file = sample_path() if str(path) == SAMPLE_DATA else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data file not found: {file}")
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
        cases.append(replace(case, source=f"{file.name}#{index}"))
    if skipped:
        logger.warning("%s: skipped %d malformed records, first: %s", file, len(skipped), skipped[0])
    return Dataset(path=str(file), format=name, sha256=file_sha256(file), cases=cases, skipped=skipped)


def corpus_path(name: str | Path) -> Path:
    """A text corpus by name: ``"sample"`` is the shipped PPL corpus, anything else a file path."""
    if str(name) == SAMPLE_DATA:
        return sample_path().with_name("sample_ppl_corpus.json")
    return Path(name)


def load_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Texts of a corpus file: a JSON list (strings or objects with ``text``/``Text``), JSON lines
    (the same per line), or plain text (one text per non-empty line). Used for PPL and statistics."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"text corpus {file} does not exist")

    def text_of(record: Any, where: str) -> str:
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
