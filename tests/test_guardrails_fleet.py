"""Guardrail overhead on the fleet (issue 29): ``/api/v1/fleet`` rows and the device's series carry it per model ×
guardrail set × strategy, the fleet page and the device page show it, and blocked requests (kind ``blocked``) stay
out of every latency and error figure. Records go through the real ingest endpoint into real SQLite and PostgreSQL
stores; the pages are read by headless Chromium."""

from __future__ import annotations

import asyncio
import copy
import html
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from aggregator.store import SQLiteStore

from .guardrail_records import block, fail, guard
from .test_aggregator import auth, make_batch
from .test_feedback import Fleet
from .test_fleet_page import chromium, console_errors, serving

FIGURES = ("requests", "errors", "error_rate", "ttft_p95_ms", "tokens_per_second", "contended_share")
SERIES_FIGURES = ("requests", "errors", "error_rate", "ttft_p50_ms", "ttft_p95_ms", "tpot_p50_ms", "tpot_p95_ms",
                  "tokens_per_second")  # fmt: skip


def guarded_fleet(device: str, seed: int) -> list[dict[str, Any]]:
    """60 requests of one device: the first 10 beyond the window; of the latest 50, 40 guarded by "pii" (input
    1..40 ms, output 2 ms), 4 of them failed at the threat stage, and 10 by "strict"."""
    records = synthetic_records(60, seed=seed, device_id=device)
    for r in records:  # no chance failures: the errors are the planted ones
        if not r["ok"]:
            r.update(ok=True, error_type=None, error_message=None)
            r.update({k: v for k, v in synthetic_records(1, seed=seed + 1, device_id=device)[0].items()
                      if k.endswith("_ms") or k in ("output_tokens", "itl_ms", "stop_reason")})  # fmt: skip
    for i, r in enumerate(records[10:50]):
        guard(r, "pii", input_ms=float(i + 1), threat_ms=None, output_ms=2.0)
    for r in records[20:24]:
        fail(r, "pii", "threat")
    for r in records[50:]:
        guard(r, "strict", input_ms=10.0, threat_ms=5.0, output_ms=5.0)
    return records


def blocked_between(records: list[dict[str, Any]], device: str, seed: int) -> list[dict[str, Any]]:
    """Six blocked requests that ran among the latest ones (at input, at threat, and at output with the inference's
    times kept — absurd ones: were they counted, every latency figure would move)."""
    extra = synthetic_records(6, seed=seed, device_id=device)
    out = []
    for n, r in enumerate(extra):
        r["id"] = r["id"][:-4] + f"{n:04x}"
        r["started_at"] = records[30 + n]["started_at"]
        block(r, "pii", ("input", "threat", "output")[n % 3])
        if n % 3 == 2:
            r.update(ttft_ms=900_000.0, e2e_ms=990_000.0, tpot_ms=9000.0)
        out.append(r)
    return out


