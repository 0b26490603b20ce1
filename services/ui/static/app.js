// membrane UI: service map, flows and nodes, from the UI service's JSON and its event stream.
// Plain JS and SVG, no library: the page works offline, served by the project.
"use strict";

const COLORS = { FORWARDED: "#2e7d32", DROPPED: "#c62828", AUDIT: "#ef6c00" };
const STALE_AFTER_MS = 3000; // no batch for this long: the stream is gone, nothing is live
const SAMPLE_RATE = 5000; // flows/s above which the page says it shows a sample
const BOX_W = 210, BOX_H = 46, COL_W = 300, ROW_H = 80, PAD = 30;
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  namespace: "", since: 3600, paused: false, boxes: new Map(), edges: new Map(),
  selected: null, source: null, lastBatch: 0, monitorUp: true, asOf: 0, view: "map",
  refetchTimer: null,
};

window.membrane = state; // for the browser test and the console: what the page holds
const $ = (id) => document.getElementById(id);
const edgeKey = (e) => `${e.source}|${e.destination}|${e.verdict}`;

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function clock(t) {
  const d = new Date(t * 1000);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

// --- status: never show stale data as live ------------------------------------------------------

function setStatus() {
  const el = $("status");
  const now = Date.now();
  const gone = now - state.lastBatch > STALE_AFTER_MS;
  const asOf = state.asOf ? ` (showing data as of ${clock(state.asOf)})` : "";
  let text, cls;
  if (gone) { text = "Not live: reconnecting to the UI service…" + asOf; cls = "stale"; }
  else if (!state.monitorUp) { text = "Not live: no monitor replica answers" + asOf; cls = "stale"; }
  else if (state.paused) { text = "Paused" + asOf; cls = "paused"; }
  else { text = "Live"; cls = ""; }
  el.textContent = text;
  el.className = cls;
  document.body.classList.toggle("stale", cls === "stale");
}

// --- the service map -----------------------------------------------------------------------------

function layout() {
  // columns by longest path from the sources (cycles cut after as many rounds as boxes)
  const rank = new Map([...state.boxes.keys()].map((id) => [id, 0]));
  for (let round = 0; round < state.boxes.size; round++) {
    let moved = false;
    for (const e of state.edges.values()) {
      if (e.source === e.destination) continue;
      const want = rank.get(e.source) + 1;
      if (want > rank.get(e.destination) && want < state.boxes.size) { rank.set(e.destination, want); moved = true; }
    }
    if (!moved) break;
  }
  const columns = new Map();
  for (const id of [...state.boxes.keys()].sort()) {
    const r = rank.get(id);
    if (!columns.has(r)) columns.set(r, []);
    columns.get(r).push(id);
  }
  const at = new Map();
  for (const [r, ids] of columns) ids.forEach((id, i) => at.set(id, { x: PAD + r * COL_W, y: PAD + i * ROW_H }));
  return at;
}

function svg(tag, attrs, parent) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

function activate(el, action) {
  el.addEventListener("click", action);
  el.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); action(); } });
}

