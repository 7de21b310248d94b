"""The data sets attnedit evaluates on, by name: where each comes from, its pinned checksum, and where
it is found on this machine.

A name works wherever a data file does (``attnedit eval zsre``, ``load_cases("counterfact")``, a
corpus ``wikitext2``). A name is looked up, in order:

1. in each folder of ``$ATTNEDIT_DATA`` (``os.pathsep``-separated), under the file name the registry
   gives it: files placed there by hand are used as they are (a filtered or converted copy is fine;
   ``attnedit data verify`` tells whether it is the upstream file);
2. in the cache, ``$ATTNEDIT_CACHE/data`` (files there were verified when they were downloaded);
3. by a download from the pinned source into the cache (``core.download``: resumable, verified against
   the pinned sha256 and size, renamed into place only when whole).

A path that exists as a file is always that file, whatever its name.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from attnedit.core.download import Pinned, download, sha256_of
from attnedit.core.files import cache_dir

logger = logging.getLogger(__name__)

DATA_ENV = "ATTNEDIT_DATA"


class DataSetError(ValueError):
    """An unknown data set name, or a data set not on this machine when downloads are off."""


@dataclass(frozen=True)
class DataSet:
    """One registered data set: one or more pinned files (the first is the one a name opens)."""

    name: str
    title: str
    source: str  # canonical origin: the authors' repository or a data set hub id
    license: str
    format: str  # the ``load_cases`` format, or ``text`` (a corpus), ``piqa``, ``known-facts``
    records: int  # records (JSON list items, JSON lines, text lines) of the first file
    files: tuple[Pinned, ...]
    note: str = ""  # how the checksum was pinned, and anything a user must know

    @property
    def size(self) -> int:
        """Bytes of all its files."""
        return sum(f.size for f in self.files)


def _gh(repo: str, commit: str, path: str) -> str:
    """The raw address of ``path`` in GitHub repository ``repo`` at ``commit``."""
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


ROME_DATA = "https://rome.baulab.info/data/dsets"
"""Where ROME and MEMIT publish their evaluation sets."""

_SADR = ("PinzhengWang322/Reveal_Attention_Drift", "96259ac9928e4c910e01cefb5732d056972c8cf3")
_MEND_CF = ("Jometeorie/KnowledgeSpread", "d1a8d1ed5367e66010d4d9b081ab388b46c2438c")
_KNOWEDIT_COPY = ("wyren726/benchmark-1", "784010520aaaf2ce7ae960a8bceced53ae933d9c")
_KNOWEDIT_DIR = "Knowledge-Editing-Benchmark/wyren/dataset"
_KNOWEDIT_HUB = "https://huggingface.co/datasets/zjunlp/KnowEdit/resolve/main/benchmark"
_BMIKE = ("ercong21/MultiKnow", "6e3e245bf0a17edaecfb4d71664efc1b5fb67906")
_TORCH_EXAMPLES = ("pytorch/examples", "77f55b912142e11fcfdf5b530231fb9c52f181e8")
_PIQA = ("declare-lab/TEAM", "e43753fde8e53e498cf3056b85ae2f306902121f")
_KNOWN = ("MaxLEAF3824/gpt_re", "bbefbf5fa318b481e3d2d84670ce7382b387de3a")
_ROME_LFS = "https://media.githubusercontent.com/media/scalable-model-editing/rebuilding-rome"
_SNAPSHOT = "sha256 computed from the file in a public snapshot of that repository"
_KNOWEDIT_LICENSE = "not stated by KnowEdit (EasyEdit: MIT)"
_MEND_CF_NOTE = (
    "EasyEdit's single-prompt CounterFact split (one paraphrase and one locality prompt per record); "
    f"{_SNAPSHOT} (its first commit, before line endings were changed)"
)
_BMIKE_LANGUAGES = {"ca": "Catalan", "fr": "French", "es": "Spanish", "de": "German"}
_BMIKE_PINS = {
    "ca": ("55a1ae1e9cb252eed7c7f80eefe85ac222758864dab6de82152f1b4aab9d2e78", 1131589),
    "fr": ("a36efe8566e50202f79c6f2aa24e8d52354980ce133a16809d186686218e3bce", 1151909),
    "es": ("defce222ee9f9de7e52a00fadc517e10c2bf01a8a2cc195a9a52c8d68b8e7a2f", 1143715),
    "de": ("89fdd5d25bd9992f8de3b1b7c00bd721a897b85935d01b44133f81d3654c38bc", 1154279),
}

BUILTIN: tuple[DataSet, ...] = (
    DataSet(
        "sadr-counterfact",
        "SADR's merged CounterFact (rewrite, reasoning, relation and commonsense probes)",
        _SADR[0],
        "MIT",
        "merged",
        1678,
        (
            Pinned(
                "sadr_merged_counterfact.json",
                "39ba477f5a69989e7b8b856a72f67f533893c7d0e6944437fec800af99392f83",
                3746414,
                (_gh(*_SADR, "data/merged_counterfact.json"),),
            ),
        ),
        _SNAPSHOT,
    ),
    DataSet(
        "sadr-corpus",
        "SADR's 50 text prefixes (C4, OpenWebText, ...) for generation and perplexity",
        _SADR[0],
        "MIT",
        "text",
        50,
        (
            Pinned(
                "sadr_ppl_corpus50.json",
                "5dff6b23fbce5d9fc600998160ba448304ff37b7a8c931d7df1835c21b41f2bb",
                9709,
                (_gh(*_SADR, "data/ppl_test/Corpus-50.json"),),
            ),
        ),
        _SNAPSHOT,
    ),
    DataSet(
        "counterfact",
        "CounterFact, ROME's full set (paraphrase, neighbourhood and generation prompts)",
        "kmeng01/rome (rome.baulab.info)",
        "MIT",
        "counterfact",
        21919,
        (
            Pinned(
                "counterfact.json",
                "d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f",
                45108470,
                (
                    f"{ROME_DATA}/counterfact.json",
                    f"{_ROME_LFS}/01d0c9f74f8effc6dc1c60ba77760722206d9a79/data/counterfact.json",
                ),
            ),
        ),
        "sha256 from the Git LFS pointer of a public copy (scalable-model-editing/rebuilding-rome); the "
        "same sha256 is published for ROME's file by independent projects",
    ),
    DataSet(
        "zsre",
        "zsRE question answering, MEMIT's evaluation split (MEND format)",
        "kmeng01/rome (rome.baulab.info)",
        "MIT",
        "memit_zsre",
        19086,
        (
            Pinned(
                "zsre_mend_eval.json",
                "8a371d512f8a6ab175db4ef672181d5c0e52da23298cb51e5a2eeea2f89aa9cd",
                8091864,
                (
                    f"{ROME_DATA}/zsre_mend_eval.json",
                    _gh(
                        "wpwpwpyo/SCRO",
                        "ec2675a34498953ac1cca96030560cd9e812f9da",
                        "data/zsre_mend_eval.json",
                    ),
                ),
            ),
        ),
        "sha256 as two independent projects publish it for ROME's file (no public snapshot of the bytes "
        "could be read to compute it here; the size matches a public copy's)",
    ),
    *(
        DataSet(
            f"counterfact-mend{suffix}",
            f"CounterFact in MEND/EasyEdit form, {split} split",
            "zjunlp/EasyEdit (copy: Jometeorie/KnowledgeSpread)",
            "Apache-2.0 (the copy's README)",
            "mend_counterfact",
            records,
            (Pinned(f"counterfact_mendfmt_{split}.json", sha, size, (_gh(*_MEND_CF, path),)),),
            _MEND_CF_NOTE,
        )
        for suffix, split, records, sha, size, path in (
            (
                "",
                "edit",
                10000,
                "20c225e6299b3c5b2c569bd9103aa212806e0d1e6e0c307de5c379773979b967",
                3850773,
                "data/counterfact/counterfact-edit.json",
            ),
            (
                "-train",
                "train",
                10000,
                "bb40e12c7b740d6859e521674cf438f063c7c3e444bc1b449e74cdd0900772d0",
                3849872,
                "data/counterfact/counterfact-train.json",
            ),
            (
                "-val",
                "val",
                1919,
                "4feb68cc1f85dcf3b285252a28f2b2193ff69971947619356236953be60ecd1f",
                741112,
                "data/counterfact/counterfact-val.json",
            ),
        )
    ),
    DataSet(
        "zsre-train-1k",
        "zsRE, 1,000 records of the MEND training split",
        "Jometeorie/KnowledgeSpread",
        "Apache-2.0 (the repository's README)",
        "memit_zsre",
        1000,
        (
            Pinned(
                "zsre_memit_format_train_1k.json",
                "b61ec0989f9aa1aaef531b91e82ab45b0f5febeaace89d3bf63d93a94d9315cc",
                524937,
                (_gh(*_MEND_CF, "data/zsre/zsre_mend_train-1k.json"),),
            ),
        ),
        f"{_SNAPSHOT} (its first commit)",
    ),
    DataSet(
        "knowedit-counterfact",
        "KnowEdit WikiData_counterfact, test split (portability and locality probes)",
        "zjunlp/KnowEdit (Hugging Face)",
        _KNOWEDIT_LICENSE,
        "knowedit",
        839,
        (
            Pinned(
                "knowedit_wiki_counterfact_test_cf.json",
                "efc01ba398dfe04975939f729aab45523addb3c6b3cf41d7429ba5de1d45225b",
                2924593,
                (
                    f"{_KNOWEDIT_HUB}/wiki_counterfact/test_cf.json",
                    _gh(*_KNOWEDIT_COPY, f"{_KNOWEDIT_DIR}/wiki_counterfact/test_cf.json"),
                ),
            ),
        ),
        f"{_SNAPSHOT} (wyren726/benchmark-1); the same sha256 is published for the Hugging Face file",
    ),
    DataSet(
        "knowedit-counterfact-train",
        "KnowEdit WikiData_counterfact, train split",
        "zjunlp/KnowEdit (Hugging Face)",
        _KNOWEDIT_LICENSE,
        "knowedit",
        1427,
        (
            Pinned(
                "knowedit_wiki_counterfact_train_cf.json",
                "0e535169a46e759245667c40041ed31b3c38daf1818ee29b304c12b5d77f23ea",
                1386892,
                (
                    _gh(*_KNOWEDIT_COPY, f"{_KNOWEDIT_DIR}/wiki_counterfact/train_cf.json"),
                    f"{_KNOWEDIT_HUB}/wiki_counterfact/train_cf.json",
                ),
            ),
        ),
        f"{_SNAPSHOT} (wyren726/benchmark-1); not confirmed byte-identical to the Hugging Face file",
    ),
    DataSet(
        "knowedit-zsre",
        "KnowEdit ZsRE, test split (portability and locality probes)",
        "zjunlp/KnowEdit (Hugging Face)",
        _KNOWEDIT_LICENSE,
        "knowedit",
        1301,
        (
            Pinned(
                "knowedit_zsre_test_all.json",
                "0e0214dda853a906ef02bef58c7ce2978af5a962e91fc4a10827e0125459905c",
                1519289,
                (
                    f"{_KNOWEDIT_HUB}/ZsRE/ZsRE-test-all.json",
                    _gh(*_KNOWEDIT_COPY, f"{_KNOWEDIT_DIR}/zsre/ZsRE-test-all.json"),
                ),
            ),
        ),
        f"{_SNAPSHOT} (wyren726/benchmark-1); the same sha256 is published for the Hugging Face file",
    ),
    *(
        DataSet(
            f"bmike53-{lang}",
            f"BMIKE-53 CounterFact, English and {language} (bilingual records)",
            _BMIKE[0],
            "MIT (the data set's Hugging Face card; no license file in the repository)",
            "bmike53",
            1031,
            (
                Pinned(
                    f"bmike53_counterfact_en_{lang}.json",
                    *_BMIKE_PINS[lang],
                    (_gh(*_BMIKE, f"data/BMIKE53/CounterFact/counterfact_test_{lang}.json"),),
                ),
            ),
            _SNAPSHOT,
        )
        for lang, language in _BMIKE_LANGUAGES.items()
    ),
    DataSet(
        "wikitext2",
        "WikiText-2 test split, tokenized version (one paragraph per line)",
        "WikiText (Merity et al.; copy: pytorch/examples)",
        "CC BY-SA (WikiText); the copy's repository: BSD-3-Clause",
        "text",
        4358,
        (
            Pinned(
                "wikitext2_test.txt",
                "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
                1256449,
                (_gh(*_TORCH_EXAMPLES, "word_language_model/data/wikitext-2/test.txt"),),
            ),
        ),
        f"{_SNAPSHOT}; independent projects publish the same sha256",
    ),
    DataSet(
        "wikitext2-valid",
        "WikiText-2 validation split, tokenized version",
        "WikiText (Merity et al.; copy: pytorch/examples)",
        "CC BY-SA (WikiText); the copy's repository: BSD-3-Clause",
        "text",
        3760,
        (
            Pinned(
                "wikitext2_valid.txt",
                "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
                1121681,
                (_gh(*_TORCH_EXAMPLES, "word_language_model/data/wikitext-2/valid.txt"),),
            ),
        ),
        f"{_SNAPSHOT}; independent projects publish the same sha256",
    ),
    DataSet(
        "piqa",
        "PIQA validation split: questions (JSON lines) and their labels",
        "ybisk/piqa (yonatanbisk.com/piqa; copy with record ids: declare-lab/TEAM)",
        "not stated by PIQA (the copy's repository: MIT)",
        "piqa",
        1838,
        (
            Pinned(
                "piqa_valid.jsonl",
                "a73f46cb5d72b2cc399522a79f27728a429d9b89d9a236243fcfda8c02588d54",
                580477,
                (_gh(*_PIQA, "data/piqa/dev.jsonl"),),
            ),
            Pinned(
                "piqa_valid_labels.lst",
                "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb",
                3676,
                (
                    "https://yonatanbisk.com/piqa/data/valid-labels.lst",
                    _gh(*_PIQA, "data/piqa/dev-labels.lst"),
                ),
            ),
        ),
        f"{_SNAPSHOT}; the questions file is the copy that adds an `id` to every record",
    ),
    DataSet(
        "rome-known",
        "ROME's known facts (facts GPT-2 XL knows; for tracing and retention checks)",
        "kmeng01/rome (rome.baulab.info; copy: MaxLEAF3824/gpt_re)",
        "MIT (ROME)",
        "known-facts",
        1209,
        (
            Pinned(
                "rome_known_1000.json",
                "4e0e0d22d5a8539579babf6142e960ec2beb4ff933c2995362b05c5c3b730b96",
                343217,
                (_gh(*_KNOWN, "data/known_1000.json"),),
            ),
        ),
        f"{_SNAPSHOT}; that copy differs from ROME's published file in one `prediction`",
    ),
)
"""The data sets shipped in the registry."""


DATASETS: dict[str, DataSet] = {}
"""Every registered data set by name (``register_dataset`` adds one)."""


def register_dataset(dataset: DataSet) -> DataSet:
    """Add ``dataset`` to the registry (a name already taken is an error)."""
    if dataset.name in DATASETS:
        raise ValueError(f"a data set named {dataset.name!r} is already registered")
    if not dataset.files:
        raise ValueError(f"data set {dataset.name!r} has no files")
    DATASETS[dataset.name] = dataset
    return dataset


for _dataset in BUILTIN:
    register_dataset(_dataset)


def get_dataset(name: str) -> DataSet:
    """The registered data set ``name``; an unknown name is an error listing the names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DataSetError(
            f"no data set named {name!r}; registered: {', '.join(DATASETS)} (attnedit data list)"
        ) from None


