"""The model name the docs filter by is the one the records carry: a real one-request bench on the bundled SmolLM2,
its raw records' ``model_name`` against every ``--model "…"`` filter in docs/fleet.md and docs/feedback.md and every
``model_name`` example in docs/triggers.md; the bench header prints that name with the file beside it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .test_bench_cli import run_cli

DOCS = Path(__file__).resolve().parent.parent / "docs"


def doc_filters() -> dict[str, set[str]]:
    """The model names each doc filters by (or shows as a record's ``model_name``)."""
    found: dict[str, set[str]] = {}
    for name in ("fleet.md", "feedback.md"):
        found[name] = set(re.findall(r'lens-aggregator feedback --model "([^"]+)"', (DOCS / name).read_text()))
    found["triggers.md"] = set(re.findall(r'"model_name": "([^"]+)"', (DOCS / "triggers.md").read_text()))
    found["triggers.md"] |= set(re.findall(r'select\(\.model_name == "([^"]+)"\)', (DOCS / "triggers.md").read_text()))
    return found


def test_the_docs_filter_by_the_name_the_records_carry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], smollm2: Path
) -> None:
    raw = tmp_path / "raw.jsonl"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n")  # one request, as short as a request gets: the name is what is checked
    code, stdout, stderr = run_cli(
        capsys, "bench", "--model", str(smollm2), "--prompts", str(prompts), "--chat-template", "off",
        "--runs", "1", "--warmup", "0", "--max-tokens", "2", "--n-ctx", "256", "--n-threads", "1",
        "--no-progress", "--raw", str(raw),
    )  # fmt: skip
    assert code == 0, stderr
    [record] = [json.loads(line) for line in raw.read_text().splitlines()]
    name = record["model_name"]
    for doc, names in doc_filters().items():
        assert names, f"docs/{doc}: no model filter found"
        assert names == {name}, f"docs/{doc} filters by {names}, the records carry {name!r}"
    # the header: the records' name first, then the file it came from
    [header] = [line for line in stdout.splitlines() if line.startswith("model     ")]
    assert header.startswith(f"model     {name} ({smollm2.name}, Q4_1, ")
