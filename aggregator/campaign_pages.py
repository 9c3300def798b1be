"""HTML for campaigns: the box on the fleet page and the campaign page (``/campaigns/{id}``), rendered on the server.

Everything shown comes from the store, much of it from devices (device ids, job reasons, class names, model,
workload and level names) or from an operator (a campaign's name): every string loses its control and invisible
characters (bidirectional overrides included, as Prometheus labels do), is cut to a bound and is HTML-escaped, quotes
too. There is no script and no inline data on these pages, so nothing can end a script element; numbers that are
not finite show as ``–``. Links carry only a campaign id that parses as a UUID.

What each page lists is bounded: the box shows at most :data:`BOX_CAMPAIGNS` campaigns (active ones first), the
campaign page at most :data:`PAGE_DEVICES` devices and :data:`PAGE_CLASS_ROWS` class rows, and says how many it left
out.
"""

from __future__ import annotations

import html
import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from .metrics import CAMPAIGN_TERMINAL, JOB_STATES, clean_label
from .pages import _STYLE

BOX_CAMPAIGNS = 20
PAGE_DEVICES = 2_000
PAGE_CLASS_ROWS = 2_000
MAX_SHOWN_CHARS = 120
MAX_REASON_CHARS = 300

_CAMPAIGN_STYLE = """
.campaigns { background: #fff; border: 1px solid #d0d7de; padding: 8px 16px; margin-bottom: 12px; }
.campaigns table { margin-top: 6px; } .bar { display: inline-block; width: 80px; height: 8px; background: #eaeef2; }
.bar span { display: block; height: 8px; background: #0969da; } .state { text-align: left; }
.pending, .queued { color: #57606a; } .running { color: #0969da; } .completed, .succeeded { color: #1a7f37; }
.failed, .timed_out { color: #cf222e; } .cancelled, .skipped { color: #9a6700; }
td.reason { text-align: left; max-width: 420px; overflow-wrap: anywhere; } .spread { color: #57606a; font-size: 12px; white-space: nowrap; }
td.progress, td.when, td.level { white-space: nowrap; }
"""
_METRICS = (
    ("ttft_p50_ms", "TTFT p50", 1),
    ("ttft_p95_ms", "TTFT p95", 1),
    ("tpot_p50_ms", "TPOT p50", 2),
    ("tpot_p95_ms", "TPOT p95", 2),
    ("e2e_p50_ms", "e2e p50", 1),
    ("e2e_p95_ms", "e2e p95", 1),
    ("tokens_per_second", "tok/s", 1),
    ("j_per_output_token", "J/token", 4),
)


def text(value: Any, limit: int = MAX_SHOWN_CHARS) -> str:
    """Any value as escaped text: control and invisible characters removed, at most ``limit`` characters."""
    if value is None:
        return "–"
    shown = value if type(value) is str else str(value) if type(value) in (int, float, bool) else type(value).__name__
    cleaned, _, _ = clean_label(shown[: limit * 4], limit)
    return html.escape(cleaned, quote=True)


def number(value: Any, digits: int = 1) -> str:
    if type(value) not in (int, float) or not math.isfinite(value) or abs(value) >= 1e15:
        return "–"
    return f"{value:,.{digits}f}"


