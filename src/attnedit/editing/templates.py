"""Context templates: short prefixes sampled from the model itself, put in front of edit prompts.

ROME averages its key and optimises its target over ``"{}"`` plus prefixes sampled from the model
(seeded top-k sampling from a few seed words). They are cached per model: in memory on the
``ModelBundle`` and on disk under ``$ATTNEDIT_CACHE/templates``, keyed by the model fingerprint and
the template settings, never in a module-level global.

Every cache file of the package (these templates, ``covariance`` statistics) carries a sha256 digest of
its content. A file that does not parse or verify is named in a warning, set aside as ``*.bad`` and
recomputed (``set_aside``); a file written before the digests existed is recomputed and replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from attnedit.core.files import atomic_write, cache_dir
from attnedit.core.models import ModelBundle
from attnedit.core.scoring import generate

logger = logging.getLogger(__name__)

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class Language:
    """What the editing prompts look like in one language: the seed words context templates are sampled
    from, and the prompt whose next-token distribution the KL term keeps (``{}``: the subject)."""

    seed_words: tuple[str, ...]
    kl_prompt: str


# English is the references' choice; the others are ours, written the same way (MEMAT's official code
# used the English ones for every language, one of its bugs)
LANGUAGES: dict[str, Language] = {
    "en": Language(SEED_WORDS, "{} is a"),
    "fr": Language(("Le", "Donc", "Parce que", "Je", "Vous"), "{} est un"),
    "es": Language(("El", "Por lo tanto", "Porque", "Yo", "Tú"), "{} es un"),
    "de": Language(("Der", "Deshalb", "Weil", "Ich", "Du"), "{} ist ein"),
    "ca": Language(("El", "Per tant", "Perquè", "Jo", "Tu"), "{} és un"),
}


def language(code: str) -> Language:
    """The prompts of language ``code`` (``""``: English, the language of data without one)."""
    try:
        return LANGUAGES[code or "en"]
    except KeyError:
        raise ValueError(
            f"no context-template seed words or KL prompt for language {code!r}; known: "
            f"{', '.join(sorted(LANGUAGES))} (editing.templates.LANGUAGES)"
        ) from None


@dataclass(frozen=True)
class TemplateSpec:
    """``lengths``: (tokens per prefix, number of prefixes) pairs; ROME uses ((5, 10), (10, 10))."""

    lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    seed_words: tuple[str, ...] = SEED_WORDS
    top_k: int = 5
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def set_aside(path: Path, problem: str) -> None:
    """Move a damaged cache file out of the way (``<name>.bad``, replacing an earlier one), saying so."""
    aside = path.with_name(path.name + ".bad")
    path.replace(aside)
    logger.warning("cache file %s %s; moved it to %s and recomputing it", path, problem, aside.name)


def texts_digest(texts: list[str]) -> str:
    """The sha256 a cache file of texts (templates, sampled statistics texts) carries."""
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()


def read_texts(path: Path, field: str, valid: Callable[[str], bool] = lambda _: True) -> list[str] | None:
    """The texts under ``field`` of the JSON cache file at ``path`` when it parses, each text is
    ``valid`` and the list verifies against the file's ``sha256``; None otherwise (a damaged file is set
    aside, one written before digests existed is left to be replaced)."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        set_aside(path, f"does not parse ({err})")
        return None
    if isinstance(entry, list):  # written before cache files carried a digest
        logger.info("cache file %s has no digest (an older version wrote it); recomputing it", path)
        return None
    texts = entry.get(field) if isinstance(entry, dict) else None
    if (
        not isinstance(texts, list)
        or not all(isinstance(t, str) and valid(t) for t in texts)
        or entry.get("sha256") != texts_digest(texts)
    ):
        set_aside(path, "does not verify against its digest")
        return None
    return texts


def write_texts(path: Path, field: str, texts: list[str], **extra: object) -> None:
    """Write ``{**extra, "sha256": ..., field: texts}`` to ``path`` atomically (``read_texts`` reads it)."""
    entry = {**extra, "sha256": texts_digest(texts), field: texts}
    text = json.dumps(entry, indent=1, ensure_ascii=False)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _sanitise(text: str) -> str:
    # a sampled prefix must not contain format slots; ROME replaces braces by spaces the same way
    return text.replace("{", " ").replace("}", " ").strip()


def context_templates(bundle: ModelBundle, spec: TemplateSpec) -> list[str]:
    """``["{}", "<sampled prefix>. {}", ...]`` for this model and spec (sampled once, then cached)."""
    memo: dict[TemplateSpec, list[str]] = bundle.cache.setdefault("context_templates", {})
    if spec in memo:
        return memo[spec]
    path = cache_dir() / "templates" / f"{bundle.fingerprint[:16]}-{spec.key()}.json"
    templates = read_texts(path, "templates", lambda t: "{}" in t) if path.is_file() else None
    if templates is None:
        templates = ["{}"]
        for length, count in spec.lengths:
            per_word = max(1, count // len(spec.seed_words))
            prompts = [w for w in spec.seed_words for _ in range(per_word)][:count]
            texts = generate(
                bundle.model,
                bundle.tokenizer,
                prompts,
                max_new_tokens=max(1, length - 1),
                top_k=spec.top_k,
                seed=spec.seed + length,
                batch_size=len(prompts),
                adapter=bundle.adapter,
            )
            templates += [
                _sanitise(f"{p}{'' if t.startswith(' ') else ' '}{t}") + ". {}"
                for p, t in zip(prompts, texts, strict=True)
            ]
        write_texts(path, "templates", templates)
        logger.info(
            "sampled %d context templates for %s (cached in %s)", len(templates) - 1, bundle.name, path
        )
    memo[spec] = templates
    return templates


def cache_entries(bundle: ModelBundle) -> dict[TemplateSpec, list[str]]:
    """The templates in ``bundle``'s memory cache, keyed as ``context_templates`` keys them: what an
    executor ships to other workers (``install_cache_entries``) so that none samples them again."""
    return dict(bundle.cache.get("context_templates", {}))


def install_cache_entries(bundle: ModelBundle, entries: dict[TemplateSpec, list[str]]) -> None:
    """Put templates computed elsewhere (``cache_entries`` of the same model) in ``bundle``'s memory cache."""
    bundle.cache.setdefault("context_templates", {}).update(entries)


def template_prefix(template: str) -> str:
    """The text a template puts before the prompt (``""`` for ``"{}"``)."""
    return template[: template.index("{}")]
