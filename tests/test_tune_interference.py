"""A tune measured beside other work decides nothing (docs/tuning.md, "Contended measurements"), and ``run --once``
says how many of a workload's requests other work contended.

Real llama.cpp on the tiny generated model, real busy loops (tests/hogs.py) beside it. The machine is shared, so
no test assumes it is quiet: a run that must count as uncontended reads a fixture ``/proc`` where nothing else runs
(``probes.sysfs_root``), and a run that must count as contended has more busy loops than CPUs beside a 1-thread
decode.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from agent.engines.llama import EngineSettings
from agent.tuning import CONTENDED_SHARE, Candidate, Stage, TuneResult, contended_reason
from lens_core.record_schema import check_record

from .hogs import cpu_hog
from .sysfs_trees import MEMINFO, write
from .test_tune import agent, outbox_records, write_config

CPUS = os.cpu_count() or 2
HOGS = CPUS + 2  # more busy loops than CPUs: other processes use well over the one CPU the decode leaves free


def _config(tmp_path: Path, model: Path, *, sysfs_root: Path | None = None) -> Path:
    """test_tune's configuration (n_batch 8 against 64, time to first token), decoding on one thread. With busy
    loops on every CPU, a decode on several threads waits at each of its barriers for the threads the loops hold
    off the CPU, and n_batch 1 makes one llama_decode call per prompt token: minutes in a busy test run."""
    config = write_config(tmp_path, model, n_batch=8, extra="n_batch = [8, 64]", interference=True)
    text = config.read_text().replace("allow_contended = true", "")
    if sysfs_root is not None:
        text = text.replace("[probes]\n", f'[probes]\nsysfs_root = "{sysfs_root}"\n')
    config.write_text(text)
    return config


def _quiet_proc(root: Path) -> None:
    """A ``/proc`` where nothing else runs: counters that never move, no pressure, most memory free."""
    cpus = "".join(f"cpu{n} 50 0 50 500 0 0 0 0 0 0\n" for n in range(2))
    write(root, "/proc/stat", "cpu  100 0 100 1000 0 0 0 0 0 0\n" + cpus)
    for kind in ("cpu", "memory", "io"):
        write(root, f"/proc/pressure/{kind}", "some avg10=0.00 avg60=0.00 avg300=0.00 total=1000\n")
    write(root, "/proc/meminfo", MEMINFO)


def _tune(config: Path, *args: str) -> dict[str, Any]:
    done = agent("tune", "run", "--config", str(config), "--rounds", "2", "--json", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_busy_loops_beside_a_tune_make_it_decide_nothing(tmp_path: Path, tiny_model: Path) -> None:
    config = _config(tmp_path, tiny_model)
    with cpu_hog(HOGS):
        done = agent("tune", "run", "--config", str(config), "--rounds", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("contended: ") and "other processes used " in lines[0], done.stdout
    decision = [line for line in lines if line.startswith("no decision: contended (")]
    assert len(decision) == 1 and "n_batch: " in decision[0] and "--allow-contended" in decision[0], done.stdout
    assert not any(line.startswith(("winner:", "applied", "undo:")) for line in lines), done.stdout
    assert " *" not in done.stdout  # no stage winner is marked either
    assert not (tmp_path / "data" / "tune" / "settings.toml").exists()
    # the records in the outbox carry the contention, in the shape every record's ext.interference has
    records = outbox_records(tmp_path / "data", "tune")
    for record in records:
        check_record(record, now_us=time.time_ns() // 1000)
    steps = {r["ext"]["tune"]["step"]: r for r in records}
    assert "apply" not in steps
    held = steps["not_applied"]
    assert held["ext"]["tune"]["reason"].startswith("no decision: contended (")
    result = steps["result"]["ext"]
    assert result["interference"]["contended"] is True and "cpu" in result["interference"]["reasons"]
    assert result["interference"]["contended_requests"] > CONTENDED_SHARE * result["interference"]["requests"]
    assert result["tune"]["decided"] is False and result["tune"]["interference"]["contended_stages"]
    candidates = [r for r in records if r["ext"]["tune"]["step"] == "candidate"]
    assert candidates and all(r["ext"]["interference"]["requests"] == 8 for r in candidates)


@pytest.mark.parametrize("how", ["flag", "config"])
def test_allow_contended_decides_anyway(tmp_path: Path, tiny_model: Path, how: str) -> None:
    config = _config(tmp_path, tiny_model)
    if how == "config":
        config.write_text(config.read_text().replace("[tune]\n", "[tune]\nallow_contended = true\n"))
    with cpu_hog(HOGS):
        answer = _tune(config, *(["--allow-contended"] if how == "flag" else []))
    section = answer["interference"]
    assert section["contended"] is True and section["contended_stages"], section
    assert section["summary"].startswith("contended: ") and "other processes used " in section["summary"]
    assert answer["no_decision"] is None and answer["decided"] is answer["significant"]
    for stage in answer["stages"]:
        assert stage["interference"]["requests"] == sum(c["requests"] + c["failures"] for c in stage["candidates"])
    drop_in = tmp_path / "data" / "tune" / "settings.toml"
    if answer["significant"]:  # decided: a winner is applied as on a quiet device
        assert answer["applied"] is not None and drop_in.exists()
    else:
        assert answer["applied"] is None and not drop_in.exists()


def test_a_device_whose_figures_show_no_other_work_decides(tmp_path: Path, tiny_model: Path) -> None:
    _quiet_proc(tmp_path / "quiet")
    config = _config(tmp_path, tiny_model, sysfs_root=tmp_path / "quiet")
    answer = _tune(config, "--dry-run")  # whatever else this machine runs, what is sampled is the fixture
    section = answer["interference"]
    assert section["contended_requests"] == 0 and section["summary"] == "interference: none seen", section
    assert section["contended_stages"] == [] and section["requests"] > 0
    assert answer["no_decision"] is None and answer["decided"] is answer["significant"]
    # nothing held it back: a winner, when there is one, is only not applied because of --dry-run
    assert answer["not_applied"] in (None, "not applied (tune.auto_apply is false, or --dry-run)")


def _stage(contended: list[bool]) -> Stage:
    base, other = Candidate(EngineSettings(n_batch=1)), Candidate(EngineSettings(n_batch=64))
    half = len(contended) // 2
    for candidate, flags in ((base, contended[:half]), (other, contended[half:])):
        candidate.interference = [
            {"contended": f, "reasons": ["cpu"] if f else [], "other_cpu_cores": 1.6 if f else 0.0, "cpus": 2}
            for f in flags
        ]
    return Stage("n_batch", base, [other])


def test_more_than_a_quarter_of_a_stages_requests_contended_holds_the_decision() -> None:
    thresholds = {"other_cpu_cores": 0.3, "cpu_pressure_pct": 40.0, "memory_pressure_pct": 5.0}
    thresholds |= {"mem_available_pct": 10.0, "swap_pages_per_s": 1.0, "io_pressure_pct": 20.0, "freq_ratio": 0.8}
    at_quarter = _stage([True, True] + [False] * 6)  # 2 of 8: a quarter, not more
    above = _stage([True, False, False, False, True, True, False, False])  # 3 of 8
    assert not at_quarter.contended and above.contended
    assert contended_reason([at_quarter], thresholds) is None
    reason = contended_reason([at_quarter, above], thresholds)
    assert reason == "contended (n_batch: 3 of 8 requests; other processes used 1.6 of 2 cores)"
    settings = EngineSettings()
    result = TuneResult("t", "ttft", settings, settings, [above], None, False, no_decision=reason)
    assert not result.decided
    unsampled = Stage("n_batch", Candidate(settings), [Candidate(EngineSettings(n_batch=64))])
    assert not unsampled.contended  # nothing sampled ([interference] enabled = false): never held back


def test_run_once_says_how_many_requests_were_contended(tmp_path: Path, tiny_model: Path) -> None:
    config = _config(tmp_path, tiny_model)
    with cpu_hog(HOGS):
        done = agent("run", "--config", str(config), "--once")
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("long: "))
    assert line.startswith("long: ok: 3/3 requests ok, TTFT p50 "), line
    # every request was contended; which reasons fired for each depends on how the loops and the decode shared the
    # CPUs at that moment (other processes' cores, CPU pressure or both)
    assert ", 3 of 3 contended (" in line and "cpu" in line.split(" contended (", 1)[1], line
