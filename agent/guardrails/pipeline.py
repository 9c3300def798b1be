"""A guardrail set around any strategy: input validation, threat detection, the inference, output filtering — each
stage timed on its own, every check called on its own worker thread with the set's time limit.

A check that raises, outlives the time limit or answers something that is not a valid :class:`CheckResult` is an
error of its stage, never a crash and never a pass. A violation blocks when its check's action is ``block`` and its
severity reaches the set's ``block_at``: the request is then ``kind = "blocked"`` (not an error, not a success), and
what follows the blocking stage does not run. Everything lands in ``record.ext["guardrails"]`` (docs/guardrails.md).
"""

from __future__ import annotations

import contextlib
import math
import queue
import re
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lens_core import guardrail_view
from lens_core.config import Invalid, int_range, parse_duration
from lens_core.errors import ConfigError, UsageError

from ..measurement import Measurement, utc_now_iso
from .base import (
    MAX_DESCRIPTION,
    NAME_PATTERN,
    SEVERITIES,
    STAGE_METHODS,
    STAGES,
    VIOLATION_TYPES,
    BuildContext,
    CheckConfig,
    CheckResult,
    Guardrail,
    GuardrailError,
    Violation,
    clean_text,
    risk_level,
    severity_rank,
)
from .registry import check_config, kind_module

if TYPE_CHECKING:
    from ..config import AgentConfig
    from ..strategies.base import Strategy, Window

BUILTIN_SETS = ("rules", "empty")
# the record's bounds are the wire contract's (lens_core.guardrail_view, which ingest checks them against)
MAX_CHECKS = guardrail_view.MAX_CHECKS  # per stage
MAX_VIOLATIONS = guardrail_view.MAX_VIOLATIONS  # kept per check and stage, and per record
MAX_ANSWER_VIOLATIONS = 64  # a check's one answer with more is not an answer (an error of its stage)
MAX_STRAY = guardrail_view.MAX_STRAY_CHECKS
MAX_ERROR = guardrail_view.MAX_TEXT_CHARS
MAX_MS = guardrail_view.MAX_MS
ABORT_WAIT_S = 1.0  # how long a check that can abort (a judge) is given to stop after its time limit
BUILD_TIME_LIMIT_S = 120.0  # the default time a set's check may take to be built (a judge loads its model)
SET_KEYS = (
    "name",
    "block_at",
    "on_error",
    "time_limit",
    "build_time_limit",
    "output_mode",
    "stream_chunk",
    "checks",
)


@dataclass(frozen=True)
class SetConfig:
    name: str
    block_at: str
    on_error: str
    time_limit_s: float
    output_mode: str
    stream_chunk: int
    checks: tuple[CheckConfig, ...]
    build_time_limit_s: float = BUILD_TIME_LIMIT_S  # per check built


def builtin_set(name: str) -> SetConfig:
    """The built-in sets: ``rules`` (one rules check with its defaults at input and output) and ``empty`` (one
    empty check at all three stages)."""
    if name not in BUILTIN_SETS:
        raise UsageError(f"guardrail set {name!r}: the built-in sets are " + ", ".join(BUILTIN_SETS))
    source = f"built-in guardrail set {name}"
    raw: dict[str, Any] = {"kind": name}
    if name == "rules":
        raw["stages"] = ["input", "output"]
    check = check_config(source, "checks[0]", raw)
    return SetConfig(
        name=name,
        block_at="high",
        on_error="error",
        time_limit_s=10.0,
        output_mode="final",
        stream_chunk=64,
        checks=(check,),
    )


