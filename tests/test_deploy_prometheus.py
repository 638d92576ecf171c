"""deploy/prometheus/: `promtool check config`, `promtool check rules` and the rule unit tests (`promtool test
rules`), plus a check that the abstention alert's margin really is configurable in one place. Skipped only when
promtool is absent (deploy/ci/install_prometheus.sh installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from test_deploy_support import DEPLOY, exported_metric_names, require_server

PROM = DEPLOY / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
TEST_FILES = sorted((PROM / "tests").glob("*.yml"))


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed: bash deploy/ci/install_prometheus.sh (Debian's prometheus package)")
    return subprocess.run([tool, *args], cwd=str(cwd), capture_output=True, text=True, timeout=300)


def test_config_is_valid() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_are_valid() -> None:
    assert {p.name for p in RULE_FILES} == {"recording.yml", "alerts.yml"}
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    assert TEST_FILES, "no promtool rule tests"
    result = promtool("test", "rules", *map(str, TEST_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_and_documented() -> None:
    alerts = [
        rule["alert"]
        for group in yaml.safe_load((PROM / "rules" / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    assert {"SDMAbstentionAboveBaseline", "SDMOODSpike", "SDMHighErrorRate", "SDMHighLatencyP95", "SDMNotReady"} <= set(
        alerts
    )
    tested = {
        case["alertname"]
        for f in TEST_FILES
        for test in yaml.safe_load(f.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert set(alerts) <= tested, f"alerts never shown firing in a promtool test: {sorted(set(alerts) - tested)}"
    operations = (DEPLOY.parent / "docs" / "operations.md").read_text()
    for group in yaml.safe_load((PROM / "rules" / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] in operations, f"docs/operations.md does not say what to do when {rule['alert']} fires"
            anchor = rule["annotations"]["runbook"].split("#", 1)[1]
            assert anchor == rule["alert"].lower()
            assert re.search(rf"^#+ .*{rule['alert']}", operations, re.M), (
                f"docs/operations.md needs a heading for {rule['alert']}"
            )


def test_abstention_margin_is_configurable(tmp_path: Path) -> None:
    """The same traffic (abstaining 25 points above the calibration baseline) fires with a 0.20 margin and does
    not with 0.30: the margin is the recording rule sdm:abstention_alert_margin:ratio and nothing else."""
    recording = (PROM / "rules" / "recording.yml").read_text()
    assert recording.count("expr: vector(0.10)") == 1
    series = """
      - series: 'sdm_requests_total{job="sdm-lm",instance="a:8000",route="/generate",outcome="admitted"}'
        values: '0+30x30'
      - series: 'sdm_requests_total{job="sdm-lm",instance="a:8000",route="/generate",outcome="abstained"}'
        values: '0+30x30'
      - series: 'sdm_calibration_admitted_proportion{job="sdm-lm",instance="a:8000"}'
        values: '0.75x30'"""
    for margin, fires in (("0.20", True), ("0.30", False)):
        folder = tmp_path / margin
        folder.mkdir()
        (folder / "recording.yml").write_text(recording.replace("expr: vector(0.10)", f"expr: vector({margin})"))
        shutil.copy(PROM / "rules" / "alerts.yml", folder / "alerts.yml")
        expected = (
            ""
            if not fires
            else """
          - exp_labels: {severity: warning, job: sdm-lm, instance: "a:8000"}
            exp_annotations:
              summary: "a:8000 abstains more than its calibration baseline"
              description: "The abstained proportion is 25% above the calibration set's for 10 minutes: traffic may have drifted from the calibration distribution."
              runbook: docs/operations.md#sdmabstentionabovebaseline"""  # noqa: E501 - alerts.yml's text, verbatim
        )
        alerts_block = "exp_alerts:" + expected if fires else "exp_alerts: []"
        (folder / "test.yml").write_text(f"""rule_files: [recording.yml, alerts.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:{series}
    alert_rule_test:
      - eval_time: 20m
        alertname: SDMAbstentionAboveBaseline
        {alerts_block}
""")
        result = promtool("test", "rules", "test.yml", cwd=folder)
        assert result.returncode == 0, f"margin {margin}: " + result.stdout + result.stderr


def test_rules_read_only_metrics_the_server_exports() -> None:
    require_server()
    exported = exported_metric_names()
    used = set()
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                used |= set(re.findall(r"(?<![:\w])sdm_[a-z_]+", rule["expr"]))
    assert used and not (used - exported), (
        f"rules read metrics server/metrics.py does not export: {sorted(used - exported)}"
    )