async def test_guardrail_overhead_in_the_fleet_rows_and_blocked_apart(aiohttp_client: Any, store: Any) -> None:
    client = await aiohttp_client(create_app(Settings(), store))
    fleet = Fleet()
    records = guarded_fleet("orin-1", 291)
    await fleet.send(client, store, "orin-1", copy.deepcopy(records))
    # the same requests on a twin, plus blocked ones among them
    twin = copy.deepcopy(records)
    for r in twin:
        r["device_id"] = "orin-2"
    await fleet.send(client, store, "orin-2", twin + blocked_between(twin, "orin-2", 292))
    await fleet.send(client, store, "plain-1", synthetic_records(20, seed=293, device_id="plain-1"))

    rows = {d["device_id"]: d for d in (await (await client.get("/api/v1/fleet")).json())["devices"]}
    one, two, plain = rows["orin-1"], rows["orin-2"], rows["plain-1"]
    # the latest 50: 36 pii served (input 1..40 minus the 4 failed, +2 output: median 24.5 ms), 10 strict served
    # (20 ms): the headline is the costliest set's, pii, not a median over both sets (23.5 ms)
    overheads = sorted([i + 1 + 2.0 for i in range(40) if not 10 <= i < 14])
    assert one["guardrail_sets"] == ["pii", "strict"] and one["guardrail_costliest_set"] == "pii"
    assert one["guardrail_requests"] == 36
    assert one["guardrail_overhead_p50_ms"] == (overheads[17] + overheads[18]) / 2 == 24.5
    assert 0 < one["guardrail_impact_p50_percent"] < 100
    assert one["blocked"] == 0 and two["blocked"] == 6
    assert plain["guardrail_sets"] == [] and plain["guardrail_overhead_p50_ms"] is None and plain["blocked"] == 0
    # blocked requests move no figure: the twin's are the same as the device without them
    assert {k: two[k] for k in FIGURES} == {k: one[k] for k in FIGURES}
    assert one["errors"] == 4 and one["requests"] == 50
    [s1], [s2] = one["series"], two["series"]
    assert {k: s2[k] for k in SERIES_FIGURES} == {k: s1[k] for k in SERIES_FIGURES}
    assert s2["ttft_p95_ms"] < 10_000  # the blocked-at-output requests' 900 s TTFT is nowhere

    lines = {g["guardrail_set"]: g for g in s2["guardrails"]}
    assert set(lines) == {"pii", "strict"}
    pii, strict = lines["pii"], lines["strict"]
    assert (pii["requests"], pii["blocked"], pii["errors"]) == (40, 6, 4)
    assert (strict["requests"], strict["blocked"], strict["errors"]) == (10, 0, 0)
    served_inputs = sorted(float(i + 1) for i in range(40) if not 10 <= i < 14)  # 36 served
    assert pii["input_p50_ms"] == (served_inputs[17] + served_inputs[18]) / 2
    assert pii["input_p95_ms"] > pii["input_p50_ms"] and pii["threat_p50_ms"] is None
    assert pii["output_p50_ms"] == pii["output_p95_ms"] == 2.0
    assert strict["overhead_p50_ms"] == strict["overhead_p95_ms"] == 20.0
    assert strict["threat_p50_ms"] == 5.0 and 0 < strict["impact_p50_percent"] <= strict["impact_p95_percent"] < 100
    assert {g["guardrail_set"]: g["blocked"] for g in s1["guardrails"]} == {"pii": 0, "strict": 0}

    # one device's row (what a live update carries) is the same row
    single = (await (await client.get("/api/v1/fleet?device=orin-2")).json())["devices"][0]
    assert single["series"][0]["guardrails"] == s2["guardrails"] and single["blocked"] == 6


async def test_a_model_whose_every_request_was_blocked_has_its_guardrail_line(aiohttp_client: Any, store: Any) -> None:
    client = await aiohttp_client(create_app(Settings(), store))
    records = [block(r, "deny", "input") for r in synthetic_records(5, seed=294, device_id="kiosk-1")]
    await Fleet().send(client, store, "kiosk-1", records)
    [row] = (await (await client.get("/api/v1/fleet")).json())["devices"]
    assert row["requests"] == 0 and row["error_rate"] is None and row["ttft_p95_ms"] is None
    assert row["blocked"] == 5 and row["guardrail_overhead_p50_ms"] is None
    [series] = row["series"]
    assert series["requests"] == 0 and series["guardrails"][0]["guardrail_set"] == "deny"
    assert series["guardrails"][0]["blocked"] == 5 and series["guardrails"][0]["input_p50_ms"] is None


# A test page framing the fleet page at a desk's and a phone's width; once both loaded it writes what they show.
MEASURE = """<!doctype html><html><body>
<iframe id="desk" width="1400" height="900" style="border:0" src="/?layout=table&sort=device_id"></iframe>
<iframe id="phone" width="400" height="900" style="border:0" src="/?layout=table&sort=device_id"></iframe>
<pre id="out"></pre>
<script>
const seen = {};
for (const id of ["desk", "phone"]) document.getElementById(id).addEventListener("load", (e) => {
  const doc = e.target.contentDocument, el = doc.documentElement, table = doc.getElementById("devices");
  const cells = [...doc.querySelectorAll("#devices td.guardrails")];
  seen[id] = {scrollWidth: el.scrollWidth, clientWidth: el.clientWidth, layout: getComputedStyle(table).tableLayout,
    display: getComputedStyle(table).display, texts: cells.map(c => c.innerText), titles: cells.map(c => c.title),
    right: Math.max(...cells.filter(c => c.offsetParent).map(c => Math.round(c.getBoundingClientRect().right))),
    sync: Math.round(doc.querySelector("#devices th:last-child").getBoundingClientRect().right)};
  document.getElementById("out").textContent = JSON.stringify(seen);
});
</script><img src="/slow-image"></body></html>"""


