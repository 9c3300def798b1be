"""The ``[otlp]`` configuration section and its settings: what a configuration's reader needs, without the encoder.

:mod:`lens_core.otlp` (the OTLP encoder, the histograms) re-exports these names; the agent's configuration imports
this module alone, so a device that does not export OTLP never loads the encoder (docs/PERFORMANCE.md, the agent's
footprint).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import Config, KeySpec, boolean, choice, const, int_range, optional, parse_duration, path_value, text
from .errors import ConfigError

# The ``[otlp]`` section, the same for both roles.
OTLP_SECTION: dict[str, KeySpec] = {
    "endpoint": KeySpec(
        optional(text), const(None), "OTLP/HTTP base URL (/v1/traces and /v1/metrics are added); unset: no export"
    ),
    "protocol": KeySpec(choice("http/protobuf"), const("http/protobuf"), "the OTLP transport (http/protobuf)"),
    "headers": KeySpec(text, const(""), "request headers, name=value pairs separated by commas (e.g. auth)"),
    "headers_file": KeySpec(optional(path_value), const(None), "a file of name=value lines, one header each"),
    "ca_file": KeySpec(optional(path_value), const(None), "CA bundle (PEM) to verify an https:// endpoint"),
    "timeout": KeySpec(parse_duration, const(10.0), "one export request's time limit"),
    "traces": KeySpec(boolean, const(True), "export one trace per request"),
    "metrics": KeySpec(boolean, const(True), "export the GenAI histograms"),
    "temporality": KeySpec(choice("cumulative", "delta"), const("cumulative"), "the histograms' temporality"),
    "server_metrics": KeySpec(
        boolean, const(False), "also export gen_ai.server.time_to_first_token, …time_per_output_token, …duration"
    ),
    "resource_attributes": KeySpec(text, const(""), "extra resource attributes, name=value pairs separated by commas"),
    "batch_records": KeySpec(int_range(1, 10_000), const(500), "records per export request"),
    "interval": KeySpec(parse_duration, const(5.0), "how often new records are looked for when all are exported"),
    "backoff_max": KeySpec(parse_duration, const(300.0), "the longest wait between retries while the backend fails"),
    "settle": KeySpec(
        optional(parse_duration),
        const(None),
        "forward a record only this long after it was stored (default: 0 on SQLite, 30s on PostgreSQL)",
    ),
}


class HeaderError(ValueError):
    """A header setting that is not ``name=value`` pairs: names the source and the entry."""


def parse_headers(value: str, source: str) -> dict[str, str]:
    """``name=value`` pairs separated by commas (``OTEL_EXPORTER_OTLP_HEADERS``' format) or by newlines."""
    headers: dict[str, str] = {}
    for raw in value.replace("\n", ",").split(","):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        name, sep, val = entry.partition("=")
        name, val = name.strip(), val.strip()
        if not sep or not name or any(c in name for c in " :\t\r") or "\r" in val:
            shown = entry if "=" not in entry else name + "=…"
            raise HeaderError(f"{source}: {shown!r} is not a header as name=value")
        headers[name] = val
    return headers


def parse_attributes(value: str, source: str) -> dict[str, str]:
    """``resource_attributes``: ``name=value`` pairs separated by commas (``OTEL_RESOURCE_ATTRIBUTES``' format)."""
    return parse_headers(value, source)


SIGNALS = ("traces", "metrics")
PATHS = {"traces": "/v1/traces", "metrics": "/v1/metrics", "logs": "/v1/logs"}  # logs: regression events only


@dataclass(frozen=True)
class OtlpSettings:
    endpoint: str
    headers: dict[str, str]
    signals: tuple[str, ...]
    temporality: str = "cumulative"
    server_metrics: bool = False
    resource_attributes: dict[str, str] = dataclasses.field(default_factory=dict)
    ca_file: Path | None = None
    timeout: float = 10.0
    batch_records: int = 500
    interval: float = 5.0
    backoff_max: float = 300.0
    settle_s: float | None = None  # None: the store's default (store_settle_s)

    def url(self, signal: str) -> str:
        return self.endpoint.rstrip("/") + PATHS[signal]


def otlp_settings(config: Config, environ: Mapping[str, str] | None = None) -> OtlpSettings | None:
    """The ``[otlp]`` section, checked; None when no endpoint is set. Headers come from ``headers_file`` (a token
    kept out of the configuration) and then ``headers`` (or its variable ``LENS_OTLP_HEADERS``), which wins."""
    values = config.values["otlp"]
    endpoint = values["endpoint"]
    if not endpoint:
        return None
    if not endpoint.startswith(("http://", "https://")) or "?" in endpoint or "#" in endpoint:
        raise ConfigError(
            config.source("otlp", "endpoint"),
            "otlp.endpoint",
            endpoint,
            "an http:// or https:// base URL such as http://collector:4318 (/v1/traces and /v1/metrics are added)",
        )
    try:
        import opentelemetry.proto.collector.trace.v1.trace_service_pb2  # noqa: F401
    except ImportError:
        raise ConfigError(
            config.source("otlp", "endpoint"),
            "otlp.endpoint",
            endpoint,
            "an endpoint only with the OTLP encoder installed: pip install 'llm-latency-lens[otlp]'",
        ) from None
    headers: dict[str, str] = {}
    try:
        if values["headers_file"] is not None:
            path = Path(values["headers_file"])
            try:
                headers.update(parse_headers(path.read_text(), str(path)))
            except OSError as exc:
                raise ConfigError(
                    config.source("otlp", "headers_file"),
                    "otlp.headers_file",
                    str(path),
                    f"a readable file of name=value lines ({exc.strerror})",
                ) from None
        headers.update(parse_headers(values["headers"], "otlp.headers"))
        extra = parse_attributes(values["resource_attributes"], "otlp.resource_attributes")
    except HeaderError as exc:
        raise ConfigError(
            config.source("otlp", "headers"), "otlp.headers", str(exc), "name=value pairs separated by commas"
        ) from None
    signals = tuple(s for s in SIGNALS if values[s])
    if not signals:
        raise ConfigError(
            config.source("otlp", "traces"),
            "otlp.traces",
            "false",
            "traces or metrics (or both) when an endpoint is set",
        )
    return OtlpSettings(
        endpoint=endpoint,
        headers=headers,
        signals=signals,
        temporality=values["temporality"],
        server_metrics=values["server_metrics"],
        resource_attributes=extra,
        ca_file=values["ca_file"],
        timeout=values["timeout"],
        batch_records=values["batch_records"],
        interval=values["interval"],
        backoff_max=values["backoff_max"],
        settle_s=values["settle"],
    )
