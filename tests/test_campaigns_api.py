"""Benchmark campaigns (docs/campaigns.md) through a real aiohttp server on 127.0.0.1, on both stores: the
operator API, the device job endpoints, the jobs in the ingest acknowledgement and the deadline task."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import pytest

from agent.synthetic import synthetic_records
from aggregator import campaigns
from aggregator.app import Settings, create_app
from aggregator.campaigns import CampaignSettings
from aggregator.store import Store
from lens_core import protobuf, wire
from lens_core.proto.llm_latency_lens.v1 import measurement_pb2 as pb

SUITE: dict[str, Any] = {
    "test_suite": {"name": "nightly"},
    "models": [{"name": "small", "endpoint": "http://127.0.0.1:8080/v1"}],
    "workloads": [{"name": "chat", "concurrency_levels": [1, 2], "requests": 4}],
}
DEVICES = {"dev-a": ("orin-agx", ["lab-a"]), "dev-b": ("pi5", ["lab-b"]), "dev-c": ("orin-agx", ["lab-b", "hot"])}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def record(device: str, kind: str, ext: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    base = synthetic_records(1, seed=seed, device_id=device)[0]
    now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    base.update(kind=kind, ext=ext, id=str(uuid.uuid4()), started_at=now, output_tokens=0)
    return base


def batch(device: str, records: list[dict[str, Any]]) -> bytes:
    blobs = [wire.encode_record(r, "cbor") for r in records]
    return wire.encode_batch(blobs, device_id=device, batch_id=str(uuid.uuid4()), sent_us=1, codec="cbor")


def facts(device: str) -> dict[str, Any]:
    device_class, tags = DEVICES[device]
    return record(device, "device_facts", {"device": {"device_class": device_class, "tags": tags}})


def level_record(device: str, campaign: str, workload: str, concurrency: int, ttft: float) -> dict[str, Any]:
    results = {
        "latency_metrics": {
            "time_to_first_token": {"p50_ms": ttft, "p95_ms": ttft * 2},
            "end_to_end_latency": {"p50_ms": 100.0, "p95_ms": 150.0, "sample_count": 4},
        },
        "throughput_metrics": {"tokens_per_second": 20.0 + concurrency},
        "error_metrics": {"total_errors": 0, "error_rate": 0.0},
    }
    document = {"metadata": {"benchmark_id": str(uuid.uuid4())}, "configuration": {}, "results": results}
    mark = {
        "id": campaign,
        "level_run": str(uuid.uuid4()),
        "model": "small",
        "workload": workload,
        "level": f"concurrency {concurrency}",
        "levels_done": 1,
        "levels_total": 2,
    }
    return record(device, "campaign_level", {"campaign": mark, "results": document})


class Fleet:
    """An app over the store with three devices that have sent their facts, their tokens and an operator's."""

    def __init__(self, client: Any, store: Store, clock: Clock) -> None:
        self.client, self.store, self.clock = client, store, clock
        now = int(clock() * 1e6)
        self.tokens = {device: store.add_token(device, "device", now) for device in DEVICES}
        self.operator = store.add_token("ops", "operator", now)
        self.reader = store.add_token("grafana", "read", now)

    async def ingest(self, device: str, records: list[dict[str, Any]]) -> dict[str, Any]:
        response = await self.client.post(
            "/api/v1/ingest", data=batch(device, records), headers=auth(self.tokens[device])
        )
        assert response.status == 200, await response.text()
        return dict(await response.json())

    async def start(self, status: int = 201, **body: Any) -> dict[str, Any]:
        body.setdefault("configuration", SUITE)
        response = await self.client.post("/api/v1/benchmark/start", json=body, headers=auth(self.operator))
        answer = dict(await response.json())
        assert response.status == status, answer
        return answer

    async def get(self, path: str, status: int = 200, token: str | None = None) -> Any:
        response = await self.client.get(path, headers=auth(token or self.operator))
        answer = await response.json()
        assert response.status == status, answer
        return answer

    async def report(self, device: str, campaign: str, status: int = 200, **body: Any) -> dict[str, Any]:
        if body.get("state") == "succeeded":  # SUITE runs 2 levels: a success reports both done
            body.setdefault("levels_done", 2)
            body.setdefault("levels_total", 2)
        response = await self.client.post(
            f"/api/v1/devices/{device}/jobs/{campaign}", json=body, headers=auth(self.tokens[device])
        )
        answer = dict(await response.json())
        assert response.status == status, answer
        return answer


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def make_fleet(aiohttp_client: Any, store: Store, clock: Clock, **campaign_settings: Any) -> Fleet:
    settings = Settings(campaigns=CampaignSettings(check_interval_s=3600, **campaign_settings))
    client = await aiohttp_client(create_app(settings, store, clock=clock))
    fleet = Fleet(client, store, clock)
    for device in DEVICES:
        await fleet.ingest(device, [facts(device)])
    return fleet


@pytest.fixture
async def fleet(aiohttp_client: Any, store: Store, clock: Clock) -> Fleet:
    return await make_fleet(aiohttp_client, store, clock)


