"""The edit inspector's model side: one worker that applies, measures and reverts edits on a shared model.

The weights are shared by every request, so everything that runs the model goes through one worker
thread, in the order of arrival (``Inspector.submit``): an edit is applied, its answers measured and the
edit reverted inside one task, and after every task that changed weights the model's hash
(``core.deltas.model_hash``) is checked against the hash taken at start. A finished edit keeps only its
deltas (``WeightEdit``); the drift grid runs edited and unedited rows in one batched pass with per-row
deltas (``interventions.row_deltas``), without touching the weights, and patching applies the edit and
reverts it again. Finished edits are kept in a bounded LRU.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from attnedit.analysis.drift import LastTokenAttention, drift_kl, record_last_token_attention
from attnedit.analysis.engine import token_texts
from attnedit.analysis.patching import patch_attention, record_attention
from attnedit.api import (
    EditCase,
    Editor,
    EditRequest,
    ModelBundle,
    PresetError,
    WeightEdit,
    method_choices,
    parse_method,
)
from attnedit.api import editor as method_editor
from attnedit.core.data import Probe
from attnedit.core.deltas import model_hash
from attnedit.core.extras import MissingExtraError
from attnedit.core.interventions import row_deltas
from attnedit.core.tokens import SubjectNotFoundError, encode_prompt, fill_prompt, locate_subject
from attnedit.editing.adam import on_step
from attnedit.editing.sadr import SadrTerm, select_heads
from attnedit.evaluation.answers import probe_answers
from attnedit.evaluation.metrics import distracted

logger = logging.getLogger(__name__)

T = TypeVar("T")  # what a queued task returns

MAX_PROMPT_CHARS = 400  # a request's prompts (and probe prompts) are refused above this length
MAX_PROBES = 8  # paraphrase / neighbour / relation prompts per kind
MAX_EDITS = 16  # finished edits kept in memory (least recently used dropped first)
MAX_JOBS = 256  # progress logs kept (a job's log is dropped with the oldest ones)
# preset fields a browser may not set: they name files or datasets on the server
SERVER_ONLY_PARAMS = ("stats_corpus",)
# the settings the method selector shows (when the preset has them)
MAIN_SETTINGS = ("layers", "attn_layers", "steps", "lr", "alpha", "norm_constraint", "heads")
PROBE_KINDS = ("rewrite", "paraphrase", "neighbor", "distracted_neighbor", "relation")


class InputError(ValueError):
    """A request the inspector refuses; ``field`` names the offending input, ``status`` the HTTP code."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status


class WeightsChangedError(RuntimeError):
    """The model's weights differ from those at start after a task: the inspector stops editing."""


def method_settings(bundle: ModelBundle, method: str) -> dict[str, Any]:
    """The main settings of ``method`` from the bundle model's preset (``preset`` None: the model has
    no preset for it, and an edit must give the settings, e.g. ``layers``), every setting it takes
    (``fields``; SADR's as ``sadr_KEY``) and their JSON schema (types, ranges, defaults, help)."""
    choice = parse_method(method)
    spec = choice.spec
    info: dict[str, Any] = {
        "name": choice.name,
        "base": spec.name,
        "sadr": choice.sadr,
        "summary": spec.summary,
        "fields": [f for f in choice.fields() if f not in SERVER_ONLY_PARAMS],
        "schema": choice.schema(),
    }
    if spec.params is None:
        return {**info, "preset": "none", "settings": {}}
    try:
        data = spec.load_preset(bundle.name)
    except PresetError:  # no preset for this model (a preset file that does not parse is an error)
        return {**info, "preset": None, "settings": {}}
    own = spec.params.model_fields
    view = choice.preset_view(data)  # the main settings, and SADR's
    settings = {k: v for k, v in view.items() if k in MAIN_SETTINGS or k not in own}
    return {**info, "preset": data.get("model"), "settings": settings}


