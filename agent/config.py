"""The agent's configuration: every key of every section, declared once with its parser and default.

Loaded by :func:`lens_core.config.load_config` (TOML file < ``LENS_<SECTION>_<KEY>`` environment < command-line
flags). A bad value raises :class:`~lens_core.errors.ConfigError` naming where it came from (file, environment
variable or flag), the key and what is allowed. Secrets never live in the TOML: the file names a secret file
(``token_file``) and the environment may carry the secret itself (``LENS_SYNC_TOKEN``).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_core import config as core
from lens_core.config import (
    AGGREGATOR_SECTIONS,
    Config,
    Invalid,
    KeySpec,
    Schema,
    boolean,
    choice,
    const,
    duration_or_zero,
    int_range,
    json_object,
    number_range,
    optional,
    parse_duration,
    parse_size,
    path_value,
    text,
)
from lens_core.errors import ConfigError
from lens_core.otlp_config import OTLP_SECTION
from lens_core.settings import BOUNDS

from .probes.interference import Thresholds

if TYPE_CHECKING:
    from .guardrails.pipeline import SetConfig

DEFAULT_CONFIG_PATH = Path("/etc/lens-agent/agent.toml")
_THRESHOLDS = Thresholds()  # the [interference] defaults, calibrated in docs/interference.md


def power_sources(value: object) -> str | list[str]:
    """``auto``, ``none``, one source, or a list (TOML list or comma-separated) of sources."""
    from .probes.power import ALL_SOURCES

    allowed = "auto, none, or one or more of " + ", ".join(ALL_SOURCES)
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise Invalid(allowed)
    if items in (["auto"], ["none"]):
        return items[0]
    if not items or any(v not in ALL_SOURCES for v in items):
        raise Invalid(allowed)
    return items


def int_list(minimum: int, maximum: int) -> Callable[[object], list[int]]:
    """A list of integers (TOML array, or comma-separated from the environment), each in the range."""
    allowed = f"a list of integers between {minimum} and {maximum}, e.g. [1, 2, 4]"
    item = int_range(minimum, maximum)

    def parse(value: object) -> list[int]:
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise Invalid(allowed)
        try:
            return sorted({item(v) for v in items})
        except Invalid:
            raise Invalid(allowed) from None

    return parse


def path_list(value: object) -> list[Path]:
    """A TOML list of paths (or one path)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v.strip() for v in items):
        raise Invalid('a list of directory paths, e.g. ["/etc/lens-agent/datasets"]')
    return [path_value(v) for v in items]


def origin_list(value: object) -> list[str]:
    """A TOML list (or comma-separated from the environment) of origins ``scheme://host[:port]``, normalised
    (lower case, no default port)."""
    from lens_core.suite import url_origin

    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise Invalid('a list of origins, e.g. ["http://10.0.0.5:8000", "https://api.example.com"]')
    out: list[str] = []
    for item in items:
        parts = item.strip()
        try:
            origin = url_origin(parts)
        except ValueError:
            raise Invalid(
                f"an origin scheme://host[:port] (http or https, no user:password@), not {item[:80]!r}"
            ) from None
        rest = parts.split("://", 1)[1]
        if "/" in rest.rstrip("/") or "?" in rest or "#" in rest:
            raise Invalid(f"an origin scheme://host[:port] without a path, query or fragment, not {item[:80]!r}")
        if origin not in out:
            out.append(origin)
    return out


MAX_TAGS = 16
MAX_TAG_CHARS = 64


def tag_list(value: object) -> list[str]:
    """Device tags: a TOML list (or comma-separated from the environment) of at most 16 distinct tags, each 1–64
    characters of letters, digits, ``.``, ``_`` and ``-``."""
    import re

    allowed = f'a list of at most {MAX_TAGS} tags of 1-{MAX_TAG_CHARS} characters [A-Za-z0-9._-], e.g. ["lab-a"]'
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > MAX_TAGS:
        raise Invalid(allowed)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str) or re.fullmatch(rf"[A-Za-z0-9._-]{{1,{MAX_TAG_CHARS}}}", item) is None:
            raise Invalid(allowed)
        if item not in out:
            out.append(item)
    return out


