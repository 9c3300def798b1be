"""A suite and its endpoint as hostile parties: a redirecting endpoint never gets the key beyond its own host nor a
measurement of another host; an endless or newline-less stream is cut at the answer bound in bounded memory; a
served model's name and an error body are checked or cleaned; a suite pushed by a server may contact only the
origins of ``[suite] endpoints``; a dataset must be a prompt file; YAML 1.1 numbers stay strings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.campaigns import campaign_policy, parse_job_suite
from agent.config import load_config
from agent.engines.cloud import (
    CloudClient,
    CloudSettings,
    answer_byte_limit,
    check_served_model,
    clean_text,
)
from agent.errors import RequestError
from agent.suite import SuiteError, SuitePolicy, load_suite, parse_suite, read_credentials
from lens_core.suite import url_has_credentials

from .test_bench_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-hostile-0123456789"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.contextmanager
def serve(host: str, handler: Handler) -> Iterator[str]:
    """An aiohttp server answering every request with ``handler``, on its own loop in a thread; yields its origin."""
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, host, 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def agent_config(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[agent]
data_dir = "{tmp_path / "data"}"
device_id = "hostile-device"
[probes]
idle_baseline = "0"
power_source = "none"
{extra}
""")
    return config


# -- 1: redirects are never followed -------------------------------------------------------------------------------
def test_a_redirecting_endpoint_gets_the_key_only_at_its_own_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first: list[tuple[str, dict[str, str]]] = []
    second: list[tuple[str, dict[str, str]]] = []

    async def other(request: web.Request) -> web.StreamResponse:
        second.append((request.path, dict(request.headers)))
        if request.path.endswith("/models"):
            return web.json_response({"data": [{"id": "m"}]})
        return web.json_response({"choices": [{"text": "x", "finish_reason": "stop"}]})

    with serve("127.0.0.2", other) as elsewhere:

        async def redirect(request: web.Request) -> web.StreamResponse:
            first.append((request.path, dict(request.headers)))
            return web.Response(status=307, headers={"Location": elsewhere + request.path_qs})

        with serve("127.0.0.1", redirect) as origin:
            (tmp_path / "notakey.conf").write_text(SECRET + "\n")
            suite = tmp_path / "redir.yaml"
            body = f"""
test_suite: {{name: redir}}
models:
  - name: m
    endpoint: {origin}/v1
    auth: {{type: api_key, credentials_path: notakey.conf}}
workloads:
  - name: w
    output_token_target: 4
    requests: 2
    warmup_requests: 0
"""
            config = str(agent_config(tmp_path))
            # no served model named: GET /models is redirected, refused before any level runs
            suite.write_text(body)
            code, stdout, stderr = run_cli(capsys, "bench", "--config", config, "--suite", str(suite), "--no-progress")
            assert code == 2 and "redirect" in stderr and elsewhere in stderr, stderr
            assert "$.models[0].endpoint" in stderr
            # the served model named: every request is answered 307, counted as a redirect, never measured elsewhere
            suite.write_text(body.replace("    endpoint:", "    model: m\n    api: completions\n    endpoint:"))
            code, stdout, stderr = run_cli(
                capsys, "bench", "--config", config, "--suite", str(suite), "--no-progress", "--json"
            )
            assert code == 1, stderr
            documents = json.loads(stdout)
            assert [d["results"]["error_metrics"]["errors_by_type"] for d in documents] == [{"redirect": 2}]
    assert first and all(headers.get("X-API-Key") == SECRET for _, headers in first)
    assert second == []  # the other host was never asked anything: not for /props, not for a completion
    assert SECRET not in stdout + stderr


def test_the_token_protocol_and_model_listing_do_not_follow_redirects() -> None:
    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "http://127.0.0.3:1/elsewhere"})

    with serve("127.0.0.1", redirect) as origin:
        client = CloudClient(CloudSettings(url=origin + "/v1", api_key=SECRET))

        async def go() -> tuple[RequestError, RequestError, Any]:
            try:
                with pytest.raises(RequestError) as tokenize:
                    await client.tokenize("hello", False)
                with pytest.raises(RequestError) as listing:
                    await client.model_name()
                result = await client.complete("hi", max_tokens=4)
                return tokenize.value, listing.value, result
            finally:
                await client.close()

        tokenize, listing, result = asyncio.run(go())
    for error in (tokenize, listing):
        assert error.error_type == "redirect" and "http://127.0.0.3:1" in error.message
        assert "/elsewhere" not in error.message  # the origin only
    assert result.error_type == "redirect" and result.http_status == 302 and "127.0.0.3" in result.error_message


