"""One ``lens-agent bench`` invocation: load each model, run the benchmark, write the outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import psutil

from ..clock import stamp
from ..collab.context import CollabContext
from ..config import AgentConfig
from ..device import device_info
from ..engines.llama import EngineSettings, LlamaEngine
from ..engines.modelfile import resolve_model_path
from ..errors import UsageError
from ..measurement import Measurement
from ..probes.device import describe, gpu_load_percent
from ..probes.interference import InterferenceMonitor, ThreadChoice, choose_threads, monitor_from_config
from ..probes.power import detect_power
from ..probes.sampler import PowerSampler
from ..probes.sysfs import Root
from ..prompts import load_prompts
from ..strategies import build_strategy
from .report import comparison_table, llmperf_files, results_document, settings_sources, summary_table
from .runner import BenchOptions, ModelRun, run_bench

if TYPE_CHECKING:  # guardrails load for a guarded bench only
    from ..guardrails.pipeline import GuardrailSet


@dataclass
class BenchRequest:
    config: AgentConfig
    models: list[Path] = field(default_factory=list)
    output: Path | None = None
    raw: Path | None = None
    llmperf_dir: Path | None = None
    include_text: bool = True
    progress: bool | None = None
    store: bool = False
    guardrails: str | None = None  # a guardrail set's name (--guardrails): a [[guardrails]] set or a built-in one
    keep_measurements: bool = False  # keep each request's record in the session (--format protobuf writes them)


@dataclass
class BenchSession:
    run_id: str
    documents: list[dict[str, Any]] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    # each document's measured requests as records (texts as --no-text says), for --format protobuf: kept only when
    # the request asks (keep_measurements), not a second copy of every run's records otherwise
    measurements: list[list[dict[str, Any]]] = field(default_factory=list)
    stored: int | None = None
    outbox_file: Path | None = None

    @property
    def comparison(self) -> str:
        return comparison_table(self.documents)


def _label(path: Path, used: set[str]) -> str:
    label = path.stem
    n = 2
    while label in used:
        label = f"{path.stem}-{n}"
        n += 1
    used.add(label)
    return label


def output_paths(output: Path, labels: list[str]) -> list[Path]:
    """One document per model: ``out.json`` for one model, ``out-<label>.json`` for several."""
    if len(labels) == 1:
        return [output]
    suffix = output.suffix or ".json"
    return [output.with_name(f"{output.stem}-{label}{suffix}") for label in labels]


def _open_for_writing(path: Path, what: str) -> IO[str]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("w", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot be written ({exc.strerror})") from None


def run_session(request: BenchRequest, status: Callable[[str], None] = lambda _: None) -> BenchSession:
    config = request.config
    # a set name that is not there fails before anything is loaded
    guardrail_set = None
    if request.guardrails is not None:  # the guardrails load for a guarded bench only
        from ..guardrails.pipeline import set_from_config

        guardrail_set = set_from_config(config, request.guardrails, asked_by="--guardrails")
    bench_cfg = config.values["bench"]
    options = BenchOptions(
        runs=bench_cfg["runs"],
        warmup=bench_cfg["warmup"],
        max_tokens=bench_cfg["max_tokens"],
        ignore_eos=bench_cfg["ignore_eos"],
        chat_template=bench_cfg["chat_template"],
        reuse_cache=bench_cfg["reuse_cache"],
        include_text=request.include_text,
    )
    prompts = load_prompts(bench_cfg["prompts"])
    prompt_source = str(bench_cfg["prompts"]) if bench_cfg["prompts"] else "built-in prompt set"
    model_paths = [resolve_model_path(p) for p in request.models] or [resolve_model_path(config.get("model", "path"))]
    used: set[str] = set()
    labels = [_label(p, used) for p in model_paths]
    outputs: list[Path | None] = (
        list(output_paths(request.output, labels)) if request.output else [None] * len(model_paths)
    )
    settings = EngineSettings.from_config(config)
    device = device_info()
    probes = config.values["probes"]
    root = Root(probes["sysfs_root"])
    strategy_name = config.get("collab", "strategy")
    threads: ThreadChoice | None = None
    if strategy_name != "cloud":  # before loading: the cores other work keeps busy now (docs/interference.md)
        threads = choose_threads(
            settings.n_threads,
            config.source("model", "n_threads"),
            root,
            physical_cores=device.get("cpu_cores_physical") or device.get("cpu_cores_logical") or 1,
        )
        status(threads.line)
        settings = dataclasses.replace(settings, n_threads=threads.n_threads)
    sources, unavailable = detect_power(root, probes["power_source"])
    device.update(_device_facts(root))

    def extras() -> dict[str, float | None]:
        return {"_mem_percent": psutil.virtual_memory().percent, "_gpu_load_percent": gpu_load_percent(root)}

    session = BenchSession(run_id=str(uuid.uuid4()))
    collab = CollabContext.open(config, status) if strategy_name != "local" else None
    targets: list[Path | None] = [None] if strategy_name == "cloud" else list(model_paths)
    if strategy_name == "cloud":
        outputs = [request.output]
    guardrails: GuardrailSet | None = None
    raw_file = _open_for_writing(request.raw, "--raw file") if request.raw else None
    outbox = None
    if request.store:  # the outbox (and asyncio with it) loads only for --store
        from ..outbox import open_outbox

        outbox = open_outbox(config)
    if outbox is not None:
        session.stored = 0
        session.outbox_file = outbox.path

    def store(record: Measurement) -> None:
        if outbox is not None:
            outbox.append(stamp(record.to_dict()))  # with the kernel's clock state (ext.clock)
            session.stored = (session.stored or 0) + 1

    try:
        if guardrail_set is not None:  # once for every model: a judge loads its own model here
            from ..guardrails.base import BuildContext
            from ..guardrails.pipeline import GuardrailSet

            status(f"building the guardrail set {guardrail_set.name} …")
            guardrails = GuardrailSet.build(guardrail_set, BuildContext(n_threads=settings.n_threads))
        for index, (path, out_path) in enumerate(zip(targets, outputs, strict=False)):
            if path is not None:
                status(f"loading {path} …")
            engine_context: Any = LlamaEngine.load(path, settings) if path is not None else contextlib.nullcontext()
            with engine_context as engine:
                strategy = build_strategy(strategy_name, engine, options, collab, config)
                sampler = PowerSampler(sources, rate_hz=probes["sample_rate_hz"], extras=extras)
                monitor = monitor_from_config(
                    config.values,
                    needed_cores=settings.n_threads if engine is not None else 1,
                    uses_gpu=engine is not None and settings.n_gpu_layers != 0,
                )
                sampler.start()
                if monitor is not None:
                    monitor.start()
                baseline: dict[str, float] = {}
                try:
                    if sources and probes["idle_baseline"] > 0:
                        status(f"measuring idle power for {probes['idle_baseline']:g} s …")
                        baseline = sampler.baseline(probes["idle_baseline"])
                    run = _run_with_progress(
                        engine,
                        prompts,
                        options,
                        session.run_id,
                        config,
                        raw_file,
                        request,
                        store,
                        sampler,
                        baseline,
                        strategy,
                        collab.model if collab and engine is None else None,
                        monitor,
                        guardrails,
                    )
                finally:
                    sampler.stop()
                    if monitor is not None:
                        monitor.stop()
                extra: dict[str, Any] = {}
                if collab is not None and config.get("collab", "baselines") and engine is not None:
                    extra["speedup"] = _baselines(collab, config, run, engine, prompts, options, status)
                document = results_document(
                    run,
                    run_id=session.run_id,
                    device=device,
                    options=options,
                    prompt_source=prompt_source,
                    sampler=sampler,
                    power_unavailable=unavailable,
                    baseline_w=baseline,
                    cloud=collab.describe() if collab else None,
                    power_source=probes["power_source"],
                    interference=monitor,
                    threads=threads if engine is not None else None,
                )
                document["results"].update(extra)
                if engine is not None:  # which flag, file or drop-in set each engine setting; the run's label
                    setting_sources = settings_sources(config)
                    busy = document["configuration"].get("busy_cores")
                    if document["configuration"].get("n_threads_source") == "default" and busy and round(busy) >= 1:
                        # the default thread count left cores other work kept busy: say so where the source is named
                        setting_sources["n_threads"] = f"default (physical cores less {busy:.1f} busy with other work)"
                    document["configuration"]["settings_source"] = setting_sources
                    document["configuration"]["model"]["label"] = labels[index]
                if request.llmperf_dir is not None:
                    session.written.extend(llmperf_files(run, document, request.llmperf_dir))
            session.documents.append(document)
            if request.keep_measurements:
                session.measurements.append([m.to_dict(include_text=request.include_text) for m in run.measured])
            session.tables.append(summary_table(document))
            if out_path is not None:
                try:
                    with _open_for_writing(out_path, "--output file") as handle:
                        json.dump(document, handle, indent=2)
                        handle.write("\n")
                except OSError as exc:  # a full disk (or /dev/full) fails the write or the close: say which file
                    raise UsageError(f"--output file {out_path}: cannot be written ({exc.strerror})") from None
                session.written.append(out_path)
    finally:
        for source in sources:
            source.close()
        if guardrails is not None:
            guardrails.close()
        if collab is not None:
            collab.close()
        if raw_file is not None:
            raw_file.close()
        if outbox is not None:
            outbox.close()
    if request.raw:
        session.written.append(request.raw)
    return session


def _baselines(
    collab: CollabContext,
    config: AgentConfig,
    run: ModelRun,
    engine: LlamaEngine,
    prompts: list[Any],
    options: BenchOptions,
    status: Callable[[str], None],
) -> dict[str, Any]:
    """Cloud-only and edge-only runs of the same prompts, now: speedups of the collaborative run over each."""

    def tps(r: Any) -> float | None:
        ok = [m for m in r.measured if m.ok]
        return sum(m.output_tokens for m in ok) / r.measured_wall_s if ok and r.measured_wall_s else None

    baselines = {}
    for name, what in (("cloud", "cloud-only"), ("local", "on the edge model alone")):
        status(f"baseline: the same prompts {what} …")
        strategy = build_strategy(name, engine, options, collab, config)
        baselines[name] = run_bench(
            engine, prompts, options, run_id="baseline", device_id="baseline", strategy=strategy
        )
    cloud, local = baselines["cloud"], baselines["local"]
    ours, cloud_tps, local_tps = tps(run), tps(cloud), tps(local)
    return {
        "vs_cloud_only": ours / cloud_tps if ours and cloud_tps else None,
        "vs_edge_only": ours / local_tps if ours and local_tps else None,
        "tokens_per_second": {"this_run": ours, "cloud_only": cloud_tps, "edge_only": local_tps},
        "method": "output tokens ÷ measured wall time of each run, the same prompts, measured in the same session",
    }


def _device_facts(root: Root) -> dict[str, Any]:
    """The probe's view of the device, for the results' hardware section."""
    facts = describe(root)
    out: dict[str, Any] = {
        "device_class": facts["device_class"],
        "device_class_evidence": facts["device_class_evidence"],
        "thermal_throttling": facts["thermal_throttling"],
        "clock_synchronized": facts["clock_synchronized"],
    }
    for key in ("model", "jetson", "compute_capability", "temperatures_c", "nvmap_used_bytes"):
        if facts.get(key):
            out[key] = facts[key]
    if facts.get("accelerator"):
        out["gpu_type"] = facts["accelerator"]
    return out


def progress_label(name: str, width: int = 30) -> str:
    """The model's file name without ``.gguf``, shortened in the middle so both ends stay readable."""
    name = name.removesuffix(".gguf")
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return name[:head] + "…" + name[-(width - 1 - head) :]