def data_dirs() -> list[Path]:
    """The folders of ``$ATTNEDIT_DATA``, in order."""
    return [Path(p) for p in os.environ.get(DATA_ENV, "").split(os.pathsep) if p]


def data_cache() -> Path:
    """Where downloaded data sets are kept: ``$ATTNEDIT_CACHE/data``."""
    return cache_dir() / "data"


Where = Literal["ATTNEDIT_DATA", "cache", "missing"]


def locate(file: Pinned) -> tuple[Path | None, Where]:
    """Where ``file`` is on this machine, without downloading: the first ``$ATTNEDIT_DATA`` folder
    holding it, else the cache, else nowhere."""
    for folder in data_dirs():
        if (folder / file.name).is_file():
            return folder / file.name, "ATTNEDIT_DATA"
    cached = data_cache() / file.name
    if cached.is_file():
        return cached, "cache"
    return None, "missing"


def fetch_command(*names: str) -> str:
    return "attnedit data fetch " + " ".join(names)


def dataset_files(
    name: str, download_missing: bool = True, progress: bool = True, timeout: float = 60.0
) -> list[Path]:
    """The paths of every file of data set ``name``, downloading the missing ones into the cache
    (``download_missing`` False: a missing file is a ``DataSetError`` saying what to run)."""
    dataset = get_dataset(name)
    paths = []
    for file in dataset.files:
        path, _ = locate(file)
        if path is None:
            if not download_missing:
                raise DataSetError(
                    f"data set {name!r} is not on this machine ({file.name}): run `{fetch_command(name)}` "
                    f"(or put the file in a folder listed in ${DATA_ENV})"
                )
            path = download(file, data_cache() / file.name, f"data set {name!r}", timeout, progress)
        paths.append(path)
    return paths