function render() {
  const map = $("map");
  map.replaceChildren();
  $("map-empty").hidden = state.boxes.size > 0;
  const at = layout();
  let width = 0, height = 0;
  for (const p of at.values()) { width = Math.max(width, p.x + BOX_W + PAD); height = Math.max(height, p.y + BOX_H + PAD); }
  map.setAttribute("width", Math.max(width, 600));
  map.setAttribute("height", Math.max(height, 200));
  const defs = svg("defs", {}, map);
  for (const [verdict, color] of Object.entries(COLORS)) {
    const marker = svg("marker", { id: `arrow-${verdict}`, viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 12, markerHeight: 12, markerUnits: "userSpaceOnUse", orient: "auto-start-reverse" }, defs);
    svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: color }, marker);
  }
  const offsets = { FORWARDED: 0, DROPPED: 12, AUDIT: -12 };
  for (const e of [...state.edges.values()].sort((a, b) => edgeKey(a).localeCompare(edgeKey(b)))) {
    const a = at.get(e.source), b = at.get(e.destination);
    if (!a || !b) continue;
    const off = offsets[e.verdict] || 0;
    const x1 = a.x + BOX_W, y1 = a.y + BOX_H / 2 + off, x2 = b.x, y2 = b.y + BOX_H / 2 + off;
    let d, lx, ly;
    if (x2 > x1) {
      const mid = (x1 + x2) / 2;
      d = `M ${x1} ${y1} C ${mid} ${y1}, ${mid} ${y2}, ${x2} ${y2}`; lx = mid; ly = (y1 + y2) / 2 - 4;
    } else { // same column or backwards: loop around below
      const bottom = Math.max(a.y, b.y) + BOX_H + 20 + Math.abs(off);
      d = `M ${a.x + BOX_W / 2 + off} ${a.y + BOX_H} C ${a.x + BOX_W / 2} ${bottom}, ${b.x + BOX_W / 2} ${bottom}, ${b.x + BOX_W / 2 + off} ${b.y + BOX_H}`;
      lx = (a.x + b.x) / 2 + BOX_W / 2; ly = bottom - 2;
    }
    const label = edgeLabel(e);
    const g = svg("g", {
      class: `edge ${e.verdict}`, role: "button", tabindex: 0, "aria-label": label,
      "data-source": e.source, "data-destination": e.destination, "data-verdict": e.verdict, "data-count": e.count,
    }, map);
    svg("title", {}, g).textContent = label;
    svg("path", { d, "marker-end": `url(#arrow-${e.verdict})` }, g);
    svg("path", { d, stroke: "transparent", "stroke-width": 12 }, g); // easier to hit
    svg("text", { x: lx, y: ly, "text-anchor": "middle" }, g).textContent = `${e.count} ${e.ports.slice(0, 2).join(",")}`;
    const sel = state.selected;
    if (sel && sel.type === "edge" && edgeKey(sel) === edgeKey(e)) g.classList.add("selected");
    activate(g, () => select({ type: "edge", source: e.source, destination: e.destination, verdict: e.verdict }));
  }
  for (const [id, box] of state.boxes) {
    const p = at.get(id);
    const reserved = box.kind !== "pod";
    const label = `${reserved ? box.kind + " " : "workload "}${id}`;
    const g = svg("g", { class: `box${reserved ? " reserved" : ""}`, role: "button", tabindex: 0, "aria-label": label, "data-id": id, transform: `translate(${p.x},${p.y})` }, map);
    svg("title", {}, g).textContent = label;
    svg("rect", { width: BOX_W, height: BOX_H, rx: 6 }, g);
    svg("text", { x: 10, y: 20 }, g).textContent = id.length > 30 ? id.slice(0, 29) + "…" : id;
    svg("text", { x: 10, y: 36, class: "kind" }, g).textContent = reserved ? `reserved: ${box.kind}` : "workload";
    if (state.selected && state.selected.type === "box" && state.selected.id === id) g.classList.add("selected");
    activate(g, () => select({ type: "box", id }));
  }
}

function edgeLabel(e) {
  return `${e.source} to ${e.destination}: ${e.count} ${e.verdict.toLowerCase()} (${e.ports.join(", ")})${e.policy ? ", policy " + e.policy : ""}`;
}

function updateCounts() {
  for (const g of $("map").querySelectorAll("g.edge")) {
    const e = state.edges.get(`${g.dataset.source}|${g.dataset.destination}|${g.dataset.verdict}`);
    if (!e) continue;
    g.dataset.count = e.count;
    g.setAttribute("aria-label", edgeLabel(e));
    g.querySelector("title").textContent = edgeLabel(e);
    g.querySelector("text").textContent = `${e.count} ${e.ports.slice(0, 2).join(",")}`;
  }
}

function addBox(id, kind) { if (!state.boxes.has(id)) state.boxes.set(id, { id, kind }); }

async function loadMap() {
  const params = new URLSearchParams({ since: state.since });
  if (state.namespace) params.set("namespace", state.namespace);
  try {
    const m = await getJSON(`/api/map?${params}`);
    state.boxes = new Map();
    state.edges = new Map();
    for (const b of m.boxes) addBox(b.id, b.kind);
    for (const e of m.edges) state.edges.set(edgeKey(e), e);
    state.asOf = Date.now() / 1000;
    render();
  } catch (err) {
    $("map-empty").hidden = false;
    $("map-empty").textContent = `Could not read the recorded flows: ${err.message}`;
  }
}

// --- flows of a selection ------------------------------------------------------------------------

function filterParams() {
  const params = new URLSearchParams();
  for (const term of $("filter").value.trim().split(/\s+/).filter(Boolean)) {
    const i = term.indexOf("=");
    if (i < 1) throw new Error(`${term}: write field=value`);
    params.append(term.slice(0, i), term.slice(i + 1));
  }
  return params;
}

function peerText(p) {
  const where = p.pod ? `${p.namespace}/${p.pod}` : p.ip;
  return `${p.workload}\n${where}${p.port ? ":" + p.port : ""} (ID:${p.identity})`;
}

