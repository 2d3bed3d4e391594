// pagedserve dashboard: plain SVG, no library, no build step. Reads /dashboard/events (SSE:
// one frame per engine snapshot) and /dashboard/results (benchmark figures).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const MAX_GRID_BLOCKS = 16384;   // more blocks than this: the grid shows the first ones, counts cover all
const TIMELINE_STEPS = 120;      // columns
const TIMELINE_ROWS = 40;        // the newest requests
const $ = (id) => document.getElementById(id);

const state = {
  snapshot: null,
  refCounts: new Uint8Array(0),
  cached: new Uint8Array(0),
  requests: new Map(),   // id -> {id, order, arrived, finished, reason, cells: Map(step -> "p"|"d"), preempted: []}
  steps: [],             // [{step, t, size}] newest last, at most TIMELINE_STEPS
  maxBatch: 0,
  order: 0,
  selected: null,
  gridBuiltFor: -1,
  userBatch: false,
};

function b64bytes(text) {
  const raw = atob(text);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

function hue(id) {   // FNV-1a, then mixed: ids that differ in their last character get far-apart hues
  let h = 2166136261;
  for (let i = 0; i < id.length; i++) h = Math.imul(h ^ id.charCodeAt(i), 16777619);
  h = Math.imul(h ^ (h >>> 15), 0x2c1b3c6d);
  h ^= h >>> 12;
  return (h >>> 0) % 360;
}
const ownerColor = (id) => `hsl(${hue(id)}, 65%, 62%)`;
const short = (id) => (id.length > 18 ? id.slice(0, 8) + "…" + id.slice(-6) : id);
const pct = (x) => (100 * x).toFixed(1) + "%";
const escape = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const fmt = (x, d = 1) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(d));

function el(tag, attrs, parent) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

// ---- the stream ----------------------------------------------------------------------
function connect() {
  const source = new EventSource("/dashboard/events");
  source.onopen = () => { $("status").textContent = "live"; $("status").className = "status live"; };
  source.onerror = () => { $("status").textContent = "reconnecting…"; $("status").className = "status lost"; };
  source.onmessage = (event) => {
    const frame = JSON.parse(event.data);
    for (const step of frame.steps) addStep(step);
    if (frame.snapshot) showSnapshot(frame.snapshot);
    renderTimeline();
    renderBatching();
    document.body.dataset.frames = String(Number(document.body.dataset.frames || 0) + 1);
  };
}

function request(id) {
  let r = state.requests.get(id);
  if (!r) {
    r = { id, order: state.order++, arrived: null, finished: null, reason: null, cells: new Map(), preempted: [],
          decodes: 0, prefills: 0 };
    state.requests.set(id, r);
  }
  return r;
}

function addStep(s) {
  const last = state.steps.length ? state.steps[state.steps.length - 1].step : -1;
  if (s.step <= last) { state.steps = []; }   // the server's step log restarted
  // a repeat step: the requests of the step before, each decoding one token
  const tokens = s.repeat ? (state.lastTokens || {}) : s.tokens;
  state.lastTokens = tokens;
  const size = Object.keys(tokens).length;
  state.steps.push({ step: s.step, t: s.t, size });
  if (state.steps.length > TIMELINE_STEPS) state.steps.shift();
  state.maxBatch = Math.max(state.maxBatch, size);
  const prefill = new Set(s.prefill || []);
  for (const id of s.arrived || []) request(id).arrived = s.step;
  for (const [id, n] of Object.entries(tokens)) {
    const r = request(id);
    if (prefill.has(id)) { r.cells.set(s.step, "p"); r.prefills += 1; } else { r.cells.set(s.step, "d"); r.decodes += 1; }
    r.tokens = (r.tokens || 0) + n;
    r.firstStep = r.firstStep ?? s.step;
    r.lastT = s.t;
    r.firstT = r.firstT ?? s.t;
  }
  for (const id of s.preempted || []) request(id).preempted.push(s.step);
  for (const [id, reason] of s.finished || []) { const r = request(id); r.finished = s.step; r.reason = reason; r.endT = s.t; }
  // forget the oldest finished requests beyond what the timeline shows
  if (state.requests.size > 4 * TIMELINE_ROWS) {
    const done = [...state.requests.values()].filter((r) => r.finished !== null).sort((a, b) => a.order - b.order);
    for (const r of done.slice(0, state.requests.size - 4 * TIMELINE_ROWS)) state.requests.delete(r.id);
  }
}