def parse_sets(source: str, raw: object) -> tuple[SetConfig, ...]:
    """The ``[[guardrails]]`` array of tables, every key checked (the agent's config loader calls this)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ConfigError(source, "guardrails", raw, "an array of tables: [[guardrails]]")
    sets: list[SetConfig] = []
    for n, item in enumerate(raw):
        where = f"guardrails[{n}]"
        for key, value in item.items():
            if key not in SET_KEYS:
                raise ConfigError(source, f"{where}.{key}", value, "a key of a guardrail set: " + ", ".join(SET_KEYS))
        name = item.get("name")
        if name is None:
            raise ConfigError(source, where, item, 'a name = "…" (1-64 characters of letters, digits, ".", "_", "-")')
        if not isinstance(name, str) or re.fullmatch(NAME_PATTERN, name) is None:
            raise ConfigError(
                source, f"{where}.name", name, "a name of 1-64 characters of letters, digits, '.', '_' and '-'"
            )

        def value(
            key: str, parse: Callable[[object], Any], default: Any, item: dict[str, Any] = item, where: str = where
        ) -> Any:
            if key not in item:
                return default
            try:
                return parse(item[key])
            except Invalid as exc:
                raise ConfigError(source, f"{where}.{key}", item[key], str(exc)) from None

        block_at = value("block_at", _choice(SEVERITIES), "high")
        on_error = value("on_error", _choice(("error", "pass")), "error")
        time_limit = value("time_limit", _duration, 10.0)
        build_time_limit = value("build_time_limit", _duration, BUILD_TIME_LIMIT_S)
        output_mode = value("output_mode", _choice(("final", "stream")), "final")
        stream_chunk = value("stream_chunk", int_range(1, 1_000_000), 64)
        raw_checks = item.get("checks")
        if not isinstance(raw_checks, list) or not raw_checks:
            raise ConfigError(
                source, f"{where}.checks", raw_checks, "at least one [[guardrails.checks]] table with a kind"
            )
        checks = tuple(check_config(source, f"{where}.checks[{m}]", c) for m, c in enumerate(raw_checks))
        names = [c.name for c in checks]
        for m, check in enumerate(checks):
            if names.index(check.name) != m:
                raise ConfigError(
                    source, f"{where}.checks[{m}].name", check.name, "a name distinct in its set (default: the kind)"
                )
        for stage in STAGES:
            if sum(stage in c.stages for c in checks) > MAX_CHECKS:
                raise ConfigError(source, f"{where}.checks", len(checks), f"at most {MAX_CHECKS} checks per stage")
        sets.append(
            SetConfig(
                name=name,
                block_at=block_at,
                on_error=on_error,
                time_limit_s=time_limit,
                output_mode=output_mode,
                stream_chunk=stream_chunk,
                checks=checks,
                build_time_limit_s=build_time_limit,
            )
        )
    names = [s.name for s in sets]
    for n, one in enumerate(sets):
        if names.index(one.name) != n:
            raise ConfigError(source, f"guardrails[{n}].name", one.name, "distinct set names")
    return tuple(sets)


def _duration(value: object) -> float:
    """A set's time limit: a duration of at most a day."""
    seconds = parse_duration(value)
    if not seconds <= 86_400:
        raise Invalid("a duration such as 500ms, 60s, 5m, 2h (or a plain number of seconds), from 0 to 24h")
    return seconds


def _choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise Invalid("one of " + ", ".join(repr(c) for c in choices))
        return value

    return parse


def set_names(config: AgentConfig) -> list[str]:
    """The set names a workload or ``--guardrails`` may name: the config's sets, then the built-in ones."""
    own = [s.name for s in config.guardrails]
    return own + [b for b in BUILTIN_SETS if b not in own]


def set_from_config(config: AgentConfig, name: str, *, asked_by: str = "") -> SetConfig:
    """The ``[[guardrails]]`` set called ``name``, else the built-in one; a UsageError names the allowed names (and
    ``asked_by``, the flag or key that named it)."""
    for one in config.guardrails:
        if one.name == name:
            return one
    if name in BUILTIN_SETS:
        return builtin_set(name)
    where = f" in {config.path}" if config.path else ""
    raise UsageError(
        f"{asked_by or 'guardrails'} {name!r}: no guardrail set of that name{where}; expected one of "
        + ", ".join(set_names(config))
    )


