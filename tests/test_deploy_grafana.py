"""deploy/grafana/: the committed dashboard JSON is exactly what build_dashboards.py (grafana-foundation-sdk)
renders, it has the panels and template variables operators need, and every query is well formed. The queries
themselves are evaluated against a real Prometheus scraping a real server in tests/test_deploy_monitoring.py."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import yaml
from test_deploy_support import DEPLOY, exported_metric_names, require_server

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "sdm.json"
# Panel titles the issue asks for (each must exist).
REQUIRED_PANELS = (
    "Admitted vs abstained",
    "Abstention rate by reason",
    "Out-of-distribution rate",
    "Admitted-rate drift against calibration baseline",
    "Calibrated probability distribution",
    "q' distribution",
    "Region alpha distribution",
    "Latency by stage (p50 / p95 / p99)",
    "Throughput by route",
    "Tokens",
    "Queue depth, in-flight and 429s",
    "Error rate",
)


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_json_is_regenerated_identically(tmp_path) -> None:
    if importlib.util.find_spec("grafana_foundation_sdk") is None:
        pytest.skip("grafana-foundation-sdk is not installed (pip install -r deploy/ci/requirements.txt)")
    out = tmp_path / "sdm.json"
    result = subprocess.run(
        [sys.executable, str(GRAFANA / "build_dashboards.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_text() == DASHBOARD.read_text(), (
        "deploy/grafana/dashboards/sdm.json is stale: run python deploy/grafana/build_dashboards.py"
    )
    check = subprocess.run(
        [sys.executable, str(GRAFANA / "build_dashboards.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stderr


def test_required_panels_and_variables(dashboard) -> None:
    titles = [p["title"] for p in panels(dashboard)]
    for title in REQUIRED_PANELS:
        assert title in titles, f"missing panel {title!r}"
    assert len(set(titles)) == len(titles), "panel titles are unique"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(set(ids)) == len(ids), "panel ids are unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["query"] == "label_values(sdm_bundle_info, model)"
    assert "$model" in variables["instance"]["query"] and "sdm_bundle_info" in variables["instance"]["query"]
    for name in ("model", "instance"):
        assert variables[name]["includeAll"] and variables[name]["multi"]
    assert dashboard["uid"] == "sdm-lm-overview"


def test_every_query_is_filtered_by_instance_and_uses_the_datasource_variable(dashboard) -> None:
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel.get("targets"), f"{panel['title']} has no query"
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), (panel["title"], expr)
            for selector in re.findall(r"(sdm_[a-z_]+)\{([^}]*)\}", expr):
                assert 'instance=~"$instance"' in selector[1], (
                    f"{panel['title']}: {selector[0]} is not filtered by $instance"
                )
            assert target["refId"] and target["datasource"]["uid"] == "${datasource}"


def test_every_metric_queried_is_exported_by_the_server(dashboard) -> None:
    require_server()
    exported = exported_metric_names()
    used = {m for p in panels(dashboard) for t in p.get("targets", []) for m in re.findall(r"\bsdm_[a-z_]+", t["expr"])}
    used |= {m for v in dashboard["templating"]["list"] for m in re.findall(r"\bsdm_[a-z_]+", str(v.get("query", "")))}
    assert used and not (used - exported), f"queried but not exported by server/metrics.py: {sorted(used - exported)}"


def test_histogram_panels_use_the_bucket_series(dashboard) -> None:
    by_title = {p["title"]: p for p in panels(dashboard)}
    for title, metric in (
        ("Calibrated probability distribution", "sdm_probability_bucket"),
        ("q' distribution", "sdm_q_prime_bucket"),
        ("Region alpha distribution", "sdm_region_alpha_bucket"),
        ("Latency by stage (p50 / p95 / p99)", "sdm_stage_latency_seconds_bucket"),
    ):
        exprs = [t["expr"] for t in by_title[title]["targets"]]
        assert exprs and all(e.startswith("histogram_quantile(") and metric in e for e in exprs), (title, exprs)
    latency = {t["expr"].split(",")[0] for t in by_title["Latency by stage (p50 / p95 / p99)"]["targets"]}
    assert latency == {"histogram_quantile(0.5", "histogram_quantile(0.95", "histogram_quantile(0.99"}


def test_provisioning_points_at_the_dashboard() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "sdm.yml").read_text())
    assert provider["apiVersion"] == 1 and provider["providers"][0]["type"] == "file"
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasources["datasources"][0]["type"] == "prometheus"
