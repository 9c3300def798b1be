"""``lens-agent tune`` as its user runs it: the search on real llama.cpp (tiny generated models and SmolLM2), the
significance rule, the drop-in it applies, verification over the service's scheduled runs, the rollback of a worse
change, and every step as a record that reaches a real aggregator."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent.engines.llama import EngineSettings, LlamaEngine
from agent.tuning import Candidate, Stage, TuneOptions, Tuner
from lens_core import wire

from .netproxy import free_port
from .processes import AggregatorProcess, device_token

ROOT = Path(__file__).resolve().parent.parent
AGENT = [sys.executable, "-c", "from agent.cli import main; main()"]
# ~125 tokens of the tiny models' vocabulary: prompt processing dominates a 4-token request, so the batch size moves it
PROMPT = " ".join(f"the sensor on board {n} reported a steady reading of {n * 7 % 50} degrees" for n in range(2))


def agent(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LENS_")}
    clean.update(env)
    return subprocess.run([*AGENT, *args], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=300)


def write_config(
    tmp_path: Path,
    model: Path,
    *,
    n_batch: int,
    extra: str = "",
    n_ctx: int = 256,
    sync: str = "",
    device: str = "tune-dev",
    objective: str = "ttft",
    max_tokens: int = 4,
    interference: bool = False,
) -> Path:
    """An agent configuration for the tune and advice tests. ``interference`` off by default: on a machine busy
    with the test suite every request can be contended, which feedback and the acknowledgements' advice then leave
    out — these tests are about tuning and advice; tests/test_interference*.py cover the marking."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "long", "prompt": PROMPT}) + "\n")
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""
[agent]
device_id = "{device}"
data_dir = "{tmp_path / "data"}"
[model]
path = "{model}"
n_ctx = {n_ctx}
n_threads = 1
n_batch = {n_batch}
[bench]
chat_template = "off"
{sync}
[probes]
idle_baseline = "0"
power_source = "none"
[interference]
enabled = {"true" if interference else "false"}
[service]
final_sync_timeout = "0"
[tune]
n_threads = [1]
flash_attn = [true]
requests = 4
rounds = 3
max_tokens = {max_tokens}
objective = "{objective}"
verify_runs = 2
# these tests are about the search and applying its winner, on a machine shared with other work: a contended
# search decides nothing by default (tests/test_tune_interference.py)
allow_contended = true
{extra}
[[workloads]]
name = "long"
prompts = "{prompts}"
requests = 3
max_tokens = 4
every = "1h"
jitter = "0"
"""
    )
    return config


def outbox_records(data_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    conn = sqlite3.connect(data_dir / "outbox.db")
    try:
        rows = conn.execute("SELECT codec, body FROM records ORDER BY seq").fetchall()
    finally:
        conn.close()
    records = [wire.loads(bytes(body), codec) for codec, body in rows]
    return [r for r in records if kind is None or r["kind"] == kind]


def engine_prefill_ms(model: Path, n_batch: int, runs: int = 6) -> float:
    """llama.cpp's own prompt-processing time for PROMPT at ``n_batch``: the independent ground truth."""
    import statistics

    from agent.bench.runner import BenchOptions, run_bench
    from agent.prompts import Prompt

    engine = LlamaEngine.load(model, EngineSettings(n_ctx=256, n_threads=1, n_batch=n_batch), compute_sha256=False)
    try:
        run = run_bench(
            engine,
            [Prompt(id="long", text=PROMPT)],
            BenchOptions(runs=runs, warmup=1, max_tokens=4, ignore_eos=True, chat_template="off"),
            run_id="truth",
            device_id="truth",
        )
    finally:
        engine.close()
    return statistics.median(m.engine_prefill_ms for m in run.measured if m.engine_prefill_ms is not None)


