"""Speculative decoding across the network: the local model drafts, the cloud verifies."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..engines.cloud import CloudClient, CloudResult, LoopRunner
from ..engines.llama import LlamaEngine
from ..errors import RequestError
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
    """

    engine: LlamaEngine
    client: CloudClient
    runner: LoopRunner
    k: int = 4
    protocol: str = "generate"
    adaptive: bool = False
    rtt_ms: float | None = None
    name: str = "speculative"
    references: dict[tuple[str, int], str | None] = field(default_factory=dict)
    _piece_ids: dict[str, int] | None = field(default=None, init=False, repr=False)

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
            at = next(
                (i for i, (a, b) in enumerate(zip(committed, reference, strict=False)) if a != b),
                min(len(committed), len(reference)),
            )
            collab["greedy_mismatch"] = {
                "offset": at,
                "committed": committed[at : at + 40],
                "cloud": reference[at : at + 40],
            }

    def measure(self, record: Measurement, text: str, max_tokens: int) -> Window:
        record.strategy = "speculative"
        record.engine = "llama.cpp draft + openai-compatible verify"
        piece_ids = self.piece_ids()
        start = time.perf_counter_ns()
        committed = ""
        n_committed = 0
        produced: list[int] | None = None  # prompt ids + the ids of the committed pieces, as produced
        divergences = checks = unchecked = 0
        stamps: list[int] = []
        drafted = accepted = rounds = 0
        draft_ns = verify_ns = 0
        bytes_up = bytes_down = 0
        k = self.k
        finished = False
        try:
            while n_committed < max_tokens and not finished:
                k_round = max(1, min(k, max_tokens - n_committed - 1)) if max_tokens - n_committed > 1 else 0
                t0 = time.perf_counter_ns()
                drafts: list[bytes] = []
                draft_ids: list[int] = []
                context = self.engine.tokenize(text + committed)
                if produced is not None:
                    checks += 1
                    divergences += count_divergence(context, produced)
                elif rounds:
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
                draft_ns += t1 - t0
                verify_ns += t2 - t1
                bytes_up += result.bytes_up
                bytes_down += result.bytes_down
                commit = commit[: max_tokens - n_committed]
                produced = _commit_ids(context, draft_ids, n_ok, commit, piece_ids)
                committed += "".join(commit)
                n_committed += len(commit)
                stamps.extend([t2] * len(commit))
                drafted += len(drafts)
                accepted += n_ok
                rounds += 1
                finished = done or not commit
                if self.adaptive and drafts:
                    k = min(self.k * 2, k + 1) if n_ok == len(drafts) else max(1, n_ok + 1)
        except RequestError as exc:
            record.ok = False
            record.error_type = exc.error_type
            record.error_message = exc.message
            return None
        end = time.perf_counter_ns()
        if not stamps:
            record.ok = False
            record.error_type = "empty_answer"
            record.error_message = "no token was committed"
            return None
        fill_timings(record, start, stamps)
        record.output_tokens = n_committed
        record.output_text = committed
        record.stop_reason = "max_tokens" if n_committed >= max_tokens else "eos"
        network_ms = rounds * self.rtt_ms if self.rtt_ms is not None else None
        total_ms = (end - start) / 1e6
        record.ext["collab"] = {
            "strategy": "speculative",
            "protocol": self.protocol,
            "draft_tokens": self.k,
            "adaptive": self.adaptive,
            "rounds": rounds,
            "drafted": drafted,
            "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else None,
            "mean_accepted_length": 1 + accepted / rounds if rounds else None,
            "edge_time_ms": draft_ns / 1e6,
            "cloud_time_ms": verify_ns / 1e6 - (network_ms or 0.0),
            "verify_time_ms": verify_ns / 1e6,
            "network_time_ms": network_ms,
            "network_time_source": "rounds × TCP connect RTT" if network_ms is not None else "RTT unknown",
            "collaboration_overhead_ms": total_ms - (draft_ns + verify_ns) / 1e6,
            "total_duration_ms": total_ms,
            "tokens_per_second": n_committed / (total_ms / 1000) if total_ms else None,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "bytes_per_committed_token": (bytes_up + bytes_down) / n_committed,
            "retokenization_checks": checks,
            "retokenization_divergences": divergences,
            "unchecked_rounds": unchecked,
            "lossless": divergences == 0 and unchecked == 0,
            "lossless_basis": _basis(self.protocol, divergences, unchecked),
        }
        return start, stamps[0], stamps[-1]

    def _cloud(self, prompt: str, **kw: Any) -> CloudResult:
        result = self.runner.run(self.client.complete(prompt, stream=False, **kw))
        if not result.ok:
            raise RequestError(result.error_type or "cloud_error", result.error_message or "")
        return result

    def _verify_generate(self, context: str, drafts: list[bytes], k: int) -> tuple[list[str], int, bool, CloudResult]:
        result = self._cloud(context, max_tokens=k + 1, extra={"logprobs": 1})
        tokens = list((result.logprobs or {}).get("tokens") or [])
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
