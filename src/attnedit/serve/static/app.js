// The edit inspector page: plain DOM and hand-written SVG over the JSON API under /api/ (no CDN, no build).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const SVG = "http://www.w3.org/2000/svg";
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
  box.textContent = err.field ? `${err.field}: ${err.message}` : err.message;
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
    parts.push(`${m.name}: ${preset} ${JSON.stringify(m.settings)}`);
  }
  $("#method-settings").textContent = parts.join(" | ");
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
  showResult(node, id, status);
}

function showResult(node, id, status) {
  $(".result", node).hidden = false;
  const table = $(".answers", node);
  table.append(el("tr", {}, ...["probe", "prompt", "before", "after", "P(new)", "P(true)"].map((h) => el("th", { text: h }))));
  for (const r of status.results) {
    const pn = el("td", { class: "num", text: `${fmt(r.before.p_new)} → ${fmt(r.after.p_new)}` });
    const pt = el("td", { class: "num", text: `${fmt(r.before.p_true)} → ${fmt(r.after.p_true)}` });
    pn.classList.add(r.after.p_new >= r.before.p_new ? "up" : "down");
    pt.classList.add(r.after.p_true >= r.before.p_true ? "up" : "down");
    table.append(el("tr", {}, el("td", { text: r.kind }), el("td", { text: r.prompt }),
      el("td", { text: r.before.generated }), el("td", { text: r.after.generated }), pn, pt));
  }
  $(".downloads", node).append(
    el("a", { href: `/api/edits/${id}/edit.safetensors`, text: "edit (safetensors)" }),
    el("a", { href: `/api/edits/${id}/view.json`, text: "view data (JSON)" }),
  );
  const probe = $(".probe", node);
  for (const r of status.results) probe.append(el("option", { value: r.prompt, text: `${r.kind}: ${r.prompt}` }));
  probe.addEventListener("change", () => showGrid(node, id, probe.value));
  $(".patch-button", node).addEventListener("click", () => showPatching(node, id, probe.value));
  showGrid(node, id, probe.value);
}

// cell colour: white (no drift) to red (the grid's largest KL), on a square-root scale
function heat(value, max) {
  const t = max > 0 ? Math.sqrt(value / max) : 0;
  const g = Math.round(255 * (1 - t));
  return `rgb(255,${g},${g})`;
}

async function showGrid(node, id, prompt) {
  const box = $(".grid", node);
  box.textContent = "computing…";
  $(".head-row", node).textContent = "";
  let grid;
  try { grid = await api(`/api/edits/${id}/grid?prompt=${encodeURIComponent(prompt)}`); } catch (err) {
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
        showHead(node, id, prompt, l, h);
      });
      svg.append(cell);
    }
  }
  box.textContent = "";
  box.append(svg, el("div", { class: "muted", text: `max KL ${max.toExponential(3)}; ${grid.selected.flat().filter(Boolean).length} heads SADR would select` }));
}

async function showHead(node, id, prompt, layer, head) {
  const box = $(".head-row", node);
  const row = await api(`/api/edits/${id}/head?layer=${layer}&head=${head}&prompt=${encodeURIComponent(prompt)}`);
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

async function showPatching(node, id, prompt) {
  const box = $(".patching", node);
  box.textContent = "computing…";
  let curve;
  try { curve = await api(`/api/edits/${id}/patching?prompt=${encodeURIComponent(prompt)}`); } catch (err) {
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

function renderTable(table, rows, cols, onRowClick) {
  let sortKey = null, ascending = true;
  const draw = () => {
    table.textContent = "";
    const head = el("tr");
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
    const row = { path: r.path, label: r.label, method: r.method, model: r.model, records: r.records };
    for (const [k, v] of Object.entries(r.summary || {})) {
      if (v && typeof v === "object" && typeof v.mean === "number") row[k] = v.mean;
    }
    return row;
  });
  const cols = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  renderTable($("#runs-table"), rows, cols, (r) => showRun(r.path));
}

async function showRun(path) {
  const data = await api(`/api/runs/${path.split("/").map(encodeURIComponent).join("/")}/records`);
  $("#run-detail").hidden = false;
  $("#run-title").textContent = path;
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

document.addEventListener("DOMContentLoaded", async () => {
  document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => showTab(t.dataset.tab)));
  $("#edit-form").addEventListener("submit", submitEdit);
  $("#sample").addEventListener("change", fillSample);
  for (const id of ["#method-a", "#method-b", "#compare"]) $(id).addEventListener("change", describeMethod);
  try { await Promise.all([loadMethods(), loadSamples()]); } catch (err) { showFormError(err); }
  document.body.dataset.ready = "1";
});