// ---- memory --------------------------------------------------------------------------
function showSnapshot(snap) {
  // requests come as lists in request_fields order
  const asObject = (row) => Object.fromEntries(snap.request_fields.map((name, i) => [name, row[i]]));
  snap.running = snap.running.map(asObject);
  snap.waiting = snap.waiting.map(asObject);
  state.snapshot = snap;
  state.refCounts = b64bytes(snap.ref_counts);
  state.cached = b64bytes(snap.cached);
  $("model").textContent = snap.model;
  $("kv-usage").textContent = pct(snap.kv_cache_usage);
  $("num-running").textContent = snap.running.length;
  $("num-waiting").textContent = snap.waiting.length;
  $("num-preemptions").textContent = snap.num_preemptions;
  $("tokens-per-s").textContent = fmt(snap.tokens_per_s);
  $("generated-per-s").textContent = fmt(snap.generated_per_s);
  $("step").textContent = snap.step;
  for (const r of snap.running) Object.assign(request(r.id), { prompt: r.prompt, output: r.output });
  let used = 0, shared = 0, cachedFree = 0;
  for (let b = 0; b < state.refCounts.length; b++) {
    if (state.refCounts[b]) { used++; if (state.refCounts[b] > 1) shared++; } else if (state.cached[b]) cachedFree++;
  }
  $("used-blocks").textContent = used;
  $("shared-blocks").textContent = shared;
  $("cached-blocks").textContent = cachedFree;
  $("free-blocks").textContent = snap.num_blocks - used - cachedFree;
  $("num-blocks").textContent = snap.num_blocks;
  $("block-size").textContent = snap.block_size;
  showSaving(snap, used);
  renderRequestList(snap);
  renderGrid(snap);
}

function showSaving(snap, used) {
  const R = snap.running.length;
  const stored = snap.running.reduce((sum, r) => sum + Math.min(r.computed, r.prompt + r.output), 0);
  const logicalBlocks = snap.running.reduce((sum, r) => sum + r.blocks.length, 0);
  const contiguous = R * snap.max_model_len;
  const paged = used * snap.block_size;
  $("contig-slots").textContent = contiguous;
  $("contig-waste").textContent = contiguous ? pct(1 - stored / contiguous) : "–";
  $("paged-slots").textContent = paged;
  $("stored-tokens").textContent = stored;
  $("num-reqs").textContent = R;
  $("paged-waste").textContent = paged ? pct(Math.max(0, 1 - stored / paged)) : "–";
  $("shared-saving").textContent = (logicalBlocks - used) * snap.block_size;
  $("saving-ratio").textContent = contiguous ? pct(paged / contiguous) : "–";
}

function renderRequestList(snap) {
  // items keyed by request id and updated in place: an item stays the same element from
  // snapshot to snapshot (up to 10 a second), so a click that lands between two of them is
  // not lost on an element that was just replaced
  const list = $("request-list");
  const old = new Map([...list.children].map((li) => [li.dataset.req, li]));
  let at = 0;
  const add = (r, waiting) => {
    let li = old.get(r.id);
    if (li) old.delete(r.id);
    else {
      li = document.createElement("li");
      li.dataset.req = r.id;
      li.title = r.id;
      li.onclick = () => {
        state.selected = state.selected === r.id ? null : r.id;
        renderRequestList(state.snapshot);
        renderGrid(state.snapshot);
      };
    }
    li.className = (waiting ? "waiting " : "") + (state.selected === r.id ? "selected" : "");
    li.style.borderLeftColor = waiting ? "transparent" : ownerColor(r.id);
    li.textContent = `${short(r.id)}  ${r.prompt}+${r.output} tok, ${r.blocks.length} blk` +
      (r.cached ? `, ${r.cached} cached` : "") + (waiting ? " (waiting)" : "");
    if (list.children[at] !== li) list.insertBefore(li, list.children[at] || null);
    at++;
  };
  snap.running.forEach((r) => add(r, false));
  snap.waiting.forEach((r) => add(r, true));
  for (const li of old.values()) li.remove();
}

