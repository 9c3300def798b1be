"""What the Presidio guardrail costs: the analyzer's load (build) and ms per call on a 2 KB prompt.

    .venv/bin/python bench/guardrail_presidio.py [--calls 50] [--size 2048]

The prompts of bench/guardrail_rules.py (ordinary text, and the same with PII planted), the default entity list and
threshold. Build: the first build in the process (Presidio's recognizers and the packaged spaCy model), then a second
check's build (shares the loaded analyzer). Per call: the best of three rounds of ``--calls`` calls after a warm-up,
on one thread; beside it, the rules guardrail on the same prompt. A figure, not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from guardrail_rules import prompt, rules_check

from agent.guardrails.base import BuildContext, CheckConfig
from agent.guardrails.presidio import build


def per_call_ms(scan: object, text: str, calls: int) -> float:
    call = scan.validate_input  # type: ignore[attr-defined]
    call(text)
    rounds = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            call(text)
        rounds.append((time.perf_counter() - start) / calls * 1e3)
    return min(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    config = CheckConfig("presidio", "presidio", frozenset({"input", "output"}), "block", {}, "bench", "bench")
    started = time.perf_counter()
    check = build(config, BuildContext(n_threads=1))
    first = time.perf_counter() - started
    started = time.perf_counter()
    second = build(config, BuildContext(n_threads=1))
    again = time.perf_counter() - started
    print(f"presidio build: first {first:.2f} s (loads the analyzer), a second check {again * 1e3:.2f} ms")
    rules = rules_check(["email", "phone", "card", "iban", "api_key", "private_key", "injection"], [])
    print(f"ms per call on a {args.size}-character prompt (best of 3 rounds of {args.calls} calls)")
    print(f"{'':10} {'presidio':>9} {'rules':>9}")
    for label, planted in (("clean", False), ("planted", True)):
        text = prompt(args.size, planted)
        found = len(check.validate_input(text).violations)
        print(
            f"{label:10} {per_call_ms(check, text, args.calls):9.2f} {per_call_ms(rules, text, args.calls * 20):9.3f}"
            f"   ({found} Presidio violations)"
        )
    short = "Please write to jane.doe@example.com about the invoice."
    presidio_ms, rules_ms = per_call_ms(check, short, args.calls), per_call_ms(rules, short, args.calls * 20)
    print(f"{f'{len(short)} chars':10} {presidio_ms:9.2f} {rules_ms:9.3f}")
    check.close()
    second.close()


if __name__ == "__main__":
    main()
