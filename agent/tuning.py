"""``lens-agent tune``: a bounded search over llama.cpp's engine settings for the configured model on this device.

Each candidate (a set of engine settings) is measured with the same prompts, the same number of output tokens
(generated past end-of-sequence, so every request does the same work) and greedy decoding. Candidates are
measured in **rounds**: in each round every candidate runs once, a block of ``tune.requests`` requests after
``tune.warmup`` warm-up requests, in a shuffled order — so a drift of the machine (another process, heat, a
frequency change) falls on every candidate alike instead of on whichever ran last.

A candidate wins over the baseline only when the Mann–Whitney U test (:func:`lens_core.stats.compare`) finds its
per-request values of the objective different with ``p < alpha ÷ (candidates − 1)`` (Bonferroni: several
candidates are compared with one baseline) *and* its median is at least ``tune.min_improvement`` better. Not a
single run, not a mean that one stall can move.

The search (``tune.search``):

- ``coordinate`` (default): one setting at a time — threads, then flash attention, then batch size, then GPU
  layers — each stage measuring that setting's values with the others at the best found so far, then a final
  **confirmation** stage measuring the original settings against the winner in fresh rounds: the before/after
  figure and the significance test of the whole change. Candidates grow with the sum of the values, not their
  product.
- ``grid``: every combination (at most ``tune.max_candidates``), each against the current settings.

Every step is a record of kind ``tune`` in the outbox (``ext.tune``), so what was tried and why it was kept reaches
the aggregator. Applying the winner is the adjuster's part (:mod:`agent.adjuster`).

What else used the device is sampled during every measured request (:mod:`agent.probes.interference`, the
``[interference]`` thresholds). A search where any stage had more than :data:`CONTENDED_SHARE` of its measured requests
contended decides nothing — no winner is declared or applied — unless ``allow_contended`` (docs/tuning.md): the
neighbours' noise is not a setting's speed.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lens_core.settings import settings_key
from lens_core.stats import Comparison, compare

from .advice import DeviceLimits, refusal
from .engines.llama import EngineSettings
from .engines.modelfile import resolve_model_path
from .errors import LensError, UsageError
from .measurement import Measurement
from .objectives import DIMENSIONS as DIMENSIONS
from .objectives import OBJECTIVES as OBJECTIVES
from .objectives import values_of as values_of
from .probes.interference import Thresholds, results_section
from .prompts import Prompt, load_prompts
from .tune_worker import BlockResult, CandidateCrashed, MeasureStopped, WorkerPool, block_request

log = logging.getLogger("agent.tune")

MAX_VALUES_KEPT = 256  # per-request values carried in a record
CONTENDED_SHARE = 0.25  # a stage with more than this share of its measured requests contended decides nothing


class TuneSkipped(LensError):
    """A gate closed during the search (battery, heat, load): nothing is applied."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"tune stopped: {reason}")


@dataclass(frozen=True)
class TuneOptions:
    """``[tune]`` resolved: what is searched and how each candidate is measured."""

    grid: dict[str, list[Any]]
    search: str = "coordinate"
    max_candidates: int = 12
    objective: str = "e2e"
    requests: int = 4
    rounds: int = 3
    warmup: int = 1
    max_tokens: int = 32
    alpha: float = 0.01
    min_improvement: float = 0.03
    seed: int | None = None
    candidate_timeout: float = 600.0  # one block in the measuring process, at most (then it is killed)
    # what the measuring process samples beside each request (JSON: it is sent there): ``sysfs_root``,
    # ``thresholds`` (the ``[interference]`` keys) and ``rate_hz``; None when ``interference.enabled`` is false
    interference: dict[str, Any] | None = None
    allow_contended: bool = False  # decide (and apply) even when the measurements were contended

    @classmethod
    def from_config(cls, config: Any, only: dict[str, list[Any]] | None = None) -> TuneOptions:
        """The ``[tune]`` section's options; ``only``: search just these settings' values (a recommendation)."""
        t = config.values["tune"]
        model = config.values["model"]
        grid = dict(only) if only is not None else default_grid(t, model)
        return cls(
            grid=grid,
            search=t["search"],
            max_candidates=t["max_candidates"],
            objective=t["objective"],
            requests=t["requests"],
            rounds=t["rounds"],
            warmup=t["warmup"],
            max_tokens=t["max_tokens"],
            alpha=t["alpha"],
            min_improvement=t["min_improvement"],
            candidate_timeout=t["candidate_timeout"],
            interference=interference_options(config.values),
            allow_contended=t["allow_contended"],
        )


