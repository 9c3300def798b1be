from __future__ import annotations

import json
import time
import uuid

from agent.measurement import Measurement, new_record_id, timings_from_token_times


def test_timings_from_token_stamps() -> None:
    ms = 1_000_000
    t = timings_from_token_times(100 * ms, [110 * ms, 115 * ms, 125 * ms])
    assert t["ttft_ms"] == 10.0
    assert t["itl_ms"] == [5.0, 10.0]
    assert t["e2e_ms"] == 25.0
    assert t["tpot_ms"] == 7.5  # (25 − 10) / (3 − 1)
    assert t["decode_ms"] == 15.0


def test_tpot_undefined_for_one_token() -> None:
    t = timings_from_token_times(0, [4_000_000])
    assert t["ttft_ms"] == 4.0 and t["tpot_ms"] is None and t["itl_ms"] == []
    assert timings_from_token_times(0, [])["ttft_ms"] is None


def test_record_ids_are_uuid7_and_time_ordered() -> None:
    first = new_record_id()
    time.sleep(0.002)
    second = new_record_id()
    for value in (first, second):
        parsed = uuid.UUID(value)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
    assert first < second
    unix_ms = uuid.UUID(second).int >> 80
    assert abs(unix_ms - time.time() * 1000) < 5000


def test_record_is_plain_primitives_and_round_trips() -> None:
    m = Measurement(run_id="r", device_id="d", model_name="m", model_sha256=None, itl_ms=[1.5, 2.0])
    m.ext["note"] = {"a": [1, 2]}
    record = m.to_dict()
    assert json.loads(json.dumps(record)) == record
    assert Measurement.from_dict(record) == m
    private = m.to_dict(include_text=False)
    assert "prompt_text" not in private and "output_text" not in private


def test_tokens_per_second() -> None:
    m = Measurement(run_id="r", device_id="d", model_name="m", model_sha256=None, e2e_ms=500.0, output_tokens=10)
    assert m.tokens_per_second == 20.0
    m.ok = False
    assert m.tokens_per_second is None
