"""Errors raised by the agent's library code, on top of :mod:`lens_core.errors`.

The CLI turns every one of these into a one-line message and exit status 2 (bad input) or 1 (runtime
failure); library code never calls ``sys.exit``.

    LensError                 (lens_core.errors)
    ├── UsageError            bad input from the user: a file, flag or config value
    │   ├── ConfigError       a configuration value (file, key, value, what is allowed)
    │   ├── ModelFileError    a model path that is missing or not a GGUF file
    │   └── PromptFileError   a prompt file that cannot be read or parsed
    └── EngineError           the inference engine failed at run time
        ├── ModelLoadError    llama.cpp could not load a (valid-looking) model; also a UsageError (fix the file)
        └── RequestError      one request failed; the benchmark records it and goes on
"""

from __future__ import annotations

from lens_core.errors import ConfigError, LensError, UsageError

__all__ = [
    "ConfigError",
    "EngineError",
    "LensError",
    "ModelFileError",
    "ModelLoadError",
    "PromptFileError",
    "RequestError",
    "UsageError",
]


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