async def test_start_status_list_cancel(fleet: Fleet) -> None:
    started = await fleet.start(target={"devices": ["dev-a", "ghost"]}, name="first", deadline_seconds=3600)
    campaign = started["benchmark_id"]
    assert uuid.UUID(campaign).version == 4
    assert started["status"] == "pending" and started["devices"] == ["dev-a"]
    assert started["skipped"] == {"ghost": "unknown device"}
    assert started["estimated_duration_seconds"] > 0
    status = await fleet.get(f"/api/v1/benchmark/{campaign}/status")
    assert status["status"] == "pending" and status["name"] == "first" and status["started_at"] is None
    assert status["counts"] == {"queued": 1, "skipped": 1}
    assert status["devices"]["ghost"]["reason"] == "unknown device"
    assert status["devices"]["dev-a"]["state"] == "queued" and status["progress_percent"] == 0
    deadline = datetime.fromisoformat(status["deadline"].replace("Z", "+00:00")).timestamp()
    assert abs(deadline - (fleet.clock() + 3600)) < 2
    listed = await fleet.get("/api/v1/benchmark")
    assert [c["benchmark_id"] for c in listed] == [campaign] and listed[0]["counts"] == {"queued": 1, "skipped": 1}
    stored = fleet.store.campaign(campaign)
    assert stored is not None and json.loads(stored.configuration) == SUITE and stored.created_by == "ops"
    cancelled = await (
        await fleet.client.post(f"/api/v1/benchmark/{campaign}/cancel", headers=auth(fleet.operator))
    ).json()
    assert cancelled == {"benchmark_id": campaign, "status": "cancelled"}
    again = await fleet.client.post(f"/api/v1/benchmark/{campaign}/cancel", headers=auth(fleet.operator))
    assert again.status == 409 and (await again.json())["error"] == "campaign_finished"
    status = await fleet.get(f"/api/v1/benchmark/{campaign}/status")
    assert status["status"] == "cancelled" and status["devices"]["dev-a"]["state"] == "cancelled"
    # a queued job of a cancelled campaign is not offered to the device any more
    assert "jobs" not in await fleet.ingest("dev-a", [facts("dev-a")])


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ({"classes": ["orin-agx"]}, ["dev-a", "dev-c"]),
        ({"tags": ["lab-b"]}, ["dev-b", "dev-c"]),
        ({"classes": ["pi5"], "tags": ["hot"]}, ["dev-b", "dev-c"]),
        ({"all": True}, ["dev-a", "dev-b", "dev-c"]),
        ({"devices": ["dev-b"], "classes": ["nothing"]}, ["dev-b"]),
    ],
)
async def test_targeting_snapshot(fleet: Fleet, target: dict[str, Any], expected: list[str]) -> None:
    started = await fleet.start(target=target)
    assert started["devices"] == expected and started["skipped"] == {}
    for device in DEVICES:  # each targeted device sees its job in its next acknowledgement
        jobs = (await fleet.ingest(device, [facts(device)])).get("jobs", [])
        assert [j["benchmark_id"] for j in jobs] == ([started["benchmark_id"]] if device in expected else [])
        if jobs:
            stored = fleet.store.campaign(started["benchmark_id"])
            assert stored is not None and jobs[0]["configuration_sha256"] == stored.configuration_sha256
            assert jobs[0]["state"] == "queued" and jobs[0]["deadline"].endswith("Z")


async def test_no_matching_device_is_400(fleet: Fleet) -> None:
    answer = await fleet.start(400, target={"devices": ["ghost"], "classes": ["nothing"]})
    assert answer["error"] == "no_devices" and answer["skipped"] == {"ghost": "unknown device"}
    assert fleet.store.campaigns() == []


async def test_only_an_operator_token_reaches_campaigns(fleet: Fleet) -> None:
    campaign = (await fleet.start(target={"devices": ["dev-a"]}))["benchmark_id"]
    paths = [
        ("POST", "/api/v1/benchmark/start"),
        ("GET", "/api/v1/benchmark"),
        ("GET", f"/api/v1/benchmark/{campaign}/status"),
        ("GET", f"/api/v1/benchmark/{campaign}/results"),
        ("GET", f"/api/v1/benchmark/{campaign}/export?format=json"),
        ("POST", f"/api/v1/benchmark/{campaign}/cancel"),
    ]
    for method, path in paths:
        for token in (fleet.tokens["dev-a"], fleet.reader):
            response = await fleet.client.request(method, path, json={"configuration": SUITE}, headers=auth(token))
            assert response.status == 403 and (await response.json())["error"] == "operator_token_required", path
        response = await fleet.client.request(method, path)
        assert response.status == 401, path
    assert (await fleet.get(f"/api/v1/benchmark/{campaign}/status"))["status"] == "pending"  # not cancelled
    assert len(fleet.store.campaigns()) == 1


