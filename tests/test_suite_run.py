"""``lens-agent bench --suite`` end to end: a suite document of each shape against real llama.cpp — a local GGUF
through the lens's own loop, llama.cpp's ``llama-server`` behind bearer auth read from a credentials file — and a
suite as a scheduled workload of ``lens-agent run``. The document's own checks are in test_suite_parse.py, the load
generator's in test_loadgen.py."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lens_core import wire

from .netproxy import free_port
from .test_bench_cli import check_document, run_cli

ROOT = Path(__file__).resolve().parents[1]
AGENT = [sys.executable, "-c", "from agent.cli import main; main()"]
SECRET = "sk-suite-test-0123456789"


def write_prompts(path: Path) -> Path:
    path.write_text(
        "\n".join(
            json.dumps({"id": f"p{i}", "prompt": text})
            for i, text in enumerate(
                [
                    "the cat sat on the mat and looked at the dog",
                    "a short one",
                    "tell me about the quick brown fox that jumps over the lazy dog again and again",
                    "what is the time",
                    "one two three four five six seven eight nine ten eleven twelve",
                ]
            )
        )
        + "\n"
    )
    return path


def agent_config(tmp_path: Path, model: Path, extra: str = "") -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[agent]
data_dir = "{tmp_path / "data"}"
device_id = "suite-device"
[model]
path = "{model}"
n_ctx = 256
n_threads = 1
[probes]
idle_baseline = "0"
power_source = "none"
{extra}
""")
    return config


def raw_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_local_gguf_suite_runs_each_level_and_says_what_it_ran_instead(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path, results_schema: dict[str, Any]
) -> None:
    write_prompts(tmp_path / "prompts.jsonl")
    suite = tmp_path / "suite.json"
    suite.write_text(
        json.dumps(
            {
                "test_suite": {"name": "edge-nightly", "version": "3", "description": "tiny"},
                "models": [{"name": "tiny", "endpoint": f"file://{tiny_model}"}],
                "workloads": [
                    {
                        "name": "short",
                        "input_dataset": "prompts.jsonl",
                        "input_token_range": {"min": 6, "max": 12},
                        "output_token_target": 6,
                        "concurrency_levels": [1, 4],
                        "request_rates": [2],
                        "requests": 3,
                    }
                ],
            }
        )
    )
    out, raw = tmp_path / "out", tmp_path / "requests.jsonl"
    code, stdout, stderr = run_cli(
        capsys,
        "bench",
        "--config",
        str(agent_config(tmp_path, tiny_model)),
        "--suite",
        str(suite),
        "--output",
        str(out),
        "--raw",
        str(raw),
        "--no-progress",
    )
    assert code == 0, stderr
    documents = sorted(out.glob("*.json"))
    assert [d.name for d in documents] == [
        "edge-nightly-tiny-short-c1.json",
        "edge-nightly-tiny-short-c4.json",
        "edge-nightly-tiny-short-r2-poisson.json",
    ]
    template: dict[str, Any] = {}
    for path in documents:
        doc = json.loads(path.read_text())
        check_document(doc, results_schema)
        assert doc["configuration"]["test_parameters"]["concurrency_levels"] == [1]  # what ran, not what was asked
        assert doc["configuration"]["suite"]["name"] == "edge-nightly"
        assert doc["configuration"]["test_parameters"]["output_token_target"] == 6
        assert doc["results"]["requests"]["measured"] == 3
        # what the chat template and BOS add to each prompt: input_token_range counts the prompt text alone
        template = doc["configuration"]["suite"]["template_tokens"]
        assert 1 <= template["min"] <= template["max"]
    asked_four = json.loads(documents[1].read_text())
    assert "one request at a time" in asked_four["configuration"]["suite"]["note"]
    assert asked_four["configuration"]["test_parameters"]["load"]["ran"] == "concurrency 1"
    asked_rate = json.loads(documents[2].read_text())
    assert asked_rate["configuration"]["test_parameters"]["load"]["offered_rate_rps"] == 2
    assert "'2 req/s poisson' ran as concurrency 1" in asked_rate["configuration"]["suite"]["note"]
    assert "ran as concurrency 1" in stderr
    rows = {line[18:].split("   ")[0].strip(): line for line in stdout.splitlines() if line.startswith("tiny ")}
    assert set(rows) == {"concurrency 1", "concurrency 4 (ran 1)", "2 req/s poisson (ran 1)"}, stdout
    assert "2.0*" in rows["2 req/s poisson (ran 1)"] and "* the rate the level asked for" in stdout
    assert "workload short" in stdout and stdout.count("tiny ") >= 2
    records = raw_records(raw)
    measured = [r for r in records if not r["warmup"]]
    assert len(measured) == 9
    for record in measured:
        # the prompt text is within the range; the model received it in its template
        assert 6 + template["min"] <= record["input_tokens"] <= 12 + template["max"]
        assert record["output_tokens"] == 6  # the target, past end-of-sequence
        assert record["ext"]["suite"]["workload"] == "short" and record["ext"]["suite"]["sha256"]
        load, asked = record["ext"]["load"], record["ext"]["suite"]["level"]
        assert load["concurrency"] == 1 and load["level"] == "concurrency 1"  # what ran …
        assert load.get("asked") == (None if asked == "concurrency 1" else asked)  # … and what was asked


