"""The fleet acts on devices; a hostile party must not be able to use that (issue: one compromised device token made
the real aggregator recommend ``n_threads=1048576`` to every genuine device of its class, which crashed them).

With real processes: a real ``lens-aggregator serve``, a genuine ``lens-agent run`` with ``tune.auto_apply`` on a tiny
model, a hostile device posting through the real ingest endpoint with its own real token, and a man in the middle of
the plain-HTTP link that rewrites the aggregator's acknowledgements.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from aggregator.store import SQLiteStore
from lens_core import wire

from .hostile_upstream import HostileUpstream
from .netproxy import free_port
from .processes import AggregatorProcess, device_token
from .sysfs_trees import orin_jp6
from .test_aggregator import make_batch
from .test_device_page import facts_record
from .test_feedback import plant
from .test_tune import AGENT, ROOT, outbox_records, write_config


class RewritingUpstream(HostileUpstream):
    """Forwards every request to the real aggregator and hands each acknowledgement of an upload to ``rewrite``,
    which returns the JSON to answer with (a dict) or a raw body (bytes)."""

    def __init__(self, aggregator_url: str, rewrite: Callable[[dict[str, Any]], dict[str, Any] | bytes]) -> None:
        super().__init__(aggregator_url)
        self.rewrite = rewrite
        self.acks = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        status, content_type, answer = await self._forward(request, body)
        if request.method == "POST" and status == 200 and content_type.startswith("application/json"):
            self.acks += 1
            changed = self.rewrite(json.loads(answer))
            if isinstance(changed, bytes):
                return web.Response(status=200, body=changed, content_type="application/json")
            return web.json_response(changed)
        return web.Response(status=status, body=answer, headers={"Content-Type": content_type})


def rec(target: str, value: Any, current: Any, model: str) -> dict[str, Any]:
    return {
        "recommendation_id": str(uuid.uuid4()),
        "model_name": model,
        "target": target,
        "current_value": current,
        "recommended_value": value,
        "improvement": 0.9993,
        "confidence": 1.0,
        "metric": "tpot_ms",
        "evidence": "fleet: 200 requests, p=1.4e-14",
    }


def stored(db: Path, sql: str, *args: Any) -> list[Any]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def tune_steps(data_dir: Path, agg_db: Path) -> list[dict[str, Any]]:
    """Every tuning record, uploaded or still in the outbox."""
    rows = stored(agg_db, "SELECT codec, body FROM measurements WHERE kind = 'tune' ORDER BY seq")
    return [wire.loads(bytes(b), c)["ext"]["tune"] for c, b in rows] + [
        r["ext"]["tune"] for r in outbox_records(data_dir, "tune")
    ]


def start_service(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LENS_")}
    log = log_path.open("wb")
    return subprocess.Popen([*AGENT, "run", "--config", str(config)], cwd=ROOT, env=clean, stdout=log, stderr=log)


def stop_service(proc: subprocess.Popen[bytes], log_path: Path) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    output = log_path.read_text()
    assert proc.returncode == 0, output
    assert "Traceback" not in output, output
    return output


@pytest.mark.parametrize("state", ["writable", "unwritable"])
def test_hostile_acknowledgements_change_nothing_and_stop_no_scheduled_run(
    tmp_path: Path, tiny_model: Path, state: str
) -> None:
    """A man in the middle answers every upload with the aggregator's real acknowledgement plus hostile advice: the
    values that crashed devices, values past this device's CPUs, a thousand items, answers nested 30,000 deep, and a
    fresh recommendation id on every answer. The genuine service refuses each out-of-range value, treats the deep
    answer as not the aggregator's (one line, nothing deleted), tunes the churning advice at most once per
    tune.recommendation_interval, and its scheduled runs go on throughout — also when the file that remembers the
    advice cannot be written (the limit is kept in the service's memory as well: it never fails open)."""
    agg = AggregatorProcess(tmp_path / "agg.db", free_port())
    agg.start()
    model = "tiny-llama"  # the tiny model's general.name: the advice names this device's model
    cpus = len(os.sched_getaffinity(0))
    phase = {"n": 0}

    def rewrite(ack: dict[str, Any]) -> dict[str, Any] | bytes:
        phase["n"] += 1
        n = phase["n"]
        if n % 4 == 1:  # the values of the report: each crashed or bricked a device
            ack["recommendations"] = [
                rec("model.n_threads", 1048576, 1, model),
                rec("model.n_threads", 4096, 1, model),
                rec("model.n_batch", -1, 16, model),
                rec("model.n_batch", 70000, 16, model),
                rec("model.n_batch", 1 << 20, 16, model),
                rec("model.n_threads", cpus + 1, 1, model),  # within the configuration, beyond this device
                rec("model.n_gpu_layers", 8, 0, model),  # a CPU-only build offloads nothing
                rec("model.n_ctx", 128, 256, model),  # valid, but not what a tune searches: never measured
            ]
        elif n % 4 == 2:  # a thousand items, some of them a megabyte of text
            ack["recommendations"] = [rec("model.n_batch", 32, 16, "x" * 60_000)] + [{"a": i} for i in range(999)]
        elif n % 4 == 3:  # nested past the parser's recursion
            return b'{"recommendations": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
        else:  # fresh ids for in-range advice on every answer: at most one tune per interval
            ack["recommendations"] = [rec("model.n_batch", 32 if n % 8 else 48, 16, model)]
        return ack

    upstream = RewritingUpstream(f"http://127.0.0.1:{agg.port}", rewrite).start()
    proc = None
    try:
        token = tmp_path / "token"
        token.write_text(device_token(tmp_path / "agg.db"))
        sync = f'[sync]\nurl = "{upstream.url}"\nallow_http = true\ntoken_file = "{token}"\ninterval = "1s"'
        config = write_config(
            tmp_path,
            tiny_model,
            n_batch=16,
            sync=sync,
            device="dev-1",
            extra='auto_apply = true\nrecommendation_interval = "1h"',
        )
        text = config.read_text().replace('every = "1h"', 'every = "1s"')
        config.write_text(text.replace("requests = 4\n", "requests = 2\n").replace("rounds = 3\n", "rounds = 2\n"))
        if state == "unwritable":  # the state file's atomic write fails: a directory where its temp file goes
            (tmp_path / "data" / "tune" / "recommendations.json.tmp").mkdir(parents=True)
        log_path = tmp_path / "service.log"
        proc = start_service(config, log_path)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and upstream.acks < 16:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.25)
        assert upstream.acks >= 16, log_path.read_text()
        runs_before = len(stored(tmp_path / "agg.db", "SELECT 1 FROM measurements WHERE kind = 'inference'"))
        # and the scheduled runs still run, after all that (one a second: the next arrives within seconds)
        deadline, runs_after = time.monotonic() + 60, runs_before
        while time.monotonic() < deadline and runs_after <= runs_before:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.25)
            runs_after = len(stored(tmp_path / "agg.db", "SELECT 1 FROM measurements WHERE kind = 'inference'"))
        assert proc.poll() is None, log_path.read_text()
        assert runs_after > runs_before, (runs_before, runs_after)
    finally:
        if proc is not None:
            output = stop_service(proc, tmp_path / "service.log")
        upstream.stop()
        agg.stop()
    data = tmp_path / "data"
    starts = [t for t in tune_steps(data, tmp_path / "agg.db") if t["step"] == "start"]
    assert len(starts) == 1, starts  # one tune from advice per tune.recommendation_interval, whatever the ids
    for start in starts:
        assert start["grid"] in ({"n_batch": [16, 32]}, {"n_batch": [16, 48]})
    drop_in = data / "tune" / "settings.toml"
    if drop_in.exists():  # only ever what this device measured faster itself
        assert drop_in.read_text().splitlines()[-1] in ("n_batch = 32", "n_batch = 48")
    if state == "writable":
        kept = json.loads((data / "tune" / "recommendations.json").read_text())
        refused = {r["target"] + "=" + r["reason"].split(" = ")[1].split(":")[0] for r in kept["refused"]}
        assert f"model.n_threads={cpus + 1}" in refused and "model.n_gpu_layers=8" in refused, kept["refused"]
    else:
        assert "the recommendations received are not kept" in output
        assert not (data / "tune" / "recommendations.json").exists()
    assert "recommendation refused by this device: model.n_threads" in output
    assert output.count("recommendation refused by this device") == 1  # refused once, logged once
    # one line per answer however many items it refused: the first, and how many more
    assert "recommended_value = 1048576 is out of range for n_threads (1 … 512) (and 4 more)" in output
    assert "not the aggregator's acknowledgement" in output or "not_aggregator" in output
    assert output.count("RecursionError") == 0
    inference = stored(tmp_path / "agg.db", "SELECT count(*) FROM measurements WHERE kind = 'inference'")[0][0]
    assert inference >= 6  # nothing the answers said kept the workload from running and uploading