async def test_a_device_reads_and_reports_only_its_own_job(fleet: Fleet) -> None:
    campaign = (await fleet.start(target={"devices": ["dev-a", "dev-b"]}))["benchmark_id"]
    path = f"/api/v1/devices/dev-a/jobs/{campaign}"
    job = await fleet.get(path, token=fleet.tokens["dev-a"])
    assert job["benchmark_id"] == campaign and job["configuration"] == SUITE and job["state"] == "queued"
    other = await fleet.client.get(path, headers=auth(fleet.tokens["dev-b"]))
    assert other.status == 403 and (await other.json())["error"] == "wrong_device"
    posted = await fleet.client.post(path, json={"state": "failed"}, headers=auth(fleet.tokens["dev-b"]))
    assert posted.status == 403 and (await posted.json())["error"] == "wrong_device"
    for token in (fleet.operator, fleet.reader):
        assert (await fleet.client.get(path, headers=auth(token))).status == 403
    assert (await fleet.client.get(path)).status == 401
    assert (await fleet.get(f"/api/v1/devices/dev-c/jobs/{campaign}", 404, fleet.tokens["dev-c"]))["error"] == (
        "no_such_job"
    )
    assert (await fleet.get("/api/v1/devices/dev-a/jobs/not-a-uuid", 404, fleet.tokens["dev-a"]))["error"] == (
        "no_such_job"
    )
    # an idle device (nothing to upload, no acknowledgement) asks for its job list: what an ack would carry
    listed = await fleet.get("/api/v1/devices/dev-a/jobs", token=fleet.tokens["dev-a"])
    assert [(j["benchmark_id"], j["state"]) for j in listed["jobs"]] == [(campaign, "queued")]
    assert (await fleet.get("/api/v1/devices/dev-c/jobs", token=fleet.tokens["dev-c"])) == {"jobs": []}
    other_list = await fleet.client.get("/api/v1/devices/dev-a/jobs", headers=auth(fleet.tokens["dev-b"]))
    assert other_list.status == 403 and (await other_list.json())["error"] == "wrong_device"
    status = await fleet.get(f"/api/v1/benchmark/{campaign}/status")
    assert status["counts"] == {"queued": 2}  # nothing changed


BAD_CONFIGURATIONS = [
    ({**SUITE, "models": "small"}, "$.models"),
    ({**SUITE, "workloads": [{"name": "chat", "concurrency": 10**6}]}, "$.workloads[0].concurrency"),
    (
        {**SUITE, "models": [{"name": "small", "endpoint": "http://user:secret@127.0.0.1:8080/v1"}]},
        "$.models[0].endpoint",
    ),
    (
        {**SUITE, "models": [{"name": "small", "endpoint": "https://api.example/v1?api_key=sk-1"}]},
        "$.models[0].endpoint",
    ),
    ([1, 2], "$"),
]


@pytest.mark.parametrize(("configuration", "path"), BAD_CONFIGURATIONS)
async def test_bad_configuration_is_refused_with_its_json_path(fleet: Fleet, configuration: Any, path: str) -> None:
    answer = await fleet.start(400, configuration=configuration, target={"all": True})
    assert answer["error"] == "bad_configuration" and answer["path"] == path, answer
    assert "secret" not in json.dumps(answer) and "sk-1" not in json.dumps(answer)
    assert fleet.store.campaigns() == []


BAD_REQUESTS = [
    ({"target": {"classes": [5]}}, "$.target.classes[0]"),
    ({"target": {"devices": ["bad id with spaces"]}}, "$.target.devices[0]"),
    ({"target": {"tags": ["x" * 65]}}, "$.target.tags[0]"),
    ({"target": {"all": "yes"}}, "$.target.all"),
    ({"target": {}}, "$.target"),
    ({"target": {"all": True, "everyone": True}}, "$.target.everyone"),
    ({"target": {"all": True}, "deadline_seconds": 5}, "$.deadline_seconds"),
    ({"target": {"all": True}, "deadline_seconds": 10**7}, "$.deadline_seconds"),
    ({"target": {"all": True}, "name": "a\x1b[31mred"}, "$.name"),
    ({"target": {"all": True}, "callback_url": "ftp://example.com/x"}, "$.callback_url"),
    ({"target": {"all": True}, "callback_url": "https://example.com/hook"}, "$.callback_url"),  # no secret file
    ({"target": {"all": True}, "priority": 1}, "$.priority"),
]


@pytest.mark.parametrize(("body", "path"), BAD_REQUESTS)
async def test_bad_fields_are_refused_with_their_json_path(fleet: Fleet, body: dict[str, Any], path: str) -> None:
    answer = await fleet.start(400, **body)
    assert answer["error"] == "bad_request" and answer["path"] == path, answer
    assert fleet.store.campaigns() == []


async def test_malformed_bodies_and_ids(fleet: Fleet) -> None:
    headers = auth(fleet.operator)
    big = await fleet.client.post("/api/v1/benchmark/start", data=b"{" + b" " * (1024**2 + 10) + b"}", headers=headers)
    assert big.status == 413
    for body in (b"{not json", b'{"configuration": NaN}', b"[" * 100 + b"]" * 100):
        response = await fleet.client.post("/api/v1/benchmark/start", data=body, headers=headers)
        assert response.status == 400 and (await response.json())["path"] == "$"
    for bad_id in ("nope", "1" * 40, str(uuid.uuid4()).upper() + "x"):
        assert (await fleet.get(f"/api/v1/benchmark/{bad_id}/status", 404))["error"] == "no_such_campaign"
    assert (await fleet.get(f"/api/v1/benchmark/{uuid.uuid4()}/status", 404))["error"] == "no_such_campaign"
    cancel = await fleet.client.post(f"/api/v1/benchmark/{uuid.uuid4()}/cancel", headers=headers)
    assert cancel.status == 404


