"""Configuration: TOML file < ``LENS_<SECTION>_<KEY>`` environment < command-line flags.

Every key is declared once in ``SCHEMA`` with its parser and default. A bad value raises
:class:`~agent.errors.ConfigError` naming where it came from (file, environment variable or flag), the key
and what is allowed. Secrets never live in the TOML: the file names a secret file (``token_file``) and the
environment may carry the secret itself (``LENS_SYNC_TOKEN``).
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 (JetPack 6)
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/lens-agent/agent.toml")
ENV_PREFIX = "LENS_"

# Every LENS_* variable that is not a LENS_<SECTION>_<KEY> configuration key, in one place: anything else with the
# prefix that names no key is a mistake (a misspelling), refused like an unknown key in the TOML file.
NON_CONFIG_ENV: dict[str, str] = {
    "LENS_SYNC_TOKEN": "the device token itself (instead of sync.token_file)",
    "LENS_CLOUD_API_KEY": "the cloud endpoint's API key (instead of cloud.api_key_file)",
    "LENS_DEB_PYTHON": "packaging/build-deb.sh: the Python the .deb is built with",
    "LENS_DEB_CMAKE_ARGS": "packaging/build-deb.sh: extra CMake arguments for llama.cpp (e.g. CUDA)",
    "LENS_TEST_POSTGRES_URL": "tests: the PostgreSQL server the PostgreSQL tests use",
}
# The agent and the aggregator read one environment (a demo, a test, a small server running both): each accepts the
# other's sections. tests/test_config.py checks these against the aggregator's schema.
AGGREGATOR_SECTIONS = ("server", "storage", "auth")

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


class _Invalid(ValueError):
    """Raised by a parser; its text says what is allowed."""


def parse_duration(value: object) -> float:
    """``500ms``, ``60s``, ``5m``, ``2h`` or a plain number of seconds → seconds (float, > 0)."""
    allowed = "a duration such as 500ms, 60s, 5m, 2h (or a plain number of seconds), greater than 0"
    if isinstance(value, bool):
        raise _Invalid(allowed)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        stripped = value.strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", stripped):
            seconds = float(stripped)
        else:
            match = _DURATION_RE.match(value)
            if not match:
                raise _Invalid(allowed)
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise _Invalid(allowed)
    if seconds <= 0:
        raise _Invalid(allowed)
    return seconds


def parse_size(value: object) -> int:
    """``512KiB``, ``4MiB``, ``1GiB``, ``100B`` or a plain integer of bytes → bytes (int, > 0)."""
    allowed = "a size such as 512KiB, 4MiB, 1GiB (or a plain integer of bytes), greater than 0"
    if isinstance(value, bool):
        raise _Invalid(allowed)
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise _Invalid(allowed)
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    else:
        raise _Invalid(allowed)
    if size <= 0:
        raise _Invalid(allowed)
    return size


def duration_or_zero(value: object) -> float:
    """A duration, or 0 / "0s" to turn the thing off."""
    if value in (0, "0", "0s", "0ms"):
        return 0.0
    try:
        return parse_duration(value)
    except _Invalid:
        raise _Invalid("a duration such as 500ms, 2s (or 0 to turn it off)") from None


def number_range(minimum: float, maximum: float) -> Callable[[object], float]:
    allowed = f"a number between {minimum:g} and {maximum:g}"

    def parse(value: object) -> float:
        if isinstance(value, bool):
            raise _Invalid(allowed)
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise _Invalid(allowed) from None
        if not minimum <= number <= maximum:
            raise _Invalid(allowed)
        return number

    return parse


def power_sources(value: object) -> str | list[str]:
    """``auto``, ``none``, one source, or a list (TOML list or comma-separated) of sources."""
    from .probes.power import ALL_SOURCES

    allowed = "auto, none, or one or more of " + ", ".join(ALL_SOURCES)
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise _Invalid(allowed)
    if items in (["auto"], ["none"]):
        return items[0]
    if not items or any(v not in ALL_SOURCES for v in items):
        raise _Invalid(allowed)
    return items


def json_object(value: object) -> dict[str, Any]:
    """A TOML inline table, or (from the environment or a flag) a JSON object."""
    allowed = 'a table / JSON object, e.g. {"repeat_penalty": 1.0}'
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        import json

        try:
            parsed = json.loads(value)
        except ValueError:
            raise _Invalid(allowed) from None
        if isinstance(parsed, dict):
            return parsed
    raise _Invalid(allowed)


def int_range(minimum: int, maximum: int | None = None) -> Callable[[object], int]:
    bound = f"≥ {minimum}" if maximum is None else f"between {minimum} and {maximum}"
    allowed = f"an integer {bound}"

    def parse(value: object) -> int:
        if isinstance(value, bool):
            raise _Invalid(allowed)
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise _Invalid(allowed) from None
        if not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
            raise _Invalid(allowed)
        return value

    return parse


def boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    raise _Invalid("true or false")


def choice(*choices: str) -> Callable[[object], str]:
    allowed = "one of " + ", ".join(repr(c) for c in choices)

    def parse(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _Invalid(allowed)
        return value

    return parse


def text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("a non-empty string")
    return value


def optional(parse: Callable[[object], Any]) -> Callable[[object], Any]:
    def wrapped(value: object) -> Any:
        if value is None or value == "":
            return None
        return parse(value)

    return wrapped


def path_value(value: object) -> Path:
    return Path(text(value)).expanduser()


def _default_threads() -> int:
    import psutil

    # llama.cpp decodes fastest with one thread per physical core.
    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


@dataclass(frozen=True)
class KeySpec:
    parse: Callable[[object], Any]
    default: Callable[[], Any]
    doc: str


def const(value: Any) -> Callable[[], Any]:
    return lambda: value


SCHEMA: dict[str, dict[str, KeySpec]] = {
    "agent": {
        "device_id": KeySpec(text, socket.gethostname, "identifies this device; default: the host name"),
        "data_dir": KeySpec(path_value, const(Path("/var/lib/lens-agent")), "outbox and state"),
    },
    "model": {
        "path": KeySpec(optional(path_value), const(None), "GGUF model; default: the bundled SmolLM2"),
        "n_threads": KeySpec(int_range(1, 512), _default_threads, "decode threads; default: physical cores"),
        "n_ctx": KeySpec(int_range(16, 1 << 20), const(2048), "context size in tokens"),
        "n_batch": KeySpec(int_range(1, 1 << 16), const(512), "prompt tokens per llama_decode call"),
        "n_gpu_layers": KeySpec(int_range(-1, 100000), const(0), "layers offloaded to a GPU (-1: all)"),
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
        "verify": KeySpec(choice("generate", "logprobs"), const("generate"), "speculative verification protocol"),
        "draft_tokens": KeySpec(int_range(1, 64), const(4), "tokens the local model drafts per round"),
        "adaptive_draft": KeySpec(boolean, const(False), "adapt the draft length to the observed acceptance"),
        "baselines": KeySpec(boolean, const(False), "also run cloud-only and edge-only for speedup figures"),
    },
    "offload": {
        "prompt_tokens_above": KeySpec(optional(int_range(1)), const(None), "offload prompts longer than this"),
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
    "outbox": {
        "synchronous": KeySpec(choice("FULL", "NORMAL"), const("FULL"), "SQLite durability per append"),
        "policy": KeySpec(choice("drop_oldest", "drop_newest"), const("drop_oldest"), "when the outbox is full"),
        "busy_timeout": KeySpec(parse_duration, const(10.0), "wait this long for another process's lock"),
        "max_quarantine_bytes": KeySpec(parse_size, const(16 * 1024**2), "quarantine bound; evictions are counted"),
        "disk_reserve": KeySpec(
            optional(parse_size), const(None), "space kept free for deletes on a full disk (default: bound / 32)"
        ),
    },
}


def cron_expression(value: object) -> str:
    allowed = "a crontab expression with five fields, e.g. '*/15 * * * *'"
    if not isinstance(value, str):
        raise _Invalid(allowed)
    from .schedule import crontab_trigger  # what the service schedules with (crontab's weekday numbers)

    try:
        crontab_trigger(value)
    except ValueError as exc:
        raise _Invalid(f"{allowed} ({exc})") from None
    return value


WORKLOAD_SCHEMA: dict[str, KeySpec] = {
    "name": KeySpec(text, const(None), "shown in status and recorded with every measurement"),
    "prompts": KeySpec(optional(path_value), const(None), "prompt file; default: the built-in set"),
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
}
DEFAULT_WORKLOAD = {"name": "default", "every": "15m"}


def _check_workloads(source: str, raw: object, strict: bool = True) -> list[dict[str, Any]]:
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
            except _Invalid as exc:
                raise ConfigError(source, f"{where}.{key}", value, str(exc)) from None
        for key, spec in WORKLOAD_SCHEMA.items():
            values.setdefault(key, spec.default())
        if (values["every"] is None) == (values["cron"] is None):
            raise ConfigError(source, where, item, 'exactly one of every (e.g. "15m") or cron')
        values["name"] = values["name"] or f"workload-{n + 1}"
        out.append(values)
    names = [w["name"] for w in out]
    if len(set(names)) != len(names):
        raise ConfigError(source, "workloads", names, "distinct names")
    return out


@dataclass(frozen=True)
class Config:
    """Resolved configuration: ``values[section][key]`` plus where each value came from."""

    values: Mapping[str, Mapping[str, Any]]
    sources: Mapping[str, Mapping[str, str]]
    path: Path | None
    workloads: list[dict[str, Any]] = field(default_factory=list)

    def get(self, section: str, key: str) -> Any:
        return self.values[section][key]

    def source(self, section: str, key: str) -> str:
        return self.sources[section][key]


Schema = dict[str, dict[str, KeySpec]]


def _check(schema: Schema, source: str, section: str, key: str, value: object) -> Any:
    spec = schema[section][key]
    try:
        return spec.parse(value)
    except _Invalid as exc:
        raise ConfigError(source, f"{section}.{key}", value, str(exc)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return dict(tomllib.load(handle))
    except FileNotFoundError:
        raise ConfigError(str(path), "(file)", str(path), "an existing TOML file; there is no such file") from None
    except OSError as exc:
        raise ConfigError(str(path), "(file)", str(path), f"a readable file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "(syntax)", str(exc), "valid TOML") from None


def _check_environment(environ: Mapping[str, str], schema: Schema) -> None:
    """Refuse a ``LENS_*`` variable that names no key: ``LENS_MODEL_NCTX`` must not be ignored silently."""
    own = {f"{ENV_PREFIX}{section}_{key}".upper() for section, keys in schema.items() for key in keys}
    other_sections = AGGREGATOR_SECTIONS if schema is SCHEMA else tuple(SCHEMA)
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in own or name in NON_CONFIG_ENV:
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        if any(rest.startswith(section + "_") for section in other_sections if section not in schema):
            continue
        section = next((s for s in schema if rest.startswith(s + "_")), None)
        if section is not None:
            known = ", ".join(f"{ENV_PREFIX}{section}_{key}".upper() for key in schema[section])
            raise ConfigError(f"environment variable {name}", "(env)", name, f"a key of [{section}]: {known}")
        sections = ", ".join(f"{ENV_PREFIX}{s.upper()}_…" for s in schema)
        others = ", ".join(NON_CONFIG_ENV)
        raise ConfigError(
            f"environment variable {name}",
            "(env)",
            name,
            f"LENS_<SECTION>_<KEY> with a section of {sections}, or {others}",
        )


def load_config(
    path: Path | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str, str], tuple[str, object]] | None = None,
    default_path: Path = DEFAULT_CONFIG_PATH,
    schema: Schema | None = None,
) -> Config:
    """Resolve the configuration.

    ``path``: the ``--config`` file (must exist); without it ``default_path`` is read when it exists.
    ``overrides``: ``{(section, key): (flag_name, value)}`` from the command line; ``None`` values are skipped.
    """
    environ = os.environ if environ is None else environ
    schema = SCHEMA if schema is None else schema
    file_path: Path | None = Path(path) if path is not None else (default_path if default_path.exists() else None)
    raw: dict[str, Any] = _read_toml(file_path) if file_path is not None else {}

    values: dict[str, dict[str, Any]] = {s: {} for s in schema}
    sources: dict[str, dict[str, str]] = {s: {} for s in schema}
    workloads: list[dict[str, Any]] = []
    if schema is SCHEMA:
        workloads = _check_workloads(str(file_path), raw.pop("workloads", [DEFAULT_WORKLOAD]))
    for section, table in raw.items():
        if section not in schema:
            raise ConfigError(str(file_path), section, "[section]", "one of the sections " + ", ".join(schema))
        if not isinstance(table, dict):
            raise ConfigError(str(file_path), section, table, "a [section] table")
        for key, value in table.items():
            if key not in schema[section]:
                known = ", ".join(schema[section])
                raise ConfigError(str(file_path), f"{section}.{key}", value, f"a known key of [{section}]: {known}")
            values[section][key] = _check(schema, str(file_path), section, key, value)
            sources[section][key] = str(file_path)

    _check_environment(environ, schema)
    for section, keys in schema.items():
        for key in keys:
            env_name = f"{ENV_PREFIX}{section}_{key}".upper()
            if env_name in environ:
                source = f"environment variable {env_name}"
                values[section][key] = _check(schema, source, section, key, environ[env_name])
                sources[section][key] = source

    for (section, key), (flag, value) in (overrides or {}).items():
        if value is None:
            continue
        values[section][key] = _check(schema, flag, section, key, value)
        sources[section][key] = flag

    for section, keys in schema.items():
        for key, spec in keys.items():
            if key not in values[section]:
                values[section][key] = spec.default()
                sources[section][key] = "default"
    return Config(values=values, sources=sources, path=file_path, workloads=workloads)
