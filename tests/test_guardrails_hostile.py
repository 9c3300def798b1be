"""The guardrail pipeline against hostile checks, from a real plugin package installed for the test: answers built to
break their own checking (comparisons that raise, a list whose iteration raises, thousands of violations),
constructors that hang or exit, a check left running past its time limit beside the inference, and exception messages
that quote the user's text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.bench.report import guardrail_line, security_section
from agent.engines.llama import LlamaEngine
from agent.guardrails.base import BuildContext
from agent.guardrails.pipeline import GuardrailSet
from agent.prompts import Prompt
from lens_core.errors import ConfigError, UsageError
from lens_core.record_schema import SchemaError, check_guardrails

from .guard_plugin import agent_head, install_plugin, run_once
from .test_guardrails_pipeline import TINY, guard_set, run

CARD = "4111111111111111"
PROMPT = Prompt("card", f"boom: my card {CARD} please")

MODULE = '''
"""Hostile test guardrails."""

import sys
import threading
import time

from agent.guardrails.base import CheckResult, GuardrailError, Violation

RELEASE = threading.Event()  # set by a test to let a hung constructor return
STARTED = []  # spinning calls started


class Many:
    """Answers ``n`` distinct violations."""

    def __init__(self, options):
        self.n = int(options["n"])

    def validate_input(self, text):
        return CheckResult([Violation("other", "low", f"finding {i}") for i in range(self.n)], risk_score=0.2)


class BadFloat(float):
    def __lt__(self, other):
        raise RuntimeError("no comparing")

    __le__ = __gt__ = __ge__ = __eq__ = __ne__ = __lt__

    def __float__(self):
        raise RuntimeError("no converting")

    def __hash__(self):
        raise RuntimeError("no hashing")


class BadStr(str):
    def __eq__(self, other):
        raise RuntimeError("no comparing")

    def __hash__(self):
        raise RuntimeError("no hashing")


class BadList(list):
    def __iter__(self):
        raise RuntimeError("no iterating")

    def __len__(self):
        raise RuntimeError("no counting")


class PropertyViolation(Violation):
    @property
    def severity(self):
        raise RuntimeError("no severity")

    @property
    def type(self):
        raise RuntimeError("no type")


class Evil:
    """Answers what the option ``answer`` names."""

    def __init__(self, options):
        self.answer = options["answer"]

    def validate_input(self, text):
        if self.answer == "risk":
            return CheckResult(risk_score=BadFloat(0.5))
        if self.answer == "severity":
            return CheckResult([Violation("other", BadStr("high"), "x")], risk_score=0.5)
        if self.answer == "type":
            return CheckResult([Violation(BadStr("other"), "high", "x")], risk_score=0.5)
        if self.answer == "list":
            return CheckResult(BadList([Violation("other", "high", "x")]), risk_score=0.5)
        if self.answer == "property":
            violation = Violation("other", "high", "x")
            object.__setattr__(violation, "__class__", PropertyViolation)  # its fields now raise when read
            return CheckResult([violation], risk_score=0.5)
        if self.answer == "server_ms":
            return CheckResult(risk_score=0.1, server_ms=BadFloat(1.0))
        if self.answer == "leak":
            raise RuntimeError("boom with the prompt: " + text)
        if self.answer == "describe":
            return CheckResult([Violation("my_" + text.split()[3], "high", "found card " + text)], risk_score=0.9)
        if self.answer == "exit":
            raise SystemExit(3)
        if self.answer == "guard-leak":
            raise GuardrailError("cannot parse: " + text)
        if self.answer == "guard-loop":
            raise GuardrailError(Looping())
        if self.answer == "quote":
            return CheckResult([Violation("pii_leakage", "high", "found jane.doe@example.com")], risk_score=0.9)
        raise ValueError(self.answer)


class Looping:
    """An exception argument whose text never comes."""

    def __str__(self):
        while not RELEASE.is_set():
            time.sleep(0.01)
        return "released"


class CtorHang:
    def __init__(self, options):
        RELEASE.wait(float(options.get("seconds", 60)))

    def validate_input(self, text):
        return CheckResult()


class CtorExit:
    def __init__(self, options):
        sys.exit(3)

    def validate_input(self, text):
        return CheckResult()


class CtorInterrupt:
    def __init__(self, options):
        raise KeyboardInterrupt

    def validate_input(self, text):
        return CheckResult()


class Spin:
    """A CPU-bound check that spins until closed (or ``seconds`` pass)."""

    def __init__(self, options):
        self.seconds = float(options.get("seconds", 60))
        self.stop = threading.Event()

    def detect_threats(self, text):
        STARTED.append(text)
        end = time.monotonic() + self.seconds
        n = 0
        while not self.stop.is_set() and time.monotonic() < end:
            n += 1
        return CheckResult()

    def close(self):
        self.stop.set()
'''

ENTRY_POINTS = """[llm_latency_lens.guardrails]
many = lens_hostile_guard:Many
evil = lens_hostile_guard:Evil
ctor-hang = lens_hostile_guard:CtorHang
ctor-exit = lens_hostile_guard:CtorExit
ctor-interrupt = lens_hostile_guard:CtorInterrupt
spin = lens_hostile_guard:Spin
"""


def write_hostile_plugin(root: Path) -> Path:
    """The installed package ``lens-hostile-guard`` under ``root`` (put it on sys.path or PYTHONPATH)."""
    return install_plugin(root, "lens_hostile_guard", MODULE, ENTRY_POINTS)


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = write_hostile_plugin(tmp_path / "hostile-site")
    monkeypatch.syspath_prepend(str(root))
    yield root
    module = sys.modules.get("lens_hostile_guard")
    if module is not None:
        module.RELEASE.set()  # a hung constructor returns; its daemon thread ends
        del sys.modules["lens_hostile_guard"]


def one_check(entry_point: str, options: str = "{}", *, stages: str = '["input"]', extra: str = "") -> str:
    return f"""
