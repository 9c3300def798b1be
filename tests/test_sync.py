"""The uploader against a real aggregator on 127.0.0.1: batching, refusals, TLS, backoff, network watch."""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trustme
from aiohttp import web

from agent.config import load_config
from agent.outbox import AsyncOutbox, Outbox
from agent.status import evaluate
from agent.sync import SyncService, SyncSettings, Uploader, full_jitter_backoff, sync_settings
from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from aggregator.store import SQLiteStore
from lens_core import wire
from lens_core.errors import ConfigError

DEVICE = "dev-1"


class Aggregator:
    """A real aggregator app on a real loopback port, restartable on the same port and database."""

    def __init__(self, db: Path, settings: Settings | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.db = db
        self.settings = settings or Settings()
        self.ssl_context = ssl_context
        self.port = 0
        self.runner: web.AppRunner | None = None
        self.store: SQLiteStore | None = None

    async def start(self) -> None:
        self.store = SQLiteStore(self.db)
        self.runner = web.AppRunner(create_app(self.settings, self.store))
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def ids(self) -> list[bytes]:
        return SQLiteStore(self.db).record_ids()


@pytest.fixture
async def aggregator(tmp_path: Path) -> Any:
    agg = Aggregator(tmp_path / "agg.db")
    await agg.start()
    yield agg
    await agg.stop()


def token_for(agg: Aggregator) -> str:
    return SQLiteStore(agg.db).add_token(DEVICE, "device", time.time_ns() // 1000)


def settings_for(agg: Aggregator, token: str, **kw: Any) -> SyncSettings:
    return SyncSettings(url=agg.url, token=token, device_id=DEVICE, **kw)


def filled_outbox(path: Path, n: int, seed: int = 1, **kw: Any) -> tuple[AsyncOutbox, list[dict[str, Any]]]:
    records = synthetic_records(n, seed=seed, device_id=DEVICE)
    box = Outbox(path, **kw)
    box.append_many(records)
    return AsyncOutbox(box), records


def ids_of(records: list[dict[str, Any]]) -> set[bytes]:
    return {bytes.fromhex(r["id"].replace("-", "")) for r in records}


async def test_sync_uploads_everything_once(tmp_path: Path, aggregator: Aggregator) -> None:
    outbox, records = filled_outbox(tmp_path / "o.db", 1200)
    uploader = Uploader(outbox, settings_for(aggregator, token_for(aggregator), batch_size=500))
    report = await uploader.sync_now()
    await uploader.close()
    assert report.ok and report.batches == 3 and report.accepted == 1200 and report.pending == 0
    ids = aggregator.ids()
    assert len(ids) == 1200 and set(ids) == ids_of(records)
    assert (await outbox.stats()).records == 0
    assert outbox.outbox.get_state("last_success_us") is not None
    await outbox.close()


async def test_413_splits_batches(tmp_path: Path) -> None:
    agg = Aggregator(tmp_path / "agg.db", Settings(max_body_bytes=40 * 1024))
    await agg.start()
    try:
        outbox, records = filled_outbox(tmp_path / "o.db", 600)
        uploader = Uploader(outbox, settings_for(agg, token_for(agg), batch_size=500, compression="none"))
        report = await uploader.sync_now()
        await uploader.close()
        assert report.ok and report.batches > 2 and report.accepted == 600
        assert set(agg.ids()) == ids_of(records)
        await outbox.close()
    finally:
        await agg.stop()


async def test_batch_over_max_batch_bytes_is_split_before_sending(tmp_path: Path, aggregator: Aggregator) -> None:
    outbox, records = filled_outbox(tmp_path / "o.db", 300)
    uploader = Uploader(outbox, settings_for(aggregator, token_for(aggregator), max_batch_bytes=16 * 1024))
    report = await uploader.sync_now()
    await uploader.close()
    assert report.ok and report.batches >= 4 and set(aggregator.ids()) == ids_of(records)
    await outbox.close()


def _insert_raw(box: Outbox, rid: bytes, body: bytes, codec: str = "msgpack") -> None:
    box._conn.execute(
        "INSERT INTO records(id, created_us, codec, size, body) VALUES (?, ?, ?, ?, ?)",
        (rid, time.time_ns() // 1000, codec, len(body) + 96, body),
    )


async def test_record_of_another_device_is_quarantined_and_the_rest_delivered(
    tmp_path: Path, aggregator: Aggregator
) -> None:
    records = synthetic_records(10, seed=3, device_id=DEVICE)
    box = Outbox(tmp_path / "o.db", codec="msgpack")
    box.append_many(records[:5])
    # a record stored under another device id (e.g. the host name, before agent.device_id was set): the token can
    # never upload it, so it must neither block the queue nor vanish
    bad = wire.to_wire({**records[5], "device_id": "someone-else"})
    _insert_raw(box, bad["id"], msgpack.packb(bad, use_bin_type=True))
    box.append_many(records[6:])
    outbox = AsyncOutbox(box)
    uploader = Uploader(outbox, settings_for(aggregator, token_for(aggregator)))
    report = await uploader.sync_now()
    await uploader.close()
    assert report.ok and report.accepted == 9 and report.quarantined == 1
    assert "other_device" in report.details[0] and "--as-device dev-1" in report.details[0]
    stats = await outbox.stats()
    assert stats.records == 0 and stats.quarantined_total == 1
    assert set(aggregator.ids()) == ids_of(records[:5] + records[6:])
    await outbox.close()


async def test_400_record_quarantined_rest_delivered(tmp_path: Path, aggregator: Aggregator) -> None:
    records = synthetic_records(10, seed=4, device_id=DEVICE)
    box = Outbox(tmp_path / "o.db", codec="msgpack")
    box.append_many(records[:4])
    # valid for the device's own check is not required here: the aggregator applies the stricter one
    bad = wire.to_wire(records[4])
    bad["ttft_us"] = "fast"
    _insert_raw(box, bad["id"], msgpack.packb(bad, use_bin_type=True))
    box.append_many(records[5:])
    outbox = AsyncOutbox(box)
    uploader = Uploader(outbox, settings_for(aggregator, token_for(aggregator)))
    report = await uploader.sync_now()
    await uploader.close()
    assert report.ok and report.quarantined == 1 and report.accepted == 9
    assert set(aggregator.ids()) == ids_of(records[:4] + records[5:])
    stats = await outbox.stats()
    assert stats.records == 0 and stats.quarantined_total == 1
    await outbox.close()


async def test_undecodable_row_is_quarantined_on_the_device(tmp_path: Path, aggregator: Aggregator) -> None:
    records = synthetic_records(6, seed=5, device_id=DEVICE)
    box = Outbox(tmp_path / "o.db")
    box.append_many(records[:3])
    _insert_raw(box, b"\x01" * 16, b"\xff\x00garbage", codec="cbor")
    box.append_many(records[3:])
    outbox = AsyncOutbox(box)
    uploader = Uploader(outbox, settings_for(aggregator, token_for(aggregator)))
    report = await uploader.sync_now()
    await uploader.close()
    assert report.ok and report.quarantined == 1 and report.accepted == 6
    assert (await outbox.stats()).quarantined_total == 1
    await outbox.close()


async def test_wrong_token_keeps_everything_and_is_unhealthy(tmp_path: Path, aggregator: Aggregator) -> None:
    outbox, _ = filled_outbox(tmp_path / "o.db", 20)
    uploader = Uploader(outbox, settings_for(aggregator, "lens_wrong"))
    report = await uploader.sync_now()
    await uploader.close()
    assert not report.ok and report.error_kind == "auth" and report.status == 401
    stats = await outbox.stats()
    assert stats.records == 20
    state = {k: outbox.outbox.get_state(k) for k in ("last_success_us", "last_error_kind", "last_error")}
    health = evaluate(stats, state, interval_s=60, now_us=time.time_ns() // 1000)
    assert not health.healthy and "refuses this device" in health.reasons[0]
    await outbox.close()


async def test_unreachable_aggregator_is_a_network_failure(tmp_path: Path) -> None:
    outbox, _ = filled_outbox(tmp_path / "o.db", 5)
    uploader = Uploader(outbox, SyncSettings(url="http://127.0.0.1:9", token="t", device_id=DEVICE, timeout=2))
    report = await uploader.sync_now()
    await uploader.close()
    assert report.error_kind == "network" and (await outbox.stats()).records == 5
    await outbox.close()


async def test_tls_with_a_ca_file(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    agg = Aggregator(tmp_path / "agg.db", ssl_context=server_ctx)
    await agg.start()
    try:
        outbox, records = filled_outbox(tmp_path / "o.db", 10)
        token = token_for(agg)
        untrusted = Uploader(outbox, settings_for(agg, token))  # system CAs do not know this one
        report = await untrusted.sync_now()
        await untrusted.close()
        error = report.error or ""
        assert report.error_kind == "network" and ("TLS" in error or "certificate" in error)
        trusted = Uploader(outbox, settings_for(agg, token, ca_file=ca_file))
        report = await trusted.sync_now()
        await trusted.close()
        assert report.ok and set(agg.ids()) == ids_of(records)
        await outbox.close()
    finally:
        await agg.stop()


async def test_service_syncs_as_soon_as_the_aggregator_returns(tmp_path: Path) -> None:
    agg = Aggregator(tmp_path / "agg.db")
    await agg.start()
    token = token_for(agg)
    await agg.stop()  # down; the port stays known
    outbox, records = filled_outbox(tmp_path / "o.db", 50)
    uploader = Uploader(outbox, settings_for(agg, token, interval=3600, backoff_initial=30, timeout=2))
    service = SyncService(uploader, rng=random.Random(1))
    service.start()
    try:
        await asyncio.sleep(0.5)
        assert service.failures >= 1 and (await outbox.stats()).records == 50
        await agg.start()
        # neither the interval (1 h) nor the backoff (≤ 30 s) would fire now: the health watcher does
        deadline = time.monotonic() + 20
        while (await outbox.stats()).records and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert (await outbox.stats()).records == 0
        assert set(agg.ids()) == ids_of(records)
    finally:
        await service.stop()
        await uploader.close()
        await outbox.close()
        await agg.stop()


async def test_records_stored_during_a_sync_go_in_one_more_pass(
    tmp_path: Path, aggregator: Aggregator, caplog: pytest.LogCaptureFixture
) -> None:
    """A trigger while a pass runs is not lost (nor logged as a skipped run): the pass goes once more."""
    outbox, _ = filled_outbox(tmp_path / "o.db", 0)
    uploader = Uploader(outbox, settings_for(aggregator, token_for(aggregator), interval=3600, batch_size=20))
    service = SyncService(uploader, rng=random.Random(2))
    service.start()  # the periodic pass runs at once (nothing to do), then not for an hour
    try:
        await asyncio.sleep(0.2)
        first = synthetic_records(400, seed=76, device_id=DEVICE)
        await outbox._run(outbox.outbox.append_many, first)
        service.trigger()  # a triggered pass: 20 batches, a while
        await asyncio.sleep(0.05)
        later = synthetic_records(30, seed=77, device_id=DEVICE)
        for record in later:
            await outbox.append(record)
            service.trigger()
        deadline = time.monotonic() + 20
        while (await outbox.stats()).records and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert (await outbox.stats()).records == 0  # the interval (1 h) never fired: the extra pass did it
        assert set(aggregator.ids()) == ids_of(first + later)
        assert "skipped" not in caplog.text
    finally:
        await service.stop()
        await uploader.close()
        await outbox.close()


def test_full_jitter_backoff_is_bounded_and_grows() -> None:
    rng = random.Random(3)
    for attempt in range(1, 20):
        delay = full_jitter_backoff(attempt, 1.0, 300.0, rng)
        assert 0.0 <= delay <= min(300.0, 2 ** (attempt - 1))
    assert max(full_jitter_backoff(12, 1.0, 300.0, rng) for _ in range(200)) > 150
    assert max(full_jitter_backoff(1, 1.0, 300.0, rng) for _ in range(200)) <= 1.0


def test_sync_settings_from_config(tmp_path: Path, config_file: Any) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("lens_abc\n")
    cfg = config_file(f'[sync]\nurl = "https://agg:8443/"\ntoken_file = "{token_file}"\n')
    settings = sync_settings(load_config(cfg, environ={}), environ={})
    assert settings.url == "https://agg:8443" and settings.token == "lens_abc"
    assert sync_settings(load_config(cfg, environ={}), environ={"LENS_SYNC_TOKEN": "env"}).token == "env"
    plain = config_file('[sync]\nurl = "http://agg:8443"\n', name="plain.toml")
    with pytest.raises(ConfigError, match="allow_http"):
        sync_settings(load_config(plain, environ={}), environ={"LENS_SYNC_TOKEN": "x"})
    with pytest.raises(ConfigError, match="LENS_SYNC_TOKEN"):
        sync_settings(load_config(plain, environ={"LENS_SYNC_ALLOW_HTTP": "1"}), environ={})
    missing = config_file(f'[sync]\nurl = "https://a"\ntoken_file = "{tmp_path / "none"}"\n', name="m.toml")
    with pytest.raises(ConfigError, match="readable file"):
        sync_settings(load_config(missing, environ={}), environ={})
