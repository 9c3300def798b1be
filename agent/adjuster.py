"""The configuration adjuster: apply a change of engine settings, verify it over the next scheduled runs, roll it
back when it made things worse.

The seed's adjuster protocol (§4.5) has three operations; :class:`Adjuster` is that interface, and
:class:`DropInAdjuster` its edge implementation: a change is a **drop-in** file,
``<data_dir>/tune/settings.toml``, that the agent's configuration loader reads after the config file and before
the environment (``agent.config.drop_in_path``) — the operator's own file is never rewritten, and deleting the
drop-in returns to it. A Kubernetes adjuster would implement the same three operations on a Deployment
(docs/tuning.md, "The adjuster interface").

- **apply**: write the drop-in (the previous drop-in's text is kept in the adjustment, so a rollback restores
  exactly what was there), and snapshot the **baseline**: each workload's per-request values of the objective from
  its latest scheduled runs under the settings before the change (``history.json``, kept by the service).
- **verify**: the service reports each scheduled run (:meth:`DropInAdjuster.observe`); after ``tune.verify_runs``
  runs under the new settings, each workload's median is compared with its baseline. More than
  ``tune.rollback_threshold`` (5 %, the seed's rule) worse on any workload → **rollback**. A workload without
  baseline runs cannot be judged; when none can, the change is kept as *unverified* and says so.
- **rollback**: restore the previous drop-in (or remove it), mark the adjustment rolled back.

State lives in ``<data_dir>/tune/adjustments.json`` (versioned, written atomically under a lock file), so a
restart of the service in the middle of a verification goes on counting where it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lens_core.config import MAX_LAYER_BYTES

from .errors import LensError

STATE_VERSION = 1
HISTORY_RUNS = 10  # scheduled runs kept per workload
MAX_ADJUSTMENTS = 50  # adjustments kept in the state file (the records keep them all)


class AdjusterError(LensError):
    """The adjuster's files cannot be read or written."""


@dataclass
class Adjustment:
    adjustment_id: str
    applied_at: float  # Unix seconds
    source: str  # "tune", "recommendation", "manual"
    changes: dict[str, list[Any]]  # "model.n_threads" → [before, after]
    objective: str
    before_key: str  # settings key before (lens_core.settings)
    after_key: str  # … and after
    previous_drop_in: str | None  # the drop-in's text before, None when there was none
    baseline: dict[str, list[float]]  # workload → per-request values before
    verify_runs: int
    threshold: float
    after: dict[str, list[float]] = field(default_factory=dict)
    runs_after: int = 0
    status: str = "verifying"  # verifying | kept | unverified | rolled_back
    result: dict[str, Any] | None = None
    tune_id: str | None = None
    recommendation_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verification:
    adjustment: Adjustment
    rolled_back: bool
    per_workload: dict[str, dict[str, Any]]  # workload → comparison (before vs after)
    worst: float | None  # the worst workload's improvement (negative: worse)


def _adjustment(item: dict[str, Any], path: Path) -> Adjustment:
    """An Adjustment from a state file's entry, or AdjusterError naming the file (it may hold anything)."""
    try:
        adjustment = Adjustment(**item)
    except TypeError:
        raise AdjusterError(f"{path}: an adjustment of the wrong shape; move it aside to start afresh") from None
    if not (
        isinstance(adjustment.adjustment_id, str)
        and isinstance(adjustment.changes, dict)
        and isinstance(adjustment.status, str)
        and isinstance(adjustment.applied_at, (int, float))
        and isinstance(adjustment.baseline, dict)
        and isinstance(adjustment.after, dict)
        and isinstance(adjustment.runs_after, int)
        and isinstance(adjustment.verify_runs, int)
        and all(isinstance(v, list) and len(v) == 2 for v in adjustment.changes.values())
    ):
        raise AdjusterError(f"{path}: an adjustment with fields of the wrong types; move it aside to start afresh")
    return adjustment


class Adjuster(Protocol):
    """apply / verify / rollback: what an adjuster of engine settings does, wherever the settings live."""

    def apply(self, changes: Mapping[str, tuple[Any, Any]], **context: Any) -> Adjustment: ...

    def observe(self, workload: str, settings_key: str, values: list[float]) -> Verification | None: ...

    def rollback(self, adjustment_id: str, reason: str) -> Adjustment: ...


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    raise AdjusterError(f"the drop-in holds integers and booleans only, not {value!r}")


