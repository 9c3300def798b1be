"""``lens-agent run``: the long-running agent.

It keeps the model loaded, runs the configured workloads on their schedules (interval or cron, with jitter;
``agent.schedule``, which waits on the monotonic clock, so a step of the wall clock neither stops nor floods them),
skips a run — and records why — when a gate says the device should be left alone, stores every measurement in the
outbox before the next request starts, syncs on its own schedule, and does housekeeping. At start and before every
run it reads the device's facts (power mode, clocks, temperatures, throttling: ``agent.facts``) and stores a
``device_facts`` record when they changed. Under systemd it speaks the notify protocol (READY, STATUS, WATCHDOG,
STOPPING). SIGTERM: no new work, the request in flight finishes and is stored, a last sync is attempted, exit 0 —
nothing stored is lost. SIGHUP reloads the configuration.

A guarded workload's guardrail set (``agent.guardrails``) is built by the first run that needs it, on the engine
thread, and kept: the workloads naming the same set share it, and a judge's model is loaded once, not at every run.
The sets are closed when the service stops and when the configuration is reloaded (the next run builds them afresh);
a set that failed to build is that run's error and is built again at the next run.

Its state goes to ``<data_dir>/service.json`` (written atomically every heartbeat), which ``lens-agent status``
reads whether the service runs or not. Every record it stores carries the kernel's clock state (``ext["clock"]``,
``agent.clock``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_core import otlp_config
from lens_core.notify import Notifier

from .adjuster import AdjusterError, DropInAdjuster
from .advice import DeviceLimits, refusal
from .bench.runner import BenchOptions, run_bench
from .campaigns import (
    MAX_ATTEMPTS,
    MAX_JOBS_IN_ACK,
    TERMINAL,
    CampaignError,
    JobClient,
    JobFiles,
    JobNotice,
    campaign_policy,
    check_job_document,
    clean_reason,
    deadline_passed,
    level_keys,
    level_record,
    new_job,
    parse_job_suite,
    parse_jobs,
    refused_job,
)
from .clock import boot_id, stamp
from .collab.context import CollabContext
from .config import AgentConfig, load_config, set_aside_drop_in
from .engines.llama import EngineSettings, LlamaEngine
from .engines.modelfile import resolve_model_path
from .errors import LensError, UsageError
from .facts import device_facts, facts_changed, facts_record
from .gates import gate, read_state
from .measurement import Measurement, utc_now_iso
from .memory import limit_malloc_arenas, release_free_memory
from .objectives import DIMENSIONS, values_of
from .outbox import AsyncOutbox, open_outbox
from .probes.device import gpu_load_percent
from .probes.interference import monitor_from_config
from .probes.power import detect_power
from .probes.sampler import PowerSampler
from .probes.sysfs import Root
from .prompts import load_prompts
from .schedule import Scheduler
from .status import state_path
from .strategies import build_strategy
from .tune_flow import Busy, engine_key, measure_lock, run_tune, verification_record

if TYPE_CHECKING:  # guardrails load when a guarded workload runs
    from .guardrails.pipeline import GuardrailSet

log = logging.getLogger("agent.service")
ADVICE_REMEMBERED = 500  # recommendation ids and advice (model, setting, value) remembered as seen
MAX_RUN_NOTES = 8  # notes a suite workload's run keeps for status and run --once


def write_atomically(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


class AgentService:
    def __init__(
        self,
        config_path: Path | None,
        overrides: Mapping[tuple[str, str], tuple[str, object]] | None = None,
        *,
        once: bool = False,
        notifier: Notifier | None = None,
    ) -> None:
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        self.config = load_config(config_path, overrides=self.overrides)
        self.once = once
        self.notifier = notifier or Notifier()
        self.data_dir = Path(self.config.get("agent", "data_dir"))
        self.state = "starting"
        self.started_at = utc_now_iso()
        self.engine: LlamaEngine | None = None
        self.model: dict[str, Any] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.abort = False
        limit_malloc_arenas()  # before any thread starts (docs/PERFORMANCE.md, the agent's footprint)
        # heartbeats left to give freed memory back to the kernel: right after a run, and once more after its sync
        self._release_due = 0
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._stop: asyncio.Event | None = None
        self._current: asyncio.Future[Any] | None = None
        self._scheduler: Scheduler | None = None
        self._sync: Any = None
        self._uploader: Any = None
        self.outbox: AsyncOutbox | None = None
        self._pending_once: set[str] = set()
        self.stored = 0  # records appended to the outbox by this process
        self._power_key: tuple[str, str] | None = None
        self._power_name: str | None = None
        self.facts_sent: dict[str, Any] | None = None  # the last facts written to the outbox
        self._facts_sent_at: float | None = None  # when (time.monotonic())
        # lens-agent tune's drop-in as this configuration read it: a change (a tune, a rollback) reloads
        self._adjuster = DropInAdjuster(self.data_dir)
        self._refused_drop_ins: list[str] = []  # lines about drop-ins set aside, stored once the outbox is open
        self.config = self._set_aside(self.config)
        self._drop_in_text = self._adjuster.drop_in_text()
        self._limits: tuple[str, DeviceLimits] | None = None  # the device's limits for the model at that path
        # advice seen and the last tune from one (monotonic), kept here as well as in recommendations.json: a file
        # that cannot be read or written never lifts the rate limit
        self._advice: dict[str, Any] = {"tried": [], "tried_values": [], "last_mono": None}
        self._last_measured: list[Measurement] = []
        # guardrail sets built by a run and kept for the next ones, by set name, with the thread count they were
        # built for: touched on the engine thread only (built there, closed there at a reload and at the stop)
        self._guardrail_sets: dict[str, tuple[int, GuardrailSet]] = {}
        self._measuring = asyncio.Lock()
        # benchmark campaigns (agent.campaigns): jobs announced by acks and not fetched yet (≤ 8), jobs the
        # aggregator cancelled, jobs this process has started (an attempt each), the campaign pass in flight
        self._jobs = JobFiles(self.data_dir)
        self._job_notices: dict[str, JobNotice] = {}
        self._job_cancel: set[str] = set()
        self._job_started_here: set[str] = set()
        self._campaign_busy = False
        self.suites = load_suites(self.config)  # a suite workload's document, checked before anything runs
        self._not_taken: set[str] = set()  # jobs announced while 8 were in progress here, already logged
        self._last_jobs_heard = float("-inf")  # when an ack or a poll last told this device its campaign jobs

    # -- lifecycle --------------------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = AsyncOutbox(open_outbox(self.config))
        await self._store_set_aside()
        self._start_sync()
        await self._load_model()
        await self._report_device_facts()
        self._scheduler = Scheduler()
        self._schedule_workloads()
        service = self.config.values["service"]
        beat = service["heartbeat_interval"]
        if self.notifier.watchdog_s:
            beat = min(beat, self.notifier.watchdog_s / 2)
        self._scheduler.every("heartbeat", beat, self.heartbeat)
        self._scheduler.every("housekeeping", service["housekeeping_interval"], self.housekeeping)
        if not self.once:  # campaign jobs: resumed from their files, fetched as acks announce them
            self._scheduler.every("campaigns", self._campaign_interval(), self.campaign_tick, first_in=1.0)
        self.state = "idle"
        await self.heartbeat()
        self.notifier.ready(self._status_line())
        log.info("ready: %s", self._status_line())
        await self._stop.wait()
        return await self._shutdown()

    def request_stop(self) -> None:
        if self._stop is not None and not self._stop.is_set():
            log.info("stopping: no new work; the request in flight finishes and is stored")
            self.abort = True
            self.state = "stopping"
            self.notifier.stopping()
            self._stop.set()

    async def _shutdown(self) -> int:
        # The network goes first: a sync in flight (or waiting out a retry) is cancelled and the aggregator's
        # requests (a campaign poll) fail at once, so a silent aggregator cannot hold the stop for sync.timeout;
        # what was not acknowledged stays in the outbox. Then the measuring finishes; then one bounded last sync.
        # (run --once syncs as its work: the sync in flight finishes.)
        if self._sync is not None:
            await self._sync.stop(cancel=not self.once)
        if self._uploader is not None and not self.once:
            await self._uploader.hold_requests()
        if self._scheduler is not None:
            await self._scheduler.shutdown(wait=True)  # a workload run in flight finishes and stores its records
        if self._current is not None:
            await asyncio.gather(self._current, return_exceptions=True)
        if self._uploader is not None and not self.once:
            self._uploader.release_requests()
        timeout = self.config.values["service"]["final_sync_timeout"]
        if self._uploader is not None and timeout > 0:
            try:
                report = await asyncio.wait_for(self._uploader.sync_now(), timeout)
                log.info("final sync: %d uploaded, %d pending", report.uploaded, report.pending)
            except asyncio.TimeoutError:
                log.warning("final sync did not finish within %g s; the rest stays in the outbox", timeout)
        if self._uploader is not None:
            await self._uploader.close()
        if self.outbox is not None:
            await self.outbox.close()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._engine_thread, self._close_guardrail_sets, "the service stops")
        if self.engine is not None:
            await loop.run_in_executor(self._engine_thread, self.engine.close)
        self._engine_thread.shutdown(wait=True)
        self.state = "stopped"
        self._write_state()
        log.info("stopped")
        return 0

    async def reload(self) -> None:
        self.notifier.reloading()
        try:
            config = load_config(self.config_path, overrides=self.overrides)
            suites = load_suites(config)
        except LensError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            self.notifier.send("READY=1", f"STATUS=reload refused: {exc}")
            return
        old = self.config
        config = self._set_aside(config)
        self.config, self.suites = config, suites
        # the kept guardrail sets go, in turn on the engine thread (after a run in flight, before any run of the new
        # configuration): the next run of a guarded workload builds its set from the configuration just read
        with contextlib.suppress(RuntimeError):  # … unless the service has stopped meanwhile (it closed them)
            self._engine_thread.submit(self._close_guardrail_sets, "the configuration was reloaded")
        await self._store_set_aside()
        self._drop_in_text = self._adjuster.drop_in_text()
        if old.values["model"] != config.values["model"]:
            await self._load_model()
        if (
            old.values["sync"] != config.values["sync"]
            or old.values["otlp"] != config.values["otlp"]  # a standalone device exports to [otlp] itself
            or old.get("agent", "device_id") != config.get("agent", "device_id")
        ):
            if self._sync is not None:
                await self._sync.stop()
            if self._uploader is not None:
                await self._uploader.close()
            self._start_sync()
        elif self._uploader is not None:  # the workloads may have changed: so has the silence to expect
            self._uploader.settings = dataclasses.replace(self._uploader.settings, expected_gap_s=self.expected_gap())
        self._schedule_workloads()
        log.info("configuration reloaded from %s", config.path or "defaults")
        self.notifier.send("READY=1", f"STATUS={self._status_line()}")

    # -- pieces -----------------------------------------------------------------------------------------------
    def _start_sync(self) -> None:
        from .sync import SyncService, Uploader, sync_settings

        self._sync = self._uploader = None
        assert self.outbox is not None
        standalone = otlp_config.otlp_settings(self.config) if not self.config.get("sync", "url") else None
        if standalone is not None:
            from .otlp_sync import OtlpUploader, standalone_sync_settings

            log.info("no sync.url: exporting the outbox to the OTLP backend %s", standalone.endpoint)
            self._uploader = OtlpUploader(self.outbox, standalone_sync_settings(self.config, standalone), standalone)
        elif not self.config.get("sync", "url"):
            log.warning("sync.url is not set: measurements stay in the outbox until it is")
            return
        else:
            if self.config.get("otlp", "endpoint"):
                log.warning(
                    "sync.url and otlp.endpoint are both set: uploading to the aggregator, which forwards to OTLP"
                )
            self._uploader = Uploader(self.outbox, sync_settings(self.config))
        self._uploader.settings = dataclasses.replace(self._uploader.settings, expected_gap_s=self.expected_gap())
        self._uploader.on_ack = self._on_ack
        self._sync = SyncService(self._uploader)
        self._sync.start()

    async def _load_model(self) -> None:
        path = resolve_model_path(self.config.get("model", "path"))
        settings = EngineSettings.from_config(self.config)
        loop = asyncio.get_running_loop()
        if self.engine is not None:
            await loop.run_in_executor(self._engine_thread, self.engine.close)
        self.state = "loading model"
        self.notifier.status(f"loading {path.name}")
        self.engine = await loop.run_in_executor(self._engine_thread, LlamaEngine.load, path, settings)
        info, load = self.engine.info, self.engine.load_info
        assert info is not None and load is not None
        self.model = {
            "path": str(path),
            "name": info.name,
            "quantization": info.quantization,
            "sha256": info.sha256,
            "loaded_at": utc_now_iso(),
            "load_ms": load.load_ms,
            "engine_load_ms": load.engine_load_ms,
            "settings": settings.as_dict(),
        }
        record = Measurement(
            run_id=str(uuid.uuid4()),
            device_id=self.config.get("agent", "device_id"),
            model_name=info.name,
            model_sha256=info.sha256 or None,
            kind="model_load",
            output_tokens=0,
        )
        record.e2e_ms = load.load_ms
        record.rss_before_bytes = load.rss_before_bytes
        record.rss_peak_bytes = load.rss_after_bytes
        record.ext["model_load"] = {"engine_load_ms": load.engine_load_ms, "path": str(path), **settings.as_dict()}
        assert self.outbox is not None
        await self.outbox.append(stored_form(record))
        self.stored += 1
        log.info("model %s loaded in %.0f ms", path.name, load.load_ms)

    def expected_gap(self) -> float | None:
        """The longest this device should stay silent to its aggregator: its most frequent workload's period (the
        records that make a batch) or the sync interval, whichever is longer; None without workloads."""
        from .schedule import expected_gap

        return expected_gap(self.config)

    def _schedule_workloads(self) -> None:
        scheduler = self._scheduler
        assert scheduler is not None
        for job in scheduler.jobs():
            if job.id.startswith("workload:"):
                scheduler.remove(job.id)
        for workload in self.config.workloads:
            job_id = f"workload:{workload['name']}"
            run = partial(self.run_workload, workload)
            if workload["cron"]:
                scheduler.cron(job_id, workload["cron"], run, jitter=workload["jitter"], run_now=self.once)
            else:
                first_in = 0.0 if self.once else None
                scheduler.every(job_id, workload["every"], run, jitter=workload["jitter"], first_in=first_in)
            self._pending_once.add(workload["name"])
        scheduler.remove("tune")
        tune = self.config.values["tune"]
        if tune["cron"]:
            scheduler.cron("tune", tune["cron"], self.run_tune_job, jitter=0.0, run_now=False)
        elif tune["every"]:
            scheduler.every("tune", tune["every"], self.run_tune_job, jitter=0.0)

    async def run_workload(self, workload: dict[str, Any]) -> None:
        if self.abort:
            return
        name = workload["name"]
        await self._follow_drop_in()
        await self._report_device_facts()  # before the gate: a run skipped for throttling reports the throttling
        root = Root(self.config.get("probes", "sysfs_root"))
        reason = gate(self.config.values["gates"], read_state(root))
        if reason is not None:
            await self._record_skip(name, reason)
        else:
            try:
                async with self._measuring:  # the service's own runs take turns (one engine thread)
                    with measure_lock(self.data_dir):  # … and never measure beside a lens-agent tune
                        summary = await self._run_measurement(workload)
            except Busy as exc:
                await self._record_skip(name, f"another process is measuring (lens-agent tune?): {exc}")
                summary = None
            except LensError as exc:  # the measuring lock cannot be taken: say why, and try again next time
                await self._record_skip(name, str(exc))
                summary = None
            if summary is not None and summary.get("requests") == 0 and "error" not in summary and self.abort:
                # stopping while this run waited for its turn (a schedule fired as --once finished, a SIGTERM):
                # it measured nothing, and the run before it stays what status and --once report
                summary = None
            if summary is not None:
                self.runs[name] = summary
                await self._verify(name, summary)
            self.state = "stopping" if self.abort else "idle"
            if self._sync is not None:
                self._sync.trigger()
        self._pending_once.discard(name)
        self._release_due = 2
        await self.heartbeat()
        if self.once and not self._pending_once:
            self.request_stop()

    async def _run_measurement(self, workload: dict[str, Any]) -> dict[str, Any]:
        name = workload["name"]
        self.state = f"measuring {name}"
        self.notifier.status(self.state)
        loop = asyncio.get_running_loop()
        self._last_measured = []
        self._current = loop.run_in_executor(self._engine_thread, self._measure, workload)
        try:
            summary: dict[str, Any] = await self._current
        except LensError as exc:
            log.error("workload %s failed: %s", name, exc)
            summary = {"at": utc_now_iso(), "error": str(exc)}
        finally:
            self._current = None
        return summary

    # -- tuning: follow the drop-in, verify a change over the next runs, tune on a schedule ---------------------
    async def _follow_drop_in(self) -> None:
        """Reload when lens-agent tune changed its drop-in since the configuration was read."""
        try:
            text = self._adjuster.drop_in_text()
        except OSError as exc:
            log.warning("tuning drop-in not readable, keeping the running settings: %s", exc)
            return
        if text != self._drop_in_text:
            log.info("the tuning drop-in %s changed: reloading the engine settings", self._adjuster.drop_in)
            await self._reload_engine_settings()

    async def _reload_engine_settings(self) -> None:
        """Take the [model] section afresh (file, drop-in, environment, flags) and reload the model when it
        changed; the rest of the running configuration stays as it is (SIGHUP reloads all of it)."""
        try:
            config = load_config(self.config_path, overrides=self.overrides)
        except LensError as exc:
            log.error("the configuration is refused, keeping the running settings: %s", exc)
            self._drop_in_text = self._adjuster.drop_in_text()
            return
        config = self._set_aside(config)
        await self._store_set_aside()
        self._drop_in_text = self._adjuster.drop_in_text()
        if config.values["model"] == self.config.values["model"]:
            return
        self.config = dataclasses.replace(
            self.config,
            values={**self.config.values, "model": config.values["model"]},
            sources={**self.config.sources, "model": config.sources["model"]},
        )
        await self._load_model()

    def _set_aside(self, config: AgentConfig) -> AgentConfig:
        """A drop-in the configuration left out (it fails the file's own checks), or one whose values this device
        refuses (agent.advice: more threads than CPUs, more GPU layers than the model has, …: a drop-in is advice
        too, whoever wrote it), is moved aside: the service goes on with the file's settings, measuring and
        uploading, and says so (log, status, a record). Returns the configuration to run with."""
        reason = config.drop_in_refused
        if reason is None:
            changed = [k for k in DIMENSIONS if config.source("model", k).startswith("drop-in ")]
            if changed:
                limits = DeviceLimits.for_config(config)
                refused = refusal(EngineSettings.from_config(config).as_dict(), limits, changed)
                if refused is not None:
                    reason = f"drop-in {self._adjuster.drop_in}: {refused}"
        if reason is None:
            return config
        moved = set_aside_drop_in(self.data_dir, reason)
        where = f"set aside as {moved}" if moved else "left out (it could not be moved)"
        line = f"tuning drop-in refused: {reason}; {where}; running with the configuration file's settings"
        log.error("%s", line)
        self._refused_drop_ins.append(line)
        if config.drop_in_refused is None and moved is not None:
            try:
                return load_config(self.config_path, overrides=self.overrides)
            except LensError as exc:  # the file passed a moment ago: keep what was loaded, say why
                log.error("the configuration without the drop-in is refused: %s", exc)
        return config

    async def _store_set_aside(self) -> None:
        if self.outbox is None:
            return
        while self._refused_drop_ins:
            from .tuning import tune_record

            line = self._refused_drop_ins.pop(0)
            record = tune_record(
                "drop_in_refused",
                {"reason": line},
                device_id=self.config.get("agent", "device_id"),
                model_name=self.model.get("name", "unknown"),
            )
            await self.outbox.append(stored_form(record))
            self.stored += 1

    async def _verify(self, name: str, summary: dict[str, Any]) -> None:
        """Count this run toward the verification of an applied change; roll it back when it made things worse."""
        if "error" in summary or self.engine is None or self.engine.settings is None:
            return
        objective = self.config.get("tune", "objective")
        values = values_of(self._last_measured, objective)
        key = engine_key(self.engine.settings)
        try:
            verification = self._adjuster.observe(name, key, values)
        except LensError as exc:
            log.warning("tuning: this run is not counted toward verification: %s", exc)
            return
        if verification is None:
            return
        record = verification_record(
            verification, device_id=self.config.get("agent", "device_id"), model_name=self.model.get("name", "unknown")
        )
        assert self.outbox is not None
        await self.outbox.append(stored_form(record))
        self.stored += 1
        a = verification.adjustment
        if verification.rolled_back:
            log.warning("tuning: %s rolled back: %s", a.changes, (a.result or {}).get("reason"))
            await self._reload_engine_settings()
        else:
            log.info("tuning: %s verified over %d runs: %s", a.changes, a.runs_after, a.status)

    def _device_limits(self) -> DeviceLimits:
        """This device's limits for the configured model (agent.advice), read once per model path."""
        path = str(self.model.get("path") or "")
        if self._limits is None or self._limits[0] != path:
            self._limits = (path, DeviceLimits.probe(Path(path) if path else None))
        return self._limits[1]

    def _remember(self, recommendation_id: str, advice: str) -> None:
        """Advice seen (tuned or refused), oldest first, the latest :data:`ADVICE_REMEMBERED` of each kind."""
        for name, item in (("tried", recommendation_id), ("tried_values", advice)):
            kept = self._advice[name]
            if item in kept:
                kept.remove(item)
            kept.append(item)
            del kept[:-ADVICE_REMEMBERED]

    def _on_ack(self, payload: dict[str, Any]) -> None:
        """An acknowledgement arrived: keep the recommendations it carries for this device and, when
        ``tune.auto_apply`` allows it, tune one here — the current value against the recommended one, measured on
        this device in a child process.

        A recommendation is advice from a party that may be hostile (a compromised aggregator, anything in the
        middle of the link): ``lens_core.recommendations.parse_wire`` keeps only well-formed items within the
        configuration's bounds; this device's own checks (agent.advice: its CPUs, its context, its model's layers)
        refuse the rest; the same advice (model, setting, value) is tuned once whatever its id; and tunes from
        recommendations start at most once per ``tune.recommendation_interval``, so a stream of fresh ids never
        keeps the scheduled runs from running.

        The same answer may carry benchmark campaign jobs (``jobs``): :meth:`_campaign_ack`."""
        try:
            self._campaign_ack(payload)
        except Exception:  # a bug here never stops the recommendations (nor the ack: it is done)
            log.exception("sync: the acknowledgement's campaign jobs could not be handled")
        if "recommendations" not in payload:
            return
        from lens_core.recommendations import parse_wire

        found, problems = parse_wire(payload["recommendations"])
        if problems:  # one line per answer, however many items it held
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            log.warning("sync: a recommendation from the aggregator is ignored: %s%s", problems[0], more)
        memory = self._advice
        try:
            known = self._adjuster.recommendations()
        except AdjusterError as exc:
            log.warning("sync: the kept recommendations are not readable; what this process remembers holds: %s", exc)
            known = {}
        for name in ("tried", "tried_values"):  # the file and this process's memory: whichever knows more
            kept = known.get(name)
            for item in kept if isinstance(kept, list) else []:
                if isinstance(item, str) and item not in memory[name]:
                    memory[name].append(item)
            del memory[name][:-ADVICE_REMEMBERED]
        tried, tried_values = set(memory["tried"]), set(memory["tried_values"])
        refused: list[dict[str, Any]] = []
        current = EngineSettings.from_config(self.config).as_dict()
        due = []
        for rec in found:
            section, _, key = rec.target.partition(".")
            advice = f"{rec.model_name}\x00{rec.target}\x00{rec.recommended_value!r}"
            if section != "model" or key not in DIMENSIONS or rec.recommendation_id in tried or advice in tried_values:
                continue  # only what a tune searches (DIMENSIONS) is measured here; the same advice once
            if self.model.get("name") not in (None, rec.model_name):
                continue
            if current[key] == rec.recommended_value:
                continue
            reason = refusal({**current, key: rec.recommended_value}, self._device_limits(), [key])
            if reason is not None:
                refused.append({"recommendation_id": rec.recommendation_id, "target": rec.target, "reason": reason})
                self._remember(rec.recommendation_id, advice)  # refused once, logged once
                continue
            due.append((rec, key, advice))
        if refused:
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            log.warning("sync: recommendation refused by this device: %s%s", refused[0]["reason"], more)
        auto = self.config.get("tune", "auto_apply")
        now_wall, now_mono = time.time(), time.monotonic()
        raw_last = known.get("last_tune_at")
        last = float(raw_last) if isinstance(raw_last, (int, float)) and not isinstance(raw_last, bool) else None
        if last is not None and last > now_wall:  # a clock stepped back: "in the future" counts as just now
            last = now_wall
        interval = self.config.get("tune", "recommendation_interval")
        waiting = (last is not None and now_wall - last < interval) or (
            memory["last_mono"] is not None and now_mono - memory["last_mono"] < interval
        )
        busy = (
            self._scheduler is None
            or self.state == "tuning"
            or self._scheduler.is_running("tune:recommendation")
            or any(job.id == "tune:recommendation" for job in self._scheduler.jobs())
        )
        chosen = due[0] if auto and due and not waiting and not busy else None
        if chosen is not None:
            self._remember(chosen[0].recommendation_id, chosen[2])
            memory["last_mono"] = now_mono  # the rate limit holds in this process whatever the file says
        try:
            self._adjuster.keep_recommendations(
                [dataclasses.asdict(r) for r in found],
                list(memory["tried"]),
                tried_values=list(memory["tried_values"]),
                refused=refused or known.get("refused") or [],
                last_tune_at=now_wall if chosen is not None else last,
            )
        except AdjusterError as exc:
            log.warning("sync: the recommendations received are not kept: %s", exc)
        if chosen is None:
            if due and not auto:
                log.info("sync: %d recommendation(s) received; tune.auto_apply is false: lens-agent tune run", len(due))
            elif due and waiting:
                log.info(
                    "sync: %d recommendation(s) wait: the last tune from a recommendation was under %s ago "
                    "(tune.recommendation_interval)",
                    len(due),
                    f"{interval:g} s",
                )
            return
        rec, key, _ = chosen  # one at a time: the next arrives with a later answer, measured against the new settings
        assert self._scheduler is not None
        values = sorted({current[key], rec.recommended_value}, key=str)
        self._scheduler.later(
            "tune:recommendation",
            0.0,
            partial(
                self.run_tune_job,
                trigger=f"recommendation:{rec.recommendation_id}",
                only={key: values},
                recommendation_id=rec.recommendation_id,
            ),
        )

    async def run_tune_job(
        self,
        trigger: str = "schedule",
        only: dict[str, list[Any]] | None = None,
        recommendation_id: str | None = None,
    ) -> None:
        """A tune inside the service: the service's model is closed while the candidates are measured (one model
        in memory), its winner applied only when ``tune.auto_apply`` allows it."""
        if self.abort:
            return
        config = self.config
        box = self.outbox.outbox if self.outbox is not None else None

        def store(record: Measurement) -> None:
            if box is not None:
                box.append(stored_form(record))
                self.stored += 1

        loop = asyncio.get_running_loop()
        try:
            async with self._measuring, contextlib.AsyncExitStack() as stack:
                stack.enter_context(measure_lock(self.data_dir))
                self.state = "tuning"
                self.notifier.status(self.state)
                if self.engine is not None:
                    await loop.run_in_executor(self._engine_thread, self.engine.close)
                    self.engine = None
                try:
                    outcome = await loop.run_in_executor(
                        self._engine_thread,
                        partial(
                            run_tune,
                            config,
                            trigger=trigger,
                            apply=config.get("tune", "auto_apply"),
                            store=store,
                            only=only,
                            recommendation_id=recommendation_id,
                            progress=lambda line: log.info("tune %s", line),
                            should_stop=lambda: self.abort,  # SIGTERM ends a tune within a second
                        ),
                    )
                    log.info(
                        "tune: %s",
                        f"applied {outcome.adjustment.changes}"
                        if outcome.adjustment
                        else outcome.not_applied or "nothing significantly faster",
                    )
                except LensError as exc:
                    log.warning("tune did not finish: %s", exc)
                finally:
                    await self._reload_engine_settings()  # the winner's settings, when one was applied
                    if self.engine is None:
                        await self._load_model()
        except Busy as exc:
            log.info("tune not run now: %s", exc)
        self.state = "stopping" if self.abort else "idle"
        if self._sync is not None:
            self._sync.trigger()

    async def _report_device_facts(self) -> None:
        """Store a ``device_facts`` record when the facts changed since the last one (``agent.facts``). A few small
        sysfs reads, on the event loop; a sensor that cannot be read skips the record, never the run."""
        try:
            current = device_facts(Root(self.config.get("probes", "sysfs_root")), self.config.get("agent", "tags"))
        except OSError as exc:
            log.warning("device facts not read, no device_facts record this time: %s", exc)
            return
        now = time.monotonic()
        age = now - self._facts_sent_at if self._facts_sent_at is not None else float("inf")
        reason = facts_changed(self.facts_sent, current, age_s=age)
        if reason is None:
            return
        record = facts_record(
            current,
            reason,
            device_id=self.config.get("agent", "device_id"),
            model_name=self.model.get("name", "unknown"),
            model_sha256=self.model.get("sha256") or None,
        )
        assert self.outbox is not None
        await self.outbox.append(stored_form(record))
        self.stored += 1
        self.facts_sent, self._facts_sent_at = current, now
        log.info("device facts stored: %s", reason)

    async def _record_skip(self, name: str, reason: str) -> None:
        log.info("workload %s skipped: %s", name, reason)
        record = Measurement(
            run_id=str(uuid.uuid4()),
            device_id=self.config.get("agent", "device_id"),
            model_name=self.model.get("name", "unknown"),
            model_sha256=self.model.get("sha256") or None,
            kind="skip",
            ok=False,
            error_type="skipped",
            error_message=reason,
        )
        record.ext["workload"] = name
        assert self.outbox is not None
        await self.outbox.append(stored_form(record))
        self.stored += 1
        self.runs[name] = {"at": utc_now_iso(), "skipped": reason}

    def _measure(self, workload: dict[str, Any]) -> dict[str, Any]:
        """On the engine thread: one run of a workload, every record stored before the next request."""
        config = self.config
        assert self.engine is not None and self.outbox is not None
        if workload["suite"] is not None:
            return self._measure_suite(workload)
        options = BenchOptions(
            runs=workload["requests"],
            warmup=workload["warmup"],
            max_tokens=workload["max_tokens"],
            ignore_eos=workload["ignore_eos"],
            chat_template=config.get("bench", "chat_template"),
        )
        strategy_name = workload["strategy"] or config.get("collab", "strategy")
        collab = CollabContext.open(config, lambda _: None) if strategy_name != "local" else None
        probes = config.values["probes"]
        root = Root(probes["sysfs_root"])
        sources, _ = detect_power(root, probes["power_source"])
        sampler = PowerSampler(
            sources,
            rate_hz=probes["sample_rate_hz"],
            extras=lambda: {"_gpu_load_percent": gpu_load_percent(root)},
        )
        box = self.outbox.outbox

        power_mode = (self.facts_sent or {}).get("power_mode")

        def store(record: Measurement) -> None:
            record.ext["workload"] = workload["name"]
            if power_mode and isinstance(record.ext.get("settings"), dict):
                record.ext["settings"]["power_mode"] = power_mode  # a Jetson's nvpmodel mode moves every figure
            box.append(stored_form(record))
            self.stored += 1

        settings = self.engine.settings
        monitor = monitor_from_config(
            config.values,
            needed_cores=settings.n_threads if settings is not None and strategy_name != "cloud" else 1,
            uses_gpu=settings is not None and settings.n_gpu_layers != 0 and strategy_name != "cloud",
        )
        guardrails = None
        try:
            strategy = build_strategy(strategy_name, self.engine, options, collab, config)
            if workload.get("guardrails"):  # built by the first run that needs it, then kept (docs/service.md)
                threads = settings.n_threads if settings is not None else config.get("model", "n_threads")
                guardrails = self._guardrail_set(config, workload["guardrails"], int(threads), workload["name"])
            sampler.start()
            if monitor is not None:
                monitor.start()
            baseline = sampler.baseline(probes["idle_baseline"]) if sources and probes["idle_baseline"] > 0 else {}
            run = run_bench(
                self.engine,
                load_prompts(workload["prompts"]),
                options,
                run_id=str(uuid.uuid4()),
                device_id=config.get("agent", "device_id"),
                on_result=store,
                sampler=sampler,
                baseline_w=baseline,
                strategy=strategy,
                should_stop=lambda: self.abort,
                interference=monitor,
                guardrails=guardrails,
            )
            self._last_measured = run.measured
        finally:
            sampler.stop()
            if monitor is not None:
                monitor.stop()
            for source in sources:
                source.close()
            if collab is not None:
                collab.close()
        power = sources[0].name if sources else None
        return summarize(run.measured, workload["name"], power, guardrail_set=workload.get("guardrails") or None)

    def _guardrail_set(self, config: AgentConfig, name: str, n_threads: int, workload: str) -> GuardrailSet:
        """On the engine thread: the guardrail set ``name``, built by the first run that needs it and kept for the
        next runs of every workload naming it (a judge's model is loaded once, a hung check's thread is not left
        behind at every run). Built again when the engine's thread count changed since (a tune's drop-in). A set that
        cannot be built raises a UsageError with its one-line reason — that run's error — and is not kept: the next
        run tries again."""
        kept = self._guardrail_sets.get(name)
        if kept is not None and kept[0] == n_threads:
            return kept[1]
        if kept is not None:
            self._close_guardrail_set(name, f"the engine now runs {n_threads} threads")
        start = time.perf_counter()
        self.state = f"measuring {workload}: building guardrail set {name}"  # what status shows while it loads
        try:
            from .guardrails.base import BuildContext
            from .guardrails.pipeline import GuardrailSet, set_from_config

            built = GuardrailSet.build(set_from_config(config, name), BuildContext(n_threads=n_threads))
        except LensError:
            raise
        except (Exception, SystemExit) as exc:  # a check's constructor failing in a way not named for us
            what = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            raise UsageError(f"guardrail set {name!r} cannot be built: {what}") from None
        finally:
            self.state = "stopping" if self.abort else f"measuring {workload}"
        self._guardrail_sets[name] = (n_threads, built)
        log.info("guardrail set %s built in %.0f ms; kept for the next runs", name, (time.perf_counter() - start) * 1e3)
        return built

    def _close_guardrail_set(self, name: str, why: str) -> None:
        """On the engine thread: close one kept set (each check within the set's time limit; never raises)."""
        _, kept = self._guardrail_sets.pop(name)
        try:
            kept.close()
        except Exception as exc:  # a close that fails leaves nothing to do but say so
            log.warning("guardrail set %s did not close cleanly: %s: %s", name, type(exc).__name__, exc)
        log.info("guardrail set %s closed: %s", name, why)

    def _close_guardrail_sets(self, why: str) -> None:
        """On the engine thread: close every kept set (a reload, the stop)."""
        for name in list(self._guardrail_sets):
            self._close_guardrail_set(name, why)

    def _measure_suite(self, workload: dict[str, Any]) -> dict[str, Any]:
        """On the engine thread: a suite workload, its every model × workload × level (docs/suites.md)."""
        from .bench.suite_run import SuiteRequest, run_suite, suite_policy

        assert self.outbox is not None
        box = self.outbox.outbox
        suite = self.suites.get(workload["name"]) or load_suites(self.config)[workload["name"]]

        def store(record: Measurement) -> None:
            box.append(stored_form(record))
            self.stored += 1

        session = run_suite(
            SuiteRequest(
                suite=suite,
                config=self.config,
                policy=suite_policy(self.config, Path(workload["suite"]).resolve().parent),
                include_text=False,
                store=store,
                should_stop=lambda: self.abort,
                engine=self.engine,
                extra_ext={"workload": workload["name"]},
            )
        )
        notes = list(dict.fromkeys(session.notes))
        for note in notes:
            log.info("workload %s: %s", workload["name"], note)
        self._last_measured = [m for m in session.measured if m.strategy == "local"]
        summary = summarize(session.measured, workload["name"], None)
        if notes:  # shown by run --once (a local model ran a level at concurrency 1): at most MAX_RUN_NOTES
            summary["notes"] = notes[:MAX_RUN_NOTES]
        return summary

    # -- benchmark campaigns (agent.campaigns, docs/campaigns.md "On the device") ----------------------------------
    def _campaign_interval(self) -> float:
        """How often pending campaign work is looked at: the sync interval, within 1 s … 60 s."""
        return min(60.0, max(1.0, float(self.config.get("sync", "interval"))))

    def _campaign_ack(self, payload: dict[str, Any]) -> None:
        """An ack's ``jobs``, checked (``parse_jobs``): new ones are fetched by the next campaign pass, cancelled ones
        stop at their next check. Only ids with a job file here are remembered as cancelled, and at most
        :data:`MAX_JOBS_IN_ACK` announcements wait to be fetched: nothing an answer says grows without bound."""
        self._last_jobs_heard = time.monotonic()
        notices, problems = parse_jobs(payload)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            log.warning("sync: a campaign job from the aggregator is ignored: %s%s", problems[0], more)
        wake = False
        for notice in notices:
            job = self._jobs.load(notice.benchmark_id)
            if notice.state == "cancelled":
                self._job_notices.pop(notice.benchmark_id, None)
                if job is not None and job["state"] not in TERMINAL:
                    self._job_cancel.add(notice.benchmark_id)
                    wake = True
            elif job is None:
                if notice.benchmark_id in self._job_notices or len(self._job_notices) < MAX_JOBS_IN_ACK:
                    self._job_notices[notice.benchmark_id] = notice
                    wake = True
            elif job["state"] in TERMINAL and job.get("reported"):
                job["reported"] = False  # the aggregator missed the final report: send it again
                self._save_job(job)
                wake = True
        scheduler = self._scheduler
        if not wake or scheduler is None or self.abort:
            return
        if scheduler.get("campaigns-now") is None and not scheduler.is_running("campaigns-now"):
            scheduler.later("campaigns-now", 0.0, self.campaign_tick)

    def _save_job(self, job: dict[str, Any]) -> None:
        try:
            self._jobs.save(job)
        except OSError as exc:
            log.error("campaign %s: the job file cannot be written: %s", job["benchmark_id"], exc)

    def _finish_job(self, job: dict[str, Any], state: str, reason: str | None) -> None:
        job["state"], job["reason"], job["reported"] = state, clean_reason(reason) if reason else None, False
        self._job_cancel.discard(job["benchmark_id"])
        self._job_started_here.discard(job["benchmark_id"])
        self._save_job(job)
        log.info("campaign %s: %s%s", job["benchmark_id"], state, f" ({job['reason']})" if reason else "")

    async def _report_job(self, client: JobClient, job: dict[str, Any]) -> None:
        """POST the job's state and progress (best effort: a failure is retried at the next pass); the server's
        answer ``cancelled`` (or another terminal state) ends the job here too."""
        try:
            answer = await client.report(job)
        except CampaignError as exc:
            log.warning("campaign %s: progress not reported (again at the next pass): %s", job["benchmark_id"], exc)
            return
        job["reported"] = True
        if answer in TERMINAL and job["state"] not in TERMINAL:
            job["state"] = answer
            job["reason"] = job.get("reason") or f"{answer} by the aggregator"
            # the report that carried the answer said "running": the stop itself is reported at the next pass, as
            # when the cancel comes with an acknowledgement
            job["reported"] = False
            self._job_cancel.discard(job["benchmark_id"])
            log.info("campaign %s: the aggregator says %s: stopped", job["benchmark_id"], answer)
        self._save_job(job)

    async def campaign_tick(self) -> None:
        """One campaign pass: fetch the jobs announced, report what the aggregator has not heard, run one level of
        the oldest runnable job (through the gates and the measuring lock, so scheduled workloads take their turns
        between levels)."""
        from .sync import Uploader

        if self.abort or self._campaign_busy or not isinstance(self._uploader, Uploader):
            return
        self._campaign_busy = True
        again = False
        try:
            client = JobClient(self._uploader)
            if time.monotonic() - self._last_jobs_heard >= self._campaign_interval():
                # no acknowledgement for a sync interval (nothing to upload): ask for the job list instead
                try:
                    self._campaign_ack(await client.poll())
                except CampaignError as exc:
                    log.debug("campaign jobs not polled: %s", exc)
                self._last_jobs_heard = time.monotonic()
            for benchmark_id in list(self._job_notices):
                notice = self._job_notices.pop(benchmark_id)
                await self._fetch_job(client, notice)
            jobs = self._jobs.all()
            for job in jobs:
                if job["benchmark_id"] in self._job_cancel and job["state"] not in TERMINAL:
                    self._finish_job(job, "cancelled", "cancelled by the aggregator")
                if not job.get("reported") and (job["state"] in TERMINAL or job["state"] == "running"):
                    await self._report_job(client, job)
            runnable = [j for j in jobs if j["state"] in ("queued", "running")]
            if runnable and not self.abort:
                again = await self._run_job_level(client, runnable[0])
        finally:
            self._campaign_busy = False
        if again and not self.abort and self._scheduler is not None and self._scheduler.get("campaigns-now") is None:
            self._scheduler.later("campaigns-now", 0.0, self.campaign_tick)

    async def _fetch_job(self, client: JobClient, notice: JobNotice) -> None:
        """GET a job announced by an ack, check it and keep it; a refused one is kept and reported ``failed``."""
        if not self._jobs.room_for_one():
            if notice.benchmark_id not in self._not_taken and len(self._not_taken) < 64:  # said once per job
                self._not_taken.add(notice.benchmark_id)
                log.warning("campaign %s: not taken: 8 campaign jobs are in progress here", notice.benchmark_id)
            return
        try:
            payload = await client.fetch(notice.benchmark_id)
        except CampaignError as exc:  # announced again by the next ack
            log.warning("campaign %s: not fetched: %s", notice.benchmark_id, exc)
            return
        try:
            document, suite = check_job_document(payload, notice, self.config)
        except (CampaignError, suite_error()) as exc:
            log.error("campaign %s refused: %s", notice.benchmark_id, exc)
            job = refused_job(notice, str(exc))
        else:
            job = new_job(notice, document, len(level_keys(suite)))
            log.info("campaign %s: accepted, %d levels", notice.benchmark_id, job["levels_total"])
        self._save_job(job)
        if job["state"] == "failed":
            await self._report_job(client, job)

    async def _run_job_level(self, client: JobClient, job: dict[str, Any]) -> bool:
        """The next level of ``job``; True when more are due soon."""
        benchmark_id = job["benchmark_id"]
        if deadline_passed(job):
            self._finish_job(job, "failed", f"deadline {job.get('deadline')} passed before the run finished")
            await self._report_job(client, job)
            return False
        if benchmark_id not in self._job_started_here:  # a new process takes the job up: one attempt more
            if job.get("attempts", 0) >= MAX_ATTEMPTS:
                self._finish_job(job, "failed", f"interrupted, {job['attempts']} attempts")
                await self._report_job(client, job)
                return False
            job["attempts"] = int(job.get("attempts", 0)) + 1
            self._job_started_here.add(benchmark_id)
            self._save_job(job)
        try:  # checked again: the file sat on disk, and the [suite] limits may have changed since (SIGHUP)
            suite = parse_job_suite(job["configuration"], benchmark_id, self.config)
        except suite_error() as exc:
            self._finish_job(job, "failed", str(exc))
            await self._report_job(client, job)
            return False
        done = {(d["model"], d["workload"], d["level"]) for d in job["levels_done"]}
        remaining = [key for key in level_keys(suite) if key not in done]
        if not remaining:
            self._finish_job(job, "succeeded", None)
            await self._report_job(client, job)
            return False
        root = Root(self.config.get("probes", "sysfs_root"))
        reason = gate(self.config.values["gates"], read_state(root))
        if reason is not None:
            return await self._job_waits(client, job, reason)
        key = remaining[0]
        level_run = str(uuid.uuid4())
        try:
            async with self._measuring:
                if self.abort or benchmark_id in self._job_cancel:
                    return True
                with measure_lock(self.data_dir):
                    self.state = f"campaign {benchmark_id[:8]}: {' · '.join(key)}"
                    self.notifier.status(self.state)
                    first = job["state"] == "queued"
                    job["state"], job["reason"] = "running", None
                    self._save_job(job)
                    if first:
                        await self._report_job(client, job)
                        if job["state"] != "running":
                            return False
                    loop = asyncio.get_running_loop()
                    self._current = loop.run_in_executor(
                        self._engine_thread, self._measure_campaign_level, job, suite, key, level_run
                    )
                    try:
                        completed = await self._current
                    finally:
                        self._current = None
        except Busy as exc:
            return await self._job_waits(client, job, f"another process is measuring (lens-agent tune?): {exc}")
        except (LensError, OSError, ValueError) as exc:  # the level cannot run here: the job ends, reported
            self._finish_job(job, "failed", f"{' · '.join(key)}: {exc}")
            await self._report_job(client, job)
            return False
        finally:
            self.state = "stopping" if self.abort else "idle"
            if self._sync is not None:
                self._sync.trigger()
        if not completed:
            if benchmark_id in self._job_cancel:
                self._finish_job(job, "cancelled", "cancelled by the aggregator")
            elif deadline_passed(job):
                self._finish_job(job, "failed", f"deadline {job.get('deadline')} passed before the run finished")
            elif self.abort:  # the service stops: not an attempt that failed; resumed at the next start
                job["attempts"] = max(0, int(job.get("attempts", 1)) - 1)
                self._job_started_here.discard(benchmark_id)
                self._save_job(job)
                return False
            else:  # never a loop that starts the same level again and again
                self._finish_job(job, "failed", f"{' · '.join(key)}: the level did not complete")
        elif len(job["levels_done"]) >= (job.get("levels_total") or 0):
            self._finish_job(job, "succeeded", None)
        else:
            job["reported"] = False
        await self._report_job(client, job)
        return job["state"] not in TERMINAL

    async def _job_waits(self, client: JobClient, job: dict[str, Any], reason: str) -> bool:
        """A gate (or a tune) holds the job back: say so, and look again at the next pass."""
        reason = f"waiting: {reason}"
        if job.get("reason") != reason:
            log.info("campaign %s %s", job["benchmark_id"], reason)
            job["state"], job["reason"], job["reported"] = "running", reason, False
            self._save_job(job)
            await self._report_job(client, job)
        return False

    def _measure_campaign_level(
        self, job: dict[str, Any], suite: Any, key: tuple[str, str, str], level_run: str
    ) -> bool:
        """On the engine thread: one level of a campaign job. Every record carries ``ext.campaign`` (the job and
        this attempt's ``level_run``); a completed level stores its ``campaign_level`` record, then the job file.
        True when the level completed."""
        from .bench.suite_run import SuiteRequest, run_suite

        assert self.outbox is not None
        box = self.outbox.outbox
        benchmark_id = job["benchmark_id"]
        device_id = self.config.get("agent", "device_id")
        model_sha256 = None  # the level's records carry their model's; this one is a summary
        completed: list[bool] = []

        def store(record: Measurement) -> None:
            box.append(stored_form(record))
            self.stored += 1

        def level_done(model: str, workload: str, level: str, document: dict[str, Any]) -> None:
            if (model, workload, level) != key:
                return
            job["levels_done"].append({"model": model, "workload": workload, "level": level, "level_run": level_run})
            store(level_record(job, key, level_run, document, device_id=device_id, model_sha256=model_sha256))
            self._save_job(job)
            completed.append(True)

        def should_stop() -> bool:
            return self.abort or benchmark_id in self._job_cancel or deadline_passed(job)

        session = run_suite(
            SuiteRequest(
                suite=suite,
                config=self.config,
                policy=campaign_policy(self.config),
                include_text=False,
                store=store,
                should_stop=should_stop,
                engine=self.engine,
                extra_ext={"campaign": {"id": benchmark_id, "level_run": level_run}},
                skip=lambda model, workload, level: (model, workload, level) != key,
                on_level_done=level_done,
            )
        )
        for note in dict.fromkeys(session.notes):
            log.info("campaign %s: %s", benchmark_id, note)
        return bool(completed)

    async def heartbeat(self) -> None:
        self.notifier.watchdog()
        self._write_state()
        if self._release_due and self._current is None:
            self._release_due -= 1
            release_free_memory()

    async def housekeeping(self) -> None:
        if self.outbox is not None:
            vacuumed = await self.outbox._run(self.outbox.outbox.housekeeping)
            log.info("housekeeping: outbox checkpointed%s", " and vacuumed" if vacuumed else "")

    # -- state ------------------------------------------------------------------------------------------------
    def _status_line(self) -> str:
        nxt = self._next_runs()
        upcoming = min(nxt.values()) if nxt else None
        return f"{self.state}; model {self.model.get('name', '-')}; next run {upcoming or '-'}"

    def _next_runs(self) -> dict[str, str]:
        if self._scheduler is None:
            return {}
        return {
            job_id.split(":", 1)[1]: at.isoformat(timespec="seconds")
            for job_id, at in self._scheduler.next_runs("workload:").items()
        }

    def _power_source(self) -> str | None:
        """Detected once per configuration (opening jtop or NVML at every heartbeat would cost more than it tells)."""
        probes = self.config.values["probes"]
        key = (str(probes["sysfs_root"]), str(probes["power_source"]))
        if self._power_key != key:
            sources, _ = detect_power(Root(probes["sysfs_root"]), probes["power_source"])
            for source in sources:
                source.close()
            self._power_key, self._power_name = key, "+".join(s.name for s in sources) or None
        return self._power_name

    def _write_state(self) -> None:
        payload = {
            "pid": os.getpid(),
            "state": self.state,
            "started_at": self.started_at,
            "updated_at": utc_now_iso(),
            "updated_unix": time.time(),
            # CLOCK_MONOTONIC is system-wide and never steps: status measures the heartbeat's age on it (same boot)
            "updated_monotonic": time.monotonic(),
            "boot_id": boot_id(),
            "heartbeat_interval_s": self.config.values["service"]["heartbeat_interval"],
            "config": str(self.config.path) if self.config.path else None,
            "model": self.model,
            "workloads": {w["name"]: {"every_s": w["every"], "cron": w["cron"]} for w in self.config.workloads},
            "next_runs": self._next_runs(),
            "last_runs": self.runs,
            "stored_by_this_process": self.stored,
            "power_source": self._power_source(),
        }
        try:
            write_atomically(state_path(self.data_dir), payload)
        except OSError as exc:
            log.warning("cannot write %s: %s", state_path(self.data_dir), exc)


def suite_error() -> type[Exception]:
    """lens_core.suite's SuiteError, imported when called: an ``except suite_error()`` clause is evaluated only when
    an exception reaches it, so a service without suites or campaign jobs never loads the suite parser."""
    from lens_core.suite import SuiteError

    return SuiteError


def load_suites(config: AgentConfig) -> dict[str, Any]:
    """Each suite workload's suite, checked against this device's ``[suite]`` policy (a bad suite stops the start,
    naming its file and JSON path, as a bad configuration does)."""
    out = {}
    for workload in config.workloads:
        if workload["suite"] is not None:  # the suite runner (and the cloud client) load for suite workloads only
            from .bench.suite_run import suite_policy
            from .suite import load_suite

            path = Path(workload["suite"])
            out[workload["name"]] = load_suite(path, suite_policy(config, path.resolve().parent))
    return out


def stored_form(record: Measurement) -> dict[str, Any]:
    """The dict the outbox stores for a record: with the kernel's clock state (``ext["clock"]``)."""
    return stamp(record.to_dict())


def summarize(
    measured: list[Measurement], name: str, power_source: str | None, *, guardrail_set: str | None = None
) -> dict[str, Any]:
    """What status shows about a run: TTFT p50/p95, tok/s, J/token where known, errors; for a guarded workload
    (``guardrail_set``) the requests its guardrails blocked and those that met a guardrail error."""
    blocked = [m for m in measured if m.kind == "blocked"]  # by a guardrail: neither served nor an error
    guard_errors = [  # a stage's error: the request failed (on_error = "error") or went on (on_error = "pass")
        m
        for m in measured
        if isinstance(m.ext.get("guardrails"), dict)
        and m.ext["guardrails"].get("outcome") in ("error", "passed_with_errors")
    ]
    ok = [m for m in measured if m.ok and m.ttft_ms is not None and m.kind != "blocked"]
    ttfts = sorted(m.ttft_ms for m in ok if m.ttft_ms is not None)
    joules = [
        m.ext["energy"]["j_per_output_token"]
        for m in ok
        if isinstance(m.ext.get("energy"), dict) and m.ext["energy"].get("j_per_output_token") is not None
    ]
    rates = [m.tokens_per_second for m in ok if m.tokens_per_second]
    contended = [
        m.ext["interference"]
        for m in measured
        if isinstance(m.ext.get("interference"), dict) and m.ext["interference"].get("contended") is True
    ]

    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        if len(values) == 1:
            return values[0]
        # statistics.quantiles(values, n=100, method="inclusive")[q - 1], its own arithmetic, without loading
        # statistics (fractions, decimal) or numpy's percentile (numpy.ma)
        data, i = sorted(values), int(q)
        j, delta = divmod(i * (len(data) - 1), 100)
        return float((data[j] * (100 - delta) + data[j + 1] * delta) / 100)

    return {
        "at": utc_now_iso(),
        "workload": name,
        "requests": len(measured),
        "errors": len(measured) - len(ok) - len(blocked),
        "errors_by_type": dict(
            Counter(
                m.error_type or "unknown"
                for m in measured
                if not (m.ok and m.ttft_ms is not None) and m.kind != "blocked"
            )
        ),
        "blocked": len(blocked),
        # docs/service.md "Guarded workloads": the workload's guardrail set (null when unguarded) and how many of
        # the run's requests met a guardrail error (counted among "errors" too when it failed the request)
        "guardrail_set": guardrail_set,
        "guardrail_errors": len(guard_errors),
        "ttft_p50_ms": pct(ttfts, 50),
        "ttft_p95_ms": pct(ttfts, 95),
        "tokens_per_second": sum(rates) / len(rates) if rates else None,
        "j_per_output_token": sum(joules) / len(joules) if joules else None,
        "power_source": power_source,
        # docs/interference.md: how many of the run's requests other work contended, and why
        "contended": len(contended),
        "contended_reasons": dict(Counter(r for figures in contended for r in figures.get("reasons", []))),
    }
