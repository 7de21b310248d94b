"""``Site``: one place in a model, the single vocabulary of editors, solvers and analyses.

A site is the ``input`` or ``output`` of one per-layer component of the adapter table (``layer``,
``attn``, ``mlp``, ``mlp_down``...) at one layer. Editors inject deltas at output sites, solvers read
keys and values at sites, analyses restore module outputs at sites; each resolves its module through
the model's adapter (``site.module_name(adapter)``), never through a family's own module names.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

from attnedit.core.adapters import COMPONENTS, ModelAdapter

Side = Literal["input", "output"]
SIDES: tuple[Side, ...] = ("input", "output")

# components whose output is a hidden state at every token: the block and its two sublayers. An edit's
# delta is injected there, and the analyses restore or substitute those outputs
HIDDEN_STATE_COMPONENTS = ("layer", "mlp", "attn")


@dataclass(frozen=True)
class Site:
    """The ``side`` (``input`` or ``output``) of adapter component ``component`` at ``layer``."""

    component: str
    layer: int
    side: Side = "output"

    def __post_init__(self) -> None:
        # the adapter table owns the component names; a site names only per-layer components
        if self.component not in COMPONENTS:
            raise ValueError(f"unknown site component {self.component!r}; known: {', '.join(COMPONENTS)}")
        if self.side not in SIDES:
            raise ValueError(f"site side must be one of {SIDES}, not {self.side!r}")
        try:
            layer = operator.index(self.layer)
        except TypeError:
            layer = -1
        if isinstance(self.layer, bool) or layer < 0:
            raise ValueError(f"site layer must be an integer >= 0, not {self.layer!r}")

    @property
    def hidden_state(self) -> bool:
        """Whether the site is a hidden state at every token (the output of a block, MLP or attention)."""
        return self.side == "output" and self.component in HIDDEN_STATE_COMPONENTS

    def module_name(self, adapter: ModelAdapter) -> str:
        """The module path of the site's component in ``adapter``'s model (range-checked there)."""
        return adapter.module_name(self.component, self.layer)

    def __str__(self) -> str:
        return f"{self.component}[{self.layer}].{self.side}"
