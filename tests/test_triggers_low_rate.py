"""Triggers at low request rates (issue 32, docs/triggers.md): a fleet of devices that each run about 10 requests an
hour, as the agent's default workload does.

What was measured before: a p95 over ~10 requests is the second-largest request, so one ×5 outlier fired a p95
trigger on six healthy devices; one failed request left a ×3-slow device under ``min_samples`` for an hour; the
shipped error-rate trigger could never be judged at this rate, and ``lens-aggregator triggers`` said "all clear"
(exit 0). Here, through real ingest on both stores: the outliers do not fire and the ×3 device does (its failure
widens the window, said in the answer); burn-rate conditions fire on fast and slow burns only; the command's exit
statuses; scopes by device class (from device facts), model and strategy; the device's health and page show what
holds; the shipped configuration is judged at 10 requests an hour; bad keys are refused naming table and key.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app, evaluate_triggers
from aggregator.config import load_aggregator_config
from aggregator.triggers import (
    DEFAULT_BURN_WINDOWS,
    MAX_WINDOW_ROWS,
    Sample,
    Trigger,
    TriggerWatch,
    judge,
    lower_bound_rank,
)
from lens_core.errors import ConfigError

from .processes import open_store
from .test_aggregator import auth, make_batch
from .test_device_page import facts_record
from .test_triggers import holding, run_cli, table, triggers_from
from .trigger_fleet import MODEL_A, MODEL_B, Clock, fail, set_ttft

ROOT = Path(__file__).resolve().parents[1]
P95_5S = {"condition": "p95_latency_above", "metric": "ttft", "threshold": 5000}
PER_HOUR = 10
HOURS = 6
SPACING_S = 3600 / PER_HOUR
THRESHOLD_MS = 200.0  # the p95 TTFT the triggers below hold against; healthy requests take 80-119 ms
OUTLIERS = [f"edge-{n:02d}" for n in range(6)]  # one ×5 request each, within the last hour
SLOW = "edge-slow"  # every request ×3, one of them failed within the last hour
QUIET = "edge-quiet"  # healthy, its requests go to the cloud
CLASSES = {**dict.fromkeys(OUTLIERS[:3], "jetson-orin"), **dict.fromkeys([*OUTLIERS[3:], SLOW, QUIET], "rpi-5")}

LOW_RATE_TOML = f"""
[fleet]
trigger_interval = "1h"

[[triggers]]
name = "slow-ttft"
condition = "p95_latency_above"
metric = "ttft"
threshold = {THRESHOLD_MS:g}
window = "1h"
min_samples = 10
cooldown = "1h"

[[triggers]]
name = "slow-ttft-critical"
condition = "p95_latency_above"
metric = "ttft"
threshold = {THRESHOLD_MS:g}
window = "1h"
min_samples = 10
severity = "critical"
device_class = "rpi-5"
strategy = "local"
"""


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, tz=timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def device_records(device: str, now: float, seed: int) -> list[dict[str, Any]]:
    """``HOURS`` of one device's requests, 10 an hour, the latest 2 minutes before ``now``; TTFT 80-119 ms."""
    n = PER_HOUR * HOURS
    # the synthetic records' own 1 % failures left out: this fleet plants its own
    records = [r for r in synthetic_records(2 * n, seed=seed, device_id=device) if r["ok"]][:n]
    for i, r in enumerate(records):
        r["started_at"] = _iso(now - 120 - (n - 1 - i) * SPACING_S)
        r["model_name"] = MODEL_B if device == OUTLIERS[5] else MODEL_A
        r["strategy"] = "cloud" if device == QUIET else "local"
        set_ttft(r, 80.0 + (i * 37) % 40)
    if device in OUTLIERS:
        last = records[-3]  # within the last hour
        set_ttft(last, 5 * last["ttft_ms"])
    if device == SLOW:
        for r in records:
            set_ttft(r, 3 * r["ttft_ms"])
        fail(records[-4])  # one failed request within the last hour: 9 successful ones there
    return records


def fleet(now: float) -> dict[str, list[dict[str, Any]]]:
    return {device: device_records(device, now, 700 + n) for n, device in enumerate([*OUTLIERS, SLOW, QUIET])}


