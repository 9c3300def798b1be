"""The kinds of check and their modules, loaded with importlib only when a set is checked or built, and the check of
one ``[[guardrails.checks]]`` entry against its kind's ``OPTIONS``."""

from __future__ import annotations

import importlib
import importlib.util
import re
from types import ModuleType
from typing import Any

from lens_core.config import Invalid
from lens_core.errors import ConfigError

from .base import ACTIONS, NAME_PATTERN, STAGES, CheckConfig

KINDS: dict[str, str] = {
    "rules": "agent.guardrails.rules",
    "presidio": "agent.guardrails.presidio",
    "judge": "agent.guardrails.judge",
    "http": "agent.guardrails.http",
    "plugin": "agent.guardrails.plugins",
    "empty": "agent.guardrails.base",
}
COMMON_KEYS = ("kind", "name", "stages", "action")


def kind_module(kind: str, *, source: str = "guardrails", where: str = "guardrails") -> ModuleType:
    """The module of ``kind``; a kind this installation does not have is a ConfigError naming it."""
    if kind not in KINDS:
        raise ConfigError(source, f"{where}.kind", kind, "one of the kinds " + ", ".join(KINDS))
    module_name = KINDS[kind]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:  # the module is there; something it imports is not
            raise
        available = [k for k, m in KINDS.items() if importlib.util.find_spec(m) is not None]
        raise ConfigError(
            source,
            f"{where}.kind",
            kind,
            f"a kind this installation has (the {kind} kind's module {module_name} is missing): "
            + ", ".join(available),
        ) from None


def check_config(source: str, where: str, raw: object) -> CheckConfig:
    """One ``[[guardrails.checks]]`` table, checked: kind, name, stages, action and the kind's own keys."""
    if not isinstance(raw, dict):
        raise ConfigError(source, where, raw, "a table: [[guardrails.checks]] with at least kind = …")
    kind = raw.get("kind")
    if kind is None:
        raise ConfigError(source, f"{where}.kind", raw, "a kind: one of " + ", ".join(KINDS))
    if not isinstance(kind, str):
        raise ConfigError(source, f"{where}.kind", kind, "one of the kinds " + ", ".join(KINDS))
    module = kind_module(kind, source=source, where=where)
    options_spec = getattr(module, "OPTIONS", {})
    name = raw.get("name", kind)
    if not isinstance(name, str) or re.fullmatch(NAME_PATTERN, name) is None:
        raise ConfigError(source, f"{where}.name", name, "1-64 characters of letters, digits, '.', '_' and '-'")
    stages_raw = raw.get("stages")
    if stages_raw is None:
        stages = frozenset(module.DEFAULT_STAGES)
    else:
        allowed = "a non-empty list of stages from " + ", ".join(STAGES) + ', e.g. ["input", "output"]'
        if (
            not isinstance(stages_raw, list)
            or not stages_raw
            or not all(isinstance(s, str) and s in STAGES for s in stages_raw)
            or len(set(stages_raw)) != len(stages_raw)
        ):
            raise ConfigError(source, f"{where}.stages", stages_raw, allowed)
        stages = frozenset(stages_raw)
    action = raw.get("action", "block")
    if action not in ACTIONS:
        raise ConfigError(source, f"{where}.action", action, "one of " + ", ".join(repr(a) for a in ACTIONS))
    options: dict[str, Any] = {}
    for key, value in raw.items():
        if key in COMMON_KEYS:
            continue
        if key not in options_spec:
            known = ", ".join([*COMMON_KEYS, *options_spec])
            raise ConfigError(
                source, f"{where}.{key}", value, f"a key of {'an' if kind[0] in 'aeiou' else 'a'} {kind} check: {known}"
            )
        try:
            options[key] = options_spec[key].parse(value)
        except Invalid as exc:
            raise ConfigError(source, f"{where}.{key}", value, str(exc)) from None
    for key, spec in options_spec.items():
        if key in options:
            continue
        try:
            options[key] = spec.default()
        except Invalid as exc:  # a required key
            raise ConfigError(source, where, raw, f"{key} set ({spec.doc}; {exc})") from None
    return CheckConfig(name=name, kind=kind, stages=stages, action=action, options=options, source=source, where=where)
