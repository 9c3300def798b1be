"""Speculative decoding in token space against llama.cpp's own ``llama-server`` (``--verify tokens``): the prompt is
tokenized once, ids cross the network both ways, and the committed ids are the server's own greedy ids, even with a
vocabulary that has merges (where the text protocols diverge). ``--verify auto`` picks ``tokens`` against
llama-server and ``generate`` against llama-cpp-python's server; a draft with another vocabulary is refused before
the run, and ``--verify tokens`` against a server without the token-id API is a one-line error. All servers on
127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.engines.cloud import CloudClient, CloudSettings, LoopRunner
from agent.engines.llama import EngineSettings, LlamaEngine
from agent.errors import RequestError, UsageError
from agent.measurement import Measurement
from agent.strategies.speculative import TOKENS_BASIS, SpeculativeStrategy, check_vocabulary, logprob_tokens

from .llama_server import LlamaServerProcess
from .netproxy import free_port
from .test_bench_cli import check_document
from .test_collab import speculate, start_cloud, stop_cloud
from .tinymodel import MERGES, write_tiny_llama

PROMPTS = ["Hello", "the answer is", "in the h"]
MAX_TOKENS = 24
GREEDY = {"temperature": 0, "top_k": 1, "return_tokens": True}


def write_pair(root: Path, seed: int) -> dict[str, Path]:
    """A tiny target with merges and a noisy copy of it (same vocabulary) as the draft."""
    target, draft = root / f"target-{seed}.gguf", root / f"draft-{seed}.gguf"
    tensors = write_tiny_llama(target, seed=seed, merges=MERGES)
    write_tiny_llama(draft, seed=seed + 100, noise_of=tensors, noise_scale=0.02, merges=MERGES, name="tiny-draft")
    return {"target": target, "draft": draft}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("token-protocol")


@pytest.fixture(scope="module")
def pair(root: Path) -> dict[str, Path]:
    return write_pair(root, 2)


@pytest.fixture(scope="module")
def server(llama_server_bin: Path, pair: dict[str, Path]) -> Iterator[LlamaServerProcess]:
    with LlamaServerProcess(llama_server_bin, pair["target"], free_port()) as proc:
        yield proc


class Client:
    """A CloudClient and its loop, closed together."""

    def __init__(self, url: str) -> None:
        self.runner = LoopRunner()
        self.client = CloudClient(CloudSettings(url=url))

    def close(self) -> None:
        self.runner.run(self.client.close())
        self.runner.close()


def token_request(strategy: SpeculativeStrategy, prompt: str, max_tokens: int) -> tuple[Measurement, list[int]]:
    """One speculative request with the token protocol, checked against the server's greedy ids afterwards: the
    record and the committed ids."""
    record = Measurement(run_id="r", device_id="d", model_name="m", model_sha256=None)
    strategy.measure(record, prompt, max_tokens)
    committed = list(strategy.last_ids)
    strategy.after(record, prompt, max_tokens)
    assert record.ok, record.error_message
    return record, committed


def speculate_tokens(server: LlamaServerProcess, draft: Path, ks: tuple[int, ...] = (2, 4)) -> list[dict[str, Any]]:
    """Every prompt with the token protocol for each k: one row per request, with the server's own greedy ids."""
    c = Client(server.url + "/v1")
    rows = []
    try:
        with LlamaEngine.load(draft, EngineSettings(n_ctx=256, n_threads=1)) as engine:
            check_vocabulary(engine, c.client, c.runner)
            for k in ks:
                strategy = SpeculativeStrategy(engine, c.client, c.runner, k=k, protocol="tokens")
                for prompt in PROMPTS:
                    record, committed = token_request(strategy, prompt, MAX_TOKENS)
                    prompt_ids = engine.tokenize(prompt)
                    greedy = server.post("/completion", {"prompt": prompt_ids, "n_predict": MAX_TOKENS, **GREEDY})
                    rows.append(
                        {
                            "k": k,
                            "prompt": prompt,
                            "prompt_ids": prompt_ids,
                            "committed": committed,
                            "greedy": greedy["tokens"],
                            "greedy_text": greedy["content"],
                            "text": record.output_text,
                            "output_tokens": record.output_tokens,
                            **record.ext["collab"],
                        }
                    )
    finally:
        c.close()
    return rows


