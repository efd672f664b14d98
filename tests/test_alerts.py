"""deploy/alerts.yaml: promtool's own unit tests pass, every alert is tested and charted, and uses real metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import require_binary

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "deploy" / "alerts.yaml"
ALERT_TESTS = REPO / "deploy" / "alerts-tests.yaml"
DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"
# Series natfwd does not name itself: Prometheus's scrape health, and the process collector's.
FOREIGN = {"up", "process_open_fds", "process_max_fds"}


def rules() -> list[dict[str, str]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b([a-z_]+)\{", expr)) | set(re.findall(r"\b(natfwd_[a-z_]+)\b", expr))
    return {re.sub(r"_(bucket|count|sum)$", "", name) for name in names}


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    binary = require_binary("promtool")  # Debian's prometheus package; fails under CI=true when missing
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_the_rules_are_valid_and_their_unit_tests_pass() -> None:
    check = promtool("check", "rules", str(ALERTS))
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules())} rules found" in check.stdout
    test = promtool("test", "rules", str(ALERT_TESTS))
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


def test_a_wrong_threshold_fails_the_unit_tests(tmp_path: Path) -> None:
    # The unit tests would catch a rule that no longer fires where it must: here the descriptor alert at 99%.
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    text = ALERTS.read_text()
    assert text.count("> 0.8\n") == 1
    (tmp_path / ALERTS.name).write_text(text.replace("> 0.8\n", "> 0.995\n"))
    test = promtool("test", "rules", ALERT_TESTS.name, cwd=tmp_path)
    assert test.returncode != 0
    assert "NatfwdDescriptorsNearLimit" in test.stdout + test.stderr


def test_every_alert_is_tested_firing() -> None:
    document = yaml.safe_load(ALERT_TESTS.read_text())
    firing = {
        case["alertname"]
        for test in document["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert firing == {rule["alert"] for rule in rules()}


def test_the_alerts_use_metrics_natfwd_exports() -> None:
    exported = set(re.findall(r'"(natfwd_[a-z_]+)"', (REPO / "forwarder" / "metrics.py").read_text()))
    for rule in rules():
        used = metric_names(rule["expr"])
        assert used, rule["alert"]
        assert used <= exported | FOREIGN, (rule["alert"], used - exported - FOREIGN)
        assert 'job="natfwd"' in rule["expr"], rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_the_dashboard_charts_every_alerting_signal() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    charted: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            charted |= metric_names(target["expr"])
    for rule in rules():
        assert metric_names(rule["expr"]) <= charted, (rule["alert"], metric_names(rule["expr"]) - charted)


@pytest.mark.parametrize("rule", rules(), ids=lambda rule: rule["alert"])
def test_each_alert_is_documented(rule: dict[str, str]) -> None:
    assert f"`{rule['alert']}`" in (REPO / "docs" / "operations.md").read_text()