def bool_list(value: object) -> list[bool]:
    """A list of booleans (TOML array, or comma-separated from the environment)."""
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise Invalid("a list of true/false, e.g. [true, false]")
    try:
        return sorted({boolean(v) for v in items}, reverse=True)
    except Invalid:
        raise Invalid("a list of true/false, e.g. [true, false]") from None


def cron_expression(value: object) -> str:
    allowed = "a crontab expression with five fields, e.g. '*/15 * * * *'"
    if not isinstance(value, str):
        raise Invalid(allowed)
    from .schedule import crontab_trigger  # what the service schedules with (crontab's weekday numbers)

    try:
        crontab_trigger(value)
    except ValueError as exc:
        raise Invalid(f"{allowed} ({exc})") from None
    return value


def _default_threads() -> int:
    import psutil

    # llama.cpp decodes fastest with one thread per physical core.
    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


SCHEMA: Schema = {
    "agent": {
        "device_id": KeySpec(text, socket.gethostname, "identifies this device; default: the host name"),
        "data_dir": KeySpec(path_value, const(Path("/var/lib/lens-agent")), "outbox and state"),
        "tags": KeySpec(
            tag_list,
            list,
            "labels sent in the device facts (ext.device.tags); campaigns can target devices by tag",
        ),
    },
    "model": {
        "path": KeySpec(optional(path_value), const(None), "GGUF model; default: the bundled SmolLM2"),
        "n_threads": KeySpec(
            int_range(*BOUNDS["n_threads"]), _default_threads, "decode threads; default: physical cores"
        ),
        "n_ctx": KeySpec(int_range(*BOUNDS["n_ctx"]), const(2048), "context size in tokens"),
        "n_batch": KeySpec(int_range(*BOUNDS["n_batch"]), const(512), "prompt tokens per llama_decode call"),
        "n_gpu_layers": KeySpec(int_range(*BOUNDS["n_gpu_layers"]), const(0), "layers offloaded to a GPU (-1: all)"),
        "flash_attn": KeySpec(boolean, const(True), "flash attention (faster decode on CPU too)"),
    },
    "bench": {
        "prompts": KeySpec(optional(path_value), const(None), "prompt file (.txt or .jsonl)"),
        "runs": KeySpec(int_range(1), const(10), "measured requests"),
        "warmup": KeySpec(int_range(0), const(1), "warm-up requests, not counted"),
        "max_tokens": KeySpec(int_range(1), const(128), "output tokens per request at most"),
        "ignore_eos": KeySpec(boolean, const(False), "keep generating past end-of-sequence"),
        "chat_template": KeySpec(choice("auto", "on", "off"), const("auto"), "wrap prompts in it"),
        "reuse_cache": KeySpec(boolean, const(False), "keep the KV cache between requests"),
        "max_error_rate": KeySpec(
            number_range(0, 1), const(1.0), "bench exits 1 above this share of failed requests (always when all fail)"
        ),
    },
    "sync": {
        "url": KeySpec(optional(text), const(None), "aggregator base URL"),
        "ca_file": KeySpec(optional(path_value), const(None), "CA bundle for the aggregator"),
        "token_file": KeySpec(optional(path_value), const(None), "device token file"),
        "interval": KeySpec(parse_duration, const(60.0), "seconds between syncs"),
        "batch_size": KeySpec(int_range(1, 100000), const(500), "records per batch at most"),
        "max_batch_bytes": KeySpec(parse_size, const(4 * 1024**2), "compressed batch size at most"),
        "codec": KeySpec(choice("cbor", "msgpack"), const("cbor"), "record encoding"),
        "compression": KeySpec(choice("zstd", "none"), const("zstd"), "batch compression"),
        "sync_on_network_available": KeySpec(boolean, const(True), "sync when the aggregator returns"),
        "max_outbox_bytes": KeySpec(parse_size, const(256 * 1024**2), "outbox bound"),
        "zstd_level": KeySpec(int_range(1, 22), const(3), "zstd compression level"),
        "timeout": KeySpec(parse_duration, const(30.0), "HTTP request timeout"),
        "backoff_initial": KeySpec(parse_duration, const(1.0), "first retry delay"),
        "backoff_max": KeySpec(parse_duration, const(300.0), "retry delay cap"),
        "include_text": KeySpec(boolean, const(False), "upload prompt and output text (privacy: off)"),
        "allow_http": KeySpec(boolean, const(False), "allow a plain-HTTP aggregator URL"),
    },
    "probes": {
        "sysfs_root": KeySpec(path_value, const(Path("/")), "the filesystem root probes read (stands for /)"),
        "power_source": KeySpec(power_sources, const("auto"), "auto, none, or sources to use"),
        "sample_rate_hz": KeySpec(number_range(0.1, 1000), const(10.0), "power samples per second"),
        "idle_baseline": KeySpec(duration_or_zero, const(2.0), "idle power measured before a run (0: none)"),
    },
    "cloud": {
        "url": KeySpec(optional(text), const(None), "OpenAI-compatible base URL, e.g. http://host:8000/v1"),
        "model": KeySpec(optional(text), const(None), "model name sent to the endpoint (default: its first)"),
        "api_key_file": KeySpec(optional(path_value), const(None), "file holding the API key (or LENS_CLOUD_API_KEY)"),
        "timeout": KeySpec(parse_duration, const(60.0), "one cloud request"),
        "api": KeySpec(
            choice("auto", "chat", "completions"),
            const("auto"),
            "cloud strategy: /v1/chat/completions (chat) or /v1/completions; auto: chat for a chat model "
            "(the server's chat template, else a model name with instruct/chat/-it)",
        ),
        "chat": KeySpec(boolean, const(False), "older spelling of api: true is api = chat, false api = completions"),
        # llama-cpp-python's server applies repeat_penalty 1.1 by default, which makes temperature 0 not greedy
        "extra": KeySpec(json_object, const({"repeat_penalty": 1.0}), "extra request fields for every cloud call"),
    },
    "collab": {
        "strategy": KeySpec(choice("local", "cloud", "speculative", "offload"), const("local"), "how requests run"),
        "verify": KeySpec(
            choice("auto", "tokens", "generate", "logprobs"),
            const("auto"),
            "speculative verification: tokens (llama-server's token-id API, lossless), generate or logprobs (text); "
            "auto: tokens when the endpoint answers the token-id API, else generate",
        ),
        "draft_tokens": KeySpec(
            int_range(*BOUNDS["draft_tokens"]), const(4), "tokens the local model drafts per round"
        ),
        "adaptive_draft": KeySpec(boolean, const(False), "adapt the draft length to the observed acceptance"),
        "baselines": KeySpec(boolean, const(False), "also run cloud-only and edge-only for speedup figures"),
    },
    "offload": {
        "prompt_tokens_above": KeySpec(
            optional(int_range(*BOUNDS["offload_prompt_tokens_above"])), const(None), "offload prompts longer than this"
        ),
        "predict_latency": KeySpec(boolean, const(True), "offload when predicted local latency > cloud latency"),
        "battery_below": KeySpec(optional(int_range(0, 100)), const(None), "offload when the battery is below this %"),
        "on_battery": KeySpec(boolean, const(False), "offload whenever the device is not on AC power"),
        "shadow_fraction": KeySpec(number_range(0, 1), const(0.0), "share of requests run both ways to check"),
    },
    "service": {
        "heartbeat_interval": KeySpec(parse_duration, const(10.0), "heartbeat file and watchdog ping period"),
        "housekeeping_interval": KeySpec(parse_duration, const(3600.0), "outbox checkpoint and vacuum period"),
        "final_sync_timeout": KeySpec(duration_or_zero, const(5.0), "last upload attempt on shutdown (0: none)"),
    },
    "gates": {
        "min_battery_percent": KeySpec(optional(int_range(0, 100)), const(None), "skip runs on battery below this"),
        "skip_when_throttled": KeySpec(boolean, const(True), "skip runs while a thermal zone is past its trip point"),
        "max_load_per_core": KeySpec(
            optional(number_range(0, 1000)),
            const(None),
            "skip runs when the 1-min load average per core is above this (the device is busy with its real work)",
        ),
    },
    # what else uses the device during a run, and when a request counts as contended (docs/interference.md)
    "interference": {
        "enabled": KeySpec(boolean, const(True), "sample other processes' CPU, pressure, memory, clocks and heat"),
        "sample_rate_hz": KeySpec(
            number_range(0.1, 50), const(2.0), "background samples per second (plus one before and after each request)"
        ),
        "other_cpu_cores": KeySpec(
            number_range(0, 1024),
            const(_THRESHOLDS.other_cpu_cores),
            "cpu: other processes used at least this many cores beyond the ones the run leaves free",
        ),
        "cpu_pressure_pct": KeySpec(
            number_range(0, 100),
            const(_THRESHOLDS.cpu_pressure_pct),
            "cpu_pressure: PSI cpu some at least this % of the request's time",
        ),
        "memory_pressure_pct": KeySpec(
            number_range(0, 100),
            const(_THRESHOLDS.memory_pressure_pct),
            "memory: PSI memory some at least this % of the request's time",
        ),
        "mem_available_pct": KeySpec(
            number_range(0, 100),
            const(_THRESHOLDS.mem_available_pct),
            "memory: available memory below this % of the limit that applies (cgroup limit, else MemTotal)",
        ),
        "swap_pages_per_s": KeySpec(
            number_range(0, 1e9),
            const(_THRESHOLDS.swap_pages_per_s),
            "swap: at least this many pages swapped in + out per second",
        ),
        "io_pressure_pct": KeySpec(
            number_range(0, 100),
            const(_THRESHOLDS.io_pressure_pct),
            "io: PSI io some at least this % of the request's time",
        ),
        "freq_ratio": KeySpec(
            number_range(0, 1),  # a clock at its maximum is 1: a higher bar would flag every request
            const(_THRESHOLDS.freq_ratio),
            "frequency: CPU clock (or GPU clock, with GPU layers) below this share of its maximum",
        ),
    },
    "outbox": {
        "synchronous": KeySpec(choice("FULL", "NORMAL"), const("FULL"), "SQLite durability per append"),
        "policy": KeySpec(choice("drop_oldest", "drop_newest"), const("drop_oldest"), "when the outbox is full"),
        "busy_timeout": KeySpec(parse_duration, const(10.0), "wait this long for another process's lock"),
        "max_quarantine_bytes": KeySpec(parse_size, const(16 * 1024**2), "quarantine bound; evictions are counted"),
        "disk_reserve": KeySpec(
            optional(parse_size), const(None), "space kept free for deletes on a full disk (default: bound / 32)"
        ),
    },
    # A standalone device (no sync.url) exports its outbox to an OTLP backend instead (docs/opentelemetry.md).
    "otlp": OTLP_SECTION,
    # benchmark suites (seed §2.3): what a suite document may ask of this device (docs/suites.md)
    "suite": {
        "dataset_dirs": KeySpec(
            path_list,
            lambda: [Path("/etc/lens-agent/datasets"), Path("/usr/share/lens-agent/prompts")],
            "a suite's input_dataset must be a file inside one of these directories (the data directory's "
            "datasets/ is always allowed)",
        ),
        "credentials_dirs": KeySpec(
            path_list,
            lambda: [Path("/etc/lens-agent/credentials")],
            "a suite's auth.credentials_path must be a file inside one of these directories (the data "
            "directory's credentials/ is always allowed)",
        ),
        "model_dirs": KeySpec(
            path_list,
            lambda: [Path("/var/lib/lens-agent/models"), Path("/usr/share/lens-agent/models")],
            "a suite's file:// and gguf:NAME models must be inside one of these directories (the configured "
            "model.path's directory, the suite file's own directory and the bundled SmolLM2 are always allowed); "
            "add yours here to run a model kept elsewhere",
        ),
        "endpoints": KeySpec(
            origin_list,
            list,
            "the origins (scheme://host[:port]) an endpoint model of a suite that arrived from a server (a "
            "campaign) may contact; empty (the default): such a suite may use local models only. A suite the "
            "operator gave (--suite, [bench] suite) is not restricted by it",
        ),
        "max_concurrency": KeySpec(int_range(1, 1024), const(64), "a workload's concurrency at most"),
        "max_rate": KeySpec(number_range(0.001, 10000.0), const(500.0), "a workload's request rate at most (req/s)"),
        "max_duration": KeySpec(
            parse_duration,
            const(6 * 3600.0),
            "a workload level's duration at most: every level stops sending there, with or without duration_seconds",
        ),
        "max_requests": KeySpec(int_range(1, 1_000_000), const(100_000), "a workload level's requests at most"),
        "max_output_tokens": KeySpec(int_range(1, 1 << 20), const(4096), "a workload's output_token_target at most"),
    },
    # lens-agent tune: a bounded search over engine settings, applied through a drop-in and verified
    # (docs/tuning.md)
    "tune": {
        "n_threads": KeySpec(
            optional(int_list(*BOUNDS["n_threads"])),
            const(None),
            "thread counts to try; default: 1, half and all physical cores",
        ),
        "flash_attn": KeySpec(optional(bool_list), const([True, False]), "flash attention values to try"),
        "n_batch": KeySpec(
            optional(int_list(*BOUNDS["n_batch"])), const(None), "batch sizes to try; default: the current"
        ),
        "n_gpu_layers": KeySpec(
            optional(int_list(*BOUNDS["n_gpu_layers"])), const(None), "GPU layer counts to try; default: the current"
        ),
        "search": KeySpec(
            choice("coordinate", "grid"),
            const("coordinate"),
            "coordinate: one setting at a time, keeping each winner; grid: every combination (max_candidates)",
        ),
        "max_candidates": KeySpec(int_range(2, 64), const(12), "settings measured in one grid search at most"),
        "objective": KeySpec(
            choice("e2e", "tpot", "ttft"), const("e2e"), "what is made faster: request latency, decode or prefill"
        ),
        "prompts": KeySpec(optional(path_value), const(None), "prompt file; default: the first workload's"),
        "requests": KeySpec(int_range(1, 1000), const(4), "measured requests per candidate per round"),
        "rounds": KeySpec(int_range(1, 100), const(3), "rounds, each candidate once per round in a shuffled order"),
        "warmup": KeySpec(int_range(0, 100), const(1), "warm-up requests after each load, not counted"),
        "max_tokens": KeySpec(int_range(1, 100000), const(32), "output tokens per request (always generated)"),
        "alpha": KeySpec(
            number_range(1e-9, 0.5), const(0.01), "significance level of the Mann-Whitney test (Bonferroni-split)"
        ),
        "min_improvement": KeySpec(number_range(0, 1), const(0.03), "a winner is at least this much better"),
        "verify_runs": KeySpec(int_range(1, 100), const(3), "scheduled runs that verify an applied change"),
        "rollback_threshold": KeySpec(
            number_range(0, 1), const(0.05), "roll back when the verified median is more than this much worse"
        ),
        "candidate_timeout": KeySpec(
            parse_duration, const(600.0), "one candidate's block in its measuring process, at most (then it is killed)"
        ),
        "recommendation_interval": KeySpec(
            parse_duration,
            const(6 * 3600.0),
            "lens-agent run tunes on a recommendation at most once per this interval, whatever its id",
        ),
        "every": KeySpec(optional(parse_duration), const(None), "tune on this interval in lens-agent run (or cron)"),
        "cron": KeySpec(optional(cron_expression), const(None), "tune on this crontab schedule in lens-agent run"),
        "auto_apply": KeySpec(
            boolean,
            const(False),
            "lens-agent run applies a scheduled tune's winner, and tunes a recommendation that arrives with a "
            "sync answer; false: it only records what it found",
        ),
        "allow_contended": KeySpec(
            boolean,
            const(False),
            "decide (and apply) even when other work contended more than a quarter of a stage's requests "
            "(docs/tuning.md); false: such a tune decides nothing",
        ),
    },
}

