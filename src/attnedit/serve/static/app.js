// The edit inspector page: plain DOM and hand-written SVG over the JSON API under /api/ (no CDN, no build).
// The same script renders the offline file of `attnedit inspect --html`: when the page embeds a view
// (a JSON script element with the id view-data), it draws that and sends no request at all.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
// the SVG namespace, read off a parsed <svg> element: the page names no URL (the offline file has none)
const SVG = (() => { const t = document.createElement("template"); t.innerHTML = "<svg></svg>"; return t.content.firstChild.namespaceURI; })();
let METHODS = {};
let SAMPLES = [];

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

// every API error is JSON {"error", "field"}; it is thrown as an Error carrying both
async function api(path, options = {}) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const err = new Error((body && body.error) || `HTTP ${response.status}`);
    err.field = body && body.field;
    throw err;
  }
  return body;
}

function fmt(p) { return p === null || p === undefined ? "" : p.toPrecision(3); }

// --- form ---------------------------------------------------------------------------------------

function lines(text) { return text.split("\n").map((s) => s.trim()).filter(Boolean); }

function showFormError(err) {
  const box = $("#form-error");
  document.querySelectorAll(".invalid").forEach((n) => n.classList.remove("invalid"));
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  box.hidden = false;
  // the server's messages often start with the field already
  const named = err.field && !String(err.message).startsWith(`${err.field}:`);
  box.textContent = named ? `${err.field}: ${err.message}` : err.message;
  const name = (err.field || "").split(/[.[]/)[0];
  const input = name && $(`#edit-form [name="${name}"]`);
  if (input) input.classList.add("invalid");
}

function readRequest(method, paramsText) {
  const form = $("#edit-form");
  let params;
  try { params = JSON.parse(paramsText || "{}"); } catch (e) {
    const err = new Error("settings are not valid JSON"); err.field = "params"; throw err;
  }
  return {
    method,
    prompt: form.prompt.value,
    subject: form.subject.value,
    target_new: form.target_new.value,
    target_true: form.target_true.value,
    params,
    paraphrase: lines(form.paraphrase.value),
    neighbors: lines(form.neighbors.value),
    relation: lines(form.relation.value),
  };
}

function describeMethod() {
  const parts = [];
  for (const select of [$("#method-a"), ...($("#compare").checked ? [$("#method-b")] : [])]) {
    const m = METHODS[select.value];
    if (!m) continue;
    const preset = m.preset === null ? "no preset for this model: give its settings, e.g. {\"layers\": [1]}" : `preset ${m.preset}`;
    parts.push(`${m.name} (${m.summary}): ${preset} ${JSON.stringify(m.settings)}`);
  }
  $("#method-settings").textContent = parts.join(" | ");
  // every setting the first method takes, with its type, range, default and help, as a tooltip
  const m = METHODS[$("#method-a").value];
  const props = (m && m.schema && m.schema.properties) || {};
  $("#method-settings").title = Object.entries(props).map(([name, p]) => {
    const range = ["minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"]
      .filter((k) => k in p).map((k) => `${k} ${p[k]}`).join(", ");
    const dflt = "default" in p ? ` = ${JSON.stringify(p.default)}` : "";
    return `${name}${dflt}${range ? ` (${range})` : ""}: ${p.description || ""}`;
  }).join("\n");
}

async function loadMethods() {
  const data = await api("/api/methods");
  $("#model-name").textContent = data.model;
  for (const m of data.methods) METHODS[m.name] = m;
  for (const select of [$("#method-a"), $("#method-b")]) {
    for (const m of data.methods) select.append(el("option", { value: m.name, text: m.name }));
  }
  $("#method-a").value = "rome";
  $("#method-b").value = "rome+sadr";
  describeMethod();
}

async function loadSamples() {
  SAMPLES = (await api("/api/sample")).cases;
  for (const c of SAMPLES) {
    $("#sample").append(el("option", { value: c.index, text: `${c.case_id}: ${c.subject} -> ${c.target_new}` }));
  }
}

function fillSample() {
  const c = SAMPLES[Number($("#sample").value)];
  if (!c) return;
  const form = $("#edit-form");
  for (const key of ["prompt", "subject", "target_new", "target_true"]) form[key].value = c[key];
  for (const key of ["paraphrase", "neighbors", "relation"]) form[key].value = c[key].join("\n");
}

// --- an edit column ----------------------------------------------------------------------------------

async function runColumn(request) {
  const node = $("#column-template").content.firstElementChild.cloneNode(true);
  $("#columns").append(node);
  $(".column-title", node).textContent = request.method;
  const progress = $(".progress", node);
  const say = (text) => { progress.textContent += text + "\n"; progress.scrollTop = progress.scrollHeight; };
  const fail = (message) => { const e = $(".column-error", node); e.hidden = false; e.textContent = message; };
  const queued = await api("/api/edits?wait=false", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request),
  });
  const id = queued.id;
  await new Promise((resolve) => {
    const events = new EventSource(`/api/edits/${id}/events`);
    events.addEventListener("queued", (e) => say(`queued, ${JSON.parse(e.data).position} ahead`));
    events.addEventListener("running", () => say("running"));
    events.addEventListener("step", (e) => {
      const s = JSON.parse(e.data);
      const parts = Object.entries(s.parts).filter(([, v]) => typeof v === "number")
        .map(([k, v]) => `${k} ${v.toFixed(4)}`).join(", ");
      say(`step ${s.step}: loss ${Number(s.loss).toFixed(4)} (${parts})`);
    });
    events.addEventListener("error", (e) => {
      if (e.data) { const d = JSON.parse(e.data); fail(d.field ? `${d.field}: ${d.error}` : d.error); }
      events.close(); resolve();
    });
    events.addEventListener("done", () => { say("done"); events.close(); resolve(); });
  });
  const status = await api(`/api/edits/${id}`);
  if (status.state !== "done") return;
  showResult(node, serverSource(id), status.results);
}