class _NoBar:
    """What the progress bar's callers use, doing nothing (no bar: not a terminal, or --no-progress)."""

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _run_with_progress(
    engine: LlamaEngine | None,
    prompts: list[Any],
    options: BenchOptions,
    run_id: str,
    config: AgentConfig,
    raw_file: IO[str] | None,
    request: BenchRequest,
    store: Callable[[Measurement], None],
    sampler: PowerSampler,
    baseline: dict[str, float],
    strategy: Any,
    model_name: str | None,
    monitor: InterferenceMonitor | None = None,
    guardrails: GuardrailSet | None = None,
) -> Any:
    show = request.progress if request.progress is not None else sys.stderr.isatty()
    bar: Any = _NoBar()
    if show:  # tqdm loads only when a bar is shown
        import tqdm

        tqdm.tqdm.monitor_interval = 0  # no monitor thread waking up during the timed loop
        label = progress_label(Path(engine.info.path).name if engine is not None and engine.info else strategy.name)
        bar = tqdm.tqdm(
            total=options.warmup + options.runs,
            desc=label,
            unit="req",
            file=None,
            leave=False,
            mininterval=0,  # refreshed between requests only, never inside the timed loop
        )

    def on_result(record: Measurement) -> None:
        store(record)  # durable before the next request starts
        if raw_file is not None:
            raw_file.write(json.dumps(record.to_dict(include_text=request.include_text)) + "\n")
            raw_file.flush()
        bar.set_postfix_str("warm-up" if record.warmup else f"ttft {record.ttft_ms or 0:.0f} ms", refresh=False)
        bar.update(1)

    try:
        return run_bench(
            engine,
            prompts,
            options,
            run_id=run_id,
            device_id=config.get("agent", "device_id"),
            on_result=on_result,
            sampler=sampler,
            baseline_w=baseline,
            strategy=strategy,
            model_name=model_name,
            interference=monitor,
            guardrails=guardrails,
        )
    finally:
        bar.close()