async def test_job_transitions(fleet: Fleet) -> None:
    campaign = (await fleet.start(target={"devices": ["dev-a", "dev-b"]}))["benchmark_id"]
    for state in ("queued", "timed_out", "skipped", "done"):
        answer = await fleet.report("dev-a", campaign, 400, state=state)
        assert answer["error"] == "bad_request" and answer["path"] == "$.state"
    for body, path in (
        ({"state": "running", "progress_percent": 101}, "$.progress_percent"),
        ({"state": "running", "progress_percent": True}, "$.progress_percent"),
        ({"state": "running", "levels_done": -1}, "$.levels_done"),
        ({"state": "running", "levels_total": 0}, "$.levels_total"),
        ({"state": "running", "reason": "x" * 301}, "$.reason"),
        ({"state": "running", "extra": 1}, "$.extra"),
    ):
        assert (await fleet.report("dev-a", campaign, 400, **body))["path"] == path
    running = await fleet.report(
        "dev-a",
        campaign,
        state="running",
        progress_percent=50,
        levels_done=1,
        levels_total=2,
        reason="gated\x1b[2J: hot",
    )
    assert running == {"state": "running"}
    status = await fleet.get(f"/api/v1/benchmark/{campaign}/status")
    assert status["status"] == "running" and status["started_at"] is not None
    assert status["estimated_completion"] is not None
    job = status["devices"]["dev-a"]
    assert job["state"] == "running" and job["progress_percent"] == 50 and job["reason"] == "gated[2J: hot"
    assert status["progress_percent"] == 25
    assert await fleet.report("dev-a", campaign, state="succeeded", levels_done=2) == {"state": "succeeded"}
    finished = await fleet.report("dev-a", campaign, 409, state="running")
    assert finished["error"] == "job_finished" and finished["state"] == "succeeded"
    assert (await fleet.get(f"/api/v1/benchmark/{campaign}/status"))["status"] == "running"  # dev-b still queued
    assert await fleet.report("dev-b", campaign, state="failed", reason="suite refused") == {"state": "failed"}
    status = await fleet.get(f"/api/v1/benchmark/{campaign}/status")
    assert status["status"] == "completed" and status["counts"] == {"succeeded": 1, "failed": 1}
    assert status["progress_percent"] == 100 and status["estimated_completion"] is None
    cancel = await fleet.client.post(f"/api/v1/benchmark/{campaign}/cancel", headers=auth(fleet.operator))
    assert cancel.status == 409


async def test_campaign_fails_when_no_job_succeeds(fleet: Fleet) -> None:
    campaign = (await fleet.start(target={"devices": ["dev-a"]}))["benchmark_id"]
    assert await fleet.report("dev-a", campaign, state="failed") == {"state": "failed"}
    status = await fleet.get(f"/api/v1/benchmark/{campaign}/status")
    assert status["status"] == "failed" and status["started_at"] is not None and status["finished_at"] is not None


async def test_a_cancelled_running_job_reads_cancelled_in_the_next_ack(fleet: Fleet) -> None:
    campaign = (await fleet.start(target={"devices": ["dev-a", "dev-b"]}))["benchmark_id"]
    assert await fleet.report("dev-a", campaign, state="running") == {"state": "running"}
    assert (await fleet.client.post(f"/api/v1/benchmark/{campaign}/cancel", headers=auth(fleet.operator))).status == 200
    jobs = (await fleet.ingest("dev-a", [facts("dev-a")]))["jobs"]
    assert [(j["benchmark_id"], j["state"]) for j in jobs] == [(campaign, "cancelled")]
    assert "jobs" not in await fleet.ingest("dev-b", [facts("dev-b")])  # its queued job was cancelled at once
    job = await fleet.get(f"/api/v1/devices/dev-a/jobs/{campaign}", token=fleet.tokens["dev-a"])
    assert job["state"] == "cancelled"
    # whatever the device reports next, the answer is cancelled: it stops; then the job is final
    assert await fleet.report("dev-a", campaign, state="running", progress_percent=60) == {"state": "cancelled"}
    assert "jobs" not in await fleet.ingest("dev-a", [facts("dev-a")])
    assert (await fleet.report("dev-a", campaign, 409, state="cancelled"))["error"] == "job_finished"
    status = await fleet.get(f"/api/v1/benchmark/{campaign}/status")
    assert status["status"] == "cancelled" and status["counts"] == {"cancelled": 2}


