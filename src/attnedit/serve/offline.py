"""The inspector's offline view, ``attnedit inspect ... --html FILE``: one edit, run through the same
``Inspector`` as ``attnedit serve``, written as one self-contained HTML file.

The file is the served page (``static/``) with its CSS and JS inlined and the view's data embedded as
JSON in a ``<script type="application/json" id="view-data">`` block: the answers before and after, the
drift grid of the rewrite prompt and of every distracted neighbour prompt, every head's attention rows
before and after on those prompts (so that clicking a cell works without a server) and the patching
curve of each. The page's script finds the block and renders it without any request. Nothing here needs
fastapi, so ``attnedit inspect`` works without the ``serve`` extra.

Size: per embedded prompt of T tokens, 2 x layers x heads x T attention weights (SmolLM2-135M: 30 x 9 x
T x 2 = 540 T numbers, about 4 kB per token at ``ROW_DIGITS`` decimals); at most ``1 + MAX_PROBES``
prompts of at most ``MAX_PROMPT_CHARS`` characters are embedded.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

from attnedit.analysis.engine import json_ready
from attnedit.api import Editor
from attnedit.core.data import EditCase
from attnedit.serve.inspector import Inspector, Recording

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
VIEW_ID = "view-data"  # the id of the embedded JSON block (app.js looks for it)
# the embedded head rows are rounded to this many decimals (the page shows 4): it keeps the file about
# half the size of full float precision; the grid's KL values are embedded unrounded
ROW_DIGITS = 5
# the probes whose grid, head rows and patching curve are embedded
EMBEDDED_KINDS = ("rewrite", "distracted_neighbor")
# the tags of static/index.html that the offline file replaces with the inlined files
STYLE_TAG = '<link rel="stylesheet" href="/static/style.css">'
SCRIPT_TAG = '<script src="/static/app.js"></script>'


def head_rows(inspector: Inspector, recording: Recording, digits: int = ROW_DIGITS) -> dict[str, Any]:
    """Every head's attention row of one recording, before and after: ``{"prompt", "before", "after"}``
    with ``before[layer][head]`` a list over the prompt's tokens, as ``Inspector.head_json`` gives them."""
    n_layers, n_heads = recording.kl.shape
    rows: dict[str, Any] = {"prompt": recording.prompt, "before": [], "after": []}
    for layer in range(n_layers):
        for side in ("before", "after"):
            rows[side].append([])
        for head in range(n_heads):
            one = inspector.head_json(recording, layer, head)
            for side in ("before", "after"):
                rows[side][layer].append([round(v, digits) for v in one[side]])
    return rows


def offline_view(
    inspector: Inspector,
    method: str,
    case: EditCase,
    probes: list[tuple[str, str]],
    editor: Editor,
    window: int = 10,
) -> dict[str, Any]:
    """Edit ``case`` with ``editor`` in ``inspector`` (as ``POST /api/edits`` does) and return the view's
    data: ``Inspector.view_json`` with the grids and patching curves (over ``window`` layers, at most
    the model's) of the rewrite and distracted neighbour prompts computed, plus ``head_rows`` (one per
    grid, in its order)."""
    window = min(window, inspector.bundle.adapter.n_layers)
    job = inspector.new_job("edit")
    session = inspector.start_edit(job, method, case, probes, editor).result()
    prompts = list(dict.fromkeys(p for kind, p in session.probes if kind in EMBEDDED_KINDS))
    rows = []
    for prompt in prompts:
        rows.append(head_rows(inspector, inspector.record(session, prompt)))
        inspector.patch(session, prompt, window)
    view = json_ready(inspector.view_json(session))
    view["head_rows"] = rows
    view["offline"] = True
    return view


def _script_json(value: Any) -> str:
    """JSON that is safe inside a ``<script>`` element: ``<``, ``>`` and ``&`` escaped as ``\\u00XX``
    (a prompt holding ``</script>`` cannot end the block); JSON.parse reads them back unchanged."""
    text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _inline(text: str, *markers: str) -> str:
    """``text`` to be inlined in an element, refused if it holds a marker that would end that element
    early or change how the HTML parser reads it (``<!--`` or ``<script`` inside a script)."""
    for marker in markers:
        if marker in text.lower():
            raise ValueError(f"cannot inline a static file that contains {marker!r}")
    return text


def render_html(view: dict[str, Any]) -> str:
    """The served page as one self-contained file: CSS and JS inlined, ``view`` embedded as JSON."""
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    css = _inline((STATIC / "style.css").read_text(encoding="utf-8"), "</style")
    js = _inline((STATIC / "app.js").read_text(encoding="utf-8"), "</script", "<script", "<!--")
    for tag in (STYLE_TAG, SCRIPT_TAG):
        if page.count(tag) != 1:
            raise ValueError(f"static/index.html must hold {tag!r} once to be inlined")
    request = view.get("request") or {}
    title = f"attnedit inspector: {request.get('method', '')} on {request.get('subject', '')}"
    page = page.replace("<title>attnedit inspector</title>", f"<title>{html.escape(title)}</title>", 1)
    page = page.replace(STYLE_TAG, f"<style>\n{css}</style>", 1)
    data = f'<script type="application/json" id="{VIEW_ID}">{_script_json(view)}</script>'
    return page.replace(SCRIPT_TAG, f"{data}\n  <script>\n{js}</script>", 1)


def write_html(view: dict[str, Any], path: str | Path) -> Path:
    """Write ``render_html(view)`` to ``path``; returns the path."""
    path = Path(path)
    path.write_text(render_html(view), encoding="utf-8")
    logger.info("offline view written to %s (%.0f kB)", path, path.stat().st_size / 1024)
    return path
