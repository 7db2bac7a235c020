"""Observed by default: the alert rules pass their `promtool test rules` unit tests, every metric
the rules, the dashboard and the autoscalers name is one the code serves, the dashboard is a
well-formed Grafana dashboard, and the scrape targets are the pods' real ports; each check also
fails on a copy with its property broken."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from test_k8s_overlays import K8S, ROOT, Doc, one, ours, rendered, settings

MONITORING = K8S / "components" / "monitoring"
PROMTOOL = shutil.which("promtool")  # Debian's prometheus package (make sysdeps)
# Families the code registers (name as given to prometheus-client; samples add the suffixes).
METRIC_SOURCES = (
    "relay/http.py",
    "transceiver/metrics.py",
    "transceiver/webrtc/calls.py",
    "transceiver/http/app.py",
)
SUFFIXES = ("", "_total", "_bucket", "_sum", "_count")
# Read from other exporters (kube-state-metrics and the like), not from us: none today.
EXTERNAL: set[str] = set()
GRID_COLUMNS = 24
# The part of Grafana's dashboard model (schemaVersion 39) the dashboard relies on.
DASHBOARD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "time": {
            "type": "object",
            "required": ["from", "to"],
            "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
        },
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {
                "list": {"type": "array", "items": {"type": "object", "required": ["name", "type"]}}
            },
        },
        "panels": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "type", "title", "gridPos", "datasource", "targets"],
                "properties": {
                    "id": {"type": "integer", "minimum": 1},
                    "type": {"enum": ["timeseries", "stat", "gauge", "bargauge", "table", "row"]},
                    "title": {"type": "string", "minLength": 1},
                    "gridPos": {
                        "type": "object",
                        "required": ["h", "w", "x", "y"],
                        "additionalProperties": False,
                        "properties": {
                            "h": {"type": "integer", "minimum": 1},
                            "w": {"type": "integer", "minimum": 1, "maximum": GRID_COLUMNS},
                            "x": {"type": "integer", "minimum": 0, "maximum": GRID_COLUMNS - 1},
                            "y": {"type": "integer", "minimum": 0},
                        },
                    },
                    "datasource": {
                        "type": "object",
                        "required": ["type", "uid"],
                        "properties": {"type": {"const": "prometheus"}},
                    },
                    "targets": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["refId", "expr"],
                            "properties": {"refId": {"type": "string"}, "expr": {"type": "string"}},
                        },
                    },
                },
            },
        },
    },
}


def rule_groups(docs: list[Doc]) -> Any:
    return one(docs, "PrometheusRule", "voicerelay")["spec"]["groups"]


def promtool_rules(groups: Any, where: Path) -> subprocess.CompletedProcess[str]:
    """`promtool test rules` on the PrometheusRule's groups, with the shipped unit tests."""
    assert PROMTOOL, "promtool not found: `make sysdeps` installs Debian's prometheus package"
    (where / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    shutil.copy(MONITORING / "alert-rules.test.yaml", where)
    return subprocess.run(
        [PROMTOOL, "test", "rules", "alert-rules.test.yaml"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_alert_rules_pass_their_promtool_unit_tests(tmp_path: Path) -> None:
    checked = promtool_rules(rule_groups(rendered("production")), tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = set(
        re.findall(r"alertname: (\w+)", (MONITORING / "alert-rules.test.yaml").read_text())
    )
    alerts = {r["alert"] for g in rule_groups(rendered("production")) for r in g["rules"]}
    assert alerts == tested  # every alert has a test


def test_promtool_fails_when_an_alert_no_longer_fires(tmp_path: Path) -> None:
    groups = rule_groups(rendered("production"))
    for rule in groups[0]["rules"]:
        if rule["alert"] == "TransceiversNearCapacity":
            rule["expr"] = rule["expr"].replace("> 0.8", "> 0.9")
    checked = promtool_rules(groups, tmp_path)
    assert checked.returncode != 0
    assert "TransceiversNearCapacity" in checked.stdout + checked.stderr


def served_metrics() -> set[str]:
    families = set()
    for source in METRIC_SOURCES:
        text = (ROOT / source).read_text()
        families |= set(re.findall(r'"((?:relay|transceiver)_[a-z_]+)"', text))
    from transceiver.metrics import RESILIENCE_COUNTERS

    families |= {f"transceiver_provider_{c}" for c in RESILIENCE_COUNTERS}
    return {f + suffix for f in families for suffix in SUFFIXES}


def named_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:relay|transceiver|kube)_[a-z_]+\b", expr))


def queries(docs: list[Doc]) -> dict[str, str]:
    """Every PromQL expression shipped: alerts, dashboard panels, KEDA triggers."""
    found = {f"alert {r['alert']}": r["expr"] for g in rule_groups(docs) for r in g["rules"]}
    dashboard = json.loads(
        one(docs, "ConfigMap", "voicerelay-dashboard")["data"]["voicerelay-dashboard.json"]
    )
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            found[f"panel {panel['title']} {target['refId']}"] = target["expr"]
    for doc in rendered("production+keda"):
        if doc["kind"] == "ScaledObject":
            found[f"ScaledObject {doc['metadata']['name']}"] = doc["spec"]["triggers"][0][
                "metadata"
            ]["query"]
    return found


def unknown_metrics(expressions: dict[str, str]) -> list[str]:
    known = served_metrics() | EXTERNAL
    return [
        f"{where}: {name}"
        for where, expr in expressions.items()
        for name in sorted(named_metrics(expr) - known)
    ]


def test_every_metric_named_is_one_the_code_serves() -> None:
    expressions = queries(rendered("production"))
    assert len(expressions) > 20
    assert unknown_metrics(expressions) == []


def test_a_metric_the_code_does_not_serve_is_found() -> None:
    broken = {"alert X": "sum(transceiver_calls_active) > 0 and relay_dropped_packets_total > 0"}
    assert unknown_metrics(broken) == ["alert X: transceiver_calls_active"]


def capacity_findings(expressions: dict[str, str], capacity: str) -> list[str]:
    """Queries that weigh live calls against a capacity written into them instead of the one
    each transceiver serves (transceiver_capacity, its TRANSCEIVER_CAPACITY)."""
    found = []
    for where, expr in expressions.items():
        if "transceiver_sessions" not in expr or "kube_" in expr:
            continue
        weighed = "/" in expr or where.startswith("ScaledObject")
        if re.search(rf"(?<![\w.]){capacity}(?![\w.])", expr):
            found.append(f"{where}: writes the capacity ({capacity})")
        elif weighed and "transceiver_capacity" not in expr:
            found.append(f"{where}: weighs calls without transceiver_capacity")
    return found


def test_capacity_in_rules_and_autoscalers_is_the_capacity_the_transceivers_serve() -> None:
    docs = rendered("production")
    capacity = settings(docs)["TRANSCEIVER_CAPACITY"]
    expressions = queries(docs)
    assert capacity_findings(expressions, capacity) == []
    assert "transceiver_capacity" in expressions["alert TransceiversNearCapacity"]
    assert "transceiver_capacity" in expressions["ScaledObject transceiver"]
    assert "transceiver_draining" in expressions["alert TransceiverDrainStuck"]
    assert "transceiver_provider_circuit_open" in expressions["alert ProviderCircuitOpen"]


def test_a_capacity_written_into_a_query_is_found() -> None:
    written = {
        "alert A": "sum(transceiver_sessions) / (100 * count(transceiver_sessions)) > 0.8",
        "ScaledObject t": "sum(transceiver_sessions{namespace='voicerelay'})",
        "panel Calls A": "sum(transceiver_sessions)",  # a plain count of calls is fine
    }
    assert capacity_findings(written, "100") == [
        "alert A: writes the capacity (100)",
        "ScaledObject t: weighs calls without transceiver_capacity",
    ]


def dashboard_findings(dashboard: Any) -> list[str]:
    found = [
        f"{'.'.join(map(str, e.path))}: {e.message}"
        for e in jsonschema.Draft202012Validator(DASHBOARD_SCHEMA).iter_errors(dashboard)
    ]
    if found:
        return found
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    if len(ids) != len(set(ids)):
        found.append("panel ids repeat")
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        if grid["x"] + grid["w"] > GRID_COLUMNS:
            found.append(f"{panel['title']}: wider than the grid")
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                if (x, y) in cells:
                    found.append(f"{panel['title']} overlaps {cells[(x, y)]}")
                    break
                cells[(x, y)] = panel["title"]
            else:
                continue
            break
        refs = [t["refId"] for t in panel["targets"]]
        if len(refs) != len(set(refs)):
            found.append(f"{panel['title']}: refIds repeat")
    return found


def test_the_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    (config,) = [
        d for d in rendered("production") if d["metadata"]["name"] == "voicerelay-dashboard"
    ]
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config["data"]["voicerelay-dashboard.json"])
    assert dashboard_findings(dashboard) == []
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for subject in ("calls", "turn latency", "relay packets", "drops", "failover"):
        assert subject in titles


def test_a_malformed_dashboard_is_found() -> None:
    dashboard = json.loads((MONITORING / "voicerelay-dashboard.json").read_text())
    assert dashboard_findings({**dashboard, "schemaVersion": "39"}) == [
        "schemaVersion: '39' is not of type 'integer'"
    ]
    panels = dashboard["panels"]
    panels[1]["gridPos"] = dict(panels[0]["gridPos"])  # on top of the first
    panels[2]["id"] = panels[0]["id"]
    assert dashboard_findings(dashboard) == [
        "panel ids repeat",
        f"{panels[1]['title']} overlaps {panels[0]['title']}",
    ]


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_scrape_annotations_and_pod_monitors_name_the_pods_http_ports(overlay: str) -> None:
    docs = rendered(overlay)
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodMonitor"}
    assert bool(monitors) == (overlay == "production")
    for name, workload in ours(docs).items():
        template = workload["spec"]["template"]
        (container,) = template["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == ports["http"]
        if monitors:
            spec = monitors[name]["spec"]
            assert spec["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
            assert [e["port"] for e in spec["podMetricsEndpoints"]] == ["http"]
