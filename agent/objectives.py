"""What tuning searches and verifies, without the search: the settings it moves and the objectives it compares.

The service reads these after every run (a change being verified counts the run's values); the search itself
(:mod:`agent.tuning`, its worker pool and statistics) loads only when a tune runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .measurement import Measurement

# The order of the coordinate search: the settings that move decode speed most first.
DIMENSIONS = ("n_threads", "flash_attn", "n_batch", "n_gpu_layers")
OBJECTIVES = {"e2e": "e2e_ms", "tpot": "tpot_ms", "ttft": "ttft_ms"}


def values_of(records: Sequence[Measurement], objective: str) -> list[float]:
    """The objective's per-request values of successful records (what verification compares)."""
    attribute = OBJECTIVES[objective]
    return [float(v) for m in records if m.ok and not m.warmup and (v := getattr(m, attribute)) is not None and v > 0]
