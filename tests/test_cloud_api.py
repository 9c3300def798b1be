"""``--cloud-api chat|completions|auto`` against a real llama-cpp-python server on 127.0.0.1.

SmolLM2-135M-Instruct is a chat model: asked on ``/v1/completions`` it answers HTTP 200 with no text. That must be an
error that says so (and the run exits 1), and ``auto`` must pick ``/v1/chat/completions`` for it by itself. The tiny
generated model is not a chat model: ``auto`` keeps ``/v1/completions`` for it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.engines.cloud import chat_by_name

from .netproxy import free_port
from .test_bench_cli import run_cli
from .test_collab import cloud_url  # noqa: F401 - the tiny model's server

ARGS = ("--strategy", "cloud", "--runs", "2", "--warmup", "0", "--max-tokens", "8", "--no-progress")


@pytest.fixture(scope="module")
def smollm2_url(smollm2: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2), "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", "512", "--n_threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/models", timeout=1).read()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the SmolLM2 server did not start"
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_chat_model_names() -> None:
    assert chat_by_name("/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert chat_by_name("llama-3.1-8b-chat") and chat_by_name("gemma-2-9b-it") and chat_by_name("Qwen2-7B-Instruct")
    assert not chat_by_name("tiny-target.gguf") and not chat_by_name("llama-3.1-8b") and not chat_by_name("phi-2")


@pytest.mark.smollm2
def test_completions_on_a_chat_model_is_an_empty_answer_error(
    smollm2_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.json"
    prompts = tmp_path / "p.txt"
    # two of the built-in prompts that SmolLM2 answers on /v1/completions with nothing at all
    prompts.write_text("Write a haiku about a river in winter.\nList the planets of the solar system in order.\n")
    args = ("--cloud-url", smollm2_url, "--cloud-api", "completions", "--prompts", str(prompts), *ARGS)
    code, _, err = run_cli(capsys, "bench", *args, "--output", str(out))
    assert code == 1, err
    assert "no request succeeded (2 of 2 failed: empty_answer ×2)" in err
    doc = json.loads(out.read_text())
    assert doc["configuration"]["cloud"]["api"] == "completions"
    raw = tmp_path / "raw.jsonl"
    run_cli(capsys, "bench", *args, "--raw", str(raw))
    message = json.loads(raw.read_text().splitlines()[0])["error_message"]
    assert message.startswith("/completions answered HTTP 200 without any text")
    assert "use --cloud-api chat" in message


@pytest.mark.smollm2
def test_auto_chooses_chat_for_a_chat_model(
    smollm2_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.json"
    code, stdout, err = run_cli(capsys, "bench", "--cloud-url", smollm2_url, *ARGS, "--output", str(out))
    assert code == 0, err
    cloud = json.loads(out.read_text())["configuration"]["cloud"]
    assert cloud["api"] == "chat" and "named as a chat model" in cloud["api_reason"]
    assert "requests  2/2 ok" in stdout
    # the config file says the same thing as the flag
    config = tmp_path / "agent.toml"
    config.write_text('[cloud]\napi = "completions"\n')
    out2 = tmp_path / "r2.json"
    code, _, err = run_cli(
        capsys, "bench", "--config", str(config), "--cloud-url", smollm2_url, *ARGS, "--output", str(out2)
    )
    assert json.loads(out2.read_text())["configuration"]["cloud"]["api"] == "completions"
    config.write_text('[cloud]\napi = "chatty"\n')
    code, _, err = run_cli(capsys, "bench", "--config", str(config), "--cloud-url", smollm2_url, *ARGS)
    assert code == 2 and "cloud.api" in err and "'auto', 'chat', 'completions'" in err


def test_auto_keeps_completions_for_a_base_model(
    cloud_url: str,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "bench", "--cloud-url", cloud_url, *ARGS, "--output", str(out))
    assert code == 0, err
    cloud = json.loads(out.read_text())["configuration"]["cloud"]
    assert cloud["api"] == "completions" and "not named as a chat model" in cloud["api_reason"]