async def ingest(client: Any, store: Any, now: float, devices: dict[str, list[dict[str, Any]]]) -> None:
    """Each device's records and its device facts (its class) through ``POST /api/v1/ingest``."""
    for device, records in devices.items():
        token = store.add_token(device, "device", int(now * 1e6))
        when = datetime.fromtimestamp(now - HOURS * 3600, tz=timezone.utc)
        facts = facts_record(device, when, device_class=CLASSES[device])
        for start in range(0, len(records), 25):
            batch = records[start : start + 25] + ([facts] if start == 0 else [])
            response = await client.post("/api/v1/ingest", data=make_batch(batch, device=device), headers=auth(token))
            assert response.status == 200, await response.text()


# -- the percentile rule ----------------------------------------------------------------------------------------------
def test_the_lower_bound_rank_is_the_binomial_order_statistic() -> None:
    # P(Binomial(10, 0.95) >= 8) = 0.988, >= 9: 0.914: with 10 requests the bound is the 8th (the 9th and 10th are
    # what the inclusive p95 interpolates between: one outlier among ten is the p95)
    assert lower_bound_rank(10, 0.95) == 8
    assert lower_bound_rank(20, 0.95) == 17 and lower_bound_rank(60, 0.99) == 58
    assert lower_bound_rank(1, 0.99) == 1  # one request is below the p99 with probability 0.99
    assert lower_bound_rank(4, 0.5) == 0  # P(all 4 above the median) = 1/16 > 5 %: no bound of the median yet
    exact, approx = lower_bound_rank(1000, 0.95), lower_bound_rank(1001, 0.95)
    assert abs(exact - approx) <= 2  # the normal approximation beyond 1,000 values agrees


def test_one_outlier_among_ten_does_not_hold_a_x3_device_does() -> None:
    rule = Trigger("p95", "p95_latency_above", THRESHOLD_MS, 3600.0, 3600.0, 10, "ttft")
    t0 = 1_796_000_000_000_000
    normal = [Sample("d", "m", None, t0 + i, True, ttft_ms=80.0 + (i * 37) % 40) for i in range(10)]
    outlier = [*normal[:9], normal[9]._replace(ttft_ms=500.0)]
    judged = judge(rule, outlier)
    assert judged.value is not None and judged.value > THRESHOLD_MS  # the point p95 is the outlier's side...
    assert judged.holds is False and judged.bound is not None and judged.bound < 120  # ...its lower bound is not
    slow = [s._replace(ttft_ms=3 * (s.ttft_ms or 0)) for s in normal]
    assert judge(rule, slow).holds is True and (judge(rule, slow).bound or 0) > THRESHOLD_MS


# -- the fleet through real ingest -------------------------------------------------------------------------------------
async def test_outliers_do_not_fire_the_x3_device_does_and_its_failure_widens(aiohttp_client: Any, store: Any) -> None:
    clock = Clock(time.time())
    triggers = [t for t in triggers_from_toml(LOW_RATE_TOML) if t.name == "slow-ttft"]
    client = await aiohttp_client(
        create_app(Settings(trigger_interval_s=3600.0), store, triggers=triggers, clock=clock)
    )
    await ingest(client, store, clock.now, fleet(clock.now))
    await evaluate_triggers(client.app)
    answer = await (await client.get("/api/v1/triggers")).json()
    states = {s["device_id"]: s for s in answer["triggers"][0]["series"]}
    assert set(states) == {*OUTLIERS, SLOW, QUIET}
    assert holding(answer) == {"slow-ttft": {(SLOW, MODEL_A, None)}}
    for device in OUTLIERS:  # each judged over its last hour's 10 requests, the point p95 above the threshold
        s = states[device]
        assert s["state"] == "ok" and s["samples"] == 10 and s["judged_window_s"] == 3600, s
        assert s["value"] > THRESHOLD_MS > s["bound"], s
    slow = states[SLOW]
    assert slow["state"] == "firing" and slow["judged_window_s"] == 7200 and slow["samples"] == 19, slow
    assert slow["note"] == "judged over the last 2 h: 1 h held 9" and slow["bound"] > THRESHOLD_MS
    assert "19 requests in 2 h (judged over the last 2 h: 1 h held 9)" in slow["summary"]
    assert answer["status"] == "firing"


