"""The measurements export as Protocol Buffers (``format=protobuf``), decoded by Debian's ``protoc --decode`` — a
decoder that is not ours — gives the same values as the JSON export of the same records."""

from __future__ import annotations

import codecs
import copy
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from aggregator.store import SQLiteStore
from lens_core import protobuf as P
from lens_core.proto.llm_latency_lens.v1 import measurement_pb2 as pb

from .guardrail_records import block, guard
from .test_aggregator import auth, make_batch
from .test_protobuf import _energy, _speculative

NOW = time.time_ns() // 1000
PROTO_DIR = Path(__file__).resolve().parents[1] / "lens_core" / "proto"
Text = dict[str, list[Any]]


def split_stream(data: bytes) -> list[bytes]:
    """A length-delimited stream cut into its messages (read here, independently of lens_core.protobuf)."""
    out, pos = [], 0
    while pos < len(data):
        size = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        out.append(data[pos : pos + size])
        pos += size
    return out


def parse_text(text: str) -> Text:
    """protoc's text format (one field a line, `name {` … `}` for a message) as name → list of values."""
    stack: list[Text] = [{}]
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line == "}":
            stack.pop()
        elif line.endswith(" {"):
            child: Text = {}
            stack[-1].setdefault(line[:-2], []).append(child)
            stack.append(child)
        else:
            name, _, raw = line.partition(": ")
            value: Any
            if raw.startswith('"'):
                value = codecs.escape_decode(raw[1:-1].encode("ascii"))[0]
            elif raw in ("true", "false"):
                value = raw == "true"
            else:
                try:
                    value = int(raw)
                except ValueError:
                    value = float(raw) if raw[0].isdigit() or raw[0] == "-" else raw
            stack[-1].setdefault(name, []).append(value)
    assert len(stack) == 1, "unbalanced braces in protoc's output"
    return stack[0]


