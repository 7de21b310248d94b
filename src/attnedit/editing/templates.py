"""Context templates: short prefixes sampled from the model itself, put in front of edit prompts.

ROME averages its key and optimises its target over ``"{}"`` plus prefixes sampled from the model
(seeded top-k sampling from a few seed words). They are cached per model: in memory on the
``ModelBundle`` and on disk under ``$ATTNEDIT_CACHE/templates``, keyed by the model fingerprint and
the template settings, never in a module-level global.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass

from attnedit.core.models import ModelBundle, cache_dir
from attnedit.core.scoring import generate

logger = logging.getLogger(__name__)

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class TemplateSpec:
    """``lengths``: (tokens per prefix, number of prefixes) pairs; ROME uses ((5, 10), (10, 10))."""

    lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    seed_words: tuple[str, ...] = SEED_WORDS
    top_k: int = 5
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def _sanitise(text: str) -> str:
    # a sampled prefix must not contain format slots; ROME replaces braces by spaces the same way
    return text.replace("{", " ").replace("}", " ").strip()


def context_templates(bundle: ModelBundle, spec: TemplateSpec) -> list[str]:
    """``["{}", "<sampled prefix>. {}", ...]`` for this model and spec (sampled once, then cached)."""
    memo = bundle.cache.setdefault("context_templates", {})
    if spec in memo:
        return memo[spec]
    path = cache_dir() / "templates" / f"{bundle.fingerprint[:16]}-{spec.key()}.json"
    if path.is_file():
        templates = json.loads(path.read_text())
    else:
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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(templates, indent=1, ensure_ascii=False))
        tmp.replace(path)
        logger.info(
            "sampled %d context templates for %s (cached in %s)", len(templates) - 1, bundle.name, path
        )
    memo[spec] = templates
    return templates


def template_prefix(template: str) -> str:
    """The text a template puts before the prompt (``""`` for ``"{}"``)."""
    return template[: template.index("{}")]