DROP_IN_KEYS: dict[str, tuple[str, ...]] = {"model": ("n_threads", "n_batch", "n_gpu_layers", "flash_attn")}


def drop_in_path(data_dir: Path) -> Path:
    """The drop-in ``lens-agent tune`` writes: read after the config file, before the environment."""
    return Path(data_dir) / "tune" / "settings.toml"


WORKLOAD_SCHEMA: dict[str, KeySpec] = {
    "name": KeySpec(text, const(None), "shown in status and recorded with every measurement"),
    "prompts": KeySpec(optional(path_value), const(None), "prompt file; default: the built-in set"),
    "suite": KeySpec(
        optional(path_value),
        const(None),
        "a benchmark suite (.json or .yaml, docs/suites.md) run instead of prompts/requests/strategy",
    ),
    "strategy": KeySpec(
        optional(choice("local", "cloud", "speculative", "offload")), const(None), "default: collab.strategy"
    ),
    "requests": KeySpec(int_range(1, 10000), const(3), "measured requests per run"),
    "warmup": KeySpec(int_range(0, 1000), const(0), "warm-up requests per run (the model stays loaded)"),
    "max_tokens": KeySpec(int_range(1), const(128), "output tokens per request at most"),
    "ignore_eos": KeySpec(boolean, const(False), "always generate max_tokens"),
    "every": KeySpec(optional(parse_duration), const(None), "run at this interval (or cron)"),
    "cron": KeySpec(optional(cron_expression), const(None), "run on this crontab schedule (or every)"),
    "jitter": KeySpec(
        duration_or_zero, const(30.0), "random delay added to each run, so a fleet does not fire at once"
    ),
    "guardrails": KeySpec(
        optional(text),
        const(None),
        "a guardrail set ([[guardrails]] name, or the built-in rules / empty) timed around every request "
        "(docs/guardrails.md)",
    ),
}
DEFAULT_WORKLOAD = {"name": "default", "every": "15m"}


