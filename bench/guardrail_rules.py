"""What the built-in rules guardrail costs per call on a 2 KB prompt (µs), all rules and each rule alone.

    .venv/bin/python bench/guardrail_rules.py [--calls 2000] [--size 2048]

Two prompts of the same size: ordinary English text with numbers, dates and versions in it (nothing to find), and
the same text with an e-mail address, a phone number, a card number, an IBAN and an API key planted in it. Each
figure is the best of five rounds of ``--calls`` calls (after a warm-up), on one thread: the machine may be busy.
A figure, not a test: compare runs on the same machine only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.guardrails.base import BuildContext, CheckConfig
from agent.guardrails.rules import RULES, build

FILLER = (
    "Our team is planning the release of version 3.11.4 for 2024-03-01 at 12:30. The budget is $1,299.99 per seat "
    "and order 4839201 shipped yesterday. Please summarise the meeting notes below, keep the tone friendly, and list "
    "the three open questions about the edge devices, their thermal limits and the model update schedule. "
)
PLANTED = (
    " Reach me at jane.doe@example.com or +44 20 7946 0958; card 4111 1111 1111 1111, "
    "IBAN DE89 3704 0044 0532 0130 00, key AKIAIOSFODNN7EXAMPLE. "
)


def prompt(size: int, planted: bool) -> str:
    body = PLANTED if planted else ""
    text = (FILLER * (size // len(FILLER) + 2))[: size - len(body)]
    return text + body


def per_call_us(check: object, text: str, calls: int) -> float:
    scan = check.validate_input  # type: ignore[attr-defined]
    for _ in range(calls // 10 + 1):
        scan(text)
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            scan(text)
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return min(rounds)


def rules_check(rules: list[str], deny: list[str]) -> object:
    config = CheckConfig(
        name="rules",
        kind="rules",
        stages=frozenset({"input", "output"}),
        action="block",
        options={"rules": rules, "deny": deny},
        source="bench",
        where="bench",
    )
    return build(config, BuildContext(n_threads=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    clean, planted = prompt(args.size, False), prompt(args.size, True)
    assert len(clean) == len(planted) == args.size
    deny = [f"codename{i}" for i in range(100)] + ["project falcon"]
    rows = [("all rules", list(RULES), [])]
    rows += [(f"  {rule} alone", [rule], []) for rule in RULES]
    rows += [("deny list alone (101 terms)", [], deny), ("all rules + deny list", list(RULES), deny)]
    print(f"rules guardrail, µs per call on a {args.size}-character prompt (best of 5 rounds of {args.calls} calls)")
    print(f"{'':32} {'clean':>9} {'planted':>9}")
    for label, rules, terms in rows:
        check = rules_check(rules, terms)
        found = len(check.validate_input(planted).violations)  # type: ignore[attr-defined]
        print(
            f"{label:32} {per_call_us(check, clean, args.calls):9.1f} {per_call_us(check, planted, args.calls):9.1f}"
            f"   ({found} violations in the planted prompt)"
        )


if __name__ == "__main__":
    main()