# -- the search ---------------------------------------------------------------------------------------------------
def test_tune_finds_the_faster_batch_size_and_applies_it(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path, tiny_model, n_batch=1)
    result = agent("tune", "run", "--config", str(config), "--try", "n_batch=1,64", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    # llama.cpp's own counters, measured apart from the tune, say which batch size processes the prompt faster
    truth_1, truth_64 = engine_prefill_ms(tiny_model, 1), engine_prefill_ms(tiny_model, 64)
    assert truth_64 < truth_1 * 0.7, (truth_1, truth_64)
    assert answer["significant"] is True
    assert answer["changes"] == {"n_batch": {"from": 1, "to": 64}}
    stage = answer["stages"][0]
    assert stage["stage"] == "n_batch" and stage["winner"].endswith("n_threads=1") and "n_batch=64" in stage["winner"]
    challenger = next(c for c in stage["candidates"] if c["settings"]["n_batch"] == 64)
    assert challenger["requests"] == 4 * 3 and len(challenger["values_ms"]) == 12
    comparison = challenger["vs_baseline"]
    assert comparison["p_value"] < 0.01 and comparison["improvement"] > 0.03
    confirm = answer["confirm"]
    assert confirm["p_value"] < 0.01 and confirm["candidate_median"] < confirm["baseline_median"]
    # applied: the drop-in sets it, the configuration reads it from there, and every step is a record
    drop_in = tmp_path / "data" / "tune" / "settings.toml"
    assert "n_batch = 64" in drop_in.read_text()
    assert answer["applied"]["changes"] == {"model.n_batch": [1, 64]}
    status = agent("tune", "status", "--config", str(config), "--json")
    effective = json.loads(status.stdout)["effective"]["model.n_batch"]
    assert effective == {"value": 64, "source": f"drop-in {drop_in}"}
    steps = [r["ext"]["tune"]["step"] for r in outbox_records(tmp_path / "data", "tune")]
    assert steps[0] == "start" and steps[-2:] == ["result", "apply"]
    assert steps.count("candidate") == 4  # the n_batch stage's two and the confirmation's two


def test_tune_on_smollm2_measures_both_thread_counts_and_decides_by_its_own_test(tmp_path: Path, smollm2: Path) -> None:
    """SmolLM2 (135M, real vocabulary): threads 1 against 2, decode time per token. Which one is faster depends on how
    busy the machine is (bench/tune.py measures that, beside llama.cpp's own counters): what must hold anywhere is
    that both candidates were measured in full, in the measuring process, and that the decision is the one its own
    figures support — a winner only with a significant, large enough gain in the direction of the change."""
    config = write_config(tmp_path, smollm2, n_batch=64, n_ctx=512, objective="tpot", max_tokens=24)
    result = agent(
        "tune", "run", "--config", str(config), "--try", "n_threads=1,2", "--max-tokens", "24", "--dry-run", "--json"
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    stage = answer["stages"][0]
    assert stage["stage"] == "n_threads"
    by_threads = {c["settings"]["n_threads"]: c for c in stage["candidates"]}
    assert set(by_threads) == {1, 2}
    for candidate in by_threads.values():  # tune.requests 4 × tune.rounds 3, none failed, none crashed
        assert candidate["requests"] == 12 and candidate["failures"] == 0 and candidate["error"] is None
        assert all(v > 0 for v in candidate["values_ms"])
    versus = by_threads[2]["vs_baseline"]
    assert versus is not None and 0 <= versus["p_value"] <= 1
    if answer["significant"]:
        confirm = answer["confirm"]
        assert confirm["p_value"] < 0.01 and confirm["candidate_median"] <= confirm["baseline_median"] * 0.97
        assert set(answer["changes"]) == {"n_threads"}
    else:
        assert answer["changes"] == {}
    assert answer["applied"] is None and not (tmp_path / "data" / "tune" / "settings.toml").exists()  # --dry-run


def _stage(baseline: list[float], candidate: list[float]) -> Stage:
    stage = Stage("n_threads", Candidate(EngineSettings(n_threads=1)), [Candidate(EngineSettings(n_threads=2))])
    stage.baseline.values, stage.others[0].values = baseline, candidate
    return stage


def test_the_decision_needs_significance_and_a_minimum_gain() -> None:
    import random

    tuner = Tuner(Path("unused"), EngineSettings(), [], TuneOptions(grid={}), "dev")
    rng = random.Random(3)
    same = [100 + rng.gauss(0, 5) for _ in range(12)], [100 + rng.gauss(0, 5) for _ in range(12)]
    stage = _stage(*same)
    tuner._decide(stage, None)
    assert stage.winner is None  # the same distribution: no winner, whatever the medians say
    faster = _stage([100 + rng.gauss(0, 5) for _ in range(12)], [80 + rng.gauss(0, 5) for _ in range(12)])
    tuner._decide(faster, None)
    assert faster.winner is faster.others[0]
    tiny_gain = _stage([100.0 + i * 0.01 for i in range(12)], [99.0 + i * 0.01 for i in range(12)])
    tuner._decide(tiny_gain, None)  # certain, but 1 % is below tune.min_improvement (3 %)
    assert tiny_gain.comparisons[tiny_gain.others[0].key].p_value < 0.001 and tiny_gain.winner is None
    few = _stage([100.0, 101.0], [50.0, 51.0])
    tuner._decide(few, None)  # twice as fast, but two requests each cannot show it at p < 0.01
    assert few.winner is None


# -- apply, verify, roll back -------------------------------------------------------------------------------------
def test_a_worse_change_is_rolled_back_after_verification_and_every_step_reaches_the_aggregator(
    tmp_path: Path, tiny_model: Path
) -> None:
    agg = AggregatorProcess(tmp_path / "agg.db", free_port())
    agg.start()
    try:
        token = tmp_path / "token"
        token.write_text(device_token(tmp_path / "agg.db"))
        token.chmod(0o600)
        sync = f'[sync]\nurl = "http://127.0.0.1:{agg.port}"\nallow_http = true\ntoken_file = "{token}"'
        config = write_config(tmp_path, tiny_model, n_batch=64, sync=sync, device="dev-1")
        for _ in range(2):  # scheduled runs under the current settings: the baseline
            assert agent("run", "--config", str(config), "--once").returncode == 0
        applied = agent("tune", "apply", "--config", str(config), "--set", "n_batch=1")
        assert applied.returncode == 0, applied.stderr
        assert "model.n_batch 64 → 1" in applied.stdout
        first = agent("run", "--config", str(config), "--once")
        assert first.returncode == 0 and "rolled back" not in first.stderr
        status = json.loads(agent("tune", "status", "--config", str(config), "--json").stdout)
        assert status["latest"]["status"] == "verifying" and status["latest"]["runs_after"] == 1
        second = agent("run", "--config", str(config), "--once")
        assert second.returncode == 0
        assert "rolled back" in second.stderr, second.stderr
        status = json.loads(agent("tune", "status", "--config", str(config), "--json").stdout)
        latest = status["latest"]
        assert latest["status"] == "rolled_back" and latest["result"]["worst_improvement"] < -0.05
        assert status["drop_in"] is None and status["effective"]["model.n_batch"]["value"] == 64
        overview = agent("status", "--config", str(config), "--no-probe").stdout
        assert "tuning      model.n_batch 64 → 1 (manual, " in overview and "rolled_back — " in overview
        # the run after the rollback runs under the old settings again, and the records say so
        assert agent("run", "--config", str(config), "--once").returncode == 0

        # every step reached the aggregator (the service synced after each run), and the inference records say
        # which settings each run ran under: the old, the worse one twice, the old again
        def stored(kind: str) -> list[dict[str, Any]]:
            url = f"http://127.0.0.1:{agg.port}/api/v1/measurements?kind={kind}&limit=100"
            with urllib.request.urlopen(url) as answer:
                body = json.load(answer)
            return body if isinstance(body, list) else body["measurements"]

        batches = [row["ext"]["settings"]["n_batch"] for row in stored("inference")]
        assert batches == [64] * 6 + [1] * 6 + [64] * 3
        steps = sorted(row["ext"]["tune"]["step"] for row in stored("tune"))
        assert steps == ["apply", "rollback"], steps
    finally:
        agg.stop()


def test_a_better_change_is_kept(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path, tiny_model, n_batch=1)
    for _ in range(2):
        assert agent("run", "--config", str(config), "--once").returncode == 0
    assert agent("tune", "apply", "--config", str(config), "--set", "n_batch=64").returncode == 0
    for _ in range(2):
        assert agent("run", "--config", str(config), "--once").returncode == 0
    latest = json.loads(agent("tune", "status", "--config", str(config), "--json").stdout)["latest"]
    assert latest["status"] == "kept" and latest["result"]["worst_improvement"] > 0
    assert "n_batch = 64" in (tmp_path / "data" / "tune" / "settings.toml").read_text()
    steps = [r["ext"]["tune"]["step"] for r in outbox_records(tmp_path / "data", "tune")]
    assert steps == ["apply", "verify"]


def test_rollback_by_hand_restores_the_previous_drop_in(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path, tiny_model, n_batch=16)
    assert agent("tune", "apply", "--config", str(config), "--set", "n_batch=32").returncode == 0
    assert agent("tune", "apply", "--config", str(config), "--set", "n_batch=64").returncode == 0
    back = agent("tune", "rollback", "--config", str(config))
    assert back.returncode == 0, back.stderr
    assert "n_batch = 32" in (tmp_path / "data" / "tune" / "settings.toml").read_text()
    again = agent("tune", "rollback", "--config", str(config))
    assert again.returncode == 2 and "was already rolled back" in again.stderr


# -- bad input ----------------------------------------------------------------------------------------------------
def test_an_environment_override_is_not_hidden_under_a_drop_in(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path, tiny_model, n_batch=16)
    result = agent("tune", "apply", "--config", str(config), "--set", "n_batch=32", LENS_MODEL_N_BATCH="16")
    assert result.returncode == 2
    assert "model.n_batch is set by environment variable LENS_MODEL_N_BATCH" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "tune" / "settings.toml").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--try", "n_bogus=1,2"], "--try 'n_bogus=1,2': expected SETTING=V1,V2"),
        (["--try", "n_threads=one"], "n_threads takes an integer, not 'one'"),
        (["--try", "flash_attn=maybe"], "flash_attn takes on or off"),
    ],
)
def test_bad_tune_arguments_are_one_clear_line(
    tmp_path: Path, tiny_model: Path, args: list[str], expected: str
) -> None:
    config = write_config(tmp_path, tiny_model, n_batch=16)
    result = agent("tune", "run", "--config", str(config), *args)
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_hand_edited_drop_in_with_a_bad_value_names_the_file_and_key(tmp_path: Path, tiny_model: Path) -> None:
    """A bad drop-in never stops a command (it is the device's own state, not the operator's file): it is left out,
    and what is wrong with it is named — the drop-in, the key and what is allowed."""
    config = write_config(tmp_path, tiny_model, n_batch=16)
    drop_in = tmp_path / "data" / "tune" / "settings.toml"
    drop_in.parent.mkdir(parents=True)
    drop_in.write_text('[model]\nn_threads = "many"\n')
    result = agent("status", "--config", str(config), "--no-probe")
    assert result.returncode != 2, result.stderr
    assert f'drop-in {drop_in}: model.n_threads = "many" is not allowed' in result.stdout
    drop_in.write_text("[model]\nn_ctx = 99999\n")  # not a key tune writes
    result = agent("tune", "status", "--config", str(config))
    assert result.returncode == 0 and "a key this drop-in may set: n_threads, n_batch" in result.stdout
    drop_in.write_text("[model\n")
    result = agent("tune", "status", "--config", str(config))
    assert result.returncode == 0 and str(drop_in) in result.stdout and "valid TOML" in result.stdout


