"""llama.cpp's own ``llama-server`` (built from the llama.cpp that the pinned llama-cpp-python vendors) in token space.

What speculative decoding against it will rely on: ``/tokenize`` and ``/detokenize`` agree with each other and with
the agent's llama-cpp-python; ``/completion`` takes a prompt of token ids and returns the generated ids; greedy
decoding is repeatable and consistent (a prompt extended by the first j generated ids continues with the rest);
the prompt cache reuses a shared prefix; ``timings`` and ``completion_probabilities`` have the shape recorded at the
top of tests/llama_server.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .llama_server import LlamaServerProcess, cached_binary, pinned_version
from .netproxy import free_port
from .tinymodel import MERGES, tiny_vocab, write_tiny_llama

TEXT = "the cat sat on the mat, and then she ran in"
GREEDY = {"temperature": 0, "top_k": 1, "cache_prompt": True, "return_tokens": True}
N = 12


@pytest.fixture(scope="module")
def merges_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama-server") / "tiny-merges.gguf"
    write_tiny_llama(path, seed=7, merges=MERGES)
    return path


@pytest.fixture(scope="module")
def server(llama_server_bin: Path, merges_model: Path) -> Iterator[LlamaServerProcess]:
    with LlamaServerProcess(llama_server_bin, merges_model, free_port()) as proc:
        yield proc


def piece(vocab: list[str], token: int) -> str:
    """The text of a token of the tiny vocabulary: ``▁`` is a space, ``<0xNN>`` the byte NN (all < 0x80 here)."""
    text = vocab[token]
    return chr(int(text[3:5], 16)) if len(text) == 6 and text.startswith("<0x") else text.replace("▁", " ")


def complete(server: LlamaServerProcess, prompt: list[int], n: int = N, **extra: Any) -> dict[str, Any]:
    answer: dict[str, Any] = server.post("/completion", {"prompt": prompt, "n_predict": n, **GREEDY, **extra})
    return answer


def prompt_ids(server: LlamaServerProcess) -> list[int]:
    ids: list[int] = server.post("/tokenize", {"content": TEXT})["tokens"]
    return ids


def test_binary_is_the_cached_build_of_the_pinned_version(llama_server_bin: Path) -> None:
    assert llama_server_bin == cached_binary(pinned_version())
    assert f"llama-server-{pinned_version()}" in str(llama_server_bin)
    assert llama_server_bin.is_file()


def test_health(server: LlamaServerProcess) -> None:
    assert server.get("/health") == {"status": "ok"}


def test_tokenize_detokenize_round_trip_with_merges(server: LlamaServerProcess) -> None:
    vocab = tiny_vocab(MERGES)[0]
    ids = prompt_ids(server)
    assert all(isinstance(i, int) for i in ids)
    assert vocab.index("▁the") in ids and vocab.index("▁s") in ids  # the merges are applied
    assert vocab[1] != vocab[ids[0]]  # add_special defaults to false: no <s>
    pieces = server.post("/tokenize", {"content": TEXT, "with_pieces": True})["tokens"]
    assert [p["id"] for p in pieces] == ids
    assert [p["piece"] for p in pieces] == [piece(vocab, i) for i in ids]
    assert "".join(p["piece"] for p in pieces) == " " + TEXT  # SentencePiece: a space is prepended
    assert server.post("/detokenize", {"tokens": ids})["content"].strip() == TEXT
    with_bos = server.post("/tokenize", {"content": TEXT, "add_special": True})["tokens"]
    assert with_bos == [1, *ids]


def test_tokenize_agrees_with_the_agents_llama_cpp_python(server: LlamaServerProcess, merges_model: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    local = llama_cpp.Llama(model_path=str(merges_model), vocab_only=True, verbose=False)
    try:
        assert local.tokenize(TEXT.encode(), add_bos=False) == prompt_ids(server)
    finally:
        local.close()


def test_completion_in_token_space_is_repeatable(server: LlamaServerProcess) -> None:
    prompt = prompt_ids(server)
    first = complete(server, prompt)
    tokens = first["tokens"]
    assert len(tokens) == N and all(isinstance(t, int) for t in tokens)
    assert first["tokens_predicted"] == N and first["tokens_evaluated"] == len(prompt)
    assert first["stop_type"] == "limit"
    assert first["content"] == server.post("/detokenize", {"tokens": tokens})["content"]
    assert complete(server, prompt)["tokens"] == tokens
    assert complete(server, prompt, cache_prompt=False)["tokens"] == tokens
    as_text = server.post("/completion", {"prompt": TEXT, "n_predict": N, **GREEDY})
    assert as_text["tokens_evaluated"] == len(prompt) + 1  # a text prompt gets the BOS the model asks for
    assert as_text["tokens"] == complete(server, [1, *prompt])["tokens"]
    without = server.post("/completion", {"prompt": prompt, "n_predict": 3, "temperature": 0})
    assert without["tokens"] == []  # ids only with return_tokens


def test_greedy_continuation_is_consistent_in_token_space(server: LlamaServerProcess) -> None:
    """prompt + the first j generated ids continues with generated[j:]: what speculative verification relies on."""
    prompt = prompt_ids(server)
    generated = complete(server, prompt)["tokens"]
    for j in (1, 4, N - 2):
        rest = complete(server, prompt + generated[:j], n=N - j)
        assert rest["tokens"] == generated[j:], j
        assert rest["tokens_evaluated"] == len(prompt) + j


def test_prompt_cache_reuses_the_shared_prefix(server: LlamaServerProcess) -> None:
    prompt = prompt_ids(server)
    generated = complete(server, prompt, cache_prompt=False)["tokens"]
    extended = complete(server, prompt + generated[:5], n=2)
    timings = extended["timings"]
    assert timings["cache_n"] >= len(prompt) - 1
    assert timings["cache_n"] + timings["prompt_n"] == len(prompt) + 5
    assert extended["tokens_cached"] == len(prompt) + 5 + 2 - 1  # the last generated token is not evaluated


def test_timings_are_plausible(server: LlamaServerProcess) -> None:
    prompt = prompt_ids(server)
    timings = complete(server, prompt, cache_prompt=False)["timings"]
    assert {
        "cache_n",
        "prompt_n",
        "prompt_ms",
        "prompt_per_token_ms",
        "prompt_per_second",
        "predicted_n",
        "predicted_ms",
        "predicted_per_token_ms",
        "predicted_per_second",
    } <= set(timings)
    assert timings["cache_n"] == 0 and timings["prompt_n"] == len(prompt)
    assert timings["predicted_n"] == N
    for key in ("prompt_ms", "predicted_ms"):
        assert 0 < timings[key] < 30_000, key
    assert timings["prompt_per_token_ms"] == pytest.approx(timings["prompt_ms"] / len(prompt), rel=1e-3)
    # the first generated token comes from the prompt batch: predicted_ms covers N − 1 decode steps
    assert timings["predicted_per_token_ms"] == pytest.approx(timings["predicted_ms"] / (N - 1), rel=1e-3)
    assert timings["predicted_per_second"] == pytest.approx(1000 * (N - 1) / timings["predicted_ms"], rel=1e-3)


def test_token_probabilities(server: LlamaServerProcess) -> None:
    prompt = prompt_ids(server)
    answer = complete(server, prompt, n_probs=3)
    probs = answer["completion_probabilities"]
    assert [p["id"] for p in probs] == answer["tokens"]
    vocab = tiny_vocab(MERGES)[0]
    for entry in probs:
        assert set(entry) == {"id", "token", "bytes", "logprob", "top_logprobs"}
        assert entry["token"] == piece(vocab, entry["id"])
        assert bytes(entry["bytes"]).decode() == entry["token"]
        top = entry["top_logprobs"]
        assert len(top) == 3 and all(set(t) == {"id", "token", "bytes", "logprob"} for t in top)
        assert top[0]["id"] == entry["id"]  # greedy picks the most likely token
        assert top[0]["logprob"] == pytest.approx(entry["logprob"])
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert all(t["logprob"] <= 0 for t in top)
        assert sum(math.exp(t["logprob"]) for t in top) <= 1 + 1e-4

    post = complete(server, prompt, n_probs=3, post_sampling_probs=True)["completion_probabilities"]
    assert [p["id"] for p in post] == answer["tokens"]
    for entry in post:
        assert set(entry) == {"id", "token", "bytes", "prob", "top_probs"}
        assert entry["prob"] == pytest.approx(1.0)  # after greedy sampling the chosen token has it all
        assert entry["top_probs"][0]["id"] == entry["id"]