async def test_deadline_times_jobs_out_and_finishes_the_campaign(fleet: Fleet) -> None:
    campaign = (await fleet.start(target={"devices": ["dev-a", "dev-b"]}, deadline_seconds=60))["benchmark_id"]
    other = (await fleet.start(target={"devices": ["dev-c"]}, deadline_seconds=600))["benchmark_id"]
    assert await fleet.report("dev-a", campaign, state="running") == {"state": "running"}
    app = fleet.client.server.app
    assert await campaigns.check_deadlines(app) == []  # nothing is late yet
    fleet.clock.now += 61
    assert await campaigns.check_deadlines(app) == [(campaign, "failed")]
    status = await fleet.get(f"/api/v1/benchmark/{campaign}/status")
    assert status["status"] == "failed" and status["counts"] == {"timed_out": 2}
    assert status["devices"]["dev-a"]["reason"].startswith("no report before the deadline 20")
    assert (await fleet.report("dev-a", campaign, 409, state="succeeded"))["state"] == "timed_out"
    assert (await fleet.get(f"/api/v1/benchmark/{other}/status"))["status"] == "pending"
    assert "jobs" not in await fleet.ingest("dev-a", [facts("dev-a")])


async def test_the_deadline_task_runs_with_the_app(aiohttp_client: Any, store: Store, clock: Clock) -> None:
    clock.now -= 120  # the campaign starts two minutes ago with a one-minute deadline
    settings = Settings(campaigns=CampaignSettings(check_interval_s=0.05))
    client = await aiohttp_client(create_app(settings, store, clock=clock))
    fleet = Fleet(client, store, clock)
    await fleet.ingest("dev-a", [facts("dev-a")])
    campaign = (await fleet.start(target={"devices": ["dev-a"]}, deadline_seconds=60))["benchmark_id"]
    clock.now += 120
    for _ in range(100):  # the task ticks at least every second
        if (await fleet.get(f"/api/v1/benchmark/{campaign}/status"))["status"] == "failed":
            break
        await asyncio.sleep(0.1)
    assert (await fleet.get(f"/api/v1/benchmark/{campaign}/status"))["counts"] == {"timed_out": 1}


async def test_ack_lists_at_most_8_jobs(fleet: Fleet) -> None:
    started = []
    for _ in range(10):
        started.append((await fleet.start(target={"devices": ["dev-a"]}))["benchmark_id"])
        fleet.clock.now += 1
    jobs = (await fleet.ingest("dev-a", [facts("dev-a")]))["jobs"]
    assert len(jobs) == 8 and [j["benchmark_id"] for j in jobs] == started[:8]  # oldest first
    assert len(json.dumps(jobs)) < 2048


async def test_max_active_campaigns(aiohttp_client: Any, store: Store, clock: Clock) -> None:
    fleet = await make_fleet(aiohttp_client, store, clock, max_active=2)
    first = (await fleet.start(target={"devices": ["dev-a"]}))["benchmark_id"]
    await fleet.start(target={"devices": ["dev-a"]})
    assert (await fleet.start(429, target={"devices": ["dev-a"]}))["error"] == "too_many_campaigns"
    await fleet.client.post(f"/api/v1/benchmark/{first}/cancel", headers=auth(fleet.operator))
    await fleet.start(target={"devices": ["dev-a"]})  # a finished campaign frees its place


async def test_concurrent_starts_never_overshoot_max_active(aiohttp_client: Any, store: Store, clock: Clock) -> None:
    fleet = await make_fleet(aiohttp_client, store, clock, max_active=3)

    async def start() -> int:
        response = await fleet.client.post(
            "/api/v1/benchmark/start",
            json={"configuration": SUITE, "target": {"all": True}},
            headers=auth(fleet.operator),
        )
        return int(response.status)

    statuses = await asyncio.gather(*(start() for _ in range(8)))
    assert sorted(statuses) == [201] * 3 + [429] * 5
    assert store.active_campaigns() == 3


async def test_max_devices(aiohttp_client: Any, store: Store, clock: Clock) -> None:
    fleet = await make_fleet(aiohttp_client, store, clock, max_devices=2)
    answer = await fleet.start(400, target={"all": True})
    assert answer["path"] == "$.target" and "campaigns.max_devices" in answer["message"]


