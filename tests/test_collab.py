"""Edge–cloud collaboration against a real llama-cpp-python server on 127.0.0.1 (the "cloud") serving the tiny
target model, with its noisy copy drafting locally; error paths against a misbehaving endpoint."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.collab.offload import OffloadPolicy, Rates, decide, predict
from agent.engines.cloud import CloudClient, CloudSettings
from lens_core import otlp, wire

from .netproxy import LinkProxy, free_port
from .test_bench_cli import check_document, run_cli

TINY = ("--n-ctx", "256", "--n-threads", "1", "--no-progress", "--device-id", "edge-1")


def start_cloud(model: Path) -> tuple[subprocess.Popen[bytes], str]:
    """llama-cpp-python's server on 127.0.0.1 serving ``model``: the process and its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "512",
            "--n_threads",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/models", timeout=1).read()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the llama-cpp-python server did not start") from None
            time.sleep(0.2)


def stop_cloud(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def cloud_url(tiny_models: dict[str, Path]) -> Iterator[str]:
    proc, url = start_cloud(tiny_models["target"])
    yield url
    stop_cloud(proc)


def test_cloud_strategy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cloud_url: str, results_schema: dict[str, Any]
) -> None:
    out, raw = tmp_path / "r.json", tmp_path / "r.jsonl"
    code, stdout, stderr = run_cli(
        capsys,
        "bench",
        "--strategy",
        "cloud",
        "--cloud-url",
        cloud_url,
        "--runs",
        "3",
        "--warmup",
        "1",
        "--max-tokens",
        "8",
        "--chat-template",
        "off",
        "--output",
        str(out),
        "--raw",
        str(raw),
        *TINY,
    )
    assert code == 0, stderr
    doc = json.loads(out.read_text())
    check_document(doc, results_schema)
    assert doc["configuration"]["strategy"] == "cloud" and doc["configuration"]["model"]["provider"] == "openai"
    assert doc["configuration"]["cloud"]["rtt_ms"] > 0
    assert doc["results"]["latency_metrics"]["time_to_first_token"]["sample_count"] == 3
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    for r in records:
        assert r["strategy"] == "cloud" and r["ok"] and r["output_tokens"] == 8 and len(r["itl_ms"]) == 7
        net = r["ext"]["network"]
        assert net["bytes_up"] > 0 and net["bytes_down"] > net["bytes_up"] / 10
        assert net["token_count_source"] in ("server usage", "text-bearing chunks")
    assert "strategy=cloud" in stdout


def speculate(
    capsys: pytest.CaptureFixture[str],
    draft: Path,
    cloud_url: str,
    out: Path,
    raw: Path,
    *flags: str,
    prompts: list[str] | None = None,
) -> tuple[int, str, str]:
    """``lens-agent bench --strategy speculative`` with ``draft`` against the cloud, no warm-up; with ``prompts``,
    one request per prompt, as plain text (no chat template)."""
    chosen: list[str] = []
    if prompts:
        file = out.with_name(f"{out.stem}-prompts.jsonl")
        file.write_text("".join(json.dumps({"id": p, "prompt": p}) + "\n" for p in prompts))
        chosen = ["--prompts", str(file), "--runs", str(len(prompts)), "--chat-template", "off"]
    return run_cli(
        capsys,
        "bench",
        "--strategy",
        "speculative",
        "--model",
        str(draft),
        "--cloud-url",
        cloud_url,
        "--warmup",
        "0",
        *chosen,
        *flags,
        "--output",
        str(out),
        "--raw",
        str(raw),
        *TINY,
    )


