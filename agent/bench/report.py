"""Turn a :class:`ModelRun` into the results document, the summary table and LLMPerf's files."""

from __future__ import annotations

import json
import math
import re
import statistics
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from lens_core.stats import latency_distribution, metric_distribution

from .. import __version__
from ..engines.llama import LlamaEngine
from ..guardrails.base import risk_level
from ..measurement import Measurement, utc_now_iso
from ..memory import system_memory
from ..probes.device import mapped_file_rss
from ..probes.interference import InterferenceMonitor, ThreadChoice, results_section
from ..probes.power import Unavailable, why_no_power
from ..probes.sampler import PowerSampler
from .runner import BenchOptions, ModelRun

SCHEMA_VERSION = "1.0.0"


def served(m: Measurement) -> bool:
    """A request that was served: it succeeded and no guardrail blocked it. Every latency, throughput, token and
    energy statistic counts these only (a blocked request is its own outcome: results.security_metrics)."""
    return m.ok and m.kind != "blocked"


def _llama_cpp_python_version() -> str:
    # the module's own version, not importlib.metadata's lookup (which loads email, csv, zipfile …: 2 MB)
    import llama_cpp

    return str(getattr(llama_cpp, "__version__", "unknown"))


def _token_stats(values: list[int]) -> dict[str, Any]:
    if not values:
        return {}
    mean = statistics.fmean(values)
    stddev = statistics.stdev(values) if len(values) > 1 else 0.0
    result: dict[str, Any] = {"mean": round(mean), "stddev": round(stddev)}
    if len(set(values)) == 1:
        result["distribution"] = "fixed"
    return result


def overhead_ratio(measured: list[Measurement]) -> float | None:
    """llama.cpp's own decode time per token ÷ the lens's wall-clock TPOT, pooled over requests.

    1.0 means the lens adds nothing between tokens; 0.98 means 2 % of each gap is the lens's own work.
    """
    engine_ms = engine_tokens = lens_ms = lens_gaps = 0.0
    for m in measured:
        if served(m) and m.engine_decode_ms is not None and m.engine_decode_tokens and m.decode_ms is not None:
            engine_ms += m.engine_decode_ms
            engine_tokens += m.engine_decode_tokens
            lens_ms += m.decode_ms
            lens_gaps += m.output_tokens - 1
    if not engine_tokens or not lens_gaps or not lens_ms:
        return None
    return (engine_ms / engine_tokens) / (lens_ms / lens_gaps)


def _distributions(
    ok: list[Measurement], spec: dict[str, tuple[list[float | None], str]]
) -> tuple[dict[str, Any], dict[str, str]]:
    found: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for name, (values, reason) in spec.items():
        dist = latency_distribution(v for v in values if v is not None)
        if dist is None:
            missing[name] = reason if ok else "no request succeeded"
        else:
            found[name] = dist
    return found, missing


def energy_section(
    run: ModelRun,
    sampler: PowerSampler | None,
    unavailable: list[Unavailable],
    baseline_w: dict[str, float],
    wanted: str | list[str] = "auto",
) -> dict[str, Any]:
    """J/token for prefill and decode, average power, over the measured requests; or why there is none."""
    if sampler is None or not sampler.sources:
        reasons = {u.source: u.reason for u in unavailable}
        return {"unavailable": why_no_power(wanted, unavailable), "sources_tried": reasons}
    ok = [m for m in run.measured if served(m) and isinstance(m.ext.get("energy"), dict)]
    energies = [m.ext["energy"] for m in ok]
    section: dict[str, Any] = {
        "source": "+".join(s.name for s in sampler.sources),
        "rails": {s.name: s.rails for s in sampler.sources},
        "total_rails": sampler.total_rails,
        "rate_hz": sampler.rate_hz,
        "idle_baseline_w": baseline_w,
        "samples": len(sampler.samples),
    }
    missing: dict[str, str] = {}
    for key, label in (("j_per_prompt_token", "prefill"), ("j_per_output_token", "decode")):
        dist = metric_distribution(e[key] for e in energies if e.get(key) is not None)
        if dist is None:
            why = sorted({_reason(e, label) for e in energies} or {"no request measured"})
            missing[key] = "; ".join(why[:3])
        else:
            section[key] = dist
    watts = [
        e["joules_total"] / (m.e2e_ms / 1000.0)
        for m, e in zip(ok, energies, strict=True)
        if e.get("joules_total") is not None and m.e2e_ms
    ]
    dist = metric_distribution(watts)
    if dist is None:
        missing["avg_power_w"] = "no request spanned two power samples"
    else:
        section["avg_power_w"] = dist
    if sampler.errors:
        section["sampler_errors"] = sampler.errors
    if missing:
        section["unavailable"] = missing
    return section


def _engine_section(engine: LlamaEngine | None, strategy: str) -> dict[str, Any]:
    if engine is None or engine.settings is None:
        return {"name": "openai-compatible endpoint", "timing": "streamed SSE chunks; clock: time.perf_counter_ns"}
    return {
        "name": "llama.cpp",
        "binding": f"llama-cpp-python {_llama_cpp_python_version()}",
        "settings": engine.settings.as_dict(),
        "system_info": engine.system_info(),
        "timing": "low-level llama_decode loop, greedy argmax; clock: time.perf_counter_ns",
        "role": "draft model" if strategy == "speculative" else "local model",
    }