function renderGrid(snap) {
  const svg = $("grid");
  const n = Math.min(snap.num_blocks, MAX_GRID_BLOCKS);
  const width = Math.max(svg.clientWidth || 600, 300);
  const cell = n > 4096 ? 6 : n > 1024 ? 10 : 18, gap = n > 4096 ? 1 : 2;
  const cols = Math.max(1, Math.floor((width - 10) / (cell + gap)));
  const top = 60;   // room for the selected request's logical blocks
  if (state.gridBuiltFor !== n * 100000 + cols) {
    svg.textContent = "";
    const defs = el("defs", {}, svg);
    const pattern = el("pattern", { id: "hatch", width: 4, height: 4, patternUnits: "userSpaceOnUse" }, defs);
    el("rect", { width: 4, height: 4, fill: "#ddd" }, pattern);
    el("path", { d: "M0,4 L4,0", stroke: "#999", "stroke-width": 1 }, pattern);
    const marker = el("marker", { id: "head", markerWidth: 6, markerHeight: 6, refX: 5, refY: 3, orient: "auto" }, defs);
    el("path", { d: "M0,0 L6,3 L0,6 z", fill: "#d00" }, marker);
    el("g", { id: "logical" }, svg);
    const blocks = el("g", { id: "blocks" }, svg);
    for (let b = 0; b < n; b++) {
      const x = 5 + (b % cols) * (cell + gap), y = top + Math.floor(b / cols) * (cell + gap);
      el("rect", { x, y, width: cell, height: cell, class: "block free", "data-block": b }, blocks);
    }
    el("g", { id: "refs" }, svg);
    el("g", { id: "arrows" }, svg);
    svg.setAttribute("height", top + Math.ceil(n / cols) * (cell + gap) + 10);
    svg.onmousemove = (e) => {
      const b = e.target.dataset && e.target.dataset.block;
      if (b !== undefined) svg.setAttribute("data-hover", b);
    };
    state.gridBuiltFor = n * 100000 + cols;
  }
  const owner = new Map();
  for (const r of snap.running) for (const b of r.blocks) if (!owner.has(b)) owner.set(b, r.id);
  const picked = state.selected && snap.running.find((r) => r.id === state.selected);
  const pickedSet = new Set(picked ? picked.blocks : []);
  const rects = $("blocks").children;
  const refs = $("refs");
  refs.textContent = "";
  for (let b = 0; b < n; b++) {
    const rect = rects[b];
    const ref = state.refCounts[b];
    let cls = ref ? "block used" : state.cached[b] ? "block cached" : "block free";
    if (ref > 1) cls += " shared";
    if (picked) cls += pickedSet.has(b) ? " picked" : " dim";
    rect.setAttribute("class", cls);
    rect.setAttribute("data-ref", ref);
    rect.style.fill = ref ? ownerColor(owner.get(b) || "?") : "";
    if (ref > 1 && cell >= 10) {
      const x = Number(rect.getAttribute("x")), y = Number(rect.getAttribute("y"));
      const t = el("text", { x: x + cell / 2, y: y + cell / 2 + 3, "text-anchor": "middle", class: "ref" }, refs);
      t.textContent = ref;
    }
  }
  drawBlockTable(picked, rects, cell, gap, top);
}