@pytest.mark.parametrize("protocol", ["generate", "logprobs"])
def test_speculative_decoding(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    cloud_url: str,
    tiny_models: dict[str, Path],
    results_schema: dict[str, Any],
    protocol: str,
) -> None:
    out, raw = tmp_path / "r.json", tmp_path / "r.jsonl"
    code, stdout, stderr = speculate(
        capsys,
        tiny_models["draft"],
        cloud_url,
        out,
        raw,
        "--verify",
        protocol,
        "--draft-tokens",
        "4",
        "--runs",
        "4",
        "--max-tokens",
        "24",
    )
    assert code == 0, stderr
    doc = json.loads(out.read_text())
    check_document(doc, results_schema)
    spec = doc["results"]["collaboration"]["speculative"]
    assert spec["protocol"] == protocol
    assert 0.2 < spec["acceptance_rate"] < 0.95  # a noisy copy: a real, partial acceptance
    assert 1.0 <= spec["mean_accepted_length"] <= 5.0
    # greedy verification: the committed text is the cloud model's own greedy output
    assert spec["greedy_check"] == {"checked": 4, "mismatches": 0}
    # a vocabulary without merges re-tokenizes to the produced tokens: checked each round, lossless
    check = spec["lossless_check"]
    assert check["lossless"] == 4 and check["lossy"] == 0 and check["retokenization_divergences"] == 0
    assert check["requests_with_divergences"] == 0 and check["unchecked"] == 0
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    for r in records:
        c = r["ext"]["collab"]
        assert r["output_tokens"] == 24 and c["matches_cloud_greedy"] is True
        assert c["lossless"] is True and c["retokenization_divergences"] == 0 and c["unchecked_rounds"] == 0
        assert c["retokenization_checks"] >= c["rounds"] - 1 and "re-tokenized" in c["lossless_basis"]
        assert c["accepted"] <= c["drafted"] and c["rounds"] >= 24 / 5
        assert c["edge_time_ms"] > 0 and c["verify_time_ms"] > 0 and c["bytes_per_committed_token"] > 0
        assert c["network_time_ms"] == pytest.approx(c["rounds"] * doc["configuration"]["cloud"]["rtt_ms"])
        # the seed's CollaborativeMeasurement adds up
        parts = c["edge_time_ms"] + c["verify_time_ms"] + c["collaboration_overhead_ms"]
        assert parts == pytest.approx(c["total_duration_ms"])
        # each round kept for the OTLP trace: in order, inside the request, adding up to the totals (µs rounding)
        rounds = c["round_us"]
        assert len(rounds) == c["rounds"] == c["rounds_kept"]
        assert sum(x[3] for x in rounds) == c["drafted"]
        assert sum(x[4] for x in rounds) == c["accepted"]
        assert all(b[0] >= a[0] + a[1] + a[2] for a, b in itertools.pairwise(rounds))
        assert sum(x[1] for x in rounds) / 1000 == pytest.approx(c["edge_time_ms"], abs=0.001 * len(rounds))
        spans = otlp.record_spans(wire.to_wire(r))
        assert sum(1 for sp in spans if sp.name == "speculative_round") == c["rounds"]
        assert sum(1 for sp in spans if sp.name == "network") == c["rounds"]  # the RTT is known here
        assert c["server_address"] == "127.0.0.1" and f":{c['server_port']}/" in cloud_url + "/"
    assert "speculative     α" in stdout
    assert "speculative: 4 of 4 requests lossless" in stdout


def test_no_text_leaves_the_greedy_check_intact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cloud_url: str, tiny_models: dict[str, Path]
) -> None:
    """--no-text keeps the text out of the records, not out of the check against the cloud's greedy output."""
    out, raw = tmp_path / "r.json", tmp_path / "r.jsonl"
    code, _, stderr = speculate(
        capsys,
        tiny_models["draft"],
        cloud_url,
        out,
        raw,
        "--verify",
        "generate",
        "--runs",
        "2",
        "--max-tokens",
        "16",
        "--no-text",
    )
    assert code == 0, stderr
    for line in raw.read_text().splitlines():
        record = json.loads(line)
        assert record.get("output_text") is None
        assert record["ext"]["collab"]["matches_cloud_greedy"] is True and record["ext"]["collab"]["lossless"] is True
    check = json.loads(out.read_text())["results"]["collaboration"]["speculative"]["lossless_check"]
    assert check["lossless"] == 2 and check["lossy"] == 0


def test_both_protocols_commit_the_same_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cloud_url: str, tiny_models: dict[str, Path]
) -> None:
    texts = {}
    for protocol in ("generate", "logprobs"):
        raw = tmp_path / f"{protocol}.jsonl"
        code, _, _ = run_cli(
            capsys,
            "bench",
            "--strategy",
            "speculative",
            "--model",
            str(tiny_models["draft"]),
            "--cloud-url",
            cloud_url,
            "--verify",
            protocol,
            "--runs",
            "2",
            "--warmup",
            "0",
            "--max-tokens",
            "16",
            "--raw",
            str(raw),
            "--adaptive-draft",
            *TINY,
        )
        assert code == 0
        texts[protocol] = [json.loads(line)["output_text"] for line in raw.read_text().splitlines()]
    assert texts["generate"] == texts["logprobs"]