// Where a column's grids, head rows and patching curves come from: the API of the served page, or
// the view embedded in the offline file (the rows the server computed, picked out of it).
function serverSource(id) {
  const q = (prompt) => `prompt=${encodeURIComponent(prompt)}`;
  return {
    downloads: () => [
      el("a", { href: `/api/edits/${id}/edit.safetensors`, text: "edit (safetensors)" }),
      el("a", { href: `/api/edits/${id}/view.json`, text: "view data (JSON)" }),
    ],
    hasGrid: () => true,
    grid: (prompt) => api(`/api/edits/${id}/grid?${q(prompt)}`),
    head: (prompt, layer, head) => api(`/api/edits/${id}/head?layer=${layer}&head=${head}&${q(prompt)}`),
    patching: (prompt) => api(`/api/edits/${id}/patching?${q(prompt)}`),
  };
}

function embeddedSource(view, text) {
  const grids = new Map(view.grids.map((g) => [g.prompt, g]));
  const rows = new Map(view.head_rows.map((r) => [r.prompt, r]));
  const curves = new Map(view.patching.map((c) => [c.prompt, c]));
  const missing = (what) => Promise.reject(new Error(`${what} is not in this file`));
  return {
    downloads: () => [el("a", {
      href: URL.createObjectURL(new Blob([text], { type: "application/json" })),
      download: `view-${view.id}.json`, text: "view data (JSON)",
    })],
    hasGrid: (prompt) => grids.has(prompt),
    grid: (prompt) => (grids.has(prompt) ? Promise.resolve(grids.get(prompt)) : missing("this prompt's grid")),
    head: (prompt, layer, head) => {
      const g = grids.get(prompt), r = rows.get(prompt);
      if (!g || !r) return missing("this prompt's head rows");
      return Promise.resolve({
        prompt, layer, head, tokens: g.tokens, before: r.before[layer][head], after: r.after[layer][head],
        kl: g.kl[layer][head], selected: g.selected[layer][head], subject_span: g.subject_span,
      });
    },
    patching: (prompt) => (curves.has(prompt) ? Promise.resolve(curves.get(prompt)) : missing("this prompt's patching curve")),
  };
}

