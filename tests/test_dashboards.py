"""The Grafana dashboard and the Prometheus scrape config: valid, and every query names metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from agent.synthetic import synthetic_records
from aggregator.metrics import FleetMetrics

from .guardrail_export_records import guard

ROOT = Path(__file__).resolve().parents[1]


def exposed_names() -> set[str]:
    metrics = FleetMetrics()
    records = synthetic_records(5, seed=1, device_id="d")
    from lens_core import wire

    metrics.observe("d", [wire.to_wire(r) for r in records])
    metrics.observe("d", [guard(wire.to_wire(records[0]), blocked_at="input")])  # the guardrail series
    metrics.device("d", {"dropped_total": 1, "quarantined_total": 0, "pending_records": 2}, 1.0)
    metrics.rejections.labels("malformed").inc()
    metrics.records.labels("accepted").inc()
    metrics.failed.labels("d", "m", "local", "local", "x").inc()
    metrics.joules.labels("d", "m", "local", "local").set(1)
    metrics.acceptance.labels("d", "m", "local", "local").set(1)
    metrics.regressions(
        [
            {
                "kind": "regression",
                "device_id": "d",
                "model_name": "m",
                "strategy": "local",
                "metric": "tpot_ms",
                "change": 0.5,
            }
        ]
    )
    text = metrics.exposition().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_dashboard_queries_use_existing_metrics() -> None:
    dashboard = json.loads((ROOT / "packaging/grafana/llm-latency-lens-fleet.json").read_text())
    names = exposed_names()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    for expr in exprs:
        for metric in re.findall(r"llm_latency_lens_[a-z_]+", expr):
            assert metric in names, (metric, expr)
    titles = " ".join(p["title"] for p in dashboard["panels"])
    # the seed's §3.4 panels, then the edge panels
    for topic in (
        "Time to First Token (P50, P95, P99)",
        "Tokens Per Second by Model",
        "Request Rate",
        "Error Rate",
        "Energy",
        "acceptance",
        "backlog",
        "not seen",
        "Guardrail stage time per set (p50, p95)",
    ):
        assert topic in titles, topic


def test_every_dashboard_query_parses_for_promtool(tmp_path: Path) -> None:
    """Each panel's query, with Grafana's variables filled in, as a recording rule: promtool parses it."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make sysdeps` installs Debian's prometheus package"
    dashboard = json.loads((ROOT / "packaging/grafana/llm-latency-lens-fleet.json").read_text())
    rules = []
    for n, panel in enumerate(dashboard["panels"]):
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "5m")
            for name in ("device", "model", "strategy"):
                expr = expr.replace(f"${name}", ".*")
            rules.append({"record": f"dashboard:panel_{n}:{target['refId'].lower()}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(rules)} rules found" in done.stdout


def test_scrape_config_is_valid_for_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make sysdeps` installs Debian's prometheus package"
    (tmp_path / "lens-token").write_text("token")
    (tmp_path / "lens-aggregator-ca.pem").write_text("")
    text = (ROOT / "packaging/prometheus/scrape.yml").read_text().replace("/etc/prometheus/", f"{tmp_path}/")
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    done = subprocess.run([promtool, "check", "config", "--syntax-only", str(config)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_variables_cover_devices_that_went_quiet() -> None:
    """$device lists every device the aggregator knows (its device gauges are restored from the store at start),
    and "All" is a regex over every value, so devices silent since a restart stay in the backlog and drop panels."""
    dashboard = json.loads((ROOT / "packaging/grafana/llm-latency-lens-fleet.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "llm_latency_lens_device_last_seen_timestamp_seconds" in variables["device"]["query"]["query"]
    for name in ("device", "model", "strategy"):
        assert variables[name]["includeAll"] is True and variables[name]["allValue"] == ".*"