// An L7 flow's request and its answer, as `membrane observe` reads them (membrane/flowfmt.py)
function l7Text(l7) {
  const list = (v) => v || [];
  if (l7.error && !l7.method) return `${l7.protocol} ${l7.error}`; // a connection closed on bad input
  if (l7.protocol === "dns") {
    const answers = list(l7.answers).length ? ` ${list(l7.answers).join(",")} TTL ${l7.ttl}` : "";
    return `dns ${l7.qtype} ${l7.query} → ${l7.rcode}${answers}`;
  }
  let request, answer;
  if (l7.protocol === "kafka") {
    const topics = list(l7.topics).length ? ` [${list(l7.topics).join(",")}]` : "";
    request = `kafka ${l7.api_key} v${l7.api_version}${topics}`;
    answer = l7.error_code ? `error ${l7.error_code}` : "ok";
  } else {
    request = `${l7.protocol === "grpc" ? "grpc" : l7.method} ${l7.url}`;
    answer = l7.grpc_status == null ? String(l7.status || "?") : `grpc-status ${l7.grpc_status}`;
  }
  const error = l7.error ? `, ${l7.error}` : ""; // why the proxy answered for the upstream
  return `${request} → ${answer} (${(l7.latency_ms || 0).toFixed(1)} ms${error})`;
}

async function loadFlows() {
  const sel = state.selected;
  if (!sel) return;
  let params;
  try { params = filterParams(); $("filter-error").textContent = ""; }
  catch (err) { $("filter-error").textContent = err.message; return; }
  if (sel.type === "edge") {
    params.append("from_workload", sel.source);
    params.append("to_workload", sel.destination);
    params.append("verdict", sel.verdict);
    $("flows-title").textContent = `Flows ${sel.source} → ${sel.destination} (${sel.verdict.toLowerCase()}), newest first`;
  } else {
    params.append("workload", sel.id);
    $("flows-title").textContent = `Flows of ${sel.id}, newest first`;
  }
  params.set("since", state.since);
  let rows;
  try { rows = await getJSON(`/api/flows?${params}`); }
  catch (err) { $("filter-error").textContent = err.message; return; }
  const body = $("flow-table").tBodies[0];
  body.replaceChildren();
  for (const f of rows) {
    if (f.is_reply) continue;
    const tr = document.createElement("tr");
    tr.className = f.verdict;
    const l4 = `${f.protocol}${f.tcp_flags.length ? " " + f.tcp_flags.join(",") : ""}`;
    // (an L7 request the proxy denied has no datapath drop reason)
    const reason = f.verdict === "DROPPED" && f.drop_reason ? `${f.drop_reason} ${f.drop_reason_desc}` : "";
    const cells = [clock(f.time), peerText(f.source), peerText(f.destination), l4, f.l7 ? l7Text(f.l7) : "—", f.verdict, reason, f.policy || "—"];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      td.style.whiteSpace = "pre-line";
      if (i === 5) td.className = "verdict";
      tr.appendChild(td);
    });
    body.appendChild(tr);
  }
}

function select(sel) { state.selected = sel; render(); loadFlows(); }

function touchesSelection(edge) {
  const sel = state.selected;
  if (!sel) return false;
  if (sel.type === "box") return edge.source === sel.id || edge.destination === sel.id;
  return edgeKey(edge) === edgeKey(sel);
}

// --- live updates ------------------------------------------------------------------------------