function showResult(node, source, results) {
  $(".result", node).hidden = false;
  const table = $(".answers", node);
  table.append(el("tr", {}, ...["probe", "prompt", "before", "after", "P(new)", "P(true)"].map((h) => el("th", { text: h }))));
  for (const r of results) {
    const pn = el("td", { class: "num", text: `${fmt(r.before.p_new)} → ${fmt(r.after.p_new)}` });
    const pt = el("td", { class: "num", text: `${fmt(r.before.p_true)} → ${fmt(r.after.p_true)}` });
    // green where the change is what the edit wants: o_new up on its own prompts, o_new down elsewhere
    const wanted = r.kind === "rewrite" || r.kind === "paraphrase";
    const newUp = r.after.p_new >= r.before.p_new, trueUp = r.after.p_true >= r.before.p_true;
    pn.classList.add(newUp === wanted ? "good" : "bad");
    pt.classList.add(trueUp !== wanted ? "good" : "bad");
    table.append(el("tr", {}, el("td", { text: r.kind }), el("td", { text: r.prompt }),
      el("td", { text: r.before.generated }), el("td", { text: r.after.generated }), pn, pt));
  }
  $(".downloads", node).append(...source.downloads());
  const probe = $(".probe", node);
  for (const r of results) {
    if (source.hasGrid(r.prompt)) probe.append(el("option", { value: r.prompt, text: `${r.kind}: ${r.prompt}` }));
  }
  probe.addEventListener("change", () => showGrid(node, source, probe.value));
  $(".patch-button", node).addEventListener("click", () => showPatching(node, source, probe.value));
  showGrid(node, source, probe.value);
}

// cell colour: white (no drift) to red (the grid's largest KL), on a square-root scale
function heat(value, max) {
  const t = max > 0 ? Math.sqrt(value / max) : 0;
  const g = Math.round(255 * (1 - t));
  return `rgb(255,${g},${g})`;
}

async function showGrid(node, source, prompt) {
  const box = $(".grid", node);
  box.textContent = "computing…";
  $(".head-row", node).textContent = "";
  let grid;
  try { grid = await source.grid(prompt); } catch (err) {
    box.textContent = ""; $(".column-error", node).hidden = false; $(".column-error", node).textContent = err.message; return;
  }
  const size = 18, left = 30, top = 18;
  const max = Math.max(...grid.kl.flat());
  const svg = el("svg:svg", { width: left + grid.heads * size + 10, height: top + grid.layers * size + 10, class: "grid-svg" });
  for (let h = 0; h < grid.heads; h++) {
    svg.append(el("svg:text", { x: left + h * size + 4, y: 12, "font-size": 9, text: String(h) }));
  }
  for (let l = 0; l < grid.layers; l++) {
    svg.append(el("svg:text", { x: 2, y: top + l * size + 13, "font-size": 9, text: `L${l}` }));
    for (let h = 0; h < grid.heads; h++) {
      const cell = el("svg:rect", {
        x: left + h * size, y: top + l * size, width: size - 2, height: size - 2,
        fill: heat(grid.kl[l][h], max), class: "cell" + (grid.selected[l][h] ? " selected-head" : ""),
        "data-layer": l, "data-head": h,
      });
      cell.append(el("svg:title", { text: `layer ${l}, head ${h}: KL ${grid.kl[l][h].toExponential(3)}` }));
      cell.addEventListener("click", () => {
        svg.querySelectorAll(".chosen").forEach((c) => c.classList.remove("chosen"));
        cell.classList.add("chosen");
        showHead(node, source, prompt, l, h);
      });
      svg.append(cell);
    }
  }
  box.textContent = "";
  box.append(svg, el("div", { class: "muted", text: `max KL ${max.toExponential(3)}; ${grid.selected.flat().filter(Boolean).length} heads SADR would select` }));
}

async function showHead(node, source, prompt, layer, head) {
  const box = $(".head-row", node);
  const row = await source.head(prompt, layer, head);
  box.textContent = "";
  box.append(el("h4", { text: `layer ${layer}, head ${head}: KL ${row.kl.toExponential(3)}${row.selected ? " (SADR would select it)" : ""}` }));
  const span = row.subject_span;
  for (const [name, weights] of [["before", row.before], ["after", row.after]]) {
    const tokens = el("div", { class: "tokens " + name });
    row.tokens.forEach((t, i) => {
      const isSubject = span && i >= span[0] && i <= span[1];
      const shade = Math.round(255 * (1 - Math.min(1, weights[i])));
      tokens.append(el("span", {
        class: "token" + (isSubject ? " subject" : ""), title: weights[i].toFixed(4),
        style: `background: rgb(${shade},${shade},255)`, text: t,
      }));
    });
    box.append(el("div", { class: "muted", text: name }), tokens);
  }
}