# -- running checks ---------------------------------------------------------------------------------------------------
_WORKERS: weakref.WeakSet[_Worker] = weakref.WeakSet()  # every check's worker in this process, closed sets' too
_WORKERS_LOCK = threading.Lock()


def stray_workers() -> int:
    """How many checks' threads in this process are still running a call that outlived its time limit: this set's,
    or left behind by a set closed before (Python cannot stop a thread; its work shares the CPU with what runs)."""
    with _WORKERS_LOCK:
        workers = list(_WORKERS)
    return sum(w.stray for w in workers)


class _Worker:
    """One check's own daemon thread. A call that outlives the time limit keeps the thread; until it returns, the
    next call is refused at once."""

    def __init__(self, label: str) -> None:
        self.timed_out = False  # the call in flight outlived its time limit (it is a stray until it returns)
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._busy = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._loop, name=f"guardrail-{label}", daemon=True)
        self._thread.start()
        with _WORKERS_LOCK:
            _WORKERS.add(self)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, arg, box, done = job
            start = time.perf_counter_ns()
            try:
                box["value"] = fn(arg)
            except BaseException as exc:  # a check's own failure: reported as its stage's error
                box["error"] = exc
                if type(exc) is GuardrailError:  # its words read here, within the time limit (a __str__ may hang)
                    box["text"] = _safe_str(exc)
            box["ns"] = time.perf_counter_ns() - start
            self.timed_out = False
            self._busy.clear()
            self._idle.set()
            done.set()

    @property
    def busy(self) -> bool:
        return self._busy.is_set()

    @property
    def stray(self) -> bool:
        """Still running a call that outlived its time limit."""
        return self.timed_out and self._busy.is_set() and self._thread.is_alive()

    def call(self, fn: Callable[[Any], Any], arg: Any, timeout: float) -> tuple[dict[str, Any], bool]:
        """Run ``fn(arg)`` on the thread; ``(box, finished)`` — box holds value or error and the ns it took."""
        box: dict[str, Any] = {}
        done = threading.Event()
        self.timed_out = False
        self._busy.set()
        self._idle.clear()
        self._jobs.put((fn, arg, box, done))
        return box, done.wait(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the call in flight to return; whether it did."""
        return self._idle.wait(timeout)

    def stop(self) -> None:
        """The thread ends once its call in flight (if any) returns."""
        self._jobs.put(None)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


@dataclass
class _Check:
    config: CheckConfig
    guardrail: Guardrail
    worker: _Worker

    @property
    def stages(self) -> frozenset[str]:
        """The configured stages the built check runs (a plugin left at its default stages runs those it has)."""
        own = getattr(self.guardrail, "stages", None)
        return self.config.stages & frozenset(own) if isinstance(own, (set, frozenset)) else self.config.stages


@dataclass
class _Answer:
    """One check's answer at one stage (summed over the chunks of a streamed output)."""

    name: str
    kind: str
    ms: float = 0.0
    server_ms: float | None = None
    network_ms: float | None = None
    risk_score: float = 0.0  # the highest it answered (0 when it failed: its error says so)
    error: str | None = None
    violations: list[Violation] = field(default_factory=list)  # distinct, at most MAX_VIOLATIONS
    seen: set[Violation] = field(default_factory=set)

    def add(self, result: CheckResult) -> None:
        """A checked answer (every field of its exact type): its risk, times and distinct violations."""
        self.risk_score = max(self.risk_score, result.risk_score)
        if result.server_ms is not None:
            self.server_ms = (self.server_ms or 0.0) + result.server_ms
        if result.network_ms is not None:
            self.network_ms = (self.network_ms or 0.0) + result.network_ms
        for v in result.violations:
            if len(self.violations) < MAX_VIOLATIONS and v not in self.seen:
                self.seen.add(v)
                self.violations.append(v)

    def entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "ms": _ms(self.ms),
            "server_ms": None if self.server_ms is None else _ms(self.server_ms),
            "network_ms": None if self.network_ms is None else _ms(self.network_ms),
            "risk_score": self.risk_score,
            "error": self.error,
        }


