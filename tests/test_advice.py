"""Advice, never commands: what a device does with settings that arrive from outside.

Every value ``lens_core.recommendations.parse_wire`` lets through is one the agent's own configuration accepts
(a property test); the device's own limits refuse what its configuration allows but it cannot run; a candidate's
engine that dies of a signal ends that candidate in its child process, never the tune; a drop-in the configuration
refuses is set aside and never stops the agent; an acknowledgement built to overflow the JSON parser is one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.advice import DeviceLimits, config_refusal, refusal
from agent.config import load_config
from agent.engines.llama import EngineSettings
from agent.prompts import Prompt
from agent.tune_worker import BlockResult, WorkerPool
from agent.tuning import TuneOptions, Tuner
from lens_core import wire
from lens_core.errors import ConfigError
from lens_core.recommendations import TARGETS, parse_wire
from lens_core.settings import BOUNDS, CONFIG_KEYS, clean_settings

from .test_tune import PROMPT, agent, write_config

LIMITS = DeviceLimits(cpus=2, n_layers=2, n_ctx_train=512, gpu_offload=False)


def item(target: str, value: Any, current: Any = 1) -> dict[str, Any]:
    return {
        "recommendation_id": str(uuid.uuid4()),
        "model_name": "m",
        "target": target,
        "current_value": current,
        "recommended_value": value,
        "improvement": 0.5,
        "confidence": 0.9,
        "metric": "tpot_ms",
        "evidence": "fleet: 3 devices",
    }


# -- the wire's bounds are the configuration's bounds ---------------------------------------------------------------
values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([-1, 0, 1, 2, 511, 512, 513, 4096, 65536, 65537, 70000, 100000, 100001, 1 << 20, (1 << 20) + 1]),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.none(),
)


@settings(max_examples=400, deadline=None)
@given(target=st.sampled_from(sorted(TARGETS)), value=values)
def test_any_value_parse_wire_accepts_is_one_the_agent_configuration_accepts(target: str, value: Any) -> None:
    current = 2 if value != 2 else 3
    found, problems = parse_wire([item(target, value, current=current if not isinstance(value, bool) else not value)])
    if not found:
        assert len(problems) == 1
        return
    rec = found[0]
    section, key = target.split(".")
    assert config_refusal(rec.setting, rec.recommended_value) is None
    config = load_config(  # the configuration loader itself: a flag with that value is accepted as it is
        None,
        environ={},
        overrides={
            (section, key): ("--flag", rec.recommended_value),
            ("agent", "data_dir"): ("--flag", "/nonexistent"),
        },
        default_path=Path("/nonexistent/agent.toml"),
    )
    assert config.get(section, key) == rec.recommended_value


@pytest.mark.parametrize(
    ("target", "value"),
    [
        ("model.n_threads", 1048576),
        ("model.n_threads", 4096),
        ("model.n_threads", -1),
        ("model.n_threads", 0),
        ("model.n_batch", -1),
        ("model.n_batch", 70000),
        ("model.n_batch", 1 << 20),
        ("model.n_gpu_layers", 100001),
        ("model.n_ctx", 8),
        ("collab.draft_tokens", 65),
        ("model.n_threads", True),
        ("model.flash_attn", 1),
    ],
)
def test_the_values_that_crashed_or_bricked_devices_are_refused_on_the_wire(target: str, value: Any) -> None:
    found, problems = parse_wire([item(target, value)])
    assert found == [] and len(problems) == 1 and "refused" in problems[0]
    name = TARGETS[target]
    with pytest.raises(ConfigError):  # … and the configuration refuses them too, with the same bounds
        load_config(
            None,
            environ={},
            overrides={CONFIG_KEYS[name]: ("--flag", value), ("agent", "data_dir"): ("--flag", "/nonexistent")},
            default_path=Path("/nonexistent/agent.toml"),
        )


def test_out_of_range_settings_in_a_record_are_no_settings() -> None:
    assert clean_settings({"n_threads": 1048576, "n_batch": 512}) == {"n_batch": 512}
    assert clean_settings({"n_threads": 512, "n_batch": 70000, "n_gpu_layers": -1}) == {
        "n_threads": 512,
        "n_gpu_layers": -1,
    }
    assert set(BOUNDS) <= set(CONFIG_KEYS)


# -- the device's own limits ----------------------------------------------------------------------------------------
BASE = {"n_threads": 1, "n_batch": 64, "n_ctx": 256, "n_gpu_layers": 0, "flash_attn": True}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"n_threads": 3}, "this device has 2 CPUs"),
        ({"n_threads": 4096}, "refused by the agent's configuration"),
        ({"n_batch": 512}, "larger than the context (model.n_ctx = 256)"),
        ({"n_ctx": 1024}, "beyond the 512 tokens the model was trained with"),
        ({"n_ctx": 32}, "larger than the context (model.n_ctx = 32)"),
        ({"n_gpu_layers": 4}, "offloads no layers to a GPU"),
        ({"n_batch": -1}, "refused by the agent's configuration"),
    ],
)
def test_the_device_refuses_what_it_cannot_run(change: dict[str, Any], expected: str) -> None:
    reason = refusal({**BASE, **change}, LIMITS, list(change))
    assert reason is not None and expected in reason, reason


def test_the_device_accepts_what_it_can_run_and_the_operator_own_values() -> None:
    assert refusal({**BASE, "n_threads": 2}, LIMITS, ["n_threads"]) is None
    assert refusal({**BASE, "n_batch": 256}, LIMITS, ["n_batch"]) is None
    assert refusal({**BASE, "n_gpu_layers": -1}, LIMITS, ["n_gpu_layers"]) is None
    gpu = DeviceLimits(cpus=8, n_layers=30, n_ctx_train=None, gpu_offload=True)
    assert refusal({**BASE, "n_gpu_layers": 31}, gpu, ["n_gpu_layers"]) is None
    assert "the model has 30 layers" in (refusal({**BASE, "n_gpu_layers": 32}, gpu, ["n_gpu_layers"]) or "")
    # the operator's own file may ask for more threads than CPUs: only advice is held to the device's limits
    assert refusal({**BASE, "n_threads": 16, "n_batch": 32}, LIMITS, ["n_batch"]) is None


def test_the_limits_are_read_from_the_model_file_without_loading_it(tiny_model: Path, smollm2: Path) -> None:
    tiny = DeviceLimits.probe(tiny_model)
    assert tiny.n_layers is not None and tiny.n_layers >= 1 and tiny.n_ctx_train is not None
    assert tiny.cpus == len(os.sched_getaffinity(0))
    real = DeviceLimits.probe(smollm2)
    assert (real.n_layers, real.n_ctx_train) == (30, 8192)  # SmolLM2-135M: 30 blocks, 8k context
    assert DeviceLimits.probe(Path("/nonexistent.gguf")).n_layers is None


# -- a crash ends the candidate, not the tune -----------------------------------------------------------------------
def test_an_engine_killed_by_a_signal_fails_that_candidate_and_the_tune_goes_on(tiny_model: Path) -> None:
    """The candidate n_batch=64 is measured in a child that dies of SIGSEGV in the middle of its block (a real
    signal to the real measuring process): that candidate is recorded as crashed, with the signal, the baseline is
    measured in a fresh child, nothing is recommended, and this process — the tuner — goes on."""
    pool = WorkerPool(timeout_s=120)
    killed: list[int] = []

    def measure(request: dict[str, Any]) -> BlockResult:
        if request["settings"]["n_batch"] == 64 and not killed:
            request = {**request, "options": {**request["options"], "runs": 1_000_000}}  # busy for minutes

            def kill() -> None:
                deadline = time.monotonic() + 60
                while pool.pid is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(1.0)  # well inside the block
                assert pool.pid is not None
                killed.append(pool.pid)
                os.kill(pool.pid, signal.SIGSEGV)

            threading.Thread(target=kill, daemon=True).start()
        return pool.measure(request)

    records: list[Any] = []
    tuner = Tuner(
        model_path=tiny_model,
        base=EngineSettings(n_ctx=256, n_threads=1, n_batch=16),
        prompts=[Prompt(id="long", text=PROMPT)],
        options=TuneOptions(grid={"n_batch": [16, 64]}, requests=3, rounds=2, warmup=0, max_tokens=4, seed=1),
        device_id="dev",
        chat_template="off",
        limits=DeviceLimits.probe(tiny_model),
        measure=measure,
        on_record=records.append,
    )
    try:
        result = tuner.run()
    finally:
        pool.close()
    stage = result.stages[0]
    crashed = next(c for c in stage.candidates if c.settings.n_batch == 64)
    assert crashed.crash_signal == "SIGSEGV" and "killed by SIGSEGV" in (crashed.error or ""), crashed.error
    assert stage.winner is None and not result.significant
    assert len(stage.baseline.values) == 6  # both rounds of the baseline, after the crash too
    assert pool.started >= 2  # a fresh child after the crash
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)  # the crashed child is gone (reaped), not a zombie left behind
    summary = next(r.ext["tune"] for r in records if r.ext["tune"]["step"] == "candidate" and r.ext["tune"]["error"])
    assert summary["crash_signal"] == "SIGSEGV" and summary["settings"]["n_batch"] == 64


def test_a_refused_candidate_is_recorded_and_never_measured(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path, tiny_model, n_batch=16)
    too_many = len(os.sched_getaffinity(0)) + 1
    result = agent("tune", "run", "--config", str(config), "--try", f"n_threads=1,{too_many}", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    candidate = next(c for c in answer["stages"][0]["candidates"] if c["settings"]["n_threads"] == too_many)
    assert candidate["refused"] is True and candidate["requests"] == 0
    assert f"model.n_threads = {too_many}: this device has" in candidate["error"]
    assert not answer["significant"] and answer["applied"] is None
    applied = agent("tune", "apply", "--config", str(config), "--set", f"n_threads={too_many}")
    assert applied.returncode == 2 and "not applied: model.n_threads" in applied.stderr
    assert not (tmp_path / "data" / "tune" / "settings.toml").exists()


# -- a drop-in the configuration refuses ----------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["[model]\nn_batch = 70000\n", '[model]\nn_threads = "many"\n', "[model\n"])
def test_a_refused_drop_in_never_stops_a_command(tmp_path: Path, tiny_model: Path, text: str) -> None:
    config = write_config(tmp_path, tiny_model, n_batch=16)
    drop_in = tmp_path / "data" / "tune" / "settings.toml"
    drop_in.parent.mkdir(parents=True)
    drop_in.write_text(text)
    loaded = load_config(config, environ={})
    assert loaded.drop_in_refused is not None and str(drop_in) in loaded.drop_in_refused
    assert loaded.get("model", "n_batch") == 16  # the file's value
    status = agent("status", "--config", str(config), "--no-probe")
    assert status.returncode in (0, 1) and "Traceback" not in status.stderr, status.stderr
    assert "drop-in refused and left out" in status.stdout and str(drop_in) in status.stdout
    tune_status = agent("tune", "status", "--config", str(config), "--json")
    assert tune_status.returncode == 0, tune_status.stderr
    assert json.loads(tune_status.stdout)["effective"]["model.n_batch"] == {"value": 16, "source": str(config)}
    back = agent("tune", "rollback", "--config", str(config))
    assert back.returncode == 0 and "set aside as" in back.stdout, back.stderr
    assert not drop_in.exists() and list(drop_in.parent.glob("settings.toml.refused-*"))


def test_the_service_sets_a_refused_drop_in_aside_and_keeps_uploading(tmp_path: Path, tiny_model: Path) -> None:
    from .netproxy import free_port
    from .processes import AggregatorProcess, device_token

    agg = AggregatorProcess(tmp_path / "agg.db", free_port())
    agg.start()
    try:
        token = tmp_path / "token"
        token.write_text(device_token(tmp_path / "agg.db"))
        sync = f'[sync]\nurl = "http://127.0.0.1:{agg.port}"\nallow_http = true\ntoken_file = "{token}"'
        config = write_config(tmp_path, tiny_model, n_batch=16, sync=sync, device="dev-1")
        drop_in = tmp_path / "data" / "tune" / "settings.toml"
        drop_in.parent.mkdir(parents=True)
        drop_in.write_text("[model]\nn_batch = 70000\n")  # a value the configuration refuses (up to 65536)
        run = agent("run", "--config", str(config), "--once")
        assert run.returncode == 0, run.stderr
        assert "tuning drop-in refused" in run.stderr and "Traceback" not in run.stderr
        assert not drop_in.exists()
        aside = sorted(drop_in.parent.glob("settings.toml.refused-*[!n]"))
        assert len(aside) == 1 and aside[0].read_text() == "[model]\nn_batch = 70000\n"
        import sqlite3

        conn = sqlite3.connect(tmp_path / "agg.db")
        try:
            kinds = dict(conn.execute("SELECT kind, count(*) FROM measurements GROUP BY kind").fetchall())
        finally:
            conn.close()
        assert kinds.get("inference") == 3 and kinds.get("tune") == 1  # uploaded, and the refusal recorded
        status = agent("status", "--config", str(config), "--no-probe")
        assert "set aside as" in status.stdout and status.returncode == 0, status.stdout + status.stderr
    finally:
        agg.stop()


# -- an acknowledgement built to overflow the parser ----------------------------------------------------------------
def test_a_deeply_nested_answer_is_not_json_and_never_raises() -> None:
    deep = b"[" * 30_000 + b"]" * 30_000
    started = time.monotonic()
    assert wire.parse_answer_json(deep) is None
    assert time.monotonic() - started < 1.0
    assert wire.parse_answer_json(b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}') == {"a": "[" * 30}
    assert wire.parse_answer_json(b'{"a": [[[1]]], "b": "\\"]"}') == {"a": [[[1]]], "b": '"]'}
    assert wire.parse_answer_json(b"not json") is None
    nested = {"recommendations": [{"x": [[[[1]]]]}]}
    assert wire.parse_answer_json(json.dumps(nested).encode()) == nested


# -- local state a party with access to the data directory could plant -----------------------------------------------
def test_the_measuring_process_never_imports_code_from_the_working_directory(tmp_path: Path, tiny_model: Path) -> None:
    """`python -m` puts the working directory first on sys.path: the measuring process is started where the agent
    package lives, so an `agent/` planted where an operator happens to run `lens-agent tune run` is never run."""
    import sys

    config = write_config(tmp_path, tiny_model, n_batch=16)
    planted = tmp_path / "here"
    (planted / "agent").mkdir(parents=True)
    (planted / "agent" / "__init__.py").write_text("")
    marker = tmp_path / "HIJACKED"
    (planted / "agent" / "tune_worker.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    lens_agent = Path(sys.executable).parent / "lens-agent"  # the console script, as an operator runs it
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LENS_")}
    result = subprocess.run(
        [str(lens_agent), "tune", "run", "--config", str(config), "--try", "n_batch=16,32", "--json", "--dry-run"],
        cwd=planted,
        env=clean,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    candidates = json.loads(result.stdout)["stages"][0]["candidates"]
    assert all(c["requests"] == 12 and c["error"] is None for c in candidates)


@pytest.mark.parametrize(
    "state",
    [
        '{"version": 1, "adjustments": "abc"}',
        '{"version": 1, "adjustments": [1]}',
        '{"version": 1, "adjustments": [{"x": 1}]}',
        '{"version": 1, "adjustments": null}',
        '{"version": 1}',
    ],
)
def test_tuning_state_of_the_wrong_shape_is_one_clear_line_everywhere(
    tmp_path: Path, tiny_model: Path, state: str
) -> None:
    config = write_config(tmp_path, tiny_model, n_batch=16)
    folder = tmp_path / "data" / "tune"
    folder.mkdir(parents=True)
    (folder / "adjustments.json").write_text(state)
    (folder / "settings.toml").write_text("[model]\nn_batch = 32\n")
    status = agent("status", "--config", str(config), "--no-probe")
    assert status.returncode in (0, 1) and "Traceback" not in status.stderr, status.stderr
    assert "move it aside to start afresh" in status.stdout
    tune_status = agent("tune", "status", "--config", str(config))
    assert tune_status.returncode == 0 and "tuning state not readable" in tune_status.stdout, tune_status.stderr
    back = agent("tune", "rollback", "--config", str(config))
    assert back.returncode == 0 and "set aside as" in back.stdout and "Traceback" not in back.stderr, back.stderr
    assert not (folder / "settings.toml").exists()


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "huge"])
def test_a_drop_in_that_is_no_small_file_is_never_read(tmp_path: Path, tiny_model: Path, kind: str) -> None:
    config = write_config(tmp_path, tiny_model, n_batch=16)
    drop_in = tmp_path / "data" / "tune" / "settings.toml"
    drop_in.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(drop_in)  # reading it would block every command
    elif kind == "device":
        drop_in.symlink_to("/dev/zero")  # reading it would never end
    elif kind == "directory":
        drop_in.mkdir()
    else:
        drop_in.write_text("[model]\n" + "# padding\n" * 20_000)
    for command in (["status", "--no-probe"], ["tune", "status"]):
        result = agent(*command, "--config", str(config))
        assert result.returncode in (0, 1) and "Traceback" not in result.stderr, result.stderr
        assert "drop-in refused and left out" in result.stdout, result.stdout
    run = agent("run", "--config", str(config), "--once")  # the service sets it aside and measures
    assert run.returncode == 0 and "tuning drop-in refused" in run.stderr, run.stderr
    assert not os.path.lexists(drop_in)


def test_a_drop_in_this_device_cannot_run_is_set_aside_by_the_service(tmp_path: Path, tiny_model: Path) -> None:
    """A drop-in is advice too, whoever wrote it: one with more threads than this device's CPUs passes the
    configuration's bounds but not the device's, and the service runs with the file's settings."""
    config = write_config(tmp_path, tiny_model, n_batch=16)
    drop_in = tmp_path / "data" / "tune" / "settings.toml"
    drop_in.parent.mkdir(parents=True)
    too_many = len(os.sched_getaffinity(0)) + 1
    drop_in.write_text(f"[model]\nn_threads = {too_many}\n")
    run = agent("run", "--config", str(config), "--once")
    assert run.returncode == 0, run.stderr
    assert f"model.n_threads = {too_many}: this device has" in run.stderr and not drop_in.exists()
    from .test_tune import outbox_records

    loads = outbox_records(tmp_path / "data", "model_load")
    assert [r["ext"]["model_load"]["n_threads"] for r in loads] == [1]  # the file's value, never the drop-in's


def test_a_planted_measuring_lock_link_is_not_followed(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path, tiny_model, n_batch=16)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "measure.lock").symlink_to(victim)
    run = agent("run", "--config", str(config), "--once")
    assert victim.read_text() == "precious\n"
    assert "cannot open the measuring lock" in run.stdout + run.stderr and "Traceback" not in run.stderr, run.stdout