def dataset_path(name: str, download_missing: bool = True, progress: bool = True) -> Path:
    """The path of the first (main) file of data set ``name`` (see ``dataset_files``)."""
    return dataset_files(name, download_missing, progress)[0]


def resolve(spec: str | Path, download_missing: bool = True) -> Path:
    """A data argument as a path: an existing file is itself; a registered name is its data set's main
    file (found or downloaded); anything else is a ``FileNotFoundError`` naming both readings."""
    path = Path(spec)
    if path.is_file():
        return path
    name = str(spec)
    if name in DATASETS:
        return dataset_path(name, download_missing)
    raise FileNotFoundError(
        f"{spec}: no such file, and no data set of that name (registered: {', '.join(DATASETS)})"
    )


@dataclass(frozen=True)
class FileStatus:
    """What ``verify`` found for one file of a data set."""

    dataset: str
    file: str
    where: Where
    path: Path | None
    matches: bool | None  # sha256 equals the pinned one; None where missing

    @property
    def problem(self) -> bool:
        """A cached file that does not match (a local ``$ATTNEDIT_DATA`` copy may differ on purpose)."""
        return self.where == "cache" and self.matches is False


def verify(names: list[str] | None = None) -> list[FileStatus]:
    """Check every file of the named data sets (all when None) found on this machine against its
    pinned sha256."""
    out = []
    for name in names or list(DATASETS):
        for file in get_dataset(name).files:
            path, where = locate(file)
            matches = None if path is None else sha256_of(path) == file.sha256
            out.append(FileStatus(name, file.name, where, path, matches))
    return out
