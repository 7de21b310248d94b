"""Multilingual data (BMIKE-53 CounterFact): the loader, ``EditCase`` translations, the edit language and
question-wrapper settings, and the evaluation suite in every language (``KEY@LANG``)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import FIXTURES
from typer.testing import CliRunner

from attnedit.cli.main import app
from attnedit.core.data import (
    BMIKE53,
    DEFAULT_QUESTION_TEMPLATE,
    DataFormatError,
    EditCase,
    load_cases,
)
from attnedit.evaluation.evaluator import EvalConfig, Evaluator
from attnedit.evaluation.metrics import COMPARISON_METRICS, KNOWEDIT_METRICS, summarize
from attnedit.runs.config import RunConfig
from attnedit.runs.report import TABLE_COLUMNS, collect, columns, markdown_table
from attnedit.runs.rundir import RESULTS, read_results
from attnedit.runs.runner import run

LANGUAGES = ("ca", "fr", "es", "de")


def _side(case_id: int, subject: str, question: str, lang: str) -> dict:
    """One language's side of a synthetic BMIKE-53 record (words of the tiny tokenizer's corpus)."""
    tag = "" if lang == "en" else f" ({lang})"
    return {
        "case_id": case_id,
        "subject": subject,
        "src": question,
        "rephrase": f"Which city is {subject} in{tag}?",
        "old": "Paris" if lang == "en" else "Paris-fr",
        "alt": "Rome" if lang == "en" else "Rome-fr",
        "loc": f"Where is the Eiffel Tower{tag}?",
        "loc_ans": "Paris",
        "port": f"What is the capital of the country of {subject}{tag}?",
        "port_ans": "Italy",
    }


def _records() -> list[dict]:
    """Three bilingual records; in the third the French question lacks the subject."""
    subjects = ["Toko Yasuda", "Michel Rocard", "Freddy Cole"]
    out = []
    for i, subject in enumerate(subjects):
        fr_question = f"Où est {subject}?" if i < 2 else "Où est-il?"
        out.append(
            {
                "en": _side(10 + i, subject, f"Where is {subject}?", "en"),
                "fr": _side(10 + i, subject, fr_question, "fr"),
            }
        )
    return out


def _write(tmp_path: Path, records: list[dict], name: str = "bmike.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path


# --------------------------------------------------------------------------- the public files
# tests/fixtures holds records 0-5 and 620 of the English-French file (tests/fixtures/README.md)
FRENCH = FIXTURES / "bmike53_counterfact_en_fr.json"


def _check_translations(path: Path, lang: str) -> tuple[list[dict], list[str]]:
    """Load ``path`` (English and ``lang``) and check every case against its record; returns the records
    and a direct recount of the case ids whose translated question does not hold the subject (whatever its
    case), which the loader's ``subject_missing`` must list."""
    raw = json.loads(path.read_text())
    data = load_cases(path)
    assert data.format == BMIKE53 and data.language == "en" and not data.skipped
    assert data.question_template == DEFAULT_QUESTION_TEMPLATE
    assert len(data) == len(raw)
    for case, record in zip(data.cases, raw, strict=True):
        assert case.case_id == str(record["en"]["case_id"]) == str(record[lang]["case_id"])
        assert case.language == "en" and case.languages == ("en", lang)
        other = case.in_language(lang)
        assert other is case.translations[lang] and other.language == lang and other.translations == {}
        assert other.case_id == case.case_id and other.source == case.source
        assert other.request.target_new == record[lang]["alt"]
        assert other.request.target_true == record[lang]["old"]
        # the edit language's subject is in its prompt (as the prompt spells it)
        assert case.request.subject in case.request.prompt
    recount = [
        str(r[lang]["case_id"]) for r in raw if r[lang]["subject"].lower() not in r[lang]["src"].lower()
    ]
    assert data.subject_missing == {lang: recount}
    return raw, recount


@pytest.mark.parametrize("lang", LANGUAGES)
def test_each_whole_file_loads_with_its_translations(data_file, lang):
    raw, recount = _check_translations(data_file(f"bmike53-{lang}"), lang)
    assert 0 < len(recount) < len(raw) * 0.1


def test_the_french_records_load_with_their_translations():
    raw, recount = _check_translations(FRENCH, "fr")
    # record 4 only: its French subject is 'Jammu and Kashmir', its French question says 'Jammu et Kashmir'
    assert recount == [str(raw[4]["fr"]["case_id"])]


def test_a_subject_capitalised_differently_takes_the_prompts_spelling():
    """BMIKE-53 writes 'The U-Men' as the subject of 'In which city was the U-Men founded?'."""
    data = load_cases(FRENCH, question_template="{}")
    case = next(c for c in data.cases if c.case_id == "3477")
    assert case.request.subject == "the U-Men"
    assert case.request.prompt == "In which city was the U-Men founded?"


