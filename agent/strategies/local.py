"""The local strategy: the lens's own timed llama.cpp loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..engines.llama import Generation, LlamaEngine
from ..errors import RequestError
from ..measurement import Measurement
from ..memory import ProcessMemory
from .base import Window, fill_timings


class LocalOptions(Protocol):
    """The request options the local loop reads (a :class:`~agent.bench.runner.BenchOptions` has them)."""

    @property
    def ignore_eos(self) -> bool: ...

    @property
    def reuse_cache(self) -> bool: ...


def _engine_figures(gen: Generation, prefill_tokens: int) -> dict[str, Any]:
    """llama.cpp's own counters for the request, or None where they do not describe it.

    llama.cpp counts any multi-token batch as prompt eval and a single-token batch as eval, and clamps both
    counts to ≥ 1. So its prefill figure only describes a prompt of ≥ 2 new tokens, and its decode figure only
    a request that decoded ≥ 1 token after the first.
    """
    n_decoded = len(gen.tokens) - 1
    clean = prefill_tokens >= 2
    return {
        "engine_prefill_ms": gen.perf["t_p_eval_ms"] if clean else None,
        "engine_prefill_tokens": int(gen.perf["n_p_eval"]) if clean else None,
        "engine_decode_ms": gen.perf["t_eval_ms"] if clean and n_decoded >= 1 else None,
        "engine_decode_tokens": int(gen.perf["n_eval"]) if clean and n_decoded >= 1 else None,
    }


@dataclass
class LocalStrategy:
    """The lens's low-level llama.cpp loop, with llama.cpp's own counters and peak RSS per request."""

    engine: LlamaEngine
    options: LocalOptions
    memory: ProcessMemory = field(default_factory=ProcessMemory)
    name: str = "local"

    def measure(self, record: Measurement, text: str, max_tokens: int) -> Window:
        engine, memory, options = self.engine, self.memory, self.options
        memory.reset_peak()
        record.rss_before_bytes = memory.read().rss_bytes
        cached_before = len(engine._cached) if options.reuse_cache else 0
        try:
            gen = engine.generate(
                text, max_tokens=max_tokens, ignore_eos=options.ignore_eos, reuse_cache=options.reuse_cache
            )
        except RequestError as exc:
            engine.requests_since_load += 1
            record.ok = False
            record.error_type = exc.error_type
            record.error_message = exc.message
            return None
        after = memory.read()
        if memory.peak_resettable and after.hwm_bytes is not None:
            record.rss_peak_bytes, record.rss_peak_source = after.hwm_bytes, "VmHWM"
        else:
            record.rss_peak_bytes, record.rss_peak_source = after.rss_bytes, "rss_after"
        fill_timings(record, gen.start_ns, gen.token_ns)
        record.stop_reason = gen.stop_reason
        record.input_tokens = gen.input_tokens
        record.output_tokens = len(gen.tokens)
        record.prefill_ms = gen.prefill_ns / 1e6
        prefill_tokens = gen.input_tokens - min(cached_before, gen.input_tokens - 1)
        for key, value in _engine_figures(gen, prefill_tokens).items():
            setattr(record, key, value)
        record.output_text = gen.text
        return gen.start_ns, gen.token_ns[0], gen.token_ns[-1]
