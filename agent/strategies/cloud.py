"""The cloud strategy: the request streams from an OpenAI-compatible endpoint, timed chunk by chunk."""

from __future__ import annotations

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
        return cloud_record(record, result, self.rtt_ms)


def cloud_record(record: Measurement, result: CloudResult, rtt_ms: float | None) -> Window:
    n_out, source = result.output_tokens
    record.ext["network"] = {
        "rtt_ms": rtt_ms,
        "bytes_up": result.bytes_up,
        "bytes_down": result.bytes_down,
        "token_count_source": source,
        "http_status": result.http_status,
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
    return result.start_ns, result.chunk_ns[0], result.chunk_ns[-1]