class DropInAdjuster:
    """The edge adjuster: a drop-in file under the data directory, its state beside it."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "tune"
        self.drop_in = self.dir / "settings.toml"
        self.state_path = self.dir / "adjustments.json"
        self.history_path = self.dir / "history.json"

    # -- files -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            handle = (self.dir / ".lock").open("a")
        except OSError as exc:
            raise AdjusterError(f"{self.dir}: cannot write the tuning state ({exc.strerror})") from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _read(self, path: Path, default: dict[str, Any]) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            return default
        except (OSError, ValueError) as exc:
            raise AdjusterError(f"{path}: not readable tuning state ({exc}); move it aside to start afresh") from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise AdjusterError(f"{path}: not tuning state of version {STATE_VERSION}; move it aside to start afresh")
        return data

    def _write(self, path: Path, data: dict[str, Any] | str | None) -> None:
        if data is None:
            path.unlink(missing_ok=True)
            return
        text = data if isinstance(data, str) else json.dumps(data, indent=1)
        tmp = path.with_suffix(path.suffix + ".tmp")
        try:
            with tmp.open("w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise AdjusterError(f"{path}: cannot be written ({exc.strerror})") from None

    def _state(self) -> dict[str, Any]:
        state = self._read(self.state_path, {"version": STATE_VERSION, "adjustments": []})
        items = state.get("adjustments")
        if not isinstance(items, list) or not all(isinstance(a, dict) for a in items):
            raise AdjusterError(
                f"{self.state_path}: its adjustments are not a list of objects; move it aside to start afresh"
            )
        for item in items:
            _adjustment(item, self.state_path)  # every entry must make an Adjustment: checked before anything uses it
        return state

    def adjustments(self) -> list[Adjustment]:
        return [_adjustment(a, self.state_path) for a in self._state()["adjustments"]]

    def current(self) -> Adjustment | None:
        """The latest adjustment, whatever its status."""
        found = self.adjustments()
        return found[-1] if found else None

    def drop_in_text(self) -> str | None:
        """The drop-in's text (None: there is none). Something that is not a small regular file — a FIFO, a device,
        a directory — is never read: its description stands for its text (the configuration refuses it)."""
        try:
            info = self.drop_in.stat()
        except (FileNotFoundError, NotADirectoryError):  # no drop-in (or no data directory yet: its check says so)
            return None
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_LAYER_BYTES:
            return f"(not a small regular file: mode {info.st_mode:o}, {info.st_size} bytes)"
        try:
            return self.drop_in.read_text(errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            return None

    # -- recommendations that arrived with sync answers --------------------------------------------------------
    def recommendations(self) -> dict[str, Any]:
        """The latest recommendations received (``items``) and the ids already tuned (``tried``)."""
        return self._read(self.dir / "recommendations.json", {"version": STATE_VERSION, "items": [], "tried": []})

    def keep_recommendations(
        self,
        items: list[dict[str, Any]],
        tried: list[str],
        *,
        tried_values: list[str] | None = None,
        refused: list[dict[str, Any]] | None = None,
        last_tune_at: float | None = None,
    ) -> None:
        """``tried``: recommendation ids already tuned or refused; ``tried_values``: the same advice by model, target
        and value (a new id for old advice is not new); ``refused``: the latest refused items with the device's
        reason; ``last_tune_at``: when a tune from a recommendation last started (the rate limit)."""
        with self.locked():
            data = {
                "version": STATE_VERSION,
                "received_at": time.time(),
                "items": items,
                "tried": tried[-500:],  # oldest first: the latest 500 are kept
                "tried_values": (tried_values or [])[-500:],
                "refused": (refused or [])[-20:],
                "last_tune_at": last_tune_at,
            }
            self._write(self.dir / "recommendations.json", data)

    # -- history of scheduled runs -----------------------------------------------------------------------------
    def history(self) -> dict[str, list[dict[str, Any]]]:
        runs: dict[str, list[dict[str, Any]]] = self._read(self.history_path, {"version": STATE_VERSION})
        return {k: v for k, v in runs.items() if k != "version" and isinstance(v, list)}

    def baseline(self, settings_key: str, runs: int) -> dict[str, list[float]]:
        """Each workload's values from its latest ``runs`` scheduled runs under ``settings_key``."""
        out = {}
        for workload, entries in self.history().items():
            mine = [e for e in entries if e.get("settings") == settings_key][-runs:]
            values = [float(v) for e in mine for v in e.get("values", [])]
            if values:
                out[workload] = values
        return out

    # -- the three operations ----------------------------------------------------------------------------------
    def apply(self, changes: Mapping[str, tuple[Any, Any]], **context: Any) -> Adjustment:
        """Write the drop-in with ``changes`` (config key "model.n_threads" → (before, after)) on top of the
        current drop-in. ``context``: source, objective, before_key, after_key, verify_runs, threshold, tune_id,
        recommendation_id."""
        for key in changes:
            if not key.startswith("model."):
                raise AdjusterError(f"{key}: the drop-in sets [model] engine settings only")
        with self.locked():
            previous = self.drop_in_text()
            values = parse_drop_in(previous or "")
            values.update({key.split(".", 1)[1]: after for key, (_, after) in changes.items()})
            text = "# Written by lens-agent tune: engine settings applied on top of the agent's config file.\n"
            text += (
                "# lens-agent tune rollback restores the previous settings; deleting this file returns to the file's.\n"
            )
            text += "[model]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in sorted(values.items()))
            verify_runs = int(context.get("verify_runs", 3))
            adjustment = Adjustment(
                adjustment_id=str(uuid.uuid4()),
                applied_at=time.time(),
                source=str(context.get("source", "manual")),
                changes={k: [a, b] for k, (a, b) in changes.items()},
                objective=str(context.get("objective", "e2e")),
                before_key=str(context.get("before_key", "")),
                after_key=str(context.get("after_key", "")),
                previous_drop_in=previous,
                baseline=self.baseline(str(context.get("before_key", "")), verify_runs),
                verify_runs=verify_runs,
                threshold=float(context.get("threshold", 0.05)),
                tune_id=context.get("tune_id"),
                recommendation_id=context.get("recommendation_id"),
            )
            state = self._state()
            for old in state["adjustments"]:  # a new change ends the verification of the one before
                if old["status"] == "verifying":
                    old["status"] = "superseded"
            state["adjustments"] = [*state["adjustments"], adjustment.as_dict()][-MAX_ADJUSTMENTS:]
            self._write(self.drop_in, text)
            self._write(self.state_path, state)
        return adjustment

    def observe(self, workload: str, settings_key: str, values: list[float]) -> Verification | None:
        """A scheduled run finished under ``settings_key`` with these per-request values: kept in the history;
        counted toward the current adjustment's verification when it ran under its settings. Returns the
        verification when this run completed it (the caller records it and, on a rollback, reloads)."""
        with self.locked():
            history = self.history()
            entries = history.setdefault(workload, [])
            entries.append({"at": time.time(), "settings": settings_key, "values": values[:256]})
            history[workload] = entries[-HISTORY_RUNS:]
            self._write(self.history_path, {"version": STATE_VERSION, **history})
            state = self._state()
            if not state["adjustments"]:
                return None
            current = _adjustment(state["adjustments"][-1], self.state_path)
            if current.status != "verifying" or settings_key != current.after_key or not values:
                return None
            current.after.setdefault(workload, []).extend(values)
            current.runs_after += 1
            verification = None
            if current.runs_after >= current.verify_runs:
                verification = self._judge(current)
            state["adjustments"][-1] = current.as_dict()
            self._write(self.state_path, state)
        return verification

    def _judge(self, adjustment: Adjustment) -> Verification:
        from lens_core.stats import compare  # numpy: not for status, which reads this module's summary

        per_workload: dict[str, dict[str, Any]] = {}
        worst: float | None = None
        for workload, after in adjustment.after.items():
            before = adjustment.baseline.get(workload)
            if not before or not after:
                continue
            comparison = compare(before, after)
            per_workload[workload] = comparison.as_dict()
            worst = comparison.improvement if worst is None else min(worst, comparison.improvement)
        rolled_back = worst is not None and worst < -adjustment.threshold
        adjustment.result = {"per_workload": per_workload, "worst_improvement": worst, "at": time.time()}
        if rolled_back:
            self._write(self.drop_in, adjustment.previous_drop_in)
            adjustment.status = "rolled_back"
            adjustment.result["reason"] = (
                f"{-worst * 100:.1f} % worse than before (more than {adjustment.threshold * 100:g} %)"
                if worst is not None
                else ""
            )
        else:
            adjustment.status = "kept" if worst is not None else "unverified"
            if worst is None:
                adjustment.result["reason"] = "no workload ran under the old settings before the change to compare with"
        return Verification(adjustment, rolled_back, per_workload, worst)

    def rollback(self, adjustment_id: str, reason: str) -> Adjustment:
        """Restore the drop-in as it was before ``adjustment_id`` (the latest adjustment only)."""
        with self.locked():
            state = self._state()
            if not state["adjustments"] or state["adjustments"][-1]["adjustment_id"] != adjustment_id:
                raise AdjusterError(f"{adjustment_id}: not the latest adjustment; only the latest can be rolled back")
            current = _adjustment(state["adjustments"][-1], self.state_path)
            if current.status == "rolled_back":
                raise AdjusterError(f"{adjustment_id} was already rolled back")
            self._write(self.drop_in, current.previous_drop_in)
            current.status = "rolled_back"
            current.result = {**(current.result or {}), "reason": reason, "at": time.time()}
            state["adjustments"][-1] = current.as_dict()
            self._write(self.state_path, state)
        return current