def test_an_endpoint_suite_with_bearer_auth_from_a_credentials_file(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tiny_model: Path,
    llama_server_bin: Path,
    results_schema: dict[str, Any],
) -> None:
    from .llama_server import LlamaServerProcess

    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "cloud.key").write_text(SECRET + "\n")
    (creds / "wrong.key").write_text("sk-not-the-key\n")
    write_prompts(tmp_path / "prompts.jsonl")
    port = free_port()
    with LlamaServerProcess(llama_server_bin, tiny_model, port, ["--api-key", SECRET, "--parallel", "2"]):
        suite = tmp_path / "suite.yaml"
        suite.write_text(f"""
test_suite: {{name: cloud-load}}
models:
  - name: served
    endpoint: http://127.0.0.1:{port}/v1
    api_type: custom
    auth: {{type: bearer, credentials_path: credentials/cloud.key}}
workloads:
  - name: sweep
    input_dataset: prompts.jsonl
    input_token_range: {{min: 4, max: 16}}
    output_token_target: 8
    concurrency_levels: [1, 2]
    request_rates: [4]
    arrival: constant
    requests: 4
""")
        out, raw = tmp_path / "out", tmp_path / "requests.jsonl"
        code, stdout, stderr = run_cli(
            capsys,
            "bench",
            "--config",
            str(agent_config(tmp_path, tiny_model)),
            "--suite",
            str(suite),
            "--output",
            str(out),
            "--raw",
            str(raw),
            "--no-progress",
        )
        assert code == 0, stderr
        docs = {p.stem.rsplit("-", 1)[-1]: json.loads(p.read_text()) for p in out.glob("*.json")}
        assert len(docs) == 3, list(out.iterdir())
        for doc in docs.values():
            check_document(doc, results_schema)
            assert doc["results"]["error_metrics"]["total_errors"] == 0
            assert doc["configuration"]["model"]["name"] == "served"
        by_level = {d["configuration"]["suite"]["level"]: d for d in docs.values()}
        closed2 = next(d for label, d in by_level.items() if "concurrency 2" in label)
        assert closed2["configuration"]["test_parameters"]["concurrency_levels"] == [2]
        open4 = next(d for d in docs.values() if d["configuration"]["test_parameters"]["load"]["mode"] == "open")
        assert open4["results"]["load"]["offered_rate_rps"] == 4
        assert open4["configuration"]["test_parameters"]["concurrency_levels"][0] >= 1
        measured = [r for r in raw_records(raw) if not r["warmup"]]
        assert len(measured) == 12 and all(r["ok"] and r["output_tokens"] == 8 for r in measured)
        opened = [r for r in measured if r["ext"]["load"]["mode"] == "open"]
        assert len(opened) == 4 and all(r["ext"]["load"]["offered_rate_rps"] == 4 for r in opened)
        assert all(r["ext"]["load"]["scheduled_at"].endswith("Z") for r in opened)
        assert "workload sweep" in stdout and "saturat" in stdout
        assert SECRET not in stdout + stderr + raw.read_text()

        # the wrong key: refused before any level runs when the endpoint is asked for its models …
        suite.write_text(suite.read_text().replace("cloud.key", "wrong.key").replace("[1, 2]", "[1]"))
        args = ("bench", "--config", str(agent_config(tmp_path, tiny_model)), "--suite", str(suite), "--no-progress")
        code, stdout, stderr = run_cli(capsys, *args)
        assert code == 2 and "GET /models answered HTTP 401" in stderr and "wrong.key" in stderr, stderr
        assert "sk-not-the-key" not in stderr
        # … or for its tokenizer when the served model is named …
        suite.write_text(suite.read_text().replace("api_type: custom", "api_type: custom\n    model: tiny"))
        code, stdout, stderr = run_cli(capsys, *args)
        assert code == 2 and "/tokenize answered HTTP 401" in stderr and "wrong.key" in stderr, stderr
        # … and without a token range, every request is refused by the server, counted by type: exit 1
        suite.write_text(suite.read_text().replace("input_token_range: {min: 4, max: 16}", ""))
        code, stdout, stderr = run_cli(capsys, *args, "--json")
        assert code == 1, stderr
        documents = json.loads(stdout)
        assert all(d["results"]["error_metrics"]["errors_by_type"] == {"http_401": 4} for d in documents)
        # the failure names the suite file and the JSON paths of the model and workload
        assert f"{suite}: $.models[0] × $.workloads[0] (concurrency 1): served: no request succeeded" in stderr
        # and no level is said to keep up when every request failed
        assert all(
            d["results"]["load"]["saturation"].startswith("not determined: every request failed") for d in documents
        )


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"concurrency": 10**6}, "$.workloads[0].concurrency"),
        ({"concurrency": "4"}, "$.workloads[0].concurrency"),
        ({"input_dataset": "/etc/passwd"}, "$.workloads[0].input_dataset"),
    ],
)
def test_a_hostile_suite_is_refused_with_its_json_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path, change: dict[str, Any], where: str
) -> None:
    suite = tmp_path / "suite.json"
    workload = {"name": "w", "output_token_target": 4, **change}
    suite.write_text(
        json.dumps(
            {"test_suite": {}, "models": [{"name": "m", "endpoint": f"file://{tiny_model}"}], "workloads": [workload]}
        )
    )
    code, _, stderr = run_cli(
        capsys, "bench", "--config", str(agent_config(tmp_path, tiny_model)), "--suite", str(suite)
    )
    assert code == 2 and "Traceback" not in stderr
    assert str(suite) in stderr and where in stderr