def test_the_edit_language_setting():
    path = FRENCH
    with pytest.raises(DataFormatError, match=r"\[4\]: field 'fr\.src'"):
        load_cases(path, language="fr")  # a French question without its subject cannot be edited
    data = load_cases(path, language="fr", skip_invalid=True)
    english = load_cases(path)
    assert data.language == "fr"
    # exactly the records whose French question lacks the subject are left out (and listed)
    assert len(data.skipped) == len(english.subject_missing["fr"]) > 0
    assert all("field 'fr.src'" in err for err in data.skipped)
    assert len(data) + len(data.skipped) == len(english) == len(json.loads(path.read_text()))
    by_id = {c.case_id: c for c in english.cases}
    for case in data.cases:
        assert case.language == "fr" and case.languages == ("fr", "en")
        assert case.request == by_id[case.case_id].translations["fr"].request  # the request in French
        assert case.translations["en"].request == by_id[case.case_id].request
    assert data.cases[0].request.prompt == "Question: D'où vient Spike Hughes? Answer:"
    assert data.subject_missing == {"en": []}


def test_bad_settings_are_refused():
    path = FRENCH
    with pytest.raises(ValueError, match=r"'de'.*en, fr"):
        load_cases(path, language="de")
    with pytest.raises(ValueError, match=r"exactly one \{\}"):
        load_cases(path, question_template="Question: Answer:")
    # other formats have no language and no question prompts
    with pytest.raises(ValueError, match="multilingual"):
        load_cases("sample", language="fr")
    with pytest.raises(ValueError, match="multilingual"):
        load_cases("sample", language="en")
    with pytest.raises(ValueError, match="question template"):
        load_cases("sample", question_template="Q: {}")


def test_in_language(tmp_path):
    data = load_cases(_write(tmp_path, _records()))
    case = data.cases[0]
    assert case.in_language("") is case and case.in_language("en") is case
    assert case.in_language("fr") is case.translations["fr"]
    with pytest.raises(ValueError) as info:
        case.in_language("de")
    assert "'10'" in str(info.value) and "'de'" in str(info.value) and "en, fr" in str(info.value)
    hash(case)  # still hashable (the translations are not part of the hash)


def test_malformed_records_name_file_index_and_field(tmp_path):
    records = _records()
    del records[1]["fr"]["loc"]
    path = _write(tmp_path, records)
    with pytest.raises(DataFormatError) as info:
        load_cases(path)
    assert str(path) in str(info.value) and "[1]" in str(info.value) and "'fr.loc'" in str(info.value)
    data = load_cases(path, skip_invalid=True)
    assert [c.case_id for c in data.cases] == ["10", "12"] and len(data.skipped) == 1
    records = _records()
    records[2]["fr"]["case_id"] = 99
    with pytest.raises(DataFormatError, match=r"\[2\]: field 'fr.case_id'"):
        load_cases(_write(tmp_path, records))
    records = _records()
    records[0]["en"]["alt"] = "paris"
    with pytest.raises(DataFormatError, match=r"\[0\]: field 'en.alt'.*nothing to edit"):
        load_cases(_write(tmp_path, records))


def test_question_template_wraps_every_prompt_in_every_language(tmp_path):
    path = _write(tmp_path, _records())
    plain = load_cases(path, question_template="{}")
    wrapped = load_cases(path, question_template="Q: {} A:")
    assert wrapped.question_template == "Q: {} A:"
    for p_case, w_case in zip(plain.cases, wrapped.cases, strict=True):
        for lang in p_case.languages:
            p, w = p_case.in_language(lang), w_case.in_language(lang)
            assert w.request.prompt == f"Q: {p.request.prompt} A:"
            assert w.request.text == w.request.prompt
            for kind in ("rewrite", "paraphrase", "neighborhood", "portability"):
                (pp,), (wp,) = getattr(p, kind), getattr(w, kind)
                assert wp.prompt == f"Q: {pp.prompt} A:" and wp.target == pp.target
    # the plain case is built field by field from the record
    en = _records()[0]["en"]
    case = plain.cases[0]
    assert case.rewrite[0].prompt == en["src"] == case.request.prompt
    assert (case.paraphrase[0].prompt, case.paraphrase[0].target) == (en["rephrase"], en["alt"])
    assert (case.neighborhood[0].prompt, case.neighborhood[0].target) == (en["loc"], en["loc_ans"])
    assert (case.portability[0].prompt, case.portability[0].target) == (en["port"], en["port_ans"])


