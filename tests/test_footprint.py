"""The agent's own cost next to the model it measures: the modules each command may load (an import-graph check,
not a timing), the service's resident memory over bare llama-cpp-python and its CPU between runs (loose bounds: the
figures are bench/footprint.py's, docs/PERFORMANCE.md)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest

from agent.engines.modelfile import FILE_TYPES
from tests.footprint import (
    ROOT,
    bare_process,
    baseline_modules,
    command_modules,
    idle_cpu_percent,
    proc_status,
    service_config,
    start_service,
    third_party,
    wait_for_run_and_sync,
)
from tests.processes import AggregatorProcess, device_token

# what the agent adds to what llama-cpp-python loads by itself: the CLI, process facts (psutil) and, where records
# are stored or sent, the wire codecs and compression
CLI = {"agent", "lens_core", "click", "psutil"}
CODECS = {"cbor2", "msgpack", "zstandard"}
# never on these paths (each is what a configured feature loads: a cloud endpoint, a suite, OTLP, a tuner …)
ELSEWHERE = {
    "aiohttp",
    "sqlite_utils",
    "apscheduler",
    "yaml",
    "gguf",
    "tqdm",
    "prometheus_client",
    "google",
    "opentelemetry",
    "presidio_analyzer",
    "spacy",
    "pyarrow",
}
ENGINE_PATH_OURS = {
    "agent.engines.cloud",
    "agent.bench.suite_run",
    "agent.service",
    "agent.sync",
    "agent.campaigns",
    "lens_core.otlp",
    "agent.tune_worker",
    "agent.guardrails.judge",
    "agent.guardrails.presidio",
    "agent.guardrails.http",
}


# status reads the outbox, the service's state, the tuning and campaign files and asks the aggregator: nothing of the
# engine, the runs or the search
STATUS_NEVER = (ENGINE_PATH_OURS - {"agent.sync", "agent.campaigns"}) | {
    "lens_core.stats",
    "agent.engines.llama",
    "agent.bench.runner",
    "agent.strategies",
    "agent.guardrails.pipeline",
    "agent.tuning",
    "agent.suite",
    "lens_core.suite",
    "agent.measurement",
}


@pytest.fixture(scope="module")
def engine_modules() -> set[str]:
    return third_party(baseline_modules())


def check(modules: list[str], allowed: set[str], forbidden_ours: set[str], what: str) -> None:
    extra = third_party(modules) - allowed
    assert not extra, f"{what} loaded packages it does not need: {sorted(extra)}"
    ours = sorted(set(modules) & forbidden_ours)
    assert not ours, f"{what} loaded modules of other paths: {ours}"


def test_file_type_names_are_gguf_py_s() -> None:
    """The GGUF file-type table (kept so that naming a model's type loads no gguf-py) says what gguf-py says."""
    expected = {int(t.value): t.name.removeprefix("MOSTLY_").removeprefix("ALL_") for t in gguf.LlamaFileType}
    assert expected == FILE_TYPES


def test_the_third_party_filter_sees_what_a_command_adds() -> None:
    """The check itself: a package a command imports shows up (so an empty difference means something)."""
    assert third_party(["aiohttp.client", "json", "agent.cli", "_cython_3_1_4"]) == {"aiohttp", "agent"}


def test_status_loads_no_engine_and_answers(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    from agent.outbox import Outbox
    from agent.synthetic import synthetic_records

    with Outbox(data / "outbox.db") as box:  # an outbox with a record, as a device's
        box.append(synthetic_records(1)[0])
    config = tmp_path / "agent.toml"
    # a sync URL nobody answers: status probes it (with the sync client) and says so
    (tmp_path / "token").write_text("t")
    config.write_text(
        f'[agent]\ndata_dir = "{data}"\n'
        f'[sync]\nurl = "http://127.0.0.1:9"\nallow_http = true\ntoken_file = "{tmp_path / "token"}"\n'
    )
    modules, output = command_modules(["status", "--config", str(config), "--json"])
    doc = json.loads(output[output.index("{") :])
    assert doc["outbox"]["records"] == 1 and doc["sync"]["reachable"] is False, doc
    check(
        modules,
        {"agent", "lens_core", "click", "psutil"} | CODECS,
        STATUS_NEVER,
        "status",
    )
    assert "llama_cpp" not in modules and "numpy" not in modules and "agent.engines.llama" not in modules


def test_bench_loads_the_engine_and_little_else(tiny_model: Path, tmp_path: Path, engine_modules: set[str]) -> None:
    args = ["bench", "--model", str(tiny_model), "--runs", "1", "--warmup", "0", "--max-tokens", "2"]
    modules, output = command_modules([*args, "--no-progress", "--output", str(tmp_path / "r.json")])
    assert (tmp_path / "r.json").exists(), output
    check(modules, engine_modules | CLI, ENGINE_PATH_OURS | {"agent.outbox"}, "bench")
    assert not ELSEWHERE & third_party(modules)


def test_bench_store_then_sync_load_the_codecs_not_aiohttp(
    tiny_model: Path, tmp_path: Path, engine_modules: set[str], aggregator: AggregatorProcess
) -> None:
    token = tmp_path / "token"
    token.write_text(device_token(aggregator.db))
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\ndata_dir = "{tmp_path / "data"}"\ndevice_id = "dev-1"\n'
        f'[sync]\nurl = "http://127.0.0.1:{aggregator.port}"\nallow_http = true\ntoken_file = "{token}"\n'
    )
    base = ["--config", str(config)]
    args = ["bench", *base, "--model", str(tiny_model), "--runs", "2", "--warmup", "0", "--max-tokens", "2"]
    modules, output = command_modules([*args, "--no-progress", "--store"])
    check(modules, engine_modules | CLI | CODECS, ENGINE_PATH_OURS, "bench --store")
    assert "agent.outbox" in modules, output

    modules, output = command_modules(["sync", *base, "--json"])
    report = json.loads(output[output.index("{") :])
    assert report["uploaded"] >= 2, report  # the two requests (and the model's load record)
    check(modules, CLI | CODECS, ENGINE_PATH_OURS - {"agent.sync"}, "sync")
    assert "llama_cpp" not in modules and "numpy" not in modules


def test_service_between_runs_memory_cpu_and_modules(
    tiny_model: Path, tmp_path: Path, engine_modules: set[str], aggregator: AggregatorProcess
) -> None:
    """The service after a run and a sync: the modules it holds (an import-graph check), its resident memory over
    bare llama-cpp-python with the same model and settings, and its CPU while it waits (both bounded loosely)."""
    config = service_config(
        tmp_path,
        tiny_model,
        aggregator.port,
        device_token(aggregator.db),
        n_ctx=256,
        n_threads=1,
        every="4s",
        max_tokens=6,
        sync_interval="1s",
    )
    out = tmp_path / "modules.json"
    proc = start_service(config, out)
    bare = None
    try:
        wait_for_run_and_sync(proc, tmp_path / "data", aggregator.db, 120)
        service_rss = proc_status(proc.pid)["VmRSS"]
        cpu = idle_cpu_percent(proc.pid, 2.0)
        bare = bare_process(tiny_model, 256, 1, "Hello", 6)
        bare_rss = proc_status(bare.pid)["VmRSS"]
        over_mb = (service_rss - bare_rss) / 2**20
        # the figure is bench/footprint.py's (+15 MB on SmolLM2, docs/PERFORMANCE.md); this loose bound catches a
        # return of the old cost (+35 MB)
        assert over_mb < 30, f"the service holds {over_mb:.1f} MB over bare llama-cpp-python"
        assert cpu < 50, f"the service used {cpu:.0f} % of a core between runs"
    finally:
        if bare is not None:
            bare.communicate("\n", timeout=30)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    modules = json.loads(out.read_text())
    check(
        modules,
        engine_modules | CLI | CODECS,
        ENGINE_PATH_OURS - {"agent.service", "agent.sync", "agent.campaigns"},
        "the service",
    )
    assert not ELSEWHERE & third_party(modules)


@pytest.mark.parametrize("rate_hz", [10.0, 50.0])
def test_power_sampler_cpu_is_bounded(tmp_path: Path, rate_hz: float) -> None:
    """The power sampler's own CPU on a Jetson's fixture tree (every rail, every source), loosely bounded; the figure
    (about 1 % of a core at 50 Hz) is bench/footprint.py's."""
    import resource

    from agent.probes.power import detect_power
    from agent.probes.sampler import PowerSampler
    from agent.probes.sysfs import Root
    from tests.sysfs_trees import orin_jp6

    orin_jp6(tmp_path / "orin")
    sources, _ = detect_power(Root(str(tmp_path / "orin")))
    assert sources, "the Orin tree offers its INA3221 rails"
    sampler = PowerSampler(sources, rate_hz=rate_hz)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    sampler.start()
    time.sleep(2.0)  # this thread sleeps: the process's CPU meanwhile is the sampler's
    sampler.stop()
    after, elapsed = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - start
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert len(sampler.samples) >= rate_hz * 0.5  # it sampled (a busy machine may delay some)
    assert sampler.samples[0][1], "a sample holds the rails' readings"
    assert 100.0 * cpu / elapsed < 25.0, f"the sampler used {100.0 * cpu / elapsed:.1f} % of a core at {rate_hz} Hz"


@pytest.mark.parametrize(
    ("typed", "hint"),
    [("outbx", "Did you mean 'outbox'?"), ("tun", "'run', 'tune'"), ("stat", "Did you mean 'status'?")],
)
def test_a_mistyped_command_is_told_every_command_the_lazy_groups_too(typed: str, hint: str) -> None:
    """The outbox and tune groups load when named; a typo still hears of them."""
    proc = subprocess.run(
        [sys.executable, "-c", "from agent.cli import main; main()", typed], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2 and hint in proc.stderr, proc.stderr


def test_the_operators_malloc_arena_max_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service caps glibc's arenas at two unless the environment already chose (MALLOC_ARENA_MAX in the unit)."""
    from agent.memory import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert limit_malloc_arenas() is True  # glibc here: the cap is set
