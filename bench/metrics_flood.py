"""One device floods the aggregator with distinct model names: /metrics, the health endpoint and the reads after it.

    .venv/bin/python bench/metrics_flood.py [--models 12000] [--guardrail-sets 10000] [--before TREE]

A real ``lens-aggregator serve`` on 127.0.0.1 (SQLite, default configuration plus one ``[[triggers]]`` table so that
``/api/v1/triggers`` has series to show) takes ``models`` records from one device token, each with its own model
name, strategy, error type (every third fails) and engine settings, in batches of 500. Then: the first ``/metrics``
scrape (a build) — its size, its time, and ``/api/v1/health`` answer times measured *while it runs* (a probe every
10 ms); the server's RSS; and the reads the flood made heavy: the device page, the device page compared with another
device, ``/api/v1/summary?group_by=model``, ``/api/v1/triggers``, ``/api/v1/fleet``.

Then a second device sends ``guardrail-sets`` guarded requests of one model, each with its own guardrail set name
(ext.guardrails, every violation field filled): the growth of ``/metrics`` it causes and the set label values it
shows — at most the first 16 names seen fleet-wide plus ``other`` (docs/metrics.md "Guardrails").

``--before TREE``: the same run first against another checkout (e.g. ``git archive <commit> | tar -x -C /tmp/before``)
— the figures for docs/PERFORMANCE.md come from one invocation, both trees on the same machine.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.store import SQLiteStore
from tests.guardrail_records import guard, hostile_guardrails
from tests.hostile_device import encode_raw, raw_batch, valid_wire
from tests.netproxy import free_port
from tests.processes import ROOT, AggregatorProcess

CONFIG = """
[fleet]
trigger_interval = "5s"

[[triggers]]
name = "any-failure"
condition = "error_rate_above"
threshold = 0.0
window = "168h"
min_samples = 1
"""


def request(port: int, path: str, body: bytes | None = None, token: str | None = None) -> tuple[int, int, float]:
    """(status, bytes, seconds) of one request on a connection of its own."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    conn.request(
        "POST" if body else "GET", path, body=body, headers={"Authorization": f"Bearer {token}"} if token else {}
    )
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, len(data), time.perf_counter() - started


def flood(port: int, token: str, models: int) -> float:
    started = time.perf_counter()
    for start in range(0, models, 500):
        records = valid_wire(min(500, models - start), seed=1000 + start, device="dev-a")
        for offset, record in enumerate(records):
            i = start + offset
            record["model_name"] = f"flood-model-{i}"
            record["strategy"] = f"strategy-{i % 997}"
            record["ext"] = {**(record.get("ext") or {}), "settings": {"n_batch": 1 + i}}
            if i % 3 == 0:
                record["ok"], record["error_type"] = False, f"error-{i}"
        body = raw_batch([encode_raw(r, "cbor") for r in records], device="dev-a", batch_id=f"flood-{start}")
        status, _, _ = request(port, "/api/v1/ingest", body, token)
        assert status == 200, status
    return time.perf_counter() - started


def guardrail_flood(port: int, token: str, sets: int) -> float:
    """``sets`` guarded requests from dev-b, one model, each with its own guardrail set name and 32 violations."""
    started = time.perf_counter()
    violations = hostile_guardrails()["violations"]
    for start in range(0, sets, 500):
        records = []
        for offset, record in enumerate(valid_wire(min(500, sets - start), seed=50_000 + start, device="dev-b")):
            record["model_name"] = "steady-model"
            guarded = guard(record, set_name=f"flood-set-{start + offset}", blocked_at=("input", None)[offset % 2])
            guarded["ext"]["guardrails"]["violations"] = violations
            records.append(guarded)
        body = raw_batch([encode_raw(r, "cbor") for r in records], device="dev-b", batch_id=f"sets-{start}")
        status, _, _ = request(port, "/api/v1/ingest", body, token)
        assert status == 200, status
    return time.perf_counter() - started