function drawBlockTable(picked, rects, cell, gap, top) {
  const logical = $("logical"), arrows = $("arrows");
  logical.textContent = "";
  arrows.textContent = "";
  if (!picked) {
    const t = el("text", { x: 5, y: 20, class: "lbl" }, logical);
    t.textContent = "select a request to draw its block table (logical → physical)";
    return;
  }
  const label = el("text", { x: 5, y: 12, class: "lbl" }, logical);
  label.textContent = `${picked.id}: logical blocks → physical blocks`;
  const step = Math.min(cell + gap + 4, 22);
  picked.blocks.forEach((b, i) => {
    const x = 5 + i * step, y = 18;
    const r = el("rect", { x, y, width: step - 4, height: 14, fill: ownerColor(picked.id), class: "logical",
                           "data-logical": i, "data-physical": b }, logical);
    r.setAttribute("stroke", "#333");
    const t = el("text", { x: x + (step - 4) / 2, y: y + 11, "text-anchor": "middle", class: "ref" }, logical);
    t.textContent = i;
    const target = rects[b];
    if (!target) return;
    el("line", { x1: x + (step - 4) / 2, y1: y + 14, x2: Number(target.getAttribute("x")) + cell / 2,
                 y2: Number(target.getAttribute("y")), class: "arrow", "marker-end": "url(#head)" }, $("arrows"));
  });
}

// ---- batching ------------------------------------------------------------------------
function renderTimeline() {
  const svg = $("timeline");
  const steps = state.steps;
  const rows = [...state.requests.values()].filter((r) => r.cells.size || r.arrived !== null)
    .sort((a, b) => a.order - b.order).slice(-TIMELINE_ROWS);
  const labelW = 150, cw = Math.max(3, Math.floor(((svg.clientWidth || 900) - labelW - 20) / TIMELINE_STEPS)), rh = 12;
  svg.setAttribute("height", Math.max(40, rows.length * rh + 30));
  const col = new Map(steps.map((s, i) => [s.step, i]));
  const parts = [];
  rows.forEach((r, i) => {
    const y = 20 + i * rh;
    parts.push(`<g class="tl-row" data-req="${escape(r.id)}" data-finished="${r.finished !== null}">`);
    parts.push(`<text x="2" y="${y + 9}" class="lbl">${escape(short(r.id))}</text>`);
    for (const [step, kind] of r.cells) {
      const c = col.get(step);
      if (c === undefined) continue;
      parts.push(`<rect x="${labelW + c * cw}" y="${y}" width="${cw - 1}" height="${rh - 2}" ` +
                 `class="${kind === "p" ? "tl-prefill" : "tl-decode"}"/>`);
    }
    const mark = (step, cls, shape) => {
      const c = col.get(step);
      if (c === undefined) return;
      const x = labelW + c * cw;
      parts.push(shape === "tri" ? `<path class="${cls}" d="M${x},${y} L${x + 5},${y + 5} L${x},${y + 10} z"/>`
        : `<rect class="${cls}" x="${x + cw - 3}" y="${y - 1}" width="3" height="${rh}"/>`);
    };
    if (r.arrived !== null) mark(r.arrived, "tl-arrival", "tri");
    for (const p of r.preempted) mark(p, "tl-preempt", "bar");
    if (r.finished !== null) mark(r.finished, "tl-finish", "bar");
    parts.push("</g>");
  });
  if (steps.length) {
    parts.push(`<text x="${labelW}" y="12" class="lbl">step ${steps[0].step}</text>`);
    parts.push(`<text x="${labelW + Math.max(steps.length * cw, 110)}" y="12" class="lbl" text-anchor="end">` +
               `step ${steps[steps.length - 1].step}</text>`);
  }
  svg.innerHTML = parts.join("");
}

function renderBatching() {
  const done = [...state.requests.values()].filter((r) => r.finished !== null && r.cells.size)
    .sort((a, b) => a.order - b.order);
  $("num-finished").textContent = done.length;
  const input = $("batch-size");
  if (!state.userBatch && state.maxBatch) input.value = state.maxBatch;
  const B = Math.max(1, Number(input.value) || 1);
  if (!done.length) return;
  const L = done.map((r) => r.decodes + 1);   // the prefill samples the first token, each decode one more
  let staticSteps = 0;
  for (let i = 0; i < L.length; i += B) staticSteps += Math.max(...L.slice(i, i + B));
  const total = L.reduce((a, b) => a + b, 0);
  const continuous = Math.max(Math.max(...L), Math.ceil(total / B));
  $("static-steps").textContent = staticSteps;
  $("continuous-steps").textContent = continuous;
  $("batching-ratio").textContent = (staticSteps / continuous).toFixed(2) + "x";
  const first = Math.min(...done.map((r) => r.firstStep)), last = Math.max(...done.map((r) => r.finished));
  $("measured-steps").textContent = last - first + 1;
  const seen = state.steps.filter((s) => s.step >= first && s.step <= last);
  if (seen.length > 1) $("step-ms").textContent = fmt(1000 * (seen[seen.length - 1].t - seen[0].t) / (seen.length - 1));
}