def test_output_names_never_collide(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path) -> None:
    """Models a/b and a:b, workloads w and w/, rates 100.00001 and 100.00002 and a suite named only dots: every
    level gets its own file and its own table row."""
    models = [{"name": name, "endpoint": f"file://{tiny_model}"} for name in ("a/b", "a:b")]
    workload = {"output_token_target": 2, "requests": 1, "warmup_requests": 0, "request_rates": [100.00001, 100.00002]}
    suite = tmp_path / "suite.json"
    suite.write_text(
        json.dumps(
            {
                "test_suite": {"name": "..."},
                "models": models,
                "workloads": [{"name": "w", **workload}, {"name": "w/", **workload}],
            }
        )
    )
    out = tmp_path / "out"
    config = str(agent_config(tmp_path, tiny_model))
    code, stdout, stderr = run_cli(capsys, "bench", "--config", config, "--suite", str(suite), "--output", str(out))
    assert code == 0, stderr
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 8 and not any(n.startswith(".") for n in names), names
    assert "x-a-b-w-r100.00001-poisson.json" in names and "x-a-b-w-r100.00001-poisson-4.json" in names
    combos = set()
    for path in out.iterdir():
        facts = json.loads(path.read_text())["configuration"]["suite"]
        combos.add((facts["model"], facts["workload"], facts["level"]))
    assert len(combos) == 8
    assert "100.00001 req/s poisson (ran 1)" in stdout and "100.00002 req/s poisson (ran 1)" in stdout, stdout