def triggers_from_toml(toml: str) -> list[Trigger]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return triggers_from(Path(tmp), toml)


async def test_health_and_the_device_page_show_what_holds(aiohttp_client: Any, store: Any) -> None:
    clock = Clock(time.time())
    triggers = triggers_from_toml(LOW_RATE_TOML)
    client = await aiohttp_client(
        create_app(Settings(trigger_interval_s=3600.0), store, triggers=triggers, clock=clock)
    )
    await ingest(client, store, clock.now, fleet(clock.now))
    await evaluate_triggers(client.app)
    rows = {r["device_id"]: r for r in (await (await client.get("/api/v1/fleet")).json())["devices"]}
    slow = rows[SLOW]
    assert slow["trigger_count"] == 2 and {t["severity"] for t in slow["triggers"]} == {"warning", "critical"}
    assert slow["health"] == "critical"  # slow-ttft-critical says severity = "critical"
    reasons = [r for r in slow["health_reasons"] if r.startswith("trigger ")]
    assert [r.split(":", 1)[0] for r in reasons] == ["trigger slow-ttft-critical", "trigger slow-ttft"]
    assert all(
        rows[d]["trigger_count"] == 0 and not any("trigger" in r for r in rows[d]["health_reasons"]) for d in OUTLIERS
    )
    page = await (await client.get(f"/device/{SLOW}")).text()
    data = json.loads(page.split("const initial = ", 1)[1].split(";\n", 1)[0])
    mine = {t["name"]: [s["state"] for s in t["series"]] for t in data["triggers"]["triggers"]}
    assert (
        mine == {"slow-ttft": ["firing"], "slow-ttft-critical": ["firing"]} and data["triggers"]["status"] == "firing"
    )
    assert data["device"]["health"] == "critical" and 'id="trigger-list"' in page


async def test_the_api_filters_name_what_they_do_not_know_and_never_say_all_clear_about_nothing(
    aiohttp_client: Any, store: Any
) -> None:
    """?trigger= of no configured trigger and ?device= of no known device are 404s naming the parameter (a typo is
    not "ok"); a device an unscoped trigger saw nothing of is insufficient_data; the fires listed are those of the
    filter."""
    clock = Clock(time.time())
    toml = LOW_RATE_TOML + table(name="any-failure", condition="consecutive_failures", threshold=1, window="15m")
    client = await aiohttp_client(
        create_app(Settings(trigger_interval_s=3600.0), store, triggers=triggers_from_toml(toml), clock=clock)
    )
    await ingest(client, store, clock.now, fleet(clock.now))
    gone = "edge-gone"  # stopped sending 9 hours ago: nothing in any trigger's widest window
    token = store.add_token(gone, "device", int(clock.now * 1e6))
    old = device_records(gone, clock.now - 9 * 3600, 777)
    response = await client.post("/api/v1/ingest", data=make_batch(old, device=gone), headers=auth(token))
    assert response.status == 200, await response.text()
    await evaluate_triggers(client.app)
    for query, parameter in (("trigger=slow-tfft", "trigger"), ("device=edge-sloww", "device")):
        response = await client.get(f"/api/v1/triggers?{query}")
        body = await response.json()
        assert response.status == 404 and body["parameter"] == parameter, body
    everything = await (await client.get("/api/v1/triggers")).json()
    assert everything["status"] == "firing" and {f["device_id"] for f in everything["fires"]} == {SLOW}
    silent = await (await client.get(f"/api/v1/triggers?device={gone}")).json()
    # the unscoped triggers saw none of its requests: not judged, so not "ok"
    assert silent["status"] == "insufficient_data" and silent["fires"] == [], silent["status"]
    quiet = await (await client.get(f"/api/v1/triggers?device={QUIET}")).json()
    # out of slow-ttft-critical's scope (strategy local), judged by the others: ok
    assert quiet["status"] == "ok" and quiet["fires"] == [], quiet["status"]
    one = await (await client.get(f"/api/v1/triggers?device={SLOW}&trigger=slow-ttft")).json()
    assert one["status"] == "firing" and {(f["device_id"], f["trigger"]) for f in one["fires"]} == {(SLOW, "slow-ttft")}


