"""``lens-agent tune`` says how to undo what it does: every change it applies or rolls back is printed with the
command that undoes it (and that command works as printed), ``tune status`` says how to return to the configuration
file, a rollback with nothing left to roll back names the drop-in to delete, and every before/after figure says
"faster" or "slower" instead of a sign."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

from agent.engines.llama import EngineSettings
from agent.tuning import Candidate, Stage, TuneResult, change_words, comparison_dict, describe, direction
from lens_core.stats import compare

from .test_tune import AGENT, agent, write_config


def run_printed(command: str) -> subprocess.CompletedProcess[str]:
    """Run a ``lens-agent …`` line exactly as the agent printed it."""
    words = shlex.split(command)
    assert words[0] == "lens-agent", command
    return agent(*words[1:])


def test_words_not_signs() -> None:
    assert change_words(0.803) == "80.3 % faster" and change_words(-0.02) == "2.0 % slower"
    assert change_words(0.00001) == "no change" and direction(0.0) == "same"
    slower = compare([10.0, 10.5, 11.0, 10.2], [20.0, 21.0, 19.5, 20.5])  # latency went up
    assert slower.improvement < 0 and comparison_dict(slower)["direction"] == "slower"
    faster = compare([3710.95] * 5, [730.12] * 5)
    base, best = EngineSettings(n_threads=4), EngineSettings(n_threads=1)
    stage = Stage("confirm", Candidate(base, values=[3710.95] * 5), [Candidate(best, values=[730.12] * 5)])
    stage.comparisons[stage.others[0].key] = faster
    stage.winner = stage.others[0]
    result = TuneResult("t", "e2e", base, best, [stage], faster, True)
    lines = describe(result)
    assert lines[-1].startswith("winner: n_threads 4 → 1: e2e median 3710.95 → 730.12 ms (80.3 % faster, ")
    assert "80.3 % faster (p = " in lines[2] and not re.search(r"[+-][\d.]+ %", "\n".join(lines))
    assert result.as_dict()["confirm"]["direction"] == "faster"
    assert result.as_dict()["stages"][0]["candidates"][1]["vs_baseline"]["direction"] == "faster"


def test_tune_run_prints_the_command_that_undoes_it_and_that_command_works(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path, tiny_model, n_batch=1)
    drop_in = tmp_path / "data" / "tune" / "settings.toml"
    result = agent("tune", "run", "--config", str(config), "--try", "n_batch=1,64")
    assert result.returncode == 0, result.stderr
    winner = re.search(
        r"^winner: n_batch 1 → 64: ttft median ([\d.]+) → ([\d.]+) ms \(([\d.]+) % faster, ", result.stdout, re.M
    )
    assert winner is not None, result.stdout
    before, after, percent = (float(g) for g in winner.groups())
    # the printed medians are rounded to 0.01 ms: the percentage from them is close, not exact
    assert after < before and abs(percent - (before - after) / before * 100) < 1.0
    assert not re.search(r"[+-]\d+(\.\d+)? %", result.stdout), result.stdout  # no signed percentages anywhere
    undo = f"lens-agent tune rollback --config {config}"
    assert f"\nundo: {undo}\n" in result.stdout and "n_batch = 64" in drop_in.read_text()
    status = agent("tune", "status", "--config", str(config))
    assert f"back      delete the drop-in to return to the configuration file's settings ({config}): rm {drop_in}" in (
        status.stdout
    )
    assert f"\nundo      {undo}\n" in status.stdout
    # the printed command, as printed, undoes the change; and says how to undo the rollback in turn
    back = run_printed(undo)
    assert back.returncode == 0, back.stderr
    assert not drop_in.exists()
    assert f"no drop-in is left: the configuration file's settings ({config}) apply" in back.stdout
    redo = f"lens-agent tune apply --set n_batch=64 --config {config}"
    assert f"\nundo: {redo}\n" in back.stdout
    status = agent("tune", "status", "--config", str(config))
    assert f"back      nothing to return from: the configuration file's settings ({config}) apply" in status.stdout
    assert "undo      " not in status.stdout
    again = run_printed(redo)
    assert again.returncode == 0 and "n_batch = 64" in drop_in.read_text()


def test_a_second_rollback_names_the_drop_in_that_returns_to_the_config_file(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path, tiny_model, n_batch=16)
    drop_in = tmp_path / "data" / "tune" / "settings.toml"
    for value in (32, 64):
        applied = agent("tune", "apply", "--config", str(config), "--set", f"n_batch={value}", "--json")
        assert applied.returncode == 0, applied.stderr
        assert json.loads(applied.stdout)["undo"] == f"lens-agent tune rollback --config {config}"
    first = agent("tune", "rollback", "--config", str(config))
    assert first.returncode == 0 and f"the drop-in {drop_in} holds the settings from before it" in first.stdout
    second = agent("tune", "rollback", "--config", str(config))
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert "was already rolled back" in second.stderr
    assert (
        f"delete the drop-in to return to the configuration file's settings ({config}): rm {drop_in}" in second.stderr
    )
    answer = json.loads(agent("tune", "status", "--config", str(config), "--json").stdout)
    assert answer["undo"] is None and answer["back_to_config"] == f"rm {drop_in}"
    assert answer["config_file"] == str(config) and answer["effective"]["model.n_batch"]["value"] == 32
    # doing what it says returns to the configuration file
    subprocess.run(shlex.split(answer["back_to_config"]), check=True)
    answer = json.loads(agent("tune", "status", "--config", str(config), "--json").stdout)
    assert answer["effective"]["model.n_batch"] == {"value": 16, "source": str(config)}
    assert answer["back_to_config"] is None
    third = agent("tune", "rollback", "--config", str(config))
    assert third.returncode == 2 and f"there is no drop-in: the configuration file's settings ({config}) apply" in (
        third.stderr
    )


def test_every_printed_command_names_the_same_data_dir(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path, tiny_model, n_batch=16)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    applied = agent("tune", "apply", "--config", str(config), "--data-dir", str(elsewhere), "--set", "n_batch=8")
    assert applied.returncode == 0, applied.stderr
    undo = f"lens-agent tune rollback --config {config} --data-dir {elsewhere}"
    assert f"undo: {undo}" in applied.stdout
    assert run_printed(undo).returncode == 0 and not (elsewhere / "tune" / "settings.toml").exists()
    assert AGENT  # the same agent the printed command stands for
