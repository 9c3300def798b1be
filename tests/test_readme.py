"""The README's quickstart, run as a user pastes it: every fenced block is either run here or listed in ``NOT_RUN`` with
the reason and the test that covers it instead. A block that is in neither fails the test.

The blocks run verbatim with bash in a scratch copy of the checkout (tests/doc_blocks.py: the files git tracks,
``.venv`` linked, this tree's code imported). The placeholders the README explains are filled in: ``a-Q4_1.gguf``,
``a-Q8_0.gguf``, ``draft.gguf`` and ``model.gguf`` are the tiny generated models under those names,
``http://host:8000/v1`` is a real llama-cpp-python server on 127.0.0.1 (the tiny target model), and port 8443 becomes a
free port. The bundled SmolLM2 the bare commands would load is replaced by the tiny model through ``LENS_MODEL_PATH``
(the README's own override), for speed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .doc_blocks import blocks as page_blocks
from .doc_blocks import scratch_checkout, shell_env
from .netproxy import free_port
from .test_collab import cloud_url  # noqa: F401 - the llama-cpp-python server fixture these blocks time

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# first line of a block → why it is not run here, and what runs it instead
NOT_RUN = {
    "make demo": "make test is this suite itself; make demo is bench/demo.py, run by tests/test_demo.py",
    ".venv/bin/lens-agent run --config /etc/lens-agent/agent.toml": (
        "the service runs until stopped: tests/test_shipped_configs.py starts it from the shipped config as systemd "
        "does; packaging/build-deb.sh takes minutes: tests/test_packaging.py builds the .deb"
    ),
    "lens_core/": "the layout, not a command",
}
RUN = {
    ".venv/bin/lens-agent bench  ",  # the bare bench, then its variations
    ".venv/bin/lens-agent probe ",
    ".venv/bin/lens-agent bench --strategy cloud",
    "# terminal 1, the aggregator",
    "# terminal 2, the device",
    ".venv/bin/lens-agent outbox list --config agent.toml",
    "from llama_cpp import Llama",
}


def blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block in README.md."""
    return [(b.lang, b.text) for b in page_blocks(README)]


def find(prefix: str) -> str:
    found = [text for _, text in blocks() if text.startswith(prefix)]
    assert len(found) == 1, f"README.md: expected one block starting {prefix!r}, found {len(found)}"
    return found[0]


def test_every_block_is_run_or_listed_with_a_reason() -> None:
    for lang, text in blocks():
        first = text.splitlines()[0]
        planned = [p for p in (*RUN, *NOT_RUN) if text.startswith(p)]
        assert planned, f"README.md block not run by tests/test_readme.py nor listed in NOT_RUN: {first!r} ({lang})"
    assert all(reason for reason in NOT_RUN.values())