[[guardrails]]
name = "g"
{extra}
[[guardrails.checks]]
kind = "plugin"
name = "hostile"
entry_point = "{entry_point}"
stages = {stages}
options = {options}
"""


# -- 1. an answer's checking is bounded, and nothing it does escapes as a traceback or a lost record -----------------
def test_thousands_of_violations_are_an_error_at_once_not_minutes_of_checking(
    tmp_path: Path, hostile: Path, tiny_engine: LlamaEngine
) -> None:
    config = guard_set(tmp_path, one_check("many", "{ n = 20000 }", extra='time_limit = "5s"'))
    start = time.monotonic()
    record = run(tiny_engine, [PROMPT], config).measured[0]
    elapsed = time.monotonic() - start
    g = record.ext["guardrails"]
    assert (record.ok, record.error_type, g["outcome"]) == (False, "guardrail_error", "error")
    assert "'hostile' answered 20000 violations, more than the 64" in record.error_message
    assert elapsed < 30  # was minutes (quadratic deduplication on the measuring thread)
    check_guardrails(g)

    # 64 distinct violations are an answer: the record keeps the first 32
    config = guard_set(tmp_path, one_check("many", "{ n = 64 }"), name="g")
    record = run(tiny_engine, [PROMPT], config).measured[0]
    g = record.ext["guardrails"]
    assert g["outcome"] == "passed" and len(g["violations"]) == 32
    assert [v["description"] for v in g["violations"][:2]] == ["finding 0", "finding 1"]
    check_guardrails(g)


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ("risk", "risk_score of type BadFloat"),
        ("severity", "severity is not one of"),
        ("type", "type or description is not a string"),
        ("list", "violations of type BadList"),
        ("property", "a violation of type PropertyViolation"),
        ("server_ms", "server_ms/network_ms"),
        ("exit", "failed: SystemExit"),
    ],
)
def test_an_answer_that_breaks_its_own_checking_is_an_error_of_its_stage(
    tmp_path: Path, hostile: Path, tiny_engine: LlamaEngine, answer: str, said: str
) -> None:
    config = guard_set(tmp_path, one_check("evil", f'{{ answer = "{answer}" }}', extra='on_error = "pass"'))
    records = run(tiny_engine, [PROMPT, PROMPT], config).measured  # no traceback, every record kept
    assert len(records) == 2
    for record in records:
        g = record.ext["guardrails"]
        assert (record.ok, g["outcome"]) == (True, "passed_with_errors")
        error = g["stages"]["input"]["error"]
        assert "plugin check 'hostile'" in error and said in error, error
        check_guardrails(g)


# -- 4. a check's exception message (which may quote the prompt) is not recorded: its type is ------------------------
def test_a_plugin_exception_message_does_not_reach_the_record(
    tmp_path: Path, hostile: Path, tiny_engine: LlamaEngine
) -> None:
    config = guard_set(tmp_path, one_check("evil", '{ answer = "leak" }'))
    record = run(tiny_engine, [PROMPT], config).measured[0]
    g = record.ext["guardrails"]
    assert record.error_type == "guardrail_error"
    assert record.error_message.endswith("plugin check 'hostile' failed: RuntimeError")
    assert CARD not in json.dumps(record.ext) and CARD not in record.error_message
    assert "boom" not in record.error_message
    assert g["stages"]["input"]["checks"][0]["error"] == "plugin check 'hostile' failed: RuntimeError"


def test_a_plugin_s_guardrail_error_is_said_by_its_type_and_its_text_is_read_within_the_time_limit(
    tmp_path: Path, hostile: Path, tiny_engine: LlamaEngine
) -> None:
    # a plugin's GuardrailError may quote the prompt like any other exception of foreign code
    config = guard_set(tmp_path, one_check("evil", '{ answer = "guard-leak" }'))
    record = run(tiny_engine, [PROMPT], config).measured[0]
    assert record.error_message.endswith("plugin check 'hostile' failed: GuardrailError")
    assert CARD not in json.dumps(record.ext) and CARD not in record.error_message
    # an exception whose text never comes holds its own thread, not the request: the time limit ends the wait
    config = guard_set(tmp_path, one_check("evil", '{ answer = "guard-loop" }', extra='time_limit = "300ms"'))
    start = time.monotonic()
    record = run(tiny_engine, [PROMPT], config).measured[0]
    assert time.monotonic() - start < 20
    assert "did not answer within the 0.3 s time limit" in record.error_message, record.error_message


def test_a_description_that_quotes_what_it_found_is_withheld(
    tmp_path: Path, hostile: Path, tiny_engine: LlamaEngine
) -> None:
    config = guard_set(tmp_path, one_check("evil", '{ answer = "quote" }'))
    record = run(tiny_engine, [PROMPT], config).measured[0]
    (violation,) = record.ext["guardrails"]["violations"]
    assert violation["description"] == "description withheld: it quoted e-mail address"
    assert "example.com" not in json.dumps(record.ext)


def test_a_long_number_in_a_check_s_own_words_is_masked(
    tmp_path: Path, hostile: Path, tiny_engine: LlamaEngine
) -> None:
    config = guard_set(tmp_path, one_check("evil", '{ answer = "describe" }'))
    record = run(tiny_engine, [PROMPT], config).measured[0]
    (violation,) = record.ext["guardrails"]["violations"]
    assert violation["type"] == "other"
    assert violation["description"] == "my_[number]: found card boom: my card [number] please"
    assert CARD not in json.dumps(record.ext)


# -- 2. building a check: bounded in time, and whatever its constructor does is one line ----------------------------
@pytest.mark.parametrize(
    ("entry_point", "said"),
    [
        ("ctor-hang", "not built within the 0.5 s build time limit (build_time_limit)"),
        ("ctor-exit", "it raised SystemExit"),
        ("ctor-interrupt", "it raised KeyboardInterrupt"),
    ],
)
def test_a_constructor_that_hangs_or_exits_is_a_usage_error_naming_the_check(
    tmp_path: Path, hostile: Path, entry_point: str, said: str
) -> None:
    config = guard_set(tmp_path, one_check(entry_point, extra='build_time_limit = "500ms"'))
    assert config.build_time_limit_s == 0.5
    start = time.monotonic()
    with pytest.raises(UsageError) as info:
        GuardrailSet.build(config, BuildContext(n_threads=1))
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert "guardrails[0].checks[0] (plugin check 'hostile') cannot be built" in message and said in message
    assert "\n" not in message


@pytest.mark.parametrize("value", ["soon", "0s", 0, "48h", True])
def test_build_time_limit_is_checked_like_the_other_keys(tmp_path: Path, value: object) -> None:
    from agent.config import load_config

    path = tmp_path / "agent.toml"
    shown = json.dumps(value)
    path.write_text(f'[[guardrails]]\nname = "a"\nbuild_time_limit = {shown}\n[[guardrails.checks]]\nkind = "empty"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert "guardrails[0].build_time_limit" in str(info.value) and str(path) in str(info.value)


def test_bench_with_a_hanging_constructor_exits_2_with_one_line(tmp_path: Path, tiny_model: Path) -> None:
    site = write_hostile_plugin(tmp_path / "site")
    config = tmp_path / "agent.toml"
    config.write_text(one_check("ctor-hang", extra='build_time_limit = "1s"'))
    done = _lens_agent_with(site, "bench", "--config", str(config), "--model", str(tiny_model), "--guardrails", "g")
    errors = [line for line in done.stderr.splitlines() if line.startswith("lens-agent: error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and "plugin check 'hostile'" in errors[0] and "1 s build time limit" in errors[0]
    assert done.stderr.strip().splitlines()[-1] == errors[0]  # progress lines before it, the one error line last
    config.write_text(one_check("ctor-exit"))
    done = _lens_agent_with(site, "bench", "--config", str(config), "--model", str(tiny_model), "--guardrails", "g")
    errors = [line for line in done.stderr.splitlines() if line.startswith("lens-agent: error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and "(plugin check 'hostile') cannot be built: it raised SystemExit" in errors[0]


def _lens_agent_with(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[1]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LENS_")}
    environ["PYTHONPATH"] = os.pathsep.join([str(root), str(site)])
    return subprocess.run(
        [str(Path(sys.executable).parent / "lens-agent"), *args, *TINY],
        capture_output=True,
        text=True,
        env=environ,
        timeout=300,
        check=False,
    )


def test_the_service_runs_its_other_workloads_beside_a_hanging_constructor(tmp_path: Path, tiny_model: Path) -> None:
    site = write_hostile_plugin(tmp_path / "site")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about the weather.\n")
    config = tmp_path / "agent.toml"
    config.write_text(f"""
{agent_head(tmp_path, tiny_model)}
[[guardrails]]
name = "hangs"
build_time_limit = "1s"
[[guardrails.checks]]
kind = "plugin"
entry_point = "ctor-hang"
stages = ["input"]
[[workloads]]
name = "w-hang"
prompts = "{prompts}"
requests = 1
max_tokens = 4
every = "1h"
guardrails = "hangs"
[[workloads]]
name = "w-ok"
prompts = "{prompts}"
requests = 2
max_tokens = 4
every = "1h"
""")
    done = run_once(config, site, timeout=240)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr  # documented: run --once exits 1 when a workload failed
    assert "Traceback" not in done.stderr, done.stderr
    hang = next(line for line in out.splitlines() if line.startswith("w-hang:"))
    assert "FAILED" in hang and "plugin check 'plugin'" in hang and "1 s build time limit" in hang, out
    assert "w-ok: ok: 2/2 requests ok" in out, out


# -- 3. a check past its time limit beside the inference is recorded; close ends what it can ------------------------
def test_a_check_running_past_its_time_limit_beside_the_inference_is_recorded(
    tmp_path: Path, hostile: Path, tiny_engine: LlamaEngine
) -> None:
    config = guard_set(
        tmp_path,
        one_check("spin", "{ seconds = 120 }", stages='["threat"]', extra='time_limit = "200ms"\non_error = "pass"'),
    )
    guardrails = GuardrailSet.build(config, BuildContext(n_threads=1))
    try:
        from agent.bench.runner import BenchOptions, run_bench

        options = BenchOptions(runs=2, warmup=0, max_tokens=8, chat_template="off")
        result = run_bench(tiny_engine, [PROMPT], options, run_id="r", device_id="d", guardrails=guardrails)
        spinning = [t for t in threading.enumerate() if t.name == "guardrail-hostile"]
        assert spinning and spinning[0].is_alive()  # the call that timed out still runs
    finally:
        guardrails.close()
    first, second = (m.ext["guardrails"] for m in result.measured)
    assert "did not answer within the 0.2 s time limit" in first["stages"]["threat"]["error"]
    assert first["stray_checks"] >= 1 and second["stray_checks"] >= 1
    for g in (first, second):
        check_guardrails(g)
    section = security_section(result)
    assert section is not None and section["requests_beside_stray_checks"] == 2
    assert "2 requests ran beside a check still running past its time limit" in guardrail_line(section)
    # close asked the check to stop (its close, on a thread of its own): its worker thread ended
    deadline = time.monotonic() + 10
    while any(t.name == "guardrail-hostile" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "guardrail-hostile" for t in threading.enumerate())

    # with nothing stray, the key is absent (and the count is 0)
    calm = GuardrailSet.build(guard_set(tmp_path, one_check("many", "{ n = 0 }"), name="g"), BuildContext(n_threads=1))
    try:
        record = run_bench(tiny_engine, [PROMPT], options, run_id="r", device_id="d", guardrails=calm).measured[0]
    finally:
        calm.close()
    assert "stray_checks" not in record.ext["guardrails"]


@pytest.mark.parametrize("value", [-1, 17, 1.5, True, "2"])
def test_ingest_bounds_stray_checks(value: object) -> None:
    from .guardrail_records import guardrails

    good = guardrails()
    good["stray_checks"] = 3
    check_guardrails(good)
    bad = dict(good, stray_checks=value)
    with pytest.raises(SchemaError, match=r"ext\.guardrails\.stray_checks"):
        check_guardrails(bad)


def test_a_check_whose_build_still_hangs_is_not_built_again(tmp_path: Path, hostile: Path) -> None:
    """A service retries a failed build at every run: a constructor that never returns must not leave one more
    thread behind each time."""
    config = guard_set(tmp_path, one_check("ctor-hang", extra='build_time_limit = "300ms"'))

    def building() -> int:
        return sum(t.name.startswith("guardrail-build-") and t.is_alive() for t in threading.enumerate())

    before = building()
    with pytest.raises(UsageError, match="not built within"):
        GuardrailSet.build(config, BuildContext(n_threads=1))
    for _ in range(3):
        with pytest.raises(UsageError, match="an earlier build of it is still running past the build time limit"):
            GuardrailSet.build(config, BuildContext(n_threads=1))
    assert building() == before + 1
    # the same check changed (a reload with another constructor) is built afresh
    changed = guard_set(tmp_path, one_check("evil", '{ answer = "quote" }', extra='build_time_limit = "300ms"'))
    GuardrailSet.build(changed, BuildContext(n_threads=1)).close()
