"""The locate-then-edit methods, each a short composition of the shared blocks.

- ``rome``: v* at the MLP output of one layer (``optimise``), k* (``solvers.read_at_fact_token``),
  rank-one update of the MLP down-projection with C^-1 (``solvers.rank_one_update``).
- ``memit``: z at the residual stream after the last edit layer, spread over the edit layers in
  ascending order with least squares (``solvers.least_squares_update``), keys recomputed per layer.
- ``pmet``: deltas at the attention and MLP outputs of the last edit layer; only the MLP part is the
  target, spread with weight 1/sqrt(L - l) over the MLP down-projections as MEMIT does.
- ``ft``: constrained fine-tuning of one down-projection (L-infinity bound), the standard baseline.

Every editor returns an ``AppliedEdit`` whose ``.edit`` is a saveable ``WeightEdit``; any failure
(bad request, non-finite loss or update) leaves the model untouched. ``terms`` are extra loss terms
added to the target optimisation (SADR plugs in there).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from attnedit.core.data import EditCase, EditRequest
from attnedit.core.deltas import AppliedEdit, EditBuilder
from attnedit.core.interventions import Trace
from attnedit.core.models import ModelBundle
from attnedit.core.tokens import SubjectNotFoundError, encode_target, locate_subject, padding_id
from attnedit.editing.covariance import StatsSpec, second_moments
from attnedit.editing.optimise import (
    FrozenBelow,
    Injection,
    LossTerm,
    NonFiniteLossError,
    Row,
    SplitBatch,
    StepState,
    TargetSettings,
    add_terms,
    optimise_targets,
    request_parts,
    split_rows,
    target_reads,
    term_attention,
    term_kernel,
)
from attnedit.editing.presets import FTParams, LocateParams, MemitParams, RomeParams, params_dict
from attnedit.editing.solvers import Read, least_squares_update, rank_one_update, read_at_fact_token
from attnedit.editing.templates import TemplateSpec, context_templates

logger = logging.getLogger(__name__)


class EditRequestError(ValueError):
    """A request that cannot be edited (names the case and the field)."""


def validate_request(bundle: ModelBundle, case: EditCase) -> EditRequest:
    """Check a case's request before any weight is touched."""
    req = case.request
    where = f"case {case.case_id}"
    for name in ("target_new", "target_true", "subject"):
        value = getattr(req, name)
        if not isinstance(value, str) or not value.strip():
            raise EditRequestError(f"{where}: requested_rewrite.{name} is empty")
    if req.target_new.strip().lower() == req.target_true.strip().lower():
        raise EditRequestError(
            f"{where}: target_new equals target_true ({req.target_new!r}): nothing to edit"
        )
    try:
        locate_subject(bundle.tokenizer, req.prompt, req.subject)
    except SubjectNotFoundError as err:
        raise EditRequestError(f"{where}: requested_rewrite.subject: {err}") from None
    return req


def _check_layers(bundle: ModelBundle, layers: Sequence[int], method: str) -> None:
    bad = [layer for layer in layers if not 0 <= layer < bundle.adapter.n_layers]
    if bad:
        raise EditRequestError(f"{method}: layer(s) {bad} outside 0..{bundle.adapter.n_layers - 1}")


def target_settings(p: LocateParams) -> TargetSettings:
    return TargetSettings(
        lr=p.lr,
        steps=p.steps,
        kl_factor=p.kl_factor,
        weight_decay=p.weight_decay,
        clamp_norm_factor=p.clamp_norm_factor,
        early_stop_loss=p.early_stop_loss,
        max_rows=p.max_rows,
    )


def method_templates(bundle: ModelBundle, p: LocateParams) -> list[str]:
    spec = TemplateSpec(lengths=tuple((int(a), int(b)) for a, b in p.templates), seed=p.template_seed)
    return context_templates(bundle, spec)


def stats_spec(p: LocateParams) -> StatsSpec:
    return StatsSpec(corpus=p.stats_corpus, samples=p.stats_samples, max_tokens=p.stats_max_tokens)


def _info(result) -> dict:
    return {"steps": result.steps, "final_loss": result.final_loss, "loss_parts": result.loss_parts}


@dataclass
class Rome:
    params: RomeParams
    terms: list[LossTerm] = field(default_factory=list)
    name: str = "rome"
    preset: str = ""

    def hyperparameters(self) -> dict:
        return {
            "preset": self.preset,
            **params_dict(self.params),
            "stats": stats_spec(self.params).describe(),
            "terms": [t.describe() for t in self.terms],
        }

    def apply(self, bundle: ModelBundle, cases: list[EditCase]) -> AppliedEdit:
        if len(cases) != 1:
            raise EditRequestError("rome edits one request at a time; use --mode sequential for many")
        p = self.params
        if len(p.layers) != 1:
            raise EditRequestError(f"rome edits one layer, got layers={p.layers}")
        if p.key_mode not in ("templates", "prompt"):
            raise EditRequestError(f"rome: key_mode must be 'templates' or 'prompt', not {p.key_mode!r}")
        layer = p.layers[0]
        _check_layers(bundle, p.layers, self.name)
        request = validate_request(bundle, cases[0])
        templates = method_templates(bundle, p)
        cov = second_moments(bundle, "mlp_down", [layer], stats_spec(p))[layer]
        injection = Injection("mlp", layer)
        result = optimise_targets(bundle, [request], templates, [injection], target_settings(p), self.terms)
        keys = read_at_fact_token(bundle, [request], templates, [Read("mlp_down", layer, "input")])
        key_per_template = next(iter(keys.values()))[0]
        key = key_per_template.mean(0) if p.key_mode == "templates" else key_per_template[0]
        module = bundle.adapter.module(bundle.model, "mlp_down", layer)
        delta = rank_one_update(
            bundle.adapter.weight_view(bundle.model, "mlp_down", layer),
            getattr(module, "bias", None),
            cov,
            key,
            result.target(injection)[0],
        )
        with EditBuilder(bundle.model) as builder:
            builder.add(bundle.adapter.weight_name("mlp_down", layer), bundle.adapter.to_weight_layout(delta))
        return builder.finish(self._meta(bundle, [request], _info(result)))

    def _meta(self, bundle: ModelBundle, requests: list[EditRequest], info: dict) -> dict:
        return {
            "method": self.name,
            "hyperparameters": self.hyperparameters(),
            "requests": requests,
            "model_fingerprint": bundle.fingerprint,
            "info": info,
        }


