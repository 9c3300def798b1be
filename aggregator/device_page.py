"""The per-device page (``/device/ID``): health, facts, series and the device's history drawn with uPlot (vendored in
``aggregator/static``, served at ``/static/``; no CDN).

Its first data is inlined (the device's fleet row, its timeline for the chosen range and, with ``?compare=OTHER``,
the other device's timeline over the same buckets). Every part is bounded (``server.max_read_series`` series; the
page lists what was left out, from the answer's ``truncated``). A live update (an SSE ``batch`` event of this device or the
compared one) carries the device's new fleet row; the page then fetches only the timeline's last bucket onwards
(``?since=<its start>&width=<the same width>``) and replaces that tail: bounded work per event, whatever the history.
"""

from __future__ import annotations

_SCRIPT = r"""
"use strict";
const initial = /*INITIAL*/null;
const data = initial;
const view = new URLSearchParams(location.search);
const device = data.device.device_id, other = view.get("compare") || "";
const COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#1b7c83", "#bf3989", "#57606a"];
const fmt = (v, d) => (v === null || v === undefined) ? "–" : Number(v).toFixed(d);
const text = (id, value) => { document.getElementById(id).textContent = value; };
const api = (name, params) => "../api/v1/devices/" + encodeURIComponent(name) + "/timeline?" + new URLSearchParams(params);
function el(tag, content, cls) { const e = document.createElement(tag); if (content !== undefined) e.textContent = content; if (cls) e.className = cls; return e; }
function iso(us) { return us ? new Date(us / 1000).toISOString().replace(".000Z", "Z") : "–"; }

function showDevice(row) {
  text("title", row.device_id);
  const state = document.getElementById("health");
  state.textContent = row.health; state.className = "badge " + row.health;
  document.getElementById("reasons").replaceChildren(...row.health_reasons.map(r => el("li", r)));
  const f = row.facts;
  const facts = f ? [
    ["class", f.device_class], ["model", f.model], ["accelerator", f.accelerator],
    ["RAM", f.ram_gb === null ? null : f.ram_gb + " GB"], ["power mode", f.power_mode],
    ["CPU clock (max)", f.cpu_freq_mhz_max === null ? null : fmt(f.cpu_freq_mhz_max, 0) + " MHz"],
    ["GPU clock", f.gpu_freq_mhz === null ? null : fmt(f.gpu_freq_mhz, 0) + " MHz"],
    ["hottest zone", f.temperature_max_c === null ? null : fmt(f.temperature_max_c, 1) + " °C"],
    ["throttling", f.thermal_throttling.length ? f.thermal_throttling.join("; ") : "none"],
    ["clock synchronized", f.clock_synchronized === null ? "unknown" : (f.clock_synchronized ? "yes" : "no")],
    ["reported", iso(f.reported_us)],
  ] : [["facts", "this device has sent no device facts (agents before device_facts records)"]];
  document.getElementById("facts").replaceChildren(...facts.filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => { const d = el("div"); d.append(el("span", k, "key"), el("span", String(v))); return d; }));
  const regressions = document.getElementById("regression-list");
  regressions.replaceChildren(...row.regressions.map(r => el("li", r)));
  document.getElementById("regressions").hidden = row.regressions.length === 0;
  const body = document.querySelector("#series tbody");
  body.replaceChildren(...row.series.map(s => {
    const tr = el("tr");
    tr.append(el("td", s.model_name || "–", "text"), el("td", s.strategy || "local", "text"), el("td", s.requests),
      el("td", s.error_rate === null ? "–" : (100 * s.error_rate).toFixed(0) + " %"), el("td", fmt(s.ttft_p50_ms, 1)),
      el("td", fmt(s.ttft_p95_ms, 1)), el("td", fmt(s.tpot_p50_ms, 2)), el("td", fmt(s.tpot_p95_ms, 2)),
      el("td", fmt(s.tokens_per_second, 1)), el("td", fmt(s.j_per_output_token, 4)));
    return tr;
  }));
  // guardrail overhead per model × guardrail set × strategy (blocked requests counted apart, never in a figure)
  const guarded = row.series.flatMap(s => (s.guardrails || []).map(g => [s, g]));
  document.getElementById("guardrails").hidden = guarded.length === 0;
  document.querySelector("#guardrail-table tbody").replaceChildren(...guarded.map(([s, g]) => {
    const tr = el("tr"), pair = (a, b, d) => fmt(a, d) + " / " + fmt(b, d);
    tr.append(el("td", s.model_name || "–", "text"), el("td", g.guardrail_set, "text"), el("td", s.strategy || "local", "text"),
      el("td", g.requests), el("td", g.blocked), el("td", g.errors), el("td", pair(g.input_p50_ms, g.input_p95_ms, 2)),
      el("td", pair(g.threat_p50_ms, g.threat_p95_ms, 2)), el("td", pair(g.output_p50_ms, g.output_p95_ms, 2)),
      el("td", pair(g.overhead_p50_ms, g.overhead_p95_ms, 2)), el("td", pair(g.impact_p50_percent, g.impact_p95_percent, 2)));
    return tr;
  }));
  text("summary", row.records + " records received, last batch " + Math.round(row.last_seen_age_s) + " s ago; " +
    "figures over each series' latest " + Math.max(0, ...row.series.map(s => s.requests)) + " requests");
}

// every [[triggers]] state on this device's series (GET /api/v1/triggers?device=ID), worst first
function showTriggers(answer) {
  const box = document.getElementById("triggers");
  box.hidden = !answer || answer.triggers.length === 0;
  if (box.hidden) return;
  const rank = {firing: 0, cooling_down: 1, insufficient_data: 2, ok: 3};
  const items = [];
  for (const t of answer.triggers) {
    if (t.series.length === 0) items.push([4, el("li", t.name + ": no request of this device in its window or scope (" + t.description + ")", "trigger none")]);
    for (const s of t.series) {
      const li = el("li", undefined, "trigger " + s.state + (s.holds ? " " + s.severity : ""));
      li.append(el("span", s.state.replace("_", " "), "state"), " " + s.summary);
      items.push([rank[s.state] ?? 5, li]);
    }
  }
  items.sort((a, b) => a[0] - b[0]);
  document.getElementById("trigger-list").replaceChildren(...items.map(([, li]) => li));
  text("trigger-status", answer.status === "firing" ? "a condition holds" : answer.status === "insufficient_data" ?
    "some not judged: too few requests" : "all judged, none holds");
}

function showSyncs(syncs) {
  const body = document.querySelector("#syncs tbody");
  body.replaceChildren(...syncs.map(s => {
    const tr = el("tr");
    tr.append(el("td", iso(s.received_us), "text"), el("td", s.records), el("td", s.accepted),
      el("td", s.backlog ?? "–"), el("td", s.dropped_total ?? "–"), el("td", s.quarantined_total ?? "–"));
    return tr;
  }));
}

// the device's regression objects (docs/fleet.md "Regressions"): every state, newest first
function evidenceText(r) {
  const parts = [r.requests_before + " requests before, " + r.requests_after + " after"];
  if (r.p_value !== null) parts.push("p " + Number(r.p_value).toExponential(1));
  if (r.confidence !== null) parts.push("confidence " + fmt(r.confidence, 3));
  const e = r.evidence;
  if (e && typeof e === "object") {
    if (typeof e.method === "string") parts.push(e.method);
    if (e.seasonal) parts.push("seasonal: " + (typeof e.seasonal === "string" ? e.seasonal : JSON.stringify(e.seasonal)));
    if (Number.isInteger(e.bursts_removed) && e.bursts_removed) parts.push(e.bursts_removed + " bursts removed");
  }
  if (r.contended_excluded) parts.push(r.contended_excluded + " contended left out");
  return parts.join("; ");
}

function showRegressionObjects(items) {
  const body = document.querySelector("#regression-objects tbody");
  body.replaceChildren(...items.map(r => {
    const tr = el("tr", undefined, "state-" + r.state);
    const after = r.state === "resolved" ? "resolved " + iso(r.resolved_us)
      : r.state === "acknowledged" ? "acknowledged by " + r.acknowledged_by + (r.note ? ": " + r.note : "") : "";
    tr.append(el("td", r.id), el("td", r.state, "text"), el("td", r.kind, "text"), el("td", r.metric, "text"),
      el("td", (r.model_name || "–") + " / " + (r.strategy || "local"), "text"), el("td", iso(r.since_us), "text"),
      el("td", (r.change >= 0 ? "+" : "") + (100 * r.change).toFixed(0) + " %"),
      el("td", Number(r.before_median).toPrecision(4) + " → " + Number(r.after_median).toPrecision(4)),
      el("td", evidenceText(r), "text"), el("td", iso(r.last_confirmed_us), "text"), el("td", after, "text"));
    return tr;
  }));
  document.getElementById("regression-history").hidden = items.length === 0;
}

// timelines: the device's (and the compared one's), merged tail by tail on live updates
const timelines = {[device]: data.timeline};
if (data.compare) timelines[other] = data.compare;

function merge(old, tail) {
  const at = old.t.indexOf(tail.t[0]);
  if (at < 0 || tail.width_s !== old.width_s) return tail;
  const cols = (o, n, len) => [...(o || Array(at).fill(null)).slice(0, at), ...(n || Array(len).fill(null))];
  const out = {...tail, since_us: old.since_us, t: [...old.t.slice(0, at), ...tail.t]};
  out.errors = cols(old.errors, tail.errors, tail.t.length);
  const key = s => s.model_name + "\u0000" + s.strategy;
  const series = new Map(old.series.map(s => [key(s), s]));
  for (const s of tail.series) series.set(key(s), series.get(key(s)) || {model_name: s.model_name, strategy: s.strategy});
  out.series = [...series.values()].map(s => {
    const fresh = tail.series.find(n => key(n) === key(s)) || {};
    const merged = {model_name: s.model_name, strategy: s.strategy};
    for (const c of ["n", "errors", "ttft_p50", "ttft_p95", "tpot_p50", "tpot_p95", "tokens_per_second", "j_per_token", "power_w"])
      merged[c] = cols(s[c], fresh[c], tail.t.length);
    return merged;
  });
  for (const part of ["syncs", "facts"]) {
    out[part] = {...tail[part]};
    for (const c of Object.keys(tail[part])) if (Array.isArray(tail[part][c])) out[part][c] = cols(old[part][c], tail[part][c], tail.t.length);
  }
  return out;
}

const charts = [];
const chartWidth = box => Math.max(260, box.clientWidth - 20);  // inside the box's padding, phone widths included
function plot(id, title, unit, lines, xs, opts = {}) {
  const box = document.getElementById(id);
  box.replaceChildren(el("h2", title));
  if (!lines.some(l => l.values.some(v => v !== null && v !== undefined))) {
    box.append(el("div", opts.empty || "no data in this range", "sub")); return;
  }
  const series = [{label: "time"}], values = [xs], bands = [];
  lines.forEach((l, i) => {
    const sparse = l.values.filter(v => v !== null && v !== undefined).length < 60;  // few buckets: mark each one
    series.push({label: l.label, stroke: l.color, width: l.band === undefined ? 1.5 : 1, dash: l.dash, fill: l.fill,
      points: {show: l.points || sparse, size: 5}, paths: l.bars ? uPlot.paths.bars({size: [0.8, 40]}) : undefined,
      value: (u, v) => v === null || v === undefined ? "–" : v.toFixed(opts.digits ?? 2) + (unit ? " " + unit : "")});
    values.push(l.values);
    if (l.band !== undefined) bands.push({series: [values.length - 1, l.band + 1], fill: l.color.slice(0, 7) + "22"});
  });
  const width = chartWidth(box);
  const chart = new uPlot({width, height: opts.height || 220, series, bands, scales: {x: {time: true}},
    axes: [{}, {label: unit, size: 60}], cursor: {points: {size: 6}}, legend: {live: true}}, values, box);
  // follows its box's width (a phone's viewport, a rotated screen, a resized window) without waiting for a resize event
  const watch = new ResizeObserver(() => { if (chart.width !== chartWidth(box)) chart.setSize({width: chartWidth(box), height: chart.height}); });
  watch.observe(box);
  charts.push([box, chart, watch]);
}

function label(name, s) { return (other ? name + " · " : "") + (s.model_name || "unnamed") + " · " + s.strategy; }

function draw() {
  for (const [, chart, watch] of charts.splice(0)) { watch.disconnect(); chart.destroy(); }
  const mine = timelines[device], theirs = other ? timelines[other] : null;
  const xs = mine.t;
  const all = [[device, mine, undefined], ...(theirs ? [[other, theirs, [6, 4]]] : [])];
  // the compared device's buckets aligned on this device's grid (same width, same bucket starts)
  const align = (tl, column) => { const at = new Map(tl.t.map((t, i) => [t, column[i]])); return xs.map(t => at.has(t) ? at.get(t) : null); };
  let color = 0;
  const perSeries = (p50, p95, digits) => {
    const lines = [];
    for (const [name, tl, dash] of all) for (const s of tl.series) {
      const c = COLORS[color++ % COLORS.length];
      lines.push({label: label(name, s) + " p50", color: c, dash, values: align(tl, s[p50])});
      if (p95) lines.push({label: label(name, s) + " p95", color: c + "99", dash, values: align(tl, s[p95]), band: lines.length - 1});
    }
    color = 0;
    return lines;
  };
  plot("ttft", "Time to first token", "ms", perSeries("ttft_p50", "ttft_p95"), xs, {digits: 1});
  plot("tpot", "Time per output token", "ms", perSeries("tpot_p50", "tpot_p95"), xs, {digits: 2});
  plot("tps", "Tokens per second", "tok/s", perSeries("tokens_per_second", null).map(l => ({...l, label: l.label.replace(/ p50$/, "")})), xs, {digits: 1});
  plot("energy", "Energy per output token", "J", perSeries("j_per_token", null).map(l => ({...l, label: l.label.replace(/ p50$/, "")})), xs,
    {digits: 4, empty: "no energy figures in this range: the device measures no power (lens-agent probe says why)"});
  plot("power", "Average power during requests", "W", perSeries("power_w", null).map(l => ({...l, label: l.label.replace(/ p50$/, "")})), xs,
    {digits: 2, empty: "no power figures in this range: the device measures no power (lens-agent probe says why)"});
  plot("errors", "Failed requests per bucket", "", all.map(([name, tl, dash], i) => ({label: (other ? name + " " : "") + "errors", color: COLORS[1 + i], dash, bars: true, fill: COLORS[1 + i] + "55", values: align(tl, tl.errors)})), xs,
    {digits: 0, empty: "no requests in this range"});
  plot("backlog", "Outbox backlog and records received", "records", all.flatMap(([name, tl, dash]) => [
    {label: (other ? name + " " : "") + "backlog", color: "#bc4c00", dash, points: true, values: align(tl, tl.syncs.backlog)},
    {label: (other ? name + " " : "") + "records received", color: "#1b7c83", dash, bars: true, fill: "#1b7c8355", values: align(tl, tl.syncs.records)}]), xs,
    {digits: 0, empty: "no batches in this range"});
  plot("temperature", "Hottest thermal zone", "°C", all.map(([name, tl, dash], i) => ({label: (other ? name + " " : "") + "hottest zone", color: COLORS[4 + i], dash, points: true, values: align(tl, tl.facts.temperature_max_c)})), xs,
    {digits: 1, empty: "no temperatures in this range: the device sent no device facts with thermal zones"});
  const requests = mine.series.reduce((n, s) => n + s.n.reduce((a, b) => a + (b || 0), 0), 0);
  text("range", requests + " requests from " + iso(mine.since_us) + " to " + iso(mine.until_us) + " in buckets of " +
    (mine.width_s >= 3600 ? mine.width_s / 3600 + " h" : mine.width_s / 60 + " min") +
    (mine.truncated ? " (the newest " + mine.rows_read + " requests of the range)" : ""));
}

async function fetchTail(name) {
  const tl = timelines[name];
  const response = await fetch(api(name, {since: tl.t[tl.t.length - 1], width: tl.width_s}));
  if (!response.ok) return;
  const tail = await response.json();
  timelines[name] = merge(tl, tail);  // the range grows by the new buckets; a reload starts it afresh
  draw();
}

function setView(name, value) {
  if (value) view.set(name, value); else view.delete(name);
  location.search = view.toString();
}
document.querySelectorAll("#ranges button").forEach(b => {
  if ((view.get("range") || "7d") === b.dataset.range) b.classList.add("on");
  b.addEventListener("click", () => setView("range", b.dataset.range));
});
const compareBox = document.getElementById("compare");
compareBox.value = other;
compareBox.addEventListener("change", () => setView("compare", compareBox.value.trim()));
fetch("../api/v1/devices").then(r => r.ok ? r.json() : {devices: []}).then(body => {
  document.getElementById("device-ids").replaceChildren(...body.devices.filter(d => d.device_id !== device).map(d => { const o = el("option"); o.value = d.device_id; return o; }));
});
if (other && !data.compare) text("compare-note", "no device called " + other + " has sent measurements");

// what a bounded answer left out (server.max_read_series); what /metrics folded is one of the health reasons
const notes = Object.values(data.truncated || {}).map(t => t.message);
document.getElementById("truncated").replaceChildren(...notes.map(m => el("li", m)));
document.getElementById("truncated").hidden = notes.length === 0;
showDevice(data.device);
showSyncs(data.recent_syncs);
showRegressionObjects(data.regression_objects || []);
showTriggers(data.triggers);
draw();
new EventSource("../api/v1/stream").addEventListener("batch", (e) => {
  const event = JSON.parse(e.data);
  if (event.device_id === device) {
    if (event.device) showDevice(event.device);
    fetchTail(device);
  } else if (other && event.device_id === other && timelines[other]) fetchTail(other);
});
"""

