"""One tune, start to end, as ``lens-agent tune run`` and the service run it: gates, the search, applying the
winner through the adjuster, and a record of every step in the outbox.

Only one process measures at a time: :func:`measure_lock` is held by a tune and by every scheduled run of the
service (``<data_dir>/measure.lock``), so a tune run by hand never measures beside the service's runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_core.settings import CONFIG_KEYS, settings_key

from .adjuster import Adjustment, DropInAdjuster, Verification
from .advice import DeviceLimits, refusal
from .clock import stamp
from .config import set_aside_drop_in
from .engines.llama import EngineSettings
from .errors import LensError, UsageError
from .gates import gate, read_state
from .measurement import Measurement
from .probes.sysfs import Root

if TYPE_CHECKING:  # the search itself (agent.tuning, its worker pool, lens_core.stats) loads when a tune runs
    from .tuning import TuneOptions, TuneResult

log = logging.getLogger("agent.tune")


class Busy(LensError):
    """Another process is measuring (the service's run, or another tune)."""


@contextlib.contextmanager
def measure_lock(data_dir: Path, *, wait_s: float = 0.0, waiting: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Hold ``<data_dir>/measure.lock`` while measuring; wait up to ``wait_s`` for another holder to finish."""
    path = Path(data_dir) / "measure.lock"
    try:  # never through a symbolic link: a planted one would have the pid written wherever it points
        handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
    except OSError as exc:
        raise LensError(
            f"{path}: cannot open the measuring lock ({exc.strerror}); remove it if it is not a file"
        ) from None
    try:
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                if time.monotonic() >= deadline:
                    raise Busy(
                        f"{path}: {holder} is measuring; run this again when it is done "
                        "(lens-agent status shows the service's state)"
                    ) from None
                if not told:
                    waiting()
                    told = True
                time.sleep(0.5)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def engine_key(settings: EngineSettings) -> str:
    """The key the adjuster's history of scheduled runs is kept by: the engine settings (lens_core.settings)."""
    return settings_key(settings.as_dict()) or "-"


def overridden(config: Any, changes: Mapping[str, Any]) -> list[str]:
    """The changes an environment variable or a flag would override: a drop-in below them would not take effect."""
    out = []
    for name in changes:
        section, key = CONFIG_KEYS[name]
        source = config.source(section, key)
        if not (source == "default" or source.startswith("drop-in ") or source == str(config.path)):
            out.append(f"{section}.{key} is set by {source}, which overrides the tuning drop-in")
    return out


@dataclass
class TuneOutcome:
    result: TuneResult
    adjustment: Adjustment | None
    not_applied: str | None  # why the winner was not applied (None when applied or when there was none)


def run_tune(
    config: Any,
    *,
    trigger: str,
    apply: bool,
    store: Callable[[Measurement], None] | None,
    progress: Callable[[str], None] = lambda _: None,
    only: dict[str, list[Any]] | None = None,
    options: TuneOptions | None = None,
    prompts_path: Path | None = None,
    recommendation_id: str | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> TuneOutcome:
    """Search, and apply the winner when ``apply`` (and nothing overrides it). ``store`` receives every record."""
    from .tuning import TuneOptions, Tuner, comparison_dict, model_path, tune_prompts, tune_record

    options = options or TuneOptions.from_config(config, only)
    root = Root(config.get("probes", "sysfs_root"))
    gates = config.values["gates"]
    device_id = config.get("agent", "device_id")

    def closed() -> str | None:
        return gate(gates, read_state(root))

    path = model_path(config)
    tuner = Tuner(
        model_path=path,
        limits=DeviceLimits.probe(path),
        base=EngineSettings.from_config(config),
        prompts=tune_prompts(config, prompts_path),
        options=options,
        device_id=device_id,
        trigger=trigger,
        gate=closed,
        progress=progress,
        on_record=store,
        chat_template=config.get("bench", "chat_template"),
        should_stop=should_stop,
    )
    result = tuner.run()
    if result.no_decision is not None:  # contended measurements decide nothing (docs/tuning.md)
        held = f"no decision: {result.no_decision}"
        if store is not None:
            store(
                tune_record(
                    "not_applied",
                    {"tune_id": result.tune_id, "reason": held, "changes": _changes(result.changes)},
                    device_id=device_id,
                    model_name=tuner.model_name,
                    interference=result.interference(),
                )
            )
        return TuneOutcome(result, None, held)
    if not result.significant:
        return TuneOutcome(result, None, None)
    changes = result.changes
    refused = overridden(config, changes)
    reason: str | None
    if refused:
        reason = "; ".join(refused)
    elif not apply:
        reason = "not applied (tune.auto_apply is false, or --dry-run)"
    else:
        reason = None
    if reason is not None:
        if store is not None:
            store(
                tune_record(
                    "not_applied",
                    {"tune_id": result.tune_id, "reason": reason, "changes": _changes(changes)},
                    device_id=device_id,
                    model_name=tuner.model_name,
                )
            )
        return TuneOutcome(result, None, reason)
    adjustment = apply_changes(
        config,
        changes,
        source="recommendation" if recommendation_id else "tune",
        tune_id=result.tune_id,
        recommendation_id=recommendation_id,
        quantization=tuner.quantization,
        store=store,
        model_name=tuner.model_name,
        expected=comparison_dict(result.confirm) if result.confirm else None,
    )
    return TuneOutcome(result, adjustment, None)


def _changes(changes: Mapping[str, tuple[Any, Any]]) -> dict[str, dict[str, Any]]:
    return {".".join(CONFIG_KEYS[k]): {"from": a, "to": b} for k, (a, b) in changes.items()}


def apply_changes(
    config: Any,
    changes: Mapping[str, tuple[Any, Any]],
    *,
    source: str,
    store: Callable[[Measurement], None] | None,
    model_name: str = "unknown",
    quantization: str | None = None,
    tune_id: str | None = None,
    recommendation_id: str | None = None,
    expected: dict[str, Any] | None = None,
) -> Adjustment:
    """Apply setting changes (name → (before, after)) through the drop-in adjuster and record it. Nothing this
    device refuses (agent.advice: its configuration's bounds, its CPUs, its context, its model's layers) is ever
    written; a drop-in the configuration left out is set aside first, so nothing builds on it."""
    from .tuning import tune_record

    refused = overridden(config, changes)
    if refused:
        raise UsageError("; ".join(refused) + ": remove that override first")
    before = EngineSettings.from_config(config)
    after = EngineSettings(**{**before.as_dict(), **{k: b for k, (_, b) in changes.items()}})
    reason = refusal(after.as_dict(), DeviceLimits.for_config(config), list(changes))
    if reason is not None:
        raise UsageError(f"not applied: {reason}")
    if getattr(config, "drop_in_refused", None):
        set_aside_drop_in(config.get("agent", "data_dir"), config.drop_in_refused)
    adjuster = DropInAdjuster(config.get("agent", "data_dir"))
    t = config.values["tune"]
    adjustment = adjuster.apply(
        {".".join(CONFIG_KEYS[k]): change for k, change in changes.items()},
        source=source,
        objective=t["objective"],
        before_key=engine_key(before),
        after_key=engine_key(after),
        verify_runs=t["verify_runs"],
        threshold=t["rollback_threshold"],
        tune_id=tune_id,
        recommendation_id=recommendation_id,
    )
    if store is not None:
        store(
            tune_record(
                "apply",
                {
                    "adjustment_id": adjustment.adjustment_id,
                    "tune_id": tune_id,
                    "recommendation_id": recommendation_id,
                    "source": source,
                    "changes": _changes(changes),
                    "baseline_workloads": sorted(adjustment.baseline),
                    "verify_runs": adjustment.verify_runs,
                    "expected": expected,
                    "drop_in": str(adjuster.drop_in),
                },
                device_id=config.get("agent", "device_id"),
                model_name=model_name,
                settings=after.as_dict() | ({"quantization": quantization} if quantization else {}),
            )
        )
    return adjustment


def verification_record(verification: Verification, *, device_id: str, model_name: str) -> Measurement:
    from .tuning import direction, tune_record

    a = verification.adjustment
    return tune_record(
        "rollback" if verification.rolled_back else "verify",
        {
            "adjustment_id": a.adjustment_id,
            "tune_id": a.tune_id,
            "status": a.status,
            "changes": a.changes,
            "worst_improvement": verification.worst,
            "per_workload": {
                name: {**figures, "direction": direction(figures["improvement"])}
                for name, figures in verification.per_workload.items()
            },
            "runs_after": a.runs_after,
            "reason": (a.result or {}).get("reason"),
        },
        device_id=device_id,
        model_name=model_name,
    )


def outbox_store(config: Any) -> tuple[Callable[[Measurement], None], Callable[[], None], list[int]]:
    """A store for records into the configured outbox, its closer, and a one-item count of what it stored."""
    from .outbox import open_outbox

    box = open_outbox(config)
    count = [0]

    def store(record: Measurement) -> None:
        box.append(stamp(record.to_dict()))
        count[0] += 1

    return store, box.close, count
