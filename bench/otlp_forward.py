"""OTLP forwarding: records per CPU-second of the aggregator, against its own ingest, and the encoder's cost.

    .venv/bin/python bench/otlp_forward.py [--records 20000] [--batch 500] [--poison 0]

1. **End to end.** A real ``lens-aggregator serve`` (pinned to CPU 0) ingests ``--records`` realistic records
   (agent.synthetic, over HTTP from this process on CPU 1) with no OTLP endpoint; then it is restarted with one,
   pointing at a loopback OTLP/HTTP receiver in this process that answers every request with an empty
   ``Export…ServiceResponse`` (no decoding: the receiver's cost is not the aggregator's). The aggregator's CPU time
   (user + system, from /proc) is read while it ingests and while it forwards the whole store; both are printed as
   records per CPU-second, with their ratio (forwarding ÷ ingest), measured in one run.
   With ``--poison N``, the same is measured a second time with N records the encoder cannot encode (an integer
   past 64 bits in ``ext.model_load``, as a store written by an older release can hold) spread evenly through the
   store, written beside the ingested batches through the store's API; the two forwarding runs are compared
   (records per CPU-second and wall time, with ÷ without), and the poison records counted as unencodable.
2. **Encoder.** The same records' spans encoded by ``lens_core.otlp`` (opentelemetry-proto messages built directly)
   and by the OpenTelemetry SDK's own OTLP encoder (``ReadableSpan`` objects through
   ``opentelemetry.exporter.otlp.proto.common.trace_encoder.encode_spans``, what ``OTLPSpanExporter`` sends), both
   from the same span list: CPU seconds per 1000 records and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.synthetic import synthetic_records
from aggregator.otlp_forward import stored_status
from aggregator.store import SQLiteStore
from lens_core import otlp, wire

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "bench-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


class Server:
    def __init__(self, db: Path, config: Path) -> None:
        self.db, self.config, self.port = db, config, free_port()
        self.proc: Any = None

    def start(self) -> psutil.Process:
        import subprocess

        self.proc = subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, "-c", "from aggregator.cli import main; main()", "serve",
             "--config", str(self.config), "--db", str(self.db), "--port", str(self.port)],
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return psutil.Process(self.proc.pid)
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("aggregator did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def ingest(
    port: int, token: str, records: list[dict[str, Any]], batch: int, poison: int = 0, store: Any = None
) -> None:
    bodies = []
    for start in range(0, len(records), batch):
        blobs = [wire.encode_record(r, "cbor") for r in records[start : start + batch]]
        bodies.append(wire.encode_batch(blobs, device_id=DEVICE, batch_id=str(uuid.uuid4()), sent_us=1, codec="cbor"))
    every = max(1, len(records) // poison) if poison else 0
    done = 0
    async with aiohttp.ClientSession() as session:
        for index, body in enumerate(bodies):
            async with session.post(
                f"http://127.0.0.1:{port}/api/v1/ingest", data=body, headers={"Authorization": f"Bearer {token}"}
            ) as answer:
                assert answer.status == 200, await answer.text()
            while every and done < poison and (done + 1) * every <= (index + 1) * batch:
                await asyncio.to_thread(store_poison, store, done)
                done += 1


def store_poison(store: SQLiteStore, n: int) -> None:
    """A model-load record OTLP cannot carry (an int attribute past 64 bits), through the store's API: what a store
    written by an older release can hold (today's ingest refuses it)."""
    from aggregator.app import _row

    record = wire.to_wire(synthetic_records(1, seed=1000 + n, device_id=DEVICE)[0])
    record.update(id=uuid.uuid4().bytes, kind="model_load", ext={"model_load": {"tensor_bytes": 2**64 - 1}})
    blob = wire.dumps(record, "cbor")
    store.ingest(DEVICE, str(uuid.uuid4()), 0, {}, [_row(record, "cbor", blob)], time.time_ns() // 1000)


async def end_to_end(records: list[dict[str, Any]], batch: int, poison: int = 0) -> dict[str, float]:
    received = {"requests": 0}
    gate = {"open": False}  # closed: 503, so the restarted aggregator's start-up is measured apart from forwarding

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        if not gate["open"]:
            return web.Response(status=503, headers={"Retry-After": "0"})
        received["requests"] += 1
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=256 * 1024**2)
    app.router.add_post("/v1/traces", handle)
    app.router.add_post("/v1/metrics", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    otlp_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", otlp_port).start()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "agg.db"
        store = SQLiteStore(db)
        token = store.add_token(DEVICE, "device", time.time_ns() // 1000)
        plain = Path(tmp) / "plain.toml"
        plain.write_text("")
        forwarding = Path(tmp) / "otlp.toml"
        forwarding.write_text(
            f'[otlp]\nendpoint = "http://127.0.0.1:{otlp_port}"\nbatch_records = {batch}\ninterval = "50ms"\n'
            'backoff_max = "50ms"\n'
        )
        server = Server(db, plain)
        proc = server.start()
        before = cpu_seconds(proc)
        t0 = time.perf_counter()
        await ingest(server.port, token, records, batch, poison, store)
        ingest_wall = time.perf_counter() - t0
        ingest_cpu = cpu_seconds(proc) - before
        server.stop()
        server.config = forwarding
        proc = server.start()
        await asyncio.sleep(1.5)  # start-up (imports, migrations) is not forwarding
        before = cpu_seconds(proc)
        t0 = time.perf_counter()
        gate["open"] = True
        while True:
            status = await asyncio.to_thread(stored_status, store)
            if status["traces"]["pending_records"] == 0 and status["metrics"]["pending_records"] == 0:
                break
            await asyncio.sleep(0.05)
        forward_cpu = cpu_seconds(proc) - before
        forward_wall = time.perf_counter() - t0
        unencodable = status["traces"]["unencodable_records"]
        server.stop()
        store.close()
    await runner.cleanup()
    n = len(records)
    return {
        "records": n,
        "ingest_records_per_cpu_s": n / ingest_cpu,
        "ingest_wall_s": ingest_wall,
        "forward_records_per_cpu_s": n / forward_cpu,
        "forward_wall_s": forward_wall,
        "forward_over_ingest": (n / forward_cpu) / (n / ingest_cpu),
        "otlp_requests": received["requests"],
        "unencodable": unencodable,
    }


def sdk_spans(groups: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> list[Any]:
    """The same spans as the SDK's ``ReadableSpan`` objects (what its exporter encodes)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    kinds = {"internal": SpanKind.INTERNAL, "client": SpanKind.CLIENT}
    scope = InstrumentationScope(otlp.SCOPE_NAME, "0.1.0")
    out = []
    for resource_attrs, records in groups:
        resource = Resource(resource_attrs)
        for record in records:
            rid = record["id"]
            tid = int.from_bytes(otlp.trace_id(rid), "big")
            datas = otlp.record_spans(record)
            ids = [int.from_bytes(otlp.span_id(rid, n), "big") for n in range(len(datas))]
            for n, data in enumerate(datas):
                context = SpanContext(tid, ids[n], False, TraceFlags(1))
                parent = SpanContext(tid, ids[data.parent], False, TraceFlags(1)) if data.parent is not None else None
                out.append(
                    ReadableSpan(
                        name=data.name,
                        context=context,
                        parent=parent,
                        resource=resource,
                        attributes={k: (tuple(v) if type(v) is list else v) for k, v in data.attributes.items()},
                        kind=kinds[data.kind],
                        start_time=data.start_ns,
                        end_time=max(data.start_ns, data.end_ns),
                        status=Status(StatusCode.ERROR, data.error) if data.error else Status(StatusCode.UNSET),
                        instrumentation_scope=scope,
                    )
                )
    return out


def encoder(records: list[dict[str, Any]], rounds: int = 5) -> dict[str, float]:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    wires = [wire.to_wire(r) for r in records]
    resource = otlp.resource_attributes(DEVICE, {"device_class": "jetson"}, version="0.1.0")
    groups = [(resource, wires)]
    lens, sdk = [], []
    for _ in range(rounds):  # alternate, and keep the best of each: the machine is shared
        t0 = time.process_time()
        body, _ = otlp.encode_traces(groups, version="0.1.0")
        lens.append(time.process_time() - t0)
        t0 = time.process_time()
        sdk_body = encode_spans(sdk_spans(groups)).SerializeToString()
        sdk.append(time.process_time() - t0)
    n = len(records) / 1000
    return {
        "lens_cpu_ms_per_1000": min(lens) / n * 1000,
        "sdk_cpu_ms_per_1000": min(sdk) / n * 1000,
        "sdk_over_lens": min(sdk) / min(lens),
        "lens_bytes_per_record": len(body) / len(records),
        "sdk_bytes_per_record": len(sdk_body) / len(records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--poison", type=int, default=0, help="also forward with N unencodable records in the store")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    records = synthetic_records(args.records, seed=1, device_id=DEVICE)
    print(f"{args.records} records (agent.synthetic), batches of {args.batch}")
    e2e = asyncio.run(end_to_end(records, args.batch))
    print(
        f"aggregator ingest:     {e2e['ingest_records_per_cpu_s']:,.0f} records per CPU-second "
        f"({e2e['ingest_wall_s']:.1f} s wall)\n"
        f"aggregator forwarding: {e2e['forward_records_per_cpu_s']:,.0f} records per CPU-second "
        f"({e2e['forward_wall_s']:.1f} s wall, {e2e['otlp_requests']} OTLP requests, traces and metrics)\n"
        f"forwarding ÷ ingest (records per CPU-second): {e2e['forward_over_ingest']:.2f}"
    )
    if args.poison:
        bad = asyncio.run(end_to_end(records, args.batch, args.poison))
        print(
            f"with {args.poison} unencodable records spread through the store: "
            f"{bad['forward_records_per_cpu_s']:,.0f} records per CPU-second ({bad['forward_wall_s']:.1f} s wall, "
            f"{bad['otlp_requests']} OTLP requests, {bad['unencodable']} counted unencodable)\n"
            f"with ÷ without poison: {bad['forward_records_per_cpu_s'] / e2e['forward_records_per_cpu_s']:.2f} "
            f"(records per CPU-second), {bad['forward_wall_s'] / e2e['forward_wall_s']:.2f} (wall)"
        )
    enc = encoder(records[: min(5000, len(records))])
    print(
        f"span encoding: lens_core.otlp {enc['lens_cpu_ms_per_1000']:.0f} ms, OpenTelemetry SDK "
        f"{enc['sdk_cpu_ms_per_1000']:.0f} ms of CPU per 1000 records (SDK ÷ lens {enc['sdk_over_lens']:.2f}); "
        f"{enc['lens_bytes_per_record']:.0f} vs {enc['sdk_bytes_per_record']:.0f} bytes per record"
    )


if __name__ == "__main__":
    main()