def _check_setting(key: str, value: Any) -> None:
    if key in SERVER_ONLY_PARAMS or key == "preset":
        raise InputError(f"params.{key}", f"params.{key} is set on the server (a preset), not in a request")
    scalars = (int, float, bool, str)
    ok = isinstance(value, scalars) or (
        isinstance(value, list)
        and all(
            isinstance(v, scalars) or (isinstance(v, list) and all(isinstance(w, scalars) for w in v))
            for v in value
        )
    )
    if not ok or (isinstance(value, str) and len(value) > 100):
        raise InputError(f"params.{key}", f"params.{key}: expected a number, a short text or a list of them")


def build_editor(bundle: ModelBundle, method: str, params: dict[str, Any]) -> Editor:
    """The editor for ``method`` with the preset of the bundle's model and ``params`` (its fields; for
    ``+sadr`` methods also SADR's, as ``sadr_KEY`` or, where the method has no such field, by name: see
    ``Method.split``). Bad input is an ``InputError``."""
    try:
        choice = parse_method(method)
    except ValueError:
        available = ", ".join(method_choices())
        raise InputError("method", f"unknown method {method!r}; available: {available}") from None
    for key, value in params.items():
        _check_setting(key, value)
    try:
        return method_editor(bundle, choice, **params)
    except (ValueError, TypeError) as err:  # PresetError is a ValueError: a bad field or no preset
        raise InputError("params", str(err)) from None
    except MissingExtraError as err:  # MEMAT without scikit-learn on the server: what to install there
        raise InputError("method", str(err)) from None


def _clean(name: str, text: Any, required: bool = True) -> str:
    if not isinstance(text, str):
        raise InputError(name, f"{name} must be text")
    if required and not text.strip():
        raise InputError(name, f"{name} is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(name, f"{name} is longer than {MAX_PROMPT_CHARS} characters")
    return text


def build_case(
    bundle: ModelBundle,
    prompt: str,
    subject: str,
    target_new: str,
    target_true: str,
    probes: Mapping[str, Sequence[str]],
) -> tuple[EditCase, list[tuple[str, str]]]:
    """The case to edit and the (kind, prompt) probes whose answers are shown, checked field by field."""
    prompt = _clean("prompt", prompt)
    subject = _clean("subject", subject)
    target_new = _clean("target_new", target_new)
    target_true = _clean("target_true", target_true)
    if target_new.strip().lower() == target_true.strip().lower():
        raise InputError("target_new", "target_new equals target_true: nothing to edit")
    try:
        text, _ = fill_prompt(prompt, subject)
        locate_subject(bundle.tokenizer, prompt, subject)
    except SubjectNotFoundError as err:
        raise InputError("subject", f"subject: {err}") from None
    request = EditRequest(prompt, subject, target_new, target_true)
    lists: dict[str, list[str]] = {}
    for kind in ("paraphrase", "neighbors", "relation"):
        given = list(probes.get(kind) or [])
        if len(given) > MAX_PROBES:
            raise InputError(kind, f"{kind}: at most {MAX_PROBES} prompts")
        lists[kind] = [_clean(f"{kind}[{i}]", p) for i, p in enumerate(given) if p.strip()]
    case = EditCase(
        case_id="inspector",
        request=request,
        rewrite=(Probe(text, target_new),),
        paraphrase=tuple(Probe(p, target_new) for p in lists["paraphrase"]),
        neighborhood=tuple(Probe(p, target_true) for p in lists["neighbors"]),
        relation=tuple(Probe(p, "") for p in lists["relation"]),
    )
    shown = [("rewrite", text)]
    shown += [("paraphrase", p) for p in lists["paraphrase"]]
    shown += [("neighbor", p) for p in lists["neighbors"]]
    shown += [("distracted_neighbor", distracted(case, p)) for p in lists["neighbors"]]
    shown += [("relation", p) for p in lists["relation"]]
    return case, shown


@dataclass
class Job:
    """One task in the worker's queue, with the progress events it has sent (read by the event stream)."""

    id: str
    kind: str
    events: list[dict] = field(default_factory=list)
    state: str = "queued"  # queued | running | done | failed
    done: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, **data: Any) -> None:
        """Record an event (appending to a list is atomic: readers in other threads see whole events)."""
        self.events.append({"type": kind, "time": time.time(), **data})


