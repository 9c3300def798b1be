"""Aggregator configuration: the shared loader (file < ``LENS_<SECTION>_<KEY>`` < flags) with its own keys."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lens_core.config import (
    AGENT_SECTIONS,
    Config,
    Invalid,
    KeySpec,
    Schema,
    boolean,
    const,
    duration_or_zero,
    int_range,
    load_config,
    number_range,
    optional,
    parse_duration,
    parse_size,
    path_value,
    text,
)
from lens_core.errors import ConfigError
from lens_core.otlp_config import OTLP_SECTION

from .triggers import check_triggers

DEFAULT_CONFIG_PATH = Path("/etc/lens-aggregator/aggregator.toml")


def _auto_or_connections(value: object) -> int | None:
    """``"auto"`` (None: sized from the open-file limit) or an integer of connections."""
    if value == "auto":
        return None
    try:
        return int_range(16, 1_000_000)(value)
    except Invalid:
        raise Invalid('"auto" or an integer between 16 and 1000000') from None


def _event_bytes(value: object) -> int:
    size = parse_size(value)
    if not 1024 <= size <= 64 * 1024**2:
        raise Invalid("a size between 1KiB and 64MiB, such as 64KiB")
    return size


def _regression_window(value: object) -> float:
    seconds = parse_duration(value)
    if not 3600.0 <= seconds <= 90 * 24 * 3600.0:
        raise Invalid("a duration between 1h and 2160h (90 days), such as 336h")
    return seconds


def _regression_duration(value: object) -> float:
    seconds = parse_duration(value)
    if not 60.0 <= seconds <= 7 * 24 * 3600.0:
        raise Invalid("a duration between 1m and 168h, such as 4h")
    return seconds


SCHEMA: Schema = {
    "server": {
        "host": KeySpec(text, const("127.0.0.1"), "listen address; read endpoints need a read token off loopback"),
        "port": KeySpec(int_range(0, 65535), const(8443), "listen port"),
        "tls_cert": KeySpec(optional(path_value), const(None), "certificate chain (PEM) to serve HTTPS"),
        "tls_key": KeySpec(optional(path_value), const(None), "private key (PEM) for tls_cert"),
        "max_body_bytes": KeySpec(parse_size, const(16 * 1024**2), "compressed batch size accepted"),
        "max_decompressed_bytes": KeySpec(parse_size, const(64 * 1024**2), "decompressed batch size accepted"),
        "max_metric_series": KeySpec(
            int_range(1),
            const(10_000),
            "label sets carrying device-sent values (model, strategy, error type, settings) on /metrics, all "
            'devices together; past it a new set is folded (every device-sent label "other") and counted',
        ),
        "max_metric_series_per_device": KeySpec(
            int_range(1),
            const(200),
            "… and per device: past it the device's new label sets are folded the same way, counted, and its "
            "health says so",
        ),
        "metrics_max_age": KeySpec(
            duration_or_zero,
            const(5.0),
            "/metrics is built off the event loop; a build is reused for at most this long (and at most 10× its "
            "build time), concurrent scrapes share one (0: each scrape builds)",
        ),
        "max_read_series": KeySpec(
            int_range(1, 100_000),
            const(100),
            "series, groups or trigger states one read answers (per device on the fleet and device pages and the "
            "timeline, per summary, per trigger); the rest are counted in a 'truncated' marker",
        ),
        "max_batch_records": KeySpec(int_range(1, 1_000_000), const(10_000), "records per batch accepted"),
        "max_label_chars": KeySpec(int_range(8, 4096), const(128), "Prometheus label values are cut (and counted)"),
        "max_form_bytes": KeySpec(int_range(256, 1024**2), const(4096), "POST /login body accepted"),
        "read_workers": KeySpec(int_range(1, 64), const(2), "threads serving reads, beside the one writer"),
        "max_pending_reads": KeySpec(int_range(1, 10_000), const(32), "reads in flight; beyond: 503"),
        "max_query_seconds": KeySpec(parse_duration, const(10.0), "a read running longer is interrupted (503)"),
        # connections and the live stream (docs/connections.md)
        "header_timeout": KeySpec(
            parse_duration, const(10.0), "a request's headers must arrive within this long; otherwise 408, closed"
        ),
        "body_timeout": KeySpec(
            parse_duration, const(60.0), "a request's body must arrive within this long of its headers; else closed"
        ),
        "max_connections": KeySpec(
            _auto_or_connections,
            const(None),
            'open connections at once ("auto": the open-file limit less a reserve, at most 4096); beyond it the '
            "connection waiting longest for its request is closed, or the new one refused (503)",
        ),
        "max_subscribers": KeySpec(
            int_range(0, 100_000), const(100), "open live streams (GET /api/v1/stream); beyond: 503 with Retry-After"
        ),
        "max_event_bytes": KeySpec(
            _event_bytes,
            const(64 * 1024),
            "a live update whose fleet row is larger goes out as a refetch notice (the page fetches the row)",
        ),
        "log_repeat_interval": KeySpec(
            parse_duration, const(10.0), "a repeated warning or error line is logged once per this long, with a count"
        ),
        "max_unsent_bytes": KeySpec(
            parse_size,
            const(256 * 1024**2),
            "answers written and not yet taken by their clients, all connections together; beyond, the connections "
            "holding the most are closed",
        ),
    },
    "storage": {
        "db": KeySpec(text, const("/var/lib/lens-aggregator/aggregator.db"), "SQLite path or postgresql:// URL"),
        "retention": KeySpec(optional(parse_duration), const(None), "drop measurements older than this (none: keep)"),
    },
    "auth": {
        "rotate_grace": KeySpec(parse_duration, const(24 * 3600.0), "old token validity after token rotate"),
    },
    "fleet": {
        "late_after": KeySpec(
            parse_duration,
            const(3600.0),
            "a device not heard from for this long is late (4 syncs of the default 15 min)",
        ),
        "silent_after": KeySpec(parse_duration, const(24 * 3600.0), "… and silent after this long"),
        "error_rate_warning": KeySpec(
            number_range(0.0, 1.0), const(0.1), "a device whose latest requests fail this often is in warning"
        ),
        "error_rate_critical": KeySpec(number_range(0.0, 1.0), const(0.25), "… and critical"),
        "health_window": KeySpec(
            parse_duration, const(24 * 3600.0), "backlog growth, drops and quarantine are judged over this long"
        ),
        "stale_after": KeySpec(
            parse_duration,
            const(24 * 3600.0),
            "/metrics drops a series' latest-request gauges (tok/s, J/token, α) not updated for this long",
        ),
        "regression_interval": KeySpec(
            parse_duration, const(300.0), "how often change points are looked for in every series"
        ),
        "regression_min_change": KeySpec(
            number_range(0.0, 10.0), const(0.15), "a change of the median smaller than this (relative) is not reported"
        ),
        "regression_alpha": KeySpec(
            number_range(1e-12, 0.01),
            const(1e-5),
            "a change is reported when its p-value is below this: the false-alarm rate per series and metric searched",
        ),
        "regression_window": KeySpec(
            _regression_window,
            const(14 * 24 * 3600.0),
            "each series is searched over the requests that ran within this long before its newest one (event "
            "time), so a step stays findable for as long",
        ),
        "regression_max_requests": KeySpec(
            int_range(100, 100_000),
            const(4000),
            "… at most this many of them (those that ran last): 14 days at 10 requests an hour is 3,360",
        ),
        "regression_min_duration": KeySpec(
            _regression_duration,
            const(8 * 3600.0),
            "a change is reported once it has lasted this long (event time), so a shorter burst is none",
        ),
        "regression_include_contended": KeySpec(
            boolean,
            const(False),
            "the change-point search uses requests whose device said other work contended with them "
            "(ext.interference); by default they are left out and counted",
        ),
        "trigger_interval": KeySpec(
            parse_duration, const(60.0), "how often the [[triggers]] are evaluated (docs/triggers.md)"
        ),
        # performance feedback and recommendations (docs/feedback.md)
        "feedback_interval": KeySpec(
            parse_duration, const(300.0), "how often the feedback documents are recomputed (GET /api/v1/feedback)"
        ),
        "feedback_window": KeySpec(
            int_range(1, 100_000),
            const(200),
            "latest successful requests of a device × model under its current settings that a document describes; "
            "each evidence device contributes at most this many",
        ),
        "feedback_history": KeySpec(
            int_range(1, 1_000_000),
            const(2000),
            "latest requests of each device × model × strategy read for evidence (any settings)",
        ),
        "feedback_alpha": KeySpec(number_range(1e-12, 0.5), const(0.01), "significance level of each comparison"),
        "feedback_min_samples": KeySpec(int_range(2, 100_000), const(20), "requests on each side, at least"),
        "feedback_min_devices": KeySpec(
            int_range(2, 10_000),
            const(3),
            "independent devices (each its own token) whose requests a fleet recommendation needs, at least; never one "
            "device's evidence for another",
        ),
        "feedback_min_improvement": KeySpec(
            number_range(0.0, 10.0), const(0.05), "relative improvement of the median a recommendation needs"
        ),
        "feedback_include_contended": KeySpec(
            boolean,
            const(False),
            "the feedback documents use contended requests as evidence (the recommendations sent to devices never "
            "do); by default they are left out and counted",
        ),
    },
    # benchmark campaigns pushed to devices (docs/campaigns.md)
    "campaigns": {
        "max_active": KeySpec(
            int_range(1, 10_000),
            const(100),
            "campaigns not yet finished at once (pending or running); a start beyond it is refused (429)",
        ),
        "max_devices": KeySpec(
            int_range(1, 1_000_000), const(10_000), "devices one campaign may target; a start beyond it is refused"
        ),
        "check_interval": KeySpec(
            parse_duration,
            const(10.0),
            "how often jobs past their campaign's deadline are marked timed_out and finished campaigns closed",
        ),
        "callback_secret_file": KeySpec(
            optional(path_value),
            const(None),
            "file holding the HMAC-SHA256 secret that signs completion callbacks; a start asking for a callback "
            "needs it",
        ),
        "callback_attempts": KeySpec(
            int_range(1, 100), const(8), "deliveries of a completion callback tried (1 s doubling to 5 min)"
        ),
        "allow_private_callbacks": KeySpec(
            boolean,
            const(False),
            "callback URLs may resolve to loopback, private, link-local or reserved addresses (a lab network)",
        ),
    },
    # OpenTelemetry export of every stored record (docs/opentelemetry.md)
    "otlp": OTLP_SECTION,
}


def load_aggregator_config(
    path: Path | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str, str], tuple[str, object]] | None = None,
    default_path: Path = DEFAULT_CONFIG_PATH,
) -> Config:
    config = load_config(
        path,
        environ=environ,
        overrides=overrides,
        default_path=default_path,
        schema=SCHEMA,
        other_sections=AGENT_SECTIONS,
        tables={"triggers": check_triggers},  # [[triggers]]: docs/triggers.md
    )
    _check_feedback(config)
    _check_regressions(config)
    return config


def _check_feedback(config: Config) -> None:
    """The feedback keys that bound each other: a window smaller than the minimum sample count would never make
    a recommendation, a history shorter than the window would cut it."""
    for key, other in (("feedback_window", "feedback_min_samples"), ("feedback_history", "feedback_window")):
        value, bound = config.get("fleet", key), config.get("fleet", other)
        if value < bound:
            if config.source("fleet", key) == "default":  # name the value the user set
                source = config.source("fleet", other)
                raise ConfigError(source, f"fleet.{other}", bound, f"an integer ≤ fleet.{key} ({value})")
            source = config.source("fleet", key)
            raise ConfigError(source, f"fleet.{key}", value, f"an integer ≥ fleet.{other} ({bound})")


def _check_regressions(config: Config) -> None:
    """A change must be able to last ``regression_min_duration`` inside ``regression_window``: at most half of it."""
    window, duration = config.get("fleet", "regression_window"), config.get("fleet", "regression_min_duration")
    if duration > window / 2:
        if config.source("fleet", "regression_min_duration") == "default":
            source = config.source("fleet", "regression_window")
            raise ConfigError(
                source,
                "fleet.regression_window",
                window,
                f"a duration ≥ 2 × fleet.regression_min_duration ({duration:g} s)",
            )
        source = config.source("fleet", "regression_min_duration")
        raise ConfigError(
            source,
            "fleet.regression_min_duration",
            duration,
            f"a duration ≤ half of fleet.regression_window ({window:g} s)",
        )