# -- 3: bounded reads --------------------------------------------------------------------------------------------
CHILD = """
import asyncio, json, sys
from agent.engines.cloud import CloudClient, CloudSettings

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
before = hwm()
async def go():
    client = CloudClient(CloudSettings(url=sys.argv[1], model="m", timeout=120))
    try:
        return await client.complete("hi", max_tokens=4, stream=sys.argv[2] == "stream")
    finally:
        await client.close()
result = asyncio.run(go())
print(json.dumps({"error_type": result.error_type, "error_message": result.error_message,
                  "bytes_down": result.bytes_down, "growth": hwm() - before}))
"""


@pytest.mark.parametrize("shape", ["endless", "no-newline", "huge-body", "huge-error"])
def test_a_hostile_answer_is_cut_at_its_bound_in_bounded_memory(shape: str) -> None:
    sent = [0]

    async def hostile(request: web.Request) -> web.StreamResponse:
        status = 500 if shape == "huge-error" else 200
        response = web.StreamResponse(status=status, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        event = b'data: {"choices": [{"text": "x"}]}\n\n'
        chunk = event * 2000 if shape == "endless" else b"x" * 65536
        if shape == "huge-body":
            chunk = b'{"choices": [{"text": "' + b"y" * 65536
        try:
            for _ in range(200_000):  # up to ~13 GB: far past any bound (the client stops reading long before)
                await response.write(chunk)
                sent[0] += len(chunk)
        except (ConnectionResetError, RuntimeError, OSError):
            pass
        return response

    with serve("127.0.0.1", hostile) as origin:
        mode = "body" if shape == "huge-body" else "stream"
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, origin + "/v1", mode],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    result = json.loads(proc.stdout)
    expected = {
        "endless": "response_too_large",
        "no-newline": "malformed_stream",
        "huge-body": "response_too_large",
        "huge-error": "http_500",
    }[shape]
    assert result["error_type"] == expected, result
    limit = answer_byte_limit(4)
    assert result["bytes_down"] <= limit + (2 << 20), result  # read up to the bound (and a last chunk), no further
    assert result["growth"] < 100 << 20, result  # peak RSS growth of the reading process
    if shape == "huge-error":
        assert len(result["error_message"]) <= 300 and set(result["error_message"]) == {"x"}