def _check_workloads(source: str, raw: object) -> list[dict[str, Any]]:
    if raw is None:  # no [[workloads]]: the default one
        raw = [DEFAULT_WORKLOAD]
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ConfigError(source, "workloads", raw, "an array of tables: [[workloads]]")
    out = []
    for n, item in enumerate(raw):
        where = f"workloads[{n}]"
        values: dict[str, Any] = {}
        for key, value in item.items():
            if key not in WORKLOAD_SCHEMA:
                raise ConfigError(source, f"{where}.{key}", value, "a known key: " + ", ".join(WORKLOAD_SCHEMA))
            try:
                values[key] = WORKLOAD_SCHEMA[key].parse(value)
            except Invalid as exc:
                raise ConfigError(source, f"{where}.{key}", value, str(exc)) from None
        for key, spec in WORKLOAD_SCHEMA.items():
            values.setdefault(key, spec.default())
        if (values["every"] is None) == (values["cron"] is None):
            raise ConfigError(source, where, item, 'exactly one of every (e.g. "15m") or cron')
        if values["suite"] is not None:
            clash = [
                k
                for k in ("prompts", "strategy", "requests", "warmup", "max_tokens", "ignore_eos", "guardrails")
                if k in item
            ]
            if clash:
                raise ConfigError(
                    source,
                    f"{where}.{clash[0]}",
                    item[clash[0]],
                    "nothing beside suite: a suite workload takes its models, prompts, requests and load from the "
                    "suite (remove " + ", ".join(clash) + ")",
                )
        values["name"] = values["name"] or f"workload-{n + 1}"
        out.append(values)
    names = [w["name"] for w in out]
    if len(set(names)) != len(names):
        raise ConfigError(source, "workloads", names, "distinct names")
    return out


