"""The one record shape of a measurement.

A :class:`Measurement` is what one timed request produced. ``to_dict()`` turns it into a plain dict of
primitives (str, int, float, bool, None, lists and dicts of those): the ``--raw`` JSON lines, the wire format and
the outbox all use that dict, so the shape is defined here and nowhere else. ``RECORD_VERSION`` changes only when
a field changes meaning; new optional fields go into ``ext`` or are added with a default.

Times are milliseconds measured on the monotonic clock (``time.perf_counter_ns``) from the request start;
``started_at`` is the wall-clock (UTC) start for humans and for aligning devices. Fields whose value is unknown
are ``None``, never zero.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

RECORD_VERSION = 1


def new_record_id() -> str:
    """A time-ordered UUIDv7 (RFC 9562): 48-bit Unix milliseconds, version and variant bits, 74 random bits."""
    unix_ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (unix_ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class Measurement:
    """One timed request. See docs/bench.md for every field."""

    # identity
    run_id: str
    device_id: str
    model_name: str
    model_sha256: str | None
    strategy: str = "local"
    engine: str = "llama.cpp"
    id: str = field(default_factory=new_record_id)
    kind: str = "inference"
    version: int = RECORD_VERSION
    started_at: str = field(default_factory=utc_now_iso)
    prompt_index: int = 0
    prompt_id: str | None = None
    prompt_sha256: str | None = None
    warmup: bool = False
    first_after_load: bool = False
    # outcome
    ok: bool = True
    error_type: str | None = None
    error_message: str | None = None
    stop_reason: str | None = None  # "eos", "max_tokens", "context_full"
    # tokens, counted from token ids
    input_tokens: int | None = None
    output_tokens: int = 0
    # the lens's wall-clock figures (ms)
    ttft_ms: float | None = None
    tpot_ms: float | None = None  # (e2e − TTFT) / (N − 1); None when N ≤ 1
    e2e_ms: float | None = None
    prefill_ms: float | None = None  # wall time of the prompt's llama_decode calls
    decode_ms: float | None = None  # e2e − TTFT: tokens 2..N
    itl_ms: list[float] = field(default_factory=list)  # every gap between consecutive tokens
    # llama.cpp's own counters for this request (llama_perf_context)
    engine_prefill_ms: float | None = None
    engine_prefill_tokens: int | None = None
    engine_decode_ms: float | None = None
    engine_decode_tokens: int | None = None
    # memory (bytes)
    rss_before_bytes: int | None = None
    rss_peak_bytes: int | None = None
    rss_peak_source: str | None = None  # "VmHWM" (reset per request) or "rss_after"
    # private: only kept on the device unless the config says otherwise
    prompt_text: str | None = None
    output_text: str | None = None
    # extension slot: power, collaboration and other fields added without a new record version
    ext: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float | None:
        """Output tokens ÷ e2e for this request."""
        if not self.ok or not self.e2e_ms or self.output_tokens <= 0:
            return None
        return self.output_tokens / (self.e2e_ms / 1000.0)

    def to_dict(self, *, include_text: bool = True) -> dict[str, Any]:
        record = asdict(self)
        if not include_text:
            record.pop("prompt_text")
            record.pop("output_text")
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Measurement:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in record.items() if k in known})


def timings_from_token_times(start_ns: int, token_ns: list[int]) -> dict[str, Any]:
    """TTFT, every inter-token gap, TPOT and e2e (all ms) from the request start and each token's timestamp.

    The pure core of the lens's timing: every engine records ``perf_counter_ns`` when a token becomes available
    and hands the list here.
    """
    if not token_ns:
        return {"ttft_ms": None, "itl_ms": [], "tpot_ms": None, "e2e_ms": None, "decode_ms": None}
    ttft = (token_ns[0] - start_ns) / 1e6
    e2e = (token_ns[-1] - start_ns) / 1e6
    gaps = [(b - a) / 1e6 for a, b in itertools.pairwise(token_ns)]
    n = len(token_ns)
    return {
        "ttft_ms": ttft,
        "itl_ms": gaps,
        "tpot_ms": (e2e - ttft) / (n - 1) if n > 1 else None,
        "e2e_ms": e2e,
        "decode_ms": e2e - ttft,
    }
