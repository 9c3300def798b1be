"""``lens-agent bench`` end to end on tiny real models: outputs, schema, llmperf files, bad input."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


TINY = ("--n-ctx", "256", "--n-threads", "1", "--no-progress", "--device-id", "test-device")


def check_document(doc: dict[str, Any], schema: dict[str, Any]) -> None:
    jsonschema.validate(doc, schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    # jsonschema checks neither uuid (Draft-07) nor, without extras, date-time: check them here.
    assert uuid.UUID(doc["metadata"]["benchmark_id"]).version == 4
    stamp = doc["metadata"]["timestamp"]
    assert stamp.endswith("Z")
    assert datetime.fromisoformat(stamp.replace("Z", "+00:00")).tzinfo is not None


def test_bench_writes_schema_valid_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path, results_schema: dict[str, Any]
) -> None:
    out, raw = tmp_path / "results.json", tmp_path / "requests.jsonl"
    code, stdout, stderr = run_cli(
        capsys,
        "bench",
        "--model",
        str(tiny_model),
        "--runs",
        "5",
        "--warmup",
        "2",
        "--max-tokens",
        "12",
        "--output",
        str(out),
        "--raw",
        str(raw),
        *TINY,
    )
    assert code == 0, stderr
    assert "TTFT" in stdout and "TPOT" in stdout and "lens overhead" in stdout
    doc = json.loads(out.read_text())
    check_document(doc, results_schema)

    results = doc["results"]
    lat = results["latency_metrics"]
    assert lat["time_to_first_token"]["sample_count"] == 5  # warm-ups excluded
    assert lat["time_per_output_token"]["sample_count"] == 5
    assert set(lat) == {
        "time_to_first_token",
        "time_per_output_token",
        "end_to_end_latency",
        "prefill_time",
        "decode_time",
    }
    assert results["engine_timings"]["decode_ms_per_token"]["sample_count"] == 5
    assert 0 < results["engine_timings"]["overhead_ratio"] <= 1.2
    assert results["throughput_metrics"]["tokens_per_second"] > 0
    assert results["error_metrics"] == {"total_errors": 0, "error_rate": 0.0, "errors_by_type": {}}
    # no sensors on this machine: energy says so, latency is measured all the same
    assert results["energy"]["unavailable"].startswith(
        "no power source found on this device (power_source = auto tried"
    )
    assert set(results["energy"]["sources_tried"]) == {"jtop", "jetson", "rapl", "nvml", "battery"}
    assert results["memory"]["model_mapped_rss_bytes"] > 0
    assert results["model_load"]["load_ms"] > 0 and results["model_load"]["cold_ttft_ms"] > 0
    cfg = doc["configuration"]
    assert cfg["model"]["quantization"] == "none" and cfg["model"]["quantization_exact"] == "F32"
    assert cfg["engine"]["settings"]["n_ctx"] == 256
    assert cfg["hardware"]["accelerator"] == "cpu" and cfg["hardware"]["cpu_cores"] >= 1
    assert cfg["test_parameters"]["warmup_requests"] == 2 and cfg["test_parameters"]["total_requests"] == 5
    assert cfg["test_parameters"]["output_tokens"] == {"mean": 12, "stddev": 0, "distribution": "fixed"}

    lines = [json.loads(line) for line in raw.read_text().splitlines()]
    assert len(lines) == 7
    assert [r["warmup"] for r in lines] == [True, True, False, False, False, False, False]
    assert lines[0]["first_after_load"] is True and not any(r["first_after_load"] for r in lines[1:])
    assert all(r["device_id"] == "test-device" and r["run_id"] == doc["metadata"]["run_id"] for r in lines)
    first = lines[2]
    assert first["output_tokens"] == 12 and len(first["itl_ms"]) == 11
    assert first["tpot_ms"] == pytest.approx((first["e2e_ms"] - first["ttft_ms"]) / 11)
    assert first["engine_decode_tokens"] == 11
    # the distribution is over the per-request figures in --raw
    ttfts = sorted(r["ttft_ms"] for r in lines if not r["warmup"])
    assert lat["time_to_first_token"]["median_ms"] == pytest.approx(ttfts[2])


def test_json_flag_and_llmperf_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path, results_schema: dict[str, Any]
) -> None:
    code, stdout, _ = run_cli(
        capsys,
        "bench",
        "--model",
        str(tiny_model),
        "--runs",
        "3",
        "--warmup",
        "0",
        "--max-tokens",
        "6",
        "--json",
        "--format",
        "llmperf",
        "--llmperf-dir",
        str(tmp_path / "llmperf"),
        *TINY,
    )
    assert code == 0
    documents = json.loads(stdout)
    assert isinstance(documents, list) and len(documents) == 1  # the same shape for one model as for several
    check_document(documents[0], results_schema)
    summary = next((tmp_path / "llmperf").glob("*_summary.json"))
    individual = next((tmp_path / "llmperf").glob("*_individual_responses.json"))
    rows = json.loads(individual.read_text())
    assert len(rows) == 3
    assert set(rows[0]) == {
        "error_code",
        "error_msg",
        "inter_token_latency_s",
        "ttft_s",
        "end_to_end_latency_s",
        "request_output_throughput_token_per_s",
        "number_total_tokens",
        "number_output_tokens",
        "number_input_tokens",
    }
    assert rows[0]["number_output_tokens"] == 6 and rows[0]["error_code"] is None
    s = json.loads(summary.read_text())
    assert s["results_num_completed_requests"] == 3 and s["results_number_errors"] == 0
    assert s["results_ttft_s_quantiles_p50"] > 0 and "results_end_to_end_latency_s_mean" in s
    assert summary.name.startswith("tiny-llama_") and s["name"] == summary.stem


def test_several_models_compared_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_models: dict[str, Path], results_schema: dict[str, Any]
) -> None:
    out = tmp_path / "compare.json"
    code, stdout, _ = run_cli(
        capsys,
        "bench",
        "--model",
        str(tiny_models["target"]),
        "--model",
        str(tiny_models["draft"]),
        "--runs",
        "2",
        "--warmup",
        "0",
        "--max-tokens",
        "5",
        "--output",
        str(out),
        *TINY,
    )
    assert code == 0
    assert "comparison" in stdout and "tiny-target.gguf" in stdout and "tiny-draft.gguf" in stdout
    docs = [json.loads((tmp_path / f"compare-{n}.json").read_text()) for n in ("tiny-target", "tiny-draft")]
    for doc in docs:
        check_document(doc, results_schema)
    assert docs[0]["metadata"]["run_id"] == docs[1]["metadata"]["run_id"]
    assert docs[0]["metadata"]["benchmark_id"] != docs[1]["metadata"]["benchmark_id"]
    assert docs[0]["configuration"]["model"]["sha256"] != docs[1]["configuration"]["model"]["sha256"]


def test_failed_requests_are_counted_and_the_run_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path, results_schema: dict[str, Any]
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"id": "short", "prompt": "the cat"})
        + "\n"
        + json.dumps({"id": "huge", "prompt": "word " * 500})
        + "\n"
    )
    out, raw = tmp_path / "r.json", tmp_path / "r.jsonl"
    code, _stdout, _ = run_cli(
        capsys,
        "bench",
        "--model",
        str(tiny_model),
        "--prompts",
        str(prompts),
        "--runs",
        "4",
        "--warmup",
        "0",
        "--max-tokens",
        "4",
        "--output",
        str(out),
        "--raw",
        str(raw),
        *TINY,
    )
    assert code == 0
    doc = json.loads(out.read_text())
    check_document(doc, results_schema)
    assert doc["results"]["error_metrics"] == {
        "total_errors": 2,
        "error_rate": 0.5,
        "errors_by_type": {"context_overflow": 2},
    }
    assert doc["results"]["latency_metrics"]["time_to_first_token"]["sample_count"] == 2
    failed = [json.loads(line) for line in raw.read_text().splitlines() if '"ok": false' in line]
    assert len(failed) == 2 and all(r["prompt_id"] == "huge" and r["ttft_ms"] is None for r in failed)


def test_one_token_requests_leave_tpot_out_with_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path, results_schema: dict[str, Any]
) -> None:
    out = tmp_path / "r.json"
    code, _, _ = run_cli(
        capsys,
        "bench",
        "--model",
        str(tiny_model),
        "--runs",
        "2",
        "--warmup",
        "0",
        "--max-tokens",
        "1",
        "--output",
        str(out),
        *TINY,
    )
    assert code == 0
    doc = json.loads(out.read_text())
    check_document(doc, results_schema)
    lat = doc["results"]["latency_metrics"]
    assert "time_per_output_token" not in lat and "decode_time" not in lat
    assert "at most one token" in doc["results"]["unavailable"]["time_per_output_token"]
    assert doc["results"]["engine_timings"]["overhead_ratio"] is None
    assert "NaN" not in out.read_text()


def test_config_file_supplies_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path, config_file: Any
) -> None:
    cfg = config_file(
        f'[agent]\ndevice_id = "from-config"\n[model]\npath = "{tiny_model}"\nn_ctx = 128\nn_threads = 1\n'
        "[bench]\nruns = 2\nwarmup = 0\nmax_tokens = 3\n"
    )
    raw = tmp_path / "r.jsonl"
    code, _, stderr = run_cli(capsys, "bench", "--config", str(cfg), "--raw", str(raw), "--no-progress")
    assert code == 0, stderr
    lines = [json.loads(line) for line in raw.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["device_id"] == "from-config" and lines[0]["output_tokens"] == 3


def test_progress_bar_goes_to_stderr(capsys: pytest.CaptureFixture[str], tiny_model: Path) -> None:
    code, stdout, stderr = run_cli(
        capsys,
        "bench",
        "--model",
        str(tiny_model),
        "--runs",
        "2",
        "--warmup",
        "1",
        "--max-tokens",
        "3",
        "--n-ctx",
        "128",
        "--n-threads",
        "1",
        "--progress",
    )
    assert code == 0
    assert "3/3" in stderr and "req" in stderr
    assert "3/3" not in stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "/nonexistent/model.gguf"], "model /nonexistent/model.gguf: no such file"),
        (["--max-tokens", "0"], "--max-tokens: bench.max_tokens = 0 is not allowed: expected an integer ≥ 1"),
        (["--runs", "0"], "bench.runs = 0"),
        (["--n-ctx", "4"], "model.n_ctx = 4"),
        (["--frobnicate"], "No such option '--frobnicate'"),
        (["--runs", "many"], "'many' is not a valid integer"),
        (["--chat-template", "sometimes"], "'sometimes' is not one of"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], args: list[str], expected: str) -> None:
    code, _stdout, stderr = run_cli(capsys, "bench", *args)
    assert code == 2
    assert expected in stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_bad_files_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path, config_file: Any
) -> None:
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    code, _, stderr = run_cli(capsys, "bench", "--model", str(not_gguf))
    assert code == 2 and "is not a GGUF file" in stderr and len(stderr.strip().splitlines()) == 1

    code, _, stderr = run_cli(capsys, "bench", "--model", str(tiny_model), "--prompts", str(tmp_path / "none.txt"))
    assert code == 2 and "prompt file" in stderr and "no such file" in stderr

    bad_prompts = tmp_path / "bad.jsonl"
    bad_prompts.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    code, _, stderr = run_cli(capsys, "bench", "--model", str(tiny_model), "--prompts", str(bad_prompts))
    assert code == 2 and "line 2" in stderr

    bad_cfg = config_file('[model]\nflash_attn = "sometimes"\n')
    code, _, stderr = run_cli(capsys, "bench", "--config", str(bad_cfg))
    assert code == 2 and str(bad_cfg) in stderr and "model.flash_attn" in stderr and "true or false" in stderr
    assert "Traceback" not in stderr

    code, _, stderr = run_cli(capsys, "bench", "--config", str(tmp_path / "absent.toml"))
    assert code == 2 and "absent.toml" in stderr


def test_every_command_has_help_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import cli

    for name, command in cli.commands.items():
        code, stdout, _ = run_cli(capsys, name, "--help")
        assert code == 0 and "Example:" in stdout, name
        for sub in getattr(command, "commands", {}):  # a group's commands too (outbox, tune)
            code, stdout, _ = run_cli(capsys, name, sub, "--help")
            assert code == 0 and "Example:" in stdout, f"{name} {sub}"
    code, stdout, _ = run_cli(capsys, "--version")
    assert code == 0 and "lens-agent" in stdout


def test_energy_per_token_on_a_jetson_tree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path, results_schema: dict[str, Any]
) -> None:
    from .sysfs_trees import orin_jp6

    tree = tmp_path / "orin"
    orin_jp6(tree)
    out, raw = tmp_path / "r.json", tmp_path / "r.jsonl"
    code, stdout, stderr = run_cli(
        capsys,
        "bench",
        "--model",
        str(tiny_model),
        "--runs",
        "3",
        "--warmup",
        "0",
        "--max-tokens",
        "120",
        "--ignore-eos",
        "--sysfs-root",
        str(tree),
        "--sample-rate",
        "1000",
        "--idle-baseline",
        "0",
        "--output",
        str(out),
        "--raw",
        str(raw),
        *TINY,
    )
    assert code == 0, stderr
    doc = json.loads(out.read_text())
    check_document(doc, results_schema)
    energy = doc["results"]["energy"]
    assert energy["source"] == "jetson" and energy["total_rails"] == {"power": ["VDD_IN"]}
    assert energy["avg_power_w"]["median"] == pytest.approx(6.0)  # 5 V × 1.2 A, constant
    assert "J/output token" in stdout
    for record in (json.loads(line) for line in raw.read_text().splitlines()):
        e = record["ext"]["energy"]
        assert e["rails"]["VDD_IN"] == {"avg_w": pytest.approx(6.0), "peak_w": 6.0}
        # constant 6 W over the decode window, no idle baseline: J/token = 6 W × (e2e − TTFT) / (N − 1)
        expected = 6.0 * (record["decode_ms"] / 1000.0) / (record["output_tokens"] - 1)
        assert e["j_per_output_token"] == pytest.approx(expected, rel=1e-3)
    assert doc["configuration"]["hardware"]["device_class"] == "embedded device"
    assert doc["configuration"]["hardware"]["thermal_throttling"]  # the tree's GPU is past its trip point
    assert doc["results"]["resource_utilization"]["gpu_utilization_percent"]["median"] == 45.0


def test_windows_too_short_for_the_sample_rate_say_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path
) -> None:
    from .sysfs_trees import orin_jp6

    orin_jp6(tmp_path / "orin")
    raw = tmp_path / "r.jsonl"
    code, _, _ = run_cli(
        capsys,
        "bench",
        "--model",
        str(tiny_model),
        "--runs",
        "2",
        "--warmup",
        "0",
        "--max-tokens",
        "4",
        "--sysfs-root",
        str(tmp_path / "orin"),
        "--sample-rate",
        "1",
        "--idle-baseline",
        "0",
        "--raw",
        str(raw),
        *TINY,
    )
    assert code == 0
    energy = json.loads(raw.read_text().splitlines()[0])["ext"]["energy"]
    assert "j_per_output_token" not in energy
    assert (
        "power sample(s) in this" in energy["unavailable"]["decode"]
        and "at 1 Hz; need 2" in energy["unavailable"]["decode"]
    )


def test_probe_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from .sysfs_trees import intel_laptop

    intel_laptop(tmp_path)
    code, out, _ = run_cli(capsys, "probe", "--sysfs-root", str(tmp_path), "--samples", "2", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["device"]["device_class"] == "laptop"
    assert doc["power"]["sources"][0]["name"] == "rapl" and len(doc["power"]["samples"]) == 2
    code, out, _ = run_cli(capsys, "probe", "--samples", "0")
    assert code == 0 and "unavailable battery" in out
    code, _, err = run_cli(capsys, "probe", "--power-source", "solar")
    assert code == 2 and "probes.power_source" in err and "jetson" in err
