"""PMET: MEMIT with deltas at the attention and MLP outputs of the last edit layer; only the MLP part
is the target, spread with weight 1/sqrt(L - l) over the MLP down-projections."""

from __future__ import annotations

import math
from dataclasses import dataclass

from attnedit.core.sites import Site
from attnedit.editing.methods.memit import Memit, MemitParams
from attnedit.editing.spec import MethodSpec, register


class PmetParams(MemitParams):
    """PMET's parameters: MEMIT's."""


@dataclass
class Pmet(Memit):
    """PMET (Li et al. 2024): two injections, the MLP one spread as MEMIT spreads its residual."""

    name: str = "pmet"

    def _injections(self) -> list[Site]:
        last = self.params.layers[-1]
        return [Site("attn", last), Site("mlp", last)]

    def _target_read(self) -> Site:
        return Site("mlp", self.params.layers[-1], "output")

    def _spread(self, remaining: int) -> float:
        return 1.0 / math.sqrt(remaining)


SPEC = register(
    MethodSpec(
        name="pmet",
        summary="PMET: MEMIT with attention and MLP outputs optimised together, only the MLP part written",
        params=PmetParams,
        build=Pmet,
    )
)