def guardrail_labels(port: int) -> tuple[int, int]:
    """(bytes of /metrics, distinct guardrail_set label values in it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    sets = {
        line.split('guardrail_set="', 1)[1].split('"', 1)[0] for line in text.splitlines() if 'guardrail_set="' in line
    }
    return len(text.encode()), len(sets)


def health_during(port: int, path: str) -> tuple[tuple[int, int, float], list[float]]:
    """GET ``path`` while /api/v1/health is asked every 10 ms: (its answer, the health answer times in flight)."""
    times: list[float] = []
    done = threading.Event()

    def probe() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while not done.is_set():
            started = time.perf_counter()
            conn.request("GET", "/api/v1/health")
            conn.getresponse().read()
            if not done.is_set():
                times.append(time.perf_counter() - started)
            time.sleep(0.01)
        conn.close()

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    answer = request(port, path)
    done.set()
    thread.join()
    return answer, times


def run(tree: Path, models: int, sets: int = 0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "agg.db"
        store = SQLiteStore(db)
        token = store.add_token("dev-a", "device", time.time_ns() // 1000)
        other = store.add_token("dev-b", "device", time.time_ns() // 1000)
        store.close()
        config = Path(tmp) / "aggregator.toml"
        config.write_text(CONFIG)
        port = free_port()
        server = AggregatorProcess(db, port, config, cwd=tree)
        server.start()
        try:
            out: dict[str, Any] = {"tree": str(tree)}
            body = raw_batch([encode_raw(r, "cbor") for r in valid_wire(5, seed=7, device="dev-b")], device="dev-b")
            request(port, "/api/v1/ingest", body, other)
            out["flood_s"] = flood(port, token, models)
            process = psutil.Process(server.proc.pid if server.proc else 0)
            rss_before = process.memory_info().rss
            (status, size, seconds), health = health_during(port, "/metrics")
            out["metrics"] = {"status": status, "bytes": size, "seconds": seconds}
            out["health_during_scrape_ms"] = {
                "n": len(health),
                "median": statistics.median(health) * 1000 if health else None,
                "max": max(health) * 1000 if health else None,
            }
            out["rss_mb"] = {"before_scrape": rss_before / 1e6, "after_scrape": process.memory_info().rss / 1e6}
            if sets and (tree / "tests" / "guardrail_records.py").exists():
                before, _ = guardrail_labels(port)
                time.sleep(5.1)  # past server.metrics_max_age: the next scrape builds again
                out["guardrail_flood_s"] = guardrail_flood(port, other, sets)
                time.sleep(5.1)
                after, shown = guardrail_labels(port)
                out["guardrails"] = {"sets": sets, "growth_bytes": after - before, "set_labels": shown}
            time.sleep(6)  # a trigger evaluation over the flood
            for name, path in (
                ("device_page", "/device/dev-a"),
                ("compare", "/device/dev-a?compare=dev-b"),
                ("summary_by_model", "/api/v1/summary?group_by=model"),
                ("triggers", "/api/v1/triggers"),
                ("fleet", "/api/v1/fleet"),
            ):
                status, size, seconds = request(port, path)
                out[name] = {"status": status, "bytes": size, "seconds": seconds}
            return out
        finally:
            server.stop()


def show(result: dict[str, Any]) -> None:
    print(f"tree {result['tree']}: flood {result['flood_s']:.1f} s")
    m, h = result["metrics"], result["health_during_scrape_ms"]
    print(f"  /metrics: {m['status']} {m['bytes'] / 1e6:.2f} MB in {m['seconds']:.2f} s")
    if h["n"]:
        print(
            f"  /api/v1/health during that scrape: {h['n']} answers, median {h['median']:.1f} ms, max {h['max']:.1f} ms"
        )
    else:
        print("  /api/v1/health during that scrape: no answer before the scrape ended")
    rss = result["rss_mb"]
    print(f"  RSS: {rss['before_scrape']:.0f} MB before the scrape, {rss['after_scrape']:.0f} MB after")
    if "guardrails" in result:
        g = result["guardrails"]
        print(
            f"  {g['sets']:,} guardrail set names from one device in {result['guardrail_flood_s']:.1f} s: "
            f"/metrics grew {g['growth_bytes'] / 1e3:.0f} KB, {g['set_labels']} guardrail_set values shown"
        )
    for name in ("device_page", "compare", "summary_by_model", "triggers", "fleet"):
        r = result[name]
        print(f"  {name}: {r['status']} {r['bytes'] / 1e6:.3f} MB in {r['seconds']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=12_000, help="distinct model names the device sends")
    parser.add_argument(
        "--guardrail-sets", type=int, default=10_000, help="distinct guardrail set names a second device sends"
    )
    parser.add_argument("--before", type=Path, help="another checkout to run first (the figures before a change)")
    args = parser.parse_args()
    results = []
    if args.before:
        results.append(run(args.before.resolve(), args.models, args.guardrail_sets))
        show(results[-1])
    results.append(run(ROOT, args.models, args.guardrail_sets))
    show(results[-1])
    if len(results) == 2:
        before, after = results
        print("ratios before ÷ after:")
        print(
            f"  /metrics bytes {before['metrics']['bytes'] / after['metrics']['bytes']:.0f}×, "
            f"scrape time {before['metrics']['seconds'] / after['metrics']['seconds']:.0f}×"
        )
        for name in ("device_page", "compare", "summary_by_model", "triggers"):
            print(
                f"  {name}: bytes {before[name]['bytes'] / max(1, after[name]['bytes']):.0f}×, "
                f"time {before[name]['seconds'] / after[name]['seconds']:.1f}×"
            )


if __name__ == "__main__":
    main()
