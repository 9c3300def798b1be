"""A standalone device (no aggregator): ``lens-agent sync`` exports its outbox to an OTLP backend, keeping every row
until the backend's OTLP answer, and quarantining (never dropping) the one record a backend refuses."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.otlp_sync import OtlpUploader, standalone_sync_settings
from agent.outbox import AsyncOutbox, Outbox, outbox_path
from lens_core import otlp, otlp_config, wire
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


def standalone_config(tmp_path: Path, model: Path, port: int, *, every: str, requests: int, max_tokens: int) -> Path:
    """A service without an aggregator: one local workload on ``model``, exported to the OTLP backend at ``port``."""
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[agent]
device_id = "{DEVICE}"
data_dir = "{tmp_path / "data"}"
[model]
path = "{model}"
n_ctx = 256
n_threads = 1
[sync]
interval = "1s"
backoff_max = "2s"
[otlp]
endpoint = "http://127.0.0.1:{port}"
[service]
heartbeat_interval = "500ms"
[[workloads]]
name = "quick"
every = "{every}"
jitter = "0"
requests = {requests}
max_tokens = {max_tokens}
""")
    return config


def sync(config: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from agent.launcher import main; main()", "sync", "--config", str(config), *flags],
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
    receiver = Receiver(mode="portal")
    runner = await serve(receiver, port)
    try:
        done = await asyncio.to_thread(sync, config, "--check")  # a portal's 200 is not a backend
        assert done.returncode == 1 and "FAIL  traces" in done.stdout and "not an OTLP answer" in done.stdout
        receiver.mode = "ok"
        done = await asyncio.to_thread(sync, config, "--check")
        assert done.returncode == 0 and "ok    traces" in done.stdout and "ok    metrics" in done.stdout, done.stdout
        receiver.mode = "down"
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


async def export_once(tmp_path: Path, port: int, receiver: Receiver, records: list[dict[str, Any]]) -> Any:
    """A standalone device's outbox holding ``records`` exported once to ``receiver`` (served on ``port``): the
    sync report and the (still open) outbox."""
    runner = await serve(receiver, port)
    config = load_config(agent_config(tmp_path, port), environ={})
    settings = otlp_config.otlp_settings(config)
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
    return report, outbox


async def test_a_record_the_backend_refuses_is_quarantined_on_the_device(tmp_path: Path) -> None:
    port = free_port()
    receiver = Receiver()
    records = mixed_records(30, seed=23)
    poisoned = wire.to_wire(records[12])
    receiver.refuse_trace_ids = {poisoned["id"]}
    report, outbox = await export_once(tmp_path, port, receiver, records)
    assert report.ok and report.quarantined == 1
    stats = await outbox.stats()
    assert stats.records == 0 and stats.quarantined_total == 1
    got = {s.trace_id for _, s in receiver.spans()}
    assert got == {w["id"] for w in exported(records)} - {poisoned["id"]}
    await outbox.close()


def test_the_service_without_an_aggregator_exports_real_measurements(tmp_path: Path, tiny_model: Path) -> None:
    """``lens-agent run`` with ``[otlp]`` and no ``sync.url``: real llama.cpp requests on a tiny model reach the
    backend as spans whose times and token counts are the stored records', and ``status`` is healthy."""
    import json
    import signal

    from tests.test_service import start_service, wait_for

    receiver = Receiver()
    port = free_port()
    config = standalone_config(tmp_path, tiny_model, port, every="1s", requests=2, max_tokens=6)

    async def run() -> None:
        runner = await serve(receiver, port)
        proc = start_service(config)
        try:
            await asyncio.to_thread(
                wait_for,
                lambda: sum(1 for _, s in receiver.spans() if s.name.startswith("text_completion")) >= 2,
                90,
                "two requests exported",
            )
            status = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-c", "from agent.launcher import main; main()", "status", "--json", "--config",
                 str(config)],
                capture_output=True, text=True, cwd=ROOT, timeout=60,
            )  # fmt: skip
            doc = json.loads(status.stdout)
            assert doc["healthy"], doc["reasons"]
            proc.send_signal(signal.SIGTERM)
            output, _ = await asyncio.to_thread(proc.communicate, timeout=30)
            assert proc.returncode == 0, output
        finally:
            if proc.poll() is None:
                proc.kill()
            await runner.cleanup()

    asyncio.run(run())
    roots = [(res, s) for res, s in receiver.spans() if s.name.startswith("text_completion")]
    for resource, span in roots:
        assert resource["service.instance.id"] == DEVICE and resource.get("lens.device.class")
        a = {kv.key: kv.value for kv in span.attributes}
        assert a["gen_ai.request.model"].string_value == span.name.split(" ", 1)[1]
        assert a["gen_ai.provider.name"].string_value == "llama.cpp"
        assert 0 < a["gen_ai.usage.output_tokens"].int_value <= 6
        assert span.end_time_unix_nano > span.start_time_unix_nano
        # started on the device's wall clock within this test's minute
        assert abs(span.start_time_unix_nano / 1e9 - time.time()) < 300
        assert a["lens.clock.synchronized"].WhichOneof("value") in ("bool_value", "string_value")
    loads = [s for _, s in receiver.spans() if s.name.startswith("model_load")]
    assert len(loads) == 1
    assert receiver.points(), "metrics too"


