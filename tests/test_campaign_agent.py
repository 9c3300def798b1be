"""Benchmark campaigns on the device (issue 28, docs/campaigns.md "On the device"), against a real ``lens-agent run``
on a tiny model and a small fake aggregator (a real aiohttp server on 127.0.0.1) speaking the campaign protocol: the
ingest acknowledgement carries ``jobs``, ``GET``/``POST /api/v1/devices/{device}/jobs/{id}`` serve a job and take
its progress. Everything the fake sends may be hostile; the device checks it against its own bounds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.campaigns import JobNotice, parse_jobs
from lens_core import record_schema as rs
from lens_core import wire
from lens_core.suite import canonical_json

from .loop_server import LoopServer
from .test_tune import AGENT, ROOT, write_config

DEVICE = "camp-dev"
C2 = "concurrency 2"


def deadline_iso(seconds: float = 3600) -> str:
    at = datetime.now(timezone.utc) + timedelta(seconds=seconds)
    return at.isoformat(timespec="seconds").replace("+00:00", "Z")


def sha(document: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(document)).hexdigest()


class FakeAggregator(LoopServer):
    """Ingest (acknowledgements with ``jobs``), the health check, and the device's job endpoints; keeps every
    record it acknowledged and every progress report."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}  # id → {"configuration", "state", "deadline", "sha"}
        self.records: list[dict[str, Any]] = []
        self.progress: dict[str, list[dict[str, Any]]] = {}
        self.gets: list[str] = []
        self.ack_override: Callable[[], Any] | None = None  # the next acks' "jobs" (hostile), while set
        self.acks = 0
        self.lock = threading.Lock()
        super().__init__()

    def add_job(
        self, document: dict[str, Any], *, announced_sha: str | None = None, deadline: str | None = None
    ) -> str:
        job_id = str(uuid.uuid4())
        with self.lock:
            self.jobs[job_id] = {
                "configuration": document,
                "state": "queued",
                "deadline": deadline or deadline_iso(),
                "sha": announced_sha or sha(document),
            }
        return job_id

    def cancel(self, job_id: str) -> None:
        with self.lock:
            job = self.jobs[job_id]
            job["state"] = "cancelled" if job["state"] == "running" else job["state"]
            job["cancelled"] = True

    def campaign_records(self, job_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [
                r
                for r in self.records
                if isinstance(r.get("ext"), dict)
                and isinstance(r["ext"].get("campaign"), dict)
                and r["ext"]["campaign"].get("id") == job_id
                and (kind is None or r["kind"] == kind)
            ]

    def state(self, job_id: str) -> str:
        with self.lock:
            return str(self.jobs[job_id]["state"])

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def _app(self) -> web.Application:
        app = web.Application(client_max_size=self.client_max_size)
        app.router.add_get("/api/v1/health", self._health)
        app.router.add_post("/api/v1/ingest", self._ingest)
        app.router.add_get("/api/v1/devices/{device}/jobs/{job}", self._get_job)
        app.router.add_post("/api/v1/devices/{device}/jobs/{job}", self._post_job)
        return app

    # -- the protocol ---------------------------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"service": "lens-aggregator", "version": "fake"})

    def _ack_jobs(self) -> list[dict[str, Any]]:
        out = []
        for job_id, job in self.jobs.items():
            if job["state"] in ("queued", "running") or (job["state"] == "cancelled" and not job.get("acked")):
                out.append(
                    {
                        "benchmark_id": job_id,
                        "state": job["state"],
                        "deadline": job["deadline"],
                        "configuration_sha256": job["sha"],
                    }
                )
        return out[:8]

    async def _ingest(self, request: web.Request) -> web.Response:
        batch = wire.decode_batch(await request.read(), max_decompressed=64 * 1024**2)
        decoded = [wire.loads(body, batch.codec) for body in batch.records]
        with self.lock:
            self.records.extend(decoded)
            self.acks += 1
            ack = wire.ingest_ack(batch.batch_id, [r["id"] for r in decoded], len(decoded), 0)
            if self.ack_override is not None:
                ack["jobs"] = self.ack_override()
            else:
                jobs = self._ack_jobs()
                if jobs:
                    ack["jobs"] = jobs
        return web.json_response(ack)

    async def _get_job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job"]
        assert request.headers.get("Authorization") == "Bearer device-token"
        assert request.match_info["device"] == DEVICE
        with self.lock:
            self.gets.append(job_id)
            job = self.jobs.get(job_id)
            if job is None:
                return web.json_response({"error": "no_such_job"}, status=404)
            return web.json_response(
                {
                    "benchmark_id": job_id,
                    "configuration": job["configuration"],
                    "deadline": job["deadline"],
                    "state": job["state"],
                }
            )

    async def _post_job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job"]
        body = await request.json()
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return web.json_response({"error": "no_such_job"}, status=404)
            assert set(body) <= {"state", "progress_percent", "reason", "levels_done", "levels_total"}, body
            assert body["state"] in ("running", "succeeded", "failed", "cancelled"), body
            assert 0 <= body["progress_percent"] <= 100 and body["levels_total"] >= 1, body
            assert len(body.get("reason") or "") <= 300, body
            self.progress.setdefault(job_id, []).append(body)
            if job["state"] in ("succeeded", "failed", "cancelled", "timed_out"):
                job["acked"] = True
                return web.json_response({"error": "job_finished", "state": job["state"]}, status=409)
            job["state"] = "cancelled" if job.get("cancelled") else body["state"]
            return web.json_response({"state": job["state"]})


@contextlib.contextmanager
def fake_aggregator() -> Iterator[FakeAggregator]:
    fake = FakeAggregator().start()
    try:
        yield fake
    finally:
        fake.stop()


def agent_config(tmp_path: Path, model: Path, fake: FakeAggregator, every: str = "1h") -> Path:
    token = tmp_path / "token"
    token.write_text("device-token\n")
    (tmp_path / "data").mkdir(exist_ok=True)
    sync = f'[sync]\nurl = "{fake.url}"\nallow_http = true\ntoken_file = "{token}"\ninterval = "1s"'
    extra = '[suite]\nmax_concurrency = 8\nendpoints = ["http://127.0.0.1:9"]\n[gates]\nskip_when_throttled = false\n'
    config = write_config(tmp_path, model, n_batch=16, sync=sync, device=DEVICE, extra="")
    text = config.read_text().replace("[[workloads]]", extra + "[[workloads]]")
    text = text.replace(f'device_id = "{DEVICE}"', f'device_id = "{DEVICE}"\ntags = ["lab-a", "orin.64"]')
    config.write_text(text.replace('every = "1h"', f'every = "{every}"'))
    return config


def start_agent(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LENS_")}
    log = log_path.open("ab")
    return subprocess.Popen([*AGENT, "run", "-v", "--config", str(config)], cwd=ROOT, env=clean, stdout=log, stderr=log)


def stop_agent(proc: subprocess.Popen[bytes], log_path: Path) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    output = log_path.read_text()
    assert proc.returncode == 0, output
    assert "Traceback" not in output, output
    return output


def wait_for(what: str, check: Callable[[], Any], timeout: float, log_path: Path | None = None) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    tail = log_path.read_text()[-3000:] if log_path is not None and log_path.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def suite_doc(levels: list[int], requests: int, name: str = "camp", output_tokens: int = 4) -> dict[str, Any]:
    return {
        "test_suite": {"name": name, "version": "1"},
        "models": [{"name": "tiny", "endpoint": "gguf:default"}],
        "workloads": [
            {
                "name": "short",
                "concurrency_levels": levels,
                "requests": requests,
                "warmup_requests": 0,
                "output_token_target": output_tokens,
            }
        ],
    }


def job_file(tmp_path: Path, job_id: str) -> dict[str, Any]:
    return json.loads((tmp_path / "data" / "campaigns" / f"{job_id}.json").read_text())


def test_a_job_is_fetched_run_and_reported(tmp_path: Path, tiny_model: Path) -> None:
    with fake_aggregator() as fake:
        config = agent_config(tmp_path, tiny_model, fake)
        job_id = fake.add_job(suite_doc([1, 2], requests=3))
        log_path = tmp_path / "agent.log"
        proc = start_agent(config, log_path)
        try:
            wait_for("the job to succeed", lambda: fake.state(job_id) == "succeeded", 240, log_path)
            wait_for("the level records", lambda: len(fake.campaign_records(job_id, "campaign_level")) == 2, 60)
        finally:
            output = stop_agent(proc, log_path)
        levels = fake.campaign_records(job_id, "campaign_level")
        measured = [r for r in fake.campaign_records(job_id) if r["kind"] != "campaign_level"]
        suite_records = [r for r in fake.records if isinstance(r.get("ext"), dict) and "suite" in r["ext"]]
        assert suite_records and all("campaign" in r["ext"] for r in suite_records)  # every record of the run
        assert len(measured) == len(suite_records) == 6  # 2 levels × 3 requests, no warm-up
        by_level = {r["ext"]["campaign"]["level"]: r for r in levels}
        assert sorted(by_level) == ["concurrency 1", "concurrency 2"]
        for label, record in by_level.items():
            c = record["ext"]["campaign"]
            assert c["id"] == job_id and c["model"] == "tiny" and c["workload"] == "short" and c["levels_total"] == 2
            assert record["ok"] is True and record["output_tokens"] == 0
            results = record["ext"]["results"]
            assert (
                results["configuration"]["suite"]["level"] == label and results["results"]["requests"]["measured"] == 3
            )
            runs = {r["ext"]["campaign"]["level_run"] for r in measured if r["ext"]["suite"]["level"] == label}
            assert runs == {c["level_run"]}  # the level's measurements carry its level_run
            rs.check_record(record, time.time_ns() // 1000)  # within the wire's bounds (ext depth, nodes, strings)
        reports = fake.progress[job_id]
        assert reports[0]["state"] == "running" and reports[-1]["state"] == "succeeded"
        assert reports[-1]["progress_percent"] == 100 and reports[-1]["levels_done"] == 2
        assert job_file(tmp_path, job_id)["state"] == "succeeded"
        facts = [r for r in fake.records if r["kind"] == "device_facts"]
        assert facts and facts[0]["ext"]["device"]["tags"] == ["lab-a", "orin.64"]
        assert "accepted, 2 levels" in output
        status = subprocess.run(
            [*AGENT, "status", "--config", str(config), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        jobs = json.loads(status.stdout)["campaigns"]
        assert [(j["benchmark_id"], j["state"], j["progress_percent"]) for j in jobs] == [(job_id, "succeeded", 100.0)]
        text = subprocess.run(
            [*AGENT, "status", "--config", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=60
        ).stdout
        assert f"{job_id} succeeded (100 %, 2/2 levels)" in text


def test_a_cancelled_job_stops_at_its_next_check(tmp_path: Path, tiny_model: Path) -> None:
    with fake_aggregator() as fake:
        config = agent_config(tmp_path, tiny_model, fake)
        # a level of 4,000 requests (the tiny model answers one in a few ms: 400 could end before the first upload
        # shows the test any record, and the cancel would find the level done); the cancel cuts it short
        job_id = fake.add_job(suite_doc([1, 2, 4], requests=4000, output_tokens=16))
        log_path = tmp_path / "agent.log"
        proc = start_agent(config, log_path)
        try:
            wait_for("measurements of the job", lambda: len(fake.campaign_records(job_id)) >= 3, 240, log_path)
            fake.cancel(job_id)
            wait_for("the job to report cancelled", lambda: fake.progress[job_id][-1]["state"] == "cancelled", 120)
            counted = len(fake.campaign_records(job_id))
            time.sleep(3)
        finally:
            stop_agent(proc, log_path)
        after = fake.campaign_records(job_id)
        assert len(after) < 4000  # stopped before the first level's end
        assert len(after) - counted <= 2  # nothing measured after the report but what was in flight
        assert not fake.campaign_records(job_id, "campaign_level")
        assert job_file(tmp_path, job_id)["state"] == "cancelled"


def hostile_configurations(tmp_path: Path) -> list[tuple[dict[str, Any], str]]:
    """(configuration, what the refusal names) — each must be refused before anything runs."""
    secret = tmp_path / "outside" / "key"
    secret.parent.mkdir()
    secret.write_text("sk-not-for-the-suite\n")
    base = suite_doc([1], requests=1)

    def with_workload(**fields: Any) -> dict[str, Any]:
        doc = json.loads(json.dumps(base))
        doc["workloads"][0].update(fields)
        return doc

    def with_model(**fields: Any) -> dict[str, Any]:
        doc = json.loads(json.dumps(base))
        doc["models"] = [{"name": "cloud", **fields}]
        return doc

    return [
        (with_workload(input_dataset="/etc/passwd"), "$.workloads[0].input_dataset"),
        (with_workload(concurrency_levels=[1, 1000]), "$.workloads[0].concurrency_levels[1]"),
        (
            with_model(endpoint="http://127.0.0.1:9/v1", auth={"type": "bearer", "credentials_path": str(secret)}),
            "$.models[0].auth.credentials_path",
        ),
        (with_model(endpoint="http://user:pw@127.0.0.1:9/v1"), "$.models[0].endpoint"),
        # an endpoint whose origin [suite] endpoints does not list: a pushed suite may not contact it
        (with_model(endpoint="http://127.0.0.2:9/v1"), "$.models[0].endpoint"),
        (with_model(endpoint="http://127.0.0.1:10/v1"), "[suite] endpoints"),
        (with_workload(input_dataset="prompts.jsonl"), "$.workloads[0].input_dataset"),  # relative: no directory
    ]


def test_hostile_acks_and_configurations_change_nothing(tmp_path: Path, tiny_model: Path) -> None:
    bad_id = "not-a-uuid"
    huge = "x" * 20_000
    hostile_acks: list[Any] = [
        {"jobs": "all of them"},
        [
            {
                "benchmark_id": str(uuid.uuid4()),
                "state": "queued",
                "deadline": deadline_iso(),
                "configuration_sha256": "0" * 64,
            }
        ]
        * 9,
        [{"benchmark_id": bad_id, "state": "queued", "deadline": deadline_iso(), "configuration_sha256": "0" * 64}],
        [{"benchmark_id": str(uuid.uuid4()), "state": huge, "deadline": huge, "configuration_sha256": huge}],
        [
            {
                "benchmark_id": str(uuid.uuid4()),
                "state": "succeeded",
                "deadline": deadline_iso(),
                "configuration_sha256": "0" * 64,
            }
        ],
        [7, None, [], "x"],
        [0] * 10_000,  # 20 kB: within the acknowledgement's 64 KiB, far past the protocol's 8 jobs
    ]
    with fake_aggregator() as fake:
        config = agent_config(tmp_path, tiny_model, fake, every="1s")  # records to upload: an ack a second
        sequence = iter(hostile_acks)
        served: list[Any] = []

        def next_hostile() -> Any:
            item = next(sequence, None)
            if item is None:
                fake.ack_override = None
                return []
            served.append(item)
            return item["jobs"] if isinstance(item, dict) else item

        fake.ack_override = next_hostile
        log_path = tmp_path / "agent.log"
        proc = start_agent(config, log_path)
        try:
            # the acks a hostile party shapes: the model_load and facts records, then the periodic sync's
            wait_for("every hostile ack served", lambda: fake.ack_override is None, 120, log_path)
            assert not fake.gets and not (tmp_path / "data" / "campaigns").exists()  # nothing fetched, nothing kept
            refused = [(fake.add_job(doc), where) for doc, where in hostile_configurations(tmp_path)]
            mismatch = fake.add_job(suite_doc([1], requests=1, name="tampered"), announced_sha="a" * 64)
            wait_for(
                "every refusal reported",
                lambda: all(fake.state(j) == "failed" for j, _ in [*refused, (mismatch, "")]),
                120,
                log_path,
            )
            good = fake.add_job(suite_doc([1], requests=2))
            wait_for("the good job to succeed", lambda: fake.state(good) == "succeeded", 240, log_path)
        finally:
            output = stop_agent(proc, log_path)
        for job_id, where in refused:
            report = fake.progress[job_id][-1]
            assert report["state"] == "failed" and where in report["reason"], (where, report)
            assert "sk-not-for-the-suite" not in report["reason"]
            assert not fake.campaign_records(job_id)  # nothing ran
        report = fake.progress[mismatch][-1]
        assert report["state"] == "failed" and "hashes to" in report["reason"] and "a" * 64 in report["reason"]
        assert not fake.campaign_records(mismatch)
        assert len(fake.campaign_records(good, "campaign_level")) == 1
        assert "jobs is str; allowed: a list" in output
        assert "jobs holds 9 items; allowed: at most 8" in output
        assert "jobs holds 10000 items; allowed: at most 8" in output
        assert "benchmark_id 'not-a-uuid'" in output
        assert "allowed: queued, running, cancelled" in output
        assert huge not in output  # a huge field is named, not echoed
        files = sorted(p.stem for p in (tmp_path / "data" / "campaigns").glob("*.json"))
        assert len(files) <= 8
        scheduled = [r for r in fake.records if r["kind"] == "inference" and r["ext"].get("workload") == "long"]
        assert len(scheduled) >= 6  # the scheduled workload ran on throughout (3 requests a run)


def stored_in_outbox(data_dir: Path, job_id: str) -> list[dict[str, Any]]:
    """The job's records the agent has stored and not yet uploaded (read-only, beside the running agent)."""
    try:
        conn = sqlite3.connect(f"file:{data_dir / 'outbox.db'}?mode=ro", uri=True, timeout=5)
    except sqlite3.OperationalError:  # not created yet
        return []
    try:
        rows = conn.execute("SELECT codec, body FROM records ORDER BY seq").fetchall()
    except sqlite3.OperationalError:  # no table yet
        return []
    finally:
        conn.close()
    records = [wire.loads(bytes(body), codec) for codec, body in rows]
    return [r for r in records if (r.get("ext") or {}).get("campaign", {}).get("id") == job_id]


def test_an_agent_killed_mid_job_resumes_with_a_new_level_run(tmp_path: Path, tiny_model: Path) -> None:
    with fake_aggregator() as fake:
        config = agent_config(tmp_path, tiny_model, fake)
        # levels of a second or more each: the second one is seen from its first stored record (in the outbox, or
        # already uploaded), a poll of 0.2 s
        job_id = fake.add_job(suite_doc([1, 2, 4], requests=600, output_tokens=8))
        log_path = tmp_path / "agent.log"
        proc = start_agent(config, log_path)

        def second_level_started() -> bool:
            try:
                done = job_file(tmp_path, job_id)["levels_done"]
            except (OSError, ValueError):  # not written yet
                return False
            if len(done) != 1:
                return False
            records = [*fake.campaign_records(job_id), *stored_in_outbox(tmp_path / "data", job_id)]
            return any(r["ext"].get("suite", {}).get("level") == C2 for r in records)

        try:
            wait_for("the second level under way", second_level_started, 300, log_path)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        before = job_file(tmp_path, job_id)
        assert before["state"] == "running" and before["attempts"] == 1 and len(before["levels_done"]) == 1
        proc = start_agent(config, log_path)
        try:
            wait_for("the resumed job to succeed", lambda: fake.state(job_id) == "succeeded", 300, log_path)
            wait_for("three level records", lambda: len(fake.campaign_records(job_id, "campaign_level")) == 3, 60)
        finally:
            stop_agent(proc, log_path)
        levels = fake.campaign_records(job_id, "campaign_level")
        keys = [r["ext"]["campaign"]["level"] for r in levels]
        assert sorted(keys) == ["concurrency 1", "concurrency 2", "concurrency 4"]  # each level once
        final = {r["ext"]["campaign"]["level"]: r["ext"]["campaign"]["level_run"] for r in levels}
        c2_runs = {
            r["ext"]["campaign"]["level_run"]
            for r in fake.campaign_records(job_id)
            if r["kind"] != "campaign_level" and r["ext"]["suite"]["level"] == "concurrency 2"
        }
        assert len(c2_runs) == 2 and final["concurrency 2"] in c2_runs  # the interrupted attempt kept its own level_run
        assert final["concurrency 1"] == before["levels_done"][0]["level_run"]  # the level done before the kill stands
        after = job_file(tmp_path, job_id)
        assert after["attempts"] == 2 and after["state"] == "succeeded"


def test_parse_jobs_refuses_what_the_contract_does_not_allow() -> None:
    good = {
        "benchmark_id": str(uuid.uuid4()),
        "state": "queued",
        "deadline": deadline_iso(),
        "configuration_sha256": "f" * 64,
    }
    notices, problems = parse_jobs({"jobs": [good]})
    assert notices == [JobNotice(good["benchmark_id"], "queued", notices[0].deadline_us, good["deadline"], "f" * 64)]
    assert not problems
    for bad, says in (
        ({**good, "benchmark_id": good["benchmark_id"].upper()}, "benchmark_id"),
        ({**good, "state": "succeeded"}, "state"),
        ({**good, "deadline": "tomorrow"}, "deadline"),
        ({**good, "deadline": "2026-01-01T00:00:00"}, "with a zone"),
        ({**good, "configuration_sha256": "F" * 64}, "configuration_sha256"),
        ({**good, "benchmark_id": True}, "benchmark_id"),
    ):
        notices, problems = parse_jobs({"jobs": [bad]})
        assert not notices and says in problems[0], (bad, problems)
    assert parse_jobs({"jobs": [good, good]})[1] == [f"jobs[1].benchmark_id {good['benchmark_id']}: given twice"]
    assert parse_jobs({}) == ([], [])
    # the hash the aggregator announces: keys sorted, compact, UTF-8 with non-ASCII kept
    assert canonical_json({"b": [1, 2.5], "a": "é"}) == '{"a":"é","b":[1,2.5]}'.encode()


def test_tags_are_bounded_in_the_config_at_ingest_and_in_the_facts_view(tmp_path: Path) -> None:
    from agent.config import load_config
    from aggregator.health import facts_from_record
    from lens_core.errors import ConfigError

    from .test_names_and_facts import NOW, facts_wire

    config = tmp_path / "agent.toml"
    for good, expected in (('["lab-a", "orin.64", "lab-a"]', ["lab-a", "orin.64"]), ("[]", [])):
        config.write_text(f"[agent]\ntags = {good}\n")
        assert load_config(config).get("agent", "tags") == expected
    for bad in ('["lab a"]', '["' + "x" * 65 + '"]', str([f"t{i}" for i in range(17)]), "[1]"):
        config.write_text(f"[agent]\ntags = {bad}\n".replace("'", '"'))
        with pytest.raises(ConfigError, match=r"agent\.tags"):
            load_config(config)
    rs.check_record(facts_wire(tags=["lab-a", "x" * 64]), NOW)
    for tags, field in (
        ("lab-a", "ext.device.tags"),
        ([f"t{i}" for i in range(17)], "ext.device.tags"),
        (["ok", "bad\x1b[31m"], "ext.device.tags[1]"),
        (["x" * 65], "ext.device.tags[0]"),
        ([7], "ext.device.tags[0]"),
    ):
        with pytest.raises(rs.SchemaError) as refused:
            rs.check_record(facts_wire(tags=tags), NOW)
        assert refused.value.field == field, tags
    view = facts_from_record({"ext": {"device": {"tags": ["a", 7, "b" * 300, *(["c"] * 40)]}}})
    assert view is not None and view["tags"][:2] == ["a", "b" * 64] and len(view["tags"]) <= 16
    assert facts_from_record({"ext": {"device": {"tags": "a"}}})["tags"] == []  # type: ignore[index]


def test_three_interrupted_attempts_and_a_passed_deadline_end_a_job_failed(tmp_path: Path, tiny_model: Path) -> None:
    from agent.campaigns import JobFiles, JobNotice, new_job

    with fake_aggregator() as fake:
        config = agent_config(tmp_path, tiny_model, fake)
        document = suite_doc([1, 2], requests=3)
        worn = fake.add_job(document)
        fake.jobs[worn]["state"] = "running"
        job = new_job(JobNotice(worn, "running", 0, fake.jobs[worn]["deadline"], sha(document)), document, 2)
        job.update(state="running", attempts=3, deadline_us=int((time.time() + 3600) * 1e6), reported=True)
        JobFiles(tmp_path / "data").save(job)  # as three processes that died mid-job left it
        late = fake.add_job(suite_doc([1], requests=100_000, output_tokens=16), deadline=deadline_iso(6))
        log_path = tmp_path / "agent.log"
        proc = start_agent(config, log_path)
        try:
            wait_for("the worn job to fail", lambda: fake.state(worn) == "failed", 120, log_path)
            wait_for("the late job to fail", lambda: fake.state(late) == "failed", 120, log_path)
        finally:
            stop_agent(proc, log_path)
        assert fake.progress[worn][-1]["reason"] == "interrupted, 3 attempts"
        assert not fake.campaign_records(worn)  # nothing ran a fourth time
        report = fake.progress[late][-1]
        assert report["reason"].startswith("deadline ") and "passed before the run finished" in report["reason"]
        measured = fake.campaign_records(late)
        assert 0 < len(measured) < 100_000 and not fake.campaign_records(late, "campaign_level")
        assert job_file(tmp_path, late)["state"] == "failed"


def test_a_gated_job_waits_says_why_and_runs_once_the_gate_opens(tmp_path: Path, tiny_model: Path) -> None:
    from .sysfs_trees import orin_jp6

    orin_jp6(tmp_path / "orin")  # its GPU zone is past its passive trip point: throttled
    with fake_aggregator() as fake:
        config = agent_config(tmp_path, tiny_model, fake)
        text = config.read_text().replace("skip_when_throttled = false", "skip_when_throttled = true")
        config.write_text(text.replace("[probes]", f'[probes]\nsysfs_root = "{tmp_path / "orin"}"'))
        job_id = fake.add_job(suite_doc([1], requests=2))
        log_path = tmp_path / "agent.log"
        proc = start_agent(config, log_path)
        try:
            wait_for("the wait reported", lambda: fake.progress.get(job_id), 120, log_path)
            time.sleep(3)  # several passes while the gate holds
            assert not fake.campaign_records(job_id)
            zone = tmp_path / "orin" / "sys" / "class" / "thermal" / "thermal_zone1" / "temp"
            zone.write_text("60000\n")
            wait_for("the job to succeed", lambda: fake.state(job_id) == "succeeded", 120, log_path)
        finally:
            stop_agent(proc, log_path)
        reports = fake.progress[job_id]
        waits = [r for r in reports if (r.get("reason") or "").startswith("waiting: ")]
        assert waits and "thermally throttled" in waits[0]["reason"] and waits[0]["state"] == "running"
        assert len(waits) == 1  # the same wait is reported once, not at every pass
        assert reports[-1]["state"] == "succeeded" and "reason" not in reports[-1]
        assert len(fake.campaign_records(job_id, "campaign_level")) == 1


def test_an_endpoint_job_reads_its_key_from_the_data_directory(
    tmp_path: Path, tiny_model: Path, llama_server_bin: Path
) -> None:
    """A pushed suite loading an endpoint with a key kept in ``<data_dir>/credentials/`` (the campaign policy's own
    directory): run, every record tagged, the key nowhere in what is uploaded or logged."""
    from .llama_server import LlamaServerProcess
    from .netproxy import free_port

    secret = "sk-campaign-endpoint-key"
    port = free_port()
    with fake_aggregator() as fake, LlamaServerProcess(llama_server_bin, tiny_model, port, ["--api-key", secret]):
        config = agent_config(tmp_path, tiny_model, fake)
        # the server's origin is one a pushed suite may contact ([suite] endpoints)
        listed = 'endpoints = ["http://127.0.0.1:9"]'
        config.write_text(
            config.read_text().replace(listed, f'endpoints = ["http://127.0.0.1:9", "http://127.0.0.1:{port}"]')
        )
        key = tmp_path / "data" / "credentials" / "served.key"
        key.parent.mkdir(parents=True)
        key.write_text(secret + "\n")
        document = {
            "test_suite": {"name": "served"},
            "models": [
                {
                    "name": "served",
                    "endpoint": f"http://127.0.0.1:{port}/v1",
                    "api_type": "custom",
                    "auth": {"type": "bearer", "credentials_path": str(key)},
                }
            ],
            "workloads": [{"name": "sweep", "concurrency_levels": [1, 2], "requests": 3, "output_token_target": 4}],
        }
        job_id = fake.add_job(document)
        log_path = tmp_path / "agent.log"
        proc = start_agent(config, log_path)
        try:
            wait_for("the job to succeed", lambda: fake.state(job_id) == "succeeded", 240, log_path)
            wait_for("two level records", lambda: len(fake.campaign_records(job_id, "campaign_level")) == 2, 60)
        finally:
            output = stop_agent(proc, log_path)
        measured = [r for r in fake.campaign_records(job_id) if r["kind"] != "campaign_level"]
        assert len([r for r in measured if not r.get("warmup")]) == 6 and all(r["ok"] for r in measured)
        for level in fake.campaign_records(job_id, "campaign_level"):
            results = level["ext"]["results"]["results"]
            assert results["error_metrics"]["total_errors"] == 0 and results["requests"]["measured"] == 3
        uploaded = json.dumps([{k: v for k, v in r.items() if k != "id"} for r in fake.records], default=str)
        assert secret not in uploaded and secret not in output
