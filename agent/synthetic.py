"""A seeded generator of realistic local-inference records, for the wire-size benchmark and load tests.

Records look like what ``lens-agent bench`` stores: 63–127 inter-token gaps at microsecond resolution, prefill
proportional to the prompt, a few devices, models and prompts, and an occasional failed request.

The gap model is calibrated on SmolLM2 runs measured here (``lens-agent bench --ignore-eos --raw``, 128 tokens):
the first gaps are ~1.4× the steady state and decay within a few tokens; steady-state jitter is ~100 µs of
scheduler noise plus ~2 % of the decode time, correlated from one token to the next (lag-1 ≈ 0.5); about 1 % of
gaps stall 2–6×. Decode times per device follow published edge figures (ANCHORS §6): 3.2 ms (SmolLM2 on this
laptop-class CPU), 6 ms (SmolLM2 on an Orin Nano), 20–40 ms (1.5–8B models on Orin boards).
"""

from __future__ import annotations

import hashlib
import math
import random
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from .measurement import RECORD_VERSION

# (model, quantization, steady decode time per token in µs)
_PROFILES = [
    ("SmolLM2-135M-Instruct", "Q4_1", 3200.0),
    ("SmolLM2-135M-Instruct", "Q4_1", 6000.0),
    ("Qwen2.5-1.5B-Instruct", "Q4_K_M", 31000.0),
    ("Llama-3.2-3B-Instruct", "Q4_K_M", 20000.0),
    ("Llama-3.1-8B-Instruct", "Q4_K_M", 40000.0),
]


def _uuid7(rng: random.Random, unix_ms: int) -> str:
    value = (unix_ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rng.getrandbits(12) << 64 | 0b10 << 62
    value |= rng.getrandbits(62)
    return str(uuid.UUID(int=value))


def _ms(us: float) -> float:
    return round(us) / 1000.0


def synthetic_records(count: int, *, seed: int = 0, device_id: str | None = None) -> list[dict[str, Any]]:
    """``count`` measurement records (``Measurement.to_dict(include_text=False)`` shape), reproducible by seed."""
    rng = random.Random(seed)
    devices = [device_id] if device_id else [f"orin-{n:03d}" for n in range(1, 6)]
    profiles = {d: _PROFILES[n % len(_PROFILES)] for n, d in enumerate(devices)}
    prompts = [hashlib.sha256(f"prompt-{n}".encode()).hexdigest() for n in range(8)]
    run_ids = {d: str(uuid.UUID(int=rng.getrandbits(128), version=4)) for d in devices}
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    records: list[dict[str, Any]] = []
    for i in range(count):
        device = devices[i % len(devices)]
        model, quant, tpot_us = profiles[device]
        when = start + timedelta(seconds=i * 7.5 + rng.random())
        unix_ms = int(when.timestamp() * 1000)
        n_gaps = rng.randint(63, 127)
        input_tokens = rng.randint(12, 180)
        failed = rng.random() < 0.01
        gaps = []
        sigma = math.hypot(100.0, 0.02 * tpot_us)
        noise = 0.0
        for n in range(n_gaps):
            noise = 0.5 * noise + math.sqrt(1 - 0.25) * rng.gauss(0.0, sigma)
            gap = tpot_us * (1 + 0.4 * math.exp(-n / 2.5)) + noise
            if rng.random() < 0.01:
                gap *= rng.uniform(2, 6)  # a stall: scheduler, thermal, page fault
            gaps.append(_ms(max(gap, 1.0)))
        prefill_us = input_tokens * tpot_us * rng.uniform(0.18, 0.25)
        ttft = _ms(prefill_us + rng.uniform(300, 900))
        decode = round(sum(gaps), 3)
        n_out = n_gaps + 1
        sha = hashlib.sha256(model.encode()).hexdigest()
        record: dict[str, Any] = {
            "run_id": run_ids[device],
            "device_id": device,
            "model_name": f"{model} {quant}",
            "model_sha256": sha,
            "strategy": "local",
            "engine": "llama.cpp",
            "id": _uuid7(rng, unix_ms),
            "kind": "inference",
            "version": RECORD_VERSION,
            "started_at": when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "prompt_index": i % len(prompts),
            "prompt_id": f"p{i % len(prompts)}",
            "prompt_sha256": prompts[i % len(prompts)],
            "warmup": False,
            "first_after_load": False,
            "ok": not failed,
            "error_type": "decode_failed" if failed else None,
            "error_message": "llama_decode returned -3 after 12 tokens" if failed else None,
            "stop_reason": None if failed else rng.choice(["eos", "max_tokens", "max_tokens"]),
            "input_tokens": input_tokens,
            "output_tokens": 0 if failed else n_out,
            "ttft_ms": None if failed else ttft,
            "tpot_ms": None if failed else round(decode / n_gaps, 3),
            "e2e_ms": None if failed else round(ttft + decode, 3),
            "prefill_ms": None if failed else _ms(prefill_us),
            "decode_ms": None if failed else decode,
            "itl_ms": [] if failed else gaps,
            "engine_prefill_ms": None if failed else _ms(prefill_us * 0.995),
            "engine_prefill_tokens": None if failed else input_tokens,
            "engine_decode_ms": None if failed else round(decode * 0.991, 3),
            "engine_decode_tokens": None if failed else n_gaps,
            "rss_before_bytes": 310_000_000 + rng.randrange(0, 4_000_000, 4096),
            "rss_peak_bytes": 322_000_000 + rng.randrange(0, 8_000_000, 4096),
            "rss_peak_source": "VmHWM",
            "ext": {},
        }
        records.append(record)
    return records