async def test_results_and_exports(fleet: Fleet) -> None:
    campaign = (await fleet.start(target={"devices": ["dev-a", "dev-b", "dev-c"]}))["benchmark_id"]
    other = (await fleet.start(target={"devices": ["dev-a"]}))["benchmark_id"]
    await fleet.ingest(
        "dev-a", [level_record("dev-a", campaign, "chat", 1, 10.0), level_record("dev-a", other, "chat", 1, 99.0)]
    )
    # a level run again: only the newest record of that level counts
    await fleet.ingest("dev-a", [level_record("dev-a", campaign, "chat", 1, 12.0)])
    await fleet.ingest("dev-a", [level_record("dev-a", campaign, "chat", 2, 20.0)])
    await fleet.ingest("dev-c", [level_record("dev-c", campaign, "chat", 1, 30.0)])
    # what a device sends under the campaign's id for a workload the suite does not hold is left out
    await fleet.ingest("dev-c", [level_record("dev-c", campaign, "intruder", n, 1.0) for n in range(1, 40)])
    answer = await fleet.get(f"/api/v1/benchmark/{campaign}/results")
    assert answer["benchmark_id"] == campaign and answer["format_version"] == "1" and answer["status"] == "pending"
    devices = answer["results"]["devices"]
    assert set(devices) == {"dev-a", "dev-b", "dev-c"}
    assert devices["dev-a"]["device_class"] == "orin-agx" and devices["dev-a"]["state"] == "queued"
    ttfts = sorted(
        d["results"]["latency_metrics"]["time_to_first_token"]["p50_ms"] for d in devices["dev-a"]["documents"]
    )
    assert ttfts == [12.0, 20.0] and devices["dev-b"]["documents"] == []
    assert devices["dev-c"]["documents"][0]["results"]["latency_metrics"]["time_to_first_token"]["p50_ms"] == 30.0
    assert len(devices["dev-c"]["documents"]) == 1 and "pi5" not in answer["results"]["classes"]
    rows = answer["results"]["classes"]["orin-agx"]
    level1 = next(r for r in rows if r["level"] == "concurrency 1")
    assert level1["devices"] == 2 and level1["ttft_p50_ms"] == 21.0
    assert level1["spread"]["ttft_p50_ms"] == {"min": 12.0, "median": 21.0, "max": 30.0}
    exported = await fleet.get(f"/api/v1/benchmark/{campaign}/export?format=json")
    assert sorted((r["device_id"], r["level"], r["ttft_p50_ms"]) for r in exported["rows"]) == [
        ("dev-a", "concurrency 1", 12.0),
        ("dev-a", "concurrency 2", 20.0),
        ("dev-c", "concurrency 1", 30.0),
    ]
    response = await fleet.client.get(f"/api/v1/benchmark/{campaign}/export?format=csv", headers=auth(fleet.operator))
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(await response.text())))
    assert len(table) == 3 and {r["device_class"] for r in table} == {"orin-agx"}
    response = await fleet.client.get(
        f"/api/v1/benchmark/{campaign}/export?format=protobuf", headers=auth(fleet.operator)
    )
    assert response.status == 200 and "proto=llm_latency_lens.v1.BenchmarkResults" in response.headers["Content-Type"]
    messages = list(protobuf.iter_delimited(await response.read(), pb.BenchmarkResults))
    assert sorted(
        (m.campaign_level.device_id, m.campaign_level.level, m.aggregated.ttft_distribution.p50_ms) for m in messages
    ) == [("dev-a", "concurrency 1", 12.0), ("dev-a", "concurrency 2", 20.0), ("dev-c", "concurrency 1", 30.0)]
    assert {m.benchmark_id for m in messages} == {campaign}
    bad = await fleet.client.get(f"/api/v1/benchmark/{campaign}/export?format=xls", headers=auth(fleet.operator))
    assert bad.status == 400
    # levels the suite does not run (a device's say only: forged rows, a <script> label) are left out: its 2 count
    forged = [level_record("dev-b", campaign, "chat", n, float(n)) for n in range(1, 21)]
    forged[5]["ext"]["campaign"]["level"] = "concurrency 1\u202e<script>"
    await fleet.ingest("dev-b", forged)
    answer = await fleet.get(f"/api/v1/benchmark/{campaign}/results")
    documents = answer["results"]["devices"]["dev-b"]["documents"]
    assert len(documents) == 2 and len(answer["results"]["classes"]["pi5"]) == 2
    assert {r["level"] for r in answer["results"]["classes"]["pi5"]} == {"concurrency 1", "concurrency 2"}


