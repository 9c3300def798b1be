"""What a hostile or buggy device sends, and what every reader then asks for: shared by the poison and property tests.

``raw_batch`` encodes records exactly as given (no ``to_wire`` mapping), so a test can send any value the codecs can
carry; ``read_everything`` performs every read the aggregator serves and checks each answer is 200 and valid.
"""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import cbor2
import msgpack
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from agent.synthetic import synthetic_records
from lens_core import protobuf, wire
from lens_core.proto.llm_latency_lens.v1 import measurement_pb2 as pb

DEVICE = "dev-1"


def valid_wire(n: int = 1, seed: int = 1, device: str = DEVICE) -> list[dict[str, Any]]:
    """Realistic wire maps (as the agent sends them), started a few days before now."""
    records = [wire.to_wire(r) for r in synthetic_records(n, seed=seed, device_id=device)]
    now = time.time_ns() // 1000
    for i, record in enumerate(records):
        record["started_us"] = now - 3 * 86_400_000_000 + i * 1_000_000
    return records


def encode_raw(record: Any, codec: str) -> bytes:
    if codec == "cbor":
        return bytes(cbor2.dumps(record))
    return bytes(msgpack.packb(record, use_bin_type=True))


def raw_batch(
    blobs: Sequence[bytes], codec: str = "cbor", device: str = DEVICE, batch_id: str = "b", **kw: Any
) -> bytes:
    return wire.encode_batch(list(blobs), device_id=device, batch_id=batch_id, sent_us=1, codec=codec, **kw)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def read_everything(client: Any, device: str = DEVICE) -> dict[str, Any]:
    """Every read endpoint, export, page and /metrics: each must answer 200 with valid output. Returns the parsed
    answers for further checks."""
    out: dict[str, Any] = {}

    async def get(path: str) -> Any:
        response = await client.get(path)
        body = await response.read()
        assert response.status == 200, f"{path}: {response.status} {body[:300]!r}"
        return response, body

    _, body = await get("/api/v1/measurements?limit=10000")
    out["measurements"] = json.loads(body, parse_constant=_no_constants)["measurements"]
    _, body = await get("/api/v1/measurements?limit=10000&format=ndjson")
    out["ndjson"] = [json.loads(line, parse_constant=_no_constants) for line in body.decode().splitlines()]
    _, body = await get("/api/v1/measurements?limit=10000&format=csv")
    out["csv"] = list(csv.DictReader(io.StringIO(body.decode())))
    _, body = await get("/api/v1/measurements?limit=10000&format=arrow")
    out["arrow"] = pa.ipc.open_stream(body).read_all()
    _, body = await get("/api/v1/measurements?limit=10000&format=parquet")
    out["parquet"] = pq.read_table(io.BytesIO(body))
    _, body = await get("/api/v1/measurements?limit=10000&format=protobuf")
    out["protobuf"] = [protobuf.message_to_record(m) for m in protobuf.iter_delimited(body, pb.InferenceMeasurement)]
    for group in ("", "device", "model", "strategy"):
        _, body = await get(f"/api/v1/summary?group_by={group}")
        json.loads(body, parse_constant=_no_constants)
    _, body = await get("/api/v1/fleet")
    out["fleet"] = json.loads(body, parse_constant=_no_constants)["devices"]
    _, body = await get("/api/v1/devices")
    out["devices"] = json.loads(body, parse_constant=_no_constants)["devices"]
    _, body = await get("/")
    _page_data(body.decode())
    for dev in {d["device_id"] for d in out["devices"]}:
        _, body = await get(f"/device/{dev}")
        _page_data(body.decode())
    if device not in {d["device_id"] for d in out["devices"]}:  # nothing of it stored: an unknown device, a 404
        response = await client.get(f"/device/{device}")
        assert response.status == 404 and "No such device" in await response.text()
    _, body = await get("/metrics")
    out["metrics"] = body.decode()
    from prometheus_client.parser import text_string_to_metric_families

    out["families"] = {f.name: f for f in text_string_to_metric_families(out["metrics"])}
    return out


def _no_constants(name: str) -> Any:
    raise AssertionError(f"invalid JSON: {name} is not a JSON number")


def _page_data(page: str) -> Any:
    """The data a page inlines must be valid JSON (a NaN or a broken escape would stop the page's script)."""
    start = page.index("const initial = ") + len("const initial = ")
    end = page.index(";\n", start)
    return json.loads(page[start:end].replace("<\\/", "</"), parse_constant=_no_constants)


class RssWatch:
    """Peak resident memory of this process above where it started, sampled every few milliseconds."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.002)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 1e6

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


SERVE = """
import json, sys
from aiohttp import web
from aggregator.app import Settings, create_app
from aggregator.store import SQLiteStore
db, port, settings = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
if db.startswith("postgresql://"):
    from aggregator.pgstore import PostgresStore
    store = PostgresStore(db)
else:
    store = SQLiteStore(db)
web.run_app(create_app(Settings(**settings), store), host="127.0.0.1", port=port, print=None)
"""


@contextmanager
def aggregator_process(db: str, **settings: Any) -> Iterator[tuple[str, psutil.Process]]:
    """A real ``lens-aggregator`` app in its own process on 127.0.0.1: (base URL, its process). Memory and health
    are then the server's own, apart from the client that attacks it."""
    import json as json_module
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", SERVE, db, str(port), json_module.dumps(settings)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, "the aggregator process exited"
                assert time.monotonic() < deadline, "the aggregator process did not start listening"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", psutil.Process(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:  # a graceful shutdown still waiting on an attacker's connection
            proc.kill()
            proc.wait(5)


class ProcessRss(RssWatch):
    """Peak RSS of another process (the aggregator) above where it was when the watch started."""

    def __init__(self, process: psutil.Process) -> None:
        super().__init__()
        self.process = process
        self.start = self.peak = process.memory_info().rss


class HealthProbe:
    """``GET /api/v1/health`` every 10 ms from a thread of its own (one keep-alive connection): answer times."""

    def __init__(self, url: str) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import http.client

        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        while not self._stop.is_set():
            started = time.perf_counter()
            conn.request("GET", "/api/v1/health")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            self.times.append(time.perf_counter() - started)
            self._stop.wait(0.01)
        conn.close()

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def worst_ms(self) -> float:
        return max(self.times) * 1000

    @property
    def median_ms(self) -> float:
        return sorted(self.times)[len(self.times) // 2] * 1000
