"""The live-accuracy pieces of deploy/: the dashboard's accuracy panel (accuracy per alpha, its Wilson band, the
alpha and the label count, all from sdm_feedback_labels_total), the accuracy recording rules for both windows,
and the two new alerts' runbooks. promtool evaluates the rules and alerts in deploy/prometheus/tests/accuracy_test.yml
(tests/test_deploy_prometheus.py runs it)."""

from __future__ import annotations

import json
import math

import yaml
from test_deploy_support import DEPLOY

PROM = DEPLOY / "prometheus"


def test_the_accuracy_panel_shows_accuracy_band_alpha_and_label_count() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "sdm.json").read_text())
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    panel = next(p for p in panels if p["title"] == "Observed accuracy of admitted answers vs alpha")
    legends = [t["legendFormat"] for t in panel["targets"]]
    assert legends == [
        "accuracy α={{alpha}}",
        "Wilson lower α={{alpha}}",
        "Wilson upper α={{alpha}}",
        "alpha {{alpha}}",
        "labels α={{alpha}}",
    ]
    exprs = [t["expr"] for t in panel["targets"]]
    assert all('decision="admitted"' in e for e in exprs[:3] + exprs[4:]) and "sdm_ladder_alpha" in exprs[3]
    assert "sqrt(" in exprs[1] and " - 1.96 * sqrt(" in exprs[1] and " + 1.96 * sqrt(" in exprs[2]
    assert all("[1d]" in e for e in exprs[:3] + exprs[4:])


def test_the_dashboards_wilson_band_is_the_wilson_interval() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_dashboards", DEPLOY / "grafana" / "build_dashboards.py")
    if spec is None or importlib.util.find_spec("grafana_foundation_sdk") is None:
        import pytest

        pytest.skip("grafana-foundation-sdk is not installed (pip install -r deploy/ci/requirements.txt)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Evaluate the generated PromQL arithmetic with Python numbers: 60 correct of 100.
    expr = module.wilson("K", "N", -1).replace("^", "**").replace(" > 0", "")
    lower = eval(expr, {"sqrt": math.sqrt, "K": 60.0, "N": 100.0})  # noqa: S307 - our own arithmetic string
    assert abs(lower - 0.502) < 1e-3  # the textbook Wilson 95 % lower bound of 60/100


def test_accuracy_rules_cover_both_windows_and_the_alert_reads_the_band() -> None:
    recording = yaml.safe_load((PROM / "rules" / "recording.yml").read_text())
    records = {r["record"] for g in recording["groups"] for r in g["rules"] if "record" in r}
    for window in ("1h", "1d"):
        for name in (
            "admitted_labels:increase",
            "admitted_correct:increase",
            "admitted_accuracy:ratio",
            "admitted_accuracy_wilson_lower:ratio",
            "admitted_accuracy_wilson_upper:ratio",
        ):
            assert f"job:sdm_{name}{window}" in records
    alerts = {
        r["alert"]: r for g in yaml.safe_load((PROM / "rules" / "alerts.yml").read_text())["groups"] for r in g["rules"]
    }
    expr = alerts["SDMAdmittedAccuracyBelowAlpha"]["expr"]
    assert (
        "wilson_upper:ratio1d" in expr
        and "sdm:accuracy_alert_min_labels:count" in expr
        and "job:sdm_ladder_alpha:max" in expr
    )
    assert "SDMTrafficStoreDown" in alerts
