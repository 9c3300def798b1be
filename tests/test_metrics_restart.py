"""/metrics after a restart (issue 32): a device that has not sent since still has its latency histograms, request
counters, tokens-per-second and contended share, rebuilt from its latest stored requests (by the time they ran).
A real ``lens-aggregator serve`` process stopped and started again on the same database, both stores."""

from __future__ import annotations

import json
import re
import statistics
import time
import urllib.request
from typing import Any

from agent.synthetic import synthetic_records
from aggregator.metrics import RECENT_REQUESTS
from lens_core import wire

from .netproxy import free_port
from .processes import AggregatorProcess, open_store

NOW = time.time_ns() // 1000


def post(port: int, token: str, device: str, records: list[dict[str, Any]], batch_id: str) -> dict[str, Any]:
    body = wire.encode_batch(
        [wire.encode_record(r, "cbor") for r in records], device_id=device, batch_id=batch_id, sent_us=1, codec="cbor"
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/ingest",
        data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": wire.CONTENT_TYPE},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        body: bytes = response.read()
        return body


def series(text: str, name: str, device: str) -> dict[str, float]:
    """``name``'s samples of ``device``: labels text → value."""
    pattern = re.compile(rf'^{name}\{{(device="{device}"[^}}]*)\}} (\S+)$', re.M)
    return {labels: float(value) for labels, value in pattern.findall(text)}


def fleet_row(port: int, device: str) -> dict[str, Any]:
    (row,) = json.loads(get(port, f"/api/v1/fleet?device={device}"))["devices"]
    return row


def test_a_silent_device_keeps_its_latency_series_after_a_restart(db: Any) -> None:
    store = open_store(db)
    quiet, chatty = store.add_token("dev-quiet", "device", NOW), store.add_token("dev-chatty", "device", NOW)
    store.close()
    records = synthetic_records(70, seed=4, device_id="dev-quiet")
    for i, r in enumerate(records):
        r.update({"ok": True, "error_type": None, "error_message": None, "ttft_ms": 100.0 + i, "output_tokens": 64})
        r["e2e_ms"] = r["ttft_ms"] + 63 * (20.0 + (i % 7))
        if i % 5 == 0:  # a contended request in five
            r["ext"] = {"interference": {"contended": True, "reasons": ["cpu"]}}
    port = free_port()
    server = AggregatorProcess(db, port)
    server.start()
    try:
        # the latest requests ran last but arrive first: the restart must restore them, not the older ones
        assert post(port, quiet, "dev-quiet", records[20:], "new")["accepted"] == 50
        assert post(port, quiet, "dev-quiet", records[:20], "old")["accepted"] == 20
        assert post(port, chatty, "dev-chatty", synthetic_records(5, seed=5, device_id="dev-chatty"), "c")["accepted"]
        before = get(port, "/metrics").decode()
        rate_before = series(before, "llm_latency_lens_tokens_per_second", "dev-quiet")
        share_before = series(before, "llm_latency_lens_device_contended_share", "dev-quiet")
        row = fleet_row(port, "dev-quiet")
    finally:
        server.stop()
    latest = records[-RECENT_REQUESTS:]
    expected = statistics.median(64 / (r["e2e_ms"] / 1000) for r in latest)
    (rate,) = rate_before.values()
    # one statistic per name: the gauge is the fleet page's figure, the median over the latest 50 by event time
    assert rate == row["tokens_per_second"] and abs(rate - expected) < 1e-6 * expected
    assert list(share_before.values()) == [row["contended_share"]] == [10 / 50]

    server = AggregatorProcess(db, port)
    server.start()
    try:
        after = get(port, "/metrics").decode()  # dev-quiet has sent nothing since
    finally:
        server.stop()
    counts = series(after, "llm_latency_lens_time_to_first_token_seconds_count", "dev-quiet")
    assert list(counts.values()) == [RECENT_REQUESTS], counts  # its latest requests, observed again
    assert series(after, "llm_latency_lens_time_per_output_token_seconds_count", "dev-quiet")
    assert list(series(after, "llm_latency_lens_request_duration_seconds_count", "dev-quiet").values()) == [50]
    ttft_sum = series(after, "llm_latency_lens_time_to_first_token_seconds_sum", "dev-quiet")
    assert abs(next(iter(ttft_sum.values())) - sum(r["ttft_ms"] for r in latest) / 1000) < 1e-3
    assert series(after, "llm_latency_lens_tokens_per_second", "dev-quiet") == rate_before
    assert series(after, "llm_latency_lens_device_contended_share", "dev-quiet") == share_before
    assert series(after, "llm_latency_lens_requests_total", "dev-quiet")
    assert series(after, "llm_latency_lens_time_to_first_token_seconds_count", "dev-chatty")