def test_a_closed_gate_stops_the_search_and_says_why(tmp_path: Path, tiny_model: Path) -> None:
    from .sysfs_trees import orin_jp6

    orin_jp6(tmp_path / "orin")  # its GPU zone is past its passive trip point: throttled
    config = write_config(tmp_path, tiny_model, n_batch=16)
    config.write_text(
        config.read_text().replace(
            'power_source = "none"', f'power_source = "none"\nsysfs_root = "{tmp_path / "orin"}"'
        )
    )
    result = agent("tune", "run", "--config", str(config), "--try", "n_batch=16,64")
    assert result.returncode == 1 and "tune stopped:" in result.stderr and "throttled" in result.stderr
    steps = [r["ext"]["tune"]["step"] for r in outbox_records(tmp_path / "data", "tune")]
    assert steps == ["start", "skipped"]
    assert not (tmp_path / "data" / "tune" / "settings.toml").exists()


def test_the_service_tunes_on_its_schedule_and_applies_with_auto_apply(tmp_path: Path, tiny_model: Path) -> None:
    import signal
    import time

    config = write_config(tmp_path, tiny_model, n_batch=1, extra='n_batch = [1, 64]\nevery = "2s"\nauto_apply = true')
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LENS_")}
    log = (tmp_path / "service.log").open("w+")
    proc = subprocess.Popen([*AGENT, "run", "--config", str(config)], cwd=ROOT, env=clean, stdout=log, stderr=log)
    drop_in = tmp_path / "data" / "tune" / "settings.toml"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "n_batch = 64" not in (drop_in.read_text() if drop_in.exists() else ""):
            assert proc.poll() is None, (tmp_path / "service.log").read_text()
            time.sleep(0.2)
        assert drop_in.exists(), (tmp_path / "service.log").read_text()
        deadline = time.monotonic() + 60  # the service reloads its model with the winner after the tune
        while time.monotonic() < deadline:
            loads = outbox_records(tmp_path / "data", "model_load")
            if loads and loads[-1]["ext"]["model_load"]["n_batch"] == 64:
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    output = (tmp_path / "service.log").read_text()
    assert proc.returncode == 0, output
    assert "Traceback" not in output
    loads = outbox_records(tmp_path / "data", "model_load")
    assert loads[0]["ext"]["model_load"]["n_batch"] == 1 and loads[-1]["ext"]["model_load"]["n_batch"] == 64
    tune = outbox_records(tmp_path / "data", "tune")
    first = [r["ext"]["tune"] for r in tune if r["ext"]["tune"].get("tune_id") == tune[0]["ext"]["tune"]["tune_id"]]
    assert first[0]["step"] == "start" and first[0]["trigger"] == "schedule"
    assert [t["step"] for t in first][-2:] == ["result", "apply"]
    applied = next(r["ext"]["tune"] for r in tune if r["ext"]["tune"]["step"] == "apply")
    assert applied["source"] == "tune" and applied["changes"] == {"model.n_batch": {"from": 1, "to": 64}}


