"""Regression events to OTLP as log records, store-and-forward (docs/opentelemetry.md, "Regression events").

Each time a regression object opens, is acknowledged or resolves, the store writes an event in the transaction that
changed the object (``regression_events``, schema 9: the object as it was then). This exporter sends the events after
its cursor (``otlp.regression_events`` in ``meta``) to ``/v1/logs`` as log records named
``llm_latency_lens.regression.<event>``, and moves the cursor only on an OTLP answer; a backend that is down, slow or
not OTLP is retried with a growing delay like the other signals, nothing skipped. An event is encoded from what was
stored, so one the backend saw before a crash (between its answer and the cursor's move) arrives again as the same
log record, with the same ``lens.regression.event.seq``: a backend that keeps one record per (event seq) sees each
once. Once the cursor passed them, events are deleted.

Events are written under one lock on both stores (SQLite's single writer; PostgreSQL's advisory lock of the
regression writes, held to commit), so their seq is in commit order: no settle delay is needed.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from lens_core import otlp
from lens_core.otlp_config import OtlpSettings

from . import __version__
from .store import Store

log = logging.getLogger("aggregator.otlp")

SIGNAL = "regression_events"
PATH_SIGNAL = "logs"
EVENT_PREFIX = "llm_latency_lens.regression."
MAX_BATCH = 200


def log_record(event: dict[str, Any]) -> dict[str, Any]:
    """One stored event as a log record (``otlp.encode_logs``): the same event, the same record."""
    name = str(event["event"])
    obj = event["attributes"]
    attrs: dict[str, Any] = {
        "event.name": EVENT_PREFIX + name,
        "lens.regression.id": int(event["regression_id"]),
        "lens.regression.event.seq": int(event["seq"]),
        "lens.regression.state": str(obj.get("state") or ""),
        "lens.device.id": str(event["device_id"]),
        "gen_ai.request.model": obj.get("model_name") or "unknown",
        "lens.strategy": obj.get("strategy") or "local",
    }
    for key, field in (("lens.regression.metric", "metric"), ("lens.regression.kind", "kind")):
        if obj.get(field) is not None:
            attrs[key] = str(obj[field])
    for key, field in (
        ("lens.regression.change", "change"),
        ("lens.regression.before_median", "before_median"),
        ("lens.regression.after_median", "after_median"),
        ("lens.regression.confidence", "confidence"),
        ("lens.regression.p_value", "p_value"),
    ):
        value = obj.get(field)
        if type(value) in (int, float):
            attrs[key] = float(value)
    for key, field in (
        ("lens.regression.since_us", "since_us"),
        ("lens.regression.first_found_us", "first_found_us"),
        ("lens.regression.resolved_us", "resolved_us"),
        ("lens.regression.acknowledged_us", "acknowledged_us"),
    ):
        if type(obj.get(field)) is int:
            attrs[key] = obj[field]
    if type(obj.get("since_us")) is int:
        attrs["lens.regression.since"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(obj["since_us"] / 1e6))
    if name == "acknowledged":
        attrs["lens.regression.acknowledged_by"] = str(obj.get("acknowledged_by") or "")
        if obj.get("note") is not None:
            attrs["lens.regression.note"] = str(obj["note"])
    summary = str(obj.get("summary") or f"regression {event['regression_id']} {name}")
    return {
        "time_ns": int(event["at_us"]) * 1000,
        "severity": "WARN" if name == "opened" else "INFO",
        "event_name": EVENT_PREFIX + name,
        "body": f"{name}: {summary}",
        "attributes": attrs,
    }


class RegressionEvents:
    """The regression events' part of a forwarding pass (``otlp_forward.Forwarder`` runs it)."""

    def __init__(self, store: Store, settings: OtlpSettings, status: Any) -> None:
        self.store = store
        self.settings = settings
        self.status = status  # otlp_forward.SignalStatus
        self.raw: str | None = None
        self.cursor: dict[str, Any] = {"seq": 0}
        self.dropped = 0

    def load(self, raw: str | None, cursor: dict[str, Any]) -> None:
        self.raw, self.cursor = raw, cursor
        self.refresh()

    def refresh(self) -> None:
        self.status.pending, self.status.oldest_pending_us, self.dropped = self.store.regression_events_backlog(
            self.status.seq
        )

    async def forward(self, forwarder: Any) -> bool:
        """Send the next events; True when a full batch went out (more may wait)."""
        import asyncio

        limit = min(MAX_BATCH, self.settings.batch_records)
        events = await asyncio.to_thread(self.store.regression_events_after, self.status.seq, limit)
        if not events:
            return False
        devices = sorted({str(e["device_id"]) for e in events})
        resources = await asyncio.to_thread(lambda: {d: forwarder.resource(d) for d in devices})
        delivered, rejected, ok = await self._send(forwarder, events, resources)
        if not ok:
            return False
        await forwarder.advance_events(int(events[-1]["seq"]), len(events), delivered, rejected)
        return len(events) == limit

    async def _send(
        self, forwarder: Any, events: list[dict[str, Any]], resources: dict[str, dict[str, Any]]
    ) -> tuple[int, int, bool]:
        """(log records accepted, refused, whether the cursor may pass these events). A request the backend refuses
        (400/413) is sent again one event at a time: an event refused alone while another is accepted is skipped,
        logged and counted; when none is accepted the backend is at fault and nothing is skipped."""
        answer, items = await self._post(forwarder, events, resources)
        if answer.outcome == "accepted":
            rejected = min(answer.rejected, items)
            return items - rejected, rejected, True
        if answer.outcome != "refused":
            forwarder.failed_events(answer)
            return 0, 0, False
        accepted, refused = 0, []
        for event in events if len(events) > 1 else []:
            alone, _ = await self._post(forwarder, [event], resources)
            if alone.outcome == "accepted":
                accepted += 1
            elif alone.outcome == "refused":
                refused.append((event, alone.message))
            else:
                forwarder.failed_events(alone)
                return 0, 0, False
        if not accepted:
            forwarder.failed_events(
                otlp.ExportAnswer("retry", None, f"the backend refuses every regression event ({answer.message})"),
                reason="refused_all",
            )
            return 0, 0, False
        for event, message in refused:
            log.error(
                "OTLP logs: the backend refused regression event %s (%s of regression %s, device %s) on its own "
                "while accepting others: %s; it is counted as rejected and skipped",
                event["seq"],
                event["event"],
                event["regression_id"],
                event["device_id"],
                message,
            )
        return accepted, len(refused), True

    async def _post(
        self, forwarder: Any, events: list[dict[str, Any]], resources: dict[str, dict[str, Any]]
    ) -> tuple[otlp.ExportAnswer, int]:
        import asyncio

        groups = []
        for device in sorted({str(e["device_id"]) for e in events}):
            groups.append((resources[device], [log_record(e) for e in events if str(e["device_id"]) == device]))
        body, items = await asyncio.to_thread(otlp.encode_logs, groups, version=__version__)
        answer = await otlp.post_export(
            await forwarder.client(),
            self.settings.url(PATH_SIGNAL),
            PATH_SIGNAL,
            body,
            self.settings.headers,
            self.settings.timeout,
        )
        return answer, items


def cursor_text(cursor: dict[str, Any]) -> str:
    return json.dumps(cursor, separators=(",", ":"))
