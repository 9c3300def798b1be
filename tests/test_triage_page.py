"""The fleet page at fleet size, in headless Chromium: 120 devices through the real ingest, a few of them in trouble
(silent, failing, failing a little, a firing trigger on a series with long engine settings, a critical trigger, a
hostile device whose six series all fire, a regression). On a 1400 × 900 screen every problem device is above the
fold below the Regressions and Triggers boxes (folded to one line each, their lines worst first, at most two a
device) and the healthy ones are one line; the table fits its box; the health column sorts critical first on its
first click; at 400 px nothing scrolls sideways and the first problem card is on the first screen; the header
counts are the API's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import struct
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.synthetic import synthetic_records
from aggregator.app import Settings, _row, create_app, evaluate_triggers, refresh_regressions
from aggregator.store import SQLiteStore
from lens_core import wire

from .test_aggregator import auth, make_batch
from .test_fleet_page import SCREENSHOTS, chromium, console_errors, running
from .test_regressions import slower_from
from .test_triggers import triggers_from
from .trigger_fleet import S4, fail, set_ttft

DEVICES = 120
SILENT, FAILING, FLAKY, TRIGGERED = "edge-007", "edge-031", "edge-058", "edge-090"
STALLED, HOSTILE, REGRESSED = "edge-045", "edge-075", "edge-012"
PROBLEMS = {SILENT, FAILING, FLAKY, TRIGGERED, STALLED, HOSTILE, REGRESSED}
RECORDS = 30  # per device, a minute apart, the latest five minutes ago
HOSTILE_SERIES = 6  # the hostile device's engine settings: each series' trigger holds (and is a health reason)
REGRESSED_RECORDS, REGRESSED_FROM = 400, 250  # decoding 1.78 × slower from its 250th request: TPOT and tok/s

TRIGGERS_TOML = """
[[triggers]]
name = "slow-first-token"
condition = "p95_latency_above"
metric = "ttft"
threshold = 800
window = "2h"
cooldown = "30m"