async def test_one_device_holding_many_series_cannot_fill_the_listed_ones(aiohttp_client: Any, store: Any) -> None:
    """A device (its token stolen) makes 30 series of its own hold a critical trigger, under a device id that sorts
    first; the API's bounded lists (server.max_read_series) still show the genuine device's holding series: each
    device's first series comes before any device's second."""
    clock = Clock(time.time())
    toml = table(name="failing", condition="consecutive_failures", threshold=2, window="1h", severity="critical")
    settings = Settings(trigger_interval_s=3600.0, max_read_series=10)
    client = await aiohttp_client(create_app(settings, store, triggers=triggers_from_toml(toml), clock=clock))
    devices = {"aaa-evil": 30, "orin-003": 1}
    for device, series in devices.items():
        token = store.add_token(device, "device", int(clock.now * 1e6))
        records = synthetic_records(3 * series, seed=41, device_id=device)
        for i, r in enumerate(records):
            fail(r)
            r["model_name"] = f"model-{i // 3}"
            r["started_at"] = _iso(clock.now - 600 + i)
        response = await client.post("/api/v1/ingest", data=make_batch(records, device=device), headers=auth(token))
        assert response.status == 200, await response.text()
    await evaluate_triggers(client.app)
    answer = await (await client.get("/api/v1/triggers")).json()
    assert answer["status"] == "firing" and answer["truncated"]["holding"]["more"] == 31 - 10
    assert {s["device_id"] for s in answer["holding"]} == set(devices), answer["holding"]
    listed = answer["triggers"][0]["series"]
    assert len(listed) == 10 and "orin-003" in {s["device_id"] for s in listed}


def test_the_device_page_renders_the_trigger_states_in_a_browser(tmp_path: Path) -> None:
    """Headless Chromium draws the device page's trigger section: each trigger's state on the device's series."""
    from aiohttp import ClientSession

    from aggregator.store import SQLiteStore

    from .test_fleet_page import chromium, console_errors, running

    clock = Clock(time.time())
    store = SQLiteStore(tmp_path / "agg.db")
    app = create_app(
        Settings(trigger_interval_s=3600.0), store, triggers=triggers_from(tmp_path, LOW_RATE_TOML), clock=clock
    )
    with running(app) as (port, loop):

        async def fill() -> None:
            async with ClientSession(f"http://127.0.0.1:{port}") as session:

                class Client:
                    post = session.post

                await ingest(Client(), store, clock.now, fleet(clock.now))
                await evaluate_triggers(app)

        asyncio.run_coroutine_threadsafe(fill(), loop).result(60)
        slow = chromium("--dump-dom", f"http://127.0.0.1:{port}/device/{SLOW}")
        quiet = chromium("--dump-dom", f"http://127.0.0.1:{port}/device/{QUIET}")
    assert console_errors(slow.stderr) == [] and console_errors(quiet.stderr) == [], slow.stderr[-2000:]
    box = slow.stdout.split('id="trigger-list">', 1)[1].split("</ul>", 1)[0]
    assert box.count("<li") == 2 and box.count('class="state">firing</span>') == 2, box
    assert 'class="trigger firing critical"' in box and "judged over the last 2 h: 1 h held 9" in box
    assert 'id="triggers" hidden' not in slow.stdout and "a condition holds" in slow.stdout
    # the cloud device is outside the critical trigger's strategy scope: it says so; its slow-ttft is ok
    quiet_box = quiet.stdout.split('id="trigger-list">', 1)[1].split("</ul>", 1)[0]
    assert 'class="state">ok</span>' in quiet_box and "slow-ttft-critical: no request of this device" in quiet_box


