"""FT-L: constrained fine-tuning of MLP down-projections, the standard baseline of the editing papers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field

from attnedit.core.data import EditCase, EditRequest
from attnedit.core.deltas import AppliedEdit, EditBuilder
from attnedit.core.interventions import Trace
from attnedit.core.models import ModelBundle
from attnedit.core.tokens import encode_target, locate_subject, padding_id
from attnedit.editing.adam import adam_loop
from attnedit.editing.base import check_layers, edit_metadata, validate_request
from attnedit.editing.frozen_below import FrozenBelow
from attnedit.editing.losses import (
    LossTerm,
    StepState,
    add_terms,
    request_parts,
    target_reads,
    term_attention,
    term_kernel,
)
from attnedit.editing.presets import Layers, Params, params_dict
from attnedit.editing.rows import Row, SplitBatch, split_rows
from attnedit.editing.spec import MethodSpec, register


class FTParams(Params):
    """Constrained fine-tuning of one MLP down-projection (FT-L, the standard baseline)."""

    layers: Layers = Field(description="the layer whose MLP down-projection is fine-tuned")
    lr: float = Field(5e-4, gt=0, description="Adam's learning rate")
    steps: int = Field(25, ge=1, description="Adam steps")
    norm_constraint: float = Field(5e-4, gt=0, description="L-infinity bound on the weight change")
    early_stop_loss: float = Field(0.01, ge=0, description="stop once the new target's NLL is below this")


@dataclass
class FineTune:
    """FT-L: Adam on one layer's down-projection, NLL of o_new on the edit prompt, |Delta|_inf <= bound."""

    params: FTParams
    terms: list[LossTerm] = field(default_factory=list)
    name: str = "ft"
    preset: str = ""

    def hyperparameters(self) -> dict[str, Any]:
        """Everything that determines the edit (written to the run manifest)."""
        return {
            "preset": self.preset,
            **params_dict(self.params),
            "terms": [t.describe() for t in self.terms],
        }

    def prepare(self, bundle: ModelBundle, cases: list[EditCase]) -> None:
        """Nothing to prepare: fine-tuning needs neither templates nor statistics."""

    def apply(self, bundle: ModelBundle, cases: list[EditCase]) -> AppliedEdit:
        """Edit the model in place for all cases together; the returned edit reverts it exactly."""
        p = self.params
        check_layers(bundle, p.layers, self.name)
        requests = [validate_request(bundle, case) for case in cases]
        device = bundle.device
        rows, subject_last = [], []
        for r, req in enumerate(requests):
            span = locate_subject(bundle.tokenizer, req.prompt, req.subject)
            subject_last.append(span.last_token)
            target = encode_target(bundle.tokenizer, span.text, req.target_new, span.input_ids)
            # fact = 0: the whole prompt is recomputed (a weight change moves every position)
            rows.append(
                Row(r, tuple(span.input_ids) + tuple(target[:-1]), 0, len(span.input_ids), tuple(target), 0)
            )
        pad_id = padding_id(bundle.tokenizer)
        batch = split_rows(rows, [row.request for row in rows], pad_id, device)
        first = min(p.layers)
        with term_kernel(bundle, self.terms, first + 1):
            return self._optimise(bundle, requests, batch, first, subject_last)

    def _optimise(
        self,
        bundle: ModelBundle,
        requests: list[EditRequest],
        batch: SplitBatch,
        first: int,
        subject_last: list[int],
    ) -> AppliedEdit:
        p = self.params
        model, adapter, device = bundle.model, bundle.adapter, bundle.device
        frozen = FrozenBelow(bundle, batch, first)
        reads = target_reads(batch)
        head = adapter.unembedding(model)
        names = {adapter.module_name("mlp_down", layer): layer for layer in p.layers}
        weights = {layer: adapter.weight_view(model, "mlp_down", layer) for layer in p.layers}
        deltas = {
            layer: torch.zeros_like(w, dtype=torch.float32, requires_grad=True)
            for layer, w in weights.items()
        }
        n = len(requests)
        every_row = torch.arange(n, device=device)
        fact_key = torch.tensor(subject_last, device=device)
        parts: dict[str, torch.Tensor] = {}

        with (
            Trace(model, list(names), retain_input=True, retain_output=False) as trace,
            term_attention(bundle, self.terms, batch, first + 1) as attention,
        ):

            def add_update(y: torch.Tensor, name: str) -> torch.Tensor:
                x = trace[name].input
                assert x is not None  # retain_input: the input hook ran before this output hook
                return y + (x.float() @ deltas[names[name]].T).to(y.dtype)

            trace.edit_output = add_update

            def mean_loss(step: int) -> torch.Tensor:
                per_request = reads.row_nll(head, frozen.forward())  # one row per request
                if self.terms:
                    state = StepState(step, batch, n, attention, fact_key, every_row)
                    per_request = add_terms(self.terms, state, per_request, parts)
                # one loss for the one shared delta; float64 so that the stop rule compares it with
                # early_stop_loss exactly as a Python float (the backward pass is unchanged)
                return per_request.mean().double()[None]

            def clamp() -> None:
                for d in deltas.values():
                    d.clamp_(-p.norm_constraint, p.norm_constraint)

            result = adam_loop(
                list(deltas.values()),
                mean_loss,
                lr=p.lr,
                steps=p.steps,
                early_stop_loss=p.early_stop_loss,
                project=clamp,
                what="ft",
            )
        with EditBuilder(model) as builder:
            for layer, d in deltas.items():
                builder.add(adapter.weight_name("mlp_down", layer), adapter.to_weight_layout(d.detach()))
        info = {
            "steps": result.steps[0],
            "final_loss": result.final_loss[0],
            "loss_parts": [request_parts(parts, i) for i in range(n)],
        }
        return builder.finish(edit_metadata(self, bundle, requests, info))


SPEC = register(
    MethodSpec(
        name="ft",
        summary="FT-L: constrained fine-tuning of one MLP down-projection (the standard baseline)",
        params=FTParams,
        build=FineTune,
    )
)
