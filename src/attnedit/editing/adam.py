"""The one Adam loop of the optimisations (target optimisation, fine-tuning, MEMAT's head corrections).

``adam_loop``: Adam on some parameters against per-unit losses (a unit: a request with its own delta,
or the whole optimisation), each unit stopping on its own, finished units frozen, a projection after
every step; a non-finite loss is a ``NonFiniteLossError`` (nothing written to the model). ``on_step``
lets a listener (the edit inspector) hear of every step.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch


class NonFiniteLossError(FloatingPointError):
    """The optimisation produced NaN or infinity; nothing was written to the model."""


# who hears of every step of ``adam_loop`` (the edit inspector streams the steps); set by ``on_step``
StepListener = Callable[[str, int, list[float], dict[str, list[float]]], None]
_step_listener: contextvars.ContextVar[StepListener | None] = contextvars.ContextVar(
    "attnedit_step_listener", default=None
)


@contextlib.contextmanager
def on_step(listener: StepListener) -> Iterator[None]:
    """Inside the block (this thread's context), every ``adam_loop`` step calls
    ``listener(what, step, losses, parts)`` after its forward pass: the losses per unit and the loss
    parts per unit where the loop's caller gives them. It only reads detached values: nothing changes."""
    token = _step_listener.set(listener)
    try:
        yield
    finally:
        _step_listener.reset(token)


@dataclass
class LoopResult:
    """What ``adam_loop`` ran, per unit: the last step at which the unit was active, and its loss then."""

    steps: list[int]
    final_loss: list[float]


def adam_loop(
    parameters: Sequence[torch.Tensor],
    loss_fn: Callable[[int], torch.Tensor],
    *,
    lr: float,
    steps: int,
    early_stop_loss: float,
    project: Callable[[], None] | None = None,
    units: int | Sequence[object] = 1,
    what: str = "",
    parts: Mapping[str, torch.Tensor] | None = None,
) -> LoopResult:
    """Adam on ``parameters`` against per-unit losses, each unit stopping on its own.

    A unit is what has its own loss and stop rule (a request whose delta is optimised; or the whole
    optimisation, for one loss over parameters that all requests share). ``loss_fn(step)`` runs the
    step's forward pass and returns the losses ``[n_units]``. Every step: the losses of the active
    units must be finite (else ``NonFiniteLossError``); each active unit records the step and its loss,
    and stops being active once its loss falls below ``early_stop_loss`` (compared in the losses'
    dtype); the loop ends when no unit is active or after ``steps`` forward passes (the last one only
    measures). Otherwise: ``zero_grad``, backward of the sum of the active units' losses, Adam step,
    then the rows of finished units are put back to their values before the step (Adam's momentum
    would move them even without a gradient), then ``project()`` (a clamp, a projection; under
    ``no_grad``). With several units the parameters' first dimension indexes the units; a single unit's
    parameters may have any shape (the loop has ended before its unit could finish).

    ``units``: how many units, or their names (request ids, named in the non-finite error); ``what``
    prefixes that error's message. ``parts``: the loss parts ``loss_fn`` fills in, per unit, reported
    with each step to the listener of ``on_step`` (if any).
    """
    names = None if isinstance(units, int) else list(units)
    n = int(units) if isinstance(units, int) else len(units)
    optimiser = torch.optim.Adam(list(parameters), lr=lr)
    active: torch.Tensor | None = None
    last_step, last_loss = [0] * n, [math.nan] * n
    prefix = f"{what}: " if what else ""
    listener = _step_listener.get()
    for step in range(steps):
        loss = loss_fn(step)
        if loss.shape != (n,):
            raise ValueError(f"loss_fn must return one loss per unit, shape ({n},), not {tuple(loss.shape)}")
        if active is None:
            active = torch.ones(n, dtype=torch.bool, device=loss.device)
        if not torch.isfinite(loss[active]).all():
            bad = torch.nonzero(~torch.isfinite(loss)).flatten().tolist()
            where = f" for request(s) {[names[i] for i in bad]}" if names is not None else ""
            raise NonFiniteLossError(f"{prefix}non-finite loss at step {step}{where}; the model is unchanged")
        with torch.no_grad():
            for i in torch.nonzero(active).flatten().tolist():
                last_step[i] = step
                last_loss[i] = float(loss[i])
            active &= loss.detach() >= early_stop_loss
        if listener is not None:
            listener(what, step, loss.detach().tolist(), {k: v.tolist() for k, v in (parts or {}).items()})
        if not active.any() or step == steps - 1:
            break
        # finished units keep the values that met the stop rule (nothing to restore while all are active)
        kept = None if bool(active.all()) else [p.detach().clone() for p in parameters]
        optimiser.zero_grad(set_to_none=True)
        torch.autograd.backward(loss[active].sum())  # what Tensor.backward calls (which is unannotated)
        optimiser.step()
        with torch.no_grad():
            if kept is not None:
                for p, before in zip(parameters, kept, strict=True):
                    p[~active] = before[~active]
            if project is not None:
                project()
    return LoopResult(last_step, last_loss)