[[triggers]]
name = "first-token-stalls"
condition = "p95_latency_above"
metric = "ttft"
threshold = 3000
window = "2h"
cooldown = "30m"
severity = "critical"
"""


def device_records(n: int, now: float) -> list[dict[str, Any]]:
    device = f"edge-{n:03d}"
    count = {HOSTILE: 12 * HOSTILE_SERIES, REGRESSED: REGRESSED_RECORDS}.get(device, RECORDS)
    records = synthetic_records(count, seed=700 + n, device_id=device)
    if device == REGRESSED:
        slower_from(records, REGRESSED_FROM, 1.78)
    spacing = 30 if device == REGRESSED else 60
    for i, r in enumerate(records):
        when = now - 300 - (count - 1 - i) * spacing
        r["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + ".000000Z"
        if device != REGRESSED:
            r["itl_ms"] = r["itl_ms"] if n % 10 == 0 else []  # the page reads no gaps: most devices send none
        r["ext"] = {"settings": dict(S4)}  # the trigger's series: a long settings key in its summary
        if device == HOSTILE:  # six series, a quarter of each one's requests slow: six warnings firing
            r["ext"] = {"settings": {**S4, "n_batch": 64 * (1 + i % HOSTILE_SERIES)}}
            if (i // HOSTILE_SERIES) % 4 == 3:
                set_ttft(r, 1500.0)
        if device == STALLED and i % 5 == 4:  # over both triggers' thresholds: a critical and a warning firing
            set_ttft(r, 5000.0)
        if device == FAILING and i % 3 == 2:  # a third failed: critical
            fail(r)
        if device == FLAKY and i in (3, 11, 19, 27):  # 4 of 30 failed (13 %): warning
            fail(r)
        if device == TRIGGERED and i % 5 == 4:  # a fifth of its requests wait 1.5 s for the first token: p95 > 800 ms
            set_ttft(r, 1500.0)
    return records


@contextlib.contextmanager
def fleet_server(tmp_path: Path, routes: tuple[web.RouteDef, ...] = ()) -> Iterator[tuple[str, dict[str, str]]]:
    """A real aggregator on a real port with the 120-device fleet stored and the triggers evaluated once: (URL,
    device tokens)."""
    store = SQLiteStore(tmp_path / "agg.db")
    now = time.time()
    triggers = triggers_from(tmp_path, TRIGGERS_TOML)
    app = create_app(Settings(trigger_interval_s=3600.0, regression_interval_s=3600.0), store, triggers=triggers)
    app.router.add_routes(routes)
    tokens: dict[str, str] = {}
    with running(app) as (port, loop):

        async def fill() -> None:
            import aiohttp

            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
                for n in range(DEVICES):
                    device, records = f"edge-{n:03d}", device_records(n, now)
                    tokens[device] = token = store.add_token(device, "device", int(now * 1e6))
                    if device == SILENT:  # its batch arrived two days ago (the store's own ingest, with that time)
                        rows = [_row(wire.to_wire(r), "cbor", wire.encode_record(r, "cbor")) for r in records]
                        store.ingest(device, "old", 0, {"pending_records": 0}, rows, int((now - 2 * 86400) * 1e6))
                        continue
                    body = make_batch(records, device=device, counters={"pending_records": 0})
                    async with session.post("/api/v1/ingest", data=body, headers=auth(token)) as response:
                        assert response.status == 200, await response.text()
            await evaluate_triggers(app)
            await refresh_regressions(app, force=True)

        asyncio.run_coroutine_threadsafe(fill(), loop).result(180)
        yield f"http://127.0.0.1:{port}", tokens


# A test page holding the fleet page in frames of a phone's and a desk's size; once each has loaded, it writes what
# the frame shows (layout figures, every device row's place, the header) as JSON. Its load event (after the frames'
# and a slow image's) is when chromium --dump-dom writes it.
MEASURE = """<!doctype html><html><body>
<iframe id="desk" width="1400" height="900" style="border:0" src="/"></iframe>
<iframe id="phone" width="400" height="900" style="border:0" src="/"></iframe>
<iframe id="all" width="1400" height="900" style="border:0" src="/?layout=table"></iframe>
<iframe id="click" width="1400" height="900" style="border:0" src="/?layout=table&sort=device_id"></iframe>
<iframe id="unfold" width="400" height="900" style="border:0" src="/"></iframe>
<iframe id="open" width="1400" height="900" style="border:0" src="/"></iframe>
<pre id="out"></pre>
<script>
const seen = {};
function look(doc) {
  const el = doc.documentElement;
  const rows = [...doc.querySelectorAll("#devices tbody tr[id]")].map(tr => {
    const box = tr.getBoundingClientRect();
    return [tr.id.slice(7), Math.round(box.top), Math.round(box.bottom), box.height > 0];
  });
  const boxes = {};
  for (const name of ["regressions", "triggers"]) {
    const box = doc.getElementById(name), rect = box.getBoundingClientRect();
    boxes[name] = { hidden: box.hidden, open: box.open, top: Math.round(rect.top), bottom: Math.round(rect.bottom),
      head: box.querySelector("summary").textContent,
      lines: [...box.querySelectorAll("li")].map(li => [li.textContent, li.className]) };
  }
  const table = doc.getElementById("devices");  // the least width its columns need (cut texts cut, headers wrapped)
  table.style.width = "min-content";
  const natural = Math.round(table.getBoundingClientRect().width);
  table.style.width = "";
  return { boxes, natural, rows, scrollWidth: el.scrollWidth, clientWidth: el.clientWidth,
    scrollHeight: el.scrollHeight,
    height: Math.round(doc.querySelector(".scroll").getBoundingClientRect().bottom),  // where the table ends
    tableWidth: doc.querySelector(".scroll").scrollWidth, boxWidth: doc.querySelector(".scroll").clientWidth,
    summary: doc.getElementById("summary").textContent, fold: doc.getElementById("fold-button").textContent,
    folded: Number(doc.body.dataset.folded),
    wide: [...doc.querySelectorAll("body *")].filter(e => e.getBoundingClientRect().right > el.clientWidth + 1)
      .map(e => e.tagName + "#" + e.id + "." + e.className).slice(0, 5),
    headers: [...doc.querySelectorAll("#devices th")].map(th => [th.dataset.key, th.textContent, th.title,
      Math.round(th.getBoundingClientRect().width)]) };
}
for (const id of ["desk", "phone", "all", "click", "unfold", "open"])
 document.getElementById(id).addEventListener("load", (e) => {
  const frame = e.target, doc = frame.contentDocument;
  if (id === "click") {  // one click on the health column of a table sorted by device id
    doc.querySelector('th[data-key="health_rank"]').click();
    seen.click = { order: [...doc.querySelectorAll("#devices tbody tr[id]")].map(tr => tr.id.slice(7)),
      address: frame.contentWindow.location.search };
  } else if (id === "unfold") {  // the fold's line clicked on a phone: every healthy device, one line each
    doc.getElementById("fold-button").click();
    seen.unfold = { ...look(doc), address: frame.contentWindow.location.search };
  } else if (id === "open") {  // both boxes opened: their lines
    doc.querySelectorAll(".boxes summary").forEach(s => s.click());
    seen.open = look(doc);
  } else seen[id] = look(doc);
  document.getElementById("out").textContent = JSON.stringify(seen);
});
</script><img src="/slow-image"></body></html>"""


async def _measure(request: web.Request) -> web.Response:
    return web.Response(text=MEASURE, content_type="text/html")


async def _slow_image(request: web.Request) -> web.Response:  # holds a test page's load event for ?s= seconds
    await asyncio.sleep(float(request.query.get("s", "1.5")))
    return web.Response(body=b"", content_type="image/gif")


def measured(url: str) -> dict[str, Any]:
    dom = chromium("--dump-dom", url + "/measure")
    assert console_errors(dom.stderr) == [], dom.stderr[-2000:]
    found = re.search(r'<pre id="out">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stdout[-2000:]
    text = found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
    seen: dict[str, Any] = json.loads(text)
    assert set(seen) == {"desk", "phone", "all", "click", "unfold", "open"}, seen.keys()
    return seen


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    routes = (web.get("/measure", _measure), web.get("/slow-image", _slow_image))
    with fleet_server(tmp_path_factory.mktemp("triage"), routes) as (url, _):
        yield url


def test_the_api_has_the_planted_problems(fleet: str) -> None:
    rows = {d["device_id"]: d for d in get(fleet + "/api/v1/fleet")["devices"]}
    assert len(rows) == DEVICES
    assert rows[SILENT]["health"] == "critical" and rows[SILENT]["sync_health"] == "silent"
    assert rows[FAILING]["health"] == "critical" and rows[FLAKY]["health"] == "warning", rows[FLAKY]["health_reasons"]
    assert [t["trigger"] for t in rows[TRIGGERED]["triggers"]] == ["slow-first-token"]
    assert rows[TRIGGERED]["triggers"][0]["state"] == "firing" and rows[TRIGGERED]["trigger_count"] == 1
    stalled = {t["trigger"]: t for t in rows[STALLED]["triggers"]}
    assert set(stalled) == {"slow-first-token", "first-token-stalls"} and rows[STALLED]["health"] == "critical"
    stalls = stalled["first-token-stalls"]
    assert stalls["severity"] == "critical" and stalls["state"] == "firing", stalls
    hostile = rows[HOSTILE]
    assert hostile["trigger_count"] == HOSTILE_SERIES and hostile["health"] == "warning", hostile["triggers"]
    assert len(hostile["health_reasons"]) >= HOSTILE_SERIES and min(map(len, hostile["health_reasons"])) > 150
    assert rows[REGRESSED]["regressions_open"] == 2 and rows[REGRESSED]["health"] == "warning", rows[REGRESSED]
    assert {d for d, r in rows.items() if r["health"] != "ok" or r["trigger_count"]} == PROBLEMS


def test_one_screen_shows_every_problem_and_folds_the_healthy(fleet: str) -> None:
    seen = measured(fleet)
    desk = seen["desk"]
    shown = [r for r in desk["rows"] if r[3]]
    # the problems, worst first (critical by their number of reasons, then warning)
    assert {r[0] for r in shown[:3]} == {STALLED, SILENT, FAILING}, shown
    # all above the fold, below both boxes: each folded to one line (its counts and its worst line), side by side
    assert {r[0] for r in shown} == PROBLEMS and all(r[2] <= 900 for r in shown), shown
    regressions, triggers = desk["boxes"]["regressions"], desk["boxes"]["triggers"]
    assert not regressions["hidden"] and not triggers["hidden"] and not regressions["open"] and not triggers["open"]
    for box in (regressions, triggers):
        assert box["bottom"] - box["top"] < 50 and box["bottom"] < min(r[1] for r in shown), (box, shown)
    assert regressions["head"].startswith("Regressions 2 open on 1 device — worst: TPOT +"), regressions["head"]
    assert triggers["head"].startswith("Triggers 9 firing on 3 devices (1 critical) — worst: first-token-stalls: ")
    assert max(r[2] - r[1] for r in shown) < 90, shown  # six long trigger reasons: two lines and "+N more"
    print(f"\nproblem rows at 1400 × 900: {shown[0][1]}–{shown[-1][2]} px (boxes folded: {triggers['bottom']} px)")
    assert desk["folded"] == DEVICES - len(PROBLEMS) and desk["fold"] == "113 devices healthy — show"
    assert len(desk["rows"]) == DEVICES  # the healthy rows are there, folded
    assert desk["scrollHeight"] <= 900, desk["scrollHeight"]  # one screen
    assert desk["scrollWidth"] <= desk["clientWidth"], desk["wide"]
    assert desk["tableWidth"] <= desk["boxWidth"], (desk["tableWidth"], desk["boxWidth"])  # every column, no scroll
    # opened, the boxes list their lines worst first, at most two a device: the hostile device's six firing series
    # cannot push the critical trigger or another device's line out
    opened = seen["open"]
    assert opened["boxes"]["regressions"]["open"] and opened["boxes"]["triggers"]["open"]
    lines = opened["boxes"]["triggers"]["lines"]
    assert lines[0][1] == "critical" and lines[0][0].startswith("first-token-stalls: ") and STALLED in lines[0][0]
    assert [line for line, _ in lines].count(f"+{HOSTILE_SERIES - 2} more on {HOSTILE}") == 1, lines
    assert sum(f" on {HOSTILE}," in line for line, _ in lines) == 2, lines
    assert any(f" on {TRIGGERED}," in line for line, _ in lines), lines
    changes = [line for line, _ in opened["boxes"]["regressions"]["lines"]]
    assert changes[0].startswith("TPOT +"), changes
    sizes = [abs(int(re.findall(r"([+-]\d+) %", c)[0])) for c in changes]
    assert len(changes) == 2 and sizes == sorted(sizes, reverse=True), changes
    # the page has a scrollbar now (the boxes opened): the table still fits its box
    assert opened["tableWidth"] <= opened["boxWidth"] < 1352, (opened["tableWidth"], opened["boxWidth"])
    assert desk["natural"] <= opened["boxWidth"], (desk["natural"], opened["boxWidth"])  # what its columns need
    print(f"the table needs {desk['natural']} px of its box's {opened['boxWidth']}–{desk['boxWidth']} px")
    every = seen["all"]["height"]  # the same devices as one table, each in full
    assert desk["height"] < 900 < 3 * desk["height"] < every, (desk["height"], every)
    print(f"\nfleet page, {DEVICES} devices at 1400 × 900: {desk['height']} px tall (triage), {every} px (one table)")
    # the phone: the same rows as cards, nothing wider than the screen
    phone = seen["phone"]
    assert phone["scrollWidth"] <= phone["clientWidth"] and phone["clientWidth"] >= 380, phone[
        "wide"
    ]  # a scrollbar at most
    assert phone["tableWidth"] <= phone["boxWidth"], (phone["tableWidth"], phone["boxWidth"])
    assert {r[0] for r in phone["rows"] if r[3]} == PROBLEMS
    first = min(r[1] for r in phone["rows"] if r[3])  # the first problem card: on the first screen, below the boxes
    assert first <= 900 and phone["boxes"]["triggers"]["bottom"] <= first, (first, phone["boxes"])
    print(f"phone (400 × 900): the first problem card starts at {first} px")
    # unfolded on a phone (the choice kept in the address): every device shown, problems first, still no sideways scroll
    unfold = seen["unfold"]
    assert unfold["address"] == "?healthy=show" and unfold["fold"] == "113 devices healthy — fold"
    assert all(r[3] for r in unfold["rows"]) and {r[0] for r in unfold["rows"][: len(PROBLEMS)]} == PROBLEMS
    assert unfold["scrollWidth"] <= unfold["clientWidth"], unfold["wide"]
    start = len(PROBLEMS) + 1
    dense = (unfold["rows"][-1][2] - unfold["rows"][start][1]) / (DEVICES - start)  # a healthy device's line, in px
    assert dense < 40, dense
    # the column headers say their statistic
    headers = {key: (label, title) for key, label, title, _ in desk["headers"]}
    assert headers["ttft_p95_ms"][0] == "TTFT p95 (ms)" and "exact" in headers["ttft_p95_ms"][1]
    assert headers["tokens_per_second"][0] == "median tok/s" and headers["tokens_per_second"][1].startswith("median")
    assert headers["j_per_output_token"][0] == "mean J/token" and headers["j_per_output_token"][1].startswith("mean")
    assert "worst first" in headers["health_rank"][1]


def test_the_health_column_sorts_critical_first_on_one_click(fleet: str) -> None:
    click = measured(fleet)["click"]
    assert click["address"] == "?layout=table&sort=health_rank&desc=1", click["address"]
    rows = {d["device_id"]: d for d in get(fleet + "/api/v1/fleet")["devices"]}
    states = [rows[d]["health"] for d in click["order"]]
    # the silent, the failing and the stalled device are critical; the flaky one, the ones whose warning triggers
    # hold and the regressed one are warnings, the hostile one (six reasons) first
    assert states[:7] == ["critical"] * 3 + ["warning"] * 4 and set(states[7:]) == {"ok"}, states[:8]
    assert click["order"][3] == HOSTILE and set(click["order"][3:7]) == {FLAKY, TRIGGERED, HOSTILE, REGRESSED}
    assert click["order"][7:] == sorted(click["order"][7:])  # equals by their device id


def test_the_header_counts_are_the_apis(fleet: str) -> None:
    rows = get(fleet + "/api/v1/fleet")["devices"]
    summary = measured(fleet)["desk"]["summary"]
    critical = sum(r["health"] == "critical" for r in rows)
    warning = sum(r["health"] == "warning" for r in rows)
    firing = sum(t["state"] == "firing" for r in rows for t in r["triggers"])
    regressions = sum(r.get("regressions_open", len(r["regressions"])) for r in rows)
    late = sum(r["sync_health"] != "ok" for r in rows)
    expected = (
        f"{DEVICES} devices, {critical} critical, {warning} warning; {late} not seen in the last 1 hour; "
        f"{firing} trigger{'s' if firing != 1 else ''} firing; {regressions} open regression"
    )
    assert summary.startswith(expected), (summary, expected)
    # a warning trigger that holds makes its device a warning, a critical one critical
    assert (critical, warning, firing, late, regressions) == (3, 4, 1 + 2 + HOSTILE_SERIES, 1, 2)


def test_screenshots_at_a_desk_and_on_a_phone(fleet: str) -> None:
    with tempfile.TemporaryDirectory() as shots:
        for width in (1400, 400):
            shot = Path(shots) / f"triage-{width}.png"
            run = chromium(f"--window-size={width},900", f"--screenshot={shot}", fleet + "/")
            assert shot.exists(), run.stderr[-2000:]
            assert png_size(shot) == (width, 900) and shot.stat().st_size > 20_000, (png_size(shot), shot.stat())
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            (SCREENSHOTS / f"triage-{width}.png").write_bytes(shot.read_bytes())


# The triage view open while batches arrive: what the page shows, copied every 100 ms (as tests/test_fleet_page.py's
# watcher does): the folded count, the visible rows and the records of the device the batches come from.
WATCHER = """<!doctype html><html><body>
<iframe id="fleet" width="1400" height="900" src="/"></iframe><pre id="seen"></pre>
<script>
setInterval(() => {
  const page = document.getElementById("fleet").contentDocument, row = page && page.getElementById("device-LIVE");
  if (row) document.getElementById("seen").textContent = JSON.stringify({ folded: Number(page.body.dataset.folded),
    visible: [...page.querySelectorAll("#devices tbody tr[id]")].filter(tr => tr.getBoundingClientRect().height > 0)
      .map(tr => tr.id.slice(7)), records: Number(row.cells[14].textContent), group: row.parentElement.id });
}, 100);
</script><img src="/slow-image?s=6"></body></html>"""
LIVE = "edge-100"


async def _watcher(request: web.Request) -> web.Response:
    return web.Response(text=WATCHER.replace("LIVE", LIVE), content_type="text/html")


def test_live_updates_keep_the_fold_and_bring_a_new_problem_up(tmp_path: Path) -> None:
    """A healthy device starts failing while the page is open: its new rows come over the stream, it leaves the fold
    for the problems (visible, above the fold) and the other healthy devices stay folded."""
    routes = (web.get("/watch", _watcher), web.get("/slow-image", _slow_image))
    with fleet_server(tmp_path, routes) as (url, tokens):
        stop = threading.Event()

        def send() -> None:  # failing batches of one healthy device, from 1.5 s after the page opened
            seed, now = 900, time.time()
            if stop.wait(1.5):
                return
            while not stop.wait(0.5):
                records = synthetic_records(10, seed=seed, device_id=LIVE)
                for i, r in enumerate(records):
                    r["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - 60 + i)) + ".000000Z"
                    fail(r)
                request = urllib.request.Request(
                    url + "/api/v1/ingest", data=make_batch(records, device=LIVE), headers=auth(tokens[LIVE])
                )
                with urllib.request.urlopen(request, timeout=30) as response:
                    assert response.status == 200
                seed += 1

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            dom = chromium("--dump-dom", url + "/watch")
        finally:
            stop.set()
            sender.join()
    assert console_errors(dom.stderr) == [], dom.stderr[-2000:]
    found = re.search(r'<pre id="seen">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stdout[-2000:]
    seen = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert seen["records"] > RECORDS and seen["group"] == "problems", seen  # live, and out of the fold
    assert set(seen["visible"]) == PROBLEMS | {LIVE} and seen["folded"] == DEVICES - len(PROBLEMS) - 1, seen
