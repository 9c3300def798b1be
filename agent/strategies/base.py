"""What every request strategy shares: the interface, the time window it returns, and the timings it fills in.

A strategy turns a prompt into a :class:`~agent.measurement.Measurement` plus the request's time window (start,
first token, last token on the ``perf_counter_ns`` clock) for the power sampler. Failures become error
measurements, never exceptions.
"""

from __future__ import annotations

from typing import Protocol

from ..measurement import Measurement, timings_from_token_times

Window = tuple[int, int, int] | None  # (start_ns, first_token_ns, last_token_ns)


class Strategy(Protocol):
    name: str

    def measure(self, record: Measurement, text: str, max_tokens: int) -> Window: ...


def fill_timings(record: Measurement, start_ns: int, stamps: list[int]) -> None:
    timings = timings_from_token_times(start_ns, stamps)
    record.ttft_ms = timings["ttft_ms"]
    record.tpot_ms = timings["tpot_ms"]
    record.e2e_ms = timings["e2e_ms"]
    record.itl_ms = timings["itl_ms"]
    record.decode_ms = timings["decode_ms"] if len(stamps) > 1 else None
