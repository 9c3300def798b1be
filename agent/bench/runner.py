"""Run a benchmark: warm-up requests, then measured requests, each turned into a :class:`Measurement`.

How a request runs is a strategy (:mod:`agent.strategies`); without one given, it is
:class:`~agent.strategies.LocalStrategy`, the lens's own timed llama.cpp loop.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..engines.llama import LlamaEngine
from ..errors import UsageError
from ..measurement import Measurement
from ..memory import ProcessMemory
from ..probes.interference import InterferenceMonitor
from ..probes.sampler import PowerSampler
from ..prompts import Prompt
from ..strategies import LocalStrategy, Strategy, Window

if TYPE_CHECKING:  # guardrails load for a guarded run only
    from ..guardrails.pipeline import GuardrailSet, SetConfig


@dataclass(frozen=True)
class BenchOptions:
    runs: int = 10
    warmup: int = 1
    max_tokens: int = 128
    ignore_eos: bool = False
    chat_template: str = "auto"  # auto | on | off
    reuse_cache: bool = False
    include_text: bool = True


@dataclass
class ModelRun:
    """Everything measured for one model in one run."""

    engine: LlamaEngine | None
    measurements: list[Measurement] = field(default_factory=list)
    measured_wall_s: float = 0.0
    chat_template_used: bool = False
    phase_ns: tuple[int, int] | None = None  # perf_counter_ns bounds of the measured phase
    strategy: str = "local"
    guardrails: SetConfig | None = None  # the guardrail set timed around every request, when there was one

    @property
    def measured(self) -> list[Measurement]:
        return [m for m in self.measurements if not m.warmup]

    @property
    def cold_ttft_ms(self) -> float | None:
        first = next((m for m in self.measurements if m.first_after_load), None)
        return first.ttft_ms if first is not None else None


def new_record(
    engine: LlamaEngine | None,
    prompt: Prompt,
    *,
    run_id: str,
    device_id: str,
    prompt_index: int,
    warmup: bool,
    include_text: bool,
    model_name: str | None = None,
) -> Measurement:
    info = engine.info if engine is not None else None
    return Measurement(
        run_id=run_id,
        device_id=device_id,
        model_name=model_name or (info.name if info else "unknown"),
        model_sha256=info.sha256 if info and info.sha256 else None,
        prompt_index=prompt_index,
        prompt_id=prompt.id,
        prompt_sha256=prompt.sha256,
        warmup=warmup,
        # a kind of its own: every fleet statistic (Prometheus, the summary, the fleet page) counts kind "inference"
        # only, so a stored warm-up reaches the aggregator (nothing stored is lost) without being counted there
        kind="warmup" if warmup else "inference",
        first_after_load=engine is not None and engine.requests_since_load == 0,
        prompt_text=prompt.text if include_text else None,
        ext={"settings": engine_settings(engine)} if engine is not None and engine.settings is not None else {},
    )


def engine_settings(engine: LlamaEngine) -> dict[str, Any]:
    """``ext.settings`` of a record measured on ``engine`` (lens_core.settings): the llama.cpp settings it was
    loaded with and the model file's quantization."""
    assert engine.settings is not None
    settings: dict[str, Any] = engine.settings.as_dict()
    if engine.info is not None and engine.info.quantization:
        settings["quantization"] = engine.info.quantization
    return settings


def measure_request(
    engine: LlamaEngine,
    prompt: Prompt,
    text: str,
    *,
    run_id: str,
    device_id: str,
    options: BenchOptions,
    prompt_index: int,
    warmup: bool,
    memory: ProcessMemory,
) -> Measurement:
    """Time one local request; a failure becomes a measurement with its error type, never an exception."""
    record = new_record(
        engine,
        prompt,
        run_id=run_id,
        device_id=device_id,
        prompt_index=prompt_index,
        warmup=warmup,
        include_text=options.include_text,
    )
    LocalStrategy(engine, options, memory).measure(record, text, options.max_tokens)
    if not options.include_text:
        record.output_text = None
    return record


def _energy(sampler: PowerSampler, window: Window, record: Measurement, baseline_w: dict[str, float]) -> dict[str, Any]:
    if window is None:
        return {"source": "+".join(s.name for s in sampler.sources), "unavailable": "the request failed"}
    sampler.wait_past(window[2])
    return sampler.window_report(
        window[0],
        window[1],
        window[2],
        baseline_w=baseline_w,
        input_tokens=record.input_tokens,
        output_tokens=record.output_tokens,
    )


