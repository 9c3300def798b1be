"""A fleet shaped like a real one, through a real ``lens-aggregator serve``: 200 devices, three weeks of records each,
energy figures, device facts (two classes, one device throttling), a planted TPOT regression, a failing device and
a silent one — then the API, the fleet page and the device page in headless Chromium, as an SRE would use them."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from agent.synthetic import synthetic_records
from aggregator.app import _row
from aggregator.store import SQLiteStore
from lens_core import wire

from .processes import AggregatorProcess
from .test_aggregator import make_batch
from .test_device_page import facts_record, retime, us
from .test_fleet_page import SCREENSHOTS, chromium, console_errors
from .test_regressions import slower_from

DEVICES = 200
REGRESSED, FAILING, SILENT, HOT = "orin-017", "orin-042", "orin-099", "orin-123"
END = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def device_class(n: int) -> str:
    return "laptop" if n % 4 == 0 else "embedded device"


def fleet_records(n: int) -> list[dict[str, Any]]:
    device = f"orin-{n:03d}"
    if device == REGRESSED:  # hourly for 25 days; decoding 1.78× slower from request 400 on
        records = retime(synthetic_records(600, seed=100 + n, device_id=device), END, 3600)
        slower_from(records, 400, 1.78)
    else:  # every 6 hours for three weeks
        records = retime(synthetic_records(84, seed=100 + n, device_id=device), END, 6 * 3600)
    if n % 10 and device not in (FAILING, SILENT, HOT):
        # the fleet view reads no inter-token gaps, and packing 17,000 gap arrays would cost the test ~12 s: most
        # devices send theirs empty (as a record of a request with one output token does); a tenth keep them
        for r in records:
            r["itl_ms"] = []
    if device == FAILING:  # a third of its requests time out
        for r in records[::3]:
            r.update({"ok": False, "error_type": "timeout", "ttft_ms": None, "tpot_ms": None, "e2e_ms": None})
            r.update({"itl_ms": [], "decode_ms": None, "output_tokens": 0, "prefill_ms": None})
            r.update({"engine_prefill_ms": None, "engine_decode_ms": None, "stop_reason": None})
    for r in records:
        if r["ok"]:
            joules = round(0.03 + 0.0001 * n + 0.002 * (r["prompt_index"] % 3), 5)
            r["ext"] = {"energy": {"j_per_output_token": joules, "joules_total": joules * r["output_tokens"] * 1.2}}
    temperature = 97.5 if device == HOT else 48.0 + n % 10
    facts = {
        "device_class": device_class(n),
        "model": "NVIDIA Jetson Orin Nano Developer Kit" if n % 4 else "Framework Laptop 13",
        "power_mode": "15W" if n % 4 else None,
        "temperatures_c": {"cpu-thermal": temperature, "gpu-thermal": temperature - 3},
        "cpu_freq_mhz": {"cpu0": 1510.4, "cpu1": 1510.4},
        "thermal_throttling": [f"cpu-thermal at {temperature:.1f} °C ≥ passive trip 95.0 °C"] if device == HOT else [],
        "clock_synchronized": True,
    }
    return [*records, facts_record(device, END - timedelta(days=1), **facts)]


def post(url: str, body: bytes, token: str) -> None:
    request = urllib.request.Request(
        url + "/api/v1/ingest", data=body, headers={"Authorization": f"Bearer {token}"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("fleet")
    db = root / "agg.db"
    store = SQLiteStore(db)
    now = time.time_ns() // 1000
    tokens = {f"orin-{n:03d}": store.add_token(f"orin-{n:03d}", "device", now) for n in range(DEVICES)}
    batches: dict[str, list[list[dict[str, Any]]]] = {}
    for n in range(DEVICES):
        records = fleet_records(n)
        half = len(records) // 2
        batches[f"orin-{n:03d}"] = [records[:half], records[half:]]
    # the silent device's batches arrived two days ago (the store's own ingest, with that receive time)
    for i, part in enumerate(batches.pop(SILENT)):
        rows = [_row(wire.to_wire(r), "cbor", wire.encode_record(r, "cbor")) for r in part]
        store.ingest(SILENT, f"old-{i}", 0, {"pending_records": 0}, rows, now - 2 * 86400 * 10**6)
    store.close()
    config = root / "aggregator.toml"
    config.write_text('[fleet]\nregression_interval = "1h"\n')
    server = AggregatorProcess(db, free_port(), config=config)
    server.start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        for device, parts in batches.items():
            for i, part in enumerate(parts):
                backlog = {"pending_records": len(parts[1]) if i == 0 else 0}
                post(url, make_batch(part, device=device, counters=backlog), tokens[device])
        # restarted, as after an upgrade: everything it shows comes from the store (the change points are
        # searched at start; the search's interval keeps it from running beside the ingest above)
        server.stop()
        server.start()
        yield url, batches
    finally:
        server.stop()


def test_the_fleet_answer_finds_what_was_planted(fleet: Any) -> None:
    url, batches = fleet
    found = get(url + "/api/v1/regressions")
    flagged = {(r["device_id"], r["metric"]): r for r in found["regressions"]}
    assert set(flagged) == {(REGRESSED, "tpot_ms"), (REGRESSED, "tokens_per_second")}, list(flagged)
    planted = us(batches[REGRESSED][0][0]["started_at"]) + 400 * 3600 * 10**6
    assert abs(flagged[(REGRESSED, "tpot_ms")]["since_us"] - planted) <= 3 * 3600 * 10**6  # within three requests
    rows = {d["device_id"]: d for d in get(url + "/api/v1/fleet")["devices"]}
    assert len(rows) == DEVICES
    states = {d: r["health"] for d, r in rows.items() if r["health"] != "ok"}
    assert states == {REGRESSED: "warning", FAILING: "critical", SILENT: "critical", HOT: "warning"}, states
    assert rows[SILENT]["health_reasons"] == ["silent: no batch for 2 days"]
    assert rows[FAILING]["health_reasons"][0].endswith("of its latest 50 requests failed")
    assert rows[HOT]["health_reasons"][0].startswith("thermally throttled: cpu-thermal at 97.5 °C")
    assert rows[REGRESSED]["health_reasons"][0].startswith("regression: TPOT +")
    assert sum(r["device_class"] == "laptop" for r in rows.values()) == DEVICES // 4
    assert all(r["j_per_output_token"] and 0.03 <= r["j_per_output_token"] < 0.06 for r in rows.values())


def test_the_fleet_page_filters_by_health_and_class(fleet: Any) -> None:
    url, _ = fleet

    def shown(query: str) -> list[str]:
        dom = chromium("--dump-dom", url + "/" + query)
        assert console_errors(dom.stderr) == [], dom.stderr[-2000:]
        rows = [line for line in dom.stdout.split("<tr ") if line.startswith('id="device-')]
        return [row.split('"', 2)[1].removeprefix("device-") for row in rows]

    assert sorted(shown("?health=critical")) == [FAILING, SILENT]
    laptops = shown("?class=laptop&sort=device_id")
    assert len(laptops) == DEVICES // 4 and laptops[:2] == ["orin-000", "orin-004"]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for width in (1400, 400):
        shot = SCREENSHOTS / f"fleet-health-{width}.png"
        chromium(f"--window-size={width},900", f"--screenshot={shot}", url + "/?sort=health_rank&desc=1")
        assert shot.stat().st_size > 5000


def test_the_device_page_draws_weeks_of_history_within_a_bounded_page(fleet: Any) -> None:
    url, _ = fleet
    with urllib.request.urlopen(url + f"/device/{REGRESSED}?range=30d", timeout=60) as response:
        page = response.read()
    assert len(page) < 400_000, len(page)  # 25 days, 600 requests, 30 buckets a day at most: bounded by buckets
    data = json.loads(page.decode().split("const initial = ", 1)[1].split(";\n", 1)[0])
    tpot = data["timeline"]["series"][0]["tpot_p50"]
    early = [v for v in tpot[: len(tpot) // 3] if v is not None]
    late = [v for v in tpot[-len(tpot) // 6 :] if v is not None]
    assert sorted(late)[len(late) // 2] > 1.5 * sorted(early)[len(early) // 2]  # the step is there to see
    dom = chromium("--dump-dom", url + f"/device/{REGRESSED}?range=30d&compare=orin-016")
    assert console_errors(dom.stderr) == [], dom.stderr[-2000:]
    assert dom.stdout.count("<canvas") >= 7 and "u-legend" in dom.stdout  # every chart drawn by uPlot
    assert f"orin-016 · {data['timeline']['series'][0]['model_name']}" in dom.stdout  # the compared device's series
    assert "regression" in dom.stdout and "Time per output token" in dom.stdout
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for width in (1400, 400):
        shot = SCREENSHOTS / f"device-{width}.png"
        chromium(f"--window-size={width},2600", f"--screenshot={shot}", url + f"/device/{REGRESSED}?range=30d")
        assert shot.stat().st_size > 20000