@dataclass
class Recording:
    """The last token's attention of one probe prompt, unedited (row 0) and edited (row 1)."""

    prompt: str
    tokens: list[str]
    attention: LastTokenAttention
    kl: np.ndarray  # [layers, heads]
    selected: np.ndarray  # [layers, heads] bool: the heads SADR would select (none without the subject)
    subject_span: tuple[int, int] | None  # first and last token of the subject in the prompt


@dataclass
class EditSession:
    """A finished edit: its request, its deltas and what has been measured on it so far."""

    id: str
    method: str
    case: EditCase
    probes: list[tuple[str, str]]
    editor: Editor
    edit: WeightEdit | None = None
    results: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    recordings: dict[str, Recording] = field(default_factory=dict)
    patching: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0

    def request_json(self) -> dict:
        req = self.case.request
        return {
            "method": self.method,
            **dataclasses.asdict(req),
            "paraphrase": [p.prompt for p in self.case.paraphrase],
            "neighbors": [p.prompt for p in self.case.neighborhood],
            "relation": [p.prompt for p in self.case.relation],
        }


def _sadr_rule(editor: Editor, n_layers: int) -> tuple[str, np.ndarray]:
    """The head rule of the editor's SADR term (the paper's ``selective`` without one) and its layers."""
    mask = np.ones(n_layers, dtype=bool)
    for term in getattr(editor, "terms", []):
        if isinstance(term, SadrTerm):
            if term.settings.layers is not None:
                lo, hi = term.settings.layers
                mask = (np.arange(n_layers) >= lo) & (np.arange(n_layers) <= hi)
            return term.settings.heads, mask
    return "selective", mask