@dataclass(frozen=True)
class AgentConfig(Config):
    """The agent's resolved configuration, with its ``[[workloads]]``. ``drop_in_refused``: why the tuning drop-in
    was left out (it failed the same checks as the file), or None."""

    drop_in_refused: str | None = None

    @property
    def workloads(self) -> list[dict[str, Any]]:
        workloads: list[dict[str, Any]] = self.tables["workloads"]
        return workloads

    @property
    def guardrails(self) -> tuple[SetConfig, ...]:
        """The ``[[guardrails]]`` sets (docs/guardrails.md), checked."""
        sets: tuple[SetConfig, ...] = self.tables.get("guardrails", ())
        return sets


def _check_guardrails(source: str, raw: object) -> tuple[SetConfig, ...]:
    if raw is None:  # no [[guardrails]]: the pipeline is not loaded at all
        return ()
    from .guardrails.pipeline import parse_sets  # the kinds' modules are imported only when a file has sets

    return parse_sets(source, raw)


def _check_workload_sets(source: str, workloads: list[dict[str, Any]], sets: tuple[SetConfig, ...]) -> None:
    """A workload's ``guardrails`` names a [[guardrails]] set or a built-in one."""
    if not sets and not any(workload.get("guardrails") is not None for workload in workloads):
        return  # nothing to check: the pipeline is not loaded
    from .guardrails.pipeline import BUILTIN_SETS

    names = [s.name for s in sets] + [b for b in BUILTIN_SETS if b not in {s.name for s in sets}]
    for n, workload in enumerate(workloads):
        name = workload.get("guardrails")
        if name is not None and name not in names:
            raise ConfigError(
                source,
                f"workloads[{n}].guardrails",
                name,
                "the name of a [[guardrails]] set or a built-in one: " + ", ".join(names),
            )