def prepare_text(engine: LlamaEngine | None, prompt: Prompt, mode: str) -> tuple[str, bool]:
    """The text actually sent: wrapped in the model's chat template for ``on``, or ``auto`` when it has one."""
    if mode == "off" or engine is None:
        return prompt.text, False
    wrapped = engine.chat_prompt(prompt.text)
    if wrapped is None:
        if mode == "on":
            name = engine.info.path if engine.info else "the model"
            raise UsageError(f"{name} has no chat template; use --chat-template auto or off")
        return prompt.text, False
    return wrapped, True


def run_bench(
    engine: LlamaEngine | None,
    prompts: list[Prompt],
    options: BenchOptions,
    *,
    run_id: str,
    device_id: str,
    memory: ProcessMemory | None = None,
    on_result: Callable[[Measurement], None] | None = None,
    sampler: PowerSampler | None = None,
    baseline_w: dict[str, float] | None = None,
    strategy: Strategy | None = None,
    model_name: str | None = None,
    should_stop: Callable[[], bool] | None = None,
    make_record: Callable[[Prompt, int, bool], Measurement] | None = None,
    interference: InterferenceMonitor | None = None,
    guardrails: GuardrailSet | None = None,
) -> ModelRun:
    """Warm-up requests first (excluded from statistics), then ``options.runs`` measured requests.

    Requests cycle through ``prompts`` and run through ``strategy`` (default: the local engine). ``on_result``
    is called after each request, outside the timed region (progress bars, durable storage). ``make_record``
    (prompt, prompt index, warm-up) makes each request's record instead of :func:`new_record` (suites add their
    identity to it). ``interference``: what else used the device during each request goes into its
    ``ext.interference`` (snapshots just before and after it, outside the timed region). ``guardrails``: a built
    set timed around every request (:class:`~agent.guardrails.pipeline.GuardedStrategy`; ``strategy`` may also be
    one already); the caller closes it.
    """
    if strategy is None:
        if engine is None:
            raise ValueError("the local strategy needs an engine")
        strategy = LocalStrategy(engine, options, memory or ProcessMemory())
    if guardrails is not None:
        from ..guardrails.pipeline import GuardedStrategy

        strategy = GuardedStrategy(strategy, guardrails)
    # a strategy can only be a guarded one when the guardrails were loaded (by whoever built it): unguarded runs
    # never load them
    pipeline = sys.modules.get("agent.guardrails.pipeline")
    guarded = strategy if pipeline is not None and isinstance(strategy, pipeline.GuardedStrategy) else None
    run = ModelRun(engine=engine, strategy=strategy.name)
    if guarded is not None:
        run.guardrails = guarded.guardrails.config
    texts: list[tuple[str, bool]] = [prepare_text(engine, p, options.chat_template) for p in prompts]
    run.chat_template_used = any(used for _, used in texts)
    total = options.warmup + options.runs
    phase_start: float | None = None
    callback_s = 0.0  # time spent in on_result during the measured phase, not counted as benchmark wall time
    for i in range(total):
        if should_stop is not None and should_stop():
            break  # a shutdown: the request in flight has finished and was recorded; start no new one
        warmup = i < options.warmup
        if not warmup and phase_start is None:
            phase_start = time.perf_counter()
        index = i % len(prompts)
        record = (
            make_record(prompts[index], index, warmup)
            if make_record is not None
            else new_record(
                engine,
                prompts[index],
                run_id=run_id,
                device_id=device_id,
                prompt_index=index,
                warmup=warmup,
                include_text=options.include_text,
                model_name=model_name,
            )
        )
        begun = interference.begin() if interference is not None else None
        if guarded is not None:  # the guardrails read the prompt as the user wrote it, before any chat template
            window = guarded.measure(record, texts[index][0], options.max_tokens, user_text=prompts[index].text)
        else:
            window = strategy.measure(record, texts[index][0], options.max_tokens)
        if interference is not None and begun is not None:
            record.ext["interference"] = interference.measure(begun)
        run.measurements.append(record)
        t0 = time.perf_counter()
        after = getattr(strategy, "after", None)
        if after is not None:  # checks that compare the output (speculative: the cloud's greedy text) come first
            after(record, texts[index][0], options.max_tokens)
        if not options.include_text:
            record.output_text = None
        if sampler is not None and sampler.sources:
            record.ext["energy"] = _energy(sampler, window, record, baseline_w or {})
        if on_result is not None:
            on_result(record)
        if not warmup:
            callback_s += time.perf_counter() - t0
    if phase_start is not None:
        run.measured_wall_s = time.perf_counter() - phase_start - callback_s
        run.phase_ns = (int(phase_start * 1e9), time.perf_counter_ns())
    return run
