"""Errors raised by the agent's library code.

The CLI turns every one of these into a one-line message and exit status 2 (bad input) or 1 (runtime
failure); library code never calls ``sys.exit``.

    LensError
    ├── UsageError            bad input from the user: a file, flag or config value
    │   ├── ConfigError       a configuration value (file, key, value, what is allowed)
    │   ├── ModelFileError    a model path that is missing or not a GGUF file
    │   └── PromptFileError   a prompt file that cannot be read or parsed
    └── EngineError           the inference engine failed at run time
        ├── ModelLoadError    llama.cpp could not load a (valid-looking) model; also a UsageError (fix the file)
        └── RequestError      one request failed; the benchmark records it and goes on
"""

from __future__ import annotations


class LensError(Exception):
    """Base class of every error the agent raises on purpose."""


class UsageError(LensError):
    """The user gave something the agent cannot use; fixing the input fixes it."""


class ConfigError(UsageError):
    """A configuration value is wrong: names where it came from, the key and what is allowed."""

    def __init__(self, source: str, key: str, value: object, allowed: str) -> None:
        self.source = source
        self.key = key
        self.value = value
        self.allowed = allowed
        if key == "(env)":  # an environment variable that names no key
            message = f"{source} is not a setting: expected {allowed}; unset it or correct its name"
        elif key.startswith("("):  # the file itself: missing, unreadable, not TOML
            detail = f" ({value})" if key == "(syntax)" else ""
            message = f"{source}: expected {allowed}{detail}"
        elif value is None:
            where = "" if source == "default" else f" ({source})"
            env = "LENS_" + key.replace(".", "_").upper()
            message = f"{key} is not set{where}: expected {allowed}; set it in the config file or {env}"
        else:
            message = f"{source}: {key} = {_shown(value)} is not allowed: expected {allowed}"
        super().__init__(message)


def _shown(value: object) -> str:
    """A value as the user wrote it (TOML / JSON spelling: true, "text", [1, 2]), not as Python prints it."""
    import json

    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


class ModelFileError(UsageError):
    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"model {path}: {reason}")


class PromptFileError(UsageError):
    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"prompt file {path}: {reason}")


class EngineError(LensError):
    """The engine failed at run time."""


class ModelLoadError(EngineError, UsageError):
    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"could not load model {path}: {reason}")


class RequestError(EngineError):
    """One request failed. ``error_type`` is a short stable label used to count errors by type."""

    def __init__(self, error_type: str, message: str) -> None:
        self.error_type = error_type
        self.message = message
        super().__init__(f"{error_type}: {message}")