def _quietly(fn: Callable[[], Any]) -> None:
    with contextlib.suppress(BaseException):  # a check's close that fails: nothing left to do with it
        fn()


def _ms(value: float) -> float:
    return min(max(value, 0.0), MAX_MS)


def _valid_ms(value: object) -> bool:
    if value is None:
        return True
    return type(value) in (int, float) and math.isfinite(value) and 0 <= value <= MAX_MS  # type: ignore[arg-type,operator]


def _unit(value: object) -> bool:
    """An exact int or float (no subclass whose comparisons could do anything), finite, in [0, 1]."""
    return type(value) in (int, float) and math.isfinite(value) and 0 <= value <= 1  # type: ignore[arg-type,operator]


# 8 digits or more, maybe grouped (spaces, dots, dashes, slashes, underscores): a card, an account, a phone
_LONG_NUMBER = re.compile(r"\d(?:[\s./_\-]{0,2}\d){7,}")


def _masked(text: str) -> str:
    """A check's own words with every long number masked: a description must not carry the secret it found (a
    plugin's may quote it: "card 4111 1111 1111 1111"); "ending 4242" stays."""
    return _LONG_NUMBER.sub("[number]", text)


_QUOTE_RULES = ("email", "phone", "card", "iban", "api_key", "private_key")
_quote_check: list[Any] = []  # the built-in rules that find a quoted secret in a description, built once


def _withheld(description: str) -> str:
    """A description as it is, unless it quotes what the built-in rules find in a text (an e-mail address, a card,
    a key …): then it is withheld, saying what it held. A check's description names what it found, never the value
    (a plugin's may quote it: "found jane@example.com")."""
    if not _quote_check:
        config = check_config("the guardrail pipeline", "descriptions", {"kind": "rules", "rules": list(_QUOTE_RULES)})
        _quote_check.append(kind_module("rules").build(config, BuildContext(n_threads=1)))
    found = _quote_check[0].check(description).violations
    if not found:
        return description
    kinds = sorted({v.description.split(" ending ")[0].split(" (")[0] for v in found})
    return clean_text("description withheld: it quoted " + ", ".join(kinds), MAX_DESCRIPTION)


def validate_result(result: object) -> tuple[CheckResult | None, str | None]:
    """A check's answer made safe for the record, or why it is not an answer. Every field must be of its exact type
    (a subclass of str, float or list could raise or lie in its comparisons); an answer with more than
    :data:`MAX_ANSWER_VIOLATIONS` violations is not an answer. A violation type outside the vocabulary becomes
    ``other`` with its own name kept in the description. What is wrong is said by type and length, never by the value
    (which may quote the user's text)."""
    if type(result) is not CheckResult:
        return None, f"answered {type(result).__name__}, not a CheckResult"
    fields = vars(result)  # the instance's own values: no property of a subclass runs
    risk, server_ms, network_ms = fields.get("risk_score"), fields.get("server_ms"), fields.get("network_ms")
    if not _unit(risk):
        shown = repr(risk) if type(risk) in (int, float) else f"of type {type(risk).__name__}"
        return None, f"answered risk_score {shown}, not a number in [0, 1]"
    if not _valid_ms(server_ms) or not _valid_ms(network_ms):
        return None, "answered server_ms/network_ms that are not milliseconds ≥ 0"
    raw = fields.get("violations")
    if type(raw) is not list:
        return None, f"answered violations of type {type(raw).__name__}, not a list"
    if len(raw) > MAX_ANSWER_VIOLATIONS:
        return None, f"answered {len(raw)} violations, more than the {MAX_ANSWER_VIOLATIONS} an answer may hold"
    violations: list[Violation] = []
    for v in raw:
        if type(v) is not Violation:
            return None, f"answered a violation of type {type(v).__name__}, not a Violation"
        own = vars(v)
        vtype, severity, description = own.get("type"), own.get("severity"), own.get("description")
        if type(severity) is not str or severity not in SEVERITIES:
            return None, "answered a violation whose severity is not one of " + ", ".join(SEVERITIES)
        if type(vtype) is not str or type(description) is not str:
            return None, "answered a violation whose type or description is not a string"
        description = _masked(clean_text(description, MAX_DESCRIPTION))
        if vtype not in VIOLATION_TYPES:
            description = clean_text(f"{_masked(clean_text(vtype, 64))}: {description}", MAX_DESCRIPTION)
            vtype = "other"
        description = _withheld(description)
        violations.append(Violation(vtype, severity, description))
    details = fields.get("details")
    return (
        CheckResult(
            violations=violations,
            risk_score=float(risk),  # type: ignore[arg-type]
            server_ms=None if server_ms is None else float(server_ms),
            network_ms=None if network_ms is None else float(network_ms),
            details=details if type(details) is dict else None,
        ),
        None,
    )


