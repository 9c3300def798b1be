"""Speculative decoding across the network: the local model drafts, the cloud verifies."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engines.cloud import CloudClient, CloudResult, LoopRunner, logprob_tokens, parse_server_timings
from ..engines.llama import LlamaEngine
from ..errors import RequestError, UsageError
from ..measurement import Measurement
from .base import Window, fill_timings


@dataclass
class SpeculativeStrategy:
    """The local model drafts ``k`` tokens; the cloud verifies them; accepted tokens plus its own next are committed.

    ``generate``: the cloud greedily generates k + 1 tokens from the committed text; the common prefix with the
    draft is accepted and the cloud's token after it committed too (k + 1 cloud decode steps per round; works with
    any OpenAI-compatible server). ``logprobs``: one request echoes the committed text plus the draft with
    ``logprobs=1``; a draft token is accepted where the cloud's top choice at its position is that token; at the
    first mismatch the cloud's top choice is committed, and after a fully accepted draft its generated token (one
    forward pass per round; servers that echo prompt logprobs, for models that add BOS).

    Both protocols send text, so both sides re-tokenize ``prompt + committed`` every round. With a vocabulary that
    has merges, that text can re-tokenize into other tokens than the ones produced, and the cloud then conditions on
    a context nobody generated. Each round the re-tokenized context is compared with the tokens actually produced
    (prompt ids + the ids of the committed pieces; in ``logprobs`` also the echoed context + draft): every
    difference is a re-tokenization divergence, and a request is reported ``lossless`` only when every round was
    checked and none diverged (see :func:`count_divergence`).

    ``tokens`` (llama.cpp's ``llama-server``, vLLM): no text crosses the network. The prompt is tokenized once, locally,
    with the BOS the server adds to a text prompt; the committed sequence is kept as ids. Each round the draft
    continues from the committed ids (the KV cache keeps the shared prefix), the server greedily generates k + 1 ids
    from the same ids (``POST /completion`` with an id prompt and ``return_tokens``), the common prefix is accepted
    and the server's next id committed. With vLLM (``client.token_api``) one request scores the committed ids plus
    the draft (``prompt_logprobs``): the target's greedy id at each draft position, and its next id after a fully
    accepted draft. The committed ids are the server's own greedy ids: lossless by construction. The output text is
    the local detokenization of the committed ids.
    """

    engine: LlamaEngine
    client: CloudClient
    runner: LoopRunner
    k: int = 4
    protocol: str = "generate"  # generate | logprobs | tokens (``auto`` is resolved before: see build_strategy)
    adaptive: bool = False
    rtt_ms: float | None = None
    name: str = "speculative"
    protocol_reason: str | None = None  # why this protocol (``collab.verify = auto``: what the probe found)
    ignore_eos: bool = False  # token protocol only: the server is asked to ignore end-of-generation (build_strategy)
    references: dict[tuple[str, int], str | None] = field(default_factory=dict)
    token_references: dict[tuple[str, int], list[int] | None] = field(default_factory=dict)
    last_ids: list[int] = field(default_factory=list)  # the last request's committed ids (token protocol)
    _piece_ids: dict[str, int] | None = field(default=None, init=False, repr=False)
    _eog: frozenset[int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.piece_ids()  # before any request: not inside a measured phase

    def piece_ids(self) -> dict[str, int]:
        """Text piece → token id over the draft vocabulary (the target's, by the premise of speculative decoding).

        Where several tokens share a text (a byte token and the character it encodes), the later id wins: the
        ordinary token, which is the one a tokenizer produces. Built once, when the strategy is made.
        """
        if self._piece_ids is None:
            index: dict[str, int] = {}
            for token in range(self.engine.n_vocab):
                raw = self.engine.piece(token)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                if text:
                    index[text] = token
            self._piece_ids = index
        return self._piece_ids

    def after(self, record: Measurement, text: str, max_tokens: int) -> None:
        """Outside the timed region: compare the committed text with the cloud's own greedy output."""
        collab = record.ext.get("collab")
        if not record.ok or not isinstance(collab, dict):
            return
        if self.protocol == "tokens":
            self._after_tokens(collab, text, max_tokens)
            return
        key = (text, max_tokens)
        if key not in self.references:
            result = self.runner.run(self.client.complete(text, max_tokens=max_tokens, stream=False))
            self.references[key] = result.text if result.ok else None
        reference = self.references[key]
        if reference is None:
            collab["matches_cloud_greedy"] = None
            collab["greedy_check"] = "the reference request to the cloud failed"
            return
        committed = record.output_text or ""
        collab["matches_cloud_greedy"] = committed == reference
        if committed != reference:
            if collab.get("lossless"):
                # no divergence was seen, yet the text differs (another vocabulary, a nondeterministic cloud): lossy
                collab["lossless"] = False
                collab["lossless_basis"] = (
                    f"{collab.get('lossless_basis', 'text protocol')}; but the committed text differs from the "
                    "cloud's own greedy text"
                )
            collab["greedy_mismatch"] = first_difference(committed, reference, 40)

    def _after_tokens(self, collab: dict[str, Any], text: str, max_tokens: int) -> None:
        """The committed ids against the server's own greedy ids for the same prompt ids (one request)."""
        key = (text, max_tokens)
        if key not in self.token_references:
            try:
                answer = self.runner.run(
                    self.client.complete_tokens(self.engine.tokenize(text), max_tokens, extra=self._token_extra())
                )
                self.token_references[key] = self._strip_eog(answer.ids)
            except RequestError:
                self.token_references[key] = None
        reference = self.token_references[key]
        if reference is None:
            collab["matches_cloud_greedy"] = None
            collab["greedy_check"] = "the reference request to the cloud failed"
            return
        committed = self.last_ids
        collab["matches_cloud_greedy"] = committed == reference
        if committed != reference:
            collab["lossless"] = False  # a nondeterministic server: say so, never claim lossless
            collab["lossless_basis"] = (
                "token protocol: but the committed ids differ from the server's own greedy ids for the prompt"
            )
            collab["greedy_mismatch"] = first_difference(committed, reference, 8)

    def _token_extra(self) -> dict[str, Any] | None:
        return {"ignore_eos": True} if self.ignore_eos else None

    def _strip_eog(self, ids: list[int]) -> list[int]:
        """The server's ids without a trailing end-of-generation id (it ends the answer, it is not text)."""
        eog = self._eog_ids()
        while ids and ids[-1] in eog:
            ids = ids[:-1]
        return ids

    def _eog_ids(self) -> frozenset[int]:
        if self._eog is None:
            self._eog = self.engine.eog_ids()
        return self._eog

    def measure(self, record: Measurement, text: str, max_tokens: int) -> Window:
        if self.protocol == "tokens":
            return self._measure_tokens(record, text, max_tokens)
        record.strategy = "speculative"
        record.engine = "llama.cpp draft + openai-compatible verify"
        piece_ids = self.piece_ids()
        start = time.perf_counter_ns()
        committed = ""
        n_committed = 0
        produced: list[int] | None = None  # prompt ids + the ids of the committed pieces, as produced
        divergences = checks = unchecked = 0
        tally = _Tally(self.k)
        finished = False
        try:
            while n_committed < max_tokens and not finished:
                k_round = tally.draft_length(max_tokens - n_committed)
                t0 = time.perf_counter_ns()
                drafts: list[bytes] = []
                draft_ids: list[int] = []
                context = self.engine.tokenize(text + committed)
                if produced is not None:
                    checks += 1
                    divergences += count_divergence(context, produced)
                elif tally.rounds:
                    unchecked += 1  # a committed piece of the last round maps to no token id
                if k_round:
                    self.engine.sync_context(context)
                    draft_ids = self.engine.draft(k_round)
                    drafts = [self.engine.piece(t) for t in draft_ids]
                    if self.protocol == "logprobs":
                        # the cloud re-tokenizes the committed text plus the draft: its rows must be these tokens
                        echoed = text + committed + "".join(d.decode("utf-8", "replace") for d in drafts)
                        checks += 1
                        divergences += count_divergence(self.engine.tokenize(echoed), context + draft_ids)
                t1 = time.perf_counter_ns()
                if self.protocol == "logprobs" and drafts:
                    commit, n_ok, done, result = self._verify_logprobs(text + committed, drafts)
                else:
                    commit, n_ok, done, result = self._verify_generate(text + committed, drafts, k_round)
                t2 = time.perf_counter_ns()
                commit = commit[: max_tokens - n_committed]
                produced = _commit_ids(context, draft_ids, n_ok, commit, piece_ids)
                committed += "".join(commit)
                n_committed += len(commit)
                tally.add((t0, t1, t2), result.bytes_up, result.bytes_down, len(drafts), n_ok, len(commit))
                tally.server(result.server_timings)
                finished = done or not commit
                if self.adaptive and drafts:
                    tally.adapt(self.k, len(drafts), n_ok)
        except RequestError as exc:
            return _failed(record, exc.error_type, exc.message)
        return self._finish(
            record,
            (start, time.perf_counter_ns()),
            tally,
            n_committed,
            max_tokens,
            committed,
            {
                "protocol": self.protocol,
                "retokenization_checks": checks,
                "retokenization_divergences": divergences,
                "unchecked_rounds": unchecked,
                "lossless": divergences == 0 and unchecked == 0,
                "lossless_basis": _basis(self.protocol, divergences, unchecked),
            },
        )

    def _finish(
        self,
        record: Measurement,
        span: tuple[int, int],
        tally: _Tally,
        n_committed: int,
        max_tokens: int,
        output_text: str,
        protocol_fields: dict[str, Any],
    ) -> Window:
        """The record of a request whose rounds ended: timings, output and ``ext.collab``, the same for every protocol
        apart from ``protocol_fields``. ``span``: the request's start and end on ``perf_counter_ns``."""
        start, end = span
        if not tally.stamps:
            return _failed(record, "empty_answer", "no token was committed")
        fill_timings(record, start, tally.stamps)
        record.output_tokens = n_committed
        record.output_text = output_text
        record.stop_reason = "max_tokens" if n_committed >= max_tokens else "eos"
        network_ms = tally.rounds * self.rtt_ms if self.rtt_ms is not None else None
        total_ms = (end - start) / 1e6
        if not self.adaptive and isinstance(record.ext.get("settings"), dict):
            record.ext["settings"]["draft_tokens"] = self.k  # a setting of this series (lens_core.settings)
        record.ext["collab"] = {
            "strategy": "speculative",
            "protocol": self.protocol,
            "protocol_reason": self.protocol_reason,
            "draft_tokens": self.k,
            "adaptive": self.adaptive,
            "rounds": tally.rounds,
            "drafted": tally.drafted,
            "accepted": tally.accepted,
            "acceptance_rate": tally.accepted / tally.drafted if tally.drafted else None,
            "mean_accepted_length": 1 + tally.accepted / tally.rounds if tally.rounds else None,
            "edge_time_ms": tally.draft_ns / 1e6,
            "cloud_time_ms": tally.verify_ns / 1e6 - (network_ms or 0.0),
            "verify_time_ms": tally.verify_ns / 1e6,
            "network_time_ms": network_ms,
            "rtt_ms": self.rtt_ms,
            "network_time_source": "rounds × TCP connect RTT" if network_ms is not None else "RTT unknown",
            "collaboration_overhead_ms": total_ms - (tally.draft_ns + tally.verify_ns) / 1e6,
            "total_duration_ms": total_ms,
            "tokens_per_second": n_committed / (total_ms / 1000) if total_ms else None,
            "bytes_up": tally.bytes_up,
            "bytes_down": tally.bytes_down,
            "bytes_per_committed_token": (tally.bytes_up + tally.bytes_down) / n_committed,
            "round_us": tally.round_us(start),
            "rounds_kept": len(tally.round_times),
            **_server_of(self.client.settings.url),
            **tally.server_fields(),
            **protocol_fields,
        }
        return start, tally.stamps[0], tally.stamps[-1]

    def _measure_tokens(self, record: Measurement, text: str, max_tokens: int) -> Window:
        """The token protocol (llama-server): ids both ways, nothing re-tokenized after the prompt."""
        record.strategy = "speculative"
        vllm = self.client.token_api == "vllm"
        record.engine = f"llama.cpp draft + {self.client.token_api} token-id verify"
        eog = self._eog_ids()
        start = time.perf_counter_ns()
        self.last_ids = []
        ids: list[int] = []
        tally = _Tally(self.k)
        finished = False
        try:
            prompt = self.engine.tokenize(text)  # with the BOS the server adds to a text prompt
            while len(ids) < max_tokens and not finished:
                left = max_tokens - len(ids)
                k_round = tally.draft_length(left)
                t0 = time.perf_counter_ns()
                draft_ids: list[int] = []
                if k_round:
                    self.engine.sync_context(prompt + ids)
                    draft_ids = self.engine.draft(k_round)
                t1 = time.perf_counter_ns()
                if vllm and draft_ids:  # one forward pass over the draft: the target's greedy id at each position
                    exclude = eog if self.ignore_eos else frozenset()
                    answer = self.runner.run(self.client.verify_draft(prompt + ids, draft_ids, exclude))
                else:  # the server greedily generates k + 1 ids from the same ids
                    answer = self.runner.run(
                        self.client.complete_tokens(prompt + ids, k_round + 1, extra=self._token_extra())
                    )
                t2 = time.perf_counter_ns()
                cloud = answer.ids
                eos = answer.stop_type == "eos"
                cut = next((i for i, t in enumerate(cloud) if t in eog), None)
                if cut is not None:
                    cloud, eos = cloud[:cut], True
                if not cloud and not eos:
                    raise RequestError("malformed_response", "POST /completion answered no token ids")
                n_ok = 0
                for mine, theirs in zip(draft_ids, cloud, strict=False):
                    if mine != theirs:
                        break
                    n_ok += 1
                commit = cloud[: min(n_ok + 1, left)]
                ids.extend(commit)
                tally.add(
                    (t0, t1, t2),
                    answer.bytes_up,
                    answer.bytes_down,
                    len(draft_ids),
                    min(n_ok, len(commit)),
                    len(commit),
                )
                tally.server(parse_server_timings(answer.timings))
                finished = not commit or (eos and len(commit) == len(cloud))
                if self.adaptive and draft_ids:
                    tally.adapt(self.k, len(draft_ids), n_ok)
        except RequestError as exc:
            return _failed(record, exc.error_type, exc.message)
        end = time.perf_counter_ns()
        if tally.stamps:
            self.last_ids = ids
        output_text = b"".join(self.engine.piece(t) for t in ids).decode("utf-8", "replace")
        return self._finish(
            record,
            (start, end),
            tally,
            len(ids),
            max_tokens,
            output_text,
            {
                "protocol": "tokens",
                "token_api": self.client.token_api,
                "verifier": "prompt_logprobs: one forward pass over the draft"
                if vllm
                else "greedy generation of k + 1 ids",
                "retokenization_checks": 0,
                "retokenization_divergences": 0,
                "unchecked_rounds": 0,
                "lossless": True,
                "lossless_basis": TOKENS_BASIS,
            },
        )

    def _cloud(self, prompt: str, **kw: Any) -> CloudResult:
        result = self.runner.run(self.client.complete(prompt, stream=False, **kw))
        if not result.ok:
            raise RequestError(result.error_type or "cloud_error", result.error_message or "")
        return result

    def _verify_generate(self, context: str, drafts: list[bytes], k: int) -> tuple[list[str], int, bool, CloudResult]:
        result = self._cloud(context, max_tokens=k + 1, extra={"logprobs": 1})
        tokens = logprob_tokens(result.logprobs)
        if not tokens and result.text:
            raise RequestError("malformed_response", "the endpoint returned no per-token logprobs (logprobs=1)")
        n_ok = 0
        for piece, cloud in zip(drafts, tokens, strict=False):
            if piece.decode("utf-8", "replace") != cloud:
                break
            n_ok += 1
        commit = tokens[: n_ok + 1]
        done = result.finish_reason == "stop" and len(commit) == len(tokens)
        return commit, n_ok, done, result

    def _verify_logprobs(self, context: str, drafts: list[bytes]) -> tuple[list[str], int, bool, CloudResult]:
        texts = [d.decode("utf-8", "replace") for d in drafts]
        result = self._cloud(context + "".join(texts), max_tokens=1, extra={"logprobs": 1, "echo": True})
        lp = result.logprobs or {}
        tokens, tops = list(lp.get("tokens") or []), list(lp.get("top_logprobs") or [])
        if not tokens or len(tops) != len(tokens):
            raise RequestError("malformed_response", "the endpoint did not echo prompt logprobs (echo + logprobs=1)")
        generated = tokens[-1] if result.finish_reason != "stop" else None
        rows = tokens[:-1] if generated is not None else tokens
        # the draft occupies the last rows of the echoed prompt, one server token per draft token
        first = len(rows) - len(texts)
        n_ok = 0
        correction = None
        for j, piece in enumerate(texts):
            row = first + j
            top = tops[row] if 0 <= row < len(tops) else None
            best = max(top.items(), key=lambda kv: kv[1])[0] if isinstance(top, dict) and top else None
            if row < 0 or rows[row] != piece or best != piece:
                correction = best
                break
            n_ok += 1
        if correction is not None:
            return [*texts[:n_ok], correction], n_ok, False, result
        if generated is None:
            return texts, n_ok, True, result
        return [*texts, generated], n_ok, False, result


MAX_ROUNDS_KEPT = 256  # per request, in ext.collab.round_us (6 values each: well inside the record's ext bounds)


def _server_of(url: str) -> dict[str, Any]:
    """``server_address`` and ``server_port`` of the cloud endpoint (no path, no credentials)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return {"server_address": parts.hostname, "server_port": port} if parts.hostname else {}


@dataclass
class _Tally:
    """What a request's rounds add up to, whatever the protocol: draft length, stamps, counts, times, bytes."""

    k: int
    stamps: list[int] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    draft_ns: int = 0
    verify_ns: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    # the first MAX_ROUNDS_KEPT rounds as [start, draft, verify] in ns (perf_counter) with drafted and accepted: the
    # record's ext.collab.round_us (each round a span in an OTLP trace)
    round_times: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    server_ms: float = 0.0  # the server's own prompt + predicted ms, summed over the rounds that reported them
    server_rounds: int = 0  # rounds whose answer carried the server's timings (llama-server does; most others not)

    def server(self, timings: dict[str, float] | None) -> None:
        """A round's server-side timings (parsed: see ``parse_server_timings``), when the server sent both times."""
        if timings and "prompt_ms" in timings and "predicted_ms" in timings:
            self.server_ms += timings["prompt_ms"] + timings["predicted_ms"]
            self.server_rounds += 1

    def server_fields(self) -> dict[str, Any]:
        """``server_time_ms`` beside the lens's ``verify_time_ms``, and what is left of it: network, queueing,
        HTTP and JSON. Only when every round reported its timings: a partial sum would understate the server."""
        if not self.rounds or self.server_rounds != self.rounds:
            return {
                "server_time_ms": None,
                "server_time_source": f"server timings in {self.server_rounds} of {self.rounds} rounds",
                "verify_minus_server_ms": None,
            }
        return {
            "server_time_ms": self.server_ms,
            "server_time_source": "sum over the rounds of the server's timings (prompt_ms + predicted_ms)",
            "verify_minus_server_ms": self.verify_ns / 1e6 - self.server_ms,
        }

    def draft_length(self, left: int) -> int:
        """Tokens to draft this round with ``left`` still to commit: the verifier adds one, so at most left − 1."""
        return max(1, min(self.k, left - 1)) if left > 1 else 0

    def add(self, times: tuple[int, int, int], up: int, down: int, drafted: int, accepted: int, committed: int) -> None:
        """One round: ``times`` = (start, drafted, verified) on ``perf_counter_ns``; its tokens commit when verified."""
        t0, t1, t2 = times
        self.draft_ns += t1 - t0
        self.verify_ns += t2 - t1
        self.bytes_up += up
        self.bytes_down += down
        self.stamps.extend([t2] * committed)
        self.drafted += drafted
        self.accepted += accepted
        self.rounds += 1
        if len(self.round_times) < MAX_ROUNDS_KEPT:
            self.round_times.append((t0, t1 - t0, t2 - t1, drafted, accepted))

    def round_us(self, start_ns: int) -> list[list[int]]:
        """``ext.collab.round_us``: [start offset from the request's start, draft, verify] in µs, drafted, accepted."""
        return [
            [(t0 - start_ns) // 1000, draft // 1000, verify // 1000, drafted, accepted]
            for t0, draft, verify, drafted, accepted in self.round_times
        ]

    def adapt(self, base_k: int, drafted: int, accepted: int) -> None:
        """Adaptive draft length: one longer after a fully accepted draft (up to 2 × ``base_k``), else what was
        accepted plus one."""
        self.k = min(base_k * 2, self.k + 1) if accepted == drafted else max(1, accepted + 1)


def _failed(record: Measurement, error_type: str, message: str) -> Window:
    record.ok = False
    record.error_type = error_type
    record.error_message = message
    return None


VOCAB_PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog; then she sat on the mat, and the cat ran in. "
    "0123456789 +-*/=<>()[]{} \"quoted\" 'single' #tag @user ~ ^ | & % $ ! ? … ÄÖÜ ß é ñ 中文 🙂\n\tEnd."
)


def check_vocabulary(engine: LlamaEngine, client: CloudClient, runner: LoopRunner) -> str:
    """Before a run with the token protocol: the draft's vocabulary must be the server's. Compares the token count
    (``GET /v1/models`` ``data[0].meta.n_vocab``, when the server says), the ids of a probe text tokenized on both
    sides (without BOS: servers differ in adding it), and a sample of ids detokenized on both sides. Returns what
    was compared; a mismatch raises :class:`UsageError` naming both sides."""
    where = client.root_url
    try:
        n_server = runner.run(client.n_vocab())
        server_ids = runner.run(client.tokenize(VOCAB_PROBE_TEXT, add_special=False))
        sample = _detokenize_sample(engine)
        server_text = runner.run(client.detokenize(sample))
    except RequestError as exc:
        raise UsageError(f"{where}: the vocabulary check failed ({exc.error_type}: {exc.message[:160]})") from None
    if n_server is not None and n_server != engine.n_vocab:
        raise UsageError(
            f"{where}: the server's vocabulary has {n_server} tokens, the draft model's {engine.n_vocab}: "
            "the token protocol needs the same vocabulary on both sides"
        )
    local_ids = engine.tokenize(VOCAB_PROBE_TEXT, add_bos=False)
    if local_ids != server_ids:
        at = next((i for i, (a, b) in enumerate(zip(local_ids, server_ids, strict=False)) if a != b), None)
        at = min(len(local_ids), len(server_ids)) if at is None else at
        raise UsageError(
            f"{where}: the draft and the server tokenize a probe text differently (ids digest draft "
            f"{_digest(local_ids)} vs server {_digest(server_ids)}, {len(local_ids)} vs {len(server_ids)} ids, first "
            f"difference at id {at}): the token protocol needs the same vocabulary on both sides"
        )
    local_text = b"".join(engine.piece(t) for t in sample).decode("utf-8", "replace")
    if local_text != server_text:
        raise UsageError(
            f"{where}: the draft and the server detokenize {len(sample)} sample ids differently (text digest draft "
            f"{_digest(local_text)} vs server {_digest(server_text)}): the token protocol needs the same vocabulary "
            "on both sides"
        )
    count = f"{engine.n_vocab} tokens on both sides" if n_server is not None else f"{engine.n_vocab} tokens (draft)"
    return (
        f"vocabulary checked: {count}; a probe text's {len(local_ids)} ids (digest {_digest(local_ids)}) and "
        f"{len(sample)} sample ids detokenized agree"
    )


def _detokenize_sample(engine: LlamaEngine, n: int = 64) -> list[int]:
    """Up to ``n`` ids spread over the vocabulary whose pieces are non-empty UTF-8 on their own (control tokens,
    which the server renders and the draft does not, and lone bytes of a multi-byte character are left out)."""
    usable = []
    for token in range(engine.n_vocab):
        raw = engine.piece(token)
        try:
            if raw and raw.decode("utf-8"):
                usable.append(token)
        except UnicodeDecodeError:
            continue
    step = max(1, len(usable) // n)
    return usable[::step][:n]


def _digest(value: list[int] | str) -> str:
    data = value.encode() if isinstance(value, str) else json.dumps(value).encode()
    return hashlib.sha256(data).hexdigest()[:12]


TOKENS_BASIS = "token protocol: committed ids are the server's own greedy ids"


def first_difference(committed: Sequence[Any], reference: Sequence[Any], width: int) -> dict[str, Any]:
    """Where two outputs (text or ids) part: the offset and ``width`` items of each from there."""
    at = next(
        (i for i, (a, b) in enumerate(zip(committed, reference, strict=False)) if a != b),
        min(len(committed), len(reference)),
    )
    return {"offset": at, "committed": committed[at : at + width], "cloud": reference[at : at + width]}


def count_divergence(retokenized: list[int], produced: list[int]) -> int:
    """1 when the ids a text re-tokenizes into are not the ids produced for it, else 0 (a list comparison)."""
    return 0 if retokenized == produced else 1


def _commit_ids(
    context: list[int], draft_ids: list[int], n_ok: int, commit: list[str], piece_ids: dict[str, int]
) -> list[int] | None:
    """The token ids the next round's context was produced as: this round's context, the accepted draft ids, and
    the cloud's own pieces (correction, bonus token) mapped to their ids; None when a cloud piece maps to no id.

    After a divergence the baseline is the re-tokenized context, the one both sides conditioned on: each divergence
    is counted once, in the round it appears."""
    ids = context + draft_ids[: min(n_ok, len(commit))]
    for piece in commit[n_ok:]:
        if not piece:
            continue  # an end-of-generation token: no text, nothing in the next context
        token = piece_ids.get(piece)
        if token is None:
            return None
        ids.append(token)
    return ids


def _basis(protocol: str, divergences: int, unchecked: int) -> str:
    checked = "context re-tokenized and compared with the produced tokens each round"
    if protocol == "logprobs":
        checked += ", and the echoed context + draft"
    if unchecked:
        return f"text protocol; {unchecked} round(s) unchecked: a cloud piece maps to no token id"
    if divergences:
        return f"text protocol; {checked}: {divergences} divergence(s)"
    return f"text protocol; {checked}: none diverged"