def test_baselines_give_speedups(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cloud_url: str, tiny_models: dict[str, Path]
) -> None:
    out = tmp_path / "r.json"
    code, stdout, _ = run_cli(
        capsys,
        "bench",
        "--strategy",
        "speculative",
        "--model",
        str(tiny_models["draft"]),
        "--cloud-url",
        cloud_url,
        "--runs",
        "2",
        "--warmup",
        "0",
        "--max-tokens",
        "12",
        "--baselines",
        "--output",
        str(out),
        *TINY,
    )
    assert code == 0
    speedup = json.loads(out.read_text())["results"]["speedup"]
    rates = speedup["tokens_per_second"]
    assert speedup["vs_cloud_only"] == pytest.approx(rates["this_run"] / rates["cloud_only"])
    assert speedup["vs_edge_only"] == pytest.approx(rates["this_run"] / rates["edge_only"])
    assert "× cloud-only" in stdout


def test_offload_records_decisions_and_shadows(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    cloud_url: str,
    tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"id": "short", "prompt": "hi"})
        + "\n"
        + json.dumps({"id": "long", "prompt": "tell me a long story " * 4})
        + "\n"
    )
    monkeypatch.setenv("LENS_OFFLOAD_PROMPT_TOKENS_ABOVE", "20")
    monkeypatch.setenv("LENS_OFFLOAD_SHADOW_FRACTION", "1")
    raw, out = tmp_path / "r.jsonl", tmp_path / "r.json"
    code, _, stderr = run_cli(
        capsys,
        "bench",
        "--strategy",
        "offload",
        "--model",
        str(tiny_model),
        "--cloud-url",
        cloud_url,
        "--prompts",
        str(prompts),
        "--runs",
        "4",
        "--warmup",
        "0",
        "--max-tokens",
        "6",
        "--raw",
        str(raw),
        "--output",
        str(out),
        *TINY,
    )
    assert code == 0, stderr
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    for r in records:
        o = r["ext"]["offload"]
        assert r["strategy"] == "offload"
        if r["prompt_id"] == "long":
            assert o["decision"] == "cloud" and "> 20" in o["reason"] and r["engine"] == "openai-compatible"
        else:
            assert o["decision"] in ("local", "cloud") and o["reason"]
        assert o["shadow"]["other"] != o["decision"] and isinstance(o["shadow"]["policy_right"], bool)
    offload = json.loads(out.read_text())["results"]["collaboration"]["offload"]
    assert sum(offload["decisions"].values()) == 4 and offload["shadowed"] == 4
    assert 0.0 <= offload["policy_right_rate"] <= 1.0


def test_offload_policy_rules() -> None:
    policy = OffloadPolicy(prompt_tokens_above=100, battery_below=20, on_battery=False)
    rates = Rates(
        local_prefill_ms_per_token=1.0,
        local_decode_ms_per_token=20.0,
        cloud_ttft_ms_per_prompt_token=0.1,
        cloud_decode_ms_per_token=5.0,
        rtt_ms=50.0,
    )
    assert predict(rates, 10, 11) == (10 + 10 * 20.0, 50 + 1.0 + 10 * 5.0)
    assert decide(policy, 10, 11, rates, False, 90).target == "cloud"  # 210 ms local > 101 ms cloud
    slow_cloud = Rates(
        local_prefill_ms_per_token=1.0,
        local_decode_ms_per_token=2.0,
        cloud_ttft_ms_per_prompt_token=1.0,
        cloud_decode_ms_per_token=5.0,
        rtt_ms=80.0,
    )
    assert decide(policy, 10, 11, slow_cloud, False, 90).target == "local"
    long = decide(policy, 150, 11, slow_cloud, False, 90)
    assert long.target == "cloud" and long.reason == "prompt of 150 tokens > 100"
    low = decide(policy, 10, 11, slow_cloud, True, 15)
    assert low.target == "cloud" and "battery at 15 % < 20 %" in low.reason
    assert decide(policy, 10, 11, slow_cloud, False, 15).target == "local"  # on AC power, a low battery is fine
    assert decide(OffloadPolicy(on_battery=True), 10, 11, slow_cloud, True, 90).reason.startswith(
        "the device is on battery"
    )
    first = decide(OffloadPolicy(), 10, 11, Rates(), None, None)
    assert first.target == "local" and "no local rate measured yet" in first.reason