@pytest.mark.parametrize("seed", [1, 2, 9])
def test_committed_ids_are_the_servers_greedy_ids(
    seed: int, root: Path, llama_server_bin: Path, pair: dict[str, Path], server: LlamaServerProcess
) -> None:
    if seed == 2:
        rows = speculate_tokens(server, pair["draft"])
    else:
        models = write_pair(root, seed)
        with LlamaServerProcess(llama_server_bin, models["target"], free_port()) as proc:
            rows = speculate_tokens(proc, models["draft"])
    for row in rows:
        assert row["prompt_ids"][0] == 1  # the BOS the server adds to a text prompt
        assert row["committed"] == row["greedy"], row
        assert len(row["committed"]) == row["output_tokens"] == MAX_TOKENS
        assert row["text"] == row["greedy_text"]  # the local detokenization is the server's text
        assert row["protocol"] == "tokens" and row["lossless"] is True and row["lossless_basis"] == TOKENS_BASIS
        assert row["matches_cloud_greedy"] is True
        assert row["retokenization_divergences"] == 0 and row["unchecked_rounds"] == 0
        assert row["accepted"] <= row["drafted"] and row["rounds"] >= MAX_TOKENS / (row["k"] + 1)
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0 and row["bytes_per_committed_token"] > 0
        assert row["server_time_ms"] is not None and 0 < row["server_time_ms"] < row["verify_time_ms"]
    accepted = sum(r["accepted"] for r in rows)
    drafted = sum(r["drafted"] for r in rows)
    assert 0 < accepted < drafted  # a noisy copy: a real, partial acceptance


def test_client_methods_and_their_errors(server: LlamaServerProcess) -> None:
    c = Client(server.url + "/v1")
    try:
        ids = c.runner.run(c.client.tokenize("the cat", add_special=True))
        assert ids == server.post("/tokenize", {"content": "the cat", "add_special": True})["tokens"]
        assert ids[0] == 1
        answer = c.runner.run(c.client.complete_tokens(ids, 5))
        assert len(answer.ids) == 5 and answer.stop_type == "limit"
        assert answer.timings is not None and answer.timings["predicted_n"] == 5
        assert answer.bytes_up > 0 and answer.end_ns > answer.start_ns
        assert 0 < answer.bytes_down < 600  # response_fields: the ids, stop_type and timings only
        assert (
            c.runner.run(c.client.detokenize(answer.ids))
            == server.post("/detokenize", {"tokens": answer.ids})["content"]
        )
        assert c.runner.run(c.client.n_vocab()) == server.get("/v1/models")["data"][0]["meta"]["n_vocab"]
        assert c.runner.run(c.client.probe_token_api())[0] is True
        with pytest.raises(RequestError) as info:
            c.runner.run(c.client.complete_tokens([10**9], 2))  # an id outside the vocabulary
        assert info.value.error_type.startswith("http_")
    finally:
        c.close()
    gone = Client(f"http://127.0.0.1:{free_port()}/v1")
    try:
        supported, why = gone.runner.run(gone.client.probe_token_api())
        assert supported is False and "/tokenize" in why and "connection" in why
    finally:
        gone.close()


def bench(capsys: pytest.CaptureFixture[str], tmp: Path, draft: Path, url: str, *extra: str) -> tuple[int, str, str]:
    out, raw = tmp / "r.json", tmp / "r.jsonl"
    flags = ("--draft-tokens", "3", "--max-tokens", str(MAX_TOKENS), *extra)
    return speculate(capsys, draft, url, out, raw, *flags, prompts=PROMPTS)


def test_auto_picks_tokens_against_llama_server(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    server: LlamaServerProcess,
    pair: dict[str, Path],
    results_schema: dict[str, Any],
) -> None:
    code, stdout, stderr = bench(capsys, tmp_path, pair["draft"], server.url + "/v1")
    assert code == 0, stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    check_document(doc, results_schema)
    cloud = doc["configuration"]["cloud"]
    assert cloud["verify"] == "auto" and cloud["protocol"] == "tokens"
    assert "/tokenize" in cloud["protocol_reason"] and cloud["vocabulary_check"].startswith("vocabulary checked")
    spec = doc["results"]["collaboration"]["speculative"]
    assert spec["protocol"] == "tokens" and spec["greedy_check"] == {"checked": 3, "mismatches": 0}
    assert spec["lossless_check"]["lossless"] == 3 and spec["lossless_check"]["lossy"] == 0
    for line in (tmp_path / "r.jsonl").read_text().splitlines():
        c = json.loads(line)["ext"]["collab"]
        assert c["protocol"] == "tokens" and c["lossless"] is True and c["protocol_reason"].startswith("auto: ")
        assert "vocabulary checked" in c["protocol_reason"]
    assert "3 of 3 requests lossless (token protocol, no divergence)" in stdout