// ---- framework comparison -------------------------------------------------------------
async function loadResults() {
  const response = await fetch("/dashboard/results", { credentials: "same-origin" });
  if (!response.ok) { $("charts").textContent = `results: HTTP ${response.status}`; return; }
  const data = await response.json();
  $("results-dir").textContent = data.results_dir;
  const figures = data.figures;
  $("num-figures").textContent = figures.length;
  const body = document.querySelector("#figures tbody");
  for (const f of figures) {
    const tr = document.createElement("tr");
    for (const v of [f.machine, f.model, f.workload, f.metric, f.engine]) {
      const td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
    }
    const td = document.createElement("td"); td.className = "num"; td.textContent = `${fmt(f.value, 1)} ${f.unit}`;
    tr.appendChild(td);
    const src = document.createElement("td"); src.textContent = f.source; tr.appendChild(src);
    body.appendChild(tr);
  }
  // a chart per (machine, model, workload, metric) that compares two engines or more
  const groups = new Map();
  for (const f of figures) {
    const key = [f.machine, f.model, f.workload, f.metric, f.unit].join("|");
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(f);
  }
  const charts = $("charts");
  const singles = new Map();   // figures of one engine: a chart per (source, unit), a bar per workload and metric
  const keys = [...groups.keys()].sort((a, b) => Number(!a.startsWith("nvidia")) - Number(!b.startsWith("nvidia")));
  for (const key of keys) {
    const list = groups.get(key);
    const [machine, model, workload, metric, unit] = key.split("|");
    if (new Set(list.map((f) => f.engine)).size >= 2) {
      charts.appendChild(barChart(`${model} · ${workload} · ${metric} (${unit})`, machine, list, (f) => f.engine));
      continue;
    }
    const single = `${list[0].source}|${unit}`;
    if (!singles.has(single)) singles.set(single, []);
    singles.get(single).push(...list);
  }
  for (const [key, list] of singles) {
    if (list.length < 2) continue;
    const [source, unit] = key.split("|");
    const stem = source.split("/").pop().replace(/\.jsonl?$/, "");
    const label = (f) => `${f.workload.replace(stem, "").replace(/^ @ /, "@")} ${f.metric}`.trim();
    charts.appendChild(barChart(`${list[0].engine} · ${stem} (${unit})`, list[0].machine, list, label));
  }
}

function barChart(title, machine, list, label) {
  const div = document.createElement("div");
  div.className = "chart";
  const h = document.createElement("h4");
  h.textContent = title;
  div.appendChild(h);
  const note = document.createElement("div");
  note.textContent = machine;
  div.appendChild(note);
  const max = Math.max(...list.map((f) => f.value));
  const svg = el("svg", { width: 420, height: list.length * 18 + 6, class: "bars" });
  list.forEach((f, i) => {
    const y = 3 + i * 18, w = max > 0 ? (f.value / max) * 170 : 0;
    const name = el("text", { x: 0, y: y + 12, class: "lbl" }, svg);
    name.textContent = label(f);
    el("rect", { x: 190, y, width: Math.max(w, 1), height: 14, fill: `hsl(${hue(f.engine + f.metric)}, 55%, 55%)` }, svg);
    const v = el("text", { x: 194 + w, y: y + 12, class: "lbl" }, svg);
    v.textContent = fmt(f.value, f.value >= 100 ? 0 : 1);
  });
  div.appendChild(svg);
  return div;
}

$("batch-size").addEventListener("input", () => { state.userBatch = true; renderBatching(); });
connect();
loadResults();