# builds that outlived the build time limit, by check: while one still runs, the check is not built again (a hung
# constructor would otherwise leave one more thread behind at every retry)
_HUNG_BUILDS: dict[str, threading.Thread] = {}
_HUNG_LOCK = threading.Lock()


def _build_check(check: CheckConfig, context: BuildContext, limit: float) -> Guardrail:
    """Build one check on a thread of its own within ``limit`` seconds. A constructor that hangs, raises anything
    (SystemExit and KeyboardInterrupt included) or cannot be built is a one-line UsageError naming the check; a
    configuration error (an entry point not installed) stays the ConfigError it is. A hung build's thread is left
    running (Python cannot stop a thread): a daemon, it does not keep the process alive."""
    module = kind_module(check.kind, source=check.source, where=check.where)
    what = f"{check.source}: {check.where} ({check.kind} check {check.name!r}) cannot be built"
    key = repr(check)  # what the check is (kind, stages, options …): a changed check is built afresh
    with _HUNG_LOCK:
        earlier = _HUNG_BUILDS.get(key)
        if earlier is not None and earlier.is_alive():  # a service retries a failed build at every run: one thread
            raise UsageError(
                f"{what}: an earlier build of it is still running past the build time limit (change the check, or "
                "restart the process to build it again)"
            )
        _HUNG_BUILDS.pop(key, None)
    box: dict[str, Any] = {}

    def build() -> None:
        try:
            box["value"] = module.build(check, context)
        except BaseException as exc:  # whatever a constructor does is said as this check's error
            box["error"] = exc

    thread = threading.Thread(target=build, name=f"guardrail-build-{check.name}", daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        with _HUNG_LOCK:
            _HUNG_BUILDS[key] = thread
        raise UsageError(f"{what}: not built within the {limit:g} s build time limit (build_time_limit)")
    if "error" in box:
        exc = box["error"]
        if isinstance(exc, (ConfigError, UsageError)):
            raise exc
        if isinstance(exc, (GuardrailError, OSError, ValueError, RuntimeError, ImportError)):
            why = _safe_str(exc) or type(exc).__name__
        else:  # SystemExit, KeyboardInterrupt, a TypeError in a constructor …: said by its type
            why = f"it raised {type(exc).__name__}"
        raise UsageError(f"{what}: {clean_text(why, MAX_ERROR)}") from None
    return box["value"]  # type: ignore[no-any-return]


def _safe_str(exc: BaseException) -> str:
    """An exception's message, or its type's name when even that raises."""
    try:
        text = str(exc)
        return text if type(text) is str else type(exc).__name__
    except BaseException:  # a __str__ that raises: the type says enough
        return type(exc).__name__


class GuardrailSet:
    """The built checks of one set, each with its own worker thread."""

    def __init__(self, config: SetConfig, checks: list[_Check]) -> None:
        self.config = config
        self._checks = checks
        self._closed = False

    @classmethod
    def build(cls, config: SetConfig, context: BuildContext) -> GuardrailSet:
        """Build every check (a judge loads its model here), each within the set's build time limit. A check that
        cannot be built (or hangs, or exits) is a UsageError naming it; the checks built before it are closed."""
        built: list[_Check] = []
        try:
            for check in config.checks:
                guardrail = _build_check(check, context, config.build_time_limit_s)
                built.append(_Check(check, guardrail, _Worker(check.name)))
        except BaseException:
            cls(config, built).close()
            raise
        return cls(config, built)

    def checks_at(self, stage: str) -> list[_Check]:
        return [c for c in self._checks if stage in c.stages]

    @property
    def checks(self) -> list[CheckConfig]:
        return [c.config for c in self._checks]

    def stray_checks(self) -> int:
        """Checks still running a call that outlived its time limit (this set's, or left by a set closed before),
        at most 16."""
        return min(stray_workers(), MAX_STRAY)

    def close(self) -> None:
        """Close every check, each within the time limit. A check still running a call past its time limit is asked
        to stop (a judge's abort, then its close on a thread of its own, which a plugin may use to end its call);
        each worker thread ends once its call returns. A call that never returns keeps its (daemon) thread: Python
        cannot stop a thread."""
        if self._closed:
            return
        self._closed = True
        limit = self.config.time_limit_s
        for check in self._checks:
            close = getattr(check.guardrail, "close", None)
            if check.worker.busy:
                abort = getattr(check.guardrail, "abort", None)
                if callable(abort):
                    with contextlib.suppress(BaseException):  # a check that cannot stop stays a stray
                        abort()
                if callable(close):  # beside the hung call: a plugin's close may end it
                    threading.Thread(target=_quietly, args=(close,), name="guardrail-close", daemon=True).start()
            elif callable(close):
                check.worker.call(_quietly, close, limit)
            check.worker.stop()
        for check in self._checks:  # the threads whose call returned end now
            check.worker.join(ABORT_WAIT_S if check.worker.busy else limit)

    def run_check(self, check: _Check, stage: str, text: str, answer: _Answer) -> CheckResult | None:
        """Call one check at one stage; its answer (or error) is added to ``answer``. Whatever the check answers or
        raises, and whatever goes wrong checking its answer, is an error of the stage naming the check."""
        label = f"{check.config.kind} check {check.config.name!r}"
        try:
            return self._run_check(check, stage, text, answer, label)
        except BaseException as exc:  # an answer that broke its own checking: said by the exception's type
            answer.error = clean_text(f"{label}: its answer could not be checked ({type(exc).__name__})", MAX_ERROR)
            return None

    def _run_check(self, check: _Check, stage: str, text: str, answer: _Answer, label: str) -> CheckResult | None:
        limit = self.config.time_limit_s
        if check.worker.busy:
            answer.error = f"{label} is still running a call that outlived the {limit:g} s time limit"
            return None
        method = getattr(check.guardrail, STAGE_METHODS[stage], None)
        if method is None:
            answer.error = f"{label} has no {STAGE_METHODS[stage]} for the {stage} stage"
            return None
        start = time.perf_counter_ns()
        box, finished = check.worker.call(method, text, limit)
        if not finished:
            check.worker.timed_out = True
            answer.error = f"{label} did not answer within the {limit:g} s time limit"
            abort = getattr(check.guardrail, "abort", None)
            if callable(abort):  # a judge stops its evaluation (llama.cpp's abort) and its thread is free again
                with contextlib.suppress(Exception):  # a check that cannot stop stays busy, and says so
                    abort()
                    check.worker.wait_idle(ABORT_WAIT_S)
            answer.ms += (time.perf_counter_ns() - start) / 1e6  # the stage waited this long, stopping included
            return None
        answer.ms += box["ns"] / 1e6
        if "error" in box:
            exc = box["error"]
            # our own kinds' errors say what went wrong in their words; anyone else's message (a plugin's, even as a
            # GuardrailError) may quote the text
            own = type(exc) is GuardrailError and check.config.kind != "plugin" and box.get("text")
            what = box["text"] if own else type(exc).__name__
            answer.error = clean_text(f"{label} failed: {what}", MAX_ERROR)
            return None
        result, why = validate_result(box.get("value"))
        if result is None:
            answer.error = clean_text(f"{label} {why}", MAX_ERROR)
            return None
        answer.add(result)
        return result

    def blocks(self, check: CheckConfig, violation: Violation) -> bool:
        return check.action == "block" and severity_rank(violation.severity) >= severity_rank(self.config.block_at)


@dataclass
class _StageRun:
    name: str
    start_ms: float
    ms: float = 0.0
    answers: list[_Answer] = field(default_factory=list)
    chunks: list[float] | None = None  # output in stream mode: each chunk's ms

    @property
    def error(self) -> str | None:
        return next((a.error for a in self.answers if a.error), None)

    @property
    def risk_score(self) -> float:
        return max((a.risk_score for a in self.answers), default=0.0)

    def entry(self, mode: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "start_ms": _ms(self.start_ms),
            "ms": _ms(self.ms),
            "risk_score": self.risk_score,
            "error": self.error,
            "checks": [a.entry() for a in self.answers],
        }
        if mode is not None:
            chunks = self.chunks or []
            out["mode"] = mode
            if mode == "stream":
                out["chunks"] = min(len(chunks), 1_000_000)
                out["chunk_ms_p50"] = _ms(_median(chunks)) if chunks else None
                out["chunk_ms_max"] = _ms(max(chunks)) if chunks else None
        return out


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def stream_windows(text: str, chunk: int) -> list[str]:
    """The output replayed in chunks of ``chunk`` characters; each call sees its chunk plus the ``chunk``
    characters before it (a match across a boundary is still seen). An empty output is one empty chunk."""
    if not text:
        return [""]
    return [text[max(0, i - chunk) : i + chunk] for i in range(0, len(text), chunk)]


class GuardedStrategy:
    """A strategy (agent/strategies/base.py) with a guardrail set around it."""

    def __init__(self, inner: Strategy, guardrails: GuardrailSet) -> None:
        self.inner = inner
        self.guardrails = guardrails
        self.name = inner.name
        inner_after = getattr(inner, "after", None)
        self.after: Callable[[Measurement, str, int], None] | None = None
        if inner_after is not None:

            def after(record: Measurement, text: str, max_tokens: int) -> None:
                # speculative's greedy check compares the served output: nothing to compare when none was served
                if record.ok and record.kind != "blocked" and record.output_text is not None:
                    inner_after(record, text, max_tokens)

            self.after = after

    def _stage(self, stage: str, text: str, t0: int) -> tuple[_StageRun, bool]:
        """Run every check of ``stage`` on ``text``; (the stage, whether a violation blocks)."""
        gs = self.guardrails
        begin = time.perf_counter_ns()
        run = _StageRun(stage, (begin - t0) / 1e6)
        checks = gs.checks_at(stage)
        answers = {c.config.name: _Answer(c.config.name, c.config.kind) for c in checks}
        run.answers = list(answers.values())
        blocked = False
        windows = [text]
        if stage == "output" and gs.config.output_mode == "stream":
            windows = stream_windows(text, gs.config.stream_chunk)
            run.chunks = []
        for window in windows:
            chunk_start = time.perf_counter_ns()
            for check in checks:
                answer = answers[check.config.name]
                if answer.error is not None:
                    continue  # a check that failed on an earlier chunk is not asked again
                result = gs.run_check(check, stage, window, answer)
                if result is not None and any(gs.blocks(check.config, v) for v in result.violations):
                    blocked = True
            if run.chunks is not None:
                run.chunks.append((time.perf_counter_ns() - chunk_start) / 1e6)
            if blocked or (run.error is not None and gs.config.on_error == "error"):
                break  # a streamed output stops at the chunk that blocks (or fails)
        run.ms = (time.perf_counter_ns() - begin) / 1e6
        return run, blocked

    def measure(self, record: Measurement, text: str, max_tokens: int, *, user_text: str | None = None) -> Window:
        gs = self.guardrails
        prompt = text if user_text is None else user_text
        t0 = time.perf_counter_ns()
        record.started_at = utc_now_iso()
        stages: list[_StageRun] = []
        blocked_at: str | None = None
        failed: _StageRun | None = None
        window: Window = None
        inference_ms: float | None = None
        inference_start_ms: float | None = None
        for stage in ("input", "threat"):
            if not gs.checks_at(stage):
                continue
            run, blocked = self._stage(stage, prompt, t0)
            stages.append(run)
            if blocked:
                blocked_at = stage
                break
            if run.error is not None and gs.config.on_error == "error":
                failed = run
                break
        stray = 0
        if blocked_at is None and failed is None:
            stray = gs.stray_checks()
            begin = time.perf_counter_ns()
            window = self.inner.measure(record, text, max_tokens)
            end = time.perf_counter_ns()
            stray = max(stray, gs.stray_checks())  # a check that timed out beside it shared its CPU
            inference_ms, inference_start_ms = (end - begin) / 1e6, (begin - t0) / 1e6
            if record.ok and gs.checks_at("output"):
                run, blocked = self._stage("output", record.output_text or "", t0)
                stages.append(run)
                if blocked:
                    blocked_at = "output"
                elif run.error is not None and gs.config.on_error == "error":
                    failed = run
        total_ms = (time.perf_counter_ns() - t0) / 1e6
        if blocked_at is not None:
            if record.kind == "inference":
                record.kind = "blocked"
            record.output_text = None  # withheld (a block before the inference never produced one)
            outcome = "blocked"
        elif failed is not None:
            check = next(a for a in failed.answers if a.error)
            record.ok = False
            record.error_type = "guardrail_error"
            record.error_message = clean_text(f"guardrail {failed.name} stage: {check.error}", MAX_ERROR)
            record.output_text = None  # not served
            outcome = "error"
        elif any(s.error for s in stages):
            outcome = "passed_with_errors"
        else:
            outcome = "passed"
        record.ext["guardrails"] = self._record(stages, outcome, blocked_at, total_ms, inference_ms, inference_start_ms)
        if stray:
            record.ext["guardrails"]["stray_checks"] = stray
        return window

    def _record(
        self,
        stages: list[_StageRun],
        outcome: str,
        blocked_at: str | None,
        total_ms: float,
        inference_ms: float | None,
        inference_start_ms: float | None,
    ) -> dict[str, Any]:
        gs = self.guardrails
        overhead = sum(s.ms for s in stages)
        remainder = max(0.0, total_ms - overhead - (inference_ms or 0.0))
        risk = max((s.risk_score for s in stages), default=0.0)
        violations: list[dict[str, Any]] = []
        by_name = {c.name: c for c in gs.checks}
        for stage in stages:
            for answer in stage.answers:
                for v in answer.violations:
                    if len(violations) < MAX_VIOLATIONS:
                        violations.append(
                            {
                                "type": v.type,
                                "severity": v.severity,
                                "blocked": gs.blocks(by_name[answer.name], v),
                                "stage": stage.name,
                                "check": answer.name,
                                "description": v.description,
                            }
                        )
        mode = gs.config.output_mode
        return {
            "set": gs.config.name,
            "outcome": outcome,
            "blocked_at": blocked_at,
            "total_ms": _ms(total_ms),
            "inference_ms": None if inference_ms is None else _ms(inference_ms),
            "inference_start_ms": None if inference_start_ms is None else _ms(inference_start_ms),
            "overhead_ms": _ms(overhead),
            "remainder_ms": _ms(remainder),
            "impact_percent": min(100.0, overhead / total_ms * 100) if total_ms > 0 else None,
            "risk_score": risk,
            "risk_level": risk_level(risk),
            "stages": {s.name: s.entry(mode if s.name == "output" else None) for s in stages},
            "violations": violations,
        }
