"""deploy/grafana-dashboard.json charts every contract metric, and only metrics natfwd really exports."""

from __future__ import annotations

import json
import re

from awskit import REPO

DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"
# The names design.md makes contract.
CONTRACT = {
    "natfwd_connections_accepted_total",
    "natfwd_connections_rejected_total",
    "natfwd_connections_active",
    "natfwd_bytes_total",
    "natfwd_upstream_connect_seconds",
    "natfwd_config_reloads_total",
}


def exported() -> set[str]:
    return set(re.findall(r'"(natfwd_[a-z_]+)"', (REPO / "forwarder" / "metrics.py").read_text()))


def test_dashboard_charts_the_contract_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {re.sub(r"_bucket$", "", name) for expr in expressions for name in re.findall(r"natfwd_[a-z_]+", expr)}
    assert used >= CONTRACT
    assert used <= exported()
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    for expr in expressions:
        assert expr.count("(") == expr.count(")"), expr
        assert 'instance=~"$instance"' in expr, expr
