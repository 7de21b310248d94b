"""The edit inspector's web app: a JSON API under ``/api/`` and the page that uses it (``static/``).

``create_app(bundle, runs_root)`` serves one loaded model. Every model computation runs in the
inspector's single worker (``inspector.Inspector``), so requests may arrive in any order and number:
edits queue (their position is streamed), and the weights are the same after every request. Bad input
is a 4xx JSON answer ``{"error": ..., "field": ...}`` naming the field; nothing from a request is
evaluated, unpickled or used as a file or model path. The OpenAPI description is at ``/openapi.json``;
FastAPI's ``/docs`` and ``/redoc`` pages are off (they load their assets from a CDN).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from attnedit.analysis.engine import json_ready
from attnedit.api import ModelBundle, load_cases, method_choices
from attnedit.serve.inspector import (
    MAX_PROBES,
    InputError,
    Inspector,
    WeightsChangedError,
    build_case,
    build_editor,
    method_settings,
)
from attnedit.serve.offline import STATIC
from attnedit.serve.runs_browser import ReportError, RunNotFoundError, RunsBrowser

logger = logging.getLogger(__name__)

EVENT_POLL_SECONDS = 0.1


class EditBody(BaseModel):
    """An edit request: the fields of ``EditRequest``, the method and its settings, and the probe
    prompts whose answers are shown (paraphrases, neighbours: the distracted neighbours are derived)."""

    model_config = ConfigDict(extra="forbid")

    method: str = "rome"
    prompt: str
    subject: str
    target_new: str
    target_true: str
    params: dict[str, Any] = Field(default_factory=dict)
    paraphrase: list[str] = Field(default_factory=list, max_length=MAX_PROBES)
    neighbors: list[str] = Field(default_factory=list, max_length=MAX_PROBES)
    relation: list[str] = Field(default_factory=list, max_length=MAX_PROBES)


def _error(status: int, message: str, field: str | None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "field": field})


MAX_LISTED_CASES = 1000  # the form's case picker lists at most this many cases of the data file


def _sample_cases(data: str) -> list[dict]:
    """The request fields of the first cases of ``data`` (a data file chosen when the server starts, or
    the shipped sample set), for the form's case picker."""
    cases = []
    for i, case in enumerate(load_cases(data)[:MAX_LISTED_CASES]):
        req = case.request
        cases.append(
            {
                "index": i,
                "case_id": case.case_id,
                "prompt": req.prompt,
                "subject": req.subject,
                "target_new": req.target_new,
                "target_true": req.target_true,
                "paraphrase": [p.prompt for p in case.paraphrase],
                "neighbors": [p.prompt for p in case.neighborhood],
                "relation": [p.prompt for p in case.relation],
            }
        )
    return cases


