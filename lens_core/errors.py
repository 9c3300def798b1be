"""Errors both roles raise on purpose; each CLI turns them into one line and an exit status.

Exit status 2 for a :class:`UsageError` (bad input: a file, flag or config value), 1 for any other
:class:`LensError` (a runtime failure). Library code never calls ``sys.exit``. The agent's own errors
(model file, prompt file, engine) build on these in :mod:`agent.errors`.

    LensError
    ├── UsageError            bad input from the user: a file, flag or config value
    │   └── ConfigError       a configuration value (file, key, value, what is allowed)
    └── (the agent's and the aggregator's own errors)
"""

from __future__ import annotations

import json


class LensError(Exception):
    """Base class of every error the project raises on purpose."""


class UsageError(LensError):
    """The user gave something the program cannot use; fixing the input fixes it."""


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
            if "[" in key:  # a key of a [[table]] entry: the file is the only place it can be set
                message = f"{key} is not set{where}: expected {allowed}; set it in the config file"
            else:
                env = "LENS_" + key.replace(".", "_").upper()
                message = f"{key} is not set{where}: expected {allowed}; set it in the config file or {env}"
        else:
            message = f"{source}: {key} = {_shown(value)} is not allowed: expected {allowed}"
        super().__init__(message)


def _shown(value: object) -> str:
    """A value as the user wrote it (TOML / JSON spelling: true, "text", [1, 2]), not as Python prints it."""
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)