def protoc_decode(message: bytes) -> Text:
    protoc = shutil.which("protoc")
    assert protoc, "protoc is missing: `make sysdeps` installs Debian's protobuf-compiler and libprotobuf-dev"
    done = subprocess.run(
        [protoc, f"--proto_path={PROTO_DIR}", "--decode=llm_latency_lens.v1.InferenceMeasurement", P.PROTO_FILE],
        input=message,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    return parse_text(done.stdout.decode("ascii"))


def one(text: Text, *path: str) -> Any:
    """The single value at ``path`` (None when absent)."""
    node: Any = text
    for name in path:
        values = node.get(name) if isinstance(node, dict) else None
        if not values:
            return None
        assert len(values) == 1, path
        node = values[0]
    return node


def string(text: Text, *path: str) -> str | None:
    value = one(text, *path)
    return None if value is None else value.decode("utf-8")


def hexed(text: Text, *path: str) -> str | None:
    value = one(text, *path)
    return None if value is None else value.hex()


def millis(text: Text, *path: str) -> float | None:
    """A google.protobuf.Duration as milliseconds (seconds and nanos are left out when zero)."""
    node = one(text, *path)
    if node is None:
        return None
    return ((one(node, "seconds") or 0) * 1_000_000 + (one(node, "nanos") or 0) // 1000) / 1000


def iso(text: Text, *path: str) -> str:
    us = round(millis(text, *path) * 1000)  # type: ignore[operator]
    when = datetime.fromtimestamp(us // 1_000_000, tz=timezone.utc).replace(microsecond=us % 1_000_000)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def ext_value(node: Text) -> Any:
    """A Value as protoc prints it."""
    for kind in ("bool_value", "int_value", "double_value"):
        if kind in node:
            return node[kind][0]
    if "string_value" in node:
        return node["string_value"][0].decode("utf-8")
    if "list_value" in node:
        return [ext_value(v) for v in one(node, "list_value").get("values", [])]
    if "map_value" in node:
        return {e["key"][0].decode(): ext_value(one(e, "value")) for e in one(node, "map_value").get("fields", [])}
    return None


@pytest.fixture
async def served(aiohttp_client: Any, tmp_path: Path) -> tuple[Any, list[dict[str, Any]]]:
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(), store))
    token = store.add_token("dev-1", "device", NOW)
    records = synthetic_records(12, seed=7, device_id="dev-1")
    records[3] = guard(copy.deepcopy(records[3]))
    records[4] = block(copy.deepcopy(records[4]))
    for extra in (_speculative(), _energy()):
        records.append({**extra, "device_id": "dev-1"})
    response = await client.post("/api/v1/ingest", data=make_batch(records), headers=auth(token))
    assert response.status == 200, await response.text()
    return client, records


async def test_protoc_decodes_the_export_to_the_json_exports_values(served: tuple[Any, list[dict[str, Any]]]) -> None:
    client, records = served
    response = await client.get("/api/v1/measurements?format=protobuf&limit=1000")
    assert response.status == 200
    assert response.headers["Content-Type"] == (
        "application/x-protobuf; proto=llm_latency_lens.v1.InferenceMeasurement; delimited=true"
    )
    messages = split_stream(await response.read())
    page = await (await client.get("/api/v1/measurements?limit=1000")).json()
    exported = page["measurements"]
    assert len(messages) == len(exported) == len(records)
    for data, want in zip(messages, exported, strict=True):
        got = protoc_decode(data)
        assert string(got, "measurement_id") == want["id"]
        assert iso(got, "timestamp") == want["started_at"]
        assert iso(got, "received_at") == want["received_at"]
        for name in ("device_id", "run_id", "kind", "strategy", "error_type", "error_message", "stop_reason"):
            assert string(got, name) == want[name], name
        assert bool(one(got, "ok")) is want["ok"]
        assert string(got, "model_info", "name") == want["model_name"]
        assert string(got, "model_info", "provider") == want["engine"]
        assert hexed(got, "model_info", "sha256") == want["model_sha256"]
        assert hexed(got, "prompt_sha256") == want["prompt_sha256"]
        for field, name in (
            ("time_to_first_token", "ttft_ms"),
            ("time_per_output_token", "tpot_ms"),
            ("end_to_end_latency", "e2e_ms"),
            ("prefill_time", "prefill_ms"),
            ("decode_time", "decode_ms"),
        ):
            assert millis(got, "latency", field) == want[name], name
        gaps = one(got, "latency", "inter_token_gaps")
        assert [g / 1000 for g in (gaps or {}).get("gaps_us", [])] == want["itl_ms"]
        assert millis(got, "engine_counters", "prefill_time") == want["engine_prefill_ms"]
        assert millis(got, "engine_counters", "decode_time") == want["engine_decode_ms"]
        assert one(got, "engine_counters", "decode_tokens") == want["engine_decode_tokens"]
        # proto3 leaves a present zero out of the text: an optional field that is set and 0 prints as 0
        assert one(got, "tokens", "input_tokens") == want["input_tokens"]
        assert one(got, "tokens", "output_tokens") == want["output_tokens"]
        assert one(got, "resources", "rss_peak_bytes") == want["rss_peak_bytes"]
        assert string(got, "resources", "rss_peak_source") == want["rss_peak_source"]
        ext = {e["key"][0].decode(): ext_value(one(e, "value")) for e in got.get("ext", [])}
        for section in ("guardrails", "network", "settings", "clock", "interference"):
            assert ext.get(section) == want["ext"].get(section), section
        collab = want["ext"].get("collab")
        if collab:
            assert one(got, "collaboration", "acceptance_rate") == collab["acceptance_rate"]
            rounds = [[one(r, k) or 0 for k in ("offset_us", "draft_us", "verify_us", "drafted", "accepted")]
                      for r in got["collaboration"][0]["rounds_us"]]  # fmt: skip
            assert rounds == collab["round_us"]
        energy = want["ext"].get("energy")
        if energy:
            assert one(got, "resources", "energy", "j_per_output_token") == energy["j_per_output_token"]
            assert string(got, "resources", "energy", "source") == energy["source"]
    assert any(one(protoc_decode(m), "collaboration") for m in messages)
    assert any(string(protoc_decode(m), "kind") == "blocked" for m in messages)


async def test_the_export_pages_with_the_cursor_and_reads_back(served: tuple[Any, list[dict[str, Any]]]) -> None:
    client, records = served
    seen: list[pb.InferenceMeasurement] = []
    cursor = None
    while True:
        url = "/api/v1/measurements?format=protobuf&limit=5" + (f"&cursor={cursor}" if cursor else "")
        response = await client.get(url)
        seen += P.iter_delimited(await response.read(), pb.InferenceMeasurement)
        cursor = response.headers.get("X-Next-Cursor")
        if cursor is None:
            break
    assert [m.measurement_id for m in seen] == [r["id"] for r in records]
    page = await (await client.get("/api/v1/measurements?limit=1000")).json()
    for message, want in zip(seen, page["measurements"], strict=True):
        # every field of the JSON export, received_at (field 37) included
        assert want["received_at"] is not None and P.message_to_record(message) == want
    bad = await client.get("/api/v1/measurements?format=protobuff")
    assert bad.status == 400 and "protobuf" in (await bad.json())["error"]