def test_every_level_is_held_to_max_duration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path
) -> None:
    """No duration_seconds: a level of 100000 requests still stops sending at [suite] max_duration; a rate whose
    schedule cannot fit in it is refused before anything runs, at its JSON path."""
    suite = tmp_path / "suite.json"
    document = {
        "test_suite": {"name": "long"},
        "models": [{"name": "m", "endpoint": f"file://{tiny_model}"}],
        "workloads": [{"name": "w", "output_token_target": 2, "requests": 100000, "warmup_requests": 0}],
    }
    suite.write_text(json.dumps(document))
    config = str(agent_config(tmp_path, tiny_model, '[suite]\nmax_duration = "2s"\n'))
    code, stdout, stderr = run_cli(capsys, "bench", "--config", config, "--suite", str(suite), "--json")
    assert code == 0, stderr
    [doc] = json.loads(stdout)
    assert 1 <= doc["results"]["requests"]["measured"] < 100000
    assert doc["configuration"]["test_parameters"]["load"]["duration_s"] == 2
    for rate, where in ((1e-300, "[0]"), (1e-7, "[0]")):
        document["workloads"][0] = {"name": "w", "request_rates": [rate], "requests": 3}
        suite.write_text(json.dumps(document))
        code, _, stderr = run_cli(capsys, "bench", "--config", config, "--suite", str(suite))
        assert code == 2 and "Traceback" not in stderr, stderr
        assert f"$.workloads[0].request_rates{where}" in stderr and "[suite] max_duration (2 s)" in stderr


def test_suite_flags_that_clash_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run_cli(capsys, "bench", "--suite", str(tmp_path / "s.json"), "--runs", "3", "--model", "x")
    assert code == 2 and "--model, --runs" in stderr


def test_a_suite_runs_as_a_scheduled_workload_of_the_service(tmp_path: Path, tiny_model: Path) -> None:
    write_prompts(tmp_path / "prompts.jsonl")
    suite = tmp_path / "nightly.json"
    suite.write_text(
        json.dumps(
            {
                "test_suite": {"name": "nightly"},
                "models": [{"name": "tiny", "endpoint": f"file://{tiny_model}"}],
                "workloads": [
                    {"name": "a", "input_dataset": "prompts.jsonl", "output_token_target": 4, "requests": 2},
                    {
                        "name": "b",
                        "output_token_target": 3,
                        "requests": 1,
                        "warmup_requests": 0,
                        "concurrency": 2,
                    },
                ],
            }
        )
    )
    extra = f'[[workloads]]\nname = "suite-run"\nsuite = "{suite}"\nevery = "1h"\njitter = "0"\n'
    config = agent_config(tmp_path, tiny_model, extra)
    done = subprocess.run(
        [*AGENT, "run", "--config", str(config), "--once"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # run --once says that a local model ran the level one request at a time
    assert "note: b: tiny is a local llama.cpp model" in done.stdout and "ran as concurrency 1" in done.stdout
    conn = sqlite3.connect(tmp_path / "data" / "outbox.db")
    try:
        rows = conn.execute("SELECT codec, body FROM records ORDER BY seq").fetchall()
    finally:
        conn.close()
    records = [wire.loads(bytes(body), codec) for codec, body in rows]
    inference = [r for r in records if r["kind"] == "inference"]
    assert [r["ext"]["suite"]["workload"] for r in inference] == ["a", "a", "b"]
    assert all(r["ext"]["workload"] == "suite-run" and r["ext"]["suite"]["name"] == "nightly" for r in inference)

    # a bad suite stops the start, naming the file and the JSON path
    suite.write_text(suite.read_text().replace('"requests": 1', '"requests": -1'))
    done = subprocess.run(
        [*AGENT, "run", "--config", str(config), "--once"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "$.workloads[1].requests" in done.stderr and str(suite) in done.stderr
    assert "Traceback" not in done.stderr
