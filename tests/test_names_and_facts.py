"""Names hold no control characters, device facts stay within physical ranges: refused at ingest, each record on its
own with the field and what is allowed (the agent quarantines just that record), against ``lens-aggregator serve``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lens_core import record_schema as rs
from lens_core import wire

from .hostile_device import DEVICE, auth, encode_raw, raw_batch, valid_wire
from .processes import AggregatorProcess, device_token
from .test_device_facts import ORIN_FACTS

NOW = time.time_ns() // 1000


def facts_wire(**device: Any) -> dict[str, Any]:
    record = valid_wire(1, seed=21)[0]
    record.update(kind="device_facts", id=uuid.uuid4().bytes)
    record["ext"] = {"device": {**ORIN_FACTS, **device}, "facts_reason": "first facts since the agent started"}
    return record


async def ingest(port: int, token: str, records: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    body = raw_batch([encode_raw(r, "cbor") for r in records], batch_id=str(uuid.uuid4()))
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}/api/v1/ingest", data=body, headers=auth(token)) as response,
    ):
        return response.status, dict(await response.json())


def named(**fields: Any) -> dict[str, Any]:
    record = valid_wire(1, seed=22)[0]
    record["id"] = uuid.uuid4().bytes
    record.update(fields)
    return record


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("ESC in model_name", named(model_name="smol\x1b[2J\x1b[H"), "model_name"),
    ("BEL in strategy", named(strategy="local\x07"), "strategy"),
    ("CR in error_type", named(ok=False, error_type="oom\rFAKE LINE"), "error_type"),
    ("LF in engine", named(engine="llama.cpp\nINFO all good"), "engine"),
    ("C1 in prompt_id", named(prompt_id="p\x9b31m"), "prompt_id"),
    ("DEL in run_id", named(run_id="run\x7f"), "run_id"),
    ("ESC in the cloud's model", named(ext={"network": {"model": "gpt\x1b]0;x\x07"}}), "ext.network.model"),
    ("ram_gb -1e308", facts_wire(ram_gb=-1e308), "ext.device.ram_gb"),
    ("ram_gb 0", facts_wire(ram_gb=0), "ext.device.ram_gb"),
    ("ram_gb 1e9", facts_wire(ram_gb=1e9), "ext.device.ram_gb"),
    ("a CPU clock of 1e12 MHz", facts_wire(cpu_freq_mhz={"cpu0": 1e12}), "ext.device.cpu_freq_mhz.cpu0"),
    ("a negative GPU clock", facts_wire(gpu_freq_mhz=-5.0), "ext.device.gpu_freq_mhz"),
    ("below absolute zero", facts_wire(temperatures_c={"cpu": -300.0}), "ext.device.temperatures_c.cpu"),
    ("a star's temperature", facts_wire(temperature_max_c=5778.0), "ext.device.temperature_max_c"),
    ("a power mode id of -1", facts_wire(power_mode_id=-1), "ext.device.power_mode_id"),
    ("a boolean for ram_gb", facts_wire(ram_gb=True), "ext.device.ram_gb"),
    ("ESC in the device model", facts_wire(model="Orin\x1b[31m"), "ext.device.model"),
    ("BEL in a zone name", facts_wire(temperatures_c={"cpu\x07": 50.0}), "ext.device.temperatures_c"),
    ("CR in a throttling line", facts_wire(thermal_throttling=["gpu\rok"]), "ext.device.thermal_throttling[0]"),
    ("a bidi override in model_name", named(model_name="Qwen\u202eevil\u202c"), "model_name"),
    ("a zero-width space in strategy", named(strategy="lo\u200bcal"), "strategy"),
    ("a bidi isolate in the device class", facts_wire(device_class="jetson-\u2066orin"), "ext.device.device_class"),
    ("a byte-order mark in the cloud's model", named(ext={"network": {"model": "\ufeffgpt"}}), "ext.network.model"),
]


@pytest.mark.parametrize(("what", "record", "field"), REFUSED, ids=[r[0] for r in REFUSED])
def test_the_schema_refuses(what: str, record: dict[str, Any], field: str) -> None:
    with pytest.raises(rs.SchemaError) as refused:
        rs.check_record(wire.loads(encode_raw(record, "cbor"), "cbor"), NOW)
    assert refused.value.field == field, what
    assert any(said in refused.value.problem for said in ("allowed", "control character", "format character"))


def test_facts_at_the_edges_are_accepted() -> None:
    for device in (
        {},
        {"ram_gb": rs.MAX_RAM_GB, "gpu_freq_mhz": 0.0, "temperatures_c": {"cold": -273.15, "hot": 1000.0}},
        {"ram_gb": 0.5, "power_mode_id": None, "temperature_max_c": None, "cpu_freq_mhz": {}},
        {"model": "Jetson AGX Orin (64GB) — ünïcode ok", "thermal_throttling": ["gpu at 97.0 °C ≥ 95.5 °C"]},
    ):
        rs.check_record(facts_wire(**device), NOW)
    tab_free = named(model_name="Qwen2.5 0.5B Q4_K_M · ok")
    rs.check_record(tab_free, NOW)


def test_each_refused_record_is_refused_on_its_own_by_a_real_aggregator(tmp_path: Path) -> None:
    db = tmp_path / "agg.db"
    token = device_token(db)
    from .netproxy import free_port

    proc = AggregatorProcess(db, free_port())
    proc.start()
    try:
        good = valid_wire(3, seed=23)
        for what, record, field in REFUSED:
            status, answer = asyncio.run(ingest(proc.port, token, [good[0], record, good[1]]))
            assert status == 400, what
            assert answer["code"] == "record_invalid" and answer["record_index"] == 1, (what, answer)
            assert answer["record_id"] and field in answer["error"], (what, answer)
        status, answer = asyncio.run(ingest(proc.port, token, [*good, facts_wire()]))
        assert status == 200 and answer["accepted"] == 4, answer
        assert proc.stderr_text().count("Traceback") == 0
    finally:
        proc.stop()
    assert DEVICE == "dev-1"


def test_every_format_character_is_refused_in_a_name() -> None:
    """Every character of Unicode category Cf (this Python's Unicode), and the line and paragraph separators, is
    refused in a name, naming the field and the character; letters, marks and emoji are not."""
    import sys
    import unicodedata

    refused = [c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"] + [0x2028, 0x2029]
    for code in refused:
        with pytest.raises(rs.SchemaError) as caught:
            rs.check_name("model_name", f"Qwen{chr(code)}2.5")
        assert f"U+{code:04X}" in caught.value.problem and caught.value.field == "model_name"
    for fine in ("Qwen2.5 ünïcode", "模型-7B", "mödel \u0301 mark", "emoji \u2764\ufe0f ok", "Ω≈ç√"):
        rs.check_name("model_name", fine)