def test_a_translation_without_its_subject_is_kept_and_listed(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        data = load_cases(_write(tmp_path, _records()))
    assert len(data) == 3
    assert data.subject_missing == {"fr": ["12"]}
    assert "fr: 1" in caplog.text
    missing = data.cases[2].translations["fr"]
    # its request is whole; its text is its prompt (there is no subject to fill in)
    assert missing.request.subject == "Freddy Cole" and missing.request.text == "Question: Où est-il? Answer:"
    assert missing.request.edit_sentence == "Question: Où est-il? Answer: Rome-fr."


def test_monolingual_formats_are_unchanged():
    data = load_cases("sample")
    assert data.format == "merged" and data.language == "" and data.question_template is None
    assert data.subject_missing == {}
    for case in data.cases:
        assert case.language == "" and case.translations == {} and case.languages == ()
        assert case.in_language("") is case
    with pytest.raises(ValueError, match="no 'fr' version; its languages: none"):
        data.cases[0].in_language("fr")


def test_format_is_detected_from_the_record_shape(tmp_path):
    records = _records()
    assert load_cases(_write(tmp_path, records)).format == BMIKE53
    records[0]["de"] = records[0]["fr"]  # three languages: not the bilingual shape, no other format
    with pytest.raises(DataFormatError, match="cannot tell the format"):
        load_cases(_write(tmp_path, records))


# --------------------------------------------------------------------------- the suite in every language


@pytest.fixture(scope="module")
def tiny_llama(tiny_tokenizer, one_thread):
    from helpers import make_tiny

    return make_tiny("llama", tiny_tokenizer)


def _scores_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for side in ("right_nll", "wrong_nll"):
            assert a[key][side] == pytest.approx(b[key][side], rel=1e-5, abs=1e-6), key


def test_evaluator_scores_each_translation_as_its_own_case(tmp_path, tiny_llama, monkeypatch):
    data = load_cases(_write(tmp_path, _records()))
    evaluator = Evaluator(tiny_llama, EvalConfig(fluency=False))
    calls = []
    score = evaluator._score
    monkeypatch.setattr(evaluator, "_score", lambda pairs, *a: calls.append(len(pairs)) or score(pairs, *a))
    for case in data.cases:
        calls.clear()
        record = evaluator.score(case)
        assert len(calls) == 1  # every language's pairs in one scoring call
        alone = evaluator.score(replace(case, translations={}))
        french = evaluator.score(case.translations["fr"])
        own = {k: v for k, v in record["comparisons"].items() if "@" not in k}
        theirs = {k.removesuffix("@fr"): v for k, v in record["comparisons"].items() if "@" in k}
        assert list(record["comparisons"]) == ["ES", "PS", "NS", "DNS", "ES@fr", "PS@fr", "NS@fr", "DNS@fr"]
        _scores_close(own, alone["comparisons"])
        _scores_close(theirs, french["comparisons"])
        assert record["knowedit"].keys() == {
            "KE_EDIT",
            "KE_GEN",
            "KE_PORT",
            "KE_EDIT@fr",
            "KE_GEN@fr",
            "KE_PORT@fr",
        }
        for name in ("KE_EDIT", "KE_GEN", "KE_PORT"):
            assert record["knowedit"][f"{name}@fr"] == pytest.approx(french["knowedit"][name])
            assert record["knowedit"][name] == pytest.approx(alone["knowedit"][name])


def test_summary_pools_each_language_like_the_edit_language(tmp_path, tiny_llama):
    data = load_cases(_write(tmp_path, _records()))
    evaluator = Evaluator(tiny_llama, EvalConfig(fluency=False))
    records = [evaluator.score(case) for case in data.cases]
    summary = summarize(records)
    # the French entries are exactly the summary of the French parts of the records, renamed
    french = [
        {
            "case_id": r["case_id"],
            "source": r["source"],
            "comparisons": {k[:-3]: v for k, v in r["comparisons"].items() if k.endswith("@fr")},
            "knowedit": {k[:-3]: v for k, v in r["knowedit"].items() if k.endswith("@fr")},
            "knowedit_protocol": r["knowedit_protocol"],
            "generation_score": {k[:-3]: v for k, v in r["generation_score"].items() if k.endswith("@fr")},
        }
        for r in records
    ]
    alone = summarize(french)
    derived = [n for s in COMPARISON_METRICS for n in (s.score, s.magnitude, s.failure) if n]
    for name in (*derived, "AvgS", *KNOWEDIT_METRICS, "GES", "GPS"):
        assert summary[f"{name}@fr"] == alone[name], name
    assert summary["ES@fr"]["n"] == 3 and summary["NM@fr"]["n"] == 3 and summary["KE_PORT@fr"]["n"] == 3
    assert summary["GES@fr"]["n"] == 3
    # the usual keys come first, as for monolingual data, then the French ones
    keys = list(summary)
    assert keys[: len(alone)] == list(alone) and all(k.endswith("@fr") for k in keys[len(alone) :])
    assert not any("@" in k for k in summarize([_without_languages(r) for r in records]))


def _without_languages(record: dict) -> dict:
    """``record`` without its ``@LANG`` keys."""
    return {
        **record,
        "comparisons": {k: v for k, v in record["comparisons"].items() if "@" not in k},
        "knowedit": {k: v for k, v in record["knowedit"].items() if "@" not in k},
        "generation_score": {k: v for k, v in record.get("generation_score", {}).items() if "@" not in k},
    }


def test_run_manifest_report_columns_and_cli(tmp_path, tiny_dir):
    path = _write(tmp_path, _records())
    out = tmp_path / "run"
    config = RunConfig(data=str(path), out=str(out), model=str(tiny_dir), eval=EvalConfig(fluency=False))
    summary = run(config, progress=False)
    assert summary["ES@fr"]["n"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    data = manifest["data"]
    assert data["format"] == BMIKE53 and data["language"] == "en"
    assert data["question_template"] == DEFAULT_QUESTION_TEMPLATE
    assert data["subject_missing"] == {"fr": ["12"]}
    records = read_results(out / RESULTS)
    assert [r["case_id"] for r in records] == ["10", "11", "12"] and "ES@fr" in records[2]["comparisons"]

    rows = collect([out])
    cols = columns(magnitudes=True, rows=rows)
    plain = columns(magnitudes=True)
    assert cols[: len(plain)] == plain
    # BMIKE-53 has KnowEdit probes: their columns follow (no KE_FLU without fluency; BMIKE-53's locality
    # question is a neighbourhood prompt, NS)
    knowedit = ("KE_EDIT", "KE_GEN", "KE_PORT")
    assert cols[len(plain) : len(plain) + 3] == knowedit
    # the French columns that have values, in the order of the usual ones (no RS, Avg S or FL in French;
    # KnowEdit locality is the edit language's only)
    french = ("ES", "PS", "NS", "DNS", "GES", "GPS", "EM", "PM", "NM", "DNM", "DNM_onew")
    french += ("KE_EDIT", "KE_GEN", "KE_PORT")
    assert cols[len(plain) + 3 :] == tuple(f"{c}@fr" for c in french)
    assert "| ES@fr |" in markdown_table(rows, cols)

    # the edit language is part of the run's identity; the CLI passes both settings
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(path),
            "--model",
            str(tiny_dir),
            "--out",
            str(out),
            "--language",
            "fr",
            "--skip-invalid",
            "--no-fluency",
            "--ppl-corpus",
            "none",
        ],
    )
    assert result.exit_code != 0 and "different 'data'" in result.output
    fr_out = tmp_path / "fr"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(path),
            "--model",
            str(tiny_dir),
            "--out",
            str(fr_out),
            "--language",
            "fr",
            "--question-template",
            "{}",
            "--skip-invalid",
            "--no-fluency",
            "--ppl-corpus",
            "none",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "ES@en" in result.output
    data = json.loads((fr_out / "manifest.json").read_text())["data"]
    assert (data["language"], data["question_template"], data["subject_missing"]) == ("fr", "{}", {"en": []})
    assert len(data["skipped"]) == 1 and "field 'fr.src'" in data["skipped"][0]
    report = CliRunner().invoke(app, ["report", str(out), str(fr_out)])
    assert report.exit_code == 0, report.output
    assert "ES@fr" in report.output and "ES@en" in report.output


def test_monolingual_runs_have_no_language_keys(tmp_path, tiny_dir):
    out = tmp_path / "mono"
    run(
        RunConfig(data="sample", out=str(out), model=str(tiny_dir), limit=2, eval=EvalConfig(fluency=False)),
        progress=False,
    )
    data = json.loads((out / "manifest.json").read_text())["data"]
    assert set(data) == {"path", "format", "sha256", "records", "skipped"}
    rows = collect([out])
    assert columns(rows=rows) == TABLE_COLUMNS
    assert not any("@" in key for r in read_results(out / RESULTS) for key in r["comparisons"])
    assert not any("@" in key for key in json.loads((out / "summary.json").read_text()))


def test_api_load_cases_takes_the_settings(tmp_path):
    import attnedit

    records = _records()[:2]  # both French questions hold their subject
    cases = attnedit.load_cases(_write(tmp_path, records), language="fr", question_template="{}")
    assert isinstance(cases[0], EditCase)
    assert cases[0].language == "fr" and cases[0].languages == ("fr", "en")
    assert cases[0].request.prompt == "Où est Toko Yasuda?"
    assert cases[0].translations["en"].request.prompt == "Where is Toko Yasuda?"