def test_a_recommendation_from_the_aggregator_is_measured_here_then_applied(tmp_path: Path, tiny_model: Path) -> None:
    """The whole loop with real components: the device's own history at the aggregator shows its earlier batch size
    processed prompts faster; the aggregator's feedback recommends it in the ingest acknowledgement; the service
    (tune.auto_apply) measures current against recommended here, applies it, and records that it did."""
    import signal
    import time

    agg_config = tmp_path / "aggregator.toml"
    agg_config.write_text('[fleet]\nfeedback_interval = "1s"\n')
    agg = AggregatorProcess(tmp_path / "agg.db", free_port(), config=agg_config)
    agg.start()
    proc = None
    try:
        token = tmp_path / "token"
        token.write_text(device_token(tmp_path / "agg.db"))
        token.chmod(0o600)
        sync = (
            f'[sync]\nurl = "http://127.0.0.1:{agg.port}"\nallow_http = true\ntoken_file = "{token}"\ninterval = "1s"'
        )
        history = write_config(tmp_path, tiny_model, n_batch=64, sync=sync, device="dev-1")
        history.write_text(history.read_text().replace("requests = 3", "requests = 24"))
        assert agent("run", "--config", str(history), "--once").returncode == 0  # 24 requests at n_batch 64
        config = write_config(
            tmp_path, tiny_model, n_batch=1, sync=sync, device="dev-1", extra="auto_apply = true"
        )  # the same device, now at n_batch 1: slower prompt processing
        config.write_text(
            config.read_text().replace("requests = 3", "requests = 24").replace('every = "1h"', 'every = "3s"')
        )
        clean = {k: v for k, v in os.environ.items() if not k.startswith("LENS_")}
        log = (tmp_path / "service.log").open("w+")
        proc = subprocess.Popen([*AGENT, "run", "--config", str(config)], cwd=ROOT, env=clean, stdout=log, stderr=log)
        drop_in = tmp_path / "data" / "tune" / "settings.toml"
        deadline = time.monotonic() + 300  # a busy machine: the tune measures 12 blocks in its child process
        while time.monotonic() < deadline and "n_batch = 64" not in (drop_in.read_text() if drop_in.exists() else ""):
            assert proc.poll() is None, (tmp_path / "service.log").read_text()
            time.sleep(0.3)
        assert drop_in.exists(), (tmp_path / "service.log").read_text() + agg.stderr_text()
        received = json.loads((tmp_path / "data" / "tune" / "recommendations.json").read_text())
        rec = next(item for item in received["items"] if item["target"] == "model.n_batch")
        assert rec["recommended_value"] == 64 and rec["current_value"] == 1
        assert rec["recommendation_id"] in received["tried"]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        agg.stop()
    output = (tmp_path / "service.log").read_text()
    assert proc.returncode == 0 and "Traceback" not in output, output
    conn = sqlite3.connect(tmp_path / "agg.db")  # what reached the aggregator, and what was still to send
    try:
        rows = conn.execute("SELECT codec, body FROM measurements WHERE kind = 'tune' ORDER BY seq").fetchall()
    finally:
        conn.close()
    records = [wire.loads(bytes(body), codec) for codec, body in rows] + outbox_records(tmp_path / "data", "tune")
    tune = [r["ext"]["tune"] for r in records]
    start = next(t for t in tune if t["step"] == "start")
    assert start["trigger"] == f"recommendation:{rec['recommendation_id']}"
    assert start["grid"] == {"n_batch": [1, 64]}  # only the recommended setting: current against recommended
    applied = next(t for t in tune if t["step"] == "apply")
    assert applied["recommendation_id"] == rec["recommendation_id"] and applied["source"] == "recommendation"
