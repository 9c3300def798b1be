"""The Presidio guardrail (agent/guardrails/presidio.py) with the real analyzer and the real packaged spaCy model.

E-mail addresses, phone numbers and card numbers are found with the types and severities of
docs/guardrail-presidio.md and descriptions naming the entity type only; a clean prompt passes; the analyzer loads
once per process however many checks and calls use it, and nothing is fetched from the network; without Presidio
installed, build() says how to install it; reading the module imports neither Presidio nor spaCy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.guardrails.base import BuildContext, CheckConfig, GuardrailError
from agent.guardrails.presidio import DEFAULT_ENTITIES, DEFAULT_STAGES, OPTIONS, PresidioGuardrail, build
from lens_core.config import Invalid

ROOT = Path(__file__).resolve().parents[1]


def presidio_check(**options: Any) -> PresidioGuardrail:
    parsed = {key: OPTIONS[key].parse(value) for key, value in options.items()}
    config = CheckConfig("pii", "presidio", DEFAULT_STAGES, "block", parsed, "lens.toml", "guardrails[0].checks[1]")
    return build(config, BuildContext(n_threads=1))


@pytest.fixture(scope="module")
def presidio() -> Iterator[PresidioGuardrail]:
    check = presidio_check()
    yield check
    check.close()


def test_email_phone_and_card_are_found(presidio: PresidioGuardrail) -> None:
    text = (
        "Hi, please write to jane.doe@example.com; my phone number is +1 212 736 5000 "
        "and my card is 4111 1111 1111 1111."
    )
    result = presidio.validate_input(text)
    by_entity = {v.description.split(" ")[0]: (v.type, v.severity) for v in result.violations}
    assert by_entity == {
        "CREDIT_CARD": ("pii_leakage", "high"),
        "EMAIL_ADDRESS": ("pii_leakage", "medium"),
        "PHONE_NUMBER": ("pii_leakage", "medium"),
    }
    assert result.violations[0].description.startswith("CREDIT_CARD")  # the worst first
    assert result.details == {"entities": {"EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1, "CREDIT_CARD": 1}}
    assert result.risk_score == pytest.approx(1.0)  # Presidio's own best score (pattern + checksum)
    for violation in result.violations:
        assert "jane" not in violation.description and "4111" not in violation.description
        assert "736" not in violation.description and len(violation.description) <= 200


def test_every_stage_analyzes(presidio: PresidioGuardrail) -> None:
    for method in (presidio.validate_input, presidio.detect_threats, presidio.filter_output):
        result = method("Send the invoice to billing@example.org")
        assert [(v.type, v.severity) for v in result.violations] == [("pii_leakage", "medium")]


@pytest.mark.parametrize(
    "text",
    [
        "Write me a haiku about autumn leaves falling on a quiet pond.",
        "Version 3.11.4 costs $19.99 from 2024-03-01; order 4839201 shipped.",
        "Explain how a transformer's attention layer works, in three short paragraphs.",
    ],
)
def test_clean_prompts_pass(presidio: PresidioGuardrail, text: str) -> None:
    result = presidio.validate_input(text)
    assert result.violations == [] and result.risk_score == 0.0 and result.details is None


def test_threshold_and_entity_list_are_applied(presidio: PresidioGuardrail) -> None:
    bare_phone = "call +1 212 736 5000"  # no context word: Presidio scores it 0.4
    assert presidio.validate_input(bare_phone).violations == []
    low = presidio_check(score_threshold=0.3)
    result = low.validate_input(bare_phone)
    assert [v.description.split(" ")[0] for v in result.violations] == ["PHONE_NUMBER"]
    assert 0.3 <= result.risk_score < 0.5
    people = presidio_check(entities=["PERSON"])
    assert [(v.type, v.severity) for v in people.validate_input("My name is John Smith.").violations] == [
        ("pii_leakage", "low")
    ]
    assert people.validate_input("jane.doe@example.com").violations == []  # not an entity it asks for
    low.close()
    people.close()


def test_unknown_entity_is_refused_naming_the_known_ones(presidio: PresidioGuardrail) -> None:
    with pytest.raises(GuardrailError) as raised:
        presidio_check(entities=["EMAIL_ADDRESS", "SHOE_SIZE"])
    message = str(raised.value)
    assert "guardrails[0].checks[1].entities" in message and "'SHOE_SIZE'" in message
    assert "CREDIT_CARD" in message and "PHONE_NUMBER" in message


@pytest.mark.parametrize(
    ("option", "value"),
    [("entities", []), ("entities", "EMAIL_ADDRESS"), ("score_threshold", 1.5), ("language", "de")],
)
def test_bad_options_are_refused(option: str, value: object) -> None:
    with pytest.raises(Invalid):
        OPTIONS[option].parse(value)


def test_defaults() -> None:
    assert OPTIONS["entities"].default() == list(DEFAULT_ENTITIES)
    assert OPTIONS["score_threshold"].default() == 0.5 and OPTIONS["language"].default() == "en"
    assert frozenset({"input", "output"}) == DEFAULT_STAGES


def test_a_closed_check_answers_with_an_error() -> None:
    check = presidio_check()
    check.close()
    with pytest.raises(GuardrailError, match="closed"):
        check.validate_input("jane@example.com")


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_model_loads_once_and_nothing_is_fetched(tmp_path: Path) -> None:
    out = run_python(
        """
        import socket, spacy
        connects = []
        def refuse(self, address):
            connects.append(str(address))
            raise OSError("no network in this test")
        socket.socket.connect = refuse
        socket.create_connection = lambda address, *a, **k: refuse(None, address)
        socket.getaddrinfo = lambda host, *a, **k: refuse(None, host)
        loads = []
        real_load = spacy.load
        def counting_load(*args, **kwargs):
            loads.append(args)
            return real_load(*args, **kwargs)
        spacy.load = counting_load

        from agent.guardrails.base import BuildContext, CheckConfig
        from agent.guardrails.presidio import build
        checks = [
            build(CheckConfig(name, "presidio", frozenset({"input", "output"}), "block", {}, "s", "w"), BuildContext(1))
            for name in ("a", "b")
        ]
        found = []
        for check in checks:
            for method in (check.validate_input, check.detect_threats, check.filter_output):
                found.append(len(method("mail jane.doe@example.com").violations))
        print(len(loads), found, connects)
        """,
        # an empty cache: tldextract would fetch the public-suffix list if it were allowed to
        env={"TLDEXTRACT_CACHE": str(tmp_path / "tldextract")},
    )
    assert out.split("\n")[0] == "1 [1, 1, 1, 1, 1, 1] []"


def test_without_presidio_build_says_how_to_install_it() -> None:
    out = run_python(
        """
        import sys
        sys.modules["presidio_analyzer"] = None  # as if it were not installed
        from agent.guardrails.base import BuildContext, CheckConfig, GuardrailError
        from agent.guardrails.presidio import build
        config = CheckConfig("pii", "presidio", frozenset({"input"}), "block", {}, "lens.toml", "g[0]")
        try:
            build(config, BuildContext(1))
        except GuardrailError as exc:
            print(exc)
        """
    )
    assert "pip install 'llm-latency-lens[presidio]'" in out and "lens.toml: g[0]" in out


def test_reading_the_module_imports_neither_presidio_nor_spacy() -> None:
    out = run_python(
        """
        import sys
        import agent.guardrails.presidio
        print(sorted(m for m in ("presidio_analyzer", "spacy", "tldextract") if m in sys.modules))
        """
    )
    assert out.strip() == "[]"