async function showPatching(node, source, prompt) {
  const box = $(".patching", node);
  box.textContent = "computing…";
  let curve;
  try { curve = await source.patching(prompt); } catch (err) {
    box.textContent = err.message; return;
  }
  const w = 360, h = 160, pad = 30, n = curve.layers.length;
  const x = (i) => pad + (n > 1 ? (i * (w - 2 * pad)) / (n - 1) : 0);
  const y = (p) => h - pad + -p * (h - 2 * pad);
  const svg = el("svg:svg", { width: w, height: h, class: "patch-svg" });
  svg.append(el("svg:line", { x1: pad, y1: h - pad, x2: w - pad, y2: h - pad, stroke: "#999" }));
  svg.append(el("svg:line", { x1: pad, y1: pad, x2: pad, y2: h - pad, stroke: "#999" }));
  svg.append(el("svg:text", { x: 2, y: pad + 4, "font-size": 9, text: "1" }));
  svg.append(el("svg:text", { x: 2, y: h - pad, "font-size": 9, text: "0" }));
  svg.append(el("svg:text", { x: w / 2 - 40, y: h - 8, "font-size": 10, text: "window centre (layer)" }));
  for (const [key, colour] of [["p_new", "#c00"], ["p_true", "#06c"]]) {
    const points = curve[key].map((p, i) => `${x(i)},${y(p)}`).join(" ");
    svg.append(el("svg:polyline", { points, fill: "none", stroke: colour, "stroke-width": 2 }));
  }
  box.textContent = "";
  box.append(svg, el("div", { class: "muted", text:
    `window ${curve.window}; red: P(${curve.targets[1]}) (edited, unpatched ${fmt(curve.base.p_new)}), ` +
    `blue: P(${curve.targets[0]}) (unpatched ${fmt(curve.base.p_true)})` }));
}

async function submitEdit(event) {
  event.preventDefault();
  showFormError(null);
  $("#columns").textContent = "";
  let requests;
  try {
    requests = [readRequest($("#method-a").value, $("#params-a").value)];
    if ($("#compare").checked) requests.push(readRequest($("#method-b").value, $("#params-b").value));
  } catch (err) { showFormError(err); return; }
  $("#edit-button").disabled = true;
  try {
    // both are queued at once: the server runs them one after the other
    const runs = requests.map((r) => runColumn(r));
    await Promise.all(runs);
  } catch (err) {
    $("#columns").textContent = "";
    showFormError(err);
  } finally {
    $("#edit-button").disabled = false;
  }
}

// --- runs browser --------------------------------------------------------------------------------

function scalarColumns(records) {
  const cols = [];
  for (const r of records.slice(0, 50)) {
    for (const [k, v] of Object.entries(r)) {
      if ((v === null || typeof v !== "object") && !cols.includes(k)) cols.push(k);
    }
  }
  return cols;
}

// ticked (optional): a Set of row paths, shown as a first column of checkboxes (where tickable(row))
function renderTable(table, rows, cols, onRowClick, ticked = null, tickable = () => true) {
  let sortKey = null, ascending = true;
  const draw = () => {
    table.textContent = "";
    const head = el("tr");
    if (ticked) head.append(el("th", { text: "report" }));
    for (const c of cols) {
      head.append(el("th", { class: "sortable", text: c + (c === sortKey ? (ascending ? " ▲" : " ▼") : ""), onclick: () => {
        ascending = sortKey === c ? !ascending : true; sortKey = c; draw();
      } }));
    }
    table.append(head);
    const sorted = sortKey === null ? rows : [...rows].sort((a, b) => {
      const va = a[sortKey], vb = b[sortKey];
      const order = va === vb ? 0 : va === null || va === undefined ? 1 : vb === null || vb === undefined ? -1 : va < vb ? -1 : 1;
      return ascending ? order : -order;
    });
    for (const r of sorted) {
      const tr = el("tr", onRowClick ? { class: "clickable", onclick: () => onRowClick(r) } : {});
      if (ticked && !tickable(r)) tr.append(el("td"));
      else if (ticked) {
        const box = el("input", { type: "checkbox", class: "tick", "data-path": r.path, onclick: (e) => e.stopPropagation() });
        box.checked = ticked.has(r.path);
        box.addEventListener("change", () => {
          if (box.checked) ticked.add(r.path); else ticked.delete(r.path);
          $("#report-button").disabled = ticked.size === 0;
        });
        tr.append(el("td", {}, box));
      }
      for (const c of cols) {
        const v = r[c];
        tr.append(el("td", { class: typeof v === "number" ? "num" : "", text: typeof v === "number" ? String(+v.toFixed(4)) : v ?? "" }));
      }
      table.append(tr);
    }
  };
  draw();
}

