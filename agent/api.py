"""Measure an application's own ``llama_cpp.Llama`` calls.

Two ways, for two needs:

* :func:`measure` runs the lens's own low-level timed loop on the application's model (greedy), the same
  loop ``lens-agent bench`` uses: the figures are directly comparable with a benchmark.
* :func:`measured_completion` wraps the application's own ``create_completion`` call (any sampling
  parameters, streaming or not) and stamps each token through a ``stopping_criteria`` callback, which
  llama-cpp-python calls once per sampled token. It times what the application really does, including the
  high-level API's own per-token cost.

Example::

    from llama_cpp import Llama
    from agent.api import measured_completion

    llm = Llama("model.gguf", verbose=False)
    completion, m = measured_completion(llm, "Hello", max_tokens=32)
    print(m.ttft_ms, m.tpot_ms, m.output_tokens)

Quiet by default: importing this module sends llama.cpp's own log (the model loader's metadata dump, context setup,
performance prints: some 2,000 lines for a model load) to the Python logger ``llama.cpp`` instead of the terminal,
and that logger has a ``NullHandler``, so an application that configures no logging sees none of it. One that does
sees those lines at llama.cpp's own levels (its info at INFO); ``logging.getLogger("llama.cpp").setLevel(...)``
chooses. ``verbose=False`` keeps llama-cpp-python's own prints (``Model metadata: …``) quiet as well.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from typing import Any

from .bench.runner import BenchOptions, measure_request
from .engines.llama import LlamaEngine, _route_llama_logs
from .measurement import Measurement
from .memory import ProcessMemory
from .prompts import Prompt
from .strategies import fill_timings

_ENGINE_ATTR = "_lens_engine"

# llama.cpp's log through Python logging, silent unless the application configures logging (a library's manners)
logging.getLogger("llama.cpp").addHandler(logging.NullHandler())
_route_llama_logs()


def _engine_for(llm: Any) -> LlamaEngine:
    engine = getattr(llm, _ENGINE_ATTR, None)
    if engine is None:
        engine = LlamaEngine.from_llama(llm)
        setattr(llm, _ENGINE_ATTR, engine)
    return engine


def measure(
    llm: Any,
    prompt: str,
    *,
    max_tokens: int = 128,
    ignore_eos: bool = False,
    run_id: str | None = None,
    device_id: str | None = None,
) -> Measurement:
    """Time one greedy request on ``llm`` with the lens's low-level loop (KV cache cleared first)."""
    engine = _engine_for(llm)
    options = BenchOptions(runs=1, warmup=0, max_tokens=max_tokens, ignore_eos=ignore_eos)
    return measure_request(
        engine,
        Prompt(id="api", text=prompt),
        prompt,
        run_id=run_id or str(uuid.uuid4()),
        device_id=device_id or socket.gethostname(),
        options=options,
        prompt_index=0,
        warmup=False,
        memory=ProcessMemory(),
    )


def measured_completion(
    llm: Any,
    prompt: str,
    *,
    run_id: str | None = None,
    device_id: str | None = None,
    **kwargs: Any,
) -> tuple[Any, Measurement]:
    """Call ``llm.create_completion(prompt, **kwargs)`` and time it; returns (its result, the measurement).

    With ``stream=True`` the chunks are consumed here and returned as a list.
    """
    import llama_cpp

    stamps: list[int] = []
    seen_len = [-1]

    def stamp(input_ids: Any, logits: Any) -> bool:
        # Called once per sampled token, with the ids evaluated so far, and once more after the last token
        # with the same ids: a repeated length is not a new token.
        now = time.perf_counter_ns()
        if len(input_ids) != seen_len[0]:
            seen_len[0] = len(input_ids)
            stamps.append(now)
        return False

    user_criteria = kwargs.pop("stopping_criteria", None)
    criteria = llama_cpp.StoppingCriteriaList([stamp, *(user_criteria or [])])
    record = Measurement(
        run_id=run_id or str(uuid.uuid4()),
        device_id=device_id or socket.gethostname(),
        model_name=str(llm.metadata.get("general.name") or llm.model_path),
        model_sha256=None,
        engine="llama.cpp (create_completion)",
    )
    start = time.perf_counter_ns()
    try:
        result = llm.create_completion(prompt, stopping_criteria=criteria, **kwargs)
        if kwargs.get("stream"):
            result = list(result)
    except (ValueError, RuntimeError) as exc:
        record.ok = False
        record.error_type = type(exc).__name__
        record.error_message = str(exc)
        return None, record
    usage = result[-1].get("usage") if isinstance(result, list) and result else None
    if isinstance(result, dict):
        usage = result.get("usage")
    n_out = int(usage["completion_tokens"]) if usage else len(stamps)
    fill_timings(record, start, stamps[:n_out])
    record.input_tokens = int(usage["prompt_tokens"]) if usage else None
    record.output_tokens = min(n_out, len(stamps))
    record.ext["token_count_source"] = "usage" if usage else "stopping_criteria calls"
    return result, record