# -- scopes -----------------------------------------------------------------------------------------------------------
async def test_scopes_by_device_class_model_and_strategy(aiohttp_client: Any, store: Any) -> None:
    clock = Clock(time.time())
    everything = {"condition": "p95_latency_above", "metric": "ttft", "threshold": 10, "window": "6h"}
    toml = "".join(
        table(name=name, **everything, **scope)
        for name, scope in (
            ("all", {}),
            ("orin", {"device_class": "jetson-orin"}),
            ("qwen", {"model": MODEL_B}),
            ("cloud", {"strategy": ["cloud", "offload"]}),
            ("orin-or-rpi-local", {"device_class": ["jetson-orin", "rpi-5"], "strategy": "local", "model": MODEL_A}),
            ("nobody", {"device_class": "x86-server"}),
        )
    )
    triggers = triggers_from_toml(toml)
    client = await aiohttp_client(
        create_app(Settings(trigger_interval_s=3600.0), store, triggers=triggers, clock=clock)
    )
    await ingest(client, store, clock.now, fleet(clock.now))
    watch = await evaluate_triggers(client.app)
    devices = {name: {s[0] for s in series} for name, series in holding(watch.answer()).items()}
    assert devices["all"] == {*OUTLIERS, SLOW, QUIET}  # every device is above 10 ms: the scopes decide
    assert devices["orin"] == set(OUTLIERS[:3])
    assert devices["qwen"] == {OUTLIERS[5]}
    assert devices["cloud"] == {QUIET}
    assert devices["orin-or-rpi-local"] == {*OUTLIERS[:5], SLOW}
    assert "nobody" not in devices
    answer = watch.answer(trigger="nobody")
    assert answer["triggers"][0]["series"] == [] and answer["triggers"][0]["scope"] == {"device_class": ["x86-server"]}
    assert answer["status"] == "insufficient_data"  # nothing in scope: not "all clear"


# -- burn rates -------------------------------------------------------------------------------------------------------
def burn_samples(now_us: int, failed_ages_min: list[float], hours: float = 6.0) -> list[Sample]:
    """10 requests an hour over ``hours`` up to a minute before now; those ``failed_ages_min`` minutes old failed."""
    n = int(PER_HOUR * hours)
    out = []
    failed = {round(age / 6) for age in failed_ages_min}
    for k in range(n):  # k: 6-minute steps back from now − 1 min
        started = now_us - int((60 + k * SPACING_S) * 1e6)
        out.append(Sample("d", "m", None, started, k not in failed, e2e_ms=None if k in failed else 900.0))
    return sorted(out, key=lambda s: s.started_us)


def test_burn_rate_fast_and_slow_windows_at_10_requests_an_hour() -> None:
    rule = Trigger(
        "budget", "error_budget_burn", 0.0, 6 * 3600.0, 7200.0, 5, objective=0.99, windows=DEFAULT_BURN_WINDOWS
    )
    now = 1_796_000_000_000_000
    # one failure in six hours: 10 % of the last hour (10×), below the fast 14.4×: not burning
    one = judge(rule, burn_samples(now, [3]), now_us=now)
    assert one.holds is False and one.note is not None and "above 14.4×: no" in one.note
    # two failures in the last hour, one among the latest 5 requests: 20× over 1 h and 20× over the latest 5 (the 5
    # minutes hold none at this rate): a fast burn
    fast = judge(rule, burn_samples(now, [3, 40]), now_us=now)
    assert fast.holds is True and "1 h: 2 of 10 bad (20×), latest 5: 1 of 5 (20×), above 14.4×: yes" in (
        fast.note or ""
    )
    assert (fast.value, fast.samples, fast.window_s) == (pytest.approx(20.0), 10, 3600.0)  # the fast pair's figures
    # two failures in the last hour, but none among the latest 5: the burn stopped: not holding
    stopped = judge(rule, burn_samples(now, [40, 50]), now_us=now)
    assert stopped.holds is False
    # five failures over six hours (8.3 % of 60: 8.3×, above 6×) and one in the last 30 minutes: a slow burn
    slow = judge(rule, burn_samples(now, [10, 100, 170, 250, 330]), now_us=now)
    assert slow.holds is True and "6 h: 5 of 60 bad (8.33×), 30 min: 1 of 5 (20×), above 6×: yes" in (slow.note or "")
    assert "1 h: 1 of 10 bad (10×)" in (slow.note or "") and "above 14.4×: no" in (slow.note or "")
    assert (slow.value, slow.samples, slow.window_s) == (pytest.approx(25 / 3), 60, 6 * 3600.0)
    # too few requests for any long window: insufficient data, naming why
    few = judge(rule, burn_samples(now, [], hours=0.4), now_us=now)
    assert few.holds is None and few.note == "1 h: 4 requests, 5 needed; 6 h: 4 requests, 5 needed"