@pytest.fixture
def checkout(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    """A scratch copy of the checkout, with the README's placeholder models in it."""
    scratch_checkout(tmp_path)
    for name, model in (
        ("a-Q4_1.gguf", "target"),
        ("a-Q8_0.gguf", "draft"),
        ("draft.gguf", "draft"),
        ("model.gguf", "target"),
    ):
        shutil.copyfile(tiny_models[model], tmp_path / name)
    return tmp_path


@pytest.fixture
def env(checkout: Path, tiny_models: dict[str, Path]) -> dict[str, str]:
    out = shell_env(checkout)
    out.update(
        {
            "LENS_MODEL_PATH": str(tiny_models["target"]),
            "LENS_MODEL_N_CTX": "512",
            "LENS_MODEL_N_THREADS": "1",
        }
    )
    return out


def sh(text: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", text], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (
        f"block failed ({done.returncode}):\n{text}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_bench_and_probe_blocks(checkout: Path, env: dict[str, str]) -> None:
    done = sh(find(".venv/bin/lens-agent bench  "), checkout, env)
    for name in ("results.json", "requests.jsonl", "compare-a-Q4_1.json", "compare-a-Q8_0.json"):
        assert (checkout / name).is_file(), name
    assert len(list((checkout / "llmperf").glob("*_summary.json"))) == 1
    last = [m.start() for m in re.finditer(r"^\{$", done.stdout, re.M)][-1]  # the jq line prints the last document
    ttft, end = json.JSONDecoder().raw_decode(done.stdout[last:])
    assert ttft["sample_count"] == 10  # the jq line: the bare bench's 10 runs, warm-up excluded
    doc = json.loads((checkout / "results.json").read_text())
    assert doc["results"]["requests"]["measured"] == 50
    # the suite line: the example suite, a table per workload after the jq output, a results document per level
    suite_out = done.stdout[last + end :]
    assert "workload short-prompts" in suite_out and "workload long-prompts" in suite_out
    documents = sorted(p.name for p in (checkout / "suite-results").glob("*.json"))
    assert documents == [
        "edge-smoke-device-model-long-prompts-c1.json",
        "edge-smoke-device-model-short-prompts-c1.json",
    ]
    long_run = json.loads((checkout / "suite-results" / documents[0]).read_text())
    assert long_run["results"]["requests"]["measured"] == 3
    assert long_run["configuration"]["test_parameters"]["input_tokens"]["mean"] >= 200  # built to the range

    done = sh(find(".venv/bin/lens-agent probe "), checkout, env)
    assert "device " in done.stdout and "power " in done.stdout


def test_cloud_block(checkout: Path, env: dict[str, str], cloud_url: str) -> None:  # noqa: F811
    text = find(".venv/bin/lens-agent bench --strategy cloud")
    assert "http://host:8000/v1" in text
    done = sh(text.replace("http://host:8000/v1", cloud_url), checkout, env, timeout=600)
    for strategy in ("cloud", "speculative", "offload"):
        assert f"strategy={strategy}" in done.stdout, done.stdout
    counts = re.findall(r"^requests  (\d+)/(\d+) ok", done.stdout, re.M)
    assert counts and all(ok == total for ok, total in counts), done.stdout
    assert "speculative     α" in done.stdout and "speedup " in done.stdout
    assert re.search(r"^offload         decisions (cloud|local) ×\d+", done.stdout, re.M), done.stdout


@pytest.fixture
def aggregator_block(checkout: Path, env: dict[str, str]) -> Iterator[int]:
    """Terminal 1: token add, then serve in the foreground, as the README has it."""
    port = free_port()
    text = find("# terminal 1, the aggregator").replace("8443", str(port))
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", text],
        cwd=checkout,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).read()
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the aggregator block did not start serving"
                time.sleep(0.2)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert "Traceback" not in err, err
    assert 'device_id = "orin-017"' in err and f'url = "http://127.0.0.1:{port}"' in err and "allow_http = true" in err


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_store_and_forward_blocks(checkout: Path, env: dict[str, str], aggregator_block: int) -> None:
    port = aggregator_block
    assert (checkout / "orin-017.token").read_text().startswith("lens_")
    device = find("# terminal 2, the device").replace("8443", str(port))
    # batches of 3: the 4 stored records (3 measured + the warm-up) go in 2 batches, and the backlog the aggregator
    # shows is as of the acknowledged upload (pending minus the batch): 1 after the first, 0 after the last
    done = sh(device, checkout, {**env, "LENS_SYNC_BATCH_SIZE": "3"})
    assert "ok    device" in done.stdout and "health      OK" in done.stdout
    assert "uploaded 4 in 2 batches: 4 accepted" in done.stdout
    devices = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/devices", timeout=5))["devices"]
    assert [(d["device_id"], d["records"], d["backlog"]) for d in devices] == [("orin-017", 4, 0)]
    # the README's curl line shows the counter: measured requests only (3), the warm-up is not counted
    assert re.search(r"^llm_latency_lens_requests_total\{.*\} 3\.0$", done.stdout, re.M), done.stdout

    # records stored under the host name before device_id was set: quarantined, then re-homed by the recipe
    old = subprocess.run(
        [".venv/bin/lens-agent", "bench", "--config", "agent.toml", "--store", "--runs", "2", "--warmup", "0",
         "--max-tokens", "4", "--device-id", "old-host-name", "--no-progress"],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert old.returncode == 0, old.stderr
    first = subprocess.run(
        [".venv/bin/lens-agent", "sync", "--config", "agent.toml"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.returncode == 1 and "2 quarantined" in first.stdout
    done = sh(find(".venv/bin/lens-agent outbox list --config agent.toml"), checkout, env)
    assert "other_device" in done.stdout and "1 accepted" not in done.stdout and "2 accepted" in done.stdout
    assert metric(port, "llm_latency_lens_requests_total") == 5


def test_python_block(checkout: Path, env: dict[str, str]) -> None:
    text = find("from llama_cpp import Llama")
    done = subprocess.run(
        [".venv/bin/python", "-c", text], cwd=checkout, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    ttft, tpot, tpot2 = (float(x) for x in done.stdout.split())
    assert ttft > 0 and tpot > 0 and tpot2 > 0
