"""The built-in fleet page and per-device page: plain HTML, CSS and JavaScript, no external CDN."""

from __future__ import annotations

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

FLEET_PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>LLM-Latency-Lens fleet</title>
<style>{_STYLE}</style></head>
<body>
<h1>LLM-Latency-Lens fleet</h1>
<div class="sub" id="summary">loading…</div>
<div class="sub" id="truncated" hidden></div>
<div class="regressions" id="regressions" hidden><strong>Regressions</strong> (change points in each device ×
model × strategy; <a href="api/v1/regressions">details</a>)<ul id="regression-list"></ul></div>
<div class="triggers" id="triggers" hidden><strong>Triggers</strong> (conditions that hold on a device × model ×
engine settings; <a href="api/v1/triggers">states and recent fires</a>)<ul id="trigger-list"></ul></div>
<div class="hint" id="empty" hidden>No device has sent measurements yet. Give each device a token:
<code>lens-aggregator token add DEVICE_ID --url URL-OF-THIS-AGGREGATOR</code> prints it with the settings to put in
the device's <code>agent.toml</code>; its records appear here after its next sync (<code>lens-agent sync</code>).</div>
<div class="tools"><label>filter <input id="filter" type="search" placeholder="device, model, strategy, class"></label>
<label>class <select id="class"><option value="">all</option></select></label>
<label>health <select id="health"><option value="">all</option><option>critical</option><option>warning</option><option>ok</option></select></label>
<span class="sub">click a column to sort; the address keeps the view (<code>?sort=error_rate&amp;desc=1&amp;filter=orin</code>)</span></div>
<div class="scroll"><table id="devices"><thead><tr>
<th data-key="device_id">device</th><th data-key="health_rank" style="text-align:left">health</th><th data-key="trigger_count" style="text-align:left">triggers</th><th data-key="device_class" style="text-align:left">class</th><th data-key="last_seen_age_s">last seen</th><th data-key="model" style="text-align:left">model</th>
<th data-key="ttft_p95_ms">TTFT p95 (ms)</th><th data-key="tokens_per_second">tok/s</th><th data-key="j_per_output_token">J/token</th>
<th data-key="error_rate">errors</th><th data-key="contended_share" title="share of the device's latest requests that other work on the device contended with (docs/fleet.md)">contended</th><th data-key="backlog">backlog</th><th data-key="dropped_total">dropped</th>
<th data-key="records">records</th><th data-key="sync_health">sync</th></tr></thead><tbody></tbody></table></div>
<script>
"use strict";
const fmt = (v, d) => (v === null || v === undefined) ? "–" : Number(v).toFixed(d);
function age(s) {{
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}}
let lateAfter = 3600;
const span = (s) => s % 3600 === 0 ? (s / 3600) + (s === 3600 ? " hour" : " hours") : Math.round(s / 60) + " minutes";
function cell(text, cls) {{ const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; return td; }}
// the view (sort column, direction, filter) lives in the address, so it can be bookmarked and shared
const view = new URLSearchParams(location.search);
let lastDevices = [];
function shown(devices) {{
  const filter = (view.get("filter") || "").toLowerCase();
  const key = view.get("sort"), desc = view.get("desc") === "1";
  const cls = view.get("class") || "", state = view.get("health") || "";
  const text = d => [d.device_id, d.model, d.strategy, d.device_class, d.power_mode, ...(d.series || []).map(s => s.model_name + " " + s.strategy)].join(" ").toLowerCase();
  const rows = devices.filter(d => (!filter || text(d).includes(filter)) && (!cls || d.device_class === cls) && (!state || d.health === state));
  if (key) {{
    const value = d => key === "health_rank" ? ["ok", "warning", "critical"].indexOf(d.health) : d[key];
    rows.sort((a, b) => {{
      const x = value(a), y = value(b);
      if (x === y) return 0;
      if (x === null || x === undefined) return 1;  // missing figures last, whichever the direction
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * (desc ? -1 : 1);
    }});
  }}
  return rows;
}}
function setView(name, value) {{
  if (value) view.set(name, value); else view.delete(name);
  history.replaceState(null, "", "?" + view.toString());
  render(lastDevices);
}}
document.querySelectorAll("#devices th").forEach(th => th.addEventListener("click", () => {{
  const key = th.dataset.key;
  setView("desc", view.get("sort") === key && view.get("desc") !== "1" ? "1" : "");
  setView("sort", key);
}}));
const filterBox = document.getElementById("filter");
filterBox.value = view.get("filter") || "";
filterBox.addEventListener("input", () => setView("filter", filterBox.value));
for (const name of ["class", "health"]) {{
  const box = document.getElementById(name);
  box.addEventListener("change", () => setView(name, box.value));
}}
function classes(devices) {{  // the class filter offers the classes the fleet has
  const box = document.getElementById("class"), have = new Set([...box.options].map(o => o.value));
  for (const c of [...new Set(devices.map(d => d.device_class).filter(Boolean))].sort())
    if (!have.has(c)) {{ const o = document.createElement("option"); o.value = o.textContent = c; box.appendChild(o); }}
  box.value = view.get("class") || "";
  document.getElementById("health").value = view.get("health") || "";
}}
function contended(d) {{  // the share of its latest requests that other work contended with, and how many
  if (d.contended_share === null || d.contended_share === undefined) return cell("–", "contended");
  const td = cell((100 * d.contended_share).toFixed(0) + " %", d.contended_share > 0 ? "contended warning" : "contended");
  td.title = d.contended + " of the latest " + d.requests + " requests were contended (other processes, pressure, throttling)";
  return td;
}}
function render(devices) {{
  lastDevices = devices;
  classes(devices);
  const body = document.querySelector("#devices tbody");
  body.replaceChildren();
  for (const d of shown(devices)) {{
    const tr = document.createElement("tr");
    tr.id = "device-" + d.device_id;
    const name = document.createElement("td");
    const link = document.createElement("a");
    link.href = "device/" + encodeURIComponent(d.device_id);
    link.textContent = d.device_id;
    name.appendChild(link);
    // one figure per strategy: a speculative request's TTFT is not a local one's
    const split = (key, digits) => {{
      const parts = Object.entries(d.by_strategy || {{}});
      if (parts.length < 2) return fmt(d[key], digits);
      return parts.map(([s, f]) => fmt(f[key], digits) + " " + s).join(" · ");
    }};
    const health = cell(d.health, "health " + d.health);
    for (const reason of d.health_reasons || []) {{ const small = document.createElement("small"); small.textContent = reason; health.appendChild(small); }}
    const held = d.triggers || [];
    const triggers = cell(held.map(t => t.trigger + (t.state === "cooling_down" ? " (cooling down)" : "")).join(", ") || "–", "text triggers-cell");
    triggers.title = held.map(t => t.summary).join("\\n");
    const facts = [d.device_class, d.power_mode, d.temperature_max_c === null || d.temperature_max_c === undefined ? null : d.temperature_max_c.toFixed(0) + " °C"];
    tr.append(name, health, triggers, cell(facts.filter(Boolean).join(" · ") || "–", "text"), cell(age(d.last_seen_age_s)), cell(d.model || "–", "text"), cell(split("ttft_p95_ms", 1)),
      cell(split("tokens_per_second", 1)), cell(fmt(d.j_per_output_token, 4)),
      cell(d.error_rate === null || d.error_rate === undefined ? "–" : (100 * d.error_rate).toFixed(0) + " %"), contended(d), cell(d.backlog ?? "–"),
      cell(d.dropped_total), cell(d.records), cell(d.sync_health, d.sync_health));
    body.appendChild(tr);
  }}
  document.getElementById("empty").hidden = devices.length > 0;
  const flagged = devices.flatMap(d => d.regressions || []);
  const list = document.getElementById("regression-list");
  list.replaceChildren(...flagged.map(line => {{ const li = document.createElement("li"); li.textContent = line; return li; }}));
  document.getElementById("regressions").hidden = flagged.length === 0;
  const holding = devices.flatMap(d => d.triggers || []);
  document.getElementById("trigger-list").replaceChildren(...holding.map(t => {{
    const li = document.createElement("li"); li.textContent = t.summary; li.className = t.state === "firing" ? "critical" : "warning"; return li;
  }}));
  document.getElementById("triggers").hidden = holding.length === 0;
  const late = devices.filter(d => d.sync_health !== "ok").length;
  const count = s => devices.filter(d => d.health === s).length;
  document.getElementById("summary").textContent =
    devices.length + (devices.length === 1 ? " device, " : " devices, ") + count("critical") + " critical, " + count("warning") + " warning; " +
    late + " not seen in the last " + span(lateAfter) + " — updated " + new Date().toLocaleTimeString();
}}
async function refresh() {{
  const response = await fetch("api/v1/fleet");
  if (!response.ok) {{ document.getElementById("summary").textContent = "the aggregator answered " + response.status; return; }}
  const body = await response.json();
  lateAfter = body.late_after_s ?? lateAfter;
  truncated(body);
  render(body.devices);
}}
function truncated(body) {{  // series a bounded answer left out (server.max_read_series)
  const note = document.getElementById("truncated");
  note.textContent = body.truncated ? body.truncated.message : "";
  note.hidden = !body.truncated;
}}
const initial = /*INITIAL*/null;
if (initial) {{ lateAfter = initial.late_after_s ?? lateAfter; truncated(initial); render(initial.devices); }} else refresh();
setInterval(refresh, 30000);
const flash = (id) => {{ const row = document.getElementById("device-" + id); if (row) row.classList.add("flash"); }};
function replaceRow(row) {{
  const others = lastDevices.filter(d => d.device_id !== row.device_id);
  render([...others, row].sort((a, b) => a.device_id < b.device_id ? -1 : 1));
}}
// a device's row fetched over the API: one fetch per device at a time; events meanwhile make one more, 2 s later
const fetching = new Map();
let rowFetches = 0;
async function fetchRow(id) {{
  if (fetching.has(id)) {{ fetching.set(id, true); return; }}
  fetching.set(id, false);
  try {{
    for (;;) {{
      const response = await fetch("api/v1/fleet?device=" + encodeURIComponent(id));
      if (response.ok) {{
        for (const row of (await response.json()).devices) replaceRow(row);
        rowFetches += 1;
        document.body.dataset.rowFetches = rowFetches;
        flash(id);
      }}
      if (!fetching.get(id)) break;
      fetching.set(id, false);
      await new Promise(done => setTimeout(done, 2000));
    }}
  }} finally {{ fetching.delete(id); }}
}}
const events = new EventSource("api/v1/stream");
let streamOpened = false;
events.addEventListener("open", () => {{  // a reconnect (the server dropped a stream that fell behind): events were missed
  if (streamOpened) refresh();
  streamOpened = true;
}});
events.addEventListener("batch", (e) => {{
  const event = JSON.parse(e.data);
  if (event.type !== "refetch" && event.device && typeof event.device === "object") {{
    replaceRow(event.device);  // the event carries the device's new row: nothing to fetch
    flash(event.device_id);
  }} else fetchRow(event.device_id);  // a refetch notice (the row is over server.max_event_bytes), or no row
}});
</script>
</body></html>
"""

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
