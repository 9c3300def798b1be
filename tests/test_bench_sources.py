"""``lens-agent bench`` says where each engine setting came from (a flag, the config file, lens-agent tune's drop-in,
the environment, the default), in its table and its results JSON; the same file benchmarked twice gets two distinct
headers and a comparison that says they are one file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.bench.report import setting_source

from .test_bench_cli import TINY, check_document, run_cli


def test_source_words() -> None:
    assert setting_source("default") == "default"
    assert setting_source("--n-threads") == "flag --n-threads"
    assert setting_source("/etc/lens-agent/agent.toml") == "config /etc/lens-agent/agent.toml"
    assert setting_source("drop-in /d/tune/settings.toml") == "drop-in /d/tune/settings.toml"
    assert setting_source("environment variable LENS_MODEL_N_BATCH") == "environment LENS_MODEL_N_BATCH"


def test_bench_names_the_source_of_each_setting(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tiny_model: Path,
    config_file: Any,
    results_schema: dict[str, Any],
) -> None:
    data = tmp_path / "data"
    drop_in = data / "tune" / "settings.toml"
    drop_in.parent.mkdir(parents=True)
    drop_in.write_text("[model]\nn_threads = 1\n")  # what lens-agent tune applied on this device
    cfg = config_file(
        f'[agent]\ndata_dir = "{data}"\n[model]\npath = "{tiny_model}"\nn_threads = 2\nn_batch = 32\n'
        '[bench]\nruns = 1\nwarmup = 0\nmax_tokens = 3\n[probes]\npower_source = "none"\nidle_baseline = "0"\n'
    )
    monkeypatch.setenv("LENS_MODEL_N_GPU_LAYERS", "0")
    out = tmp_path / "out.json"
    code, stdout, stderr = run_cli(
        capsys, "bench", "--config", str(cfg), "--n-ctx", "128", "--no-progress", "--output", str(out)
    )
    assert code == 0, stderr
    doc = json.loads(out.read_text())
    check_document(doc, results_schema)
    assert doc["configuration"]["engine"]["settings"]["n_threads"] == 1
    assert doc["configuration"]["settings_source"] == {
        "n_threads": f"drop-in {drop_in}",
        "n_ctx": "flag --n-ctx",
        "n_batch": f"config {cfg}",
        "n_gpu_layers": "environment LENS_MODEL_N_GPU_LAYERS",
        "flash_attn": "default",
    }
    [line] = [line for line in stdout.splitlines() if line.startswith("sources   ")]
    assert line == (
        f"sources   n_threads from drop-in {drop_in}; n_ctx from flag --n-ctx; n_batch from config {cfg}; "
        "n_gpu_layers from environment LENS_MODEL_N_GPU_LAYERS; flash_attn from default"
    )


def test_the_same_file_twice_has_two_headers_and_says_it_is_one_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path
) -> None:
    code, stdout, stderr = run_cli(
        capsys, "bench", "--model", str(tiny_model), "--model", str(tiny_model), "--runs", "1", "--warmup", "0",
        "--max-tokens", "3", *TINY,
    )  # fmt: skip
    assert code == 0, stderr
    headers = [line for line in stdout.splitlines() if line.startswith("model     ") and "TTFT p50" not in line]
    assert len(headers) == 2 and headers[0] != headers[1], headers
    assert f"({tiny_model.name}, " in headers[0] and headers[1].endswith(f" as {tiny_model.stem}-2")
    table = stdout[stdout.index("comparison (ms unless noted)") :].splitlines()
    rows = [row.split()[0] for row in table[2:4]]
    assert rows == [tiny_model.stem, f"{tiny_model.stem}-2"]
    assert f"{tiny_model.stem}-2 is the same file as {tiny_model.stem} (sha256 " in stdout