# -- a misbehaving endpoint: real HTTP on 127.0.0.1 ------------------------------------------------------------------
def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


async def misbehaving_app(mode: str) -> web.Application:
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "fake"}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        if mode == "500":
            return web.json_response({"error": "boom"}, status=500)
        if mode == "slow":
            await asyncio.sleep(5)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse({"choices": [{"delta": {"role": "assistant"}, "index": 0}]}))  # role only
        await asyncio.sleep(0.05)
        for word in ("Hello", " there", " friend"):
            await response.write(sse({"choices": [{"text": word, "index": 0}]}))
            await asyncio.sleep(0.01)
            if mode == "cut":
                request.transport.close()  # type: ignore[union-attr]
                return response
        if mode == "malformed":
            await response.write(b"data: {not json\n\n")
            return response
        await response.write(sse({"choices": [{"text": "", "index": 0, "finish_reason": "length"}]}))
        await asyncio.sleep(0.05)
        await response.write(sse({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}))
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    return app


@pytest.mark.parametrize(
    ("mode", "error_type"),
    [("ok", None), ("500", "http_500"), ("slow", "timeout"), ("cut", "stream_cut"), ("malformed", "malformed_stream")],
)
async def test_cloud_client_timing_and_errors(aiohttp_server, mode: str, error_type: str | None) -> None:
    server = await aiohttp_server(await misbehaving_app(mode))
    client = CloudClient(CloudSettings(url=f"http://127.0.0.1:{server.port}/v1", timeout=1.0))
    try:
        result = await client.complete("hi", max_tokens=3)
    finally:
        await client.close()
    assert result.error_type == error_type
    if mode == "ok":
        # TTFT at the first chunk with text (after the role-only chunk); e2e at the last text chunk, not the usage
        assert result.texts == ["Hello", " there", " friend"] and len(result.chunk_ns) == 3
        assert (result.chunk_ns[0] - result.start_ns) / 1e6 >= 45
        assert result.end_ns == result.chunk_ns[-1]
        assert result.output_tokens == (3, "server usage")


async def test_unreachable_cloud_is_a_usage_error(capsys: pytest.CaptureFixture[str], tiny_model: Path) -> None:
    code, _, err = await asyncio.get_running_loop().run_in_executor(
        None, lambda: run_cli(capsys, "bench", "--strategy", "cloud", "--cloud-url", "http://127.0.0.1:9/v1", *TINY)
    )
    assert code == 2 and "cannot connect" in err and "cloud.url" in err


def test_cloud_strategy_without_url_says_which_key(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "bench", "--strategy", "speculative", *TINY)
    assert code == 2 and "cloud.url" in err


def test_errors_are_measurements_and_the_run_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def start() -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(await misbehaving_app("500"))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, runner.addresses[0][1]

    loop = asyncio.new_event_loop()
    runner, port = loop.run_until_complete(start())
    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        out = tmp_path / "r.json"
        code, _, stderr = run_cli(
            capsys,
            "bench",
            "--strategy",
            "cloud",
            "--cloud-url",
            f"http://127.0.0.1:{port}/v1",
            "--runs",
            "3",
            "--warmup",
            "0",
            "--max-tokens",
            "4",
            "--output",
            str(out),
            *TINY,
        )
        assert code == 1, stderr  # the run goes on and its results are written, but a run with no success fails
        assert "no request succeeded (3 of 3 failed: http_500 ×3)" in stderr
        errors = json.loads(out.read_text())["results"]["error_metrics"]
        assert errors == {"total_errors": 3, "error_rate": 1.0, "errors_by_type": {"http_500": 3}}
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_link_proxy_adds_its_round_trip(cloud_url: str) -> None:

    port = int(cloud_url.rsplit(":", 1)[1].split("/")[0])

    def fetch(url: str) -> float:
        t0 = time.perf_counter()
        urllib.request.urlopen(url, timeout=10).read()
        return (time.perf_counter() - t0) * 1000

    proxy = LinkProxy(port, rtt_ms=120).start_in_thread()
    try:
        direct = min(fetch(cloud_url + "/models") for _ in range(3))
        delayed = min(fetch(f"http://127.0.0.1:{proxy.port}/v1/models") for _ in range(3))
    finally:
        proxy.stop_thread()
    # a fresh connection each time: the request and its answer each cross the link once (one RTT), loosely bounded
    assert 100 <= delayed - direct < 1000