def test_generate_against_llama_server_reads_its_logprobs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], server: LlamaServerProcess, pair: dict[str, Path]
) -> None:
    """The text protocol still works against llama-server's /v1 (its logprobs come in the chat shape), marked as
    checked by re-tokenization rather than by token ids."""
    code, stdout, stderr = bench(capsys, tmp_path, pair["draft"], server.url + "/v1", "--verify", "generate")
    assert code == 0, stderr
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert records and all(r["ok"] for r in records), [r.get("error_type") for r in records]
    for r in records:
        c = r["ext"]["collab"]
        assert c["protocol"] == "generate" and c["drafted"] > 0 and r["output_tokens"] == MAX_TOKENS
        assert isinstance(c["lossless"], bool) and "re-tokenized" in c["lossless_basis"]
        # llama-server's /v1/completions answers carry its timings: the verification time is split round by round
        assert 0 < c["server_time_ms"] < c["verify_time_ms"]
        assert c["verify_minus_server_ms"] == pytest.approx(c["verify_time_ms"] - c["server_time_ms"])
        assert c["server_time_source"].startswith("sum over the rounds")
    split = json.loads((tmp_path / "r.json").read_text())["results"]["collaboration"]["speculative"]["server_time"]
    assert split["requests"] == split["requests_with_server_time"] == len(PROMPTS)
    assert split["server_time_ms"] == pytest.approx(sum(r["ext"]["collab"]["server_time_ms"] for r in records))
    assert 0 < split["server_share_of_verify"] < 1
    assert f"({len(PROMPTS)} of {len(PROMPTS)} requests, the server's timings)" in stdout


def test_logprob_tokens_takes_both_shapes_and_nothing_else() -> None:
    assert logprob_tokens({"tokens": ["a", " b"]}) == ["a", " b"]
    assert logprob_tokens({"content": [{"token": "a", "logprob": -0.1}, {"token": " b"}]}) == ["a", " b"]
    for hostile in (None, [], {"tokens": [1, 2]}, {"content": [{"token": 3}]}, {"content": "x"}, {"tokens": "ab"}):
        assert logprob_tokens(hostile) == []


def test_auto_picks_generate_against_llama_cpp_python(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pair: dict[str, Path]
) -> None:
    proc, url = start_cloud(pair["target"])
    try:
        code, _, stderr = bench(capsys, tmp_path, pair["draft"], url)
        assert code == 0, stderr
        refused, _, error = bench(capsys, tmp_path, pair["draft"], url, "--verify", "tokens")
    finally:
        stop_cloud(proc)
    cloud = json.loads((tmp_path / "r.json").read_text())["configuration"]["cloud"]
    assert cloud["protocol"] == "generate" and cloud["protocol_reason"].startswith("auto: no token-id API")
    for line in (tmp_path / "r.jsonl").read_text().splitlines():
        c = json.loads(line)["ext"]["collab"]
        assert c["protocol"] == "generate"
        # the text protocol keeps its re-tokenization check and lossy marking
        assert c["lossless"] is (c["retokenization_divergences"] == 0 and c["unchecked_rounds"] == 0)
        assert c["lossless_basis"].startswith("text protocol")
        # llama-cpp-python's server sends no timings: nothing is invented
        assert c["server_time_ms"] is None and c["verify_minus_server_ms"] is None
        assert c["server_time_source"] == f"server timings in 0 of {c['rounds']} rounds"
    # --verify tokens against a server without the token-id API: one line naming the endpoint and what is missing
    assert refused == 2 and "Traceback" not in error
    errors = [line for line in error.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == error.strip().splitlines()[-1]
    assert "collab.verify = tokens needs llama-server's token-id API" in errors[0]
    assert f"POST {url.removesuffix('/v1')}/tokenize did not answer token ids (http_404" in errors[0]


def test_a_draft_with_another_vocabulary_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], server: LlamaServerProcess, pair: dict[str, Path]
) -> None:
    plain = tmp_path / "plain.gguf"
    write_tiny_llama(plain, seed=3)  # no merges: a smaller vocabulary than the target's
    c = Client(server.url + "/v1")
    try:
        with LlamaEngine.load(plain, EngineSettings(n_ctx=256, n_threads=1)) as engine:
            n_server = server.get("/v1/models")["data"][0]["meta"]["n_vocab"]
            with pytest.raises(UsageError) as info:
                check_vocabulary(engine, c.client, c.runner)
            message = str(info.value)
            assert f"{n_server} tokens" in message and f"{engine.n_vocab}" in message and server.url in message

            async def unknown() -> None:  # a server that does not say its vocabulary size: the digests decide
                return None

            c.client.n_vocab = unknown  # type: ignore[method-assign]
            with pytest.raises(UsageError) as info:
                check_vocabulary(engine, c.client, c.runner)
            assert "tokenize a probe text differently (ids digest draft " in str(info.value)
    finally:
        c.close()
    code, _, stderr = bench(capsys, tmp_path, plain, server.url + "/v1", "--verify", "tokens")
    assert code == 2 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == stderr.strip().splitlines()[-1]
    assert f"the server's vocabulary has {n_server} tokens, the draft model's {engine.n_vocab}" in errors[0]


