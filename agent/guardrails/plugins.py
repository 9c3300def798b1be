"""The ``plugin`` kind: a team's own guardrail, found through the entry-point group ``llm_latency_lens.guardrails``.

The entry point names a class or factory called with ``options`` (the check's ``options`` table, a dict) that returns
an object with any of ``validate_input(text)``, ``detect_threats(text)``, ``filter_output(text)`` (and optionally
``close()`` and ``stages``, the stages it can run). Each method answers a :class:`~agent.guardrails.base.CheckResult`,
or a plain dict ``{"violations": [{"type", "severity", "description"}], "risk_score": …}``; a violation type outside
the vocabulary becomes ``other`` with its own name kept in the description. docs/guardrails.md has an example.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lens_core.config import Invalid, KeySpec, json_object, text

from .base import STAGE_METHODS, STAGES, BuildContext, CheckConfig, CheckResult, GuardrailError, Violation

GROUP = "llm_latency_lens.guardrails"


def _required(what: str) -> Callable[[], Any]:
    def default() -> Any:
        raise Invalid(what)

    return default


OPTIONS: dict[str, KeySpec] = {
    "entry_point": KeySpec(
        text, _required(f"required: a name in the entry-point group {GROUP}"), f"a name in the group {GROUP}"
    ),
    "options": KeySpec(json_object, dict, "a table handed to the plugin"),
}
DEFAULT_STAGES: frozenset[str] = frozenset(STAGES)


def installed() -> dict[str, Any]:
    """The entry points of the group, by name."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _as_result(answer: object) -> object:
    """A plugin's plain-dict answer as a CheckResult (anything else goes to the pipeline's checks as it is)."""
    if not isinstance(answer, dict):
        return answer
    violations = answer.get("violations", [])
    if not isinstance(violations, list):
        return answer
    out: list[Violation] = []
    for v in violations:
        if not isinstance(v, dict):
            return answer
        out.append(Violation(v.get("type", "other"), v.get("severity"), v.get("description", "")))  # type: ignore[arg-type]
    return CheckResult(
        violations=out,
        risk_score=answer.get("risk_score", 0.0),
        server_ms=answer.get("server_ms"),
        network_ms=answer.get("network_ms"),
        details=answer.get("details"),
    )


class PluginCheck:
    """A plugin object adapted to the Guardrail protocol."""

    kind = "plugin"

    def __init__(self, name: str, stages: frozenset[str], target: Any, entry_point: str) -> None:
        self.name = name
        self.stages = stages
        self._target = target
        self._entry_point = entry_point

    def _call(self, stage: str, text: str) -> CheckResult:
        method = getattr(self._target, STAGE_METHODS[stage], None)
        if method is None:
            raise GuardrailError(f"plugin {self._entry_point!r} has no {STAGE_METHODS[stage]}")
        return _as_result(method(text))  # type: ignore[return-value]  # checked by the pipeline

    def validate_input(self, text: str) -> CheckResult:
        return self._call("input", text)

    def detect_threats(self, text: str) -> CheckResult:
        return self._call("threat", text)

    def filter_output(self, text: str) -> CheckResult:
        return self._call("output", text)

    def close(self) -> None:
        close = getattr(self._target, "close", None)
        if callable(close):
            close()


def build(check: CheckConfig, context: BuildContext) -> PluginCheck:
    name = check.options["entry_point"]
    points = installed()
    if name not in points:
        from lens_core.errors import ConfigError

        names = ", ".join(sorted(points)) or f"none (no installed package declares the group {GROUP})"
        raise ConfigError(
            check.source, f"{check.where}.entry_point", name, f"an entry point installed in {GROUP}: {names}"
        )
    try:
        factory = points[name].load()
    except Exception as exc:  # a plugin package that fails to import: said, with the plugin's own error
        raise GuardrailError(f"plugin {name!r} cannot be loaded: {type(exc).__name__}: {exc}") from None
    try:
        target = factory(dict(check.options["options"]))
    except Exception as exc:  # the plugin's own constructor refused its options
        raise GuardrailError(f"plugin {name!r} refused its options: {type(exc).__name__}: {exc}") from None
    methods = {stage for stage, method in STAGE_METHODS.items() if callable(getattr(target, method, None))}
    declared = getattr(target, "stages", None)
    can = methods & set(declared) if isinstance(declared, (set, frozenset, list, tuple)) else methods
    stages = check.stages & can if check.stages == DEFAULT_STAGES else check.stages  # left at the default
    missing = sorted(stages - can, key=STAGES.index)
    if missing or not stages:
        raise GuardrailError(
            f"plugin {name!r} cannot run the stage(s) {', '.join(missing)} it is configured for "
            f"(it runs: {', '.join(s for s in STAGES if s in can) or 'none'}); set stages to those"
        )
    return PluginCheck(check.name, frozenset(stages), target, name)
