"""Campaign pages (aggregator/campaign_pages.py) and Prometheus gauges (FleetMetrics.campaigns) with hostile
names: script tags, bidirectional overrides, 10,000-character names, non-finite numbers."""

from __future__ import annotations

import math
import shutil
import subprocess
import uuid
from html.parser import HTMLParser
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from aggregator import campaign_results as cr
from aggregator.campaign_pages import BOX_CAMPAIGNS, campaign_page_html, campaigns_box_html
from aggregator.metrics import FleetMetrics

from .campaign_docs import fleet

HOSTILE = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "</table></div><script>fetch('/x')</script>",
    "evil\u202etxt.exe",
    "zero\u200bwidth\x1b[31m\x07",
    "n" * 10_000,
    "</style><svg onload=alert(1)>",
    "{{7*7}}",
]


class Tags(HTMLParser):
    """Every start tag and attribute of a page, and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "a", "h1", "h2", "h3", "div", "table", "thead",
                "tbody", "tr", "th", "td", "span", "strong"}  # fmt: skip


def parsed(page: str) -> Tags:
    tags = Tags()
    tags.feed(page)
    tags.close()
    return tags


def assert_inert(page: str, longest: int = 120) -> Tags:
    tags = parsed(page)
    assert {t for t, _ in tags.tags} <= ALLOWED_TAGS, {t for t, _ in tags.tags} - ALLOWED_TAGS
    for _, attrs in tags.tags:
        assert not any(name.startswith("on") for name in attrs), attrs
        href = attrs.get("href")
        assert href is None or not href.lower().startswith(("javascript:", "data:")), href
    lowered = page.lower()
    assert "<script" not in lowered and "<img" not in lowered and "<svg" not in lowered
    assert not any(c in page for c in "\u202e\u200b\x1b\x07")
    assert "n" * (longest + 1) not in page  # a 10,000-character name is cut (a job's reason: 300 characters)
    return tags


def _campaign(i: int, name: str, status: str = "running", **extra: Any) -> dict[str, Any]:
    return {
        "benchmark_id": str(uuid.UUID(int=i + 1)),
        "name": name,
        "status": status,
        "progress_percent": 40.0,
        "created_at": "2026-12-07T03:00:00Z",
        "deadline": "2026-12-08T03:00:00Z",
        "counts": {"queued": 2, "running": 1, "succeeded": 3},
        **extra,
    }


def test_campaigns_box_escapes_every_name_and_is_bounded() -> None:
    campaigns = [_campaign(i, HOSTILE[i % len(HOSTILE)], "completed" if i % 2 else "running") for i in range(30)]
    campaigns.append({"benchmark_id": "javascript:alert(1)", "name": "bad id", "status": "running"})
    campaigns.append({"benchmark_id": str(uuid.uuid4()), "name": "nan", "status": "<b>", "progress_percent": math.nan})
    box = campaigns_box_html(campaigns)
    tags = assert_inert("<html><body>" + box + "</body></html>")
    rows = [t for t, _ in tags.tags if t == "tr"]
    assert len(rows) == 1 + BOX_CAMPAIGNS  # header + the bound
    assert f"{32 - BOX_CAMPAIGNS:,} more not shown" in box
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in box  # shown as text, not run
    links = [a["href"] for t, a in tags.tags if t == "a" and a.get("href", "").startswith("campaigns/")]
    assert all(uuid.UUID(href.removeprefix("campaigns/")) for href in links)
    assert "javascript" not in box
    states = "".join(tags.text)
    assert states.index("running") < states.index("completed")  # active campaigns first
    assert campaigns_box_html([]) == ""


def test_campaign_page_escapes_devices_classes_and_reasons() -> None:
    records, classes = fleet(6, 2)
    for record, hostile in zip(records, HOSTILE, strict=False):
        record["ext"]["campaign"]["model"] = hostile[:200]
    hostile_classes = {device: HOSTILE[i % len(HOSTILE)] for i, device in enumerate(classes)}
    rows = cr.class_rows(records, hostile_classes)
    devices = {
        name: {"state": "failed", "reason": name * 3, "progress_percent": math.inf, "updated_at": name}
        for name in HOSTILE
    }
    devices["ok-device"] = {"state": "succeeded", "reason": None, "progress_percent": 100, "updated_at": "now"}
    status = _campaign(1, "<script>alert('name')</script>" + "n" * 10_000, devices=devices, counts={"failed": 8})
    page = campaign_page_html(status, rows)
    tags = assert_inert(page, longest=300)
    assert "n" * 121 not in page.split('id="devices"')[0]  # names are cut to 120 characters
    device_rows = [t for t, a in tags.tags if t == "tr"]
    assert len(device_rows) >= len(devices) + 1
    text = "".join(tags.text)
    assert "<script>alert('name')</script>" in text  # the name, shown as text after the parser decodes it
    assert '<meta http-equiv="refresh" content="30">' in page  # running: reloads itself
    assert "class <script>alert(1)</script>" in text and "class zerowidth[31m" in text  # classes, as text
    assert text.count("class ") >= len(set(hostile_classes.values()))
    finished = campaign_page_html({**status, "status": "completed"}, {})
    assert "refresh" not in finished and "No results yet" in finished


def test_campaign_page_survives_any_shape() -> None:
    for status in ({}, {"benchmark_id": 5, "devices": [1, 2], "counts": "x"}, {"devices": {"a": "not a map"}}):
        for classes in ({}, {"c": "rows"}, {"c": [None, 5, {"spread": "x", "ttft_p50_ms": "12"}]}):
            assert_inert(campaign_page_html(status, classes))


def _families(body: bytes) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def test_campaign_gauges_follow_the_campaigns_and_drop_ended_ones() -> None:
    metrics = FleetMetrics()
    a, b, c = (str(uuid.UUID(int=n)) for n in (1, 2, 3))
    statuses = [
        {"benchmark_id": a, "status": "running", "progress_percent": 25.0, "counts": {"queued": 3, "running": 1}},
        {"benchmark_id": b, "status": "pending", "progress_percent": math.nan, "counts": {"queued": 4}},
        {"benchmark_id": c, "status": "completed", "progress_percent": 100.0, "counts": {"succeeded": 4}},
        {"benchmark_id": "<script>", "status": "running", "progress_percent": 1.0},  # not an id: no series
        {"benchmark_id": str(uuid.uuid4()), "status": "evil\u202e"},  # not a state: not counted
    ]
    metrics.campaigns(statuses)
    got = _families(metrics.exposition())
    states = {labels["state"]: v for labels, v in got["llm_latency_lens_campaigns"]}
    assert states == {"pending": 1, "running": 2, "completed": 1, "failed": 0, "cancelled": 0}
    progress = {labels["campaign"]: v for labels, v in got["llm_latency_lens_campaign_progress_percent"]}
    assert progress == {a: 25.0, b: 0.0}
    jobs = {(labels["campaign"], labels["state"]): v for labels, v in got["llm_latency_lens_campaign_jobs"]}
    assert len(jobs) == 2 * 7 and jobs[(a, "queued")] == 3 and jobs[(a, "running")] == 1 and jobs[(b, "failed")] == 0

    statuses[0] = {**statuses[0], "status": "cancelled"}  # a ends: its series go
    metrics.campaigns(statuses[:3], totals={"cancelled": 7, "completed": 12})
    got = _families(metrics.exposition())
    assert {labels["campaign"] for labels, _ in got["llm_latency_lens_campaign_progress_percent"]} == {b}
    assert {labels["campaign"] for labels, _ in got["llm_latency_lens_campaign_jobs"]} == {b}
    states = {labels["state"]: v for labels, v in got["llm_latency_lens_campaigns"]}
    assert states["cancelled"] == 7 and states["completed"] == 12 and states["running"] == 0

    metrics.campaigns([])  # none listed: none left
    got = _families(metrics.exposition())
    assert "llm_latency_lens_campaign_progress_percent" not in got and "llm_latency_lens_campaign_jobs" not in got


def test_campaign_gauges_are_bounded_and_promtool_accepts_them() -> None:
    metrics = FleetMetrics()
    statuses = [
        {"benchmark_id": str(uuid.UUID(int=n + 1)), "status": "running", "progress_percent": n % 101, "counts": {}}
        for n in range(500)
    ]
    metrics.campaigns(statuses, max_active=100)
    body = metrics.exposition()
    got = _families(body)
    assert len(got["llm_latency_lens_campaign_progress_percent"]) == 100
    assert len(got["llm_latency_lens_campaign_jobs"]) == 700
    assert dict((labels["state"], v) for labels, v in got["llm_latency_lens_campaigns"])["running"] == 500
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make sysdeps` installs Debian's prometheus package"
    done = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()[:2000]