async function loadRuns() {
  const error = $("#runs-error");
  let data;
  try { data = await api("/api/runs"); } catch (err) { error.hidden = false; error.textContent = err.message; return; }
  const rows = data.runs.map((r) => {
    const row = { path: r.path, kind: r.kind, label: r.label, method: r.method, model: r.model, records: r.records,
      curves: r.curves ? "yes" : "" };  // an edit stream's checkpoints
    for (const [k, v] of Object.entries(r.summary || {})) {
      if (v && typeof v === "object" && typeof v.mean === "number") row[k] = v.mean;
    }
    return row;
  });
  const cols = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  for (const path of [...TICKED]) if (!rows.some((r) => r.path === path)) TICKED.delete(path);
  // only evaluation runs make a report (runs.report)
  renderTable($("#runs-table"), rows, cols, (r) => showRun(r.path, r.curves === "yes"), TICKED, (r) => r.kind === "evaluation");
  $("#report-button").disabled = TICKED.size === 0;
}

// --- the report of several runs (runs.report, as `attnedit report` prints it) ---------------------------

const TICKED = new Set();

// a summary entry as the markdown report writes it: mean ± 95% interval
function reportCell(entry, digits) {
  if (!entry || entry.mean === null || entry.mean === undefined) return "-";
  const mean = entry.mean.toFixed(digits);
  return entry.ci95 === null || entry.ci95 === undefined ? mean : `${mean} ± ${entry.ci95.toFixed(digits)}`;
}

function pairedCell(d) {
  if (!d) return "-";
  const sign = (v, digits) => (v >= 0 ? "+" : "") + v.toFixed(digits);
  let text = `${sign(d.diff, 1)} [${sign(d.diff_ci[0], 1)}, ${sign(d.diff_ci[1], 1)}]`;
  if (d.relative !== null && d.relative_ci !== null) {
    text += `; ${sign(d.relative, 0)}% [${sign(d.relative_ci[0], 0)}, ${sign(d.relative_ci[1], 0)}]`;
  }
  return text;
}

async function showReport() {
  const error = $("#report-error");
  error.hidden = true;
  const params = new URLSearchParams();
  for (const path of TICKED) params.append("runs", path);
  const against = $("#report-against").value;
  if (against) params.set("against", against);
  if ($("#report-magnitudes").checked) params.set("magnitudes", "true");
  let report;
  try { report = await api(`/api/report?${params}`); } catch (err) {
    error.hidden = false; error.textContent = err.field ? `${err.field}: ${err.message}` : err.message; return;
  }
  $("#report").hidden = false;
  const rows = report.rows.map((r) => {
    const row = { method: r.label, cases: r.cases, runs: r.runs.join(", ") };
    for (const c of report.columns) row[c] = reportCell(r.summary[c], c === "PPL" ? 2 : 1);
    return row;
  });
  renderTable($("#report-table"), rows, ["method", "cases", ...report.columns, "runs"], null);
  const select = $("#report-against");
  select.textContent = "";
  select.append(el("option", { value: "", text: "(none)" }));
  for (const r of report.rows) select.append(el("option", { value: r.label, text: r.label }));
  select.value = report.rows.some((r) => r.label === against) ? against : "";
  const paired = $("#paired-table");
  paired.textContent = "";
  $("#paired-title").hidden = !report.paired;
  if (!report.paired) return;
  $("#paired-title").textContent = `each row minus ${report.against}, on their shared cases (paired bootstrap, 95% intervals)`;
  const scores = [...new Set(Object.values(report.paired).flatMap((d) => Object.keys(d)))];
  const diffs = Object.entries(report.paired).map(([label, byScore]) => {
    const first = Object.values(byScore)[0];
    const row = { method: `${label} - ${report.against}`, cases: first ? first.cases : 0 };
    for (const s of scores) row[s] = pairedCell(byScore[s]);
    return row;
  });
  renderTable(paired, diffs, ["method", "cases", ...scores], null);
}

// --- an edit stream's checkpoints (runs.curves, as `attnedit report` draws them) ------------------------

