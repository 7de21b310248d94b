"""The on-disk cache of the target optimisation: each finished group's targets in one file.

``target_cache(directory)`` names the directory for a block (a context variable, read by
``optimise.optimise_targets`` through ``cache_directory``); ``group_key`` hashes everything a group's
targets depend on; ``GroupStore`` reads (``restore``) and writes (``keep``) one ``CachedGroup`` per file.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from attnedit.core.deltas import tensors_digest
from attnedit.core.files import atomic_write
from attnedit.core.models import ModelBundle
from attnedit.core.sites import Site
from attnedit.editing.losses import LossParts, LossTerm
from attnedit.editing.rows import Row

logger = logging.getLogger(__name__)

# where ``optimise_targets`` keeps each finished group's targets (``target_cache``)
_cache_dir: contextvars.ContextVar[Path | None] = contextvars.ContextVar("target_cache", default=None)


@contextlib.contextmanager
def target_cache(directory: str | Path | None) -> Iterator[None]:
    """Inside the block (this thread's context), ``optimise_targets`` keeps each finished group's targets
    in ``directory`` (one safetensors file per group, ``KEY.safetensors``, written atomically, with a
    digest of its tensors), and a group whose inputs match a file there takes its targets from it instead
    of being optimised again; ``directory`` None: no cache in the block. KEY hashes everything a group's
    targets depend on: the model's fingerprint and dtype, the target settings, the injection sites, the
    loss terms and the group's rows (tokens, fact positions, targets). So an interrupted batch edit
    resumes group by group with the same targets, and another method with the same targets (IntAttn-Edit's
    are MEMIT's) reuses them. Several processes may share a directory. A file that does not load or
    verify is named in a warning and not used. The key holds the model's fingerprint as loaded, not its
    current weights: use it around the unedited model only (the runner refuses it in sequential mode,
    where edits accumulate)."""
    token = _cache_dir.set(None if directory is None else Path(directory))
    try:
        yield
    finally:
        _cache_dir.reset(token)


def cache_directory() -> Path | None:
    """The directory of the innermost ``target_cache`` block of this context (None: no cache)."""
    return _cache_dir.get()


def group_key(
    bundle: ModelBundle,
    rows: list[Row],
    ids: list[int],
    injections: Sequence[Site],
    settings: Mapping[str, object],
    terms: Sequence[LossTerm],
) -> str:
    """What a group's targets are a function of, hashed (``settings``: the target settings as a dict)."""
    local = {rid: i for i, rid in enumerate(ids)}
    spec = {
        "model": bundle.fingerprint,
        "dtype": str(bundle.model.dtype),
        "settings": settings,
        "sites": [[s.component, s.layer, s.side] for s in injections],
        "terms": [t.describe() for t in terms],
        "rows": [[local[r.request], r.ids, r.fact, r.n_prompt, r.targets, r.template] for r in rows],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass
class CachedGroup:
    """One group's targets: per injection site (in order) the initial outputs and the deltas ``[n, H]``,
    and per request (in the group's order) its steps, final loss and loss parts."""

    init: list[torch.Tensor]
    delta: list[torch.Tensor]
    steps: list[int]
    final_loss: list[float]
    loss_parts: list[LossParts]


@dataclass
class GroupStore:
    """Finished groups of target optimisations, one file per group in the directory of ``target_cache``."""

    directory: Path

    def restore(self, key: str, n_sites: int, n_requests: int) -> CachedGroup | None:
        """The group's targets from its file; None when there is none to trust."""
        path = self.directory / f"{key}.safetensors"
        if not path.is_file():
            return None
        names = [f"{j}.{part}" for j in range(n_sites) for part in ("init", "delta")]
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                entry = json.loads(meta["group"])
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
            if meta.get("sha256") != tensors_digest(tensors):
                raise ValueError("its tensors do not verify against its digest")
            if sorted(tensors) != sorted(names) or any(len(entry[k]) != n_requests for k in entry):
                raise ValueError("it holds another group's shapes")
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            logger.warning("target cache file %s does not load (%s); optimising its group", path, err)
            return None
        logger.info("targets of %d request(s) taken from %s", n_requests, path)
        return CachedGroup(
            init=[tensors[f"{j}.init"] for j in range(n_sites)],
            delta=[tensors[f"{j}.delta"] for j in range(n_sites)],
            steps=entry["steps"],
            final_loss=entry["final_loss"],
            loss_parts=entry["loss_parts"],
        )

    def keep(self, key: str, group: CachedGroup) -> None:
        """Write a finished group's file."""
        tensors: dict[str, torch.Tensor] = {}
        for j, (init, delta) in enumerate(zip(group.init, group.delta, strict=True)):
            tensors[f"{j}.init"] = init.contiguous()
            tensors[f"{j}.delta"] = delta.contiguous()
        entry = {"steps": group.steps, "final_loss": group.final_loss, "loss_parts": group.loss_parts}
        meta = {"group": json.dumps(entry), "sha256": tensors_digest(tensors)}
        atomic_write(self.directory / f"{key}.safetensors", lambda tmp: save_file(tensors, str(tmp), meta))