def test_sla_budget_counts_failures_and_slow_requests() -> None:
    rule = Trigger(
        "sla",
        "sla_budget_burn",
        1000.0,
        6 * 3600.0,
        7200.0,
        5,
        metric="e2e",
        objective=0.9,
        windows=((3600.0, 300.0, 2.0),),
    )
    now = 1_796_000_000_000_000
    samples = burn_samples(now, [3], hours=1.0)  # 1 failed of 10: 10 % bad, 1× the 10 % budget
    assert judge(rule, samples, now_us=now).holds is False
    slow = [s._replace(e2e_ms=1500.0) if i in (8, 7) else s for i, s in enumerate(samples)]  # 2 above the SLA
    out = judge(rule, slow, now_us=now)
    assert out.holds is True and out.note == "1 h: 3 of 10 bad (3×), latest 5: 3 of 5 (6×), above 2×: yes"


# -- the command's exit statuses and the shipped configuration --------------------------------------------------------
async def test_exit_statuses_of_the_triggers_command(
    aiohttp_client: Any, db: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = open_store(db)
    client = await aiohttp_client(create_app(Settings(), store))
    await ingest(client, store, time.time(), fleet(time.time()))
    args = ("--db", str(db))
    cases = {
        "holds.toml": (LOW_RATE_TOML, 1),
        "ok.toml": (table(name="fine", **P95_5S, window="1h"), 0),
        # the 1 h holds 10 requests a device (9 successful on the slow one), 20 needed, no widening allowed: exit 3
        "blind.toml": (table(name="b", **P95_5S, window="1h", max_window="1h", min_samples=20), 3),
        # nothing in scope: not judged anywhere, exit 3
        "empty.toml": (table(name="e", condition="consecutive_failures", threshold=3, device_class="x86"), 3),
        "bad.toml": (table(name="x", condition="error_budget_burn", objective=1.5), 2),
    }
    for name, (toml, expected) in cases.items():
        path = tmp_path / name
        path.write_text(toml)
        code, out, err = run_cli("triggers", "--config", str(path), *args, capsys=capsys)
        assert code == expected, (name, code, out, err)
        if expected == 3:
            assert "insufficient data:" in err and "exit 3" in err, err
        if expected == 2:
            assert "triggers[0].objective" in err and "Traceback" not in err
    code, out, _ = run_cli("triggers", "--config", str(tmp_path / "blind.toml"), *args, "--json", capsys=capsys)
    answer = json.loads(out)
    assert code == 3 and answer["status"] == "insufficient_data"
    assert {s["state"] for s in answer["triggers"][0]["series"]} == {"insufficient_data"}
    notes = {s["device_id"]: s["note"] for s in answer["triggers"][0]["series"]}
    assert notes[SLOW] == "9 successful requests with TTFT in the last 1 h; 20 needed"
    assert notes[QUIET] == "10 successful requests with TTFT in the last 1 h; 20 needed"
    store.close()


async def test_a_device_flooding_the_window_does_not_hide_the_others(
    aiohttp_client: Any, db: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One device (its token stolen) sends more requests into the last hour than one device's read holds, claiming a
    device class: every other device is still read whole, so the ×3-slow device still holds its trigger (exit 1,
    not an all clear), and the answer names the flooding device as the one whose read was cut."""
    store = open_store(db)
    client = await aiohttp_client(create_app(Settings(), store))
    now = time.time()
    await ingest(client, store, now, fleet(now))
    flooder = "edge-flood"
    token = store.add_token(flooder, "device", int(now * 1e6))
    facts = facts_record(flooder, datetime.fromtimestamp(now - 1800, tz=timezone.utc), device_class="rpi-5")
    n = MAX_WINDOW_ROWS + 500
    flood = synthetic_records(n, seed=99, device_id=flooder)
    for i, r in enumerate(flood):
        r["started_at"] = _iso(now - 1800 + i * (1500 / n))  # all within the last half hour
        r["model_name"], r["strategy"] = MODEL_A, "local"
    for start in range(0, n, 9_000):
        batch = flood[start : start + 9_000] + ([facts] if start == 0 else [])
        response = await client.post("/api/v1/ingest", data=make_batch(batch, device=flooder), headers=auth(token))
        assert response.status == 200, await response.text()
    path = tmp_path / "low.toml"
    path.write_text(LOW_RATE_TOML)
    code, out, err = run_cli("triggers", "--config", str(path), "--db", str(db), "--json", capsys=capsys)
    answer = json.loads(out)
    assert code == 1 and answer["status"] != "ok", (code, answer["status"])
    held = {(s["device_id"], t["name"]) for t in answer["triggers"] for s in t["series"] if s["state"] == "firing"}
    assert {(SLOW, "slow-ttft"), (SLOW, "slow-ttft-critical")} <= held, held
    rows = answer["rows"]
    assert rows["truncated"] and rows["truncated_devices"] == [flooder] and rows["per"] == "device"
    assert rows["read"] >= MAX_WINDOW_ROWS + 8 * 30  # the flood's cut read, and the 8 others' 4 hours (widest)
    code, _, err = run_cli("triggers", "--config", str(path), "--db", str(db), capsys=capsys)
    assert code == 1 and f"of {flooder}: only the latest {MAX_WINDOW_ROWS} requests" in err, err
    store.close()


async def test_the_shipped_triggers_judge_a_device_at_10_requests_an_hour(
    aiohttp_client: Any, db: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """configs/aggregator.toml, as the user runs it (``lens-aggregator triggers --config configs/aggregator.toml
    --db …``), judges every shipped trigger on every series of a 10-request-an-hour fleet: exit 0, none
    insufficient; then a device whose requests start failing makes the error budget and the failing run hold."""
    store = open_store(db)
    client = await aiohttp_client(create_app(Settings(), store))
    now = time.time()
    devices = {d: r for d, r in fleet(now).items() if d in (QUIET, OUTLIERS[0], OUTLIERS[5])}
    await ingest(client, store, now, devices)
    config = str(ROOT / "configs" / "aggregator.toml")
    code, out, err = run_cli("triggers", "--config", config, "--db", str(db), "--json", capsys=capsys)
    answer = json.loads(out)
    assert code == 0, (out[-3000:], err)
    shipped = {t["name"]: t for t in answer["triggers"]}
    assert set(shipped) == {"requests-failing", "error-budget", "slow-first-token", "slower-decoding"}
    for name, t in shipped.items():
        assert {s["device_id"] for s in t["series"]} == set(devices), name
        assert {s["state"] for s in t["series"]} == {"ok"}, (name, [s["summary"] for s in t["series"]])
    first = shipped["slow-first-token"]["series"][0]
    assert first["judged_window_s"] == 7200 and first["samples"] == 20  # 1 h held 10: widened to 2 h
    assert first["note"] == "judged over the last 2 h: 1 h held 10"
    # the cloud endpoint goes down: 6 more requests, the latest, all fail
    broken = fleet(now)[QUIET][-6:]
    for k, r in enumerate(broken):
        fail(r)
        r["id"] = r["id"][:-4] + "beef"
        r["started_at"] = _iso(now - 100 + k * 10)
    token = store.add_token(QUIET, "device", int(now * 1e6))
    response = await client.post("/api/v1/ingest", data=make_batch(broken, device=QUIET), headers=auth(token))
    assert response.status == 200 and (await response.json())["duplicates"] == 0
    code, out, err = run_cli("triggers", "--config", config, "--db", str(db), "--json", capsys=capsys)
    answer = json.loads(out)
    assert code == 1, err
    assert {(s["trigger"], s["device_id"]) for s in answer["holding"]} == {
        ("requests-failing", QUIET),
        ("error-budget", QUIET),
    }
    store.close()


def test_the_shipped_triggers_with_a_watch_and_no_requests(tmp_path: Path) -> None:
    """Before any request, every shipped trigger is insufficient data (no series), never "all clear"."""
    config = load_aggregator_config(ROOT / "configs" / "aggregator.toml", environ={})
    watch = TriggerWatch(config.tables["triggers"])
    assert watch.status() == "insufficient_data"


# -- bad keys ---------------------------------------------------------------------------------------------------------
P95 = {"name": "a", "condition": "p95_latency_above", "metric": "ttft", "threshold": 800}
BURN = {"name": "b", "condition": "error_budget_burn", "objective": 0.99}


@pytest.mark.parametrize(
    ("keys", "where", "allowed"),
    [
        ({**P95, "severity": "loud"}, "triggers[0].severity", "warning or critical"),
        ({**P95, "device_class": 5}, "triggers[0].device_class", "a device class"),
        ({**P95, "model": []}, "triggers[0].model", "a list of 1 to 32"),
        ({**P95, "strategy": ["local", ""]}, "triggers[0].strategy", "1 to 256 characters"),
        ({**P95, "window": "2h", "max_window": "1h"}, "triggers[0].max_window", "at least window (2 h)"),
        ({**P95, "max_window": "200h"}, "triggers[0].max_window", "at most 7 d"),
        ({**P95, "objective": 0.99}, "triggers[0].objective", "objective only with error_budget_burn"),
        ({**P95, "scope": "x"}, "triggers[0].scope", "a key of [[triggers]]"),
        ({**BURN, "objective": 1}, "triggers[0].objective", "between 0 and 1"),
        ({**BURN, "objective": True}, "triggers[0].objective", "between 0 and 1"),
        ({**BURN, "threshold": 0.1}, "triggers[0].threshold", "no threshold for error_budget_burn"),
        ({**BURN, "window": "1h"}, "triggers[0].window", "windows = [[long, short, factor]"),
        ({**BURN, "windows": [["5m", "1h", 14.4]]}, "triggers[0].windows", "short below long"),
        ({**BURN, "windows": [["1h", "5m", 0]]}, "triggers[0].windows", "a burn-rate factor > 0"),
        ({**BURN, "windows": [["1h", "5m"]]}, "triggers[0].windows", "[long, short, factor] triples"),
        ({**BURN, "windows": []}, "triggers[0].windows", "1 to 6"),
        ({"name": "b", "condition": "error_budget_burn"}, "triggers[0]", "triggers[0].objective to be set"),
        ({**BURN, "condition": "sla_budget_burn", "metric": "e2e"}, "triggers[0]", "triggers[0].threshold to be set"),
    ],
)
def test_bad_keys_are_refused_naming_table_and_key(
    tmp_path: Path, keys: dict[str, Any], where: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        triggers_from(tmp_path, table(**keys))
    message = str(raised.value)
    assert f"{where} = " in message and allowed in message, message


def test_the_new_keys_read_as_written(tmp_path: Path) -> None:
    (burn, scoped) = triggers_from(
        tmp_path,
        table(**BURN, windows=[["2h", "10m", 10], ["24h", "2h", 3]], min_samples=8, severity="critical")
        + table(**P95, device_class=["jetson-orin", "rpi-5"], model="m", strategy="local", max_window="3h"),
    )
    assert burn.windows == ((7200.0, 600.0, 10.0), (86400.0, 7200.0, 3.0)) and burn.window_s == 86400.0
    assert (burn.objective, burn.min_samples, burn.severity) == (0.99, 8, "critical")
    assert burn.describe().startswith("error budget of a 99 % objective burning: 2 h and 10 min above 10×; 1 d and 2 h")
    assert scoped.scope() == {"device_class": ["jetson-orin", "rpi-5"], "model": ["m"], "strategy": ["local"]}
    assert scoped.max_window_s == 3 * 3600.0 and scoped.widest_s == 3 * 3600.0
    assert "device_class jetson-orin | rpi-5, model m, strategy local" in scoped.describe()