class Inspector:
    """One model, one worker: every model computation is a task run in arrival order."""

    def __init__(self, bundle: ModelBundle, max_edits: int = MAX_EDITS):
        self.bundle = bundle
        self.max_edits = max_edits
        self.original_hash = model_hash(bundle.model)
        self.broken: str | None = None  # why editing stopped (the weights changed), if it did
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnedit-inspector")
        self._lock = threading.Lock()
        self._pending: list[str] = []  # ids of the queued and running jobs, in order
        self._edits: OrderedDict[str, EditSession] = OrderedDict()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._counter = itertools.count()

    # --- queue ---------------------------------------------------------------------------------------

    def new_job(self, kind: str) -> Job:
        job = Job(id=f"{next(self._counter):04d}{uuid.uuid4().hex[:8]}", kind=kind)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > MAX_JOBS:
                self._jobs.popitem(last=False)
        return job

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def position(self, job_id: str) -> int:
        """How many tasks run or wait before this one (0: it runs now); -1 when it is not queued."""
        with self._lock:
            return self._pending.index(job_id) if job_id in self._pending else -1

    def submit(self, job: Job, task: Callable[[], T], changes_weights: bool) -> Future[T]:
        """Queue ``task``; its weights are checked against the start hash after it, failures included."""
        if self.broken:
            raise WeightsChangedError(self.broken)
        with self._lock:
            self._pending.append(job.id)
            ahead = len(self._pending) - 1
        job.emit("queued", position=ahead)

        def run() -> T:
            job.state = "running"
            job.emit("running")
            try:
                result = task()
                job.state = "done"
                return result
            except BaseException as err:
                job.state = "failed"
                job.emit("error", error=str(err), field=getattr(err, "field", None))
                raise
            finally:
                try:
                    if changes_weights:
                        self._check_weights()
                finally:
                    with self._lock:
                        self._pending.remove(job.id)
                    job.done.set()

        return self._executor.submit(run)

    def _check_weights(self) -> None:
        if model_hash(self.bundle.model) != self.original_hash:
            self.broken = "the model's weights differ from those at start after a request; restart the server"
            logger.error(self.broken)
            raise WeightsChangedError(self.broken)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    # --- edits ---------------------------------------------------------------------------------------

    def get(self, edit_id: str) -> EditSession:
        """A finished edit by id (marked recently used); ``InputError`` (404) for an unknown one."""
        with self._lock:
            session = self._edits.get(edit_id)
            if session is None or session.edit is None:
                raise InputError("id", f"no edit {edit_id!r} (unknown, failed or dropped)", status=404)
            self._edits.move_to_end(edit_id)
            return session

    def start_edit(
        self, job: Job, method: str, case: EditCase, probes: list[tuple[str, str]], editor: Editor
    ) -> Future[EditSession]:
        """Queue the edit of ``case``: answers before, the edit (steps streamed), answers after, revert."""
        session = EditSession(job.id, method, case, probes, editor)
        return self.submit(job, lambda: self._run_edit(job, session), changes_weights=True)

    def _run_edit(self, job: Job, session: EditSession) -> EditSession:
        bundle, request = self.bundle, session.case.request
        start = time.perf_counter()
        before = probe_answers(bundle, session.probes, request)

        def step(what: str, step: int, losses: list[float], parts: dict[str, list[float]]) -> None:
            job.emit(
                "step",
                what=what,
                step=step,
                loss=losses[0] if len(losses) == 1 else losses,
                parts={k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in parts.items()},
            )

        with on_step(step):
            applied = session.editor.apply(bundle, [session.case])
        try:
            after = probe_answers(bundle, session.probes, request)
        finally:
            applied.revert()
        session.edit = applied.edit
        session.info = applied.edit.info
        session.results = [
            {
                "kind": kind,
                "prompt": prompt,
                "before": dataclasses.asdict(b),
                "after": dataclasses.asdict(a),
            }
            for (kind, prompt), b, a in zip(session.probes, before, after, strict=True)
        ]
        session.seconds = time.perf_counter() - start
        with self._lock:
            self._edits[session.id] = session
            while len(self._edits) > self.max_edits:
                self._edits.popitem(last=False)
        job.emit("done", id=session.id)
        return session

    # --- measurements on a finished edit ---------------------------------------------------------------

    def probe_prompt(self, session: EditSession, prompt: str | None) -> str:
        """The probe prompt of a grid (default: the edit prompt), checked like a request's prompts."""
        if prompt is None or not prompt.strip():
            return session.case.request.text
        return _clean("prompt", prompt)

    def record(self, session: EditSession, prompt: str) -> Recording:
        """The drift recording of ``prompt`` (computed once per edit and prompt, in the worker)."""
        if prompt in session.recordings:
            return session.recordings[prompt]
        job = self.new_job("grid")
        return self.submit(job, lambda: self._record(session, prompt), changes_weights=False).result()

    def _record(self, session: EditSession, prompt: str) -> Recording:
        if prompt in session.recordings:
            return session.recordings[prompt]
        bundle = self.bundle
        assert session.edit is not None
        # one batched pass: row 0 runs the unedited weights, row 1 the weights plus the edit's deltas
        with row_deltas(bundle.model, [{}, session.edit.deltas], [0, 1]):
            both = record_last_token_attention(bundle, [prompt, prompt])
        unedited, edited = torch.from_numpy(both.attention[0]), torch.from_numpy(both.attention[1])
        kl = drift_kl(unedited, edited).numpy()
        ids = encode_prompt(bundle.tokenizer, prompt)
        tokens = token_texts(bundle, ids)
        n_layers, n_heads = kl.shape
        selected = np.zeros((n_layers, n_heads), dtype=bool)
        span = None
        try:
            located = locate_subject(bundle.tokenizer, prompt, session.case.request.subject)
            if located.input_ids == ids:
                span = (located.first_token, located.last_token)
        except SubjectNotFoundError:
            pass
        if span is not None:
            rule, layer_mask = _sadr_rule(session.editor, n_layers)
            fact = torch.tensor([span[1]])
            chosen = select_heads(unedited[:, None], edited[:, None], fact, rule)[:, 0].numpy()
            selected = chosen & layer_mask[:, None]
        recording = Recording(prompt, tokens, both, kl, selected, span)
        session.recordings[prompt] = recording
        return recording

    def patch(self, session: EditSession, prompt: str, window: int) -> dict:
        """The attention patching curve of ``prompt`` (SADR figure 5): the edited model with the unedited
        attention probabilities patched back over the window of layers centred on each layer."""
        key = f"{window}\n{prompt}"
        if key in session.patching:
            return session.patching[key]
        job = self.new_job("patching")
        task = lambda: self._patch(session, prompt, window, key)  # noqa: E731
        return self.submit(job, task, changes_weights=True).result()

    def _patch(self, session: EditSession, prompt: str, window: int, key: str) -> dict:
        bundle, req = self.bundle, session.case.request
        assert session.edit is not None
        recorded = record_attention(bundle, [prompt])
        applied = session.edit.apply(bundle.model)
        try:
            effects = patch_attention(bundle, recorded, [(req.target_true, req.target_new)], window=window)
        finally:
            applied.revert()
        curve = effects.values[0]  # [layers, 2]
        result = {
            "prompt": prompt,
            "window": window,
            "targets": [req.target_true, req.target_new],
            "base": {"p_true": float(effects.base[0, 0]), "p_new": float(effects.base[0, 1])},
            "layers": list(range(curve.shape[0])),
            "p_true": [float(v) for v in curve[:, 0]],
            "p_new": [float(v) for v in curve[:, 1]],
        }
        session.patching[key] = result
        return result

    def grid_json(self, session: EditSession, recording: Recording) -> dict:
        return {
            "id": session.id,
            "prompt": recording.prompt,
            "layers": int(recording.kl.shape[0]),
            "heads": int(recording.kl.shape[1]),
            "kl": [[float(v) for v in row] for row in recording.kl],
            "selected": [[bool(v) for v in row] for row in recording.selected],
            "tokens": recording.tokens,
            "subject_span": list(recording.subject_span) if recording.subject_span else None,
        }

    def head_json(self, recording: Recording, layer: int, head: int) -> dict:
        n_layers, n_heads = recording.kl.shape
        if not 0 <= layer < n_layers:
            raise InputError("layer", f"layer must be in 0..{n_layers - 1}")
        if not 0 <= head < n_heads:
            raise InputError("head", f"head must be in 0..{n_heads - 1}")
        length = int(recording.attention.lengths[0])
        att = recording.attention.attention
        return {
            "prompt": recording.prompt,
            "layer": layer,
            "head": head,
            "tokens": recording.tokens,
            "before": [float(v) for v in att[0, layer, head, :length]],
            "after": [float(v) for v in att[1, layer, head, :length]],
            "kl": float(recording.kl[layer, head]),
            "selected": bool(recording.selected[layer, head]),
            "subject_span": list(recording.subject_span) if recording.subject_span else None,
        }

    def view_json(self, session: EditSession) -> dict:
        """Everything known about an edit: the request, answers, and the grids and curves computed so far."""
        return {
            "id": session.id,
            "model": self.bundle.name,
            "request": session.request_json(),
            "hyperparameters": session.editor.hyperparameters(),
            "info": session.info,
            "seconds": session.seconds,
            "results": session.results,
            "grids": [self.grid_json(session, r) for r in session.recordings.values()],
            "patching": list(session.patching.values()),
        }