def collab_section(run: ModelRun) -> dict[str, Any] | None:
    """The seed's CollaborativeMeasurement and EfficiencyMetrics over the measured requests."""
    ok = [m for m in run.measured if served(m)]
    spec = [m.ext["collab"] for m in ok if isinstance(m.ext.get("collab"), dict)]
    offload = [m.ext["offload"] for m in ok if isinstance(m.ext.get("offload"), dict)]
    server = server_timings_summary(ok)
    if not spec and not offload and server is None:
        return None
    section: dict[str, Any] = {}
    if server is not None:
        section["server_timings"] = server
    if spec:
        drafted = sum(c["drafted"] for c in spec)
        accepted = sum(c["accepted"] for c in spec)
        rounds = sum(c["rounds"] for c in spec)
        committed = sum(m.output_tokens for m in ok if "collab" in m.ext)
        total_ms = sum(c["total_duration_ms"] for c in spec)
        k = spec[0]["draft_tokens"]
        alpha = accepted / drafted if drafted else None
        section["speculative"] = {
            "protocol": spec[0]["protocol"],
            "draft_tokens": k,
            "requests": len(spec),
            "rounds": rounds,
            "drafted": drafted,
            "accepted": accepted,
            "acceptance_rate": alpha,
            "mean_accepted_length": 1 + accepted / rounds if rounds else None,
            "expected_tokens_per_round_leviathan": (
                (1 - alpha ** (k + 1)) / (1 - alpha) if alpha is not None and alpha < 1 else (k + 1 if alpha else None)
            ),
            "edge_time_ms": sum(c["edge_time_ms"] for c in spec),
            "cloud_time_ms": sum(c["cloud_time_ms"] for c in spec),
            "network_time_ms": sum(c["network_time_ms"] or 0.0 for c in spec),
            "collaboration_overhead_ms": sum(c["collaboration_overhead_ms"] for c in spec),
            "total_duration_ms": total_ms,
            "tokens_per_second": committed / (total_ms / 1000) if total_ms else None,
            "bytes_per_committed_token": sum(c["bytes_up"] + c["bytes_down"] for c in spec) / committed
            if committed
            else None,
            "greedy_check": {
                "checked": sum(1 for c in spec if c.get("matches_cloud_greedy") is not None),
                "mismatches": sum(1 for c in spec if c.get("matches_cloud_greedy") is False),
            },
            "lossless_check": _lossless_check(spec),
            "server_time": _speculative_server_time(spec),
        }
    if offload:
        decisions = Counter(o["decision"] for o in offload)
        shadows = [o["shadow"] for o in offload if "shadow" in o]
        judged = [s for s in shadows if s.get("policy_right") is not None]
        section["offload"] = {
            "decisions": dict(decisions),
            "reasons": dict(Counter(o["reason"].split(":")[0] for o in offload)),
            "shadowed": len(shadows),
            "policy_right_rate": sum(1 for s in judged if s["policy_right"]) / len(judged) if judged else None,
        }
    return section


_SERVER_FIGURES = (
    ("server_prompt_ms", "server_ttft_ms"),
    ("server_tpot_ms", "server_tpot_ms"),
    ("network_and_queue_ms", "network_and_queue_ms"),
    ("ttft_minus_server_prompt_ms", "ttft_minus_server_prompt_ms"),
)


def server_timings_summary(ok: list[Measurement]) -> dict[str, Any] | None:
    """The server's own timings (``ext.server_timings``, llama-server) over the successful requests that carry
    them: a distribution per figure, beside the lens's; None when no request has them."""
    reported = [m.ext["server_timings"] for m in ok if isinstance(m.ext.get("server_timings"), dict)]
    if not reported:
        return None
    summary: dict[str, Any] = {
        "source": str(reported[0].get("source") or "server timings"),
        "requests": len(ok),
        "requests_with_server_timings": len(reported),
    }
    for name, key in _SERVER_FIGURES:
        values = [
            float(t[key])
            for t in reported
            if isinstance(t.get(key), (int, float)) and not isinstance(t.get(key), bool) and math.isfinite(t[key])
        ]
        dist = latency_distribution(values)
        if dist is not None:
            summary[name] = dist
    return summary


def _speculative_server_time(spec: list[dict[str, Any]]) -> dict[str, Any]:
    """The verification time split into the server's own compute (its ``timings``, summed over the rounds) and the
    rest (network, queueing, HTTP, JSON), over the requests whose every round reported them."""
    timed = [c for c in spec if _number(c.get("server_time_ms")) and _number(c.get("verify_time_ms"))]
    verify = sum(float(c["verify_time_ms"]) for c in timed)
    server = sum(float(c["server_time_ms"]) for c in timed)
    return {
        "requests": len(spec),
        "requests_with_server_time": len(timed),
        "verify_time_ms": verify if timed else None,
        "server_time_ms": server if timed else None,
        "verify_minus_server_ms": verify - server if timed else None,
        "server_share_of_verify": server / verify if timed and verify > 0 else None,
    }


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _lossless_check(spec: list[dict[str, Any]]) -> dict[str, Any]:
    """How many speculative requests are lossless: checked each round with no re-tokenization divergence. A record
    without the check (``lossless`` absent) counts as lossy, never as lossless."""
    divergences = [c.get("retokenization_divergences") or 0 for c in spec]
    lossless = sum(1 for c in spec if c.get("lossless") is True)
    bases = sorted({str(c["lossless_basis"]).split(";")[0] for c in spec if c.get("lossless_basis")})
    return {
        "requests": len(spec),
        "lossless": lossless,
        "lossy": len(spec) - lossless,
        "requests_with_divergences": sum(1 for d in divergences if d),
        "retokenization_divergences": sum(divergences),
        "unchecked": sum(1 for c in spec if "lossless" not in c or c.get("unchecked_rounds")),
        "basis": ", ".join(bases) or "not checked",
    }


def lossless_line(spec: dict[str, Any]) -> str:
    """The plain summary line: how many speculative requests are lossy, and why."""
    check = spec.get("lossless_check")
    if not check:
        return "speculative: losslessness not checked (records without the re-tokenization check)"
    basis = check["basis"]
    if check["lossy"] == 0:
        how = "token protocol" if basis.startswith("token protocol") else "re-tokenization checked each round"
        return (
            f"speculative: {check['requests']} of {check['requests']} requests lossless ({how}, no divergence); {basis}"
        )
    unchecked = f", {check['unchecked']} unchecked" if check["unchecked"] else ""
    times, requests = check["retokenization_divergences"], check["requests_with_divergences"]
    return (
        f"speculative: {check['lossy']} of {check['requests']} requests lossy (re-tokenization diverged "
        f"{times} time{'s' * (times != 1)} in {requests} request{'s' * (requests != 1)}{unchecked}); "
        f"{basis} — see docs/collaboration.md"
    )