// one metric's curve against the number of edits: points [edits, mean, ci95 or null]; the 95% band shaded;
// a red cross on the last checkpoint of a stream that collapsed there
function curveChart(metric, xmin, xmax, collapsed, lastEdits) {
  const w = 260, h = 150, left = 46, right = 12, top = 20, bottom = 28;
  const svg = el("svg:svg", { width: w, height: h, class: "curve", "data-metric": metric.key });
  const pts = metric.points.filter((p) => typeof p[1] === "number");
  const log = metric.log && pts.length > 0 && pts.every((p) => p[1] > 0);
  svg.append(el("svg:text", { x: left, y: 13, "font-size": 11, "font-weight": "bold", text: metric.title + (log ? " (log scale)" : "") }));
  if (!pts.length) return svg;
  const f = log ? Math.log10 : (v) => v;
  const ci = (p) => (typeof p[2] === "number" ? p[2] : 0);
  const lows = pts.map((p) => f(log ? p[1] : p[1] - ci(p))), highs = pts.map((p) => f(log ? p[1] : p[1] + ci(p)));
  let ymin = Math.min(...lows), ymax = Math.max(...highs);
  if (ymin === ymax) { ymin -= 1; ymax += 1; }
  const x = (e) => left + (xmax > xmin ? ((e - xmin) * (w - left - right)) / (xmax - xmin) : (w - left - right) / 2);
  const y = (v) => h - bottom - ((f(v) - ymin) * (h - top - bottom)) / (ymax - ymin);
  const yText = (v) => (log ? 10 ** v : v).toPrecision(3);
  svg.append(el("svg:line", { x1: left, y1: h - bottom, x2: w - right, y2: h - bottom, stroke: "#999" }));
  svg.append(el("svg:line", { x1: left, y1: top, x2: left, y2: h - bottom, stroke: "#999" }));
  svg.append(el("svg:text", { x: 2, y: top + 8, "font-size": 9, text: yText(ymax) }));
  svg.append(el("svg:text", { x: 2, y: h - bottom, "font-size": 9, text: yText(ymin) }));
  svg.append(el("svg:text", { x: left, y: h - bottom + 12, "font-size": 9, text: String(xmin) }));
  svg.append(el("svg:text", { x: w - right, y: h - bottom + 12, "font-size": 9, "text-anchor": "end", text: String(xmax) }));
  svg.append(el("svg:text", { x: (left + w - right) / 2, y: h - 4, "font-size": 9, "text-anchor": "middle", text: "edits" }));
  if (!log && pts.some((p) => ci(p) > 0)) {
    const upper = pts.map((p) => `${x(p[0])},${y(p[1] + ci(p))}`);
    const lower = pts.slice().reverse().map((p) => `${x(p[0])},${y(p[1] - ci(p))}`);
    svg.append(el("svg:polygon", { points: [...upper, ...lower].join(" "), fill: "#06c", "fill-opacity": 0.15, stroke: "none" }));
  }
  svg.append(el("svg:polyline", { points: pts.map((p) => `${x(p[0])},${y(p[1])}`).join(" "), fill: "none", stroke: "#06c", "stroke-width": 2 }));
  for (const p of pts) {
    const dot = el("svg:circle", { cx: x(p[0]), cy: y(p[1]), r: 2.5, fill: "#06c" });
    const value = p[1].toFixed(metric.digits) + (typeof p[2] === "number" ? ` ± ${p[2].toFixed(metric.digits)}` : "");
    dot.append(el("svg:title", { text: `${p[0]} edits: ${value}` }));
    svg.append(dot);
  }
  const last = pts[pts.length - 1];
  if (collapsed && last[0] === lastEdits) {
    const cx = x(last[0]), cy = y(last[1]), r = 5;
    const mark = el("svg:g", { class: "collapse-mark", stroke: "#c00", "stroke-width": 2.5 },
      el("svg:line", { x1: cx - r, y1: cy - r, x2: cx + r, y2: cy + r }),
      el("svg:line", { x1: cx - r, y1: cy + r, x2: cx + r, y2: cy - r }),
      el("svg:title", { text: `collapsed: ${collapsed}` }));
    svg.append(mark);
  }
  return svg;
}