def parse_drop_in(text: str) -> dict[str, Any]:
    """The [model] values of a drop-in's text (the agent's loader checks every value when it reads the file)."""
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AdjusterError(f"the tuning drop-in is not valid TOML ({exc}); remove it to start afresh") from None
    model = data.get("model", {})
    return dict(model) if isinstance(model, dict) else {}


def latest_set_aside(data_dir: Path) -> tuple[Path, str, float] | None:
    """The newest drop-in set aside (agent.config.set_aside_drop_in): its path, the reason and when."""
    folder = Path(data_dir) / "tune"
    try:
        found = sorted(folder.glob("settings.toml.refused-*[!n]"))
    except OSError:
        return None
    if not found:
        return None
    path = found[-1]
    try:
        reason = path.with_name(path.name + ".reason").read_text().strip()[:500]
        when = path.stat().st_mtime
    except OSError:
        reason, when = "", 0.0
    return path, reason, when


def tune_summary(data_dir: Path, refused: str | None = None) -> dict[str, Any] | None:
    """What ``lens-agent status`` says about tuning: the drop-in and the latest change, or None when nothing was
    ever applied here. ``refused``: why the configuration left the drop-in out (it is set aside by the service)."""
    summary = _tune_summary(data_dir)
    aside = latest_set_aside(data_dir)
    latest_at = (summary or {}).get("applied_at") or 0.0
    note = None
    if refused is not None:
        note = f"drop-in refused and left out: {refused}; the configuration file's settings apply"
    elif aside is not None and aside[2] >= latest_at:
        note = f"a drop-in was refused and set aside as {aside[0]}: {aside[1]}"
    if note is None:
        return summary
    if summary is None or summary.get("latest") is None:  # the refused drop-in is not "a drop-in in effect"
        return {"drop_in": None, "latest": None, "line": note, "refused": note}
    return {**summary, "line": f"{summary['line']}; {note}", "refused": note}