def test_server_text_is_cleaned_and_a_hostile_model_name_refused() -> None:
    assert clean_text("\x1b]0;pwned\x07ok\u202e\nline" + "z" * 1000) == "]0;pwnedok line" + "z" * 285
    assert len(clean_text("a" * 5000)) == 300
    assert check_served_model("Qwen2.5-0.5B-Instruct") == "Qwen2.5-0.5B-Instruct"
    for bad in ("m" * 257, "model\x1b[31m", "a\u200bb", "", 3):
        with pytest.raises(RequestError) as info:
            check_served_model(bad)
        assert info.value.error_type == "malformed_response" and "\x1b" not in info.value.message

    async def listing(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/models"):
            return web.json_response({"data": [{"id": "\x1b]52;c;evil\x07" + "m" * 2_000_000}]})
        return web.Response(status=500, text="internal\x1b[2J host 10.0.0.7 " + "e" * 100_000)

    with serve("127.0.0.1", listing) as origin:
        client = CloudClient(CloudSettings(url=origin + "/v1"))

        async def go() -> tuple[RequestError, Any]:
            try:
                with pytest.raises(RequestError) as info:
                    await client.model_name()
                return info.value, await client.complete("hi", max_tokens=4)
            finally:
                await client.close()

        error, result = asyncio.run(go())
    assert error.error_type in ("malformed_response", "response_too_large")
    assert result.error_type == "http_500" and "\x1b" not in result.error_message
    assert len(result.error_message) <= 300 and result.bytes_down <= 64 << 10


def test_a_hostile_served_model_name_stops_the_suite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def listing(request: web.Request) -> web.StreamResponse:
        return web.json_response({"data": [{"id": "m\x1b[31m" + "x" * 300}]})

    with serve("127.0.0.1", listing) as origin:
        suite = tmp_path / "s.json"
        suite.write_text(
            json.dumps(
                {
                    "test_suite": {"name": "s"},
                    "models": [{"name": "m", "endpoint": origin + "/v1"}],
                    "workloads": [{"name": "w", "requests": 1, "warmup_requests": 0}],
                }
            )
        )
        config = str(agent_config(tmp_path))
        code, _, stderr = run_cli(capsys, "bench", "--config", config, "--suite", str(suite), "--no-progress")
    assert code == 2 and "$.models[0].endpoint" in stderr and "at most 256" in stderr, stderr
    assert "\x1b" not in stderr


# -- 2: what a suite from a server may contact and read ------------------------------------------------------------
def pushed(endpoint: str, **auth: str) -> dict[str, Any]:
    model: dict[str, Any] = {"name": "cloud", "endpoint": endpoint}
    if auth:
        model["auth"] = auth
    return {
        "test_suite": {"name": "pushed"},
        "models": [model],
        "workloads": [{"name": "w", "requests": 1}],
    }


def test_a_pushed_suite_may_contact_only_the_listed_origins(tmp_path: Path) -> None:
    creds = tmp_path / "data" / "credentials"
    creds.mkdir(parents=True)
    (creds / "key").write_text(SECRET + "\n")
    # none listed (the default): local models only
    config = load_config(agent_config(tmp_path))
    assert campaign_policy(config).endpoints == ()
    with pytest.raises(SuiteError) as info:
        parse_job_suite(pushed("http://10.0.0.5:8000/v1"), "b1", config)
    assert info.value.path == "$.models[0].endpoint" and "[suite] endpoints" in str(info.value)
    assert "local models only" in str(info.value)

    config = load_config(
        agent_config(tmp_path, '[suite]\nendpoints = ["HTTP://10.0.0.5:8000/", "https://api.example.com:443"]')
    )
    assert campaign_policy(config).endpoints == ("http://10.0.0.5:8000", "https://api.example.com")
    assert parse_job_suite(pushed("http://10.0.0.5:8000/v1"), "b1", config).models[0].url == "http://10.0.0.5:8000/v1"
    assert parse_job_suite(pushed("https://API.example.com/v1"), "b1", config).models[0].kind == "endpoint"
    for other in ("http://10.0.0.5:8001/v1", "https://10.0.0.5:8000/v1", "http://10.0.0.6:8000/v1"):
        with pytest.raises(SuiteError) as info:
            parse_job_suite(pushed(other), "b1", config)
        assert info.value.path == "$.models[0].endpoint" and "http://10.0.0.5:8000" in str(info.value), other
    # the key is read (and so sent) only for an endpoint that passed the check, checked again when read
    key_path = str(creds / "key")
    suite = parse_job_suite(pushed("http://10.0.0.5:8000/v1", type="bearer", credentials_path=key_path), "b", config)
    policy = campaign_policy(config)
    assert read_credentials(suite.models[0], policy, "campaign b") == SECRET
    narrowed = SuitePolicy(credentials_dirs=policy.credentials_dirs, endpoints=("http://10.0.0.9",))
    with pytest.raises(SuiteError) as info:
        read_credentials(suite.models[0], narrowed, "campaign b")
    assert info.value.path == "$.models[0].endpoint" and SECRET not in str(info.value)
    # a suite the operator gave is not restricted by it
    operator = tmp_path / "op.json"
    operator.write_text(json.dumps(pushed("http://10.0.0.6:8000/v1")))
    assert load_suite(operator, SuitePolicy()).models[0].url == "http://10.0.0.6:8000/v1"


@pytest.mark.parametrize("value", ["http://10.0.0.5:8000/v1", "ftp://h", "http://u:p@h", "h:80", "http://h/#x"])
def test_the_endpoints_key_takes_origins_only(tmp_path: Path, value: str) -> None:
    from lens_core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(agent_config(tmp_path, f'[suite]\nendpoints = ["{value}"]'))
    assert "suite.endpoints" in str(info.value) and "origin" in str(info.value)


@pytest.mark.parametrize("name", ["notakey.conf", "prompts", "data.json", "x.jsonl.bak", "key"])
def test_a_dataset_must_be_a_prompt_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("a prompt\n")
    document = pushed("gguf:bundled")
    document["workloads"][0]["input_dataset"] = name
    with pytest.raises(SuiteError) as info:
        parse_suite(document, source="s.json", base_dir=tmp_path, policy=SuitePolicy(dataset_dirs=(tmp_path,)))
    assert info.value.path == "$.workloads[0].input_dataset" and ".txt, .jsonl, .ndjson" in str(info.value)


# -- 12: the YAML loader and what a refusal shows ------------------------------------------------------------------
@pytest.mark.parametrize("literal", ["0x10", "1_0", "010", "0o7", "1:30", "0b11", "+5", "1_000.5", "1:30.5"])
def test_yaml_1_1_numbers_stay_strings_and_are_refused(tmp_path: Path, literal: str) -> None:
    suite = tmp_path / "s.yaml"
    suite.write_text(
        f"test_suite: {{name: s}}\nmodels: [{{name: m, endpoint: 'gguf:bundled'}}]\n"
        f"workloads:\n  - name: w\n    requests: {literal}\n"
    )
    with pytest.raises(SuiteError) as info:
        load_suite(suite, SuitePolicy())
    assert info.value.path == "$.workloads[0].requests" and repr(literal) in str(info.value)


def test_plain_yaml_numbers_still_read(tmp_path: Path) -> None:
    suite = tmp_path / "s.yaml"
    suite.write_text(
        "test_suite: {name: s}\nmodels: [{name: m, endpoint: 'http://127.0.0.1:9/v1'}]\n"
        "workloads:\n  - {name: w, requests: 10, request_rates: [0.5, 2, 1.0e+1, -0.0], seed: 0}\n"
    )
    with pytest.raises(SuiteError) as info:  # -0.0 is a number, refused for its value
        load_suite(suite, SuitePolicy())
    assert info.value.path == "$.workloads[0].request_rates[3]"
    suite.write_text(suite.read_text().replace(", -0.0", ""))
    workload = load_suite(suite, SuitePolicy()).workloads[0]
    assert workload.requests == 10 and workload.rates == (0.5, 2.0, 10.0) and workload.seed == 0


def test_a_duplicate_key_is_named_by_its_path(tmp_path: Path) -> None:
    text = "test_suite: {name: s}\nmodels:\n  - name: a\n    endpoint: gguf:bundled\n    name: b\nworkloads: [{}]\n"
    (tmp_path / "d.yaml").write_text(text)
    (tmp_path / "d.json").write_text(
        '{"test_suite": {}, "models": [{"name": "a"}, {"name": "b", "api": "chat", "api": "x"}], "workloads": []}'
    )
    for name, where in (("d.yaml", "$.models[0].name"), ("d.json", "$.models[1].api")):
        with pytest.raises(SuiteError) as info:
            load_suite(tmp_path / name, SuitePolicy())
        assert info.value.path == where and "twice" in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        f"http://h/key={SECRET}/v1",
        f"http://h/v1;token={SECRET}",
        f"http://h/api_key%3D{SECRET}/v1",
        f"http:\\\\u:{SECRET}@host",
        f"http:u:{SECRET}@host\x07",
    ],
)
def test_secret_looking_urls_are_refused_and_never_echoed(url: str) -> None:
    document = pushed(url)
    with pytest.raises(SuiteError) as info:
        parse_suite(document, source="s.json", base_dir=None, policy=SuitePolicy())
    assert info.value.path == "$.models[0].endpoint"
    assert SECRET not in str(info.value) and SECRET not in repr(info.value.value)
    assert not url_has_credentials("http://h/v1/tokens") and url_has_credentials(f"http://h/key={SECRET}/v1")


def test_credentials_path_is_shown_its_content_never(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "k").write_text(f"{SECRET}\nsecond line\n")
    document = pushed("http://127.0.0.1:9/v1", type="bearer", credentials_path="k")
    policy = SuitePolicy(credentials_dirs=(creds,))
    model = parse_suite(document, source="s.json", base_dir=creds, policy=policy).models[0]
    with pytest.raises(SuiteError) as info:
        read_credentials(model, policy, "s.json")
    assert repr(str(creds / "k")) in str(info.value) and SECRET not in str(info.value)
    document["models"][0]["auth"]["credentials_path"] = "../outside"
    with pytest.raises(SuiteError) as info:
        parse_suite(document, source="s.json", base_dir=creds, policy=policy)
    assert "'../outside'" in str(info.value) and "credentials_dirs" in str(info.value)