async def _measure(request: web.Request) -> web.Response:
    return web.Response(text=MEASURE, content_type="text/html")


async def _slow_image(request: web.Request) -> web.Response:  # holds the test page's load event
    await asyncio.sleep(1.5)
    return web.Response(body=b"", content_type="image/gif")


LONG = "orin-guard-with-a-long-name-0042"


def test_the_fleet_and_device_pages_show_guardrail_overhead(tmp_path: Path) -> None:
    routes = (web.get("/measure", _measure), web.get("/slow-image", _slow_image))
    with serving(tmp_path, Settings(), routes) as (url, _):
        records = guarded_fleet(LONG, 295)
        records += blocked_between(records, LONG, 296)

        async def send() -> None:
            store = SQLiteStore(tmp_path / "agg.db")
            token = store.add_token(LONG, "device", time.time_ns() // 1000)
            store.close()
            async with aiohttp.ClientSession(url) as session:
                body = make_batch(records, device=LONG)
                async with session.post("/api/v1/ingest", data=body, headers=auth(token)) as response:
                    assert response.status == 200, await response.text()

        asyncio.run(send())
        dom = chromium("--dump-dom", url + "/measure")
        assert console_errors(dom.stderr) == [], dom.stderr[-2000:]
        found = re.search(r'<pre id="out">(.*?)</pre>', dom.stdout, re.S)
        assert found, dom.stdout[-2000:]
        seen = json.loads(html.unescape(found.group(1)))
        desk, phone = seen["desk"], seen["phone"]
        # laptop-3, orin-017 (no guardrails: "–"), then the guarded device: its costliest set's median overhead and,
        # beneath it (whole in the column, not cut), the median impact
        assert desk["texts"][:2] == ["–", "–"] and re.fullmatch(r"\d+\.\d\n\d+\.\d %", desk["texts"][2]), desk
        assert "guardrail set pii, strict" in desk["titles"][2] and "6 blocked" in desk["titles"][2]
        assert "costliest pii" in desk["titles"][2]
        assert desk["layout"] == "fixed" and desk["scrollWidth"] <= desk["clientWidth"], desk
        assert desk["right"] <= desk["clientWidth"] and desk["sync"] <= desk["clientWidth"], (
            desk
        )  # every column on screen
        assert phone["display"] == "block" and phone["scrollWidth"] <= phone["clientWidth"], phone  # cards

        page = chromium("--dump-dom", url + "/device/" + LONG)
        assert console_errors(page.stderr) == [], page.stderr[-2000:]
        table = page.stdout.split('id="guardrail-table"')[1].split("</table>")[0]
        assert table.count("<tr>") == 3  # the header, pii and strict
        assert ">pii<" in table and ">strict<" in table and "<td>6</td>" in table  # pii: 6 blocked
        assert "20.00 / 20.00" in table  # strict's overhead p50 / p95
        assert '<div id="guardrails">' in page.stdout
        plain = chromium("--dump-dom", url + "/device/orin-017")
        assert '<div id="guardrails" hidden="">' in plain.stdout  # no guardrails: no table


# -- triggers on guardrail overhead ----------------------------------------------------------------------------------
GUARD_TRIGGERS = """
[[triggers]]
name = "slow-guardrails"
condition = "guardrail_overhead_ms"
threshold = 30
window = "2h"
min_samples = 10

[[triggers]]
name = "judge-share"
condition = "guardrail_impact_percent"
threshold = 5
window = "2h"
min_samples = 10
guardrail_set = "judge"
severity = "critical"
"""


def recent_guarded(device: str, seed: int, now: float, set_name: str, overhead_ms: float) -> list[dict[str, Any]]:
    """30 served requests over the last 90 minutes guarded by ``set_name``, the input stage costing ``overhead_ms``."""
    records = synthetic_records(30, seed=seed, device_id=device)
    for i, r in enumerate(records):
        r["started_at"] = _iso(now - 5400 + i * 180)
        r.update(ok=True, error_type=None, error_message=None)
        if r["ttft_ms"] is None:  # the rare synthetic failure: served here
            r.update(ttft_ms=400.0, tpot_ms=20.0, e2e_ms=2400.0, output_tokens=100, itl_ms=[20.0] * 99)
        guard(r, set_name, input_ms=overhead_ms * (0.9 + 0.2 * (i % 5) / 4), threat_ms=None, output_ms=None,
              inference_ms=2500.0)  # fmt: skip
    return records


def _iso(unix: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(unix, tz=timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


async def test_guardrail_triggers_fire_on_the_slow_and_costly_series_only(
    aiohttp_client: Any, store: Any, tmp_path: Path
) -> None:
    from aggregator.app import evaluate_triggers

    from .test_triggers import triggers_from
    from .trigger_fleet import Clock

    clock = Clock(time.time())
    settings = Settings(regression_interval_s=0.0, trigger_interval_s=3600.0, metrics_max_age_s=0.0)
    triggers = triggers_from(tmp_path, GUARD_TRIGGERS)
    client = await aiohttp_client(create_app(settings, store, triggers=triggers, clock=clock))
    fleet = Fleet()
    now = clock.now
    # fast rules (4 ms of ~2.5 s: 0.2 %), a slow judge (60 ms: above 30 ms, and ~2.4 % — under 5 %), a judge whose
    # requests are short (60 ms of ~0.5 s: above 5 %), and a device whose blocked requests cost 500 ms (never read)
    await fleet.send(client, store, "orin-rules", recent_guarded("orin-rules", 401, now, "rules", 4.0))
    await fleet.send(client, store, "orin-judge", recent_guarded("orin-judge", 402, now, "judge", 60.0))
    short = recent_guarded("orin-short", 403, now, "judge", 60.0)
    for r in short:
        r["ext"]["guardrails"]["impact_percent"] = 100 * 60.0 / 560.0
    await fleet.send(client, store, "orin-short", short)
    quiet = recent_guarded("orin-blocks", 404, now, "rules", 3.0)
    blocked = []
    for n, r in enumerate(synthetic_records(20, seed=405, device_id="orin-blocks")):
        r["started_at"] = _iso(now - 3000 + n * 60)
        block(r, "rules", "input")
        r["ext"]["guardrails"].update(overhead_ms=500.0, impact_percent=99.0, total_ms=505.0)
        r["ext"]["guardrails"]["stages"]["input"]["ms"] = 500.0
        blocked.append(r)
    await fleet.send(client, store, "orin-blocks", quiet + blocked)

    await evaluate_triggers(client.app)
    answer = await (await client.get("/api/v1/triggers")).json()
    holding = {(s["trigger"], s["device_id"]) for s in answer["holding"]}
    assert holding == {
        ("slow-guardrails", "orin-judge"),
        ("slow-guardrails", "orin-short"),
        ("judge-share", "orin-short"),
    }
    by_name = {t["name"]: t for t in answer["triggers"]}
    slow = {s["device_id"]: s for s in by_name["slow-guardrails"]["series"]}
    assert (
        slow["orin-rules"]["state"] == "ok" and slow["orin-rules"]["value"] < 5 and slow["orin-rules"]["samples"] == 30
    )
    assert slow["orin-blocks"]["state"] == "ok" and slow["orin-blocks"]["samples"] == 30  # the blocked 20: not read
    assert slow["orin-judge"]["bound"] > 30 and slow["orin-judge"]["value"] == pytest.approx(66.0, abs=0.5)
    assert "p95 guardrail overhead above 30 ms" in slow["orin-judge"]["summary"]
    share = {s["device_id"]: s for s in by_name["judge-share"]["series"]}
    assert set(share) == {"orin-judge", "orin-short"}  # scoped to the judge set: rules devices not listed
    assert share["orin-judge"]["state"] == "ok" and share["orin-short"]["value"] == pytest.approx(100 * 60 / 560)
    row = {d["device_id"]: d for d in (await (await client.get("/api/v1/fleet")).json())["devices"]}["orin-short"]
    assert row["health"] == "critical" and any("judge-share" in reason for reason in row["health_reasons"])


def test_guardrail_trigger_tables_are_checked(tmp_path: Path) -> None:
    from lens_core.errors import ConfigError

    from .test_triggers import triggers_from

    [overhead, share] = triggers_from(tmp_path, GUARD_TRIGGERS)
    assert overhead.describe().startswith("p95 guardrail overhead above 30 ms (its lower 95 % confidence bound)")
    assert share.scope() == {"guardrail_set": ["judge"]}
    for bad, key in (
        ('condition = "guardrail_impact_percent"\nthreshold = 120', "threshold"),
        ('condition = "guardrail_impact_percent"\nthreshold = 0', "threshold"),
        ('condition = "guardrail_overhead_ms"\nthreshold = 30\nmetric = "ttft"', "metric"),
        ('condition = "guardrail_overhead_ms"\nthreshold = 30\nguardrail_set = []', "guardrail_set"),
    ):
        with pytest.raises(ConfigError) as refused:
            triggers_from(tmp_path, f'[[triggers]]\nname = "x"\n{bad}\n')
        assert f"triggers[0].{key}" in str(refused.value), str(refused.value)


# -- the change-point search on guardrail overhead -------------------------------------------------------------------
def overhead_series(device: str, seed: int, plan: list[tuple[int, str, float]]) -> list[dict[str, Any]]:
    """400 requests (a benchmark run, 7.5 s apart) guarded as ``plan`` says: from request N on, set S at M ms of
    input validation (with a little noise), output filtering 1 ms."""
    import random

    rng = random.Random(seed)
    records = synthetic_records(400, seed=seed, device_id=device)
    for i, r in enumerate(records):
        _, set_name, ms = [p for p in plan if p[0] <= i][-1]
        guard(r, set_name, input_ms=round(ms * rng.lognormvariate(0, 0.08), 3), threat_ms=None, output_ms=1.0)
    return records


async def test_a_guardrail_that_doubles_its_cost_is_a_regression(aiohttp_client: Any, store: Any) -> None:
    client = await aiohttp_client(create_app(Settings(regression_interval_s=0.0), store))
    fleet = Fleet()
    doubled = overhead_series("orin-judge", 501, [(0, "judge", 40.0), (250, "judge", 80.0)])
    await fleet.send(client, store, "orin-judge", doubled)
    await fleet.send(client, store, "orin-flat", overhead_series("orin-flat", 502, [(0, "judge", 40.0)]))
    # another set from request 250 on (a workload guarded otherwise): not a step of the set's cost
    switched = overhead_series("orin-switch", 503, [(0, "rules", 2.0), (250, "judge", 60.0)])
    await fleet.send(client, store, "orin-switch", switched)

    body = await (await client.get("/api/v1/regressions")).json()
    guardrail = {r["device_id"]: r for r in body["regressions"] if r["metric"] == "guardrail_ms"}
    assert set(guardrail) == {"orin-judge"}, [r["summary"] for r in body["regressions"]]
    found = guardrail["orin-judge"]
    assert found["change"] == pytest.approx(1.0, abs=0.15)  # 41 → 81 ms: +~98 %
    assert found["evidence"]["guardrail_set"] == "judge" and found["requests_before"] == pytest.approx(250, abs=5)
    assert found["summary"].startswith("guardrail overhead +")
    assert "guardrail set judge unchanged" in found["summary"]
    # the guardrail's cost moved no other metric of the series, and nothing is found where nothing changed
    assert {r["metric"] for r in body["regressions"] if r["device_id"] == "orin-judge"} == {"guardrail_ms"}
    assert not [r for r in body["regressions"] + body["improvements"] if r["device_id"] in ("orin-flat", "orin-switch")]
    # an open regression of the device: its health says so, and the trigger's regression condition takes the metric
    row = {d["device_id"]: d for d in (await (await client.get("/api/v1/fleet")).json())["devices"]}["orin-judge"]
    assert any("guardrail overhead +" in line for line in row["regressions"])
