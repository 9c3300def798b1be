"""Triggers (issue 17, docs/triggers.md): conditions per device × model × engine settings with windows and cooldowns.

The conditions on crafted requests (each at its threshold, below, above, and with too few requests); the
``[[triggers]]`` tables checked at load; then a fleet with planted conditions (tests/trigger_fleet.py) through
real ingest on both stores, where each condition fires on exactly its planted series — in the API, in /metrics,
on the fleet page — then cools down and fires again once the cooldown is over (the clock moved); the fires kept
across a restart and between two replicas; hostile stored rows; the background evaluation outliving a failure;
``lens-aggregator triggers``; the alerting rule with promtool."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator import regressions
from aggregator.app import TRIGGERS, Settings, create_app, evaluate_triggers
from aggregator.config import load_aggregator_config
from aggregator.store import SQLiteStore
from aggregator.triggers import (
    META_KEY,
    REGRESSION_METRICS,
    Sample,
    Trigger,
    TriggerWatch,
    evaluate,
    judge,
)
from lens_core.errors import ConfigError

from .test_shipped_configs import deb_installs
from .trigger_fleet import KEY_S1, KEY_S4, MODEL_A, PLANTED, TRIGGERS_TOML, Clock, ingest_fleet

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_796_000_000.0  # 2026-11-30: the crafted requests' clock


def triggers_from(tmp_path: Path, toml: str) -> list[Trigger]:
    path = tmp_path / "aggregator.toml"
    path.write_text(toml)
    triggers: list[Trigger] = load_aggregator_config(path, environ={}).tables["triggers"]
    return triggers


def trigger(condition: str, threshold: float = 0.0, **kw: Any) -> Trigger:
    values: dict[str, Any] = {"window_s": 900.0, "cooldown_s": 3600.0, "min_samples": 3, **kw}
    return Trigger(name=condition, condition=condition, threshold=threshold, **values)


def requests(n: int, *, ok: bool = True, **figures: Any) -> list[Sample]:
    return [
        Sample("d", "m", "n_threads=2", int((T0 - 300 + i) * 1e6), ok, **({} if not ok else figures)) for i in range(n)
    ]


# -- the conditions ---------------------------------------------------------------------------------------------------
def test_each_condition_holds_above_its_threshold_only() -> None:
    ttfts = [Sample("d", "m", None, int(T0 * 1e6) + i, True, ttft_ms=float(v)) for i, v in enumerate(range(1, 101))]
    # the percentiles: the value is the exact one (inclusive method, between the 95th and 96th values); the
    # condition holds when the lower 95 % confidence bound (here the 91st of 100 order statistics) is above
    p95 = judge(trigger("p95_latency_above", 90.0, metric="ttft"), ttfts)
    assert p95[:4] == (True, pytest.approx(95.05), 100, 91.0)
    assert judge(trigger("p95_latency_above", 91.0, metric="ttft"), ttfts).holds is False  # strictly above
    assert judge(trigger("p95_latency_above", 95.0, metric="ttft"), ttfts).holds is False  # the value is not enough
    assert judge(trigger("p99_latency_above", 96.0, metric="ttft"), ttfts)[:4] == (
        True,
        pytest.approx(99.01),
        100,
        97.0,
    )
    assert judge(trigger("mean_latency_above", 50.5, metric="ttft"), ttfts)[:3] == (False, 50.5, 100)
    assert judge(trigger("mean_latency_above", 50.4, metric="ttft"), ttfts).holds is True
    # a latency condition reads the successful requests' metric only, and needs min_samples of them
    mixed = requests(2, tpot_ms=50.0) + requests(5, ok=False)
    assert judge(trigger("mean_latency_above", 10.0, metric="tpot"), mixed)[:3] == (None, None, 2)
    assert judge(trigger("mean_latency_above", 10.0, metric="tpot", min_samples=2), mixed)[:3] == (True, 50.0, 2)

    rates = requests(4, tokens_per_second=20.0) + requests(3, tokens_per_second=50.0)
    assert judge(trigger("tokens_per_second_below", 25.0), rates)[:3] == (True, 20.0, 7)  # the median
    assert judge(trigger("tokens_per_second_below", 20.0), rates).holds is False

    errors = requests(6) + requests(2, ok=False) + requests(2)
    assert judge(trigger("error_rate_above", 0.2), errors)[:3] == (False, 0.2, 10)
    assert judge(trigger("error_rate_above", 0.19), errors)[:3] == (True, 0.2, 10)
    # consecutive failures: the latest requests in start order, a success ends the run
    assert judge(trigger("consecutive_failures", 2.0), errors)[:3] == (False, 0.0, 10)
    tail = requests(3) + requests(4, ok=False)
    tail = [s._replace(started_us=int(T0 * 1e6) + i) for i, s in enumerate(tail)]
    assert judge(trigger("consecutive_failures", 4.0), tail)[:3] == (True, 4.0, 7)
    assert judge(trigger("consecutive_failures", 5.0), tail).holds is False
    # evaluate hands judge each series in start order, whatever order the store returned
    (shuffled,) = evaluate([trigger("consecutive_failures", 4.0)], list(reversed(tail)), int(T0 * 1e6) + 10)
    assert shuffled.outcome[:3] == (True, 4.0, 7)

    memory = requests(3, rss_peak_mib=300.0) + requests(1, rss_peak_mib=1100.0) + requests(2)
    assert judge(trigger("memory_above", 1024.0), memory)[:3] == (
        True,
        1100.0,
        4,
    )  # requests without a peak: not counted
    assert judge(trigger("memory_above", 1100.0), memory).holds is False
    energy = requests(3, j_per_token=0.2) + requests(1, j_per_token=0.6) + requests(3)
    assert judge(trigger("energy_per_token_above", 0.29), energy)[:3] == (True, pytest.approx(0.3), 4)
    assert judge(trigger("energy_per_token_above", 0.31), energy).holds is False

    sla = requests(5, e2e_ms=900.0) + requests(3, e2e_ms=1500.0) + requests(2, ok=False)
    # a failed request counts, as one that missed the SLA (3 above it + 2 failed of 10)
    assert judge(trigger("sla_violations", 1000.0, metric="e2e", max_violations=5), sla)[:3] == (False, 5.0, 10)
    assert judge(trigger("sla_violations", 1000.0, metric="e2e", max_violations=4), sla)[:3] == (True, 5.0, 10)
    assert judge(trigger("sla_violations", 1500.0, metric="e2e", max_violations=2), sla).holds is False

    assert judge(trigger("regression", metric="tpot_ms"), requests(3), 0.4)[:3] == (True, 0.4, 3)
    assert judge(trigger("regression", 0.5, metric="tpot_ms"), requests(3), 0.4).holds is False
    assert judge(trigger("regression", metric="tpot_ms"), requests(3), None)[:3] == (False, None, 3)
    assert judge(trigger("regression", metric="tpot_ms"), requests(2), 0.4).holds is None


def test_the_window_and_the_series() -> None:
    """Only requests that started within [now − window, now] count, per device × model × settings; a regression
    counts for the settings the device × model runs now."""
    now_us = int(T0 * 1e6)
    t = trigger("mean_latency_above", 100.0, metric="ttft", window_s=60.0, min_samples=1)
    inside = Sample("d", "m", "n_threads=2", now_us - 59_000_000, True, ttft_ms=50.0)
    before = inside._replace(started_us=now_us - 61_000_000, ttft_ms=5000.0)
    future = inside._replace(started_us=now_us + 1_000_000, ttft_ms=5000.0)
    other = inside._replace(settings="n_threads=4", ttft_ms=500.0)
    found = {(e.series, e.outcome.holds) for e in evaluate([t], [inside, before, future, other], now_us)}
    assert found == {(("d", "m", "n_threads=2"), False), (("d", "m", "n_threads=4"), True)}

    r = trigger("regression", metric="tpot_ms", min_samples=1)
    regression = [{"kind": "regression", "device_id": "d", "model_name": "m", "metric": "tpot_ms", "change": 0.5}]
    latest = other._replace(started_us=now_us - 1_000_000)
    states = {e.series[2]: e.outcome.holds for e in evaluate([r], [inside, latest], now_us, regressions=regression)}
    assert states == {"n_threads=4": True, "n_threads=2": False}
    improvement = [{**regression[0], "kind": "improvement"}]
    assert not any(e.outcome.holds for e in evaluate([r], [latest], now_us, regressions=improvement))


def test_the_regression_metrics_are_the_watchs() -> None:
    assert regressions.METRICS == REGRESSION_METRICS


# -- configuration ----------------------------------------------------------------------------------------------------
def test_a_trigger_table_and_its_defaults(tmp_path: Path) -> None:
    one, two, three = triggers_from(
        tmp_path,
        """
