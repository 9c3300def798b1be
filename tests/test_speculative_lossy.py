"""Speculative decoding over a text API with a vocabulary that has merges: re-tokenizing the committed text can
give other tokens than the ones produced, and the cloud then conditions on a context nobody generated. Every such
divergence is counted and the record marked lossy — a text that differs from the cloud's own greedy text is never
reported as lossless. The "cloud" is llama-cpp-python's server on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.bench.report import _lossless_check, lossless_line
from agent.engines.cloud import CloudClient, CloudSettings, LoopRunner
from agent.engines.llama import EngineSettings, LlamaEngine
from agent.measurement import Measurement
from agent.strategies.speculative import SpeculativeStrategy, _commit_ids, count_divergence

from .test_bench_cli import check_document
from .test_collab import speculate as bench_speculative
from .test_collab import start_cloud, stop_cloud
from .tinymodel import MERGES, write_tiny_llama

PROMPTS = ["Hello", "a", "the answer is", "in the h"]


def write_pair(root: Path, seed: int, merges: list[str] | None) -> dict[str, Path]:
    tag = "merges" if merges else "plain"
    target, draft = root / f"target-{tag}-{seed}.gguf", root / f"draft-{tag}-{seed}.gguf"
    tensors = write_tiny_llama(target, seed=seed, merges=merges)
    write_tiny_llama(draft, seed=seed + 100, noise_of=tensors, noise_scale=0.02, merges=merges, name="tiny-draft")
    return {"target": target, "draft": draft}


def speculate(pair: dict[str, Path], max_tokens: int = 32) -> list[dict[str, Any]]:
    """Every prompt with both protocols and k = 2, 4: one row per request with its collab figures."""
    proc, url = start_cloud(pair["target"])
    rows = []
    runner = LoopRunner()
    client = CloudClient(CloudSettings(url=url))
    try:
        with LlamaEngine.load(pair["draft"], EngineSettings(n_ctx=256, n_threads=1)) as engine:
            for protocol in ("generate", "logprobs"):
                for k in (2, 4):
                    strategy = SpeculativeStrategy(engine, client, runner, k=k, protocol=protocol)
                    for prompt in PROMPTS:
                        record = Measurement(run_id="r", device_id="d", model_name="m", model_sha256=None)
                        strategy.measure(record, prompt, max_tokens)
                        strategy.after(record, prompt, max_tokens)
                        assert record.ok, record.error_message
                        rows.append({"protocol": protocol, "k": k, "prompt": prompt, **record.ext["collab"]})
    finally:
        runner.run(client.close())
        runner.close()
        stop_cloud(proc)
    return rows


@pytest.fixture(scope="module")
def merge_rows(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("merge-models")
    yield [row | {"seed": seed} for seed in (2, 9) for row in speculate(write_pair(root, seed, MERGES))]


def test_a_text_that_differs_from_the_cloud_greedy_is_never_lossless(merge_rows: list[dict[str, Any]]) -> None:
    for row in merge_rows:
        assert row["matches_cloud_greedy"] is not None
        assert row["lossless"] is (row["retokenization_divergences"] == 0 and row["unchecked_rounds"] == 0)
        assert row["unchecked_rounds"] == 0  # every cloud piece of the tiny vocabulary maps to a token id
        if not row["matches_cloud_greedy"]:
            assert row["lossless"] is False and row["retokenization_divergences"] > 0, row
        if row["retokenization_divergences"]:
            assert "divergence" in row["lossless_basis"]
    # the merges do bite here: some requests diverge, and each of them is marked
    lossy = [r for r in merge_rows if not r["lossless"]]
    mismatched = [r for r in merge_rows if not r["matches_cloud_greedy"]]
    assert lossy and mismatched
    assert {r["protocol"] for r in lossy} == {"generate", "logprobs"}


def test_a_vocabulary_without_merges_is_checked_and_lossless(tmp_path: Path) -> None:
    rows = speculate(write_pair(tmp_path, 9, None))
    for row in rows:
        assert row["matches_cloud_greedy"] is True
        assert row["lossless"] is True and row["retokenization_divergences"] == 0 and row["unchecked_rounds"] == 0
        assert row["retokenization_checks"] >= row["rounds"] - 1 > 0
        assert row["lossless_basis"].startswith("text protocol; context re-tokenized")


def test_the_bench_summary_says_which_requests_are_lossy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], results_schema: dict[str, Any]
) -> None:
    pair = write_pair(tmp_path, 9, MERGES)
    proc, url = start_cloud(pair["target"])
    out, raw = tmp_path / "r.json", tmp_path / "r.jsonl"
    try:
        flags = ("--draft-tokens", "2", "--max-tokens", "32")
        code, stdout, stderr = bench_speculative(capsys, pair["draft"], url, out, raw, *flags, prompts=PROMPTS)
    finally:
        stop_cloud(proc)
    assert code == 0, stderr
    doc = json.loads(out.read_text())
    check_document(doc, results_schema)
    records = [json.loads(line)["ext"]["collab"] for line in raw.read_text().splitlines()]
    check = doc["results"]["collaboration"]["speculative"]["lossless_check"]
    lossy = sum(1 for c in records if not c["lossless"])
    divergences = sum(c["retokenization_divergences"] for c in records)
    assert lossy >= 1 and divergences >= 1
    assert check["requests"] == len(PROMPTS) and check["lossy"] == lossy
    assert check["retokenization_divergences"] == divergences and check["basis"] == "text protocol"
    assert (
        f"speculative: {lossy} of {len(PROMPTS)} requests lossy (re-tokenization diverged {divergences} time" in stdout
    )
    assert "see docs/collaboration.md" in stdout


# -- the counter on crafted token sequences ---------------------------------------------------------------------------
def test_divergence_counter_on_crafted_sequences() -> None:
    # ids: 1 <s>, 10 "▁t", 11 "h", 12 "e", 13 "he", 14 "▁the"
    assert count_divergence([1, 10, 13], [1, 10, 13]) == 0
    assert count_divergence([1, 14], [1, 10, 13]) == 1  # "▁t" + "he" re-tokenizes into the merge "▁the"
    assert count_divergence([1, 10, 13], [1, 10, 11, 12]) == 1  # "h" + "e" into "he"
    assert count_divergence([1, 10], [1, 10, 11]) == 1  # a piece that vanished
    pieces = {" t": 10, "h": 11, "e": 12, "he": 13, " the": 14}
    # accepted draft ids are kept; the cloud's correction is mapped from its text
    assert _commit_ids([1, 10], [11, 11], 1, ["h", "e"], pieces) == [1, 10, 11, 12]
    # a fully accepted draft plus the bonus token; an end-of-generation piece adds nothing
    assert _commit_ids([1], [10, 13], 2, [" t", "he", ""], pieces) == [1, 10, 13]
    # a piece with no token id: the next round cannot be checked
    assert _commit_ids([1], [10], 0, ["ß"], pieces) is None
    # a commit cut to the token budget keeps only the ids of what was committed
    assert _commit_ids([1], [10, 11, 12], 3, [" t"], pieces) == [1, 10]


def test_the_summary_of_crafted_records() -> None:
    checked = {"lossless": True, "retokenization_divergences": 0, "lossless_basis": "text protocol; none diverged"}
    diverged = {"lossless": False, "retokenization_divergences": 3, "lossless_basis": "text protocol; 3 divergence(s)"}
    old = {"acceptance_rate": 0.5}  # a record written before the check: not lossless
    check = _lossless_check([checked, diverged, diverged, old])
    assert check == {
        "requests": 4,
        "lossless": 1,
        "lossy": 3,
        "requests_with_divergences": 2,
        "retokenization_divergences": 6,
        "unchecked": 1,
        "basis": "text protocol",
    }
    line = lossless_line({"lossless_check": check})
    assert line == (
        "speculative: 3 of 4 requests lossy (re-tokenization diverged 6 times in 2 requests, 1 unchecked); "
        "text protocol — see docs/collaboration.md"
    )
    assert "2 of 2 requests lossless" in lossless_line({"lossless_check": _lossless_check([checked, checked])})
    once = dict(diverged, retokenization_divergences=1)
    assert "1 of 2 requests lossy (re-tokenization diverged 1 time in 1 request);" in lossless_line(
        {"lossless_check": _lossless_check([checked, once])}
    )
    assert "not checked" in lossless_line({})
