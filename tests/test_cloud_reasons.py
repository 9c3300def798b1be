"""What a cloud benchmark says is unavailable, and why, against a real OpenAI-compatible endpoint on 127.0.0.1 (a
small aiohttp app) that streams its answers token by token, or all in one chunk: never "every request produced at
most one token" about requests that produced several, never llama.cpp's counters as if a local model had run."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from .test_bench_cli import check_document, run_cli

TOKENS = ["The", " cat", " sat", " on", " the", " mat"]


class FakeCloud:
    """``/v1/models`` and a streamed ``/v1/completions`` of ``TOKENS`` (its usage counts them), in one chunk per token
    or all in a single chunk, on a real loopback port in a thread of its own."""

    def __init__(self, one_chunk: bool) -> None:
        self.one_chunk = one_chunk
        self.loop = asyncio.new_event_loop()
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = min(int(body.get("max_tokens") or len(TOKENS)), len(TOKENS))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        pieces = ["".join(TOKENS[:n])] if self.one_chunk else TOKENS[:n]
        for piece in pieces:
            chunk = {"object": "text_completion", "choices": [{"index": 0, "text": piece, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.005)
        final = {
            "object": "text_completion",
            "choices": [{"index": 0, "text": "", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n},
        }
        await response.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
        await response.write_eof()
        return response

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = self.runner.addresses[0][1]
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> FakeCloud:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.runner is not None
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture(params=[False, True], ids=["token-chunks", "one-chunk"])
def cloud(request: pytest.FixtureRequest) -> Iterator[FakeCloud]:
    with FakeCloud(one_chunk=request.param) as server:
        yield server


def test_cloud_bench_says_the_right_reason(
    cloud: FakeCloud, tmp_path: Path, capsys: pytest.CaptureFixture[str], results_schema: dict[str, Any]
) -> None:
    out = tmp_path / "cloud.json"
    code, stdout, stderr = run_cli(
        capsys, "bench", "--strategy", "cloud", "--cloud-url", cloud.url, "--cloud-api", "completions",
        "--runs", "2", "--warmup", "0", "--max-tokens", "6", "--chat-template", "off", "--no-progress",
        "--output", str(out), "--device-id", "edge-1",
    )  # fmt: skip
    assert code == 0, stderr
    doc = json.loads(out.read_text())
    check_document(doc, results_schema)
    unavailable = doc["results"]["unavailable"]
    assert "at most one token" not in json.dumps(unavailable) and "at most one token" not in stdout
    assert doc["configuration"]["test_parameters"]["output_tokens"]["mean"] == len(TOKENS)
    for key in ("prefill_ms_per_token", "decode_ms_per_token", "overhead_ratio"):
        assert unavailable[f"engine_timings.{key}"] == (
            "no llama.cpp counters: the requests ran on an openai-compatible endpoint, not on llama.cpp here"
        )
    assert "does not say when its prompt evaluation ended" in unavailable["prefill_time"]
    latency = doc["results"]["latency_metrics"]
    if cloud.one_chunk:  # six tokens, one chunk: nothing between tokens to time
        assert "time_per_output_token" not in latency and "decode_time" not in latency
        assert unavailable["time_per_output_token"] == (
            "the endpoint streamed every answer in a single chunk: there is no time between its tokens to measure "
            "(TPOT needs two)"
        )
        assert "unavailable     time_per_output_token: the endpoint streamed every answer in a single chunk" in stdout
    else:
        assert latency["time_per_output_token"]["sample_count"] == 2 and "time_per_output_token" not in unavailable