def percent(value: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        return 0.0
    return min(100.0, max(0.0, float(value)))


def campaign_id(value: Any) -> str | None:
    if type(value) is not str or len(value) > 64:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def _state(value: Any) -> str:
    """A state as text and as a CSS class: only the states the protocol names make a class."""
    known = {"pending", "running", "completed", "failed", "cancelled", *JOB_STATES}
    return value if type(value) is str and value in known else "unknown"


def _progress(value: Any) -> str:
    p = percent(value)
    return f'<span class="bar"><span style="width:{p:.0f}%"></span></span> {p:.0f} %'


def _counts(counts: Any) -> str:
    if not isinstance(counts, Mapping):
        return "–"
    parts = [
        f'<span class="{state}">{number(counts.get(state), 0)} {state.replace("_", " ")}</span>'
        for state in JOB_STATES
        if type(counts.get(state)) is int and counts.get(state)
    ]
    return " · ".join(parts) or "no devices"


def campaigns_box_html(campaigns: Sequence[Mapping[str, Any]], *, link_prefix: str = "campaigns/") -> str:
    """The fleet page's campaigns box: active campaigns first, then the most recent others (as given: newest
    first), at most :data:`BOX_CAMPAIGNS`; each with its name (a link to its page), state, progress and job counts.
    Empty string when there is no campaign."""
    usable = [c for c in campaigns if isinstance(c, Mapping)]
    if not usable:
        return ""
    active = [c for c in usable if c.get("status") not in CAMPAIGN_TERMINAL]
    ended = [c for c in usable if c.get("status") in CAMPAIGN_TERMINAL]
    shown = (active + ended)[:BOX_CAMPAIGNS]
    rows = []
    for c in shown:
        cid = campaign_id(c.get("benchmark_id"))
        name = text(c.get("name") or cid or "unnamed")
        label = f'<a href="{html.escape(link_prefix)}{cid}">{name}</a>' if cid else name
        state = _state(c.get("status"))
        rows.append(
            f'<tr><td class="text">{label}</td><td class="state {state}">{state}</td>'
            f'<td class="progress">{_progress(c.get("progress_percent"))}</td><td class="text">{_counts(c.get("counts"))}</td>'
            f'<td class="text when">{text(c.get("created_at"), 40)}</td><td class="text when">{text(c.get("deadline"), 40)}</td></tr>'
        )
    more = len(usable) - len(shown)
    note = (
        f'<div class="sub">{more:,} more not shown (<a href="api/v1/benchmark">all campaigns</a>)</div>' if more else ""
    )
    return (
        f"<style>{_CAMPAIGN_STYLE}</style>"  # the fleet page's own style has none of these classes
        f'<div class="campaigns" id="campaigns"><strong>Campaigns</strong> ({len(active):,} active)'
        '<div class="scroll"><table><thead><tr><th>campaign</th><th class="state">state</th><th>progress</th>'
        '<th style="text-align:left">devices</th><th style="text-align:left">created</th>'
        '<th style="text-align:left">deadline</th></tr></thead><tbody>'
        + "".join(rows)
        + f"</tbody></table></div>{note}</div>"
    )


def _spread(row: Mapping[str, Any], key: str, digits: int) -> str:
    spread = row.get("spread")
    s = spread.get(key) if isinstance(spread, Mapping) else None
    if not isinstance(s, Mapping) or s.get("min") == s.get("max"):  # one device, or all alike: nothing to show
        return ""
    return f'<div class="spread">{number(s.get("min"), digits)} – {number(s.get("max"), digits)}</div>'


def _class_tables(classes: Mapping[str, Any]) -> str:
    if not isinstance(classes, Mapping) or not classes:
        return '<div class="hint">No results yet: a device reports each level as it completes it.</div>'
    header = (
        '<tr><th style="text-align:left">model</th><th style="text-align:left">workload</th>'
        '<th style="text-align:left">level</th><th>devices</th>'
        + "".join(
            f"<th>{label}{'' if key.endswith('second') or key.startswith('j_') else ' (ms)'}</th>"
            for key, label, _ in _METRICS
        )
        + "<th>errors</th></tr>"
    )
    parts, shown = [], 0
    total = sum(len(rows) for rows in classes.values() if isinstance(rows, Sequence))
    for device_class, rows in classes.items():
        if not isinstance(rows, Sequence) or shown >= PAGE_CLASS_ROWS:
            continue
        body = []
        for row in rows[: PAGE_CLASS_ROWS - shown]:
            if not isinstance(row, Mapping):
                continue
            shown += 1
            cells = "".join(
                f"<td>{number(row.get(key), digits)}{_spread(row, key, digits)}</td>" for key, _, digits in _METRICS
            )
            rate = row.get("error_rate")
            errors = f"{percent(100 * rate):.0f} %" if number(rate, 3) != "–" and rate is not None else "–"
            body.append(
                f'<tr><td class="text">{text(row.get("model"))}</td><td class="text">{text(row.get("workload"))}</td>'
                f'<td class="text level">{text(row.get("level"))}</td><td>{number(row.get("devices"), 0)}</td>{cells}'
                f"<td>{errors}</td></tr>"
            )
        parts.append(
            f'<h3>class {text(device_class)}</h3><div class="scroll"><table><thead>{header}</thead><tbody>'
            + "".join(body)
            + "</tbody></table></div>"
        )
    note = f'<div class="sub">{total - shown:,} more rows not shown: use the export</div>' if total > shown else ""
    return "".join(parts) + note


def _devices_table(devices: Any) -> str:
    if not isinstance(devices, Mapping) or not devices:
        return '<div class="hint">No device was targeted.</div>'
    rows = []
    for device_id, job in list(devices.items())[:PAGE_DEVICES]:
        job = job if isinstance(job, Mapping) else {}
        state = _state(job.get("state"))
        rows.append(
            f'<tr><td class="text">{text(device_id)}</td><td class="state {state}">{state.replace("_", " ")}</td>'
            f'<td class="progress">{_progress(job.get("progress_percent"))}</td>'
            f'<td class="reason">{text(job.get("reason"), MAX_REASON_CHARS)}</td>'
            f'<td class="text when">{text(job.get("updated_at"), 40)}</td></tr>'
        )
    more = len(devices) - len(rows)
    note = f'<div class="sub">{more:,} more devices not shown: see the status API</div>' if more > 0 else ""
    return (
        '<div class="scroll"><table id="devices"><thead><tr><th>device</th><th class="state">state</th>'
        '<th>progress</th><th style="text-align:left">reason</th><th style="text-align:left">updated</th></tr>'
        "</thead><tbody>" + "".join(rows) + f"</tbody></table></div>{note}"
    )


def campaign_page_html(status: Mapping[str, Any], classes: Mapping[str, Any]) -> str:
    """The campaign page: ``status`` as ``GET /api/v1/benchmark/{id}/status`` answers it, ``classes`` the class
    comparison (``campaign_results.class_rows``). Reloads itself every 30 s while the campaign runs."""
    cid = campaign_id(status.get("benchmark_id"))
    name = text(status.get("name") or cid or "campaign")
    state = _state(status.get("status"))
    refresh = "" if state in CAMPAIGN_TERMINAL else '<meta http-equiv="refresh" content="30">'
    facts = [
        ("state", f'<span class="{state}">{state}</span>'),
        ("progress", _progress(status.get("progress_percent"))),
        ("created", text(status.get("created_at"), 40)),
        ("started", text(status.get("started_at"), 40)),
        ("estimated completion", text(status.get("estimated_completion"), 40)),
        ("deadline", text(status.get("deadline"), 40)),
        ("devices", _counts(status.get("counts"))),
    ]
    api = f"../api/v1/benchmark/{cid}" if cid else ""
    links = (
        f'<a href="{api}/status">status</a> · <a href="{api}/results">results</a> · export '
        f'<a href="{api}/export?format=csv">CSV</a> · <a href="{api}/export?format=parquet">Parquet</a> · '
        f'<a href="{api}/export?format=arrow">Arrow</a> · <a href="{api}/export?format=json">JSON</a>'
        if cid
        else ""
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">{refresh}'
        f"<title>LLM-Latency-Lens — campaign {name}</title><style>{_STYLE}{_CAMPAIGN_STYLE}</style></head><body>"
        f'<a href="../">← fleet</a><h1>Campaign {name}</h1><div class="sub">{text(cid, 40)} · {links}</div>'
        '<table class="facts" style="width:auto">'
        + "".join(f'<tr><th style="text-align:left">{k}</th><td class="text">{v}</td></tr>' for k, v in facts)
        + '</table><h2>Per device class</h2><div class="sub">each figure: the median over the class\'s devices '
        "(below it, the lowest – highest device); ms unless noted</div>"
        + _class_tables(classes)
        + "<h2>Devices</h2>"
        + _devices_table(status.get("devices"))
        + "</body></html>\n"
    )