def _tune_summary(data_dir: Path) -> dict[str, Any] | None:
    """What ``lens-agent status`` says about tuning: the drop-in and the latest change, or None when nothing was
    ever applied here."""
    adjuster = DropInAdjuster(data_dir)
    try:
        latest = adjuster.current()
    except AdjusterError as exc:
        return {"drop_in": str(adjuster.drop_in), "latest": None, "line": str(exc)}
    if latest is None and not adjuster.drop_in.exists():
        return None
    drop_in = str(adjuster.drop_in) if adjuster.drop_in.exists() else None
    if latest is None:
        return {"drop_in": drop_in, "latest": None, "line": f"drop-in {drop_in} (no change recorded)"}
    changes = ", ".join(f"{k} {a} → {b}" for k, (a, b) in latest.changes.items())
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(latest.applied_at))
    state = latest.status
    if state == "verifying":
        state += f" ({latest.runs_after}/{latest.verify_runs} scheduled runs)"
    reason = (latest.result or {}).get("reason")
    line = f"{changes} ({latest.source}, {when}): {state}" + (f" — {reason}" if reason else "")
    return {
        "drop_in": drop_in,
        "applied_at": latest.applied_at,
        "latest": {
            "adjustment_id": latest.adjustment_id,
            "changes": latest.changes,
            "status": latest.status,
            "runs_after": latest.runs_after,
            "verify_runs": latest.verify_runs,
            "reason": reason,
        },
        "line": line,
    }