def load_config(
    path: Path | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str, str], tuple[str, object]] | None = None,
    default_path: Path = DEFAULT_CONFIG_PATH,
) -> AgentConfig:
    """The agent's configuration; ``path``: the ``--config`` file (must exist). See ``lens_core.config``."""

    def resolve(layers: list[tuple[Path, Mapping[str, tuple[str, ...]]]]) -> Config:
        return core.load_config(
            path,
            environ=environ,
            overrides=overrides,
            default_path=default_path,
            schema=SCHEMA,
            other_sections=AGGREGATOR_SECTIONS,
            tables={"guardrails": _check_guardrails, "workloads": _check_workloads},
            layers=layers,
        )

    resolved = resolve([])
    drop_in = drop_in_path(resolved.get("agent", "data_dir"))
    refused = None
    if (
        drop_in.exists()
    ):  # the settings lens-agent tune applied (docs/tuning.md): after the file, before the environment
        try:
            resolved = resolve([(drop_in, DROP_IN_KEYS)])
        except ConfigError as exc:
            # The file and the environment passed without it: the drop-in is what is wrong. A drop-in is the
            # device's own state, not the operator's file — it never stops the agent: it is left out (the service
            # sets it aside, agent.config.set_aside_drop_in) and every command says so.
            refused = str(exc)
    if (resolved.get("tune", "every") is not None) and (resolved.get("tune", "cron") is not None):
        raise ConfigError(
            resolved.source("tune", "cron"),
            "tune.cron",
            resolved.get("tune", "cron"),
            "either tune.every or tune.cron, not both",
        )
    _check_workload_sets(str(resolved.path), resolved.tables["workloads"], resolved.tables["guardrails"])
    return AgentConfig(
        values=resolved.values,
        sources=resolved.sources,
        path=resolved.path,
        tables=resolved.tables,
        drop_in_refused=refused,
    )


REFUSED_KEPT = 5  # set-aside drop-ins kept for an operator to look at


def set_aside_drop_in(data_dir: Path, reason: str) -> Path | None:
    """Move a refused drop-in out of the way (``settings.toml.refused-<UTC time>``, the reason beside it in
    ``….reason``) so that nothing reads or builds on it again; the latest :data:`REFUSED_KEPT` are kept. Returns the
    new path (None when there was nothing to move, or it cannot be moved: then it is still left out at every load)."""
    import time

    drop_in = drop_in_path(data_dir)
    target = drop_in.with_name(f"{drop_in.name}.refused-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    try:
        os.replace(drop_in, target)
    except OSError:  # gone already, or the folder is not writable: it is still left out at every load
        return None
    with contextlib.suppress(OSError):
        target.with_name(target.name + ".reason").write_text(reason + "\n")
    old = sorted(drop_in.parent.glob(f"{drop_in.name}.refused-*[!n]"))  # not the .reason files
    for path in old[:-REFUSED_KEPT]:
        for stale in (path, path.with_name(path.name + ".reason")):
            try:
                stale.unlink(missing_ok=True)
            except OSError:  # a directory (a drop-in that was one) or unwritable: kept, never a reason to stop
                continue
    return target