async function showCurves(path) {
  const box = $("#run-curves");
  box.hidden = true;
  let data;
  try { data = await api(`/api/runs/${path.split("/").map(encodeURIComponent).join("/")}/curves`); } catch (err) {
    box.hidden = false; $("#curves-note").textContent = err.message; return;
  }
  if (!data.lines.length || $("#run-title").textContent !== path) return;  // not a stream, or another run chosen since
  box.hidden = false;
  const edits = data.lines.map((l) => l.edits);
  const xmin = Math.min(...edits), xmax = Math.max(...edits), lastEdits = edits[edits.length - 1];
  $("#curves-note").textContent = `${data.lines.length} checkpoints, 0 to ${lastEdits} edits; ` +
    "ES, PS, NS... are scores of a sample of the edits so far (shaded: 95% interval)" +
    (data.collapsed ? `; the stream stopped: ${data.collapsed}` : "");
  const charts = $("#curve-charts");
  charts.textContent = "";
  for (const m of data.metrics) charts.append(curveChart(m, xmin, xmax, data.collapsed, lastEdits));
  // the checkpoint table: one row per checkpoint, a column per metric (mean ± 95% interval)
  const rows = edits.map((e, i) => {
    const row = { edits: e };
    for (const m of data.metrics) {
      const p = m.points[i];
      row[m.key] = typeof p[1] !== "number" ? "-" : p[1].toFixed(m.digits) + (typeof p[2] === "number" ? ` ± ${p[2].toFixed(m.digits)}` : "");
    }
    row.stopped = data.lines[i].collapsed || "";
    return row;
  });
  renderTable($("#curves-table"), rows, ["edits", ...data.metrics.map((m) => m.key), "stopped"], null);
}

async function showRun(path, curves = true) {
  const data = await api(`/api/runs/${path.split("/").map(encodeURIComponent).join("/")}/records`);
  $("#run-detail").hidden = false;
  $("#run-title").textContent = path;
  $("#run-curves").hidden = true;
  if (curves) showCurves(path);
  const cols = scalarColumns(data.records);
  const failing = $("#record-failing");
  failing.textContent = "";
  failing.append(el("option", { value: "", text: "(any)" }));
  for (const c of cols) failing.append(el("option", { value: c, text: c }));
  const draw = () => {
    const text = $("#record-filter").value.toLowerCase();
    const col = failing.value;
    const rows = data.records.filter((r) =>
      (!text || JSON.stringify(r).toLowerCase().includes(text)) &&
      (!col || !$("#record-fails").checked || (typeof r[col] === "number" && r[col] < 0.5)));
    renderTable($("#records-table"), rows, cols, null);
  };
  $("#record-filter").oninput = draw;
  failing.onchange = draw;
  $("#record-fails").onchange = draw;
  draw();
}

// --- start -----------------------------------------------------------------------------------------

function showTab(id) {
  document.querySelectorAll(".tab-page").forEach((p) => { p.hidden = p.id !== id; });
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.tab === id));
  if (id === "runs-tab") loadRuns();
}

// the offline file of `attnedit inspect --html`: one column drawn from the embedded view, no requests
function showOffline(script) {
  const text = script.textContent;
  const view = JSON.parse(text);
  document.body.classList.add("offline");
  $("nav").hidden = true;
  $("#edit-form").hidden = true;
  $("#model-name").textContent = `${view.model}, offline view`;
  const node = $("#column-template").content.firstElementChild.cloneNode(true);
  $("#columns").append(node);
  const req = view.request;
  $(".column-title", node).textContent = `${req.method}: ${req.subject}: ${req.target_true} → ${req.target_new}`;
  $(".progress", node).textContent = `edited in ${Number(view.seconds).toFixed(1)} s; settings ${JSON.stringify(view.hyperparameters)}`;
  showResult(node, embeddedSource(view, text), view.results);
}

document.addEventListener("DOMContentLoaded", async () => {
  const embedded = document.getElementById("view-data");
  if (embedded) {
    try { showOffline(embedded); } catch (err) { $("#columns").append(el("p", { class: "error", text: err.message })); }
    document.body.dataset.ready = "1";
    return;
  }
  $("#report-button").addEventListener("click", showReport);
  $("#report-against").addEventListener("change", showReport);
  $("#report-magnitudes").addEventListener("change", () => { if (!$("#report").hidden) showReport(); });
  document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => showTab(t.dataset.tab)));
  $("#edit-form").addEventListener("submit", submitEdit);
  $("#sample").addEventListener("change", fillSample);
  for (const id of ["#method-a", "#method-b", "#compare"]) $(id).addEventListener("change", describeMethod);
  try { await Promise.all([loadMethods(), loadSamples()]); } catch (err) { showFormError(err); }
  document.body.dataset.ready = "1";
});