async def test_a_format_whose_runtime_is_missing_is_501_on_both_exports(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The measurements export and the campaign export answer a documented format this aggregator cannot serve
    (its extra not installed) alike: 501, naming the format and the extra to install; json still serves."""
    campaign = (await fleet.start(target={"devices": ["dev-a"]}))["benchmark_id"]
    await fleet.ingest("dev-a", [level_record("dev-a", campaign, "chat", 1, 10.0)])
    import lens_core

    monkeypatch.delattr(lens_core, "protobuf", raising=False)  # as if google.protobuf were not installed
    for name in ("lens_core.protobuf", "google.protobuf", "pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)
    for fmt, extra in (("protobuf", "protobuf"), ("arrow", "arrow"), ("parquet", "arrow")):
        response = await fleet.client.get(f"/api/v1/measurements?format={fmt}", headers=auth(fleet.operator))
        body = await response.json()
        assert response.status == 501 and body["parameter"] == "format", body
        assert f"format={fmt} needs" in body["error"] and f"'llm-latency-lens[{extra}]'" in body["error"], body
        response = await fleet.client.get(
            f"/api/v1/benchmark/{campaign}/export?format={fmt}", headers=auth(fleet.operator)
        )
        body = await response.json()
        assert response.status == 501 and body["error"] == "format_unavailable" and body["path"] == "format", body
        assert f"format={fmt} needs" in body["message"] and f"'llm-latency-lens[{extra}]'" in body["message"], body
    assert (await fleet.client.get("/api/v1/measurements", headers=auth(fleet.operator))).status == 200
    assert (await fleet.get(f"/api/v1/benchmark/{campaign}/export?format=json"))["rows"]


async def test_store_migrates_from_schema_6(store: Store) -> None:
    """A store of the previous schema (no campaign tables) gains them on open."""
    from aggregator.pgstore import PostgresStore
    from aggregator.store import SCHEMA_VERSION, SQLiteStore

    assert SCHEMA_VERSION == 10 and store.schema_version() == 10  # type: ignore[attr-defined]
    if isinstance(store, SQLiteStore):
        store._conn.execute("DROP TABLE campaign_jobs")
        store._conn.execute("DROP TABLE campaigns")
        store._conn.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
        store.close()
        reopened: Store = SQLiteStore(store.path)
    else:
        assert isinstance(store, PostgresStore)
        with store._conn.transaction():
            store._conn.execute("DROP TABLE campaign_jobs")
            store._conn.execute("DROP TABLE campaigns")
            store._conn.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
        store.close()
        reopened = PostgresStore(store.url)
    try:
        assert reopened.schema_version() == 10  # type: ignore[attr-defined]
        assert reopened.campaigns() == [] and reopened.device_jobs("dev-a") == []
    finally:
        reopened.close()


async def test_campaign_cli_against_the_servers_database(aiohttp_client: Any, tmp_path: Any, clock: Clock) -> None:
    """``lens-aggregator campaign …`` on the database a running aggregator serves: what one starts, the other shows."""
    from click.testing import CliRunner

    from aggregator.cli import cli
    from aggregator.store import SQLiteStore
    from lens_core.errors import UsageError

    db = tmp_path / "agg.db"
    fleet = await make_fleet(aiohttp_client, SQLiteStore(db), clock)
    suite = tmp_path / "nightly.json"
    suite.write_text(json.dumps(SUITE))
    runner = CliRunner()

    def run(*args: str) -> Any:
        result = runner.invoke(cli, [*args, "--db", str(db)])
        assert result.exit_code == 0, result.output
        return result

    def refused(*args: str) -> str:
        """The one-line error main() prints (exit status 2): a UsageError out of the command."""
        result = runner.invoke(cli, [*args, "--db", str(db)])
        assert isinstance(result.exception, UsageError), result.output
        return str(result.exception)

    started = json.loads(
        run("campaign", "start", "--suite", str(suite), "--class", "orin-agx", "--device", "ghost", "--json").stdout
    )
    campaign = started["benchmark_id"]
    assert started["devices"] == ["dev-a", "dev-c"] and started["skipped"] == {"ghost": "unknown device"}
    assert (await fleet.get(f"/api/v1/benchmark/{campaign}/status"))["counts"] == {"queued": 2, "skipped": 1}
    assert json.loads(run("campaign", "status", campaign, "--json").stdout)["status"] == "pending"
    assert "dev-c" in run("campaign", "status", campaign).stdout
    assert [c["benchmark_id"] for c in json.loads(run("campaign", "list", "--json").stdout)] == [campaign]
    assert json.loads(run("campaign", "results", campaign, "--json").stdout)["format_version"] == "1"
    assert run("campaign", "export", campaign, "--format", "csv").stdout.startswith("device_id,")
    assert "binary: give --output" in refused("campaign", "export", campaign, "--format", "protobuf")
    exported = tmp_path / "campaign.pb"
    run("campaign", "export", campaign, "--format", "protobuf", "--output", str(exported))
    assert list(protobuf.iter_delimited(exported.read_bytes(), pb.BenchmarkResults)) == []  # no level has run yet
    assert json.loads(run("campaign", "cancel", campaign, "--json").stdout)["status"] == "cancelled"
    assert "cancelled already" in refused("campaign", "cancel", campaign)
    assert "UUID" in refused("campaign", "status", "nope")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SUITE, "workloads": [{"name": "w", "concurrency": 10**6}]}))
    assert "$.workloads[0].concurrency" in refused("campaign", "start", "--suite", str(bad), "--all")
    assert "--device" in refused("campaign", "start", "--suite", str(suite))
    token = run("token", "add", "--kind", "operator", "ci").stdout.strip()
    status = await fleet.client.get("/api/v1/benchmark", headers=auth(token))
    assert status.status == 200 and len(await status.json()) == 1


def test_every_campaign_command_has_help_and_exit_status_2_on_refusal(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from aggregator.store import SQLiteStore

    from .test_status_cli import run_aggregator

    for command in ("start", "status", "list", "cancel", "results", "export"):
        code, out, _ = run_aggregator(capsys, "campaign", command, "--help")
        assert code == 0 and "Example:" in out, command
    code, out, _ = run_aggregator(capsys, "token", "add", "--help")
    assert code == 0 and "--kind operator" in out
    db = str(tmp_path / "agg.db")
    code, _, err = run_aggregator(capsys, "campaign", "status", str(uuid.uuid4()), "--db", db)
    assert code == 2 and f"storage.db {db} (--db): does not exist" in err  # a read creates no database
    SQLiteStore(db).close()
    code, _, err = run_aggregator(capsys, "campaign", "status", str(uuid.uuid4()), "--db", db)
    assert code == 2 and "no benchmark" in err
    suite = tmp_path / "s.yaml"
    suite.write_text("test_suite: {name: x}\nmodels: 3\nworkloads: []\n")
    code, _, err = run_aggregator(capsys, "campaign", "start", "--suite", str(suite), "--all", "--db", db)
    assert code == 2 and "$.models" in err  # PyYAML is installed here: read, then refused naming the field


async def test_callback_urls_are_checked_at_start(
    aiohttp_client: Any, store: Store, clock: Clock, tmp_path: Any
) -> None:
    secret = tmp_path / "callback.secret"
    secret.write_text("s3cret")
    fleet = await make_fleet(aiohttp_client, store, clock, callback_secret_file=secret)
    for url in ("http://127.0.0.1:9/hook", "http://localhost/hook", "http://[::1]/x", "http://10.1.2.3/x"):
        answer = await fleet.start(400, target={"all": True}, callback_url=url)
        assert answer["path"] == "$.callback_url" and "allow_private_callbacks" in answer["message"], url
    answer = await fleet.start(400, target={"all": True}, callback_url="https://user:pw@ci.example/hook")
    assert answer["path"] == "$.callback_url" and "pw" not in answer["message"]
    assert store.campaigns() == []


async def test_a_finished_campaign_with_a_callback_is_left_pending_for_the_sender(
    aiohttp_client: Any, store: Store, clock: Clock, tmp_path: Any
) -> None:
    secret = tmp_path / "callback.secret"
    secret.write_text("s3cret")
    fleet = await make_fleet(aiohttp_client, store, clock, callback_secret_file=secret, allow_private_callbacks=True)
    campaign = (await fleet.start(target={"devices": ["dev-a"]}, callback_url="http://127.0.0.1:9/hook"))[
        "benchmark_id"
    ]
    row = store.campaign(campaign)
    assert row is not None and row.callback_url == "http://127.0.0.1:9/hook" and row.callback_state is None
    assert await fleet.report("dev-a", campaign, state="succeeded") == {"state": "succeeded"}
    row = store.campaign(campaign)
    assert row is not None and row.state == "completed" and row.callback_state == "pending"
    assert row.callback_attempts == 0 and row.finished_us is not None

    # the campaign task's sender: nothing listens on port 9, so the attempt fails and is retried later …
    from aggregator import campaigns

    app = fleet.client.server.app
    assert await campaigns.deliver_callbacks(app) == 1
    row = store.campaign(campaign)
    assert row is not None and row.callback_state == "pending" and row.callback_attempts == 1
    assert row.callback_next_us is not None and row.callback_next_us > int(clock() * 1e6)
    assert row.callback_error
    assert await campaigns.deliver_callbacks(app) == 0  # … not before its time
    # … and given up after campaigns.callback_attempts (8) attempts
    for attempt in range(2, 9):
        store.set_callback(campaign, "pending", attempt - 1, None, row.callback_error)
        assert await campaigns.deliver_callbacks(app) == 1
    row = store.campaign(campaign)
    assert row is not None and row.callback_state == "failed" and row.callback_attempts == 8


async def test_targeting_is_bounded_by_the_reads_deadline(fleet: Fleet) -> None:
    """Targeting by class reads each known device's latest facts: all of it within server.max_query_seconds."""
    from aggregator import reads
    from aggregator.store import QueryTimeout

    late = reads.bounded(campaigns.select_devices, 0.0, 100)
    with pytest.raises(QueryTimeout):
        late(fleet.store, {"classes": ["orin-agx"]}, 10)
    in_time = reads.bounded(campaigns.select_devices, 30.0, 100)
    assert in_time(fleet.store, {"classes": ["orin-agx"]}, 10) == (["dev-a", "dev-c"], {})


async def test_a_success_must_account_for_every_level_of_the_suite(fleet: Fleet) -> None:
    """A device's report is checked against the suite the aggregator holds: a stolen token cannot mark a job
    succeeded without every level done, nor claim a level count the suite does not have."""
    campaign = (await fleet.start(target={"devices": ["dev-a"]}))["benchmark_id"]
    for body, path in (
        ({"state": "succeeded", "levels_done": 0, "levels_total": 2}, "$.levels_done"),
        ({"state": "succeeded", "levels_done": 99, "levels_total": 99}, "$.levels_total"),
        ({"state": "running", "levels_done": 5, "levels_total": 2}, "$.levels_done"),
    ):
        answer = await fleet.report("dev-a", campaign, 400, **body)
        assert answer["path"] == path, (body, answer)
    bare = await fleet.client.post(
        f"/api/v1/devices/dev-a/jobs/{campaign}", json={"state": "succeeded"}, headers=auth(fleet.tokens["dev-a"])
    )
    assert bare.status == 400 and (await bare.json())["path"] == "$.levels_done"
    assert (await fleet.get(f"/api/v1/benchmark/{campaign}/status"))["counts"] == {"queued": 1}
    assert await fleet.report("dev-a", campaign, state="succeeded", levels_done=2, levels_total=2) == {
        "state": "succeeded"
    }
