"""A standalone device's outbox, exported to an OTLP/HTTP backend instead of an aggregator.

With ``[otlp] endpoint`` set and no ``sync.url``, the service's sync job (and ``lens-agent sync``) sends each outbox
batch as one traces and one metrics request (``lens_core.otlp``: the same mapping the aggregator forwards with) and
deletes its rows only once the backend answered both with an OTLP response. Everything else keeps them: a backend
that is down, a captive portal's ``200`` page, a token refused, ``429``/``503`` — retried with the sync job's
backoff. A batch the backend refuses as malformed or too large (``400``/``413``) is halved until the one record it
refuses is found, and that record is quarantined (``lens-agent outbox`` lists it), never dropped.

When the traces were accepted and the metrics not, the retry sends the traces again with the same trace and span
ids. The metrics' cumulative totals are kept in the outbox's state (``otlp_metrics``), so a restart continues them.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import aiohttp

from lens_core import otlp, otlp_config, wire

from . import __version__
from .outbox import AsyncOutbox, PendingRow
from .sync import SyncFailure, SyncReport, SyncSettings, Uploader

STATE_KEY = "otlp_metrics"


def standalone_sync_settings(config: Any, settings: otlp_config.OtlpSettings) -> SyncSettings:
    """The sync job's timing (``[sync]`` interval, batch size, backoff) around an OTLP endpoint."""
    s = config.values["sync"]
    return SyncSettings(
        url=settings.endpoint.rstrip("/"),
        token="",
        device_id=config.get("agent", "device_id"),
        batch_size=min(s["batch_size"], settings.batch_records),
        timeout=settings.timeout,
        interval=s["interval"],
        backoff_initial=s["backoff_initial"],
        backoff_max=min(s["backoff_max"], settings.backoff_max),
        sync_on_network_available=s["sync_on_network_available"],
    )


class OtlpUploader(Uploader):
    """:class:`agent.sync.Uploader`'s loop (screening, reports, state) with OTLP requests as the upload."""

    def __init__(self, outbox: AsyncOutbox, sync: SyncSettings, settings: otlp_config.OtlpSettings) -> None:
        super().__init__(outbox, sync)
        self.otlp = settings
        self.metrics = otlp.MetricsAccumulator(settings.temporality, server_metrics=settings.server_metrics)
        self._loaded = False
        self.facts: dict[str, Any] | None = None
        # the OTLP exporter's own session (lens_core.otlp.post_export speaks aiohttp); the aggregator's HTTP client
        # of the base class is not used here
        self._otlp_session: aiohttp.ClientSession | None = None

    async def _otlp_client(self) -> aiohttp.ClientSession:
        if self._otlp_session is None:
            ssl_context: Any = False
            if self.otlp.endpoint.startswith("https://"):
                import ssl

                ssl_context = ssl.create_default_context(cafile=str(self.otlp.ca_file) if self.otlp.ca_file else None)
            self._otlp_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_context))
        return self._otlp_session

    async def close(self) -> None:
        if self._otlp_session is not None:
            await self._otlp_session.close()
        self._otlp_session = None
        await super().close()

    async def probe(self) -> bool:
        """Whether the backend answers HTTP at all (any status): the network is back."""
        session = await self._otlp_client()
        try:
            async with session.get(self.otlp.endpoint, timeout=aiohttp.ClientTimeout(total=5), allow_redirects=False):
                return True
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def _load_state(self) -> None:
        if self._loaded:
            return
        raw = await self.outbox.get_state(STATE_KEY)
        if raw:
            # a damaged state restarts the cumulative totals (a backend sees a reset, never a loss)
            with contextlib.suppress(ValueError, TypeError, KeyError, IndexError):
                self.metrics.load(json.loads(str(raw)))
        self._loaded = True

    def _resource(self) -> dict[str, Any]:
        return otlp.resource_attributes(
            self.settings.device_id, self.facts, version=__version__, extra=self.otlp.resource_attributes
        )

    async def _upload(self, rows: list[PendingRow], report: SyncReport) -> None:
        await self._load_state()
        records = []
        for row in rows:
            record = wire.validate_record(wire.loads(row.body, row.codec))
            ext = record.get("ext")
            if record.get("kind") == "device_facts" and type(ext) is dict and type(ext.get("device")) is dict:
                self.facts = ext["device"]  # resource_attributes takes only the fields of the expected types
            records.append(record)
        resource = self._resource()
        exported = [r for r in records if r.get("kind") in otlp.SPAN_KINDS]
        # a record the encoders cannot turn into OTLP is quarantined on its own (lens-agent outbox lists it): it
        # never holds up the records behind it, and it is never dropped
        _, _, unencodable = otlp.encode_traces_isolated([(resource, exported)], version=__version__)
        if unencodable:
            bad = {id(u.record): u.reason for u in unencodable}
            kept = []
            for row, record in zip(rows, records, strict=True):
                if id(record) in bad:
                    await self._quarantine(row, f"does not encode as OTLP: {bad[id(record)]}", "unencodable", report)
                else:
                    kept.append((row, record))
            rows, records = [row for row, _ in kept], [record for _, record in kept]
            exported = [r for r in records if r.get("kind") in otlp.SPAN_KINDS]
            if not rows:
                return
        pending = None
        for signal in self.otlp.signals:
            if signal == "traces":
                body, items = otlp.encode_traces([(resource, exported)], version=__version__)
            else:
                body, items, pending = self.metrics.encode(
                    exported, {self.settings.device_id: resource}, now_ns=time.time_ns(), version=__version__
                )
            if not items:
                continue
            answer = await otlp.post_export(
                await self._otlp_client(), self.otlp.url(signal), signal, body, self.otlp.headers, self.otlp.timeout
            )
            if answer.outcome == "accepted":
                if answer.rejected:
                    report.details.append(
                        f"the backend rejected {answer.rejected} of {items} {signal}: {answer.message}"
                    )
                continue
            if answer.outcome == "refused":
                if len(rows) > 1:
                    await self._split(rows, report)
                else:
                    await self._quarantine(rows[0], f"refused by the OTLP backend: {answer.message}", "refused", report)
                return
            kind = "network" if answer.status is None else ("not_aggregator" if answer.status < 300 else "server")
            raise SyncFailure(kind, f"OTLP {signal}: {answer.message}; nothing was deleted", answer.status)
        if pending is not None:
            self.metrics.commit(pending)
            await self.outbox.set_state({STATE_KEY: json.dumps(self.metrics.state(), separators=(",", ":"))})
        await self.outbox.ack([r.seq for r in rows])
        report.batches += 1
        report.uploaded += len(rows)
        report.accepted += len(rows)