[[triggers]]
name = "slow-first-token"
condition = "p95_latency_above"
metric = "ttft"
threshold = 800
[[triggers]]
name = "failing"
condition = "consecutive_failures"
threshold = 3
cooldown = 0
[[triggers]]
name = "sla"
condition = "sla_violations"
metric = "e2e"
threshold = 2000
max_violations = 5
window = "2h"
min_samples = 30
""",
    )
    assert one == Trigger(
        "slow-first-token", "p95_latency_above", 800.0, 900.0, 3600.0, 10, "ttft", None, max_window_s=3600.0
    )  # widened up to 4 × the window by default
    assert (two.min_samples, two.cooldown_s, two.metric) == (3, 0.0, None)  # N failures: N requests by default
    assert (three.window_s, three.max_violations, three.min_samples) == (7200.0, 5, 30)
    assert one.describe() == (
        "p95 TTFT above 800 ms (its lower 95 % confidence bound) over 15 min "
        "(at least 10 requests, widened up to 1 h), cooldown 1 h"
    )
    assert one.severity == "warning" and one.scope() == {}
    nothing = load_aggregator_config(None, environ={}, default_path=tmp_path / "absent.toml")
    assert nothing.tables["triggers"] == []  # no file, no [[triggers]]: none


def table(**keys: Any) -> str:
    """One [[triggers]] table (JSON strings and numbers are TOML too)."""
    return "[[triggers]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())


P95 = {"name": "a", "condition": "p95_latency_above", "metric": "ttft"}
ERR = {"name": "a", "condition": "error_rate_above"}
MEM = {"name": "a", "condition": "memory_above", "threshold": 1024}
SLA = {"name": "a", "condition": "sla_violations", "metric": "e2e", "threshold": 900}
BAD = [
    (table(**P95, threshold=0), "triggers[0].threshold", "greater than 0"),
    (table(name="a", condition="p95_above", threshold=1), "triggers[0].condition", "p95_latency_above"),
    (table(name="a", condition=["p95_latency_above"], threshold=1), "triggers[0].condition", "one of"),
    (table(**{**P95, "metric": 5}, threshold=1), "triggers[0].metric", "ttft, tpot, e2e"),
    (table(**P95, threshold=True), "triggers[0].threshold", "a number"),
    (table(name="a", condition="p95_latency_above", threshold=1), "triggers[0].metric to be set", "ttft, tpot, e2e"),
    (table(**{**P95, "metric": "ttfb"}, threshold=1), "triggers[0].metric", "ttft, tpot, e2e"),
    (table(**ERR, metric="ttft", threshold=0.1), "triggers[0].metric", "remove the key"),
    (table(**ERR, threshold=1.5), "triggers[0].threshold", "from 0"),
    (table(**ERR, threshold=1), "triggers[0].threshold", "cannot be above 1"),
    (table(**ERR, threshold="10%"), "triggers[0].threshold", "a number"),
    (table(**ERR), "triggers[0].threshold to be set", "fraction"),
    (table(name="a", condition="consecutive_failures", threshold=2.5), "triggers[0].threshold", "an integer"),
    (
        table(name="a", condition="consecutive_failures", threshold=5, min_samples=3),
        "triggers[0].min_samples",
        "at least threshold",
    ),
    (table(**MEM, window="fortnight"), "triggers[0].window", "a duration"),
    (table(**MEM, window="400h"), "triggers[0].window", "at most 7 d"),
    (table(**MEM, cooldown=-1), "triggers[0].cooldown", "or 0"),
    (table(**MEM, min_samples=0), "triggers[0].min_samples", "an integer between 1"),
    (table(**MEM, max_violations=2), "triggers[0].max_violations", "only with condition sla_violations"),
    (table(**SLA), "triggers[0].max_violations to be set", "how many"),
    (table(**SLA, max_violations=-1), "triggers[0].max_violations", "an integer between 0"),
    (table(name="a", condition="regression", metric="ttft"), "triggers[0].metric", "ttft_ms, tpot_ms"),
    (table(**MEM, thresold=2), "triggers[0].thresold", "a key of [[triggers]]"),
    (table(condition="memory_above", threshold=1), "triggers[0].name to be set", "unique name"),
    (table(**{**MEM, "name": "has space"}), "triggers[0].name", "letters, digits"),
    (table(**MEM) + table(**MEM), "triggers[1].name", "triggers[0] is called so too"),
    ("triggers = 5", "triggers = 5", "an array of tables: [[triggers]]"),
]


@pytest.mark.parametrize(("toml", "key", "allowed"), BAD, ids=[f"{n}-{b[1]}" for n, b in enumerate(BAD)])
def test_bad_trigger_tables_say_which_key_and_what_is_allowed(
    tmp_path: Path, toml: str, key: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        triggers_from(tmp_path, toml)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'aggregator.toml'}: "), message
    assert key in message and allowed in message, message


def test_the_shipped_triggers() -> None:
    """configs/aggregator.toml ships triggers an operator keeps: failing requests, the error budget burning, a slow
    first token, slower decoding (tests/test_triggers_low_rate.py evaluates them at 10 requests an hour)."""
    config = load_aggregator_config(ROOT / "configs" / "aggregator.toml", environ={})
    shipped = {t.name: t for t in config.tables["triggers"]}
    assert set(shipped) == {"requests-failing", "error-budget", "slow-first-token", "slower-decoding"}
    assert shipped["requests-failing"].threshold == 5 and shipped["error-budget"].objective == 0.99
    assert shipped["slower-decoding"].condition == "regression" and config.get("fleet", "trigger_interval") == 60.0
    assert all(t.cooldown_s >= 3600 for t in shipped.values())


# -- a fleet with planted conditions ----------------------------------------------------------------------------------
async def fleet_app(aiohttp_client: Any, store: Any, triggers: list[Trigger], clock: Clock) -> Any:
    # metrics_max_age_s=0: each scrape builds /metrics afresh (the tests scrape right after each evaluation)
    settings = Settings(regression_interval_s=0.0, trigger_interval_s=3600.0, metrics_max_age_s=0.0)
    return await aiohttp_client(create_app(settings, store, triggers=triggers, clock=clock))


def holding(answer: dict[str, Any]) -> dict[str, set[tuple[str, str, str]]]:
    out: dict[str, set[tuple[str, str, str]]] = {}
    for s in answer["holding"]:
        out.setdefault(s["trigger"], set()).add((s["device_id"], s["model_name"], s["settings"]))
    return out


def scrape(text: str) -> tuple[set[tuple[str, str, str, str]], dict[str, float]]:
    firing, fires = set(), {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llm_latency_lens_trigger_firing":
                labels = sample.labels
                assert sample.value == 1
                firing.add((labels["trigger"], labels["device"], labels["model"], labels["settings"]))
            elif sample.name == "llm_latency_lens_trigger_fires_total":
                fires[sample.labels["trigger"]] = sample.value
    return firing, fires


async def test_each_planted_condition_fires_on_its_series_and_cools_down(
    aiohttp_client: Any, store: Any, tmp_path: Path
) -> None:
    clock = Clock(time.time())
    triggers = triggers_from(tmp_path, TRIGGERS_TOML)
    client = await fleet_app(aiohttp_client, store, triggers, clock)
    await ingest_fleet(client, store, clock.now)
    assert (await (await client.get("/api/v1/triggers")).json())["evaluated_at"] is None  # not yet: after 1 interval

    watch = await evaluate_triggers(client.app)
    answer = await (await client.get("/api/v1/triggers")).json()
    expected = {name: {series} for name, series in PLANTED.items()}
    assert holding(answer) == expected
    by_name = {t["name"]: t for t in answer["triggers"]}
    assert set(by_name) == set(PLANTED)
    for name, t in by_name.items():
        states = {(s["device_id"], s["model_name"], s["settings"]): s for s in t["series"]}
        assert states[PLANTED[name]]["state"] == "firing", (name, states[PLANTED[name]])
        assert sum(s["state"] == "firing" for s in states.values()) == 1, name
        assert all(s["state"] in ("ok", "insufficient_data") for k, s in states.items() if k != PLANTED[name])
    # the same device and model under other settings is its own series
    p95 = {s["settings"]: s for s in by_name["p95-ttft"]["series"] if s["device_id"] == "orin-002"}
    assert p95[KEY_S1]["value"] == pytest.approx(1500.0) and p95[KEY_S1]["samples"] >= 38
    assert p95[KEY_S4]["state"] == "ok" and p95[KEY_S4]["value"] < 200
    # values against thresholds, samples, windows
    firing = {s["trigger"]: s for s in answer["holding"]}
    assert firing["failing"]["value"] == 5 and firing["errors"]["value"] == pytest.approx(0.33, abs=0.03)
    assert firing["memory"]["value"] == pytest.approx(1536.0, abs=1) and firing["energy"]["value"] == 0.8
    assert firing["sla-ttft"]["value"] >= 30 and firing["sla-ttft"]["threshold"] == 25
    assert 15 < firing["slow-tokens"]["value"] < 30 and firing["mean-e2e"]["value"] > 1200
    assert firing["tpot-regression"]["value"] == pytest.approx(0.78, abs=0.1)
    assert all(s["window_s"] == 7200 and s["samples"] >= 10 for s in firing.values())
    energy = {s["device_id"]: s for s in by_name["energy"]["series"]}
    assert energy["orin-001"]["state"] == "ok" and energy["orin-002"]["state"] == "insufficient_data"
    summary = energy["orin-002"]["summary"]
    assert (
        "insufficient data (0 successful requests with energy in the last 8 h, widened from 2 h; 10 needed)" in summary
    )
    assert len(answer["fires"]) == len(PLANTED) and answer["rows"]["read"] == store.record_count()
    assert firing["p95-ttft"]["summary"].startswith(
        "p95-ttft: 1,500 ms, lower 95 % bound 1,500 ms (condition: p95 TTFT above 800 ms) on orin-002, "
        f"model {MODEL_A}, settings {KEY_S1}; "
        "40 requests in 2 h — firing"
    )

    # /metrics: 1 for each holding series, a fire counted per trigger
    metrics = (await (await client.get("/metrics")).read()).decode()
    gauges, fires = scrape(metrics)
    assert gauges == {(name, *series) for name, series in PLANTED.items()}
    assert fires == dict.fromkeys(PLANTED, 1.0)

    # the fleet page's data: each device row's holding triggers, and the page's Triggers box
    fleet = {d["device_id"]: d for d in (await (await client.get("/api/v1/fleet")).json())["devices"]}
    assert [t["trigger"] for t in fleet["orin-002"]["triggers"]] == ["p95-ttft"]
    assert fleet["orin-001"]["triggers"] == [] and fleet["orin-011"]["trigger_count"] == 1
    page = await (await client.get("/")).text()
    assert 'id="triggers"' in page and "states and recent fires" in page
    data = json.loads(page.split("const initial = ", 1)[1].split(";\n", 1)[0])
    rows = {d["device_id"]: d for d in data["devices"]}
    assert rows["orin-007"]["triggers"][0]["summary"] == firing["failing"]["summary"]

    # cooldown: 10 minutes later the conditions still hold, nothing fires again
    clock.advance(600)
    await evaluate_triggers(client.app)
    answer = await (await client.get("/api/v1/triggers")).json()
    assert holding(answer) == expected
    assert {s["state"] for s in answer["holding"]} == {"cooling_down"}
    assert all(" — cooling down until " in s["summary"] for s in answer["holding"])
    assert len(answer["fires"]) == len(PLANTED)
    assert scrape((await (await client.get("/metrics")).read()).decode()) == (
        gauges,
        dict.fromkeys(PLANTED, 1.0),
    )
    # 31 minutes after the first fire the cooldown (30 min) is over: each fires again
    clock.advance(21 * 60)
    await evaluate_triggers(client.app)
    answer = await (await client.get("/api/v1/triggers")).json()
    assert {s["state"] for s in answer["holding"]} == {"firing"}
    assert len(answer["fires"]) == 2 * len(PLANTED)
    assert answer["fires"][0]["fired_us"] == int(clock.now * 1e6) > answer["fires"][-1]["fired_us"]
    assert scrape((await (await client.get("/metrics")).read()).decode())[1] == dict.fromkeys(PLANTED, 2.0)
    assert watch is client.app[TRIGGERS]
    # two hours on, every request is out of the 2 h windows: the conditions are judged over the widened window
    # (4 h, up to max_window: 8 h by default), which says so; the regression (not widened) no longer holds
    clock.advance(2 * 3600)
    await evaluate_triggers(client.app)
    answer = await (await client.get("/api/v1/triggers")).json()
    widened = {s["trigger"]: s for s in answer["holding"]}
    assert set(widened) == set(PLANTED) - {"tpot-regression"}
    assert all(
        s["note"] == "judged over the last 4 h: 2 h held 0" and s["judged_window_s"] == 4 * 3600
        for s in widened.values()
    )
    assert "requests in 4 h (judged over the last 4 h: 2 h held 0)" in widened["p95-ttft"]["summary"]
    # six hours later, every request is out of the widest windows: nothing holds, the gauges go, the history stays
    clock.advance(6 * 3600)
    await evaluate_triggers(client.app)
    answer = await (await client.get("/api/v1/triggers")).json()
    assert answer["holding"] == [] and all(t["series"] == [] for t in answer["triggers"])
    assert len(answer["fires"]) == 3 * len(PLANTED) - 1  # the widened ones fired a third time (cooldown over)
    thrice = {**dict.fromkeys(PLANTED, 3.0), "tpot-regression": 2.0}
    assert scrape((await (await client.get("/metrics")).read()).decode()) == (set(), thrice)
    assert (await (await client.get("/api/v1/fleet")).json())["devices"][0]["triggers"] == []


async def test_fires_survive_a_restart_and_a_second_replica_does_not_fire_again(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    clock = Clock(time.time())
    triggers = [t for t in triggers_from(tmp_path, TRIGGERS_TOML) if t.name in ("failing", "p95-ttft")]
    db = tmp_path / "agg.db"
    store = SQLiteStore(db)
    first = await fleet_app(aiohttp_client, store, triggers, clock)
    await ingest_fleet(first, store, clock.now)
    await evaluate_triggers(first.app)
    fired = (await (await first.get("/api/v1/triggers")).json())["fires"]
    assert {f["trigger"] for f in fired} == {"failing", "p95-ttft"}
    kept = json.loads(store.get_meta(META_KEY) or "{}")
    assert len(kept["last"]) == 2 and len(kept["recent"]) == 2

    # a second replica on the same database, at the same time: the fires are the first one's
    replica = await fleet_app(aiohttp_client, SQLiteStore(db), triggers, clock)
    await evaluate_triggers(replica.app)
    answer = await (await replica.get("/api/v1/triggers")).json()
    assert {s["state"] for s in answer["holding"]} == {"cooling_down"} and len(answer["holding"]) == 2
    assert [f["fired_us"] for f in answer["fires"]] == [f["fired_us"] for f in fired]

    # a restart (10 minutes later): the history shows at once, and nothing fires inside the cooldown
    await first.close()
    await replica.close()
    clock.advance(600)
    again = SQLiteStore(db)
    restarted = await fleet_app(aiohttp_client, again, triggers, clock)
    deadline = time.monotonic() + 5
    while not (answer := await (await restarted.get("/api/v1/triggers")).json())["fires"]:
        assert time.monotonic() < deadline, "the kept fires were not loaded at start"
        await asyncio.sleep(0.02)
    assert answer["fires"] == fired and answer["evaluated_at"] is None
    await evaluate_triggers(restarted.app)
    answer = await (await restarted.get("/api/v1/triggers")).json()
    assert {s["state"] for s in answer["holding"]} == {"cooling_down"} and len(answer["fires"]) == 2
    # past the cooldown it fires again, and the store keeps only what still suppresses a fire
    clock.advance(30 * 60)
    await evaluate_triggers(restarted.app)
    answer = await (await restarted.get("/api/v1/triggers")).json()
    assert {s["state"] for s in answer["holding"]} == {"firing"} and len(answer["fires"]) == 4
    kept = json.loads(again.get_meta(META_KEY) or "{}")
    assert {entry[4] for entry in kept["last"]} == {int(clock.now * 1e6)} and len(kept["recent"]) == 4
    # a trigger taken out of the configuration: its last fires are dropped at the next write
    clock.advance(31 * 60)
    alone = TriggerWatch([t for t in triggers if t.name == "failing"], clock=clock)
    alone.load(again)
    assert [s.trigger.name for s in alone.evaluate(again).fires] == ["failing"]
    kept = json.loads(again.get_meta(META_KEY) or "{}")
    assert [entry[0] for entry in kept["last"]] == ["failing"] and len(kept["recent"]) == 5


async def test_hostile_stored_rows_do_not_break_the_evaluation(aiohttp_client: Any, tmp_path: Path) -> None:
    """A body that does not decode, settings values that are not keys, a column of the wrong type and unreadable
    kept fires: the rows are skipped or read as unknown settings, counted, and every other series is judged."""
    clock = Clock(time.time())
    triggers = [t for t in triggers_from(tmp_path, TRIGGERS_TOML) if t.name in ("memory", "p95-ttft", "failing")]
    store = SQLiteStore(tmp_path / "agg.db")
    client = await fleet_app(aiohttp_client, store, triggers, clock)
    await ingest_fleet(client, store, clock.now)
    db = sqlite3.connect(tmp_path / "agg.db", isolation_level=None)
    seqs = [r[0] for r in db.execute("SELECT seq FROM measurements WHERE device_id = 'orin-008' ORDER BY seq")]
    db.execute("UPDATE measurements SET body = x'ff00ff' WHERE seq = ?", (seqs[0],))
    db.execute("UPDATE measurements SET settings = 'n_threads=four,<b>x</b>' WHERE seq = ?", (seqs[1],))
    db.execute("UPDATE measurements SET settings = 42, ttft_us = 'slow' WHERE seq = ?", (seqs[2],))
    db.execute("UPDATE measurements SET ok = 'maybe' WHERE seq = ?", (seqs[3],))
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (META_KEY, '{"v": 1, "last": [[1]]'))
    await evaluate_triggers(client.app)
    answer = await (await client.get("/api/v1/triggers")).json()
    assert holding(answer)["memory"] == {PLANTED["memory"]} and holding(answer)["failing"] == {PLANTED["failing"]}
    assert answer["rows"]["undecodable_bodies"] == 1 and answer["rows"]["skipped"] == 2  # ok unreadable: both reads
    assert answer["rows"]["unreadable_settings"] == 4  # two rows, read by the column and the body pass
    unknown = [s for t in answer["triggers"] for s in t["series"] if s["device_id"] == "orin-008" and not s["settings"]]
    assert unknown and all(s["state"] == "insufficient_data" for s in unknown)
    assert json.loads(store.get_meta(META_KEY) or "{}")["v"] == 1  # replaced by the fires of this evaluation
    metrics = (await (await client.get("/metrics")).read()).decode()
    assert "llm_latency_lens_read_undecodable_rows_total" in metrics


async def test_the_background_evaluation_outlives_a_failing_store(aiohttp_client: Any, tmp_path: Path) -> None:
    clock = Clock(time.time())
    triggers = [t for t in triggers_from(tmp_path, TRIGGERS_TOML) if t.name == "failing"]
    store = SQLiteStore(tmp_path / "agg.db")
    settings = Settings(trigger_interval_s=0.05)
    client = await aiohttp_client(create_app(settings, store, triggers=triggers, clock=clock))
    await ingest_fleet(client, store, clock.now)
    watch = client.app[TRIGGERS]
    db = sqlite3.connect(tmp_path / "agg.db", isolation_level=None)
    db.execute("ALTER TABLE measurements RENAME TO measurements_away")

    async def until(check: Any) -> None:
        deadline = time.monotonic() + 10
        while not check():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)

    await until(lambda: watch.failures >= 2)
    assert (await client.get("/api/v1/health")).status == 200
    metrics = (await (await client.get("/metrics")).read()).decode()
    assert 'llm_latency_lens_trigger_evaluation_failures_total{reason="error"}' in metrics
    db.execute("ALTER TABLE measurements_away RENAME TO measurements")
    await until(lambda: watch.evaluated_us is not None)
    assert (await (await client.get("/api/v1/triggers")).json())["holding"][0]["device_id"] == "orin-007"


async def test_read_endpoints_rules_apply(aiohttp_client: Any, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(host="0.0.0.0"), store))
    assert (await client.get("/api/v1/triggers")).status == 401
    device = store.add_token("orin-001", "device", 1)
    assert (await client.get("/api/v1/triggers", headers={"Authorization": f"Bearer {device}"})).status == 403
    read = store.add_token("grafana", "read", 1)
    answer = await (await client.get("/api/v1/triggers", headers={"Authorization": f"Bearer {read}"})).json()
    assert answer["triggers"] == [] and answer["holding"] == [] and answer["fires"] == []


def test_the_fleet_page_shows_what_holds_in_a_browser(tmp_path: Path) -> None:
    """Headless Chromium renders the Triggers box (one line per holding series) and each device row's triggers,
    sorted by their count from the address, without a script error."""

    import aiohttp

    from .test_fleet_page import chromium, console_errors, running

    clock = Clock(time.time())
    triggers = [t for t in triggers_from(tmp_path, TRIGGERS_TOML) if t.name in ("failing", "p95-ttft", "errors")]
    store = SQLiteStore(tmp_path / "agg.db")
    app = create_app(Settings(trigger_interval_s=3600.0), store, triggers=triggers, clock=clock)
    with running(app) as (port, loop):

        async def fill() -> None:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:

                class Client:  # what ingest_fleet needs of a test client
                    post = session.post

                await ingest_fleet(Client(), store, clock.now)
                await evaluate_triggers(app)

        asyncio.run_coroutine_threadsafe(fill(), loop).result(60)
        dom = chromium("--dump-dom", f"http://127.0.0.1:{port}/?sort=trigger_count&desc=1")
    assert console_errors(dom.stderr) == [], dom.stderr[-2000:]
    box = dom.stdout.split('id="trigger-list">', 1)[1].split("</ul>", 1)[0]
    # coloured by the trigger's severity (these are warnings: no severity key)
    assert box.count("<li") == 3 and 'class="warning">failing: 5 (condition: 5 failed requests' in box
    assert '<details class="triggers" id="triggers">' in dom.stdout  # shown (folded to one line): no longer hidden
    rows = [line for line in dom.stdout.split("<tr ") if line.startswith('id="device-')]
    assert [row.split('"', 2)[1].removeprefix("device-") for row in rows][:3] == ["orin-002", "orin-006", "orin-007"]
    cell = rows[0].split('class="text triggers-cell"', 1)[1].split("</td>", 1)[0]
    assert (
        cell.endswith(">p95-ttft")
        and 'title="p95-ttft: 1,500 ms, lower 95 % bound 1,500 ms (condition: p95 TTFT above 800 ms)' in cell
    )


# -- the command, the alerting rule -----------------------------------------------------------------------------------
def run_cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from aggregator.cli import main

    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


async def test_the_triggers_command(aiohttp_client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = SQLiteStore(tmp_path / "agg.db")
    config = tmp_path / "aggregator.toml"
    config.write_text(TRIGGERS_TOML)
    client = await aiohttp_client(create_app(Settings(), store))
    await ingest_fleet(client, store, time.time())
    db = str(tmp_path / "agg.db")
    code, out, err = run_cli("triggers", "--config", str(config), "--db", db, capsys=capsys)
    assert code == 1, err  # a condition holds
    assert (
        "p95-ttft: p95 TTFT above 800 ms (its lower 95 % confidence bound) over 2 h "
        "(at least 10 requests, widened up to 8 h), cooldown 30 min"
    ) in out
    assert (
        "  firing            1,500 ms, lower 95 % bound 1,500 ms (condition: p95 TTFT above 800 ms) on orin-002, "
        f"model {MODEL_A}"
    ) in out
    code, out, _ = run_cli("triggers", "--config", str(config), "--db", db, "--json", capsys=capsys)
    answer = json.loads(out)
    assert code == 1 and holding(answer) == {name: {series} for name, series in PLANTED.items()}
    assert store.get_meta(META_KEY) is None  # the command records nothing: fires are the server's
    quiet = tmp_path / "quiet.toml"
    quiet.write_text(table(name="p95", condition="p95_latency_above", metric="ttft", threshold=5000, window="2h"))
    code, out, _ = run_cli("triggers", "--config", str(quiet), "--db", db, capsys=capsys)
    assert code == 0 and "  ok " in out and "firing" not in out
    # too few requests to judge: exit 3, not "all clear"
    blind = tmp_path / "blind.toml"
    blind.write_text(table(name="p95", condition="p95_latency_above", metric="ttft", threshold=5000, min_samples=500))
    code, out, err = run_cli("triggers", "--config", str(blind), "--db", db, capsys=capsys)
    assert code == 3 and "insufficient_data" in out and "firing" not in out, out
    assert "insufficient data:" in err and "exit 3" in err
    none = tmp_path / "none.toml"
    none.write_text('[fleet]\nlate_after = "1h"\n')
    code, _, err = run_cli("triggers", "--config", str(none), "--db", db, capsys=capsys)
    assert code == 0 and "no [[triggers]]" in err and "none are evaluated" in err
    bad = tmp_path / "bad.toml"
    bad.write_text('[[triggers]]\nname = "x"\ncondition = "memory_above"\nthreshold = "lots"\n')
    code, _, err = run_cli("triggers", "--config", str(bad), "--db", db, capsys=capsys)
    assert code == 2 and "triggers[0].threshold" in err and "Traceback" not in err


def test_the_alerting_rule_is_valid_and_shipped(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make sysdeps` installs Debian's prometheus package"
    rules = ROOT / "packaging" / "prometheus" / "lens-alerts.yml"
    done = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "SUCCESS: 5 rules found" in done.stdout, done.stdout + done.stderr
    assert deb_installs()["/usr/share/lens-aggregator/prometheus/lens-alerts.yml"] == rules
    # a failing OTLP backend alerts after 15 minutes of delivering nothing, and not before
    series = 'llm_latency_lens_otlp_backend_failing{signal="traces"}'
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": series, "values": "1x30"}],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "LensOtlpBackendFailing", "exp_alerts": []},
                    {
                        "eval_time": "16m",
                        "alertname": "LensOtlpBackendFailing",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "signal": "traces"},
                                "exp_annotations": {
                                    "summary": "lens-aggregator's OTLP backend accepts no traces",
                                    "description": (
                                        "No traces export request has been accepted for 15 minutes; the records "
                                        "wait in the aggregator's store (llm_latency_lens_otlp_pending_records, "
                                        "llm_latency_lens_otlp_lag_seconds) and are sent once the backend accepts "
                                        "them again. `lens-aggregator otlp status` shows the last error."
                                    ),
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "forwarding.yml"
    path.write_text(json.dumps(test))  # JSON is YAML
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


async def test_the_alert_fires_on_the_aggregators_own_exposition(aiohttp_client: Any, tmp_path: Path) -> None:
    """promtool's rule test, fed with the series a real scrape of the planted fleet returns: the alert fires for
    each planted series with its labels, after its `for`."""
    promtool = shutil.which("promtool")
    assert promtool
    clock = Clock(time.time())
    triggers = [t for t in triggers_from(tmp_path, TRIGGERS_TOML) if t.name in ("failing", "memory")]
    store = SQLiteStore(tmp_path / "agg.db")
    client = await fleet_app(aiohttp_client, store, triggers, clock)
    await ingest_fleet(client, store, clock.now)
    await evaluate_triggers(client.app)
    text = (await (await client.get("/metrics")).read()).decode()
    series = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llm_latency_lens_trigger_firing":
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                series.append({"series": f"{sample.name}{{{labels}}}", "values": f"{sample.value:g}x10"})
    assert len(series) == 2
    alerts = [
        {
            "exp_labels": {"severity": "warning", **labels},
            "exp_annotations": {
                "summary": f"{labels['trigger']} holds on {labels['device']} ({labels['model']})",
                "description": (
                    f"Trigger {labels['trigger']} holds on device {labels['device']}, model {labels['model']}, "
                    f"engine settings {labels['settings']}. GET /api/v1/triggers on the aggregator shows the value, "
                    "the threshold and the requests it was judged on."
                ),
            },
        }
        for labels in (
            {"trigger": "failing", "device": PLANTED["failing"][0], "model": MODEL_A, "settings": KEY_S4},
            {"trigger": "memory", **dict(zip(("device", "model", "settings"), PLANTED["memory"], strict=True))},
        )
    ]
    test = {
        "rule_files": [str(ROOT / "packaging" / "prometheus" / "lens-alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "1m", "alertname": "LensTriggerFiring", "exp_alerts": []},  # `for: 2m`
                    {"eval_time": "3m", "alertname": "LensTriggerFiring", "exp_alerts": alerts},
                ],
            }
        ],
    }
    path = tmp_path / "test.yml"
    path.write_text(json.dumps(test))  # JSON is YAML
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
