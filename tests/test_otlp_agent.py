"""A standalone device (no aggregator): ``lens-agent sync`` exports its outbox to an OTLP backend, keeping every row
until the backend's OTLP answer, and quarantining (never dropping) the one record a backend refuses."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.config import load_config
from agent.otlp_sync import OtlpUploader, standalone_sync_settings
from agent.outbox import AsyncOutbox, Outbox, outbox_path
from lens_core import otlp, wire
from tests.netproxy import free_port
from tests.otlp_receiver import Receiver
from tests.test_otlp import DEVICE, check_metrics, check_spans, exported, mixed_records

ROOT = Path(__file__).resolve().parent.parent


def agent_config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\ndevice_id = "{DEVICE}"\ndata_dir = "{tmp_path / "data"}"\n\n'
        f'[otlp]\nendpoint = "http://127.0.0.1:{port}"\nheaders = "Authorization=Bearer device-secret"\n'
    )
    return config


def sync(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from agent.launcher import main; main()", "sync", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


async def serve(receiver: Receiver, port: int) -> Any:
    from aiohttp import web

    runner = web.AppRunner(receiver.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def test_lens_agent_sync_exports_the_outbox_and_keeps_it_while_the_backend_is_down(tmp_path: Path) -> None:
    asyncio.run(_down_then_up(tmp_path))


async def _down_then_up(tmp_path: Path) -> None:
    port = free_port()
    config = agent_config(tmp_path, port)
    records = mixed_records(40, seed=21)
    box = Outbox(outbox_path(tmp_path / "data"))
    box.append_many(records)
    box.close()
    receiver = Receiver(mode="down")
    runner = await serve(receiver, port)
    try:
        done = await asyncio.to_thread(sync, config)
        assert done.returncode != 0 and "sync failed" in done.stderr and "503" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        receiver.mode = "portal"
        done = await asyncio.to_thread(sync, config)
        assert done.returncode != 0 and "not an OTLP answer" in done.stderr + done.stdout, done.stderr
        box = Outbox(outbox_path(tmp_path / "data"))
        assert box.stats().records == len(records)  # nothing left the outbox
        box.close()
        receiver.mode = "ok"
        done = await asyncio.to_thread(sync, config)
        assert done.returncode == 0, done.stderr
        assert f"uploaded {len(records)} in" in done.stdout
    finally:
        await runner.cleanup()
    box = Outbox(outbox_path(tmp_path / "data"))
    assert box.stats().records == 0
    box.close()
    check_spans(receiver, records)
    check_metrics(receiver, records, "cumulative")


async def test_a_record_the_backend_refuses_is_quarantined_on_the_device(tmp_path: Path) -> None:
    port = free_port()
    receiver = Receiver()
    records = mixed_records(30, seed=23)
    poisoned = wire.to_wire(records[12])
    receiver.refuse_trace_ids = {poisoned["id"]}
    runner = await serve(receiver, port)
    config = load_config(agent_config(tmp_path, port), environ={})
    settings = otlp.otlp_settings(config)
    assert settings is not None and settings.headers == {"Authorization": "Bearer device-secret"}
    box = Outbox(tmp_path / "o.db")
    box.append_many(records)
    outbox = AsyncOutbox(box)
    uploader = OtlpUploader(outbox, standalone_sync_settings(config, settings), settings)
    try:
        report = await uploader.sync_now()
    finally:
        await uploader.close()
        await runner.cleanup()
    assert report.ok and report.quarantined == 1
    stats = await outbox.stats()
    assert stats.records == 0 and stats.quarantined_total == 1
    got = {s.trace_id for _, s in receiver.spans()}
    assert got == {w["id"] for w in exported(records)} - {poisoned["id"]}
    await outbox.close()
