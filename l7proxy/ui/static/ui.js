// l7proxy web UI: service map (SVG), flow table, and each flow's decision.
// Plain JavaScript, no library: the server aggregates, this page draws what it is sent.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const VERDICTS = ["FORWARDED", "DENIED", "DROPPED", "AUDIT", "PAUSED"];
const NODE_W = 176, NODE_H = 42, ROW_H = 58, COL_GAP = 150, GROUP_PAD = 14, HEAD_H = 26;
const MAX_TABLE_ROWS = 1000;
const STALE_AFTER = 60; // seconds without a flow before an edge is drawn faded

const state = {
  map: null,          // the last snapshot
  hidden: new Set(),  // verdict layers switched off in the legend
  selectedEdge: null,
  selectedNode: null,
  events: null,       // the EventSource
  older: null,        // cursor for "load older" (null: nothing older)
  rows: 0,
  serverTime: Date.now() / 1000,
};

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmtTime(epoch) {
  if (typeof epoch !== "number") return "–";
  const d = new Date(epoch * 1000);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function total(counts) {
  return Object.values(counts).reduce((a, b) => a + b, 0);
}

// ------------------------------------------------------------------ filters

function filterQuery() {
  const q = new URLSearchParams();
  const verdicts = [...document.querySelectorAll("input[name=verdict]:checked")].map((i) => i.value);
  if (verdicts.length) q.set("verdict", verdicts.join(","));
  if ($("#protocol").value) q.set("protocol", $("#protocol").value);
  const endpoint = $("#endpoint").value.trim();
  if (endpoint) q.set("endpoint", endpoint);
  for (const name of ["since", "until"]) {
    const value = $("#" + name).value;
    if (value) q.set(name, String(new Date(value).getTime() / 1000));
  }
  if (state.edgeFilter) {
    q.set("source", state.edgeFilter.source);
    q.set("destination", state.edgeFilter.target);
  }
  return q;
}

function filtersChanged() {
  clearTable();
  loadPage(null);
  connect();
}

// ------------------------------------------------------------------ live stream

function connect() {
  if (state.events) state.events.close();
  const q = filterQuery();
  const events = new EventSource("/api/events?" + q.toString());
  state.events = events;
  events.addEventListener("open", () => $("#live-dot").classList.add("on"));
  events.addEventListener("error", () => $("#live-dot").classList.remove("on"));
  events.addEventListener("map", (e) => {
    const map = JSON.parse(e.data);
    if (state.map && map.version === state.map.version) return; // nothing moved
    state.map = map;
    drawMap();
  });
  events.addEventListener("flows", (e) => {
    if (!$("#live").checked) return;
    const data = JSON.parse(e.data);
    prependRows(data.rows, data.matched);
  });
  events.addEventListener("stats", (e) => showStats(JSON.parse(e.data)));
}

function showStats(stats) {
  state.serverTime = stats.time;
  $("#rate").textContent = stats.rate;
  $("#total").textContent = stats.flows.toLocaleString();
  $("#revision").textContent = stats.revision ?? "–";
}

// ------------------------------------------------------------------ service map

function layout(map, available) {
  // Two columns of nodes: those that mostly open flows on the left, the others
  // (services, and services that call services) on the right, so most edges run
  // left to right and none crosses a node. A group box holds its nodes: in one
  // column, or across both when it has nodes of each kind. Groups stack downwards.
  const score = new Map(map.nodes.map((n) => [n.id, 0]));
  for (const e of map.edges) {
    const n = total(e.verdicts);
    score.set(e.source, (score.get(e.source) || 0) + n);
    score.set(e.target, (score.get(e.target) || 0) - n);
  }
  const byName = (a, b) => a.label.localeCompare(b.label);
  const order = (a, b) => score.get(b.id) - score.get(a.id) || byName(a, b);
  const members = new Map(map.groups.map((g) => [g.id, { left: [], right: [] }]));
  for (const n of [...map.nodes].sort(order)) members.get(n.group)[score.get(n.id) > 0 ? "left" : "right"].push(n);
  const kind = (g) => { const m = members.get(g.id); return m.left.length ? (m.right.length ? 1 : 0) : 2; };
  const groups = [...map.groups].sort((a, b) => kind(a) - kind(b) || byName(a, b));
  // The gap between the columns takes the width there is (edge labels live in it).
  const gap = Math.max(COL_GAP * 2, Math.min(available - 2 * NODE_W - 4 * GROUP_PAD - 150, 760));
  const colX = [16 + GROUP_PAD, 16 + GROUP_PAD + NODE_W + gap];
  const pos = new Map();
  const boxes = [];
  const bottom = [16, 16];
  const heightOf = (rows) => HEAD_H + rows * ROW_H - (ROW_H - NODE_H) + GROUP_PAD;
  for (const g of groups) {
    const { left, right } = members.get(g.id);
    const cols = [left, right].map((nodes, c) => [nodes, c]).filter(([nodes]) => nodes.length);
    const spans = cols.length === 2;
    const top = spans ? Math.max(...bottom) : bottom[cols[0][1]];
    const h = heightOf(Math.max(left.length, right.length));
    const first = cols[0][1], last = cols[cols.length - 1][1];
    const x = colX[first] - GROUP_PAD;
    boxes.push({ group: g, x, y: top, w: colX[last] + NODE_W + GROUP_PAD - x, h });
    for (const [nodes, c] of cols) {
      nodes.forEach((n, j) => pos.set(n.id, { x: colX[c], y: top + HEAD_H + j * ROW_H }));
      bottom[c] = top + h + 24;
    }
  }
  const width = colX[1] + NODE_W + GROUP_PAD + 130;
  return { pos, boxes, width, height: Math.max(...bottom) + 8 };
}

function anchors(map, pos) {
  // Where each edge leaves its source and enters its target: spread along the
  // node's side, in the order of the other ends, so edges do not share a point.
  const out = new Map(), into = new Map();
  for (const e of map.edges) {
    if (!pos.has(e.source) || !pos.has(e.target)) continue;
    (out.get(e.source) || out.set(e.source, []).get(e.source)).push(e);
    (into.get(e.target) || into.set(e.target, []).get(e.target)).push(e);
  }
  const at = new Map();
  const spread = (lists, end, other) => {
    for (const [id, edges] of lists) {
      edges.sort((a, b) => pos.get(a[other]).y - pos.get(b[other]).y || a.id.localeCompare(b.id));
      edges.forEach((e, i) => {
        const entry = at.get(e.id) || {};
        entry[end] = pos.get(id).y + (NODE_H * (i + 1)) / (edges.length + 1);
        at.set(e.id, entry);
      });
    }
  };
  spread(out, "from", "target");
  spread(into, "to", "source");
  return at;
}

function edgePath(a, b, ay, by) {
  // From the right side of a to the left side of b, or around when b is not to the right.
  if (b.x > a.x + NODE_W) {
    const x1 = a.x + NODE_W, x2 = b.x - 7, dx = (x2 - x1) / 2;
    return { d: `M${x1},${ay} C${x1 + dx},${ay} ${x2 - dx},${by} ${x2},${by}`, mx: x1 + (x2 - x1) * 0.42, my: ay + (by - ay) * 0.42 };
  }
  if (b.x + NODE_W < a.x) {
    const x1 = a.x, x2 = b.x + NODE_W + 7, dx = (x1 - x2) / 2;
    return { d: `M${x1},${ay} C${x1 - dx},${ay} ${x2 + dx},${by} ${x2},${by}`, mx: x1 - (x1 - x2) * 0.42, my: ay + (by - ay) * 0.42 };
  }
  // Same column: loop out to the right.
  const x = a.x + NODE_W, bulge = 50 + Math.abs(by - ay) / 3;
  return { d: `M${x},${ay} C${x + bulge},${ay} ${x + bulge},${by} ${x + 7},${by}`, mx: x + bulge * 0.75 + 4, my: (ay + by) / 2 };
}

function drawMarkers() {
  const defs = $("#markers");
  if (defs.childNodes.length) return;
  for (const v of VERDICTS) {
    const m = svg("marker", { id: "arrow-" + v, viewBox: "0 0 10 10", refX: "2", refY: "5", markerWidth: "9", markerHeight: "9", markerUnits: "userSpaceOnUse", orient: "auto" });
    m.appendChild(svg("path", { d: "M0,0 L10,5 L0,10 z", class: "arrow " + v, fill: getComputedStyle(document.documentElement).getPropertyValue("--" + v.toLowerCase()).trim() || "#888" }));
    defs.appendChild(m);
  }
}

function drawMap() {
  const map = state.map;
  if (!map) return;
  drawMarkers();
  $("#total").textContent = map.flows.toLocaleString();
  $("#map-since").textContent = map.since ? fmtTime(map.since) : "–";
  const warnings = [];
  if (map.flows_not_drawn) warnings.push(`${map.flows_not_drawn} flows beyond the map's bounds (${map.bounds.nodes} nodes, ${map.bounds.edges} edges)`);
  if (map.records_missed) warnings.push(`${map.records_missed} records missed under load`);
  $("#warnings").textContent = warnings.join(" · ");

  const root = $("#map");
  const { pos, boxes, width, height } = layout(map, $("#map-scroll").clientWidth || 900);
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  root.setAttribute("height", String(height));
  root.setAttribute("preserveAspectRatio", "xMinYMin meet");
  const groupsG = $("#groups"), edgesG = $("#edges"), nodesG = $("#nodes");
  groupsG.replaceChildren(); edgesG.replaceChildren(); nodesG.replaceChildren();

  for (const b of boxes) {
    const g = svg("g", { class: "group", "data-id": b.group.id });
    g.appendChild(svg("rect", { class: "group-box " + b.group.kind, x: b.x, y: b.y, width: b.w, height: b.h, rx: 8 }));
    g.appendChild(svg("text", { class: "group-label", x: b.x + 10, y: b.y + 17 }, b.group.label));
    groupsG.appendChild(g);
  }

  const maxCount = Math.max(1, ...map.edges.map((e) => total(e.verdicts)));
  const ends = anchors(map, pos);
  for (const e of map.edges) {
    const a = pos.get(e.source), b = pos.get(e.target);
    if (!a || !b) continue;
    const { from, to } = ends.get(e.id);
    const shown = VERDICTS.filter((v) => e.verdicts[v] && !state.hidden.has(v));
    if (!shown.length) continue;
    const g = svg("g", { class: "edge", "data-id": e.id, "data-source": e.source, "data-target": e.target, "data-verdicts": shown.join(" ") });
    if (state.serverTime - e.last_seen > STALE_AFTER) g.classList.add("stale");
    if (state.selectedEdge === e.id) g.classList.add("selected");
    const title = svg("title", {}, edgeTitle(e));
    g.appendChild(title);
    shown.forEach((v, i) => {
      const offset = (i - (shown.length - 1) / 2) * 3.5;
      const p = edgePath(a, b, from + offset, to + offset);
      const w = 1.5 + 3.5 * Math.log1p(e.verdicts[v]) / Math.log1p(maxCount);
      g.appendChild(svg("path", { class: "verdict " + v, d: p.d, "stroke-width": w.toFixed(2), "marker-end": `url(#arrow-${v})`, "data-verdict": v, "data-count": e.verdicts[v] }));
    });
    const mid = edgePath(a, b, from, to);
    g.appendChild(svg("path", { class: "hit", d: mid.d }));
    const label = edgeLabel(e);
    if (label) {
      const anchor = mid.mx > a.x + NODE_W && b.x <= a.x + NODE_W ? "start" : "middle";
      g.appendChild(svg("text", { class: "bg", x: mid.mx, y: mid.my - 5, "text-anchor": anchor }, label));
      g.appendChild(svg("text", { class: "label", x: mid.mx, y: mid.my - 5, "text-anchor": anchor }, label));
    }
    g.addEventListener("click", () => selectEdge(e.id));
    edgesG.appendChild(g);
  }

  for (const n of map.nodes) {
    const p = pos.get(n.id);
    const g = svg("g", { class: "node " + n.kind, "data-id": n.id, transform: `translate(${p.x},${p.y})` });
    if (state.selectedNode === n.id) g.classList.add("selected");
    g.appendChild(svg("title", {}, nodeTitle(n)));
    g.appendChild(svg("rect", { width: NODE_W, height: NODE_H, rx: 6 }));
    g.appendChild(svg("text", { x: 10, y: 17 }, clip(n.label, 24)));
    g.appendChild(svg("text", { class: "sub", x: 10, y: 33 }, `${n.kind} · ${n.flows.toLocaleString()} flows`));
    g.addEventListener("click", () => selectNode(n.id));
    nodesG.appendChild(g);
  }
  if (state.selectedEdge) showEdge(state.selectedEdge);
}

function clip(text, n) {
  return text.length > n ? text.slice(0, n - 1) + "…" : text;
}

function edgeLabel(e) {
  if (!e.l7.length) return Object.keys(e.protocols).join(",") + (e.ports.length ? ":" + e.ports.join(",") : "");
  const top = e.l7[0].key;
  return clip(top, 34) + (e.l7.length > 1 ? ` +${e.l7.length - 1}` : "");
}

function edgeTitle(e) {
  const lines = [`${e.source} → ${e.target}`];
  for (const v of VERDICTS) if (e.verdicts[v]) lines.push(`${v}: ${e.verdicts[v]}`);
  for (const entry of e.l7) lines.push(`  ${entry.key}: ${entry.count}`);
  return lines.join("\n");
}

function nodeTitle(n) {
  const labels = Object.entries(n.labels).map(([k, v]) => (v ? `${k}=${v}` : k));
  return [n.id, ...labels].join("\n");
}

function selectEdge(id) {
  state.selectedEdge = id;
  state.selectedNode = null;
  drawMap();
}

function showEdge(id) {
  const e = state.map && state.map.edges.find((x) => x.id === id);
  const box = $("#details");
  if (!e) { box.replaceChildren(el("p", { class: "hint" }, "This edge is gone from the map.")); return; }
  const parts = [el("h3", {}, `${e.source} → ${e.target}`)];
  const counts = el("p");
  for (const v of VERDICTS) {
    if (!e.verdicts[v]) continue;
    counts.appendChild(el("span", { class: "badge " + v }, `${v} ${e.verdicts[v]}`));
    counts.appendChild(document.createTextNode(" "));
  }
  parts.push(counts);
  parts.push(el("p", { class: "hint" }, `protocols ${Object.entries(e.protocols).map(([p, n]) => `${p} ${n}`).join(", ")}; ports ${e.ports.join(", ") || "–"}`));
  if (e.l7.length) {
    const table = el("table", { id: "l7-summary" });
    for (const entry of e.l7) {
      const tr = el("tr");
      tr.appendChild(el("td", {}, entry.key));
      const n = el("td", { class: "n" }, (entry.overcount ? "≤" : "") + entry.count.toLocaleString());
      tr.appendChild(n);
      const v = el("td");
      for (const verdict of VERDICTS) if (entry.verdicts[verdict]) v.appendChild(el("span", { class: "badge " + verdict, title: verdict }, String(entry.verdicts[verdict])));
      tr.appendChild(v);
      table.appendChild(tr);
    }
    parts.push(table);
    if (e.l7.some((x) => x.overcount)) parts.push(el("p", { class: "hint" }, "≤: kept by count; beyond the bound, the least counted entries give way."));
  }
  const button = el("button", { type: "button", id: "edge-flows" }, "show these flows");
  button.addEventListener("click", () => {
    state.edgeFilter = { source: e.source, target: e.target };
    $("#endpoint").value = "";
    filtersChanged();
  });
  parts.push(button);
  box.replaceChildren(...parts);
}

function selectNode(id) {
  state.selectedNode = id;
  state.selectedEdge = null;
  state.edgeFilter = null;
  $("#endpoint").value = id;
  drawMap();
  const n = state.map.nodes.find((x) => x.id === id);
  const box = $("#details");
  const parts = [el("h3", {}, n ? n.label : id), el("p", { class: "hint" }, `${n ? n.kind : ""} ${id}`)];
  if (n) {
    const dl = el("table");
    for (const [k, v] of Object.entries(n.labels)) {
      const tr = el("tr");
      tr.appendChild(el("td", {}, k));
      tr.appendChild(el("td", {}, v));
      dl.appendChild(tr);
    }
    parts.push(dl);
  }
  parts.push(el("p", { class: "hint" }, "The flow table shows this node's flows."));
  box.replaceChildren(...parts);
  filtersChanged();
}

// ------------------------------------------------------------------ flow table

function clearTable() {
  $("#flows tbody").replaceChildren();
  state.rows = 0;
  state.older = null;
  updateCount();
}

function rowElement(r, fresh) {
  const tr = el("tr", { "data-id": r.id, "data-verdict": r.verdict, "data-protocol": r.protocol });
  if (fresh) tr.classList.add("fresh");
  const cells = [
    [fmtTime(r.time), "time"],
    [null, "verdict"],
    [r.protocol, "protocol"],
    [r.source, "source"],
    [r.destination, "destination"],
    [r.summary, "summary"],
    [r.reply, "reply"],
    [typeof r.latency_ms === "number" ? r.latency_ms.toFixed(2) : "", "latency"],
    [r.policy ? `${r.policy} ${r.rule || "(" + r.reason + ")"}` : r.reason, "policy"],
  ];
  for (const [text, cls] of cells) {
    const td = el("td", { class: cls });
    if (cls === "verdict") td.appendChild(el("span", { class: "badge " + r.verdict }, r.verdict));
    else td.textContent = text ?? "";
    if (cls === "summary" || cls === "policy") td.title = text ?? "";
    tr.appendChild(td);
  }
  tr.addEventListener("click", () => openDecision(r.id));
  return tr;
}

function prependRows(rows, matched) {
  const body = $("#flows tbody");
  for (const r of rows.slice().reverse()) {
    if (body.querySelector(`tr[data-id="${CSS.escape(r.id)}"]`)) continue;
    body.insertBefore(rowElement(r, true), body.firstChild);
    state.rows++;
  }
  while (state.rows > MAX_TABLE_ROWS) {
    body.removeChild(body.lastChild);
    state.rows--;
    state.older = body.lastChild ? body.lastChild.dataset.id : state.older;
  }
  if (matched > rows.length) $("#table-count").dataset.skipped = String(matched - rows.length);
  updateCount();
}

function appendRows(rows) {
  const body = $("#flows tbody");
  for (const r of rows) {
    if (body.querySelector(`tr[data-id="${CSS.escape(r.id)}"]`)) continue;
    body.appendChild(rowElement(r, false));
    state.rows++;
  }
  updateCount();
}

function updateCount() {
  const more = state.older ? "" : " (all)";
  $("#table-count").textContent = `${state.rows} rows${more}`;
  $("#older").disabled = !state.older;
}

async function loadPage(before) {
  const q = filterQuery();
  if (before) q.set("before", before);
  q.set("limit", "50");
  const response = await fetch("/api/flows?" + q.toString());
  if (!response.ok) {
    $("#table-count").textContent = await response.text();
    return;
  }
  const page = await response.json();
  appendRows(page.flows);
  state.older = page.next;
  updateCount();
}

// ------------------------------------------------------------------ one flow's decision

async function openDecision(id) {
  const response = await fetch("/api/flows/" + encodeURIComponent(id));
  const box = $("#decision-body");
  $("#decision").hidden = false;
  if (!response.ok) {
    box.replaceChildren(el("p", {}, await response.text()));
    return;
  }
  const data = await response.json();
  const r = data.flow, ex = data.explain;
  $("#decision-title").replaceChildren(el("span", { class: "badge " + r.verdict }, r.verdict), document.createTextNode(` ${r.protocol} ${r.summary}`));
  const parts = [];
  const dl = el("dl", { id: "recorded" });
  const add = (k, v) => { dl.appendChild(el("dt", {}, k)); dl.appendChild(el("dd", { "data-field": k }, v || "–")); };
  add("time", `${fmtTime(r.time)} (${new Date(r.time * 1000).toISOString()})`);
  add("from", r.source);
  add("to", r.destination);
  add("verdict", ex.recorded.verdict);
  add("policy", ex.recorded.policy);
  add("rule", ex.recorded.rule);
  add("reason", ex.recorded.reason);
  if (r.reply) add("reply", r.reply);
  parts.push(el("h3", {}, "Decided by (as recorded)"), dl);
  if (ex.notes.length) {
    const ul = el("ul", { class: "notes" });
    for (const n of ex.notes) ul.appendChild(el("li", {}, n));
    parts.push(ul);
  }
  if (ex.trace) {
    parts.push(el("h3", {}, `policy trace, against the policy in force now (revision ${ex.trace.revision})`));
    parts.push(el("pre", { id: "trace" }, ex.trace.text));
    if (ex.trace.command) parts.push(el("code", { class: "command" }, ex.trace.command));
  }
  const raw = el("details");
  raw.appendChild(el("summary", {}, "flow record"));
  raw.appendChild(el("pre", {}, JSON.stringify(data.record, null, 1)));
  parts.push(raw);
  box.replaceChildren(...parts);
}

function closeDecision() {
  $("#decision").hidden = true;
}

// ------------------------------------------------------------------ start

async function start() {
  const info = await (await fetch("/api/info")).json();
  $("#mode").textContent = info.mode;
  document.title = `l7proxy ${info.mode}`;
  for (const box of document.querySelectorAll("input.layer")) {
    box.addEventListener("change", () => {
      if (box.checked) state.hidden.delete(box.value); else state.hidden.add(box.value);
      drawMap();
    });
  }
  $("#filters").addEventListener("change", (e) => {
    if (e.target.id === "live") return;
    if (e.target.id === "endpoint") { state.selectedNode = null; state.edgeFilter = null; }
    filtersChanged();
  });
  $("#filters").addEventListener("submit", (e) => { e.preventDefault(); filtersChanged(); });
  $("#live").addEventListener("change", () => {
    if ($("#live").checked) filtersChanged();
  });
  $("#clear").addEventListener("click", () => {
    $("#filters").reset();
    state.edgeFilter = null;
    state.selectedNode = null;
    state.selectedEdge = null;
    drawMap();
    filtersChanged();
  });
  $("#older").addEventListener("click", () => { if (state.older) loadPage(state.older); });
  $("#decision-close").addEventListener("click", closeDecision);
  $("#decision").addEventListener("click", (e) => { if (e.target.id === "decision") closeDecision(); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeDecision(); });
  filtersChanged();
}

document.addEventListener("DOMContentLoaded", start);
