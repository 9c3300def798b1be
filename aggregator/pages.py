"""The built-in fleet page and per-device page: plain HTML, CSS and JavaScript, no external CDN."""

from __future__ import annotations

import html
import json

from . import device_page

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1b1f24; background: #fafbfc; }
h1 { font-size: 20px; margin: 0 0 4px; } .sub { color: #57606a; margin-bottom: 16px; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { padding: 6px 10px; border-bottom: 1px solid #d0d7de; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; } td:first-child { white-space: nowrap; }
th { background: #f0f3f6; font-weight: 600; }
.ok { color: #1a7f37; } .late, .warning { color: #9a6700; } .silent, .critical { color: #cf222e; }
td.health { text-align: left; } td.health small { display: block; color: #57606a; font-weight: normal; max-width: 340px; }
.flash { animation: flash 1.5s; } @keyframes flash { from { background: #fff8c5; } to { background: #fff; } }
svg { background: #fff; border: 1px solid #d0d7de; } .axis { stroke: #8c959f; } .line { fill: none; stroke-width: 1.5; }
a { color: #0969da; text-decoration: none; }
.regressions { background: #ffebe9; border: 1px solid #ff8182; padding: 8px 16px; margin-bottom: 12px; }
.regressions li { margin: 2px 0; }
.triggers { background: #fff8c5; border: 1px solid #d4a72c; padding: 8px 16px; margin-bottom: 12px; }
.triggers li { margin: 2px 0; } td.triggers-cell { text-align: left; max-width: 260px; }
.scroll { overflow-x: auto; } .tools { margin-bottom: 8px; } th[data-key] { cursor: pointer; } .hint { background: #fff; border: 1px solid #d0d7de; padding: 12px 16px; }
code { background: #f0f3f6; padding: 1px 4px; }
@media (max-width: 700px) { body { margin: 12px; } th, td { padding: 4px 6px; } svg { width: 100%; height: auto; } }
"""

# The fleet table's columns: (sort key, header, what the figure is: its tooltip, and the phone card's label). The
# header says the statistic where the figure is one (p95, median, mean), the tooltip over which requests.
_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("device_id", "device", "the device's id (its page)"),
    (
        "health_rank",
        "health",
        "ok, warning or critical, with its reasons; sorts worst first (critical, warning, ok; then by the number of "
        "reasons, then device id)",
    ),
    ("trigger_count", "triggers", "the [[triggers]] whose condition holds on the device: firing or cooling down"),
    ("device_class", "class", "device class · power mode · hottest thermal zone, from its latest facts"),
    ("last_seen_age_s", "last seen", "time since its latest batch arrived (the aggregator's clock)"),
    ("model", "model", "the model of its latest request"),
    (
        "ttft_p95_ms",
        "TTFT p95 (ms)",
        "95th percentile of time to first token, exact (inclusive method), over the latest 50 successful requests of "
        "the series of its latest request; one figure per strategy when that model runs several",
    ),
    (
        "tokens_per_second",
        "median tok/s",
        "median of per-request output tokens ÷ end-to-end seconds, over the same latest 50 successful requests",
    ),
    (
        "j_per_output_token",
        "mean J/token",
        "mean energy per output token (ext.energy.j_per_output_token) over the same latest 50 successful requests; "
        "– without a power source",
    ),
    ("error_rate", "errors", "share of failed requests among its latest 50 requests, of any series"),
    (
        "contended_share",
        "contended",
        "share of the device's latest requests that other work on the device contended with (docs/fleet.md)",
    ),
    (
        "guardrail_overhead_p50_ms",
        "guardrails p50 (ms)",
        "median guardrail overhead (the guardrail stages together) and, beneath, its median share of the request, "
        "over the latest guarded requests served, of the device's costliest guardrail set; blocked requests are "
        "counted apart (docs/fleet.md)",
    ),
    ("backlog", "backlog", "records waiting in its outbox, as its latest batch said"),
    ("dropped_total", "dropped", "records its outbox dropped, in total"),
    ("records", "records", "records stored from it"),
    ("sync_health", "sync", "ok, late or silent, against the device's own sync schedule"),
)
_LEFT = {"health_rank", "trigger_count", "device_class", "model"}


def _header() -> str:
    cells = []
    for key, label, tip in _COLUMNS:
        left = ' style="text-align:left"' if key in _LEFT else ""
        cells.append(f'<th data-key="{key}" title="{html.escape(tip)}"{left}>{html.escape(label)}</th>')
    return "".join(cells)


def _card_labels() -> str:
    """The phone layout's labels: each cell of a device card says which column it is."""
    return " ".join(
        f'#devices td:nth-child({n})::before {{ content: "{label}"; }}'
        for n, (_, label, _) in enumerate(_COLUMNS, 1)
        if n > 2
    )


# The fleet page's own style (the device and campaign pages share _STYLE, not this). At most 700 px wide (a phone),
# each device is a card of label/value cells and nothing is wider than the screen; on a desk each device is one line,
# long texts cut with the full text in the cell's title.
_FLEET_STYLE = """
[hidden] { display: none !important; }
#devices { font-size: 13px; } #devices th, #devices td { padding: 4px 5px; }
#devices td { white-space: nowrap; }
#devices td.text { max-width: 150px; overflow: hidden; text-overflow: ellipsis; }
#devices td.health { white-space: normal; min-width: 200px; max-width: 230px; }
#devices td.health small { max-width: 230px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.boxes { display: flex; gap: 12px; align-items: flex-start; margin-bottom: 10px; }
.boxes > details { flex: 1 1 0; min-width: 0; margin: 0; padding: 6px 12px; }
.boxes summary { display: block; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; cursor: pointer; }
.boxes summary::before { content: "▸ "; } .boxes details[open] summary::before { content: "▾ "; }
.boxes ul { margin: 6px 0 2px; padding-left: 20px; } .boxes li { overflow-wrap: anywhere; } .boxes p { margin: 4px 0 0; }
#devices tr.dense td { padding-top: 2px; padding-bottom: 2px; }
#devices tr.fold td { text-align: left; background: #f6f8fa; }
#devices tr.fold button { font: inherit; border: 0; background: none; color: #0969da; cursor: pointer; padding: 0; }
#devices th { vertical-align: bottom; }
#devices th[data-sorted="asc"]::after { content: " ▲"; } #devices th[data-sorted="desc"]::after { content: " ▼"; }
.tools label { margin-right: 10px; white-space: nowrap; } .phone { display: none; }
@media (max-width: 1100px) { #devices td.health { min-width: 150px; } #devices td.text { max-width: 140px; } }
/* on a desk the table takes the box's width and no more, whatever the names in it: fixed column shares, every cell
   cut with an ellipsis (the full text in its title) */
@media (min-width: 701px) {
  #devices { table-layout: fixed; width: 100%; }
  #devices td { overflow: hidden; text-overflow: ellipsis; }
  #devices td.health, #devices td.text { min-width: 0; max-width: none; } #devices td.health small { max-width: 100%; }
  #devices th { font-size: 12px; overflow: hidden; text-overflow: ellipsis; }
  #devices th { padding-left: 3px; padding-right: 3px; }
  #devices th:nth-child(1) { width: 7%; } #devices th:nth-child(2) { width: 15%; }
  #devices th:nth-child(3) { width: 9%; } #devices th:nth-child(4) { width: 6%; }
  #devices th:nth-child(5) { width: 6%; } #devices th:nth-child(6) { width: 9%; }
}
@media (max-width: 700px) {
  body { overflow-wrap: anywhere; } .phone { display: inline; } .desk { display: none; }
  .tools label { display: inline-block; margin: 0 8px 6px 0; } #filter { width: 11em; }
  .scroll { overflow-x: visible; } table:not(#devices) { display: block; overflow-x: auto; }
  #devices, #devices tbody, #devices tr { display: block; background: none; } #devices thead { display: none; }
  #devices tr { display: grid; grid-template-columns: repeat(4, minmax(0, 1fr)); background: #fff;
    border: 1px solid #d0d7de; margin-bottom: 8px; padding: 4px 0; }
  #devices td { display: block; border: 0; padding: 2px 6px; text-align: left; white-space: normal; min-width: 0;
    max-width: none; overflow-wrap: anywhere; }
  #devices td.text, #devices td.health { max-width: none; min-width: 0; white-space: normal; }
  #devices td.health small { max-width: none; white-space: normal; overflow-wrap: anywhere; display: -webkit-box;
    -webkit-line-clamp: 2; -webkit-box-orient: vertical; }
  .boxes { flex-direction: column; gap: 6px; } .boxes > details { align-self: stretch; }
  #devices td::before { display: block; color: #57606a; font-size: 11px; }
  #devices td:nth-child(1) { grid-column: 1 / 3; font-weight: 600; } #devices td:nth-child(2) { grid-column: 3 / -1; }
  #devices td:nth-child(3), #devices td:nth-child(4) { grid-column: 1 / -1; } #devices td:nth-child(6) { grid-column: 2 / -1; }
  #devices td.none { display: none; }
  #devices tr.dense { padding: 0; margin-bottom: 4px; }
  #devices tr.dense td:nth-child(n+3) { display: none; }
  #devices tr.dense td:nth-child(7), #devices tr.dense td:nth-child(8) { display: block; }
  #devices tr.dense td:nth-child(1) { grid-column: auto; } #devices tr.dense td:nth-child(2) { grid-column: auto; }
  #devices tr.dense td::before { display: none; }
  #devices tr.fold { display: block; } #devices tr.fold td { display: block; }
  #devices tr.fold td::before { display: none; }
  /*LABELS*/
}
"""

FLEET_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>LLM-Latency-Lens fleet</title>
<style>/*STYLE*/</style></head>
<body>
<h1>LLM-Latency-Lens fleet</h1>
<div class="sub" id="summary">loading…</div>
<div class="sub" id="truncated" hidden></div>
<div class="boxes"><details class="regressions" id="regressions" hidden><summary id="regression-head"></summary>
<p>Change points in each device × model × strategy, the largest change first, at most two a device
(<a href="api/v1/regressions">details</a>)</p><ul id="regression-list"></ul></details>
<details class="triggers" id="triggers" hidden><summary id="trigger-head"></summary>
<p>Conditions that hold on a device × model × engine settings: critical first, firing before cooling down, at most
two a device (<a href="api/v1/triggers">states and recent fires</a>)</p><ul id="trigger-list"></ul></details></div>
<div class="hint" id="empty" hidden>No device has sent measurements yet. Give each device a token:
<code>lens-aggregator token add DEVICE_ID --url URL-OF-THIS-AGGREGATOR</code> prints it with the settings to put in
the device's <code>agent.toml</code>; its records appear here after its next sync (<code>lens-agent sync</code>).</div>
<div class="tools"><label>filter <input id="filter" type="search" placeholder="device, model, strategy, class"></label>
<label>class <select id="class"><option value="">all</option></select></label>
<label>health <select id="health"><option value="">all</option><option>critical</option><option>warning</option><option>ok</option></select></label>
<label>layout <select id="layout"><option value="">triage: problems first</option><option value="table">one table</option></select></label>
<label class="phone">sort <select id="sort"></select></label>
<span class="sub desk">click a column to sort; the address keeps the view (<code>?sort=error_rate&amp;desc=1&amp;filter=orin</code>)</span></div>
<div class="scroll"><table id="devices"><thead><tr>
/*HEADER*/</tr></thead><tbody id="problems"></tbody><tbody id="fold" hidden><tr class="fold"><td colspan="/*SPAN*/"><button id="fold-button" type="button"></button></td></tr></tbody><tbody id="healthy"></tbody></table></div>
<script>
"use strict";
const fmt = (v, d) => (v === null || v === undefined) ? "–" : Number(v).toFixed(d);
function age(s) {
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}
let lateAfter = 3600;
const span = (s) => s % 3600 === 0 ? (s / 3600) + (s === 3600 ? " hour" : " hours") : Math.round(s / 60) + " minutes";
const plural = (n, one, many) => n + " " + (n === 1 ? one : many);
function cell(text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; return td; }
function textCell(text) {  // cut on a desk: the title has it all
  const td = cell(text, text === "–" ? "text none" : "text");
  if (text !== "–") td.title = text;
  return td;
}
// the view (sort column, direction, filters, layout, the healthy devices shown or folded) lives in the address, so it
// can be bookmarked and shared; the fold is also remembered in this browser
const view = new URLSearchParams(location.search);
let lastDevices = [];
const severity = { critical: 2, warning: 1, ok: 0 };
const openRegressions = d => d.regressions_open ?? (d.regressions || []).length;
// a problem: not ok, a trigger holding, or an open regression (each makes its device's health too, once judged)
const problem = d => d.health !== "ok" || (d.trigger_count || 0) > 0 || openRegressions(d) > 0;
const byId = (a, b) => a.device_id < b.device_id ? -1 : a.device_id > b.device_id ? 1 : 0;
// worst first: critical, warning, ok; then more reasons first; then the device id
const worse = (a, b) => ((severity[b.health] ?? -1) - (severity[a.health] ?? -1)) ||
  ((b.health_reasons || []).length - (a.health_reasons || []).length);
function sortKey() {  // [column, descending]: with none in the address, health worst first
  const key = view.get("sort");
  return key ? [key, view.get("desc") === "1"] : ["health_rank", true];
}
function filtered() { return Boolean(view.get("filter") || view.get("class") || view.get("health")); }
function shown(devices) {
  const filter = (view.get("filter") || "").toLowerCase();
  const [key, desc] = sortKey();
  const cls = view.get("class") || "", state = view.get("health") || "";
  const text = d => [d.device_id, d.model, d.strategy, d.device_class, d.power_mode, ...(d.series || []).map(s => s.model_name + " " + s.strategy)].join(" ").toLowerCase();
  const rows = devices.filter(d => (!filter || text(d).includes(filter)) && (!cls || d.device_class === cls) && (!state || d.health === state));
  if (key === "health_rank") rows.sort((a, b) => (desc ? worse(a, b) : -worse(a, b)) || byId(a, b));
  else rows.sort((a, b) => {
    const x = a[key], y = b[key];
    if (x === y) return byId(a, b);
    if (x === null || x === undefined) return 1;  // missing figures last, whichever the direction
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * (desc ? -1 : 1);
  });
  return rows;
}
function setView(changes) {
  for (const [name, value] of Object.entries(changes)) if (value) view.set(name, value); else view.delete(name);
  history.replaceState(null, "", "?" + view.toString());
  render(lastDevices);
}
function sortBy(key) {  // a column's first click: ascending, the health column's worst first; again: the other way
  const [current, desc] = sortKey();
  const down = key === current ? !desc : key === "health_rank";
  setView({ sort: key, desc: down ? "1" : "" });
}
document.querySelectorAll("#devices th").forEach(th => th.addEventListener("click", () => sortBy(th.dataset.key)));
const sortBox = document.getElementById("sort");  // the phone's columns: no header row to click
for (const th of document.querySelectorAll("#devices th"))
  for (const desc of [true, false]) {
    const o = document.createElement("option");
    o.value = th.dataset.key + (desc ? ":1" : ":");
    o.textContent = th.textContent + (th.dataset.key === "health_rank" ? (desc ? " (worst first)" : " (best first)") : desc ? " ↓" : " ↑");
    sortBox.appendChild(o);
  }
sortBox.addEventListener("change", () => { const [key, desc] = sortBox.value.split(":"); setView({ sort: key, desc }); });
const filterBox = document.getElementById("filter");
filterBox.value = view.get("filter") || "";
filterBox.addEventListener("input", () => setView({ filter: filterBox.value }));
for (const name of ["class", "health", "layout"]) {
  const box = document.getElementById(name);
  box.addEventListener("change", () => setView({ [name]: box.value }));
}
const FOLD_FROM = 12;  // more healthy devices than this fold by default (fewer fit beside the problems anyway)
function chosen() {  // "show", "fold" or "": the address, else what this browser chose last
  const said = view.get("healthy");
  if (said === "show" || said === "fold") return said;
  try { const kept = localStorage.getItem("lens.fleet.healthy"); return kept === "show" || kept === "fold" ? kept : ""; }
  catch (e) { return ""; }
}
let folded = false;
document.getElementById("fold-button").addEventListener("click", () => {
  const choice = folded ? "show" : "fold";
  try { localStorage.setItem("lens.fleet.healthy", choice); } catch (e) { /* storage off: the address keeps it */ }
  setView({ healthy: choice });
});
function classes(devices) {  // the class filter offers the classes the fleet has
  const box = document.getElementById("class"), have = new Set([...box.options].map(o => o.value));
  for (const c of [...new Set(devices.map(d => d.device_class).filter(Boolean))].sort())
    if (!have.has(c)) { const o = document.createElement("option"); o.value = o.textContent = c; box.appendChild(o); }
  box.value = view.get("class") || "";
  document.getElementById("health").value = view.get("health") || "";
  document.getElementById("layout").value = view.get("layout") === "table" ? "table" : "";
  const [key, desc] = sortKey();
  sortBox.value = key + (desc ? ":1" : ":");
  document.querySelectorAll("#devices th").forEach(th => {
    if (th.dataset.key === key) th.dataset.sorted = desc ? "desc" : "asc"; else delete th.dataset.sorted;
  });
}
function contended(d) {  // the share of its latest requests that other work contended with, and how many
  if (d.contended_share === null || d.contended_share === undefined) return cell("–", "contended");
  const td = cell((100 * d.contended_share).toFixed(0) + " %", d.contended_share > 0 ? "contended warning" : "contended");
  td.title = d.contended + " of the latest " + d.requests + " requests were contended (other processes, pressure, throttling)";
  return td;
}
function guardrails(d) {  // median guardrail overhead and share of the request; the sets and blocked in its title
  if (d.guardrail_overhead_p50_ms === null || d.guardrail_overhead_p50_ms === undefined) {
    const td = cell(d.blocked ? d.blocked + " blocked" : "–", "guardrails" + (d.blocked ? "" : " none"));
    if (d.blocked) td.title = d.blocked + " requests blocked by " + (d.guardrail_sets || []).join(", ");
    return td;
  }
  const impact = d.guardrail_impact_p50_percent;
  const td = cell(fmt(d.guardrail_overhead_p50_ms, 1), "guardrails");
  if (impact !== null && impact !== undefined) {  // the share on a line of its own: a narrow column keeps both
    td.append(document.createElement("br"));
    const share = document.createElement("small");
    share.textContent = impact.toFixed(1) + " %";
    td.append(share);
  }
  td.title = "guardrail set " + (d.guardrail_sets || []).join(", ") + (d.guardrail_sets_more ? " (+" + d.guardrail_sets_more + " more)" : "") +
    "; costliest " + d.guardrail_costliest_set + ": median overhead " + fmt(d.guardrail_overhead_p50_ms, 2) + " ms" + (impact === null || impact === undefined ? "" : ", " + impact.toFixed(2) + " % of the request") +
    " over its latest " + d.guardrail_requests + " guarded requests served; " + (d.blocked || 0) + " blocked";
  return td;
}
function row(d, dense) {
  const tr = document.createElement("tr");
  tr.id = "device-" + d.device_id;
  if (dense) tr.className = "dense";
  const name = document.createElement("td");
  const link = document.createElement("a");
  link.href = "device/" + encodeURIComponent(d.device_id);
  link.textContent = d.device_id;
  name.appendChild(link);
  // one figure per strategy: a speculative request's TTFT is not a local one's
  const split = (key, digits) => {
    const parts = Object.entries(d.by_strategy || {});
    if (parts.length < 2) return fmt(d[key], digits);
    return parts.map(([s, f]) => fmt(f[key], digits) + " " + s).join(" · ");
  };
  const health = cell(d.health, "health " + d.health);
  const reasons = d.health_reasons || [], reason = (text, title) => {  // one line each; the title has it all
    const small = document.createElement("small"); small.textContent = text; small.title = title; health.appendChild(small);
  };
  for (const text of reasons.slice(0, REASONS)) reason(text, text);
  if (reasons.length > REASONS) reason("+" + (reasons.length - REASONS) + " more", reasons.slice(REASONS).join("\\n"));
  const held = [...(d.triggers || [])].sort((a, b) => (SEVERITY[a.severity] ?? 1) - (SEVERITY[b.severity] ?? 1));  // critical first
  const names = new Map();  // each trigger once, with how many of the device's series it holds on
  for (const t of held) { const name = t.trigger + (t.state === "cooling_down" ? " (cooling down)" : ""); names.set(name, (names.get(name) || 0) + 1); }
  const triggers = cell([...names].map(([name, n]) => n > 1 ? name + " ×" + n : name).join(", ") || "–", "text triggers-cell");
  triggers.title = held.map(t => t.summary).join("\\n");
  if (!held.length) triggers.classList.add("none");  // on a phone's card: no line for nothing
  const facts = [d.device_class, d.power_mode, d.temperature_max_c === null || d.temperature_max_c === undefined ? null : d.temperature_max_c.toFixed(0) + " °C"];
  tr.append(name, health, triggers, textCell(facts.filter(Boolean).join(" · ") || "–"), cell(age(d.last_seen_age_s)), textCell(d.model || "–"), cell(split("ttft_p95_ms", 1)),
    cell(split("tokens_per_second", 1)), cell(fmt(d.j_per_output_token, 4)),
    cell(d.error_rate === null || d.error_rate === undefined ? "–" : (100 * d.error_rate).toFixed(0) + " %"), contended(d), guardrails(d), cell(d.backlog ?? "–"),
    cell(d.dropped_total), cell(d.records), cell(d.sync_health, d.sync_health));
  return tr;
}
const REASONS = 2;  // a device's row shows its first health reasons, one line each, and "+N more"
const PER_DEVICE = 2, BOX_LINES = 20;  // a box's lines: at most two a device (one cannot fill it), twenty in all
// a box (regressions, triggers): folded to one line (its counts and its worst line) above the devices; opened, its
// lines worst first. items: {device, text, cls}, worst first
function listBox(name, items, head) {
  const lines = [], over = new Map(), per = new Map();
  for (const item of items) {
    const n = (per.get(item.device) || 0) + 1;
    per.set(item.device, n);
    if (n > PER_DEVICE) over.set(item.device, (over.get(item.device) || 0) + 1); else lines.push(item);
  }
  const li = (item) => { const el = document.createElement("li"); el.textContent = item.text; if (item.cls) el.className = item.cls; return el; };
  const moreOn = (device, n) => {  // the rest of one device's lines: on its page
    const el = document.createElement("li"), link = document.createElement("a");
    link.href = "device/" + encodeURIComponent(device);
    link.textContent = "+" + n + " more on " + device;
    el.className = "more-on";
    el.appendChild(link);
    return el;
  };
  const out = lines.slice(0, BOX_LINES).map(li), overs = [...over];
  for (const [device, n] of overs.slice(0, BOX_LINES)) out.push(moreOn(device, n));
  const cut = lines.slice(BOX_LINES).length + overs.slice(BOX_LINES).reduce((sum, [, n]) => sum + n, 0);
  if (cut) out.push(li({ text: "+" + cut + " more (the link above lists them all)", cls: "more-on" }));
  document.getElementById(name + "-list").replaceChildren(...out);
  const summary = document.getElementById(name + "-head"), strong = document.createElement("strong");
  strong.textContent = head[0];
  summary.replaceChildren(strong, " " + head[1] + (items.length ? " — worst: " + items[0].text : ""));
  summary.title = items.length ? items[0].text : "";
  document.getElementById(name + "s").hidden = items.length === 0;
}
const changeOf = line => { const m = /([+-]\\d+(?:\\.\\d+)?) %/.exec(line); return m ? Math.abs(Number(m[1])) : 0; };
const SEVERITY = { critical: 0, warning: 1 }, STATE = { firing: 0, cooling_down: 1 };
const order = (a, b) => (a.device < b.device ? -1 : a.device > b.device ? 1 : a.text < b.text ? -1 : a.text > b.text ? 1 : 0);
function render(devices) {
  lastDevices = devices;
  classes(devices);
  const rows = shown(devices);
  const triage = view.get("layout") !== "table";
  const problems = triage ? rows.filter(problem) : rows, healthy = triage ? rows.filter(d => !problem(d)) : [];
  // triage: the problems in full, the healthy devices folded into one line (one dense line each when shown); a
  // filter shows every device it keeps
  const choice = chosen();
  folded = triage && !filtered() && (choice ? choice === "fold" : healthy.length > FOLD_FROM);
  document.getElementById("problems").replaceChildren(...problems.map(d => row(d, false)));
  document.getElementById("healthy").replaceChildren(...healthy.map(d => row(d, true)));
  document.getElementById("healthy").hidden = folded;
  document.getElementById("fold").hidden = !triage || filtered() || healthy.length === 0;
  document.getElementById("fold-button").textContent =
    plural(healthy.length, "device", "devices") + " healthy — " + (folded ? "show" : "fold");
  document.body.dataset.folded = folded ? healthy.length : 0;
  document.getElementById("empty").hidden = devices.length > 0;
  // worst first: regressions by the size of their change; triggers critical first, then firing before cooling down
  const changes = devices.flatMap(d => (d.regressions || []).map(line => ({ device: d.device_id, text: line, change: changeOf(line) })))
    .sort((a, b) => (b.change - a.change) || order(a, b));
  const withChanges = devices.filter(d => (d.regressions || []).length).length;
  listBox("regression", changes, ["Regressions", changes.length + " open on " + plural(withChanges, "device", "devices")]);
  const holding = devices.flatMap(d => d.triggers || []);
  const trig = devices.flatMap(d => (d.triggers || []).map(t => ({ device: d.device_id, text: t.summary, severity: SEVERITY[t.severity] ?? 1, state: STATE[t.state] ?? 2,
    cls: t.severity === "critical" ? "critical" : "warning" }))).sort((a, b) => (a.severity - b.severity) || (a.state - b.state) || order(a, b));
  const critical = holding.filter(t => t.severity === "critical").length;
  const fired = holding.filter(t => t.state === "firing").length, onDevices = devices.filter(d => (d.triggers || []).length).length;
  listBox("trigger", trig, ["Triggers", fired + " firing" + (holding.length > fired ? ", " + (holding.length - fired) + " cooling down" : "") +
    " on " + plural(onDevices, "device", "devices") + (critical ? " (" + critical + " critical)" : "")]);
  const late = devices.filter(d => d.sync_health !== "ok").length;
  const count = s => devices.filter(d => d.health === s).length;
  const firing = holding.filter(t => t.state === "firing").length, cooling = holding.length - firing;
  const open = devices.reduce((n, d) => n + openRegressions(d), 0);
  document.getElementById("summary").textContent =
    devices.length + (devices.length === 1 ? " device, " : " devices, ") + count("critical") + " critical, " + count("warning") + " warning; " +
    late + " not seen in the last " + span(lateAfter) + "; " + plural(firing, "trigger", "triggers") + " firing" +
    (cooling ? " (" + cooling + " cooling down)" : "") + "; " + plural(open, "open regression", "open regressions") +
    " — updated " + new Date().toLocaleTimeString();
}
async function refresh() {
  const response = await fetch("api/v1/fleet");
  if (!response.ok) { document.getElementById("summary").textContent = "the aggregator answered " + response.status; return; }
  const body = await response.json();
  lateAfter = body.late_after_s ?? lateAfter;
  truncated(body);
  render(body.devices);
}
function truncated(body) {  // series a bounded answer left out (server.max_read_series)
  const note = document.getElementById("truncated");
  note.textContent = body.truncated ? body.truncated.message : "";
  note.hidden = !body.truncated;
}
const initial = /*INITIAL*/null;
if (initial) { lateAfter = initial.late_after_s ?? lateAfter; truncated(initial); render(initial.devices); } else refresh();
setInterval(refresh, 30000);
const flash = (id) => { const row = document.getElementById("device-" + id); if (row) row.classList.add("flash"); };
function replaceRow(row) {
  const others = lastDevices.filter(d => d.device_id !== row.device_id);
  render([...others, row].sort(byId));
}
// a device's row fetched over the API: one fetch per device at a time; events meanwhile make one more, 2 s later
const fetching = new Map();
let rowFetches = 0;
async function fetchRow(id) {
  if (fetching.has(id)) { fetching.set(id, true); return; }
  fetching.set(id, false);
  try {
    for (;;) {
      const response = await fetch("api/v1/fleet?device=" + encodeURIComponent(id));
      if (response.ok) {
        for (const row of (await response.json()).devices) replaceRow(row);
        rowFetches += 1;
        document.body.dataset.rowFetches = rowFetches;
        flash(id);
      }
      if (!fetching.get(id)) break;
      fetching.set(id, false);
      await new Promise(done => setTimeout(done, 2000));
    }
  } finally { fetching.delete(id); }
}
const events = new EventSource("api/v1/stream");
let streamOpened = false;
events.addEventListener("open", () => {  // a reconnect (the server dropped a stream that fell behind): events were missed
  if (streamOpened) refresh();
  streamOpened = true;
});
events.addEventListener("batch", (e) => {
  const event = JSON.parse(e.data);
  if (event.type !== "refetch" && event.device && typeof event.device === "object") {
    replaceRow(event.device);  // the event carries the device's new row: nothing to fetch
    flash(event.device_id);
  } else fetchRow(event.device_id);  // a refetch notice (the row is over server.max_event_bytes), or no row
});
</script>
</body></html>
"""
FLEET_PAGE = (
    FLEET_PAGE.replace("/*STYLE*/", _STYLE + _FLEET_STYLE.replace("/*LABELS*/", _card_labels()))
    .replace("/*HEADER*/", _header())
    .replace("/*SPAN*/", str(len(_COLUMNS)))
)


NOT_FOUND_PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>LLM-Latency-Lens — no such device</title>
<style>{_STYLE}</style></head>
<body>
<a href="../">← fleet</a>
<h1>No such device</h1>
<div class="sub">This aggregator has no measurements from a device called <code id="name"></code>.</div>
<script>document.getElementById("name").textContent = /*NAME*/"";</script>
</body></html>
"""

LOGIN_PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>LLM-Latency-Lens — sign in</title>
<style>{_STYLE} input {{ font: inherit; padding: 6px; width: 420px; }} button {{ font: inherit; padding: 6px 14px; }}</style>
</head><body>
<h1>LLM-Latency-Lens fleet</h1>
<div class="sub">This aggregator is not on loopback: enter a read token (<code>lens-aggregator token add --read NAME</code>).</div>
<!--error-->
<form method="post" action="/login"><input type="password" name="token" autocomplete="current-password" autofocus>
<button type="submit">Sign in</button></form>
</body></html>
"""

DEVICE_PAGE = device_page.DEVICE_PAGE.replace("/*STYLE*/", _STYLE).replace("/*SCRIPT*/", device_page._SCRIPT)


def with_data(page: str, data: object) -> str:
    """The page with its first data inlined, so it renders at once (and without a second request)."""
    return page.replace("/*INITIAL*/null", _script_json(data))


def not_found(device: str) -> str:
    """The 404 page for an unknown device (its name inlined as a JSON string, shown as text)."""
    return NOT_FOUND_PAGE.replace('/*NAME*/""', _script_json(device))


def _script_json(value: object) -> str:
    """JSON that cannot end the <script> element it is inlined in."""
    return json.dumps(value).replace("</", "<\\/").replace("<!--", "<\\!--")
