"""A real third-party OTLP backend: Arize Phoenix (PyPI ``arize-phoenix``, in ``.venv-phoenix``: ``make phoenix``)
receives the traces a real ``lens-aggregator serve`` forwards, and its own REST API gives them back.

Phoenix takes traces only (``otlp.metrics = false``), and files them under the project the resource names
(``openinference.project.name``, set through ``otlp.resource_attributes``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from aggregator.store import SQLiteStore
from lens_core import wire
from tests.netproxy import free_port
from tests.processes import AggregatorProcess
from tests.test_otlp import DEVICE, exported, ingest, mixed_records

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-phoenix"
PROJECT = "lens-fleet"


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not (VENV / ".installed").exists():
        raise RuntimeError(f"{VENV} is missing or incomplete: run `make phoenix` (Arize Phoenix from PyPI)")
    work = tmp_path_factory.mktemp("phoenix")
    port = free_port()
    env = dict(
        os.environ,
        PHOENIX_WORKING_DIR=str(work),
        PHOENIX_PORT=str(port),
        PHOENIX_GRPC_PORT=str(free_port()),
        PHOENIX_HOST="127.0.0.1",
        PHOENIX_TELEMETRY_ENABLED="false",
    )
    log = (work / "phoenix.log").open("wb")
    proc = subprocess.Popen([str(VENV / "bin" / "phoenix"), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Phoenix did not start: {(work / 'phoenix.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_phoenix_receives_every_span_of_every_record(phoenix: str, tmp_path: Path) -> None:
    asyncio.run(_forward(phoenix, tmp_path))


async def _forward(phoenix: str, tmp_path: Path) -> None:
    config = tmp_path / "aggregator.toml"
    config.write_text(
        f'[otlp]\nendpoint = "{phoenix}"\nmetrics = false\ninterval = "100ms"\n'
        f'resource_attributes = "openinference.project.name={PROJECT}"\n'
    )
    db = tmp_path / "agg.db"
    store = SQLiteStore(db)
    token = store.add_token(DEVICE, "device", time.time_ns() // 1000)
    port = free_port()
    proc = AggregatorProcess(db, port, config=config)
    records = mixed_records(30, seed=13)
    want = exported(records)
    try:
        proc.start()
        async with ClientSession(f"http://127.0.0.1:{port}") as client:
            await ingest(client, token, records)
        spans = await _spans(phoenix, len([s for w in want for s in _expected_spans(w)]))
    finally:
        proc.stop()
        store.close()
    by_trace: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        by_trace.setdefault(span["context"]["trace_id"], []).append(span)
    assert set(by_trace) == {w["id"].hex() for w in want}
    for w in want:
        got = by_trace[w["id"].hex()]
        assert len(got) == len(_expected_spans(w))
        roots = [s for s in got if not s.get("parent_id")]
        assert len(roots) == 1
        root = roots[0]
        if w["kind"] == "model_load":
            assert root["name"] == f"model_load {w['model_name']}"
            continue
        op = "chat" if w["strategy"] == "cloud" else "text_completion"
        assert root["name"] == f"{op} {w['model_name']}"
        a = root["attributes"]
        assert a["gen_ai.request.model"] == w["model_name"]
        assert a["gen_ai.usage.input_tokens"] == w["input_tokens"]
        start = w["started_us"]
        assert _us(root["start_time"]) == start
        if w["ok"]:
            assert root["status_code"] != "ERROR"
            assert _us(root["end_time"]) == start + w["e2e_us"]
        else:
            assert root["status_code"] == "ERROR"
            assert root["status_message"] == w["error_message"]
            assert a["error.type"] == w["error_type"]


def _expected_spans(w: dict[str, Any]) -> list[Any]:
    from lens_core import otlp

    return otlp.record_spans(w)


def _us(text: str) -> int:
    return wire._parse_time_us(text)


async def _spans(base: str, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Every span of the project, through Phoenix's REST API (paged), once ``count`` are there."""
    deadline = time.monotonic() + timeout
    async with ClientSession() as session:
        while True:
            spans: list[dict[str, Any]] = []
            cursor = None
            while True:
                params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
                async with session.get(f"{base}/v1/projects/{PROJECT}/spans", params=params) as answer:
                    body = await answer.text()
                    if answer.status == 404:  # the project exists once its first span arrived
                        break
                    assert answer.status == 200, body
                    page = json.loads(body)
                spans.extend(page["data"])
                cursor = page.get("next_cursor")
                if not cursor:
                    break
            if len(spans) >= count or time.monotonic() > deadline:
                return spans
            await asyncio.sleep(0.5)
