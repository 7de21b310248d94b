"""Loaders: every public data set (a few records of it, and the whole file), the shipped sample set,
malformed records and the request helpers."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import FIXTURES

from attnedit.core.data import (
    FORMATS,
    DataFormatError,
    EditRequest,
    Probe,
    load_cases,
    load_texts,
    sample_path,
)

PROBE_KINDS = (
    "rewrite",
    "paraphrase",
    "reasoning",
    "subject_alias",
    "neighborhood",
    "relation",
    "commonsense",
    "generation",
)


def _raw(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- the public data sets, cut
# tests/fixtures holds a few records of each public file (tests/fixtures/README.md: which ones); the tests
# of a whole file's records are in the next section


def test_sadr_merged():
    path = FIXTURES / "sadr_merged_counterfact.json"
    ds = load_cases(path)
    raws = _raw(path)
    assert ds.format == "merged"
    assert len(ds) == len(raws) == len(ds.cases) == 30
    assert ds.skipped == []
    assert ds.path == str(path)
    assert ds.sha256 == _sha(path)

    raw = raws[0]
    case = ds.cases[0]
    rr = raw["requested_rewrite"]
    assert case.request == EditRequest(rr["prompt"], rr["subject"], rr["target_new"], rr["target_true"])
    assert case.request.prompt == "The name of the country of citizenship of Isabel May is"
    assert case.request.subject == "Isabel May"
    assert case.request.target_new == "Tuvan People's Republic"
    assert case.request.target_true == "United States of America"
    assert case.case_id == "0"
    assert case.source == "sadr_merged_counterfact.json#0"
    # rewrite prompts always aim at o_new
    assert case.rewrite == tuple(Probe(p, rr["target_new"]) for p in raw["rewrite"]["prompts"])
    assert case.reasoning == tuple(
        Probe(p, t) for p, t in zip(raw["p-reasoning"]["prompts"], raw["p-reasoning"]["targets"], strict=True)
    )
    assert len(case.reasoning) == 6
    assert case.relation == (Probe("The occupation of Isabel May is", "actor"),)
    assert len(case.commonsense) == 1
    cs = case.commonsense[0]
    assert cs.goal == raw["o-commonsense"]["prompts"]
    assert cs.right == raw["o-commonsense"]["right"]
    assert cs.wrong == raw["o-commonsense"]["wrong"]
    # absent blocks give empty probe sets, not errors
    assert case.paraphrase == case.neighborhood == case.subject_alias == ()
    assert case.generation == case.portability == case.locality == ()
    # every record's request is read; every case id is unique and every source points at its record
    for case, raw in zip(ds.cases, raws, strict=True):
        rr = raw["requested_rewrite"]
        assert case.request == EditRequest(rr["prompt"], rr["subject"], rr["target_new"], rr["target_true"])
    assert len({c.case_id for c in ds.cases}) == len(raws)
    assert [c.source for c in ds.cases] == [f"sadr_merged_counterfact.json#{i}" for i in range(len(raws))]


def _knowedit_counts(raw: dict) -> tuple[int, int, int]:
    port = sum(len(v) for v in raw.get("portability", {}).values())
    loc = sum(len(v) for v in raw.get("locality", {}).values())
    alias = len(raw.get("portability", {}).get("Subject_Aliasing", []))
    return port, loc, alias


def test_knowedit_wiki_counterfact():
    path = FIXTURES / "knowedit_wiki_counterfact_test_cf.json"
    ds = load_cases(path)
    raws = _raw(path)
    assert ds.format == "knowedit"
    assert len(ds) == len(raws) == 3
    assert ds.sha256 == _sha(path)
    # every record's probe sets have the record's sizes
    for case, raw in zip(ds.cases, raws, strict=True):
        port, loc, alias = _knowedit_counts(raw)
        assert (len(case.portability), len(case.locality), len(case.subject_alias)) == (port, loc, alias)

    raw = raws[0]
    case = ds.cases[0]
    assert case.request == EditRequest(
        "The name of the country of citizenship of Leonardo DiCaprio is",
        "Leonardo DiCaprio",
        "Syria",
        "United States of America",
    )
    assert case.request.target_true == raw["ground_truth"]
    assert case.rewrite == (Probe(raw["prompt"], "Syria"),)
    assert case.paraphrase == (Probe(raw["rephrase"], "Syria"),)
    assert _knowedit_counts(raw) == (11, 10, 4)
    # a list of alias lists: first alias is the target, the rest are kept as aliases
    first = raw["portability"]["Reasoning"][0]
    assert case.portability[0] == Probe(
        first["prompt"], first["ground_truth"][0][0], tuple(first["ground_truth"][0][1:]), kind="Reasoning"
    )
    assert case.portability[0].target == "Syrian pound"
    # every probe keeps its key, in the record's order (KnowEdit's metrics average within each key)
    kinds = [k for k, items in raw["portability"].items() for _ in items]
    assert [p.kind for p in case.portability] == kinds
    assert [p.kind for p in case.locality] == [k for k, items in raw["locality"].items() for _ in items]
    assert {p.kind for p in case.subject_alias} == {"Subject_Aliasing"}
    assert case.subject_alias[0].prompt == "The name of the country of citizenship of Di Caprio is"
    assert case.subject_alias[0].target == "Syria"
    loc_first = next(iter(raw["locality"].values()))[0]
    assert case.locality[0].prompt == loc_first["prompt"]
    # the KnowEdit loader has no CounterFact-only probe sets
    assert case.neighborhood == case.relation == case.commonsense == ()


def test_knowedit_zsre():
    path = FIXTURES / "knowedit_zsre_test_all.json"
    # record 7 (the public file's first malformed one) asks for the answer the model should already give
    # (target_new == ground_truth): a record-level error at load time, left out with skip_invalid
    with pytest.raises(
        DataFormatError, match=r"knowedit_zsre_test_all.json\[7\]: field 'target_new': equals"
    ):
        load_cases(path)
    ds = load_cases(path, skip_invalid=True)
    assert ds.format == "knowedit"
    assert len(ds) == 7 and len(ds.skipped) == 1
    assert "equals target_true" in ds.skipped[0]
    assert [c.source for c in ds.cases] == [f"knowedit_zsre_test_all.json#{i}" for i in range(7)]
    assert ds.sha256 == _sha(path)

    raw = _raw(path)[0]
    case = ds.cases[0]
    assert case.request == EditRequest(
        "Which family does Epaspidoceras belong to?", "Epaspidoceras", "Noctuidae", "Aspidoceratidae"
    )
    # rephrase_prompt is the paraphrase in ZsRE
    assert case.paraphrase == (Probe("What family are Epaspidoceras?", "Noctuidae"),)
    port, loc, alias = _knowedit_counts(raw)
    assert (len(case.portability), len(case.locality), len(case.subject_alias)) == (port, loc, alias)
    assert (port, loc, alias) == (1, 2, 0)
    # a plain-string ground truth and a one-element list both work
    port_prompt = "What is the common name for the family Epaspidoceras belongs to?"
    assert case.portability == (Probe(port_prompt, "Owlet moths", kind="Reasoning"),)
    loc_prompt = "The taxon rank of Epaspidoceras is"
    assert case.locality[0] == Probe(loc_prompt, "genus", kind="Relation_Specificity")


def test_mend_counterfact():
    path = FIXTURES / "counterfact_mendfmt_edit.json"
    ds = load_cases(path)
    assert ds.format == "mend_counterfact"
    assert len(ds) == 5
    assert ds.sha256 == _sha(path)

    case = ds.cases[0]
    assert case.case_id == "0"
    assert case.request == EditRequest(
        "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French"
    )
    assert case.rewrite == (Probe("The mother tongue of Danielle Darrieux is", "English"),)
    assert case.paraphrase == (
        Probe("Where Danielle Darrieux is from, people speak the language of", "English"),
    )
    assert case.neighborhood == (Probe("Michel Rocard is a native speaker of", "French"),)
    assert case.locality == case.portability == case.relation == ()
    # case ids come from the file, not from the position (the file skips ids 2 and 3)
    ids = [str(r["case_id"]) for r in _raw(path)]
    assert [c.case_id for c in ds.cases] == ids != [str(i) for i in range(len(ids))]


# the MEMIT-format zsRE cut: records 0, 101, 534, 535 and 723 of the public file, as its records 0-4
MEMIT_ZSRE = "zsre_memit_format_train_1k.json"


def test_memit_zsre_invalid_record_raises():
    path = FIXTURES / MEMIT_ZSRE
    with pytest.raises(DataFormatError) as info:
        load_cases(path)
    msg = str(info.value)
    assert str(path) in msg
    # the first bad record (the public file's first, its record 101): its new answer is the old one
    assert "[1]" in msg and "'alt'" in msg and "equals target_true" in msg


def test_memit_zsre_skip_invalid():
    path = FIXTURES / MEMIT_ZSRE
    ds = load_cases(path, skip_invalid=True)
    assert ds.format == "memit_zsre"
    assert len(ds) == 2
    assert len(ds.skipped) == 3
    # two records without an 'alt' (the public file's 534 and 723), one whose 'alt' is the old answer
    missing = [err for err in ds.skipped if "equals target_true" not in err]
    assert len(missing) == 2
    assert "[2]" in missing[0] and "'alt'" in missing[0]
    assert "[4]" in missing[1] and "'alt'" in missing[1]
    assert ds.sha256 == _sha(path)
    # the records around the skipped ones keep their own index as source
    assert [c.source for c in ds.cases] == [f"{MEMIT_ZSRE}#0", f"{MEMIT_ZSRE}#3"]

    case = ds.cases[0]
    assert case.request == EditRequest(
        "What is the product made by UniFirst?", "UniFirst", "unmanned aircraft", "uniform"
    )
    assert case.paraphrase == (Probe("What will be the product of UniFirst?", "unmanned aircraft"),)
    assert case.locality == (
        Probe("nq question: john goodman's character in the big lebowski", "Walter Sobchak"),
    )


def test_explicit_format_matches_detection():
    path = FIXTURES / "knowedit_zsre_test_all.json"
    explicit = load_cases(path, format="knowedit", skip_invalid=True)
    assert explicit.cases == load_cases(path, skip_invalid=True).cases


# --------------------------------------------------------------------------- the public data sets, whole

# registered data set, format (each file's counts are read from the file itself: a local copy in
# ATTNEDIT_DATA and the upstream file differ in their records)
WHOLE_FILES = [
    ("sadr-counterfact", "merged"),
    ("knowedit-counterfact", "knowedit"),
    ("knowedit-zsre", "knowedit"),
    ("counterfact-mend", "mend_counterfact"),
    ("zsre-train-1k", "memit_zsre"),
]


@pytest.mark.parametrize(("name", "fmt"), WHOLE_FILES, ids=[row[0] for row in WHOLE_FILES])
def test_every_record_of_a_whole_file_loads_or_is_left_out(data_file, name, fmt):
    path = data_file(name)
    ds = load_cases(name, skip_invalid=True)  # by name: the same file
    assert ds.format == fmt and ds.path == str(path) and ds.sha256 == _sha(path)
    records = len(_raw(path))
    assert len(ds) + len(ds.skipped) == records and len(ds) > 0.9 * records
    # every record left out names its index and field, and says why
    left_out = [
        int(re.match(rf"{re.escape(str(path))}\[(\d+)\]: field '[^']+'", err)[1]) for err in ds.skipped
    ]
    # every case id is unique and every source points at its record
    assert len({c.case_id for c in ds.cases}) == len(ds)
    assert [c.source for c in ds.cases] == [f"{path.name}#{i}" for i in range(records) if i not in left_out]
    if ds.skipped:  # without skip_invalid the first malformed record is the error
        with pytest.raises(DataFormatError) as info:
            load_cases(path)
        assert str(info.value) == ds.skipped[0]
    else:
        assert load_cases(path).cases == ds.cases


def test_missing_file_raises():
    with pytest.raises(FileNotFoundError, match="no_such_file"):
        load_cases("/nonexistent/no_such_file.json")


# --------------------------------------------------------------------------- the shipped sample


def test_sample_set_is_complete():
    ds = load_cases("sample")
    assert ds.path == str(sample_path())
    assert ds.format == "merged"
    assert len(ds) >= 40
    assert ds.skipped == []
    assert ds.sha256 == _sha(sample_path())
    for case in ds.cases:
        for kind in PROBE_KINDS:
            assert getattr(case, kind), f"case {case.case_id}: no {kind} probes"
        req = case.request
        assert req.subject in req.text, case.case_id
        assert req.text.strip() and req.target_new != req.target_true, case.case_id
        for probe in case.rewrite:
            assert probe.target == req.target_new
        # evaluation prompts are plain text: a {} template would be scored literally
        for kind in ("rewrite", "paraphrase", "reasoning", "subject_alias", "neighborhood", "relation"):
            for probe in getattr(case, kind):
                assert "{}" not in probe.prompt and probe.target.strip(), (case.case_id, kind)
    assert len({c.case_id for c in ds.cases}) == len(ds)


# --------------------------------------------------------------------------- malformed records


def _merged_record(case_id: int = 0) -> dict:
    return {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": "The Eiffel Tower is located in the city of",
            "subject": "Eiffel Tower",
            "target_new": "Rome",
            "target_true": "Paris",
        },
        "p-paraphrase": {"prompts": ["The Eiffel Tower stands in"], "targets": ["Rome"]},
        "p-reasoning": {"prompts": ["The Eiffel Tower is in the country of"], "targets": ["Italy"]},
        "l-neighbor": {"prompts": ["The Louvre is in", "Notre-Dame is in"], "targets": ["Paris", "Paris"]},
        "l-relation": {"prompts": ["The Eiffel Tower is made of"], "targets": ["iron"]},
    }


def _write(tmp_path: Path, records, name: str = "cases.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _break(mutate) -> list[dict]:
    """A valid record 0 and a record 1 broken by ``mutate``."""
    bad = _merged_record(1)
    mutate(bad)
    return [_merged_record(0), bad]


def _set(dotted: str, value):
    def mutate(rec):
        node = rec
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value

    return mutate


def _delete(dotted: str):
    def mutate(rec):
        node = rec
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        del node[last]

    return mutate


MALFORMED = {
    "missing subject": (_delete("requested_rewrite.subject"), "requested_rewrite.subject"),
    "missing target_true": (_delete("requested_rewrite.target_true"), "requested_rewrite.target_true"),
    "missing probe prompts": (_delete("l-relation.prompts"), "l-relation.prompts"),
    "non-string target_new": (_set("requested_rewrite.target_new", 5), "requested_rewrite.target_new"),
    "empty target_new": (_set("requested_rewrite.target_new", "  "), "requested_rewrite.target_new"),
    "list target_true": (_set("requested_rewrite.target_true", ["Paris"]), "requested_rewrite.target_true"),
    "non-string probe target": (_set("p-reasoning.targets", [3]), "p-reasoning.targets"),
    "subject not in prompt": (_set("requested_rewrite.subject", "Big Ben"), "requested_rewrite.prompt"),
    "fewer targets than prompts": (_set("l-neighbor.targets", ["Paris"]), "l-neighbor.targets"),
    "more targets than prompts": (_set("p-paraphrase.targets", ["Rome", "Rome"]), "p-paraphrase.targets"),
    # the first field read from the block is reported
    "requested_rewrite not an object": (_set("requested_rewrite", "x"), "requested_rewrite.target_true"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_merged_record(tmp_path, name):
    mutate, field_name = MALFORMED[name]
    path = _write(tmp_path, _break(mutate))
    with pytest.raises(DataFormatError) as info:
        load_cases(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "[1]" in msg
    assert repr(field_name) in msg
    # the valid record alone loads; skip_invalid leaves the broken one out and says why
    ds = load_cases(path, skip_invalid=True)
    assert [c.case_id for c in ds.cases] == ["0"]
    assert ds.skipped == [msg]


def test_subject_not_in_prompt_names_subject(tmp_path):
    path = _write(tmp_path, _break(_set("requested_rewrite.subject", "Big Ben")))
    with pytest.raises(DataFormatError, match="Big Ben"):
        load_cases(path)


def test_record_not_an_object(tmp_path):
    path = _write(tmp_path, [_merged_record(0), ["not", "a", "record"]])
    with pytest.raises(DataFormatError) as info:
        load_cases(path)
    assert str(path) in str(info.value) and "[1]" in str(info.value)


@pytest.mark.parametrize("content", [{"requested_rewrite": {}}, [], "text"])
def test_not_a_list_file(tmp_path, content):
    path = _write(tmp_path, content)
    with pytest.raises(DataFormatError) as info:
        load_cases(path)
    assert str(path) in str(info.value)
    assert "list" in str(info.value)


def test_unknown_format_detected(tmp_path):
    path = _write(tmp_path, [{"question": "Who?", "answer": "Me"}])
    with pytest.raises(DataFormatError) as info:
        load_cases(path)
    msg = str(info.value)
    assert str(path) in msg and "[0]" in msg
    # the keys it saw (the fields) and the formats it knows
    assert "'answer'" in msg and "'question'" in msg
    for name in FORMATS:
        assert name in msg


# a record of each well-known format that holds no single edit request (written for these tests, in the
# shape of MQuAKE, ROME's known facts, PIQA and a text corpus)
FOREIGN = [
    (
        "MQuAKE",
        {
            "case_id": 1,
            "requested_rewrite": [
                {"prompt": "{} is a citizen of", "subject": "Ellie Kemper", "target_new": {"str": "Croatia"}},
                {"prompt": "The capital of {} is", "subject": "Croatia", "target_new": {"str": "Kotor"}},
            ],
            "questions": ["What is the capital of the country Ellie Kemper is a citizen of?"],
            "answer": "Washington, D.C.",
            "new_answer": "Kotor",
        },
    ),
    (
        "ROME's known facts",
        {
            "known_id": 0,
            "subject": "Vinson Massif",
            "attribute": "Antarctica",
            "template": "{} is located in",
        },
    ),
    ("PIQA", {"goal": "Keep beads organized", "sol1": "Use an egg carton.", "sol2": "Use a sieve."}),
    ("a text corpus", {"Corpus": "C4", "Text": "Some text."}),
    ("a text corpus", "Some text."),
]


@pytest.mark.parametrize(("kind", "record"), FOREIGN, ids=[f"{k}-{i}" for i, (k, _) in enumerate(FOREIGN)])
def test_a_foreign_format_is_named_never_a_missing_field(tmp_path, kind, record):
    path = _write(tmp_path, [record])
    with pytest.raises(DataFormatError) as info:
        load_cases(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}[0]: this is ") and kind in msg
    assert "field" not in msg and "does not read" in msg
    for name in FORMATS:  # the formats it reads
        assert name in msg


def test_rome_counterfact_records(tmp_path):
    """ROME's and MEMIT's CounterFact format (a record written for this test in that shape)."""
    record = {
        "case_id": 7,
        "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": "Danielle Darrieux",
        },
        "paraphrase_prompts": [
            "Shayna does this. Danielle Darrieux speaks",
            "Danielle Darrieux's native tongue is",
        ],
        "neighborhood_prompts": ["The native language of Montesquieu is", "Michel Rocard, a native"],
        "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    }
    ds = load_cases(_write(tmp_path, [record]))
    assert ds.format == "counterfact"
    (case,) = ds.cases
    assert case.case_id == "7"
    assert case.request == EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French")
    assert case.rewrite == (Probe("The mother tongue of Danielle Darrieux is", "English"),)
    assert [p.target for p in case.paraphrase] == ["English", "English"]
    assert case.neighborhood == (
        Probe("The native language of Montesquieu is", "French"),
        Probe("Michel Rocard, a native", "French"),
    )
    assert case.generation == ("Danielle Darrieux's mother tongue is",)
    broken = copy.deepcopy(record)
    broken["requested_rewrite"]["target_new"] = "English"  # a plain string where ROME has {"str": ...}
    with pytest.raises(DataFormatError, match=r"\[0\]: field 'requested_rewrite\.target_new\.str'"):
        load_cases(_write(tmp_path, [broken], "broken.json"))


def test_unknown_format_requested(tmp_path):
    path = _write(tmp_path, [_merged_record(0)])
    with pytest.raises(DataFormatError) as info:
        load_cases(path, format="bogus")
    msg = str(info.value)
    assert "'bogus'" in msg
    assert str(path) in msg


def test_wrong_format_requested(tmp_path):
    path = _write(tmp_path, [_merged_record(0)])
    with pytest.raises(DataFormatError) as info:
        load_cases(path, format="mend_counterfact")
    msg = str(info.value)
    assert msg.startswith(f"{path}[0]: field '")
    assert "'ground_truth'" in msg  # a merged record has no top-level ground_truth


def test_duplicate_case_id(tmp_path):
    path = _write(tmp_path, [_merged_record(7), _merged_record(8), _merged_record(7)])
    with pytest.raises(DataFormatError) as info:
        load_cases(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "case_id" in msg and "7" in msg
    assert "[2]" in msg  # the record that repeats the id


KNOWEDIT_OK = {
    "subject": "Epaspidoceras",
    "prompt": "Which family does Epaspidoceras belong to?",
    "target_new": "Noctuidae",
    "ground_truth": ["Aspidoceratidae"],
    "rephrase_prompt": "What family are Epaspidoceras?",
    "portability": {"Reasoning": [{"prompt": "Common name?", "ground_truth": "Owlet moths"}]},
    "locality": {
        "Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]}]
    },
}


@pytest.mark.parametrize(
    ("mutate", "field_name"),
    [
        (_set("ground_truth", []), "ground_truth"),
        (_set("ground_truth", 3), "ground_truth"),
        (_set("target_new", None), "target_new"),
        (_set("rephrase_prompt", 7), "rephrase"),
        (
            _set("locality", {"Relation_Specificity": [{"ground_truth": ["genus"]}]}),
            "locality.Relation_Specificity[0].prompt",
        ),
        (
            _set("portability", {"Reasoning": [{"prompt": "x", "ground_truth": [[]]}]}),
            "portability.Reasoning[0].ground_truth",
        ),
        (_set("portability", {"Reasoning": "x"}), "portability.Reasoning"),
    ],
)
def test_malformed_knowedit_record(tmp_path, mutate, field_name):
    bad = copy.deepcopy(KNOWEDIT_OK)
    mutate(bad)
    path = _write(tmp_path, [copy.deepcopy(KNOWEDIT_OK), bad])
    with pytest.raises(DataFormatError) as info:
        load_cases(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}[1]:")
    assert repr(field_name) in msg


def test_malformed_mend_and_memit_records(tmp_path):
    mend = {
        "case_id": 0,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "subject": "Danielle Darrieux",
        "ground_truth": "French",
        "rephrase_prompt": "p",
        "locality_prompt": "Michel Rocard is a native speaker of",
        "locality_ground_truth": "French",
    }
    bad = dict(mend, case_id=1, locality_ground_truth=None)
    path = _write(tmp_path, [mend, bad], "mend.json")
    with pytest.raises(DataFormatError) as info:
        load_cases(path)
    assert str(info.value).startswith(f"{path}[1]:") and "'locality_ground_truth'" in str(info.value)

    zsre = {
        "subject": "UniFirst",
        "src": "What is the product made by UniFirst?",
        "alt": "drones",
        "answers": ["uniform"],
        "rephrase": "r",
        "loc": "nq question: q",
        "loc_ans": "a",
    }
    path = _write(tmp_path, [zsre, dict(zsre, answers=[])], "zsre.json")
    with pytest.raises(DataFormatError) as info:
        load_cases(path)
    assert str(info.value).startswith(f"{path}[1]:") and "'answers'" in str(info.value)


def test_jsonl_input(tmp_path):
    path = tmp_path / "cases.jsonl"
    lines = [json.dumps(_merged_record(i)) for i in range(3)]
    path.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n", encoding="utf-8")
    ds = load_cases(path)
    assert ds.format == "merged"
    assert [c.case_id for c in ds.cases] == ["0", "1", "2"]
    assert [c.source for c in ds.cases] == ["cases.jsonl#0", "cases.jsonl#1", "cases.jsonl#2"]
    assert ds.sha256 == _sha(path)
    case = ds.cases[0]
    assert case.rewrite == (Probe("The Eiffel Tower is located in the city of", "Rome"),)
    assert case.neighborhood == (Probe("The Louvre is in", "Paris"), Probe("Notre-Dame is in", "Paris"))
    # same records as a JSON list give the same cases
    as_list = load_cases(_write(tmp_path, [_merged_record(i) for i in range(3)])).cases
    assert [replace(c, source="") for c in as_list] == [replace(c, source="") for c in ds.cases]


def test_jsonl_malformed_line_index(tmp_path):
    path = tmp_path / "cases.jsonl"
    bad = _merged_record(1)
    del bad["requested_rewrite"]["target_new"]
    # a blank line before the bad record: errors name the file's own line number (3), not the index
    path.write_text(json.dumps(_merged_record(0)) + "\n\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        load_cases(path)
    assert str(info.value).startswith(f"{path}[line 3]:")
    assert "'requested_rewrite.target_new'" in str(info.value)


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "cases.jsonl"
    lines = [json.dumps(_merged_record(i)) for i in range(3)]
    lines[2] = lines[2][:-5]  # a torn record on line 3 (json.loads of the line alone says "line 1")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"cases\.jsonl: invalid JSON at line 3, column \d+"):
        load_cases(path)


def test_json_and_utf8_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"requested_rewrite": {}},\n  oops]', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"broken\.json: invalid JSON at line 2, column 3"):
        load_cases(broken)
    latin = tmp_path / "latin.json"
    latin.write_bytes(
        json.dumps([_merged_record(0)], ensure_ascii=False).replace("Paris", "P\u00e2ris").encode("latin-1")
    )
    with pytest.raises(DataFormatError, match=r"latin\.json: not UTF-8 text"):
        load_cases(latin)
    with pytest.raises(DataFormatError, match=r"latin\.json: not UTF-8 text"):
        load_texts(latin)


def test_target_new_equal_to_target_true_is_a_record_error(tmp_path):
    """The check editing.base.validate_request makes, at load time, so skip_invalid can skip it."""
    same = _merged_record(1)
    same["requested_rewrite"]["target_new"] = " " + same["requested_rewrite"]["target_true"].upper()
    path = tmp_path / "cases.json"
    path.write_text(json.dumps([_merged_record(0), same, _merged_record(2)]), encoding="utf-8")
    with pytest.raises(
        DataFormatError, match=r"cases\.json\[1\]: field 'requested_rewrite.target_new': equals"
    ):
        load_cases(path)
    ds = load_cases(path, skip_invalid=True)
    assert [c.source for c in ds.cases] == ["cases.json#0", "cases.json#2"] and len(ds.skipped) == 1


def test_merged_defaults(tmp_path):
    rec = _merged_record(0)
    rec["rewrite"] = {"prompts": ["The Eiffel Tower is in", "Eiffel Tower, city:"]}  # no targets: o_new
    rec["o-commonsense"] = {"prompts": ["goal one", "goal two"], "right": "r", "wrong": "w"}
    rec["generation"] = {"prompts": ["The Eiffel Tower is famous for"]}
    case = load_cases(_write(tmp_path, [rec])).cases[0]
    assert case.rewrite == (Probe("The Eiffel Tower is in", "Rome"), Probe("Eiffel Tower, city:", "Rome"))
    assert [c.goal for c in case.commonsense] == ["goal one", "goal two"]
    assert all((c.right, c.wrong) == ("r", "w") for c in case.commonsense)
    assert case.generation == ("The Eiffel Tower is famous for",)
    # no rewrite block: the request itself is the rewrite prompt
    plain = load_cases(_write(tmp_path, [_merged_record(0)], "plain.json")).cases[0]
    assert plain.rewrite == (Probe("The Eiffel Tower is located in the city of", "Rome"),)


# --------------------------------------------------------------------------- EditRequest


def test_edit_request_template():
    req = EditRequest("{} is a native speaker of", "Danielle Darrieux", "English", "French")
    assert req.text == "Danielle Darrieux is a native speaker of"
    assert req.edit_sentence == "Danielle Darrieux is a native speaker of English."
    mid = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French")
    assert mid.text == "The mother tongue of Danielle Darrieux is"
    assert mid.edit_sentence == "The mother tongue of Danielle Darrieux is English."


def test_edit_request_plain_prompt():
    req = EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")
    assert req.text == req.prompt
    assert req.edit_sentence == "The Eiffel Tower is located in the city of Rome."


def test_template_request_loads(tmp_path):
    rec = _merged_record(0)
    rec["requested_rewrite"]["prompt"] = "{} is located in the city of"
    case = load_cases(_write(tmp_path, [rec])).cases[0]
    assert case.request.text == "Eiffel Tower is located in the city of"
    assert case.rewrite == (Probe("Eiffel Tower is located in the city of", "Rome"),)
