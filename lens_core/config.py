"""The configuration loader both roles use: TOML file < ``LENS_<SECTION>_<KEY>`` environment < command-line flags.

A role declares every key once in a :data:`Schema` (section → key → :class:`KeySpec`: parser, default, doc). A bad
value raises :class:`~lens_core.errors.ConfigError` naming where it came from (file, environment variable or flag),
the key and what is allowed. Secrets never live in the TOML: a file names a secret file and the environment may carry
the secret itself. The agent's keys are in :mod:`agent.config`, the aggregator's in :mod:`aggregator.config`.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 (JetPack 6)
    import tomli as tomllib

ENV_PREFIX = "LENS_"
MAX_LAYER_BYTES = 64 * 1024  # a drop-in holds a few settings

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
# other's sections. tests/test_config.py checks these against both schemas.
AGENT_SECTIONS = (
    "agent",
    "model",
    "bench",
    "sync",
    "probes",
    "cloud",
    "collab",
    "offload",
    "service",
    "gates",
    "outbox",
    "otlp",
    "tune",
    "suite",
    "interference",
)
AGGREGATOR_SECTIONS = ("server", "storage", "auth", "fleet", "otlp", "campaigns")

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


class Invalid(ValueError):
    """Raised by a parser; its text says what is allowed."""


def parse_duration(value: object) -> float:
    """``500ms``, ``60s``, ``5m``, ``2h`` or a plain number of seconds → seconds (float, > 0)."""
    allowed = "a duration such as 500ms, 60s, 5m, 2h (or a plain number of seconds), greater than 0"
    if isinstance(value, bool):
        raise Invalid(allowed)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        stripped = value.strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", stripped):
            seconds = float(stripped)
        else:
            match = _DURATION_RE.match(value)
            if not match:
                raise Invalid(allowed)
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise Invalid(allowed)
    if seconds <= 0:
        raise Invalid(allowed)
    return seconds


def parse_size(value: object) -> int:
    """``512KiB``, ``4MiB``, ``1GiB``, ``100B`` or a plain integer of bytes → bytes (int, > 0)."""
    allowed = "a size such as 512KiB, 4MiB, 1GiB (or a plain integer of bytes), greater than 0"
    if isinstance(value, bool):
        raise Invalid(allowed)
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise Invalid(allowed)
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    else:
        raise Invalid(allowed)
    if size <= 0:
        raise Invalid(allowed)
    return size


def duration_or_zero(value: object) -> float:
    """A duration, or 0 / "0s" to turn the thing off."""
    if value in (0, "0", "0s", "0ms"):
        return 0.0
    try:
        return parse_duration(value)
    except Invalid:
        raise Invalid("a duration such as 500ms, 2s (or 0 to turn it off)") from None


def number_range(minimum: float, maximum: float) -> Callable[[object], float]:
    allowed = f"a number between {minimum:g} and {maximum:g}"

    def parse(value: object) -> float:
        if isinstance(value, bool):
            raise Invalid(allowed)
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise Invalid(allowed) from None
        if not minimum <= number <= maximum:
            raise Invalid(allowed)
        return number

    return parse


def json_object(value: object) -> dict[str, Any]:
    """A TOML inline table, or (from the environment or a flag) a JSON object."""
    allowed = 'a table / JSON object, e.g. {"repeat_penalty": 1.0}'
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            raise Invalid(allowed) from None
        if isinstance(parsed, dict):
            return parsed
    raise Invalid(allowed)


def int_range(minimum: int, maximum: int | None = None) -> Callable[[object], int]:
    bound = f"≥ {minimum}" if maximum is None else f"between {minimum} and {maximum}"
    allowed = f"an integer {bound}"

    def parse(value: object) -> int:
        if isinstance(value, bool):
            raise Invalid(allowed)
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise Invalid(allowed) from None
        if not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
            raise Invalid(allowed)
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
    raise Invalid("true or false")


def choice(*choices: str) -> Callable[[object], str]:
    allowed = "one of " + ", ".join(repr(c) for c in choices)

    def parse(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise Invalid(allowed)
        return value

    return parse


def text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid("a non-empty string")
    return value


def optional(parse: Callable[[object], Any]) -> Callable[[object], Any]:
    def wrapped(value: object) -> Any:
        if value is None or value == "":
            return None
        return parse(value)

    return wrapped


def path_value(value: object) -> Path:
    return Path(text(value)).expanduser()


@dataclass(frozen=True)
class KeySpec:
    parse: Callable[[object], Any]
    default: Callable[[], Any]
    doc: str


def const(value: Any) -> Callable[[], Any]:
    return lambda: value


@dataclass(frozen=True)
class Config:
    """Resolved configuration: ``values[section][key]`` plus where each value came from."""

    values: Mapping[str, Mapping[str, Any]]
    sources: Mapping[str, Mapping[str, str]]
    path: Path | None
    # top-level arrays of tables a role declares (the agent's [[workloads]]), as its parser returned them
    tables: Mapping[str, Any] = field(default_factory=dict)

    def get(self, section: str, key: str) -> Any:
        return self.values[section][key]

    def source(self, section: str, key: str) -> str:
        return self.sources[section][key]


Schema = dict[str, dict[str, KeySpec]]


def _check(schema: Schema, source: str, section: str, key: str, value: object) -> Any:
    spec = schema[section][key]
    try:
        return spec.parse(value)
    except Invalid as exc:
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


def _check_environment(environ: Mapping[str, str], schema: Schema, other_sections: tuple[str, ...]) -> None:
    """Refuse a ``LENS_*`` variable that names no key: ``LENS_MODEL_NCTX`` must not be ignored silently."""
    own = {f"{ENV_PREFIX}{section}_{key}".upper() for section, keys in schema.items() for key in keys}
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
    default_path: Path,
    schema: Schema,
    other_sections: tuple[str, ...] = (),
    tables: Mapping[str, Callable[[str, object], Any]] | None = None,
    layers: Sequence[tuple[Path, Mapping[str, Sequence[str]]]] = (),
) -> Config:
    """Resolve the configuration.

    ``path``: the ``--config`` file (must exist); without it ``default_path`` is read when it exists.
    ``overrides``: ``{(section, key): (flag_name, value)}`` from the command line; ``None`` values are skipped.
    ``other_sections``: the other role's sections, whose ``LENS_*`` variables this role leaves alone.
    ``tables``: top-level arrays of tables (``[[name]]``) and their checkers, called with the file's name and the
    array (``None`` when the file has none) even when there is no file.
    ``layers``: drop-in files read after the file and before the environment, each with the only keys it may set
    (section → keys): the agent's tuning drop-in (``agent.tuning``). A missing layer file is skipped.
    """
    environ = os.environ if environ is None else environ
    file_path: Path | None = Path(path) if path is not None else (default_path if default_path.exists() else None)
    raw: dict[str, Any] = _read_toml(file_path) if file_path is not None else {}

    values: dict[str, dict[str, Any]] = {s: {} for s in schema}
    sources: dict[str, dict[str, str]] = {s: {} for s in schema}
    arrays = {name: check(str(file_path), raw.pop(name, None)) for name, check in (tables or {}).items()}
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

    for layer_path, allowed in layers:
        source = f"drop-in {layer_path}"
        try:
            layer_stat = layer_path.stat()  # a drop-in is a small regular file: never a FIFO to block on, nor a device
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(source, "(file)", str(layer_path), f"a readable file ({exc.strerror})") from None
        if not stat.S_ISREG(layer_stat.st_mode):
            raise ConfigError(source, "(file)", str(layer_path), "a regular file (not a directory, FIFO or device)")
        if layer_stat.st_size > MAX_LAYER_BYTES:
            raise ConfigError(source, "(file)", str(layer_path), f"a file of at most {MAX_LAYER_BYTES} bytes")
        try:
            layer = _read_toml(layer_path)
        except ConfigError as exc:
            if exc.key == "(file)" and not layer_path.exists():
                continue
            raise
        for section, table in layer.items():
            if section not in allowed or not isinstance(table, dict):
                raise ConfigError(source, section, "[section]", "one of the sections " + ", ".join(allowed))
            for key, value in table.items():
                if key not in allowed[section]:
                    known = ", ".join(allowed[section])
                    raise ConfigError(source, f"{section}.{key}", value, f"a key this drop-in may set: {known}")
                values[section][key] = _check(schema, source, section, key, value)
                sources[section][key] = source

    _check_environment(environ, schema, other_sections)
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
    return Config(values=values, sources=sources, path=file_path, tables=arrays)