def test_a_poisoned_fleet_recommends_nothing_to_a_genuine_device(tmp_path: Path, tiny_model: Path) -> None:
    """A compromised device token claims the genuine device's class and posts 200 fabricated requests with its model
    and settings except n_threads (1048576, which crashed devices, and 2): the real aggregator recommends nothing —
    out-of-range settings are no settings, and one device is never evidence for another — and the genuine service
    with tune.auto_apply goes on unchanged. Two more independent devices reporting the same make fleet evidence
    (feedback_min_devices = 3): then the advice reaches the device, which measures it itself, in a child process."""
    agg_config = tmp_path / "aggregator.toml"
    agg_config.write_text('[fleet]\nfeedback_interval = "1s"\n')
    db = tmp_path / "agg.db"
    agg = AggregatorProcess(db, free_port(), config=agg_config)
    agg.start()
    orin_jp6(tmp_path / "orin")
    proc = None
    log_path = tmp_path / "service.log"
    try:
        token = tmp_path / "token"
        token.write_text(device_token(db))
        sync = (
            f'[sync]\nurl = "http://127.0.0.1:{agg.port}"\nallow_http = true\ntoken_file = "{token}"\ninterval = "1s"'
        )
        config = write_config(tmp_path, tiny_model, n_batch=16, sync=sync, device="dev-1", extra="auto_apply = true")
        text = config.read_text().replace("requests = 3", "requests = 24").replace('every = "1h"', 'every = "2s"')
        text = text.replace("requests = 4\n", "requests = 2\n").replace("rounds = 3\n", "rounds = 2\n")
        text = text.replace('power_source = "none"', f'power_source = "none"\nsysfs_root = "{tmp_path / "orin"}"')
        config.write_text(text + "\n[gates]\nskip_when_throttled = false\n")
        proc = start_service(config, log_path)

        def genuine() -> list[dict[str, Any]]:
            rows = stored(db, "SELECT codec, body FROM measurements WHERE device_id = 'dev-1' ORDER BY seq")
            return [wire.from_wire(wire.loads(bytes(b), c)) for c, b in rows]

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(r["kind"] == "inference" for r in genuine()) < 24:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.3)
        mine = genuine()
        facts = next(r for r in mine if r["kind"] == "device_facts")["ext"]["device"]
        inference = [r for r in mine if r["kind"] == "inference" and r["ok"]]
        settings, model = inference[-1]["ext"]["settings"], inference[-1]["model_name"]
        tpot = sorted(r["tpot_ms"] for r in inference if r["tpot_ms"])[len(inference) // 2]

        def post_as(device: str, values: dict[str, Any], seed: int) -> None:
            store = SQLiteStore(db)
            try:
                secret = store.add_token(device, "device", time.time_ns() // 1000)
            finally:
                store.close()
            records = [facts_record(device, datetime.now(timezone.utc), **facts)]
            records += plant(device, 200, seed, {**settings, **values}, tpot * 0.3)
            for r in records[1:]:
                r["model_name"], r["strategy"] = model, inference[-1].get("strategy")
            for start in range(0, len(records), 100):
                request = urllib.request.Request(
                    f"http://127.0.0.1:{agg.port}/api/v1/ingest",
                    data=make_batch(records[start : start + 100], device=device),
                    headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/octet-stream"},
                )
                with urllib.request.urlopen(request) as answer:
                    assert answer.status == 200

        post_as("evil-1", {"n_threads": 1048576}, 1)
        post_as("evil-2", {"n_threads": 2}, 2)

        def document() -> dict[str, Any]:
            url = f"http://127.0.0.1:{agg.port}/api/v1/feedback?device=dev-1"
            with urllib.request.urlopen(url) as answer:
                docs = json.load(answer)["documents"]
            return docs[0] if docs else {}

        deadline = time.monotonic() + 30
        considered: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            considered = document().get("evidence_considered", [])
            if any(c["setting"] == "n_threads" for c in considered):
                break
            time.sleep(0.5)
        doc = document()
        assert doc["recommendations"] == [], doc["recommendations"]
        threads = [c for c in doc["evidence_considered"] if c["setting"] == "n_threads"]
        assert [c["value"] for c in threads] == [2], threads  # 1048576 is no setting at all
        assert threads[0]["devices"] == ["evil-2"]
        assert "at least 3 independent devices" in threads[0]["outcome"]
        time.sleep(3)  # acknowledgements keep arriving: none carries advice
        assert proc.poll() is None, log_path.read_text()
        data = tmp_path / "data"
        assert not (data / "tune" / "settings.toml").exists()
        assert [t for t in tune_steps(data, db) if t["step"] == "start"] == []

        # two more devices of the class report the same: three independent devices are fleet evidence
        post_as("evil-3", {"n_threads": 2}, 3)
        post_as("evil-4", {"n_threads": 2}, 4)
        deadline = time.monotonic() + 90
        started: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not started:
            assert proc.poll() is None, log_path.read_text()
            started = [t for t in tune_steps(data, db) if t["step"] == "start"]
            time.sleep(0.5)
        assert started and started[0]["trigger"].startswith("recommendation:"), log_path.read_text()
        assert started[0]["grid"] == {"n_threads": [1, 2]}  # measured here, current against recommended
        rec_doc = document()["recommendations"][0]
        devices = rec_doc["evidence"]["candidate"]["devices"]
        assert sorted(d["device_id"] for d in devices) == ["evil-2", "evil-3", "evil-4"]
        for d in devices:  # traceable to the stored records behind it
            assert d["records"]["requests"] > 0 and d["records"]["first_seq"] <= d["records"]["last_seq"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(t["step"] == "result" for t in tune_steps(data, db)):
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.5)
        assert proc.poll() is None, log_path.read_text()
    finally:
        if proc is not None:
            stop_service(proc, log_path)
        agg.stop()


def test_an_engine_that_aborts_during_a_tune_ends_that_candidate_and_the_service_lives(
    tmp_path: Path, tiny_model: Path
) -> None:
    """The service tunes on its schedule; its measuring process dies of SIGABRT (what std::bad_alloc does) in the
    middle of a block. The tune records the candidate as crashed with the signal (or, when the block was the
    baseline's, says it did not finish), the service goes on with its scheduled runs, and stops cleanly."""
    import psutil

    config = write_config(tmp_path, tiny_model, n_batch=16, extra='n_batch = [16, 64]\nevery = "2s"')
    text = config.read_text().replace('every = "1h"', 'every = "2s"')
    config.write_text(text.replace("rounds = 3\n", "rounds = 30\n"))  # a long tune: the signal lands inside it
    log_path = tmp_path / "service.log"
    proc = start_service(config, log_path)
    data = tmp_path / "data"
    try:
        deadline = time.monotonic() + 90
        worker = None
        while time.monotonic() < deadline and worker is None:
            assert proc.poll() is None, log_path.read_text()
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if "agent.tune_worker" in " ".join(child.cmdline()):
                        worker = child
                except psutil.NoSuchProcess:
                    continue
            time.sleep(0.05)
        assert worker is not None, log_path.read_text()
        time.sleep(0.5)
        worker.send_signal(signal.SIGABRT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "killed by SIGABRT" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
        assert "killed by SIGABRT" in log_path.read_text(), log_path.read_text()
        runs = len(outbox_records(data, "inference"))
        deadline = time.monotonic() + 120  # the scheduled runs go on (the tune ends, or they wait their turn)
        while time.monotonic() < deadline and len(outbox_records(data, "inference")) <= runs:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.3)
        assert len(outbox_records(data, "inference")) > runs
    finally:
        output = stop_service(proc, log_path)
    assert "tune did not finish" in output or any(
        t.get("crash_signal") == "SIGABRT" for t in (r["ext"]["tune"] for r in outbox_records(data, "tune"))
    ), output


def test_sigterm_during_a_tune_stops_the_service_within_seconds(tmp_path: Path, tiny_model: Path) -> None:
    """A long tune in progress does not hold the service past its stop timeout: the measuring process is ended,
    the search stops (nothing applied, a skipped record says why) and the service exits 0."""
    import psutil

    config = write_config(tmp_path, tiny_model, n_batch=16, extra='n_batch = [16, 64]\nevery = "1s"')
    config.write_text(config.read_text().replace("rounds = 3\n", "rounds = 100\n"))  # minutes of measuring
    log_path = tmp_path / "service.log"
    proc = start_service(config, log_path)
    deadline = time.monotonic() + 90
    worker = None
    while time.monotonic() < deadline and worker is None:
        assert proc.poll() is None, log_path.read_text()
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if "agent.tune_worker" in " ".join(child.cmdline()):
                    worker = child
        time.sleep(0.05)
    assert worker is not None, log_path.read_text()
    time.sleep(1.0)
    asked = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    took = time.monotonic() - asked
    output = stop_service(proc, log_path)
    assert took < 20, f"{took:.1f} s to stop"  # loose: a busy machine; the unit allows 90 s
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    steps = [r["ext"]["tune"] for r in outbox_records(tmp_path / "data", "tune")]
    assert any(t["step"] == "skipped" and "asked to stop" in t["reason"] for t in steps), (steps, output)
    assert not any(t["step"] == "apply" for t in steps)