def interference_options(values: Any) -> dict[str, Any] | None:
    """``TuneOptions.interference`` from the configuration's ``[interference]`` and ``probes.sysfs_root``."""
    section = values["interference"]
    if not section["enabled"]:
        return None
    return {
        "sysfs_root": str(values["probes"]["sysfs_root"]),
        "thresholds": Thresholds.from_config(section).as_dict(),
        "rate_hz": float(section["sample_rate_hz"]),
    }


def physical_cores() -> int:
    import psutil

    return max(1, psutil.cpu_count(logical=False) or psutil.cpu_count() or 1)


def default_grid(tune: dict[str, Any], model: dict[str, Any]) -> dict[str, list[Any]]:
    """The values to try for each setting: ``[tune]``'s lists, else 1, half and all physical cores for threads,
    both flash-attention values, and the current batch size and GPU layers (not searched unless listed)."""
    cores = physical_cores()
    threads = tune["n_threads"] or sorted({1, max(1, cores // 2), cores})
    grid: dict[str, list[Any]] = {
        "n_threads": sorted({*threads, model["n_threads"]}),
        "flash_attn": list(tune["flash_attn"] or [model["flash_attn"]]),
        "n_batch": sorted({*(tune["n_batch"] or []), model["n_batch"]}),
        "n_gpu_layers": sorted({*(tune["n_gpu_layers"] or []), model["n_gpu_layers"]}),
    }
    if model["flash_attn"] not in grid["flash_attn"]:
        grid["flash_attn"].append(model["flash_attn"])
    return grid


@dataclass
class Candidate:
    settings: EngineSettings
    values: list[float] = field(default_factory=list)  # the objective, per successful request (ms)
    failures: int = 0
    error: str | None = None  # why it was not (or no longer) measured: refused, did not load, crashed
    failure_types: dict[str, int] = field(default_factory=dict)
    crash_signal: str | None = None  # the signal that ended its measuring process (SIGABRT, SIGSEGV, …)
    refused: bool = False  # the device's own checks refused its settings (agent.advice): never measured
    interference: list[dict[str, Any]] = field(default_factory=list)  # ext.interference of each measured request

    @property
    def key(self) -> str:
        return settings_key(self.settings.as_dict()) or "-"


@dataclass
class Stage:
    """One comparison: candidates against a baseline, measured in interleaved rounds."""

    name: str  # the setting searched, "grid" or "confirm"
    baseline: Candidate
    others: list[Candidate]
    comparisons: dict[str, Comparison] = field(default_factory=dict)  # candidate key → against the baseline
    winner: Candidate | None = None

    @property
    def candidates(self) -> list[Candidate]:
        return [self.baseline, *self.others]

    @property
    def interference(self) -> list[dict[str, Any]]:
        """``ext.interference`` of every measured request of the stage, all candidates."""
        return [figures for c in self.candidates for figures in c.interference]

    @property
    def contended(self) -> bool:
        """More than :data:`CONTENDED_SHARE` of the stage's measured requests were contended."""
        sampled = self.interference
        return bool(sampled) and sum(1 for f in sampled if f.get("contended")) > CONTENDED_SHARE * len(sampled)


@dataclass
class TuneResult:
    tune_id: str
    objective: str
    original: EngineSettings
    best: EngineSettings
    stages: list[Stage]
    confirm: Comparison | None  # the original against the best, measured afresh (None: nothing to confirm)
    significant: bool  # the whole change passed the test (alpha, min_improvement)
    # "contended (…)": the measurements were contended, nothing is decided (None: decided, or allowed anyway)
    no_decision: str | None = None
    thresholds: dict[str, float] | None = None  # the interference thresholds in force (None: not sampled)

    @property
    def decided(self) -> bool:
        """A winner is declared (and may be applied): significant and not contended."""
        return self.significant and self.no_decision is None

    @property
    def changes(self) -> dict[str, tuple[Any, Any]]:
        """setting → (original, best), for the settings that changed."""
        before, after = self.original.as_dict(), self.best.as_dict()
        return {k: (before[k], after[k]) for k in DIMENSIONS if before[k] != after[k]}

    def as_dict(self) -> dict[str, Any]:
        return {
            "tune_id": self.tune_id,
            "objective": self.objective,
            "original": self.original.as_dict(),
            "best": self.best.as_dict(),
            "changes": {k: {"from": a, "to": b} for k, (a, b) in self.changes.items()},
            "significant": self.significant,
            "decided": self.decided,
            "no_decision": self.no_decision,
            "confirm": comparison_dict(self.confirm) if self.confirm else None,
            "interference": self.interference(),
            "stages": [stage_summary(s, self.thresholds) for s in self.stages],
        }

    def interference(self) -> dict[str, Any] | None:
        """Over every measured request of the search: ``results.interference``'s shape, plus ``contended_stages``
        (the stages with more than :data:`CONTENDED_SHARE` of their requests contended) and ``max_contended_share``.
        None when nothing was sampled."""
        section = interference_summary([f for s in self.stages for f in s.interference], self.thresholds)
        if section is None:
            return None
        return {
            **section,
            "contended_stages": [s.name for s in self.stages if s.contended],
            "max_contended_share": CONTENDED_SHARE,
        }


def interference_summary(sampled: list[dict[str, Any]], thresholds: dict[str, float] | None) -> dict[str, Any] | None:
    """``results.interference`` (agent.probes.interference.results_section) over requests' ``ext.interference``;
    None when none was sampled."""
    if not sampled or thresholds is None:
        return None
    cpus = next((f["cpus"] for f in sampled if isinstance(f.get("cpus"), int)), 1)
    return results_section(
        sampled, Thresholds(**thresholds), cpus=cpus, uses_gpu=any(f.get("uses_gpu") is True for f in sampled)
    )


def interference_brief(section: dict[str, Any] | None) -> dict[str, Any]:
    """A stage's or a candidate's contention in a few keys: ``contended_requests``, ``requests``, ``reasons``
    (code → requests) and ``summary`` (the ``contended: …`` line); empty when nothing was sampled."""
    if section is None:
        return {}
    return {k: section[k] for k in ("contended", "contended_requests", "requests", "reasons", "summary")}


def stage_summary(stage: Stage, thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    brief = interference_brief(interference_summary(stage.interference, thresholds))
    return {
        "stage": stage.name,
        "baseline": stage.baseline.key,
        "winner": stage.winner.key if stage.winner else None,
        "interference": {**brief, "over_limit": stage.contended} if brief else None,
        "candidates": [candidate_summary(c, stage.comparisons.get(c.key), thresholds) for c in stage.candidates],
    }


def candidate_summary(
    candidate: Candidate, comparison: Comparison | None, thresholds: dict[str, float] | None = None
) -> dict[str, Any]:
    import numpy as np

    values = candidate.values
    return {
        "settings": candidate.settings.as_dict(),
        "key": candidate.key,
        "requests": len(values),
        "failures": candidate.failures,
        "failure_types": candidate.failure_types,
        "error": candidate.error,
        "crash_signal": candidate.crash_signal,
        "refused": candidate.refused,
        "median_ms": float(np.median(values)) if values else None,
        "values_ms": [round(v, 3) for v in values[:MAX_VALUES_KEPT]],
        "vs_baseline": comparison_dict(comparison) if comparison else None,
        # flat: a tune record nests candidates inside stages, within record_schema's depth for ext
        "interference": {
            k: v
            for k, v in interference_brief(interference_summary(candidate.interference, thresholds)).items()
            if k != "reasons"
        }
        or None,
    }


def direction(improvement: float) -> str:
    """``faster``, ``slower`` or ``same``: which way a relative change of a latency went (``improvement`` is
    positive when the candidate is better, lens_core.stats.Comparison)."""
    if improvement > 0:
        return "faster"
    return "slower" if improvement < 0 else "same"


def change_words(improvement: float) -> str:
    """``80.3 % faster``, ``2.0 % slower``, ``no change``: a figure a reader never has to decode a sign of."""
    shown = f"{abs(improvement) * 100:.1f}"
    if float(shown) == 0:
        return "no change"
    return f"{shown} % {direction(improvement)}"


def comparison_dict(comparison: Comparison) -> dict[str, Any]:
    """A comparison for JSON: its figures and ``direction`` (faster, slower, same) beside the signed
    ``improvement``."""
    return {**comparison.as_dict(), "direction": direction(comparison.improvement)}


# A record of one step: kind "tune", ext.tune holds the step. Given to on_record (the outbox) as it happens.
RecordSink = Callable[[Measurement], None]


@dataclass
class Tuner:
    """Runs a search. ``gate`` is asked before every block (a reason stops the search); ``progress`` hears each
    block as it starts; ``on_record`` stores each step's record. ``limits``: the device's own bounds
    (agent.advice); a candidate outside them is refused, never measured. ``measure`` runs one block; by default in
    a child process (agent.tune_worker), so an engine that crashes ends that candidate only."""

    model_path: Path
    base: EngineSettings
    prompts: list[Prompt]
    options: TuneOptions
    device_id: str
    trigger: str = "manual"
    gate: Callable[[], str | None] = lambda: None
    progress: Callable[[str], None] = lambda _: None
    on_record: RecordSink | None = None
    chat_template: str = "auto"
    limits: DeviceLimits | None = None
    measure: Callable[[dict[str, Any]], BlockResult] | None = None
    should_stop: Callable[[], bool] = lambda: False  # the service is stopping: end the search now, apply nothing
    tune_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    model_name: str = "unknown"
    quantization: str | None = None
    _blocks_done: int = 0
    _blocks_total: int = 0

    def run(self) -> TuneResult:
        pool = None
        if self.measure is None:
            pool = WorkerPool(self.options.candidate_timeout, self.should_stop)
            self.measure = pool.measure
        try:
            return self._run()
        finally:
            if pool is not None:
                pool.close()
                self.measure = None

    def _run(self) -> TuneResult:
        rng = random.Random(self.options.seed)
        stages: list[Stage] = []
        best = self.base
        if self.options.search == "grid":
            self._blocks_total = len(self._grid_candidates()) * self.options.rounds
        else:  # each searched setting's values once per round (the confirmation stage is added when it runs)
            self._blocks_total = sum(len(v) for v in self._plan()) * self.options.rounds
        self._record("start", {"grid": self.options.grid, "search": self.options.search, "base": self.base.as_dict()})
        if self.options.search == "grid":
            stage = Stage("grid", Candidate(best), [Candidate(s) for s in self._grid_candidates() if s != best])
            self._measure(stage, rng)
            stages.append(stage)
            if stage.winner is not None:
                best = stage.winner.settings
            confirm = stage.comparisons.get(stage.winner.key) if stage.winner else None
        else:
            for dimension in DIMENSIONS:
                values = self.options.grid.get(dimension) or []
                others = [dataclasses.replace(best, **{dimension: v}) for v in values if getattr(best, dimension) != v]
                if not others:
                    continue
                stage = Stage(dimension, Candidate(best), [Candidate(s) for s in others])
                self._measure(stage, rng)
                stages.append(stage)
                if stage.winner is not None:
                    best = stage.winner.settings
            confirm = None
            if best != self.base:
                stage = Stage("confirm", Candidate(self.base), [Candidate(best)])
                self._blocks_total += 2 * self.options.rounds
                self._measure(stage, rng, alpha=self.options.alpha)
                stages.append(stage)
                confirm = stage.comparisons.get(stage.others[0].key)
                if stage.winner is None:
                    best = self.base  # the combination did not hold up against the original: keep it
        significant = best != self.base and confirm is not None
        thresholds = (self.options.interference or {}).get("thresholds")
        result = TuneResult(
            self.tune_id, self.options.objective, self.base, best, stages, confirm, significant, thresholds=thresholds
        )
        held = contended_reason(stages, thresholds)
        if held is not None and not self.options.allow_contended:
            result.no_decision = held
        self._record("result", result.as_dict(), interference=result.interference())
        return result

    # -- planning ----------------------------------------------------------------------------------------------
    def _plan(self) -> list[list[Any]]:
        return [v for d in DIMENSIONS if len(v := self.options.grid.get(d) or []) > 1]

    def _grid_candidates(self) -> list[EngineSettings]:
        names = [d for d in DIMENSIONS if self.options.grid.get(d)]
        combos: Iterator[tuple[Any, ...]] = itertools.product(*(self.options.grid[d] for d in names))
        out = [self.base]
        for combo in combos:
            settings = dataclasses.replace(self.base, **dict(zip(names, combo, strict=True)))
            if settings not in out:
                out.append(settings)
        if len(out) > self.options.max_candidates:
            raise UsageError(
                f"tune.search = grid makes {len(out)} candidates, more than tune.max_candidates = "
                f"{self.options.max_candidates}: list fewer values, raise the bound, or use search = coordinate"
            )
        return out

    # -- measuring ---------------------------------------------------------------------------------------------
    def _refuse(self, stage: Stage) -> None:
        """The device's own checks (agent.advice) on every candidate that changes a setting: a refused one is
        recorded and never measured."""
        if self.limits is None:
            return
        base = self.base.as_dict()
        for candidate in stage.others:
            settings = candidate.settings.as_dict()
            changed = [name for name in settings if settings[name] != base[name]]
            reason = refusal(settings, self.limits, changed)
            if reason is not None:
                candidate.error, candidate.refused = f"refused by this device: {reason}", True
                log.warning("tune: %s is not measured: %s", candidate.key, reason)

    def _measure(self, stage: Stage, rng: random.Random, alpha: float | None = None) -> None:
        self._refuse(stage)
        for round_no in range(self.options.rounds):
            order = list(stage.candidates)
            rng.shuffle(order)
            for candidate in order:
                if candidate.error is not None:
                    continue
                reason = "the tune was asked to stop" if self.should_stop() else self.gate()
                if reason is not None:
                    self._record("skipped", {"reason": reason, "stage": stage.name})
                    raise TuneSkipped(reason)
                self._blocks_done += 1
                self.progress(
                    f"[{self._blocks_done}/{max(self._blocks_total, self._blocks_done)}] {stage.name}: "
                    f"{candidate.key} (round {round_no + 1}/{self.options.rounds})"
                )
                self._block(candidate)
        self._decide(stage, alpha)
        thresholds = (self.options.interference or {}).get("thresholds")
        for candidate in stage.candidates:
            self._record(
                "candidate",
                {"stage": stage.name, **candidate_summary(candidate, stage.comparisons.get(candidate.key), thresholds)},
                settings=candidate.settings,
                interference=interference_summary(candidate.interference, thresholds),
            )

    def _block(self, candidate: Candidate) -> None:
        """One block of the candidate in the measuring process: load its engine, run warm-up and measured requests,
        close it (one model in memory). A crash of that process ends this candidate, never the tune."""
        assert self.measure is not None
        options = {
            "runs": self.options.requests,
            "warmup": self.options.warmup,
            "max_tokens": self.options.max_tokens,
            "ignore_eos": True,
            "chat_template": self.chat_template,
            "include_text": False,
        }
        request = block_request(
            self.model_path, candidate.settings, self.prompts, options, run_id=self.tune_id, device_id=self.device_id
        )
        if self.options.interference is not None:
            request["interference"] = self.options.interference
        try:
            result = self.measure(request)
        except MeasureStopped:
            self._record("skipped", {"reason": "the tune was asked to stop"})
            raise TuneSkipped("the tune was asked to stop") from None
        except CandidateCrashed as exc:
            candidate.error, candidate.crash_signal = f"{exc} ({candidate.key})", exc.signal_name
            log.warning("tune: %s failed: %s", candidate.key, exc)
            return
        if result.load_error is not None:
            candidate.error = result.load_error
            log.warning("tune: %s does not load: %s", candidate.key, result.load_error)
            return
        if result.model_name:
            self.model_name = result.model_name
            self.quantization = result.quantization
        attribute = OBJECTIVES[self.options.objective]
        uses_gpu = candidate.settings.n_gpu_layers != 0
        for m in result.requests:
            figures = m.get("interference")
            if isinstance(figures, dict) and isinstance(figures.get("contended"), bool):
                candidate.interference.append({**figures, "uses_gpu": uses_gpu})
            value = m.get(attribute)
            if m.get("ok") and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                candidate.values.append(float(value))
            else:
                candidate.failures += 1
                error_type = m.get("error_type")
                kind = error_type if isinstance(error_type, str) else "no_value"
                candidate.failure_types[kind] = candidate.failure_types.get(kind, 0) + 1

    def _decide(self, stage: Stage, alpha: float | None) -> None:
        base = stage.baseline
        if base.error is not None:
            raise LensError(f"tune: the baseline {base.key} could not be measured: {base.error}")
        if not base.values:
            raise LensError(
                f"tune: the baseline {base.key} produced no successful request "
                f"({base.failures} failed: {_failures(base)}); nothing to compare with"
            )
        level = alpha if alpha is not None else self.options.alpha / max(1, len(stage.others))
        best: tuple[float, Candidate] | None = None
        for candidate in stage.others:
            if candidate.error is not None or not candidate.values or candidate.failures:
                continue  # a candidate that was refused, crashed or failed requests is never a winner
            comparison = compare(base.values, candidate.values)
            stage.comparisons[candidate.key] = comparison
            if comparison.significant(level, self.options.min_improvement) and (
                best is None or comparison.improvement > best[0]
            ):
                best = (comparison.improvement, candidate)
        stage.winner = best[1] if best else None

    def _record(
        self,
        step: str,
        detail: dict[str, Any],
        settings: EngineSettings | None = None,
        interference: dict[str, Any] | None = None,
    ) -> None:
        if self.on_record is None:
            return
        self.on_record(
            tune_record(
                step,
                {"tune_id": self.tune_id, "trigger": self.trigger, "objective": self.options.objective, **detail},
                device_id=self.device_id,
                model_name=self.model_name,
                settings=(settings or self.base).as_dict()
                | ({"quantization": self.quantization} if self.quantization else {}),
                interference=interference,
            )
        )


def contended_reason(stages: list[Stage], thresholds: dict[str, float] | None) -> str | None:
    """``contended (threads: 9 of 24 requests, …; other processes used 1.6 of 2 cores)`` when any stage had more
    than :data:`CONTENDED_SHARE` of its measured requests contended, else None."""
    over = [s for s in stages if s.contended]
    if not over:
        return None
    counts = ", ".join(
        f"{s.name}: {sum(1 for f in s.interference if f.get('contended'))} of {len(s.interference)} requests"
        for s in over
    )
    section = interference_summary([f for s in over for f in s.interference], thresholds)
    why = section["summary"].removeprefix("contended: ").rsplit(" (", 1)[0] if section else ""
    return f"contended ({counts}" + (f"; {why}" if why else "") + ")"


def record_interference(section: dict[str, Any]) -> dict[str, Any]:
    """A tune record's ``ext.interference`` (docs/wire-format.md's shape): ``contended``, ``reasons`` (the codes),
    the worst figure of each kind over its requests, a ``summary`` of at most 200 characters, and
    ``contended_requests`` / ``requests``."""
    summary = section["summary"]
    return {
        "contended": section["contended"],
        "reasons": list(section["reasons"]),
        **section["peaks"],
        "summary": summary if len(summary) <= 200 else summary[:199] + "…",
        "contended_requests": section["contended_requests"],
        "requests": section["requests"],
    }


def _failures(candidate: Candidate) -> str:
    if candidate.error:
        return candidate.error
    return ", ".join(f"{kind} ×{n}" for kind, n in sorted(candidate.failure_types.items())) or "no requests ran"


def tune_record(
    step: str,
    detail: dict[str, Any],
    *,
    device_id: str,
    model_name: str,
    settings: dict[str, Any] | None = None,
    interference: dict[str, Any] | None = None,
) -> Measurement:
    """A record of one tuning step: kind ``tune``, ``ext.tune`` = ``{"step": …, …}``; ``interference``: the
    contention over the step's measured requests (``results.interference``'s shape), as ``ext.interference``."""
    record = Measurement(
        run_id=str(detail.get("tune_id") or detail.get("adjustment_id") or uuid.uuid4()),
        device_id=device_id,
        model_name=model_name,
        model_sha256=None,
        kind="tune",
        output_tokens=0,
    )
    record.ext["tune"] = {"step": step, **detail}
    if interference is not None:
        record.ext["interference"] = record_interference(interference)
    if settings:
        record.ext["settings"] = settings
    return record


def tune_prompts(config: Any, path: Path | None = None) -> list[Prompt]:
    """The prompts a tune measures with: ``path``, else ``tune.prompts``, else the first workload's, else the
    built-in set."""
    chosen = path or config.get("tune", "prompts")
    if chosen is None and config.workloads:
        chosen = config.workloads[0]["prompts"]
    prompts = load_prompts(chosen)
    if not prompts:
        raise UsageError(f"{chosen}: no prompts to tune with")
    return prompts


def model_path(config: Any) -> Path:
    return resolve_model_path(config.get("model", "path"))


def describe(result: TuneResult) -> list[str]:
    """The lines ``lens-agent tune`` prints."""
    lines = []
    section = result.interference()
    if section is not None:
        lines.append(section["summary"])
    for stage in result.stages:
        lines.append(f"{stage.name}:")
        for cand in stage.candidates:
            s = candidate_summary(cand, stage.comparisons.get(cand.key))
            vs = s["vs_baseline"]
            if cand is stage.baseline:
                tail = "baseline"
            elif vs is None:
                tail = (cand.error or f"{cand.failures} failed requests") if (cand.error or cand.failures) else "-"
            else:
                tail = f"{change_words(vs['improvement'])} (p = {vs['p_value']:.2g})"
            median = f"{s['median_ms']:.2f} ms" if s["median_ms"] is not None else "-"
            mark = " *" if stage.winner is cand and result.no_decision is None else ""
            lines.append(f"  {cand.key:<70} median {median:>10} over {s['requests']:>3}  {tail}{mark}")
    if result.no_decision is not None:
        lines.append(
            f"no decision: {result.no_decision}: the figures above are the neighbours' as much as the settings'; "
            "nothing is applied (run again on a quieter device, or --allow-contended to decide anyway)"
        )
    elif result.significant and result.confirm is not None:
        changes = ", ".join(f"{k} {a} → {b}" for k, (a, b) in result.changes.items())
        c = result.confirm
        lines.append(
            f"winner: {changes}: {result.objective} median {c.baseline_median:.2f} → {c.candidate_median:.2f} ms "
            f"({change_words(c.improvement)}, Mann–Whitney p = {c.p_value:.2g}, "
            f"{c.baseline_n} + {c.candidate_n} requests)"
        )
    else:
        lines.append("no setting was significantly better than the current ones: nothing to change")
    return lines
