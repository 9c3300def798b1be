"""The token protocol against a real vLLM (its CPU build): ids both ways, one forward pass verifies a whole draft
(``prompt_logprobs``), and every request's committed ids equal vLLM's own greedy ids. The target is a tiny llama
*with merges*, converted from the same GGUF family as the llama.cpp draft so both sides share the vocabulary."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.engines.cloud import CloudClient, CloudSettings, LoopRunner, _top_id
from agent.engines.llama import EngineSettings, LlamaEngine
from agent.errors import RequestError
from agent.strategies.speculative import TOKENS_BASIS, SpeculativeStrategy, check_vocabulary

from .netproxy import free_port
from .test_bench_cli import check_document
from .test_collab import speculate
from .test_token_protocol import token_request
from .tinymodel import MERGES, write_tiny_llama
from .vllm_server import HEAD_DIM_OK, VllmServerProcess, hf_checkpoint

PROMPTS = ["Hello", "the answer is", "in the h", "a"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-pair")
    target, draft = root / "target.gguf", root / "draft.gguf"
    tensors = write_tiny_llama(target, seed=2, merges=MERGES, **HEAD_DIM_OK)
    write_tiny_llama(
        draft, seed=102, noise_of=tensors, noise_scale=0.02, merges=MERGES, name="tiny-draft", **HEAD_DIM_OK
    )
    return {"target": target, "draft": draft, "hf": hf_checkpoint(target, root / "hf")}


@pytest.fixture(scope="module")
def vllm(pair: dict[str, Path]) -> Iterator[VllmServerProcess]:
    with VllmServerProcess(pair["hf"], free_port(), engine_in_process=True) as server:  # started in half the time
        yield server


def post(server: VllmServerProcess, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(server.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def greedy_ids(server: VllmServerProcess, prompt_ids: list[int], ignore_eos: bool = False) -> list[int]:
    body = {"prompt": prompt_ids, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True}
    ids: list[int] = post(server, "/v1/completions", body | ({"ignore_eos": True} if ignore_eos else {}))["choices"][0][
        "token_ids"
    ]
    return ids


def test_committed_ids_are_vllms_greedy_ids(vllm: VllmServerProcess, pair: dict[str, Path]) -> None:
    runner = LoopRunner()
    client = CloudClient(CloudSettings(url=vllm.url + "/v1"))
    rows = []
    try:
        supported, why = runner.run(client.probe_token_api())
        assert supported and client.token_api == "vllm" and "prompt_logprobs" in why, why
        with LlamaEngine.load(pair["draft"], EngineSettings(n_ctx=256, n_threads=1)) as engine:
            assert check_vocabulary(engine, client, runner).startswith("vocabulary checked")
            eog = engine.eog_ids()
            for ignore_eos in (False, True):
                # vLLM's own greedy ids for each prompt (temperature 0: asked once, compared with every k's)
                greedy = {
                    prompt: [t for t in greedy_ids(vllm, engine.tokenize(prompt), ignore_eos) if t not in eog]
                    for prompt in PROMPTS
                }
                for k in (1, 3, 5):
                    strategy = SpeculativeStrategy(
                        engine, client, runner, k=k, protocol="tokens", ignore_eos=ignore_eos
                    )
                    for prompt in PROMPTS:
                        record, committed = token_request(strategy, prompt, MAX_TOKENS)
                        rows.append({"k": k, "committed": committed, "greedy": greedy[prompt], **record.ext["collab"]})
    finally:
        runner.run(client.close())
        runner.close()
    for row in rows:
        assert row["committed"] == row["greedy"], row
        assert row["token_api"] == "vllm" and row["verifier"].startswith("prompt_logprobs: one forward pass")
        assert row["matches_cloud_greedy"] is True and row["lossless"] is True and row["lossless_basis"] == TOKENS_BASIS
        # one request per round, each verifying a whole draft
        assert row["rounds"] >= MAX_TOKENS / (row["k"] + 1) and row["accepted"] <= row["drafted"]
        assert row["server_time_ms"] is None  # vLLM sends no timings: nothing is invented
    accepted, drafted = sum(r["accepted"] for r in rows), sum(r["drafted"] for r in rows)
    assert 0 < accepted < drafted  # a noisy copy: a real, partial acceptance


def test_auto_picks_vllms_token_api_from_the_cli(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    vllm: VllmServerProcess,
    pair: dict[str, Path],
    results_schema: dict[str, Any],
) -> None:
    out, raw = tmp_path / "r.json", tmp_path / "r.jsonl"
    flags = ("--draft-tokens", "3", "--max-tokens", str(MAX_TOKENS))
    code, stdout, stderr = speculate(capsys, pair["draft"], vllm.url + "/v1", out, raw, *flags, prompts=PROMPTS)
    assert code == 0, stderr
    doc = json.loads(out.read_text())
    check_document(doc, results_schema)
    cloud = doc["configuration"]["cloud"]
    assert cloud["verify"] == "auto" and cloud["protocol"] == "tokens"
    assert "vLLM's /tokenize" in cloud["protocol_reason"] and cloud["vocabulary_check"].startswith("vocabulary checked")
    spec = doc["results"]["collaboration"]["speculative"]
    assert spec["greedy_check"] == {"checked": len(PROMPTS), "mismatches": 0}
    assert spec["lossless_check"]["lossless"] == len(PROMPTS)
    assert f"{len(PROMPTS)} of {len(PROMPTS)} requests lossless (token protocol" in stdout
    for line in raw.read_text().splitlines():
        record = json.loads(line)
        assert record["engine"] == "llama.cpp draft + vllm token-id verify" and record["output_tokens"] == MAX_TOKENS


def test_hostile_prompt_logprobs_are_refused() -> None:
    assert _top_id({"5": {"rank": 2}, "9": {"rank": 1}}, frozenset()) == 9
    assert _top_id({"5": {"rank": 1}, "9": {"rank": 1}}, frozenset()) == 5  # a tie: argmax order, lowest id
    assert _top_id({"2": {"rank": 1}, "9": {"rank": 2}}, frozenset({2})) == 9  # </s> excluded under ignore_eos
    for row in (
        None,
        [],
        {},
        {"x": {"rank": 1}},
        {"5": {"rank": "1"}},
        {"5": {"rank": True}},
        {"5": 3},
        {"2": {"rank": 1}},
    ):
        with pytest.raises(RequestError) as info:
            _top_id(row, frozenset({2}))
        assert info.value.error_type == "malformed_response"