function onBatch(batch) {
  state.lastBatch = Date.now();
  // back from an outage, or a replica restarted (its ring started empty): reload the map
  const wasDown = !state.monitorUp || (state.monitors !== undefined && batch.monitors !== state.monitors);
  state.monitorUp = batch.monitor;
  state.monitors = batch.monitors;
  const sampling = $("sampling");
  if (batch.rate > SAMPLE_RATE || batch.sampled) {
    sampling.hidden = false;
    sampling.textContent = `${Math.round(batch.rate).toLocaleString()} flows/s: edge counts are exact; the flow list shows a sample (${batch.skipped.toLocaleString()} flows left out in the last 250 ms)`;
  } else sampling.hidden = true;
  if (state.paused || !batch.monitor) { setStatus(); return; }
  if (wasDown) { loadMap(); setStatus(); return; } // back: what was shown is not what happened
  let changed = false, counted = false, touched = false;
  for (const e of batch.edges) {
    const boxes = state.boxes.size;
    addBox(e.source, e.source_kind);
    addBox(e.destination, e.destination_kind);
    const key = edgeKey(e);
    const known = state.edges.get(key);
    if (known) { known.count += e.count; counted = true; }
    else { state.edges.set(key, { source: e.source, destination: e.destination, verdict: e.verdict, count: e.count, ports: [], policy: "" }); changed = true; }
    if (state.boxes.size !== boxes) changed = true;
    if (state.edges.get(key).count <= 0) { state.edges.delete(key); changed = true; continue; } // it was a drop after all
    for (const f of batch.flows) {
      if (f.source.workload === e.source && f.destination.workload === e.destination && f.verdict === e.verdict) {
        const edge = state.edges.get(key);
        const port = `${f.destination.port}/${f.protocol}`;
        if (!edge.ports.includes(port)) { edge.ports.push(port); changed = true; }
        if (f.policy) edge.policy = f.policy;
      }
    }
    touched = touched || touchesSelection(e);
  }
  state.asOf = batch.time;
  if (changed) render(); // new boxes or edges: lay out again
  else if (counted) updateCounts(); // only numbers: the elements (and keyboard focus) stay
  if (touched && !state.refetchTimer) {
    state.refetchTimer = setTimeout(() => { state.refetchTimer = null; loadFlows(); }, 500);
  }
  setStatus();
}

function connect() {
  if (state.source) state.source.close();
  const params = new URLSearchParams();
  if (state.namespace) params.set("namespace", state.namespace);
  const source = new EventSource(`/api/events?${params}`);
  source.onopen = () => { loadMap(); loadFlows(); };
  source.onmessage = (ev) => onBatch(JSON.parse(ev.data));
  source.onerror = () => setStatus(); // the browser reconnects by itself (retry: 1 s)
  state.source = source;
}

// --- nodes -------------------------------------------------------------------------------------

async function loadNodes() {
  let m;
  try { m = await getJSON("/api/nodes"); } catch (err) { return; }
  const head = $("matrix").tHead, body = $("matrix").tBodies[0];
  head.replaceChildren(); body.replaceChildren();
  const hr = head.insertRow();
  const corner = document.createElement("th"); corner.textContent = "from \\ to"; hr.appendChild(corner);
  for (const n of m.nodes) { const th = document.createElement("th"); th.scope = "col"; th.textContent = n; hr.appendChild(th); }
  for (const row of m.rows) {
    const tr = body.insertRow();
    const th = document.createElement("th"); th.scope = "row"; th.textContent = row.from; tr.appendChild(th);
    for (const c of row.cells) {
      const td = tr.insertCell();
      td.dataset.from = row.from; td.dataset.to = c.to;
      if (c.self) { td.textContent = "—"; continue; }
      td.className = c.state; td.dataset.state = c.state;
      td.textContent = c.state === "ok" ? `${c.ms == null ? "?" : c.ms.toFixed(2)} ms` : c.state;
    }
  }
}

function show(view) {
  state.view = view;
  $("view-map").hidden = view !== "map";
  $("view-nodes").hidden = view !== "nodes";
  $("tab-map").setAttribute("aria-selected", view === "map");
  $("tab-nodes").setAttribute("aria-selected", view === "nodes");
  if (view === "nodes") loadNodes();
}

async function loadNamespaces() {
  try {
    const names = await getJSON("/api/namespaces");
    const select = $("namespace");
    for (const n of names) {
      if ([...select.options].some((o) => o.value === n)) continue;
      const o = document.createElement("option"); o.value = n; o.textContent = n; select.appendChild(o);
    }
  } catch (err) { /* the status line says whether the cluster answers */ }
}

function init() {
  $("namespace").addEventListener("change", (ev) => { state.namespace = ev.target.value; state.selected = null; connect(); });
  $("since").addEventListener("change", (ev) => { state.since = Number(ev.target.value); loadMap(); loadFlows(); });
  $("pause").addEventListener("click", () => {
    state.paused = !state.paused;
    $("pause").textContent = state.paused ? "Resume" : "Pause";
    $("pause").setAttribute("aria-pressed", state.paused);
    if (!state.paused) { loadMap(); loadFlows(); }
    setStatus();
  });
  $("apply-filter").addEventListener("click", loadFlows);
  $("filter").addEventListener("keydown", (ev) => { if (ev.key === "Enter") loadFlows(); });
  $("tab-map").addEventListener("click", () => show("map"));
  $("tab-nodes").addEventListener("click", () => show("nodes"));
  setInterval(setStatus, 1000);
  setInterval(() => { if (state.view === "nodes") loadNodes(); }, 5000);
  setInterval(loadNamespaces, 10000);
  loadNamespaces();
  connect();
}

init();
