"""The Grafana dashboard and the alert rules query only metrics the agent exports."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from tests.deploy.conftest import DEPLOY, REPO

# What agent/metrics exports (names without the histogram suffixes); aligned with the metrics
# module when it lands, after which this list should be read from it.
EXPORTED = frozenset(
    {
        "saturnos_runs_claimed_total",
        "saturnos_runs_finished_total",
        "saturnos_claim_conflicts_total",
        "saturnos_pickup_latency_seconds",
        "saturnos_cancel_latency_seconds",
        "saturnos_event_stream_up",
        "saturnos_event_stream_reconnects_total",
        "saturnos_event_stream_rebuilds_total",
        "saturnos_catchup_polls_found_total",
        "saturnos_backend_retries_total",
        "saturnos_slots_busy",
        "saturnos_slots_free",
        "saturnos_checkpoint_uploads_total",
    }
)
HISTOGRAMS = {"saturnos_pickup_latency_seconds", "saturnos_cancel_latency_seconds"}
DASHBOARD = DEPLOY / "grafana" / "saturnos-agent.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"


def metric_names(expr: str) -> set[str]:
    names = set()
    for name in re.findall(r"\bsaturnos_[a-z0-9_]+", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        # A histogram is queried through its series; its bare name exports nothing.
        names.add(base if base in HISTOGRAMS else name)
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    exprs.append(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    return exprs


def test_the_dashboard_queries_only_exported_metrics_and_shows_them_all() -> None:
    queried = set().union(*map(metric_names, dashboard_exprs()))
    assert queried - EXPORTED == set()
    assert EXPORTED - queried == set(), "a metric the agent exports has no panel"


def test_the_dashboard_is_importable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        for target in panel["targets"]:
            # Every query follows the agent picker.
            assert 'instance=~"$instance"' in target["expr"], target["expr"]


def test_alert_rules_query_only_exported_metrics() -> None:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert rules
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert metric_names(rule["expr"]) <= EXPORTED, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    # Each alert is described in the README, where operators decide which ones to page on.
    readme = (REPO / "README.md").read_text()
    assert [r["alert"] for r in rules if r["alert"] not in readme] == []
