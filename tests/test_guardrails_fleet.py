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
    # the latest 50: 36 pii served (input 1..40 minus the 4 failed, +2 output), 10 strict served (20 ms)
    overheads = sorted([i + 1 + 2.0 for i in range(40) if not 10 <= i < 14] + [20.0] * 10)
    assert one["guardrail_requests"] == 46 and one["guardrail_sets"] == ["pii", "strict"]
    assert one["guardrail_overhead_p50_ms"] == (overheads[22] + overheads[23]) / 2
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
    display: getComputedStyle(table).display, texts: cells.map(c => c.textContent), titles: cells.map(c => c.title),
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
        # laptop-3, orin-017 (no guardrails: "–"), then the guarded device: median overhead · median impact
        assert desk["texts"][:2] == ["–", "–"] and re.fullmatch(r"\d+\.\d · \d+\.\d %", desk["texts"][2]), desk
        assert "guardrail set pii, strict" in desk["titles"][2] and "6 blocked" in desk["titles"][2]
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
