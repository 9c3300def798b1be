"""Negotiated gzip (issue 32): pages, JSON answers, /metrics and static files are gzipped for a client that asks,
byte for byte the plain body once decompressed; never the live stream, the ingest answer, a small body, or a
client that refuses gzip. A real aiohttp server on 127.0.0.1, read by a real ClientSession (decompressing, as a
browser or Prometheus does) and by one that keeps the bytes as they came."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import time
from typing import Any

import aiohttp
import pytest

from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from aggregator.compression import accepts_gzip
from aggregator.store import SQLiteStore

from .test_aggregator import auth, make_batch

NOW = time.time_ns() // 1000
DEVICES = [f"orin-{n:02d}" for n in range(12)]


@pytest.fixture
async def served(aiohttp_client: Any, tmp_path: Any) -> Any:
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(), store))
    for n, device in enumerate(DEVICES):
        token = store.add_token(device, "device", NOW)
        body = make_batch(synthetic_records(20, seed=n, device_id=device), device=device)
        response = await client.post("/api/v1/ingest", data=body, headers=auth(token))
        assert response.status == 200, await response.text()
    return client


async def raw(client: Any, path: str, accept: str | None) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and body bytes as they came over the wire (nothing decompressed)."""
    headers = {"Accept-Encoding": accept} if accept is not None else {"Accept-Encoding": "identity"}
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(client.make_url(path), headers=headers) as response,
    ):
        return response.status, dict(response.headers), await response.read()


def steady(body: bytes) -> bytes:
    """A fleet answer without what moves between two requests (the age of last-seen, in 0.1 s)."""
    return re.sub(rb'"last_seen_age_s": ?[0-9.]+', b'"last_seen_age_s":0', body)


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/", "text/html"),
        ("/api/v1/fleet", "application/json"),
        ("/api/v1/devices", "application/json"),
        ("/api/v1/measurements?limit=200", "application/json"),
        ("/static/uPlot.iife.min.js", "text/javascript"),
    ],
)
async def test_gzip_when_asked_and_the_same_body(served: Any, path: str, kind: str) -> None:
    status, headers, plain = await raw(served, path, None)
    assert status == 200 and "Content-Encoding" not in headers and headers["Content-Type"].startswith(kind)
    assert "Accept-Encoding" in headers.get("Vary", "")
    status, headers, packed = await raw(served, path, "gzip, deflate, br")
    assert status == 200 and headers["Content-Encoding"] == "gzip" and headers["Content-Type"].startswith(kind)
    assert int(headers["Content-Length"]) == len(packed) < len(plain) // 2
    assert steady(gzip.decompress(packed)) == steady(plain)


async def test_a_decompressing_client_reads_the_same_answer(served: Any) -> None:
    """What a browser or Prometheus does: asks for gzip and reads the decompressed body."""
    response = await served.get("/api/v1/fleet")  # the test client's session: auto_decompress, Accept-Encoding gzip
    assert response.status == 200 and response.headers["Content-Encoding"] == "gzip"
    rows = (await response.json())["devices"]
    assert sorted(r["device_id"] for r in rows) == DEVICES
    metrics = await served.get("/metrics")
    assert metrics.headers["Content-Encoding"] == "gzip" and metrics.headers["Content-Type"].startswith("text/plain")
    text = await metrics.text()
    for device in DEVICES:
        assert f'llm_latency_lens_requests_total{{device="{device}"' in text


async def test_metrics_gzip_decompresses_to_an_exposition(served: Any) -> None:
    status, headers, plain = await raw(served, "/metrics", None)
    assert status == 200 and "Content-Encoding" not in headers
    status, headers, packed = await raw(served, "/metrics", "gzip")
    assert status == 200 and headers["Content-Encoding"] == "gzip" and len(packed) < len(plain) // 3
    # the fleet's series are the same (the aggregator's own connection gauges move between two scrapes)
    fleet = re.compile(rb"^llm_latency_lens_(requests_total|time_to_first_token_seconds_count)\{.*$", re.M)
    assert fleet.findall(gzip.decompress(packed)) == fleet.findall(plain) != []


async def test_refused_small_or_streamed_answers_stay_plain(served: Any) -> None:
    for refusal in ("gzip;q=0", "identity", "deflate", "*"):
        _, headers, body = await raw(served, "/api/v1/fleet", refusal)
        assert "Content-Encoding" not in headers and json.loads(body)["devices"], refusal
    _, headers, body = await raw(served, "/api/v1/whoami", "gzip")  # a small answer: not worth a gzip header
    assert len(body) < 1024 and "Content-Encoding" not in headers
    _, headers, body = await raw(served, "/nowhere", "gzip")
    assert "Content-Encoding" not in headers

    # the live stream: events must not wait in a compressor
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(served.make_url("/api/v1/stream"), headers={"Accept-Encoding": "gzip"}) as response,
    ):
        assert response.status == 200 and "Content-Encoding" not in response.headers
        assert response.headers["Content-Type"].startswith("text/event-stream")
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 10)
        assert first.startswith(b": connected")


async def test_parquet_goes_as_it_is_and_arrow_is_gzipped(served: Any) -> None:
    pytest.importorskip("pyarrow")
    status, headers, body = await raw(served, "/api/v1/measurements?format=parquet&limit=200", "gzip")
    assert status == 200 and len(body) > 1024 and body[:4] == b"PAR1"  # compressed inside already: sent as it is
    assert "Content-Encoding" not in headers
    status, headers, body = await raw(served, "/api/v1/measurements?format=arrow&limit=200", "gzip")
    assert status == 200 and headers["Content-Encoding"] == "gzip"  # Arrow IPC is not compressed: gzip pays


async def test_the_ingest_answer_is_never_gzipped(aiohttp_client: Any, tmp_path: Any) -> None:
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(), store))
    token = store.add_token("dev-1", "device", NOW)
    body = make_batch(synthetic_records(400, seed=3, device_id="dev-1"), device="dev-1")
    headers = {**auth(token), "Accept-Encoding": "gzip"}
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(client.make_url("/api/v1/ingest"), data=body, headers=headers) as response,
    ):
        assert response.status == 200 and "Content-Encoding" not in response.headers
        answer = json.loads(await response.read())
    assert answer["accepted"] == 400


def test_accept_encoding_parsing() -> None:
    assert accepts_gzip("gzip") and accepts_gzip("deflate, gzip;q=0.5") and accepts_gzip("GZIP ; q=1")
    assert accepts_gzip("x-gzip")
    assert not accepts_gzip("") and not accepts_gzip("gzip;q=0") and not accepts_gzip("gzip; q=0.0")
    assert not accepts_gzip("br, deflate") and not accepts_gzip("*") and not accepts_gzip("gzip;q=zero")
