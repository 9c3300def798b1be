"""End to end on the real bundled SmolLM2-135M-Instruct (Q4_1): the demo's model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .test_bench_cli import check_document, run_cli

pytestmark = pytest.mark.smollm2


def test_bench_on_smollm2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], smollm2: Path, results_schema: dict[str, Any]
) -> None:
    out, raw = tmp_path / "smol.json", tmp_path / "smol.jsonl"
    code, stdout, stderr = run_cli(
        capsys,
        "bench",
        "--runs",
        "4",
        "--warmup",
        "1",
        "--max-tokens",
        "32",
        "--ignore-eos",
        "--output",
        str(out),
        "--raw",
        str(raw),
        "--no-progress",
    )
    assert code == 0, stderr
    doc = json.loads(out.read_text())
    check_document(doc, results_schema)
    model = doc["configuration"]["model"]
    assert model["path"] == str(smollm2)  # found without --model
    assert model["quantization"] == "int4" and model["quantization_exact"] == "Q4_1"
    assert model["file_bytes"] == 98_362_432
    assert doc["configuration"]["test_parameters"]["chat_template"] is True
    results = doc["results"]
    # Loose bound only (timing belongs in bench/): the lens must not add more than 10 % per token.
    assert results["engine_timings"]["overhead_ratio"] > 0.9
    assert results["memory"]["rss_peak_bytes"] > results["model_load"]["rss_before_load_bytes"]
    assert results["model_load"]["rss_after_load_bytes"] - results["model_load"]["rss_before_load_bytes"] > 50e6
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    measured = [r for r in records if not r["warmup"]]
    assert all(r["output_tokens"] == 32 and r["stop_reason"] == "max_tokens" for r in measured)
    assert all(r["output_text"] for r in measured)  # readable text from the chat-templated prompt
    assert "Smollm2" in stdout


def test_smollm2_stops_at_its_end_of_turn(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    raw = tmp_path / "r.jsonl"
    prompts = tmp_path / "p.txt"
    prompts.write_text("Name the capital city of France.\n")
    code, _, stderr = run_cli(
        capsys,
        "bench",
        "--prompts",
        str(prompts),
        "--runs",
        "1",
        "--warmup",
        "0",
        "--max-tokens",
        "64",
        "--raw",
        str(raw),
        "--no-progress",
    )
    assert code == 0, stderr
    record = json.loads(raw.read_text().splitlines()[0])
    assert record["stop_reason"] == "eos"
    assert "Paris" in record["output_text"]
    assert record["output_tokens"] < 64