async def test_a_record_the_encoders_cannot_encode_is_quarantined_and_the_rest_exported(tmp_path: Path) -> None:
    """A standalone device's outbox holds a record OTLP cannot carry (an integer past 64 bits in its ext): it is
    quarantined on its own, with the reason, and every other record of its batch reaches the backend."""
    port = free_port()
    receiver = Receiver()
    records = mixed_records(30, seed=29)
    poisoned = next(r for r in records if r["kind"] == "model_load")
    poisoned["ext"] = {"model_load": {"engine_load_ms": 12.5, "tensor_bytes": 2**64 - 1}}
    with pytest.raises(ValueError, match="do not encode"):
        otlp.encode_traces([({}, [wire.validate_record(wire.to_wire(poisoned))])], version="0")
    report, outbox = await export_once(tmp_path, port, receiver, records)
    assert report.ok and report.quarantined == 1, report
    assert any("does not encode as OTLP" in line for line in report.details), report.details
    stats = await outbox.stats()
    assert stats.records == 0 and stats.quarantined_by_code == {"unencodable": 1}
    got = {s.trace_id for _, s in receiver.spans()}
    assert got == {w["id"] for w in exported(records)} - {wire.to_wire(poisoned)["id"]}
    await outbox.close()


def test_sighup_follows_a_changed_otlp_endpoint(tmp_path: Path, tiny_model: Path) -> None:
    """A standalone device's [otlp] section is read again on SIGHUP: the service exports to the new endpoint
    without a restart (it kept the first one before)."""
    import signal

    from tests.test_service import start_service, wait_for

    second = Receiver()
    dead, port = free_port(), free_port()  # nothing listens on the first endpoint

    def write(endpoint_port: int) -> Path:
        return standalone_config(tmp_path, tiny_model, endpoint_port, every="2s", requests=1, max_tokens=4)

    async def run() -> None:
        runner = await serve(second, port)
        config = write(dead)
        proc = start_service(config)
        try:
            state = tmp_path / "data" / "service.json"
            await asyncio.to_thread(wait_for, lambda: state.exists(), 60, "the service to start")
            write(port)
            proc.send_signal(signal.SIGHUP)
            await asyncio.to_thread(
                wait_for,
                lambda: any(s.name.startswith("text_completion") for _, s in second.spans()),
                90,
                "a request exported to the endpoint the reload named",
            )
            proc.send_signal(signal.SIGTERM)
            output, _ = await asyncio.to_thread(proc.communicate, timeout=60)
            assert proc.returncode == 0, output
        finally:
            if proc.poll() is None:
                proc.kill()
            await runner.cleanup()

    asyncio.run(run())
