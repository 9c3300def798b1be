"""Ingest latency under connection attacks: idle, with 300 live-stream clients, under slowloris, under a connection
flood with 256 open files — for this tree and, with ``--before``, for another checkout (the code before the fix).

    .venv/bin/python bench/connections.py [--before PATH] [--batches 100] [--clients 300] [--slowloris 300]

Each tree runs as a real ``lens-aggregator serve`` on 127.0.0.1 (SQLite), with two devices: ``dev-1`` sends the
timed batches of 20 records, each on a connection of its own; ``big`` has 2,000 series (a fleet row of ~0.8 MB) and
sends a one-record batch after every fifth timed one. Phases, in one run per tree:

* idle: no other client;
* stream: 300 ``GET /api/v1/stream`` clients in a process of their own (two thirds reading, one third never reading);
  also the bytes each reading client received;
* slowloris: 300 connections that send their headers a byte every 0.3 s or nothing; also how many of them the server
  still holds 15 s later;
* flood (a second server, under ``prlimit --nofile=256``): connections that send nothing, opened by four threads as
  fast as they can for 8 s; ingest every 0.1 s meanwhile (answered, failed, slowest), the log's lines and its most
  repeated one.

Prints one JSON document per tree and a table for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.store import SQLiteStore
from tests.netproxy import free_port
from tests.processes import AggregatorProcess
from tests.test_connections import AGGREGATOR, Readers, batch, p99, post, repeats

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def server(
    tree: Path, work: Path, keys: dict[str, Any], nofile: int | None = None
) -> Iterator[tuple[int, dict[str, str], AggregatorProcess]]:
    """``lens-aggregator serve`` of ``tree`` with ``keys`` in [server] (those the tree knows), and device tokens."""
    work.mkdir(parents=True, exist_ok=True)
    known = (tree / "aggregator" / "config.py").read_text()
    lines = ["[server]"] + [f"{k} = {json.dumps(v)}" for k, v in keys.items() if f'"{k}"' in known]
    config = work / "aggregator.toml"
    config.write_text("\n".join(lines) + "\n")
    db = work / "agg.db"
    store = SQLiteStore(db)
    now = time.time_ns() // 1000
    tokens = {device: store.add_token(device, "device", now) for device in ("dev-1", "big")}
    store.close()
    command = AGGREGATOR if nofile is None else ["prlimit", f"--nofile={nofile}:{nofile}", *AGGREGATOR]
    env_before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tree)
    process = AggregatorProcess(db, free_port(), config=config, command=command, cwd=tree)  # -c: cwd first on the path
    try:
        process.start()
        yield process.port, tokens, process
    finally:
        process.stop()
        if env_before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env_before


def figures(times: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(times) * 1e3, 1), "p99_ms": round(p99(times) * 1e3, 1)}


def ingest_run(port: int, tokens: dict[str, str], count: int, seeds: Iterator[int]) -> list[float]:
    times = []
    for i in range(count):
        if i % 5 == 0:
            status, _ = post(port, tokens["big"], batch("big", next(seeds), 1, models=2000), timeout=120)
            assert status == 200, status
        status, seconds = post(port, tokens["dev-1"], batch("dev-1", next(seeds)), timeout=120)
        assert status == 200, status
        times.append(seconds)
    return times


def slowloris(port: int, count: int) -> tuple[list[socket.socket], threading.Event, threading.Thread]:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    request = b"POST /api/v1/ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n" + b"X-Pad: 1\r\n" * 200
    stop = threading.Event()

    def trickle() -> None:
        n = 0
        while not stop.wait(0.3) and n < len(request):
            for sock in socks[::2]:
                with contextlib.suppress(OSError):
                    sock.send(request[n : n + 1])
            n += 1

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    return socks, stop, thread


def still_open(socks: list[socket.socket]) -> int:
    alive = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive


def run_tree(tree: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"tree": str(tree)}
    keys = {"max_subscribers": args.clients + 100, "header_timeout": "10s"}
    with server(tree, work / "main", keys) as (port, tokens, _):
        seeds = iter(range(10, 10**7))
        assert post(port, tokens["big"], batch("big", 1, 2000, models=2000), timeout=120)[0] == 200
        ingest_run(port, tokens, 10, seeds)
        out["idle"] = figures(ingest_run(port, tokens, args.batches, seeds))
        reading = args.clients * 2 // 3
        readers = Readers(port, reading, args.clients - reading)
        try:
            started = time.monotonic()
            loaded = ingest_run(port, tokens, args.batches, seeds)
            elapsed = time.monotonic() - started
        finally:
            done = readers.finish()
        received = [r["bytes"] for r in done["readers"]]
        out["stream"] = {
            **figures(loaded),
            "clients": args.clients,
            "statuses": readers.statuses,
            "received_mb_per_reader_median": round(statistics.median(received) / 1e6, 2),
            "pushed_mb_total": round(sum(received) / 1e6, 1),
            "seconds": round(elapsed, 1),
        }
        socks, stop, thread = slowloris(port, args.slowloris)
        try:
            out["slowloris"] = figures(ingest_run(port, tokens, args.batches, seeds))
            time.sleep(15)
            out["slowloris"]["held_after_15s"] = still_open(socks)
        finally:
            stop.set()
            thread.join()
            for sock in socks:
                sock.close()
    with server(tree, work / "flood", {"log_repeat_interval": "10s"}, nofile=256) as (port, tokens, process):
        flood: list[socket.socket] = []
        lock = threading.Lock()
        opened = [0]
        stop = threading.Event()

        def attack() -> None:
            while not stop.is_set():
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                except OSError:
                    time.sleep(0.01)
                    continue
                with lock:
                    flood.append(sock)
                    opened[0] += 1
                    oldest = flood.pop(0) if len(flood) > 1500 else None
                if oldest is not None:
                    oldest.close()

        threads = [threading.Thread(target=attack, daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        results: list[tuple[int, float]] = []
        started = time.monotonic()
        while time.monotonic() - started < 8:
            try:
                results.append(post(port, tokens["dev-1"], batch("dev-1", 10**6 + len(results)), timeout=40))
            except OSError:
                results.append((0, 40.0))
            time.sleep(0.1)
        stop.set()
        for thread in threads:
            thread.join()
        for sock in flood:
            sock.close()
        log = process.stderr_text()
        ok = [seconds for status, seconds in results if status == 200]
        worst = repeats(log).most_common(1)
        out["flood"] = {
            "connections_opened": opened[0],
            "ingests": len(results),
            "answered_200": len(ok),
            "slowest_s": round(max(seconds for _, seconds in results), 2),
            **(figures(ok) if len(ok) >= 2 else {}),
            "log_lines": len(log.splitlines()),
            "too_many_open_files_lines": log.count("Too many open files"),
            "most_repeated_line_count": worst[0][1] if worst else 0,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="another checkout to measure the same way (the code before)")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--slowloris", type=int, default=300)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, tree in enumerate([ROOT, *([args.before] if args.before else [])]):
            result = run_tree(tree.resolve(), Path(tmp) / str(n), args)
            print(json.dumps(result), flush=True)
            results.append(result)
    print("| tree | idle p50 / p99 | 300 streams p50 / p99 | ÷ idle p99 | slowloris p50 / p99 | held after 15 s |")
    for r in results:
        ratio = r["stream"]["p99_ms"] / r["idle"]["p99_ms"]
        print(
            f"| {r['tree']} | {r['idle']['p50_ms']} / {r['idle']['p99_ms']} ms | {r['stream']['p50_ms']} / "
            f"{r['stream']['p99_ms']} ms | {ratio:.2f} | {r['slowloris']['p50_ms']} / {r['slowloris']['p99_ms']} ms | "
            f"{r['slowloris']['held_after_15s']} |"
        )


if __name__ == "__main__":
    main()