def _reason(energy: dict[str, Any], label: str) -> str:
    unavailable = energy.get("unavailable")
    if isinstance(unavailable, dict):
        return str(unavailable.get(label, "no data"))
    return str(unavailable or "no data")


def utilization_section(run: ModelRun, sampler: PowerSampler | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The seed's resource_utilization distributions over the measured phase, where the data exists."""
    out: dict[str, Any] = {}
    missing: dict[str, str] = {}
    if sampler is None or run.phase_ns is None:
        return out, {"resource_utilization": "no sampler ran"}
    start, end = run.phase_ns
    too_short = f"no sample within the {(end - start) / 1e6:.0f} ms measured phase at {sampler.rate_hz:g} Hz"
    for key, name, reason in (
        ("_mem_percent", "memory_utilization_percent", too_short),
        ("_gpu_load_percent", "gpu_utilization_percent", "no GPU load counter (Jetson devfreq load or NVML)"),
    ):
        dist = metric_distribution(sampler.values(key, start, end))
        if dist is None:
            missing[f"resource_utilization.{name}"] = reason
        else:
            out[name] = dist
    missing["resource_utilization.kv_cache_utilization_percent"] = "llama.cpp does not expose KV cache use per step"
    return out, missing


def interference_section(measured: list[Measurement], monitor: InterferenceMonitor) -> dict[str, Any]:
    """``results.interference``: contended requests and why, over the measured requests' ``ext.interference``."""
    return results_section(
        [m.ext["interference"] for m in measured if isinstance(m.ext.get("interference"), dict)],
        monitor.thresholds,
        cpus=monitor.cpus,
        uses_gpu=monitor.uses_gpu,
    )


def _metadata(run_id: str) -> dict[str, Any]:
    return {
        "benchmark_id": str(uuid.uuid4()),
        "run_id": run_id,
        "timestamp": utc_now_iso(),
        "version": SCHEMA_VERSION,
        "tool": "llm-latency-lens",
        "tool_version": __version__,
    }


def _model_section(run: ModelRun, cloud: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """``configuration.model``: the GGUF file's identity, or the cloud endpoint's model name."""
    info = run.engine.info if run.engine else None
    if info is None:
        # the cloud strategy alone: the endpoint's model, spoken to over the OpenAI API
        name = (cloud or {}).get("model") or "unknown"
        return {"name": name, "provider": "openai", "api": "openai-compatible"}, {
            "configuration.model.quantization": "the cloud model's quantization is not known to the client"
        }
    model: dict[str, Any] = {
        "name": info.name,
        "provider": "local",
        "version": info.sha256[:12] if info.sha256 else "unknown",
        "quantization_exact": info.quantization,
        "path": info.path,
        "sha256": info.sha256 or None,
        "architecture": info.architecture,
        "description": info.description,
        "file_bytes": info.file_bytes,
        "n_params": info.n_params,
        "n_ctx_train": info.n_ctx_train,
    }
    if info.quantization_coarse is None:
        return model, {
            "configuration.model.quantization": (
                f"GGUF type {info.quantization} has no value in the schema's enum; see quantization_exact"
            )
        }
    model["quantization"] = info.quantization_coarse
    return model, {}


def _hardware_section(run: ModelRun, device: dict[str, Any]) -> dict[str, Any]:
    engine = run.engine
    hardware: dict[str, Any] = {
        "cpu_cores": device.get("cpu_cores_physical") or device.get("cpu_cores_logical"),
        "memory_gb": round(device["memory_total_bytes"] / 1024**3, 2),
        "batch_size": 1,
        "accelerator": engine.accelerator() if engine else None,
        **{k: v for k, v in device.items() if k not in ("memory_total_bytes",)},
    }
    settings = engine.settings if engine else None
    if settings is not None and settings.n_gpu_layers != 0 and device.get("gpu_type"):
        hardware["gpu_count"] = 1
    return hardware


def _test_parameters(run: ModelRun, options: BenchOptions, prompt_source: str) -> dict[str, Any]:
    ok = [m for m in run.measured if served(m)]
    return {
        "input_tokens": _token_stats([m.input_tokens for m in ok if m.input_tokens is not None]),
        "output_tokens": _token_stats([m.output_tokens for m in ok]),
        "concurrency_levels": [1],
        "warmup_requests": options.warmup,
        "total_requests": options.runs,
        "max_tokens": options.max_tokens,
        "ignore_eos": options.ignore_eos,
        "chat_template": run.chat_template_used,
        "kv_cache": "reused (common prefix kept)" if options.reuse_cache else "cleared before every request",
        "sampling": "greedy (temperature 0)",
        "prompts": prompt_source,
    }


def configuration_section(
    run: ModelRun,
    device: dict[str, Any],
    options: BenchOptions,
    prompt_source: str,
    cloud: dict[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The document's ``configuration``, and what in it the schema wants but this run cannot say."""
    hardware = _hardware_section(run, device)
    model, missing = _model_section(run, cloud)
    configuration: dict[str, Any] = {
        "model": model,
        "hardware": hardware,
        "test_parameters": _test_parameters(run, options, prompt_source),
        "engine": _engine_section(run.engine, run.strategy),
        "strategy": run.strategy,
    }
    if cloud:
        configuration["cloud"] = cloud
    return configuration, missing


_SOURCED_SETTINGS = ("n_threads", "n_ctx", "n_batch", "n_gpu_layers", "flash_attn")


def setting_source(source: str) -> str:
    """Where one configuration value came from, in the words the bench prints: ``flag --n-threads``,
    ``config FILE``, ``drop-in FILE`` (lens-agent tune's), ``environment LENS_…`` or ``default``."""
    if source == "default" or source.startswith("drop-in "):
        return source
    if source.startswith("environment variable "):
        return "environment " + source.removeprefix("environment variable ")
    if source.startswith("-"):
        return f"flag {source}"
    return f"config {source}"


def settings_sources(config: Any) -> dict[str, str]:
    """``configuration.settings_source``: each engine setting → where its value came from (see setting_source)."""
    from lens_core.settings import CONFIG_KEYS

    return {name: setting_source(config.source(*CONFIG_KEYS[name])) for name in _SOURCED_SETTINGS}


def latency_section(ok: list[Measurement]) -> tuple[dict[str, Any], dict[str, str]]:
    """``results.latency_metrics``: the lens's wall-clock distributions over the successful requests."""
    one_token = "every request produced at most one token"
    if any(m.output_tokens > 1 for m in ok):  # tokens enough, but their times arrived together
        one_token = (
            "the endpoint streamed every answer in a single chunk: there is no time between its tokens to measure"
        )
    prefill = "no request reached its prompt evaluation"
    if _remote(ok):
        prefill = (
            f"the {ok[0].engine} endpoint does not say when its prompt evaluation ended (the lens sees streamed "
            "chunks only; the server's own timings, where it reports them: results.collaboration.server_timings)"
        )
    return _distributions(
        ok,
        {
            "time_to_first_token": ([m.ttft_ms for m in ok], "no request produced a token"),
            "time_per_output_token": ([m.tpot_ms for m in ok], f"{one_token} (TPOT needs two)"),
            "end_to_end_latency": ([m.e2e_ms for m in ok], "no request produced a token"),
            "prefill_time": ([m.prefill_ms for m in ok], prefill),
            "decode_time": ([m.decode_ms for m in ok], one_token),
        },
    )


def _remote(ok: list[Measurement]) -> bool:
    """Every request ran on an endpoint (cloud), none on llama.cpp here: there are no llama.cpp counters."""
    return bool(ok) and not any(m.engine.startswith("llama.cpp") for m in ok)


def engine_timings_section(measured: list[Measurement]) -> tuple[dict[str, Any], dict[str, str]]:
    """``results.engine_timings``: llama.cpp's own per-token figures and the lens's overhead ratio."""
    ok = [m for m in measured if served(m)]
    no_counters = (
        f"no llama.cpp counters: the requests ran on an {ok[0].engine} endpoint, not on llama.cpp here"
        if _remote(ok)
        else None
    )
    timings, missing = _distributions(
        ok,
        {
            "prefill_ms_per_token": (
                [
                    m.engine_prefill_ms / m.engine_prefill_tokens
                    if m.engine_prefill_ms is not None and m.engine_prefill_tokens
                    else None
                    for m in ok
                ],
                no_counters
                or "no request evaluated a prompt of two or more new tokens (llama.cpp counts a one-token "
                "batch as decode)",
            ),
            "decode_ms_per_token": (
                [
                    m.engine_decode_ms / m.engine_decode_tokens
                    if m.engine_decode_ms is not None and m.engine_decode_tokens
                    else None
                    for m in ok
                ],
                no_counters or "every request produced at most one token",
            ),
        },
    )
    ratio = overhead_ratio(measured)
    timings["overhead_ratio"] = ratio
    timings["overhead_ratio_definition"] = (
        "llama.cpp decode ms per token (t_eval_ms / n_eval) ÷ lens TPOT, pooled over successful requests"
    )
    unavailable = {f"engine_timings.{k}": v for k, v in missing.items()}
    if ratio is None:
        unavailable["engine_timings.overhead_ratio"] = no_counters or "no request decoded two or more tokens"
    return timings, unavailable


def _throughput_section(run: ModelRun) -> dict[str, Any]:
    ok = [m for m in run.measured if served(m)]
    output_tokens = sum(m.output_tokens for m in ok)
    wall = run.measured_wall_s
    return {
        "tokens_per_second": output_tokens / wall if wall > 0 else 0.0,
        "requests_per_second": len(ok) / wall if wall > 0 else 0.0,
        "measured_wall_seconds": wall,
        "output_tokens": output_tokens,
    }


def _error_section(measured: list[Measurement]) -> dict[str, Any]:
    errors = [m for m in measured if not m.ok]
    return {
        "total_errors": len(errors),
        "error_rate": len(errors) / len(measured) if measured else 0.0,
        "errors_by_type": dict(Counter(m.error_type or "unknown" for m in errors)),
    }


def _model_load_section(run: ModelRun) -> dict[str, Any]:
    load = run.engine.load_info if run.engine else None
    return {
        "load_ms": load.load_ms if load else None,
        "engine_load_ms": load.engine_load_ms if load else None,
        "cold_ttft_ms": run.cold_ttft_ms,
        "rss_before_load_bytes": load.rss_before_bytes if load else None,
        "rss_after_load_bytes": load.rss_after_bytes if load else None,
    }


def _memory_section(run: ModelRun) -> dict[str, Any]:
    info = run.engine.info if run.engine else None
    ok = [m for m in run.measured if served(m)]
    peaks = [m.rss_peak_bytes for m in ok if m.rss_peak_bytes is not None]
    return {
        "model_file_bytes": info.file_bytes if info else None,
        "model_mapped_rss_bytes": mapped_file_rss(info.path) if info else None,
        "rss_peak_bytes": max(peaks) if peaks else None,
        "rss_peak_source": ok[0].rss_peak_source if ok else None,
        "system": system_memory(),
    }


def _requests_section(measured: list[Measurement]) -> dict[str, Any]:
    ok = [m for m in measured if served(m)]
    return {
        "measured": len(measured),
        "succeeded": len(ok),
        "blocked": sum(m.kind == "blocked" for m in measured),
        "stop_reasons": dict(Counter(m.stop_reason for m in ok)),
    }


def results_document(
    run: ModelRun,
    *,
    run_id: str,
    device: dict[str, Any],
    options: BenchOptions,
    prompt_source: str,
    sampler: PowerSampler | None = None,
    power_unavailable: list[Unavailable] | None = None,
    baseline_w: dict[str, float] | None = None,
    cloud: dict[str, Any] | None = None,
    power_source: str | list[str] = "auto",
    interference: InterferenceMonitor | None = None,
    threads: ThreadChoice | None = None,
) -> dict[str, Any]:
    """The results JSON: validates against the seed's ``benchmark_results.schema.json``.

    ``cloud``: the endpoint (url, model, rtt_ms) for the cloud, speculative and offload strategies.
    ``interference``: the monitor that ran beside the requests (``results.interference``); ``threads``: how the
    decode thread count was chosen (``configuration.n_threads_source``, ``busy_cores``).
    """
    latency, latency_missing = latency_section([m for m in run.measured if served(m)])
    engine_timings, engine_missing = engine_timings_section(run.measured)
    configuration, configuration_missing = configuration_section(run, device, options, prompt_source, cloud)
    results: dict[str, Any] = {
        "latency_metrics": latency,
        "throughput_metrics": _throughput_section(run),
        "engine_timings": engine_timings,
        "error_metrics": _error_section(run.measured),
        "model_load": _model_load_section(run),
        "memory": _memory_section(run),
        "requests": _requests_section(run.measured),
    }
    collab = collab_section(run)
    if collab:
        results["collaboration"] = collab
    results["energy"] = energy_section(run, sampler, power_unavailable or [], baseline_w or {}, power_source)
    utilization, utilization_missing = utilization_section(run, sampler)
    if utilization:
        results["resource_utilization"] = utilization
    if interference is not None:
        results["interference"] = interference_section(run.measured, interference)
    security = security_section(run)
    if security is not None:
        results["security_metrics"] = security
    if threads is not None:
        configuration["n_threads_source"] = threads.source
        if threads.source == "default":
            configuration["busy_cores"] = threads.busy_cores
    missing = {**latency_missing, **engine_missing, **configuration_missing, **utilization_missing}
    if missing:
        results["unavailable"] = missing
    return {"metadata": _metadata(run_id), "configuration": configuration, "results": results}


# -- human-readable output -------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        shown = f"{value:.{digits}f}"
        return shown.lstrip("-") if float(shown) == 0 else shown  # never "-0.0000"
    return str(value)


def errors_line(by_type: dict[str, int]) -> str:
    """``none`` or ``request_failed ×3, timeout ×1``."""
    return ", ".join(f"{name} ×{count}" for name, count in sorted(by_type.items())) or "none"


def failure(document: dict[str, Any], max_error_rate: float) -> str | None:
    """Why a run counts as failed (no request succeeded, or more errors than allowed), or None."""
    requests = document["results"]["requests"]
    errors = document["results"]["error_metrics"]
    name = document["configuration"]["model"]["name"]
    measured, succeeded = requests["measured"], requests["succeeded"]
    if measured and not succeeded and not requests.get("blocked"):
        return (
            f"{name}: no request succeeded ({measured} of {measured} failed: {errors_line(errors['errors_by_type'])})"
        )
    if errors["error_rate"] > max_error_rate:
        return (
            f"{name}: {errors['total_errors']} of {measured} requests failed ({errors['error_rate']:.0%}, above "
            f"--max-error-rate {max_error_rate:g}: {errors_line(errors['errors_by_type'])})"
        )
    return None


def summary_table(document: dict[str, Any]) -> str:
    res = document["results"]
    lat = res["latency_metrics"]
    eng = res["engine_timings"]
    cfg = document["configuration"]
    model = cfg["model"]
    engine = cfg["engine"]
    lines = [
        f"model     {model_heading(model)}",
        f"engine    {engine.get('binding') or engine['name']}  {_settings_line(engine.get('settings') or {})}"
        f"  strategy={cfg.get('strategy', 'local')}",
        *([f"sources   {sources_line(cfg['settings_source'])}"] if cfg.get("settings_source") else []),
        f"requests  {res['requests']['succeeded']}/{res['requests']['measured']} ok, "
        + (f"{res['requests']['blocked']} blocked, " if res["requests"].get("blocked") else "")
        + f"{cfg['test_parameters']['warmup_requests']} warm-up excluded, "
        f"errors {errors_line(res['error_metrics']['errors_by_type'])}",
        *([res["interference"]["summary"]] if "interference" in res else []),
        *([guardrail_line(res["security_metrics"])] if "security_metrics" in res else []),
        "",
        f"{'metric (ms)':<26}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}{'min':>9}{'max':>9}{'n':>6}",
    ]
    rows = [
        ("TTFT", lat.get("time_to_first_token")),
        ("TPOT", lat.get("time_per_output_token")),
        ("end-to-end", lat.get("end_to_end_latency")),
        ("prefill (wall)", lat.get("prefill_time")),
        ("decode (wall)", lat.get("decode_time")),
        ("llama.cpp prefill/token", eng.get("prefill_ms_per_token")),
        ("llama.cpp decode/token", eng.get("decode_ms_per_token")),
    ]
    for label, dist in rows:
        if dist is None:
            lines.append(f"{label:<26}{'n/a':>9}")
            continue
        lines.append(
            f"{label:<26}"
            + "".join(f"{dist[k]:>9.2f}" for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "max_ms"))
            + f"{dist['sample_count']:>6}"
        )
    load = res["model_load"]
    mem = res["memory"]
    thr = res["throughput_metrics"]
    lines += [
        "",
        f"throughput      {thr['tokens_per_second']:.1f} tok/s, {thr['requests_per_second']:.2f} req/s "
        f"over {thr['measured_wall_seconds']:.2f} s",
        f"lens overhead   llama.cpp decode/token ÷ lens TPOT = {_fmt(eng.get('overhead_ratio'), 4)}",
        f"model load      {_fmt(load['load_ms'])} ms wall ({_fmt(load['engine_load_ms'])} ms by llama.cpp), "
        f"first TTFT after load {_fmt(load['cold_ttft_ms'])} ms",
        f"memory          RSS {_mb(load['rss_before_load_bytes'])} → {_mb(load['rss_after_load_bytes'])} "
        f"after load, peak {_mb(mem['rss_peak_bytes'])} ({mem['rss_peak_source'] or 'n/a'})",
    ]
    energy = res.get("energy", {})
    if "j_per_output_token" in energy or "j_per_prompt_token" in energy:
        dec = energy.get("j_per_output_token", {}).get("median")
        pre = energy.get("j_per_prompt_token", {}).get("median")
        power = energy.get("avg_power_w", {}).get("median")
        lines.append(
            f"energy          {_fmt(dec, 4)} J/output token, {_fmt(pre, 4)} J/prompt token (medians, net of "
            f"idle), {_fmt(power)} W ({energy['source']}, {energy['rate_hz']:g} Hz)"
        )
    elif "unavailable" in energy and isinstance(energy["unavailable"], str):
        lines.append(f"energy          unavailable: {energy['unavailable']}")
    spec = res.get("collaboration", {}).get("speculative")
    if spec:
        lines.append(
            f"speculative     α {_fmt(spec['acceptance_rate'], 3)}, "
            f"τ {_fmt(spec['mean_accepted_length'], 2)} tokens/round, "
            f"{spec['rounds']} rounds ({spec['protocol']}, k={spec['draft_tokens']}), "
            f"{_fmt(spec['tokens_per_second'])} committed tok/s, {_fmt(spec['bytes_per_committed_token'], 0)} B/token, "
            f"{spec['greedy_check']['mismatches']} of {spec['greedy_check']['checked']} "
            "differ from the cloud's greedy text"
        )
        lines.append(f"{'':16}{lossless_line(spec)}")
        split = spec.get("server_time") or {}
        if split.get("server_time_ms") is not None:
            lines.append(
                f"{'':16}verify {_fmt(split['verify_time_ms'], 1)} ms = server {_fmt(split['server_time_ms'], 1)} ms "
                f"+ network, queue and HTTP {_fmt(split['verify_minus_server_ms'], 1)} ms "
                f"({split['requests_with_server_time']} of {split['requests']} requests, the server's timings)"
            )
    server = res.get("collaboration", {}).get("server_timings")
    if server:
        lines.append(f"server timings  {_server_timings_line(server)}")
    offload = res.get("collaboration", {}).get("offload")
    if offload:
        lines.append(
            f"offload         decisions {errors_line(offload['decisions'])}, "
            f"policy right {_fmt(offload['policy_right_rate'], 2)}"
        )
    speedup = res.get("speedup")
    if speedup:
        rates = speedup["tokens_per_second"]
        lines.append(
            f"speedup         {_fmt(speedup['vs_cloud_only'], 3)}× cloud-only ({_fmt(rates['cloud_only'])} tok/s), "
            f"{_fmt(speedup['vs_edge_only'], 3)}× edge-only ({_fmt(rates['edge_only'])} tok/s)"
        )
    for key, reason in res.get("unavailable", {}).items():
        if key.startswith("resource_utilization"):
            continue
        lines.append(f"unavailable     {key}: {reason}")
    return "\n".join(lines)


def _server_timings_line(server: dict[str, Any]) -> str:
    """The server's own figures (p50 ms) for the summary table."""

    def p50(name: str) -> str:
        return _fmt((server.get(name) or {}).get("p50_ms"), 2)

    return (
        f"prompt {p50('server_prompt_ms')} ms, TPOT {p50('server_tpot_ms')} ms, network+queue "
        f"{p50('network_and_queue_ms')} ms (p50s; {server['requests_with_server_timings']} of "
        f"{server['requests']} requests, {server['source']})"
    )


def model_heading(model: dict[str, Any]) -> str:
    """``Smollm2 135M 8k Lc100K Mix1 Ep2 (SmolLM2-135M-Instruct.Q4_1.gguf, Q4_1, 100.9 MB)``: the name the records
    carry (the GGUF's ``general.name``, what the aggregator's filters take), then the file, its quantization and
    size; ``as LABEL`` when the run's label is not the file's (the same file benchmarked twice)."""
    file = Path(model["path"]).name if model.get("path") else None
    size = f"{model['file_bytes'] / 1e6:.1f} MB" if model.get("file_bytes") else None
    details = ", ".join(x for x in (file, model.get("quantization_exact") or model.get("provider"), size) if x)
    label = model.get("label")
    alias = f" as {label}" if label and file and label != Path(file).stem else ""
    return f"{model['name']} ({details}){alias}"


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.0f} MB"


def sources_line(sources: dict[str, str]) -> str:
    """``n_threads from drop-in /var/lib/lens-agent/tune/settings.toml; n_ctx from flag --n-ctx; n_batch,
    flash_attn from default``: the settings grouped by where they came from."""
    grouped: dict[str, list[str]] = {}
    for name, source in sources.items():
        grouped.setdefault(source, []).append(name)
    ordered = sorted(grouped.items(), key=lambda item: item[0] == "default")  # what was set first, defaults last
    return "; ".join(f"{', '.join(names)} from {source}" for source, names in ordered)


def _settings_line(settings: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items())


def comparison_table(documents: list[dict[str, Any]]) -> str:
    header = f"{'model':<34}{'quant':>8}{'TTFT p50':>10}{'TPOT p50':>10}{'tok/s':>8}{'load ms':>9}{'peak MB':>9}"
    lines = ["comparison (ms unless noted)", header]
    notes: list[str] = []
    seen: dict[str, str] = {}  # sha256 → the label of the first run of that file
    for doc in documents:
        cfg, res = doc["configuration"], doc["results"]
        ttft = res["latency_metrics"].get("time_to_first_token")
        tpot = res["latency_metrics"].get("time_per_output_token")
        peak = res["memory"]["rss_peak_bytes"]
        label = (cfg["model"].get("label") or Path(cfg["model"]["path"]).name)[:33]
        sha = cfg["model"].get("sha256")
        if sha and sha in seen:
            notes.append(
                f"{label} is the same file as {seen[sha]} (sha256 {sha[:12]}), with the same settings: "
                "their figures differ by run-to-run variation only"
            )
        elif sha:
            seen[sha] = label
        lines.append(
            f"{label:<34}{cfg['model'].get('quantization_exact') or '?':>8}"
            f"{_fmt(ttft['p50_ms'] if ttft else None, 2):>10}{_fmt(tpot['p50_ms'] if tpot else None, 2):>10}"
            f"{res['throughput_metrics']['tokens_per_second']:>8.1f}"
            f"{_fmt(res['model_load']['load_ms']):>9}{_fmt(peak / 1e6 if peak else None, 0):>9}"
        )
    return "\n".join(lines + notes)


# -- LLMPerf's own files -----------------------------------------------------------------------------------------
def llmperf_files(run: ModelRun, document: dict[str, Any], directory: Path) -> tuple[Path, Path]:
    """Write LLMPerf's ``*_summary.json`` and ``*_individual_responses.json`` (its field names, seconds). A request
    a guardrail blocked is left out: LLMPerf's format knows completed and failed requests only."""
    measured = [m for m in run.measured if m.kind != "blocked"]
    individual: list[dict[str, Any]] = []
    for m in measured:
        n_out = m.output_tokens if m.ok else 0
        e2e_s = (m.e2e_ms or 0.0) / 1000.0
        individual.append(
            {
                "error_code": None if m.ok else 1,
                "error_msg": "" if m.ok else f"{m.error_type}: {m.error_message}",
                # llmperf's per-request figure: the sum of gaps ÷ output tokens
                "inter_token_latency_s": (sum(m.itl_ms) / 1000.0 / n_out) if n_out else 0,
                "ttft_s": (m.ttft_ms or 0.0) / 1000.0,
                "end_to_end_latency_s": e2e_s,
                "request_output_throughput_token_per_s": n_out / e2e_s if e2e_s > 0 else 0,
                "number_total_tokens": (m.input_tokens or 0) + n_out,
                "number_output_tokens": n_out,
                "number_input_tokens": m.input_tokens or 0,
            }
        )
    tp = document["configuration"]["test_parameters"]
    mean_in = tp["input_tokens"].get("mean", 0)
    mean_out = tp["output_tokens"].get("mean", 0)
    ok_rows = [r for r in individual if r["error_code"] is None]
    summary: dict[str, Any] = {
        "version": "2023-08-31",
        "name": "",
        "model": document["configuration"]["model"]["name"],
        "mean_input_tokens": mean_in,
        "stddev_input_tokens": tp["input_tokens"].get("stddev", 0),
        "mean_output_tokens": mean_out,
        "stddev_output_tokens": tp["output_tokens"].get("stddev", 0),
        "num_concurrent_requests": 1,
        "additional_sampling_params": {"temperature": 0, "max_tokens": tp["max_tokens"]},
    }
    for key in (
        "inter_token_latency_s",
        "ttft_s",
        "end_to_end_latency_s",
        "request_output_throughput_token_per_s",
        "number_input_tokens",
        "number_output_tokens",
    ):
        values = [float(r[key]) for r in ok_rows]
        summary.update(_llmperf_stats(f"results_{key}", values))
    errors = [r for r in individual if r["error_code"] is not None]
    wall = run.measured_wall_s
    summary.update(
        {
            "results_num_requests_started": len(individual),
            "results_error_rate": len(errors) / len(individual) if individual else 0,
            "results_number_errors": len(errors),
            "results_error_code_frequency": str(dict(Counter(r["error_code"] for r in errors))),
            "results_mean_output_throughput_token_per_s": (
                sum(r["number_output_tokens"] for r in ok_rows) / wall if wall > 0 else 0
            ),
            "results_num_completed_requests": len(ok_rows),
            "results_num_completed_requests_per_min": len(ok_rows) / wall * 60 if wall > 0 else 0,
            "timestamp": int(time.time()),
        }
    )
    stem = re.sub(r"-{2,}", "-", re.sub(r"[^\w\d-]+", "-", f"{summary['model']}_{mean_in}_{mean_out}"))
    summary["name"] = f"{stem}_summary"
    directory.mkdir(parents=True, exist_ok=True)
    summary_path = directory / f"{stem}_summary.json"
    individual_path = directory / f"{stem}_individual_responses.json"
    summary_path.write_text(json.dumps(summary, indent=4))
    individual_path.write_text(json.dumps(individual, indent=4))
    return summary_path, individual_path


def _llmperf_stats(prefix: str, values: list[float]) -> dict[str, Any]:
    import numpy as np

    if not values:
        return {}
    data = np.asarray(values)
    out: dict[str, Any] = {}
    for q in (25, 50, 75, 90, 95, 99):
        out[f"{prefix}_quantiles_p{q}"] = float(np.percentile(data, q))
    out[f"{prefix}_mean"] = float(data.mean())
    out[f"{prefix}_min"] = float(data.min())
    out[f"{prefix}_max"] = float(data.max())
    out[f"{prefix}_stddev"] = float(data.std(ddof=1)) if data.size > 1 else 0.0
    return out


# -- guardrails ----------------------------------------------------------------------------------------------------
_SCHEMA_STAGE = {"input": "input_validation", "threat": "threat_detection", "output": "output_filtering"}


def _spread(values: list[float]) -> dict[str, Any] | None:
    """``{n, mean, p50, p95, max}`` (numpy's linear percentiles), or None without a value."""
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return None
    p50, p95 = np.percentile(data, [50.0, 95.0])
    return {
        "n": int(data.size),
        "mean": float(np.mean(data)),
        "p50": float(p50),
        "p95": float(p95),
        "max": float(np.max(data)),
    }


def security_section(run: ModelRun) -> dict[str, Any] | None:
    """``results.security_metrics`` (the seed's security_metrics schema, with distributions) over the measured
    requests' ``ext.guardrails``; None when no guardrail set ran. Blocked and failed requests count here (and
    nowhere in the latency statistics)."""
    records = [(m, m.ext["guardrails"]) for m in run.measured if isinstance(m.ext.get("guardrails"), dict)]
    if not records:
        return None
    stage_ms: dict[str, list[float]] = {s: [] for s in _SCHEMA_STAGE}
    chunk_p50: list[float] = []
    chunk_max: list[float] = []
    check_ms: dict[str, list[float]] = {}
    check_errors: Counter[str] = Counter()
    check_kind: dict[str, str] = {}
    check_stages: dict[str, set[str]] = {}
    violations: Counter[tuple[str, str, bool, str]] = Counter()
    outcomes: Counter[str] = Counter()
    blocked_by: Counter[str] = Counter()
    for _, g in records:
        outcomes[g["outcome"]] += 1
        if g["blocked_at"] is not None:
            blocked_by[g["blocked_at"]] += 1
        for stage, entry in g["stages"].items():
            stage_ms[stage].append(entry["ms"])
            if entry.get("mode") == "stream" and entry.get("chunk_ms_p50") is not None:
                chunk_p50.append(entry["chunk_ms_p50"])
                chunk_max.append(entry["chunk_ms_max"])
            for check in entry["checks"]:
                check_ms.setdefault(check["name"], []).append(check["ms"])
                check_kind[check["name"]] = check["kind"]
                check_stages.setdefault(check["name"], set()).add(stage)
                if check["error"] is not None:
                    check_errors[check["name"]] += 1
        for v in g["violations"]:
            violations[(v["type"], v["severity"], v["blocked"], v["stage"])] += 1
    overhead = [g["overhead_ms"] for _, g in records]
    # the share of the request safety takes, over the requests served: a blocked request is all guardrail (≈ 100 %)
    # and would drown the figure, as would a request a failed stage kept from being served; their stage times count
    impact = [
        g["impact_percent"]
        for _, g in records
        if g["impact_percent"] is not None and g["outcome"] in ("passed", "passed_with_errors")
    ]
    distributions: dict[str, Any] = {_SCHEMA_STAGE[s]: _spread(stage_ms[s]) for s in _SCHEMA_STAGE}
    distributions["total_overhead"] = _spread(overhead)
    distributions["remainder"] = _spread([g["remainder_ms"] for _, g in records])
    chunks = _spread(chunk_p50)
    if chunks is not None:  # each request's median chunk; max: the slowest chunk of all
        chunks["max"] = max(chunk_max)
    distributions["output_chunk"] = chunks
    latency = {
        f"{_SCHEMA_STAGE[s]}_ms": distributions[_SCHEMA_STAGE[s]]["p50"]
        for s in _SCHEMA_STAGE
        if distributions[_SCHEMA_STAGE[s]] is not None
    }
    latency["total_overhead_ms"] = distributions["total_overhead"]["p50"]
    risk = max(g["risk_score"] for _, g in records)
    configured = run.guardrails.checks if run.guardrails is not None else ()
    names = [c.name for c in configured] + [n for n in check_ms if n not in {c.name for c in configured}]
    checks = []
    for name in names:
        spec = next((c for c in configured if c.name == name), None)
        # the stages it ran at (a plugin may run fewer than configured), else those configured
        stages = check_stages.get(name) or (spec.stages if spec is not None else set())
        spread = _spread(check_ms.get(name, []))
        checks.append(
            {
                "name": name,
                "kind": spec.kind if spec is not None else check_kind.get(name, "unknown"),
                "stages": [s for s in _SCHEMA_STAGE if s in stages],
                "ms_p50": spread["p50"] if spread else None,
                "ms_p95": spread["p95"] if spread else None,
                "errors": check_errors[name],
            }
        )
    section: dict[str, Any] = {
        "guardrail_set": records[0][1]["set"],
        "guardrail_latency_ms": latency,
        "guardrail_latency_distribution_ms": distributions,
    }
    impact_spread = _spread(impact)
    if impact_spread is not None:
        section["security_impact_percent"] = impact_spread["p50"]
    section.update(
        {
            "security_impact_percent_distribution": impact_spread,
            "violations_detected": [
                {"type": t, "severity": sev, "blocked": b, "stage": st, "count": n}
                for (t, sev, b, st), n in sorted(violations.items())
            ],
            "risk_assessment": {"risk_score": risk, "risk_level": risk_level(risk)},
            "outcomes": {o: outcomes[o] for o in ("passed", "blocked", "error", "passed_with_errors")},
            "blocked_by_stage": {s: blocked_by[s] for s in _SCHEMA_STAGE},
            "checks": checks,
            # requests whose inference ran beside a check still running past its time limit: their inference
            # figures include that check's work
            "requests_beside_stray_checks": sum(
                type(g.get("stray_checks")) is int and g["stray_checks"] > 0 for _, g in records
            ),
        }
    )
    return section


def guardrail_line(security: dict[str, Any]) -> str:
    """``guardrails pii: input 0.4 / threat — / output 0.2 ms p50, 1.1 % of a served request (p95 2.0 %); blocked 3 of
    12 (input 2, output 1)``."""
    dist = security["guardrail_latency_distribution_ms"]

    def p50(stage: str) -> str:
        d = dist.get(_SCHEMA_STAGE[stage])
        return f"{d['p50']:.2f}" if d else "—"

    stages = " / ".join(f"{s} {p50(s)}" for s in _SCHEMA_STAGE)
    impact = security.get("security_impact_percent_distribution")
    share = f"{impact['p50']:.1f} % of a served request (p95 {impact['p95']:.1f} %)" if impact else "no request served"
    outcomes = security["outcomes"]
    total = sum(outcomes.values())
    by_stage = ", ".join(f"{s} {n}" for s, n in security["blocked_by_stage"].items() if n)
    blocked = f"blocked {outcomes['blocked']} of {total}" + (f" ({by_stage})" if by_stage else "")
    errors = outcomes["error"] + outcomes["passed_with_errors"]
    failed = f"; guardrail errors {errors}" if errors else ""
    line = f"guardrails {security['guardrail_set']}: {stages} ms p50, {share}; {blocked}{failed}"
    stray = security.get("requests_beside_stray_checks") or 0
    if stray:
        line += (
            f"; {stray} request{'s' if stray != 1 else ''} ran beside a check still running past its time limit: "
            "their inference figures include its work"
        )
    return line
