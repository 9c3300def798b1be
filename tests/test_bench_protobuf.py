"""``lens-agent bench --format protobuf``: the results and their requests as llm_latency_lens.v1.BenchmarkResults,
read back by our runtime and by Debian's protoc; nothing imports protobuf unless it is asked for."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lens_core import protobuf as P
from lens_core.proto.llm_latency_lens.v1 import measurement_pb2 as pb

from .test_bench_cli import TINY, run_cli
from .test_protobuf_export import PROTO_DIR, one, parse_text, split_stream


def test_bench_writes_benchmark_results_messages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path
) -> None:
    out, raw = tmp_path / "results.json", tmp_path / "requests.jsonl"
    args = ["--model", str(tiny_model), "--runs", "4", "--warmup", "1", "--max-tokens", "8", "--output", str(out)]
    code, _, stderr = run_cli(capsys, "bench", *args, "--raw", str(raw), "--format", "protobuf", *TINY)
    assert code == 0, stderr
    path = tmp_path / "results.pb"
    assert f"wrote {path}" in stderr
    document = json.loads(out.read_text())
    data = path.read_bytes()
    (message,) = P.iter_delimited(data, pb.BenchmarkResults)
    assert P.results_document(message) == document  # the whole document travels, exactly
    assert message.benchmark_id == document["metadata"]["benchmark_id"] and message.run_id
    assert message.config.model.name == document["configuration"]["model"]["name"]
    assert message.config.test_params.total_requests == 4 and message.config.test_params.warmup_requests == 1
    ttft = document["results"]["latency_metrics"]["time_to_first_token"]
    assert message.aggregated.ttft_distribution.median_ms == ttft["median_ms"]
    assert message.aggregated.ttft_distribution.sample_count == ttft["sample_count"] == 4
    throughput = document["results"]["throughput_metrics"]
    assert message.aggregated.throughput.tokens_per_second == throughput["tokens_per_second"]
    # the measured requests (not the warm-up), the same as --raw's
    lines = [json.loads(line) for line in raw.read_text().splitlines()]
    measured = [line for line in lines if not line["warmup"]]
    records = [P.message_to_record(m) for m in message.measurements]
    assert [r["id"] for r in records] == [line["id"] for line in measured]
    for record, line in zip(records, measured, strict=True):
        assert record["ttft_ms"] == round(line["ttft_ms"] * 1000) / 1000
        assert record["itl_ms"] == [round(g * 1000) / 1000 for g in line["itl_ms"]]
        assert record["output_text"] == line["output_text"]
    # a decoder that is not ours reads the same
    protoc = shutil.which("protoc")
    assert protoc, "protoc is missing: `make sysdeps` installs Debian's protobuf-compiler and libprotobuf-dev"
    (body,) = split_stream(data)
    done = subprocess.run(
        [protoc, f"--proto_path={PROTO_DIR}", "--decode=llm_latency_lens.v1.BenchmarkResults", P.PROTO_FILE],
        input=body,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    text = parse_text(done.stdout.decode("ascii"))
    assert one(text, "benchmark_id").decode() == document["metadata"]["benchmark_id"]
    assert one(text, "aggregated", "ttft_distribution", "median_ms") == pytest.approx(ttft["median_ms"], rel=1e-12)
    assert [m["measurement_id"][0].decode() for m in text["measurements"]] == [line["id"] for line in measured]


def test_bench_protobuf_refuses_a_name_it_would_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.pb"
    code, _, stderr = run_cli(capsys, "bench", "--output", str(out), "--format", "protobuf", *TINY)
    assert code == 2 and "--format protobuf writes" in stderr and "Traceback" not in stderr


def test_the_agent_imports_protobuf_only_when_asked() -> None:
    """The agent's commands (and the aggregator) load neither the protobuf runtime nor the generated module until a
    protobuf output is asked for."""
    code = (
        "import sys, agent.cli, agent.bench.session, agent.service, aggregator.app, aggregator.api\n"
        "print([m for m in sys.modules if m.startswith(('google.protobuf', 'lens_core.proto', 'lens_core.protobuf'))])"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc (a folder no file can be made in)")
def test_bench_protobuf_refuses_an_unwritable_output_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder that exists but takes no new file (results.pb in /proc) is refused before the model is loaded: one
    line, exit 2, nothing run; a writable folder's check leaves no file behind."""
    args = ["--runs", "1", "--max-tokens", "2", "--format", "protobuf", *TINY]
    monkeypatch.chdir("/proc")
    code, stdout, stderr = run_cli(capsys, "bench", "--model", str(tiny_model), *args)
    assert code == 2 and "results.pb cannot be written" in stderr and "Traceback" not in stderr
    assert stdout == "" and "loading" not in stderr  # refused before the run, not after it
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "missing.gguf"
    code, _, stderr = run_cli(capsys, "bench", *args, "--output", str(tmp_path / "r.json"), "--model", str(missing))
    assert code != 0 and not (tmp_path / "r.pb").exists()  # the check's own probe file is gone


def test_the_formats_bench_says_what_it_measures_and_refuses_bad_options(tmp_path: Path) -> None:
    """``bench/formats.py --help``: a complete description (every format it compares) and help for every option;
    a bad value is one line naming the option, exit 2, no traceback."""
    root = Path(__file__).resolve().parents[1]
    script = root / "bench" / "formats.py"
    env = {"PYTHONPATH": str(root), "COLUMNS": "200", "PATH": "/usr/bin:/bin"}
    shown = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "for JSON, CBOR, msgpack, Protocol Buffers and Arrow IPC." in text
    options = {"--records", "--seed", "--batch", "--repeat", "--raw"}
    for line in shown.stdout.splitlines():
        words = line.split()
        if words and words[0] in options:
            assert len(words) > 2, f"no help text: {line}"  # the option, its metavar, then the help
            options.discard(words[0])
    assert not options, f"options missing from --help: {options}"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    bad = ((["--batch", "0"], "--batch"), (["--repeat", "x"], "--repeat"), (["--raw", str(empty)], "--raw"))
    for args, named in bad:
        refused = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env)
        assert refused.returncode == 2 and named in refused.stderr.splitlines()[-1], refused.stderr
        assert "Traceback" not in refused.stderr
