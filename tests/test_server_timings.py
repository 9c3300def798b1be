"""The server's own per-request ``timings`` recorded beside the lens's figures (``ext.server_timings``).

Against llama.cpp's own ``llama-server`` (which reports ``timings`` on ``/v1/completions`` and
``/v1/chat/completions``, in the body or in the last chunk(s) of a stream) every record carries them, consistent
with the request; against llama-cpp-python's server (no ``timings``) nothing is recorded and nothing invented;
hostile ``timings`` from a small aiohttp server on 127.0.0.1 are dropped without an error. A record with them
encodes on the wire and passes the aggregator's record schema.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.engines.cloud import CloudClient, CloudResult, CloudSettings, parse_server_timings
from agent.measurement import Measurement
from agent.strategies.cloud import SERVER_TIMINGS_SOURCE, cloud_record, server_timings_ext
from lens_core import wire

from .llama_server import LlamaServerProcess
from .netproxy import free_port
from .test_bench_cli import check_document, run_cli
from .test_collab import cloud_url  # noqa: F401 - llama-cpp-python's server on the tiny model

TINY = ("--n-ctx", "256", "--n-threads", "1", "--no-progress", "--device-id", "edge-1")
RUNS = 3


@pytest.fixture(scope="module")
def llama_server_url(llama_server_bin: Path, tiny_models: dict[str, Path]) -> Iterator[str]:
    with LlamaServerProcess(llama_server_bin, tiny_models["target"], free_port()) as server:
        yield server.url + "/v1"


def bench(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, url: str, api: str
) -> tuple[dict[str, Any], list[Any], str]:
    out, raw = tmp_path / f"{api}.json", tmp_path / f"{api}.jsonl"
    code, stdout, stderr = run_cli(
        capsys, "bench", "--strategy", "cloud", "--cloud-url", url, "--cloud-api", api, "--runs", str(RUNS),
        "--warmup", "1", "--max-tokens", "8", "--chat-template", "off", "--output", str(out), "--raw", str(raw),
        *TINY,
    )  # fmt: skip
    assert code == 0, stderr
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    return json.loads(out.read_text()), records, stdout


def check_consistent(st: dict[str, Any], r: dict[str, Any]) -> None:
    """One record's server timings against the request and the lens's own figures."""
    assert st["source"] == SERVER_TIMINGS_SOURCE
    assert st["predicted_n"] == r["output_tokens"] >= 1
    assert len(r["itl_ms"]) + 1 <= st["predicted_n"]  # text-bearing chunks: at most one per token
    assert st["prompt_ms"] > 0 and st["server_ttft_ms"] == st["prompt_ms"]
    assert st["prompt_n"] >= 1 and st["cache_n"] + st["prompt_n"] == r["input_tokens"]
    if st["predicted_n"] > 1:
        assert st["server_tpot_ms"] == pytest.approx(st["predicted_ms"] / (st["predicted_n"] - 1))
    else:
        assert st["server_tpot_ms"] is None
    # the server's clock runs inside the lens's: its prompt ends before the first token reaches the lens, and its
    # prompt + generation fit in the lens's end-to-end (a little slack: where the server stamps its last token
    # relative to sending it is its own business)
    assert st["prompt_ms"] <= r["ttft_ms"]
    assert st["ttft_minus_server_prompt_ms"] == pytest.approx(r["ttft_ms"] - st["prompt_ms"])
    assert -1.0 <= st["network_and_queue_ms"] <= r["e2e_ms"]
    assert st["network_and_queue_ms"] == pytest.approx(r["e2e_ms"] - st["prompt_ms"] - st["predicted_ms"])


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_llama_server_timings_recorded(
    llama_server_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    results_schema: dict[str, Any],
    api: str,
) -> None:
    doc, records, stdout = bench(capsys, tmp_path, llama_server_url, api)
    check_document(doc, results_schema)
    assert doc["configuration"]["cloud"]["api"] == api
    assert len(records) == RUNS + 1
    for r in records:
        assert r["ok"], r
        check_consistent(r["ext"]["server_timings"], r)
    summary = doc["results"]["collaboration"]["server_timings"]
    assert summary["source"] == SERVER_TIMINGS_SOURCE
    assert summary["requests"] == summary["requests_with_server_timings"] == RUNS  # warm-up excluded
    for name in ("server_prompt_ms", "network_and_queue_ms", "ttft_minus_server_prompt_ms"):
        assert summary[name]["sample_count"] == RUNS
    measured = [r for r in records if not r["warmup"]]
    prompt = [r["ext"]["server_timings"]["prompt_ms"] for r in measured]
    assert summary["server_prompt_ms"]["mean_ms"] == pytest.approx(sum(prompt) / RUNS)
    assert "server timings  prompt " in stdout and "llama-server timings" in stdout


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("mode", ["body", "stream", "stream-without-usage"])
def test_llama_server_timings_in_every_answer_shape(llama_server_url: str, chat: bool, mode: str) -> None:
    """Not streamed: in the body. Streamed: in the last chunk — with ``include_usage`` the chat endpoint sends them
    in the usage-only chunk after the finish chunk, without it in the finish chunk."""

    async def go() -> tuple[CloudResult, Measurement]:
        client = CloudClient(CloudSettings(url=llama_server_url, chat=chat))
        prompt: Any = [{"role": "user", "content": "the cat sat"}] if chat else "the cat sat"
        extra = {"stream_options": {"include_usage": False}} if mode == "stream-without-usage" else None
        try:
            result = await client.complete(prompt, max_tokens=6, stream=mode != "body", extra=extra)
        finally:
            await client.close()
        record = Measurement(run_id="r", device_id="d", model_name="m", model_sha256=None)
        cloud_record(record, result, None)
        return result, record

    result, record = asyncio.run(go())
    assert result.ok and result.server_timings is not None, result
    assert set(result.server_timings) >= {"cache_n", "prompt_n", "prompt_ms", "predicted_n", "predicted_ms"}
    assert all(isinstance(result.server_timings[k], int) for k in ("cache_n", "prompt_n", "predicted_n"))
    r = record.to_dict()
    if mode == "stream-without-usage":
        r["input_tokens"] = result.server_timings["cache_n"] + result.server_timings["prompt_n"]
    check_consistent(r["ext"]["server_timings"], r)


def test_no_timings_from_llama_cpp_python(
    cloud_url: str,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    results_schema: dict[str, Any],
) -> None:
    doc, records, stdout = bench(capsys, tmp_path, cloud_url, "completions")
    check_document(doc, results_schema)
    assert records and all(r["ok"] and "server_timings" not in r["ext"] for r in records)
    assert "server_timings" not in doc["results"].get("collaboration", {})
    assert "server timings" not in stdout

    async def body() -> CloudResult:
        client = CloudClient(CloudSettings(url=cloud_url))
        try:
            return await client.complete("the cat", max_tokens=4, stream=False)
        finally:
            await client.close()

    result = asyncio.run(body())
    assert result.ok and result.server_timings is None


# -- a hostile server --------------------------------------------------------------------------------------------
GOOD = {"prompt_ms": 2.5, "predicted_ms": 4.0, "predicted_n": 3}
HOSTILE: dict[str, Any] = {
    "a string": "fast",
    "a list": [1, 2, 3],
    "null": None,
    "every value wrong": {
        "prompt_ms": "3",
        "predicted_ms": float("nan"),
        "prompt_n": -1,
        "predicted_n": 1.5,
        "cache_n": {"nested": {"deeper": [1, 2]}},
        "prompt_per_second": float("inf"),
        "predicted_per_second": float("-inf"),
        "draft_n": True,
        "prompt_per_token_ms": 10**30,
        "predicted_per_token_ms": [0.5],
    },
    "unknown keys only": {"t_" + "x" * 200: 1.0, "prompt_ms_": 3.0, "": 1},
}


def answer(timings: Any, stream: bool) -> bytes:
    usage = {"completion_tokens": 3, "prompt_tokens": 4, "total_tokens": 7}
    if not stream:
        body = {"choices": [{"text": "abc", "index": 0, "finish_reason": "length"}], "usage": usage}
        return json.dumps({**body, "timings": timings}).encode()
    events: list[dict[str, Any]] = [{"choices": [{"text": t, "index": 0, "finish_reason": None}]} for t in "abc"]
    events.append({"choices": [{"text": "", "index": 0, "finish_reason": "length"}], "usage": usage})
    events.append({"choices": [], "timings": timings})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


MIXED = {**HOSTILE["every value wrong"], "prompt_ms": 1.25, "cache_n": 2, "predicted_n": 3.0}
CASES: dict[str, Any] = {**HOSTILE, "mixed": MIXED}


@pytest.fixture
async def hostile_url() -> AsyncIterator[str]:
    """A server on 127.0.0.1 whose answer carries the ``timings`` of the case named in the request's ``case``."""

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        case = body["case"]
        if case == "good then bad":  # a good report, then a broken one: the good one stays
            first, then = GOOD, HOSTILE["every value wrong"]
        else:
            first, then = None, CASES[case]
        if not body.get("stream"):
            return web.Response(body=answer(then, False), content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if first is not None:
            await response.write(b"data: " + json.dumps({"choices": [], "timings": first}).encode() + b"\n\n")
        # json.dumps writes NaN and Infinity as the bare literals a hostile server could send
        await response.write(answer(then, True))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


async def ask(url: str, case: str, stream: bool) -> tuple[CloudResult, Measurement]:
    client = CloudClient(CloudSettings(url=url, timeout=10))
    try:
        result = await client.complete("x", max_tokens=3, stream=stream, extra={"case": case})
    finally:
        await client.close()
    record = Measurement(run_id="r", device_id="d", model_name="m", model_sha256=None)
    cloud_record(record, result, None)
    return result, record


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_timings_ignored(hostile_url: str, case: str, stream: bool) -> None:
    result, record = await ask(hostile_url, case, stream)
    assert result.ok and record.ok and record.output_tokens == 3, result
    assert result.server_timings is None and "server_timings" not in record.ext


@pytest.mark.parametrize("stream", [False, True])
async def test_partly_hostile_timings_keep_the_good_figures(hostile_url: str, stream: bool) -> None:
    result, record = await ask(hostile_url, "mixed", stream)
    assert result.server_timings == {"prompt_ms": 1.25, "cache_n": 2, "predicted_n": 3}
    assert isinstance(result.server_timings["predicted_n"], int)
    st = record.ext["server_timings"]
    assert st["prompt_ms"] == 1.25 and st["predicted_ms"] is None and st["prompt_n"] is None
    assert st["server_tpot_ms"] is None and st["network_and_queue_ms"] is None
    assert record.ttft_ms is not None
    assert st["ttft_minus_server_prompt_ms"] == pytest.approx(record.ttft_ms - 1.25)
    check_on_the_wire(record)


async def test_a_broken_report_does_not_erase_a_good_one(hostile_url: str) -> None:
    result, _ = await ask(hostile_url, "good then bad", True)
    assert result.server_timings == GOOD


def test_parse_server_timings() -> None:
    assert parse_server_timings(None) is None and parse_server_timings({}) is None
    assert parse_server_timings({"prompt_ms": 0, "prompt_n": 0.0}) == {"prompt_n": 0, "prompt_ms": 0.0}
    assert parse_server_timings({"prompt_ms": 2.0**60}) is None
    assert parse_server_timings({"prompt_ms": -0.001, "predicted_ms": math.nan}) is None


# -- the aggregator's record schema ------------------------------------------------------------------------------
def check_on_the_wire(record: Measurement) -> None:
    for codec in wire.CODECS:
        blob = wire.encode_record(record.to_dict(include_text=False), codec)
        checked = wire.check_record(wire.loads(blob, codec), 0, time.time_ns() // 1000)
        assert checked["ext"]["server_timings"] == record.ext["server_timings"]


def test_record_with_server_timings_passes_the_record_schema() -> None:
    record = Measurement(run_id="r", device_id="d", model_name="m", model_sha256=None, strategy="cloud")
    start = time.perf_counter_ns()
    result = CloudResult(
        start_ns=start,
        chunk_ns=[start + 5_000_000, start + 6_000_000, start + 7_000_000],
        texts=["a", "b", "c"],
        usage={"completion_tokens": 3, "prompt_tokens": 13},
        finish_reason="length",
        http_status=200,
        server_timings=parse_server_timings(
            {"cache_n": 12, "prompt_n": 1, "prompt_ms": 2.349, "prompt_per_token_ms": 2.349,
             "prompt_per_second": 425.7, "predicted_n": 3, "predicted_ms": 1.5, "predicted_per_token_ms": 0.75,
             "predicted_per_second": 2000.0}
        ),
    )  # fmt: skip
    assert cloud_record(record, result, 0.1) is not None
    st = record.ext["server_timings"]
    assert st == server_timings_ext(result.server_timings or {}, record.ttft_ms, record.e2e_ms)
    assert st["server_tpot_ms"] == pytest.approx(0.75)
    assert st["network_and_queue_ms"] == pytest.approx(7.0 - 2.349 - 1.5)
    assert st["ttft_minus_server_prompt_ms"] == pytest.approx(5.0 - 2.349)
    check_on_the_wire(record)