DEVICE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>LLM-Latency-Lens device</title>
<link rel="stylesheet" href="../static/uPlot.min.css">
<style>/*STYLE*/
.badge { display: inline-block; padding: 1px 10px; border-radius: 10px; font-weight: 600; color: #fff; }
.badge.ok { background: #1a7f37; } .badge.warning { background: #9a6700; } .badge.critical { background: #cf222e; }
#facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: 4px 16px; background: #fff;
  border: 1px solid #d0d7de; padding: 8px 12px; margin: 8px 0 12px; }
#facts .key { color: #57606a; margin-right: 6px; }
.chart { background: #fff; border: 1px solid #d0d7de; padding: 4px 8px 8px; margin: 10px 0; }
.chart h2 { font-size: 15px; margin: 4px 0; }
#ranges button { font: inherit; padding: 2px 10px; border: 1px solid #d0d7de; background: #fff; cursor: pointer; }
#ranges button.on { background: #0969da; color: #fff; }
.u-legend { font-size: 12px; } .chart { overflow: hidden; }
#triggers { background: #fff; border: 1px solid #d0d7de; padding: 6px 12px; margin: 8px 0 12px; }
#trigger-list { margin: 4px 0; padding-left: 18px; } #trigger-list li { margin: 2px 0; overflow-wrap: anywhere; }
#trigger-list .state { font-weight: 600; margin-right: 4px; }
#trigger-list .firing .state, #trigger-list .cooling_down .state { color: #9a6700; }
#trigger-list .critical .state { color: #cf222e; } #trigger-list .ok .state { color: #1a7f37; }
#trigger-list .insufficient_data .state, #trigger-list .none { color: #57606a; }
</style></head>
<body>
<a href="../">← fleet</a>
<h1><span id="title">device</span> <span id="health" class="badge"></span></h1>
<div class="sub" id="summary">loading…</div>
<ul id="reasons"></ul>
<ul class="sub" id="truncated" hidden></ul>
<div id="facts"></div>
<div id="triggers" hidden><strong>Triggers on this device</strong> <span class="sub" id="trigger-status"></span>
<ul id="trigger-list"></ul></div>
<div class="regressions" id="regressions" hidden><strong>Regressions on this device</strong><ul id="regression-list"></ul></div>
<div id="regression-history" hidden><h2>Regressions and improvements (open, acknowledged, resolved)</h2>
<div class="scroll"><table id="regression-objects"><thead><tr><th>id</th><th>state</th><th>kind</th><th>metric</th>
<th>model / strategy</th><th>since</th><th>change</th><th>median before → after</th><th>evidence</th>
<th>last confirmed</th><th></th></tr></thead><tbody></tbody></table></div></div><p></p>
<div class="tools"><span id="ranges">range <button data-range="6h">6 h</button><button data-range="24h">24 h</button>
<button data-range="7d">7 days</button><button data-range="30d">30 days</button></span>
&nbsp; <label>compare with <input id="compare" list="device-ids" placeholder="another device"></label>
<datalist id="device-ids"></datalist> <span class="sub" id="compare-note"></span></div>
<div class="sub" id="range"></div>
<h2>Series (model × strategy), each over its latest requests</h2>
<div class="scroll"><table id="series"><thead><tr><th>model</th><th style="text-align:left">strategy</th><th>requests</th>
<th>errors</th><th>TTFT p50 (ms)</th><th>TTFT p95</th><th>TPOT p50 (ms)</th><th>TPOT p95</th><th>tok/s</th><th>J/token</th>
</tr></thead><tbody></tbody></table></div>
<div id="guardrails" hidden><h2>Guardrails (model × guardrail set × strategy), over each series' latest requests</h2>
<div class="scroll"><table id="guardrail-table"><thead><tr><th>model</th><th style="text-align:left">guardrail set</th>
<th style="text-align:left">strategy</th><th title="guarded requests among the series' latest (served or failed; blocked ones are apart)">requests</th>
<th title="requests a guardrail blocked (kind blocked) within the same span">blocked</th>
<th title="requests whose guardrail stage failed (guardrail_error)">guardrail errors</th>
<th title="exact p50 / p95 of the input validation stage over the served requests">input p50 / p95 (ms)</th>
<th>threat p50 / p95 (ms)</th><th>output p50 / p95 (ms)</th><th>overhead p50 / p95 (ms)</th>
<th title="guardrail overhead ÷ the guarded request's total × 100">impact p50 / p95 (%)</th>
</tr></thead><tbody></tbody></table></div></div>
<div class="chart" id="ttft"></div>
<div class="chart" id="tpot"></div>
<div class="chart" id="tps"></div>
<div class="chart" id="errors"></div>
<div class="chart" id="energy"></div>
<div class="chart" id="power"></div>
<div class="chart" id="backlog"></div>
<div class="chart" id="temperature"></div>
<h2>Latest batches</h2>
<div class="scroll"><table id="syncs"><thead><tr><th>received</th><th>records</th><th>new</th><th>backlog</th>
<th>dropped (total)</th><th>quarantined (total)</th></tr></thead><tbody></tbody></table></div>
<script src="../static/uPlot.iife.min.js"></script>
<script>/*SCRIPT*/</script>
</body></html>
"""

RANGES = {"6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
