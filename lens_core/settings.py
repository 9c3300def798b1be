"""The engine settings a measurement ran under, as records carry them (``ext.settings``) and the aggregator keys
series by them (the ``settings`` column).

A record's ``ext.settings`` is a map of the settings that move speed, memory or energy on a device::

    {"n_threads": 2, "n_batch": 512, "n_ctx": 2048, "n_gpu_layers": 0, "flash_attn": true,
     "quantization": "Q4_1", "draft_tokens": 4, "power_mode": "15W"}

Only :data:`FIELDS` count, each of its own type and within its range (:data:`BOUNDS`); anything else in the map is
ignored, and a value of the wrong type or out of range leaves that setting out (the record is still stored: its
settings are "unknown" for that field). The canonical key (:func:`settings_key`) is the known fields in a fixed
order, ``name=value`` joined by ``,`` — short enough for a name column, the same on every replica and in every
language, and readable on a page: ``flash_attn=on,n_batch=512,
n_ctx=2048,n_gpu_layers=0,n_threads=2,quantization=Q4_1``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# name → (type, where the agent's value comes from): the settings a device can change and that change its figures
FIELDS: dict[str, type] = {
    "flash_attn": bool,
    "n_batch": int,
    "n_ctx": int,
    "n_gpu_layers": int,
    "n_threads": int,
    "quantization": str,
    "draft_tokens": int,  # speculative decoding: tokens drafted per round
    "offload_prompt_tokens_above": int,  # offloading: the prompt length above which requests go to the cloud
    "power_mode": str,  # Jetson nvpmodel mode name
}
# The settings `lens-agent tune` changes and the configuration key each one is written to.
CONFIG_KEYS: dict[str, tuple[str, str]] = {
    "n_threads": ("model", "n_threads"),
    "n_batch": ("model", "n_batch"),
    "n_gpu_layers": ("model", "n_gpu_layers"),
    "flash_attn": ("model", "flash_attn"),
    "n_ctx": ("model", "n_ctx"),
    "draft_tokens": ("collab", "draft_tokens"),
    "offload_prompt_tokens_above": ("offload", "prompt_tokens_above"),
}
# The range of each integer setting: the one place that says what a value may be. The agent's configuration parses
# these keys with exactly these ranges (agent/config.py), a recommendation outside them is refused on the device
# (lens_core.recommendations) and a record's value outside them is no setting at all (clean_settings): the aggregator
# never groups, compares or recommends a value the agent would refuse in its own file.
BOUNDS: dict[str, tuple[int, int]] = {
    "n_threads": (1, 512),
    "n_batch": (1, 1 << 16),
    "n_ctx": (16, 1 << 20),
    "n_gpu_layers": (-1, 100_000),  # -1: every layer
    "draft_tokens": (1, 64),
    "offload_prompt_tokens_above": (1, 1 << 20),
}
MAX_KEY_CHARS = 256  # a name column's bound (lens_core.record_schema.MAX_NAME_CHARS)
_TEXT_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,40}$")


def in_bounds(name: str, value: object) -> bool:
    """Whether ``value`` is of the type the setting ``name`` takes and within its range (:data:`BOUNDS`)."""
    kind = FIELDS.get(name)
    if kind is None or type(value) is not kind:
        return False
    if isinstance(value, int) and not isinstance(value, bool):
        low, high = BOUNDS[name]
        return low <= value <= high
    if isinstance(value, str):
        return bool(_TEXT_RE.match(value))
    return True


def clean_settings(value: object) -> dict[str, Any]:
    """The known settings of a record's ``ext.settings`` (hostile input: anything else is dropped)."""
    if type(value) is not dict:
        return {}
    out: dict[str, Any] = {}
    for name in FIELDS:
        item = value.get(name)
        if item is not None and in_bounds(name, item):
            out[name] = item
    return out


def format_value(value: Any) -> str:
    if value is True:
        return "on"
    if value is False:
        return "off"
    return str(value)


def settings_key(value: object) -> str | None:
    """The canonical key of a record's ``ext.settings``, or None when it names no known setting."""
    settings = clean_settings(value)
    if not settings:
        return None
    key = ",".join(f"{name}={format_value(settings[name])}" for name in FIELDS if name in settings)
    return key if len(key) <= MAX_KEY_CHARS else None


def parse_key(key: str | None) -> dict[str, Any]:
    """The settings a canonical key names (its inverse; unknown or malformed parts are left out)."""
    out: dict[str, Any] = {}
    for part in (key or "").split(","):
        name, sep, text = part.partition("=")
        if not sep or name not in FIELDS:
            continue
        kind = FIELDS[name]
        if kind is bool:
            if text in ("on", "off"):
                out[name] = text == "on"
        elif kind is int:
            if len(text) > 8 or not re.fullmatch(r"-?[0-9]+", text):
                continue
            if in_bounds(name, int(text)):
                out[name] = int(text)
        elif _TEXT_RE.match(text):
            out[name] = text
    return out


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Settings whose values differ between two settings maps (both must name them): name → (a's, b's)."""
    return {name: (a[name], b[name]) for name in FIELDS if name in a and name in b and a[name] != b[name]}