# a bias on </s> (id 2) that makes this target (seed 2) end early under greedy decoding: 2, 16 and 2 tokens
EOS_BIAS = {"logit_bias": [[2, 17.0]]}


def test_ignore_eos_generates_past_the_servers_end(server: LlamaServerProcess, pair: dict[str, Path]) -> None:
    runner = LoopRunner()
    client = CloudClient(CloudSettings(url=server.url + "/v1", extra=EOS_BIAS))
    rows: dict[bool, list[tuple[Measurement, list[int], list[int]]]] = {False: [], True: []}
    try:
        with LlamaEngine.load(pair["draft"], EngineSettings(n_ctx=256, n_threads=1)) as engine:
            for ignore in (False, True):
                strategy = SpeculativeStrategy(engine, client, runner, k=3, protocol="tokens", ignore_eos=ignore)
                for prompt in PROMPTS:
                    record, committed = token_request(strategy, prompt, MAX_TOKENS)
                    body = {"prompt": engine.tokenize(prompt), "n_predict": MAX_TOKENS, **GREEDY, **EOS_BIAS}
                    greedy = server.post("/completion", body | ({"ignore_eos": True} if ignore else {}))["tokens"]
                    rows[ignore].append((record, committed, [t for t in greedy if t != 2]))
    finally:
        runner.run(client.close())
        runner.close()
    ended = [r for r, _, _ in rows[False] if r.output_tokens < MAX_TOKENS]
    assert ended and all(r.stop_reason == "eos" for r in ended)  # the server's end, honoured without ignore_eos
    for record, committed, greedy in rows[True]:
        assert record.output_tokens == MAX_TOKENS and record.stop_reason == "max_tokens"
        assert committed == greedy and 2 not in committed  # the server's own greedy ids with </s> masked
        assert record.ext["collab"]["matches_cloud_greedy"] is True and record.ext["collab"]["lossless"] is True
    for record, committed, greedy in rows[False]:
        assert committed == greedy and record.ext["collab"]["matches_cloud_greedy"] is True


def test_text_protocols_against_llama_server_say_what_they_cannot_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], server: LlamaServerProcess, pair: dict[str, Path]
) -> None:
    """--verify logprobs needs echoed prompt logprobs (llama-server ignores echo); --ignore-eos needs the token
    protocol. Each is refused before any request is timed, in one line naming the endpoint and the reason."""
    url = server.url + "/v1"
    for flags, expected in (
        (("--verify", "logprobs"), f"collab.verify = logprobs: POST {url}/completions answered logprobs for the "),
        (("--verify", "generate", "--ignore-eos"), "ignore_eos with the speculative strategy needs the token protocol"),
    ):
        code, _, stderr = bench(capsys, tmp_path, pair["draft"], url, *flags)
        assert code == 2 and "Traceback" not in stderr, stderr
        errors = [line for line in stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and expected in errors[0], errors
        if "logprobs" in flags:
            assert "it ignores echo" in errors[0] and "use collab.verify = tokens or auto" in errors[0]
        assert not (tmp_path / "r.jsonl").exists() or not (tmp_path / "r.jsonl").read_text()
    # the token protocol takes --ignore-eos: every request runs to max_tokens
    code, _, stderr = bench(capsys, tmp_path, pair["draft"], url, "--ignore-eos")
    assert code == 0, stderr
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(records) == len(PROMPTS) and all(r["output_tokens"] == MAX_TOKENS for r in records)
