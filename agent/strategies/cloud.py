"""The cloud strategy: the request streams from an OpenAI-compatible endpoint, timed chunk by chunk.

When the server reports its own per-request timings (llama.cpp's ``llama-server`` does, on ``/v1/completions`` and
``/v1/chat/completions``), they are recorded beside the lens's figures in ``ext.server_timings``, with what the
difference says: the time outside the server's prompt and generation (network, HTTP, tokenization, queueing).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any

from ..engines.cloud import CloudClient, CloudResult, LoopRunner
from ..measurement import Measurement
from .base import Window, fill_timings


@dataclass
class CloudStrategy:
    client: CloudClient
    runner: LoopRunner
    rtt_ms: float | None = None
    name: str = "cloud"

    def measure(self, record: Measurement, text: str, max_tokens: int) -> Window:
        record.strategy = "cloud"
        record.engine = "openai-compatible"
        prompt: Any = [{"role": "user", "content": text}] if self.client.settings.chat else text
        result = self.runner.run(self.client.complete(prompt, max_tokens=max_tokens, stream=True))
        window = cloud_record(record, result, self.rtt_ms)
        parts = urllib.parse.urlsplit(self.client.settings.url)
        if parts.hostname:
            record.ext["network"]["server_address"] = parts.hostname
            record.ext["network"]["server_port"] = parts.port or (443 if parts.scheme == "https" else 80)
        if self.client.settings.model:
            record.ext["network"]["model"] = self.client.settings.model
        return window


def cloud_record(record: Measurement, result: CloudResult, rtt_ms: float | None) -> Window:
    n_out, source = result.output_tokens
    record.ext["network"] = {
        "rtt_ms": rtt_ms,
        "bytes_up": result.bytes_up,
        "bytes_down": result.bytes_down,
        "token_count_source": source,
        "http_status": result.http_status,
        "path": result.path,
    }
    if not result.ok:
        record.ok = False
        record.error_type = result.error_type
        record.error_message = result.error_message
        return None
    if not result.chunk_ns:
        record.ok = False
        record.error_type = "empty_answer"
        hint = (
            "; a chat model asked on /v1/completions does that: use --cloud-api chat"
            if "chat" not in result.path
            else ""
        )
        record.error_message = (
            f"{result.path} answered HTTP {result.http_status} without any text "
            f"(finish_reason {result.finish_reason or 'none'}){hint}"
        )
        return None
    fill_timings(record, result.start_ns, result.chunk_ns)
    record.output_tokens = n_out
    record.input_tokens = (result.usage or {}).get("prompt_tokens")
    record.stop_reason = {"length": "max_tokens", "stop": "eos"}.get(result.finish_reason or "", result.finish_reason)
    record.output_text = result.text
    if result.server_timings:
        record.ext["server_timings"] = server_timings_ext(result.server_timings, record.ttft_ms, record.e2e_ms)
    return result.start_ns, result.chunk_ns[0], result.chunk_ns[-1]


SERVER_TIMINGS_SOURCE = "llama-server timings"


def server_timings_ext(
    timings: dict[str, float], ttft_ms: float | None, e2e_ms: float | None
) -> dict[str, float | int | str | None]:
    """``ext.server_timings``: the server's own figures for the request and how the lens's compare.

    ``server_ttft_ms`` is the server's prompt time (its ``prompt_ms``: from the task's start to the end of the
    prompt; the first token comes out of that pass). ``server_tpot_ms`` is ``predicted_ms / (predicted_n − 1)``:
    the first generated token costs no decode step, so n tokens are n − 1 steps (as llama.cpp's own
    ``predicted_per_token_ms`` counts them); ``None`` for one token. ``network_and_queue_ms`` = lens e2e −
    (prompt_ms + predicted_ms): everything the server's clock does not cover — both directions on the network,
    HTTP, tokenization and chat templating, waiting for a slot, the lens's own client work.
    ``ttft_minus_server_prompt_ms`` = lens TTFT − prompt_ms: the same for the first token. A figure whose inputs the
    server did not report is ``None``.
    """
    prompt_ms = timings.get("prompt_ms")
    predicted_ms = timings.get("predicted_ms")
    predicted_n = timings.get("predicted_n")
    out: dict[str, float | int | str | None] = {
        "source": SERVER_TIMINGS_SOURCE,
        "prompt_ms": prompt_ms,
        "prompt_n": timings.get("prompt_n"),
        "cache_n": timings.get("cache_n"),
        "predicted_ms": predicted_ms,
        "predicted_n": predicted_n,
        "server_ttft_ms": prompt_ms,
        "server_tpot_ms": (
            predicted_ms / (predicted_n - 1) if predicted_ms is not None and predicted_n and predicted_n > 1 else None
        ),
        "network_and_queue_ms": (
            e2e_ms - (prompt_ms + predicted_ms)
            if e2e_ms is not None and prompt_ms is not None and predicted_ms is not None
            else None
        ),
        "ttft_minus_server_prompt_ms": ttft_ms - prompt_ms if ttft_ms is not None and prompt_ms is not None else None,
    }
    return out