@dataclass
class Memit(Rome):
    params: MemitParams  # type: ignore[assignment]
    terms: list[LossTerm] = field(default_factory=list)
    name: str = "memit"

    def _injections(self) -> list[Injection]:
        return [Injection("layer", self.params.layers[-1])]

    def _target_read(self) -> Read:
        """Where the current value of the target is read (MEMIT: the residual after the last layer)."""
        return Read("layer", self.params.layers[-1], "output")

    def _spread(self, remaining: int) -> float:
        return 1.0 / remaining

    def apply(self, bundle: ModelBundle, cases: list[EditCase]) -> AppliedEdit:
        p = self.params
        layers = sorted(p.layers)
        _check_layers(bundle, layers, self.name)
        requests = [validate_request(bundle, case) for case in cases]
        templates = method_templates(bundle, p)
        covs = second_moments(bundle, "mlp_down", layers, stats_spec(p))
        injections = self._injections()
        result = optimise_targets(
            bundle,
            requests,
            templates,
            injections,
            target_settings(p),
            self.terms,
            progress=len(requests) > 50,
        )
        # the MLP part for PMET, the whole residual for MEMIT
        targets = result.target(injections[-1])
        with EditBuilder(bundle.model) as builder:
            for i, layer in enumerate(layers):
                key_read = Read("mlp_down", layer, "input")
                found = read_at_fact_token(bundle, requests, templates, [key_read, self._target_read()])
                keys = found[key_read].mean(1)
                current = found[self._target_read()][:, 0]
                residual = (targets - current) * self._spread(len(layers) - i)
                delta = least_squares_update(covs[layer], keys, residual, p.mom2_update_weight)
                builder.add(
                    bundle.adapter.weight_name("mlp_down", layer), bundle.adapter.to_weight_layout(delta)
                )
        return builder.finish(self._meta(bundle, requests, _info(result)))


@dataclass
class Pmet(Memit):
    name: str = "pmet"

    def _injections(self) -> list[Injection]:
        last = self.params.layers[-1]
        return [Injection("attn", last), Injection("mlp", last)]

    def _target_read(self) -> Read:
        return Read("mlp", self.params.layers[-1], "output")

    def _spread(self, remaining: int) -> float:
        return 1.0 / math.sqrt(remaining)


@dataclass
class FineTune:
    """FT-L: Adam on one layer's down-projection, NLL of o_new on the edit prompt, |Delta|_inf <= bound."""

    params: FTParams
    name: str = "ft"
    preset: str = ""
    terms: list[LossTerm] = field(default_factory=list)

    def hyperparameters(self) -> dict:
        return {
            "preset": self.preset,
            **params_dict(self.params),
            "terms": [t.describe() for t in self.terms],
        }

    def apply(self, bundle: ModelBundle, cases: list[EditCase]) -> AppliedEdit:
        p = self.params
        _check_layers(bundle, p.layers, self.name)
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
        optimiser = torch.optim.Adam(list(deltas.values()), lr=p.lr)
        steps = 0
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
                return y + (x.float() @ deltas[names[name]].T).to(y.dtype)

            trace.edit_output = add_update
            for step in range(p.steps):
                steps = step
                per_request = reads.row_nll(head, frozen.forward())  # one row per request
                if self.terms:
                    state = StepState(step, batch, n, attention, fact_key, every_row)
                    per_request = add_terms(self.terms, state, per_request, parts)
                loss = per_request.mean()
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"ft: non-finite loss at step {step}; the model is unchanged")
                if float(loss.detach()) < p.early_stop_loss or step == p.steps - 1:
                    break
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                with torch.no_grad():
                    for d in deltas.values():
                        d.clamp_(-p.norm_constraint, p.norm_constraint)
        with EditBuilder(model) as builder:
            for layer, d in deltas.items():
                builder.add(adapter.weight_name("mlp_down", layer), adapter.to_weight_layout(d.detach()))
        return builder.finish(
            {
                "method": self.name,
                "hyperparameters": self.hyperparameters(),
                "requests": requests,
                "model_fingerprint": bundle.fingerprint,
                "info": {
                    "steps": steps,
                    "final_loss": float(loss.detach()),
                    "loss_parts": [request_parts(parts, i) for i in range(n)],
                },
            }
        )