def create_app(bundle: ModelBundle, runs_root: Path | None = None, data: str = "sample") -> FastAPI:
    """The inspector app for one loaded model; ``runs_root``: the directory the runs browser reads;
    ``data``: the data file whose cases the form offers (the shipped sample set by default). Both are
    the server's choice: no path is taken from the browser."""
    listed = _sample_cases(data)  # read once: a bad file fails at start, not in the page
    inspector = Inspector(bundle)
    browser = RunsBrowser(runs_root) if runs_root is not None else None

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        inspector.close()

    app = FastAPI(
        title="attnedit inspector",
        summary="Edit a fact, see what the edit did to the model's answers and attention.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.inspector = inspector

    @app.exception_handler(InputError)
    async def input_error(_request: Request, err: InputError) -> JSONResponse:
        return _error(err.status, err.message, err.field)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or "body"
        return _error(422, f"{field}: {first.get('msg', 'invalid')}", field)

    @app.exception_handler(RunNotFoundError)
    async def run_not_found(_request: Request, _err: RunNotFoundError) -> JSONResponse:
        return _error(404, "no such run directory under the runs root", "path")

    @app.exception_handler(ReportError)
    async def report_error(_request: Request, err: ReportError) -> JSONResponse:
        return _error(422, str(err), err.field)

    @app.exception_handler(WeightsChangedError)
    async def weights_changed(_request: Request, err: WeightsChangedError) -> JSONResponse:
        return _error(503, str(err), None)

    @app.get("/healthz")
    def healthz() -> dict:
        """200 once the model is loaded; says which model and whether editing still works."""
        return {"status": "ok" if not inspector.broken else "broken", "model": bundle.name}

    @app.get("/api/methods")
    def methods() -> dict:
        """Every registry method (``+sadr`` variants too) with its main settings from the model's preset."""
        return {"model": bundle.name, "methods": [method_settings(bundle, m) for m in method_choices()]}

    @app.get("/api/sample")
    def sample() -> dict:
        """The cases of the server's data file (default: the shipped sample set), to fill the form."""
        return {"cases": listed}

    @app.post("/api/edits")
    async def create_edit(body: EditBody, wait: bool = True) -> Any:
        """Queue an edit; it is applied, measured and reverted in the worker. ``wait`` (default): answer
        with ``{"id", "results"}`` when it is done; ``wait=false``: answer 202 ``{"id", "position"}`` at
        once and follow ``/api/edits/{id}/events``."""
        case, probes = build_case(
            bundle,
            body.prompt,
            body.subject,
            body.target_new,
            body.target_true,
            {"paraphrase": body.paraphrase, "neighbors": body.neighbors, "relation": body.relation},
        )
        editor = build_editor(bundle, body.method, body.params)
        job = inspector.new_job("edit")
        future = inspector.start_edit(job, body.method, case, probes, editor)
        if not wait:
            return JSONResponse(
                status_code=202, content={"id": job.id, "position": inspector.position(job.id)}
            )
        try:
            session = await asyncio.wrap_future(future)
        except Exception as err:
            return _failure(err)
        return {"id": session.id, "results": session.results, "seconds": session.seconds}

    def _failure(err: Exception) -> JSONResponse:
        if isinstance(err, InputError):
            return _error(err.status, err.message, err.field)
        if isinstance(err, WeightsChangedError):
            return _error(503, str(err), None)
        if isinstance(err, ArithmeticError | ValueError | TypeError):  # the request cannot be edited
            return _error(422, str(err), "request")
        logger.exception("edit failed", exc_info=err)
        return _error(500, f"internal error: {type(err).__name__}: {err}", None)

    @app.get("/api/edits/{edit_id}")
    def edit_status(edit_id: str) -> dict:
        """An edit's state (queued, running, done, failed), its queue position and, when done, results."""
        job = inspector.job(edit_id)
        if job is None:
            raise InputError("id", f"no edit {edit_id!r}", status=404)
        out: dict[str, Any] = {"id": edit_id, "state": job.state, "position": inspector.position(edit_id)}
        if job.state == "done":
            session = inspector.get(edit_id)
            out.update(results=session.results, seconds=session.seconds)
        elif job.state == "failed":
            out["error"] = next((e for e in reversed(job.events) if e["type"] == "error"), None)
        return out

    @app.get("/api/edits/{edit_id}/events")
    async def edit_events(edit_id: str) -> StreamingResponse:
        """Server-sent events of an edit: ``queued`` (with the queue position), ``running``, ``step``
        (optimisation step, loss and loss parts), then ``done`` or ``error``."""
        job = inspector.job(edit_id)
        if job is None:
            raise InputError("id", f"no edit {edit_id!r}", status=404)

        async def stream() -> AsyncIterator[str]:
            sent, position = 0, None
            while True:
                events = job.events[sent:]
                sent += len(events)
                for event in events:
                    yield f"event: {event['type']}\ndata: {json.dumps(json_ready(event))}\n\n"
                if job.done.is_set() and sent == len(job.events):
                    break
                now = inspector.position(edit_id)
                if job.state == "queued" and now != position and position is not None:
                    yield f"event: queued\ndata: {json.dumps({'type': 'queued', 'position': now})}\n\n"
                position = now
                await asyncio.sleep(EVENT_POLL_SECONDS)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/api/edits/{edit_id}/grid")
    def grid(edit_id: str, prompt: str | None = None) -> dict:
        """The drift grid of a probe prompt (default: the edit prompt): KL(unedited || edited) of the last
        token's attention row per layer and head, from one batched pass; ``selected``: the heads SADR
        would select (none when the prompt lacks the subject)."""
        session = inspector.get(edit_id)
        text = inspector.probe_prompt(session, prompt)
        return inspector.grid_json(session, inspector.record(session, text))

    @app.get("/api/edits/{edit_id}/head")
    def head(edit_id: str, layer: int, head: int, prompt: str | None = None) -> dict:
        """One head's last-token attention row over the prompt's tokens, before and after the edit."""
        session = inspector.get(edit_id)
        text = inspector.probe_prompt(session, prompt)
        return inspector.head_json(inspector.record(session, text), layer, head)

    @app.get("/api/edits/{edit_id}/patching")
    def patching(edit_id: str, prompt: str | None = None, window: int = Query(10)) -> dict:
        """P(o_true) and P(o_new) of the edited model with the unedited attention patched back over the
        window of layers centred on each layer (SADR figure 5)."""
        session = inspector.get(edit_id)
        text = inspector.probe_prompt(session, prompt)
        if not 1 <= window <= bundle.adapter.n_layers:
            raise InputError("window", f"window must be in 1..{bundle.adapter.n_layers}")
        return inspector.patch(session, text, window)

    @app.get("/api/edits/{edit_id}/edit.safetensors")
    def download_edit(edit_id: str) -> Response:
        """The edit as the safetensors file ``attnedit`` saves (``WeightEdit.load`` reads it)."""
        session = inspector.get(edit_id)
        assert session.edit is not None
        with tempfile.TemporaryDirectory() as tmp:
            data = session.edit.save(Path(tmp) / "edit.safetensors").read_bytes()
        disposition = f'attachment; filename="edit-{edit_id}.safetensors"'
        return Response(
            data, media_type="application/octet-stream", headers={"Content-Disposition": disposition}
        )

    @app.get("/api/edits/{edit_id}/view.json")
    def view(edit_id: str) -> JSONResponse:
        """The view's data: request, settings, answers, and the grids and curves computed so far."""
        session = inspector.get(edit_id)
        disposition = f'attachment; filename="view-{edit_id}.json"'
        return JSONResponse(
            json_ready(inspector.view_json(session)), headers={"Content-Disposition": disposition}
        )

    def _browser() -> RunsBrowser:
        if browser is None:
            raise InputError("runs", "no runs directory: start the server with --runs DIR", status=404)
        return browser

    @app.get("/api/runs")
    def runs() -> dict:
        """The run directories under the runs root, each with its summary (read-only)."""
        return {"runs": _browser().list_runs()}

    @app.get("/api/runs/{path:path}/records")
    def run_records(path: str) -> dict:
        """One run's manifest, summary and per-case records."""
        return _browser().records(path)

    @app.get("/api/runs/{path:path}/curves")
    def run_curves(path: str) -> dict:
        """An edit stream's checkpoints (``curves.jsonl``) and its curves per metric; none for other runs."""
        return _browser().curves(path)

    @app.get("/api/report")
    def report(
        runs: list[str] = Query(...),
        against: str | None = None,
        magnitudes: bool = False,
        extra: bool = False,
    ) -> dict:
        """The report of several runs (``runs.report``: shards of one run merged into one row), with
        each row minus the row labelled ``against`` on their shared cases when it is given (paired
        bootstrap). ``runs``: run paths as ``/api/runs`` lists them; one outside the root is a 404."""
        return _browser().report(runs, against, magnitudes, extra)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
