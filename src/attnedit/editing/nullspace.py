"""Null-space projections of AlphaEdit: ``P = U_kept U_kept^T`` over the eigenvectors of a module's key
second moments (the statistics MEMIT uses, ``covariance.second_moments_of``) whose eigenvalues are small.

An update whose rows lie in P's range leaves the output of every key in the large-eigenvalue directions
(the keys of knowledge to preserve) unchanged. Which eigenvalues are "small" is a ``NullspaceRule``:

- ``absolute``: below ``threshold`` (the official rule, 2e-2 in every published setting; the scale of the
  eigenvalues depends on the model, so the number does not carry from one model to another),
- ``relative``: below ``threshold`` times the largest eigenvalue,
- ``fraction``: the ``threshold`` share of the directions with the smallest eigenvalues.

A projection is computed once per (model fingerprint, component, layer, statistics spec, rule) and cached
in memory on the ``ModelBundle`` and on disk under ``$ATTNEDIT_CACHE/nullspace`` (safetensors with the
sha256 of its tensors and the hash of the second moments it was computed from): a file that does not load
or verify is set aside, one of other statistics is recomputed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from attnedit.core.deltas import tensor_hash
from attnedit.core.files import cache_dir
from attnedit.core.models import ModelBundle
from attnedit.editing.covariance import (
    StatsSpec,
    corpus_key,
    read_tensor_file,
    second_moments_of,
    write_tensor_file,
)

logger = logging.getLogger(__name__)

RuleName = Literal["absolute", "relative", "fraction"]
RULES: tuple[RuleName, ...] = ("absolute", "relative", "fraction")

# the memory cache's key of one projection: (component, layer, corpus key, statistics spec, rule)
ProjectionKey = tuple[str, int, str, StatsSpec, "NullspaceRule"]


@dataclass(frozen=True)
class NullspaceRule:
    """Which eigen-directions of the key second moments P keeps (see the module's docstring)."""

    rule: RuleName = "absolute"
    threshold: float = 2e-2

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"null-space rule {self.rule!r}: expected one of {', '.join(RULES)}")
        if not self.threshold > 0 or (self.rule == "fraction" and self.threshold > 1):
            bound = "in (0, 1]" if self.rule == "fraction" else "> 0"
            raise ValueError(f"null-space threshold {self.threshold} of rule {self.rule!r}: expected {bound}")

    def kept(self, eigenvalues: torch.Tensor) -> torch.Tensor:
        """The mask of the kept directions, for ``eigenvalues`` in ascending order."""
        if self.rule == "absolute":
            return eigenvalues < self.threshold
        if self.rule == "relative":
            return eigenvalues < self.threshold * eigenvalues.max().clamp_min(0)
        count = round(self.threshold * eigenvalues.numel())
        mask = torch.zeros_like(eigenvalues, dtype=torch.bool)
        mask[:count] = True
        return mask

    def describe(self) -> str:
        """The rule as a file-name part, e.g. ``absolute-0.02``."""
        return f"{self.rule}-{self.threshold!r}"


def projection_of(moments: torch.Tensor, rule: NullspaceRule) -> tuple[torch.Tensor, int]:
    """``(P, kept)``: the projection (float32, [in, in]) onto the eigenvectors of the symmetric ``moments``
    that ``rule`` keeps, and how many it keeps. Computed in float64 (on the tensor's device)."""
    eigenvalues, vectors = torch.linalg.eigh(moments.double())
    kept = vectors[:, rule.kept(eigenvalues)]
    return (kept @ kept.T).float(), int(kept.shape[1])


def _cache_path(
    bundle: ModelBundle, component: str, layer: int, key: str, spec: StatsSpec, rule: NullspaceRule
) -> Path:
    name = f"{component}.{layer}-{key}-n{spec.samples}-t{spec.max_tokens}-{rule.describe()}.safetensors"
    return cache_dir() / "nullspace" / bundle.fingerprint[:16] / name


def _read(path: Path, moments_hash: str, size: int) -> torch.Tensor | None:
    """The cached projection at ``path`` when it verifies and was computed from these second moments."""
    found = read_tensor_file(path, "projection", (size, size))
    if found is None:
        return None
    projection, meta = found
    if meta.get("moments") != moments_hash:
        logger.info("cache file %s was computed from other statistics; recomputing it", path)
        return None
    return projection


def _write(path: Path, projection: torch.Tensor, moments_hash: str, kept: int) -> None:
    write_tensor_file(
        path, {"projection": projection.contiguous()}, {"moments": moments_hash, "kept": str(kept)}
    )


def null_space_projections(
    bundle: ModelBundle,
    component: str,
    layers: Sequence[int],
    spec: StatsSpec,
    rule: NullspaceRule,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """``{layer: P}`` (float32, [in, in], on the CPU) for the input of ``component`` at each layer: from
    memory, from disk, or computed from the (cached) second moments and cached in both."""
    memo: dict[ProjectionKey, torch.Tensor] = bundle.cache.setdefault("nullspace", {})
    key = corpus_key(spec)
    result: dict[int, torch.Tensor] = {}
    missing = [layer for layer in layers if (component, layer, key, spec, rule) not in memo]
    moments = second_moments_of(bundle, {component: missing}, spec, progress)[component] if missing else {}
    device = bundle.device if bundle.device.type == "cuda" else torch.device("cpu")
    for layer in layers:
        if layer not in moments:
            result[layer] = memo[(component, layer, key, spec, rule)]
            continue
        path = _cache_path(bundle, component, layer, key, spec, rule)
        moments_hash = tensor_hash(moments[layer])
        projection = _read(path, moments_hash, moments[layer].shape[0]) if path.is_file() else None
        if projection is None:
            projection, kept = projection_of(moments[layer].to(device), rule)
            projection = projection.cpu()
            size = moments[layer].shape[0]
            logger.info(
                "%s layer %d: the null-space projection keeps %d of %d directions (%s)",
                component,
                layer,
                kept,
                size,
                rule.describe(),
            )
            if kept == 0:
                logger.warning(
                    "%s layer %d: rule %s keeps no direction, so AlphaEdit cannot change this layer",
                    component,
                    layer,
                    rule.describe(),
                )
            _write(path, projection, moments_hash, kept)
        result[layer] = memo[(component, layer, key, spec, rule)] = projection
    return result
