"""What `deploy/` ships for operators: the Prometheus alert rules, checked and unit-tested
by the real `promtool` (Debian's `prometheus` package; `scripts/setup` installs it), and
the Grafana dashboard. That every metric they name exists is checked against a real
daemon in `tests/test_callbacks.py` (the daemon with every part on)."""

from __future__ import annotations

import json
import shutil
import subprocess

from testing.deploy import ALERT_TESTS, ALERTS, DASHBOARD, dashboard_exprs, referenced_metrics


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: scripts/setup installs Debian's prometheus package"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)


def test_the_alert_rules_pass_promtool_and_fire_when_they_should() -> None:
    check = _promtool("check", "rules", str(ALERTS))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 8 rules found" in check.stdout
    unit = _promtool("test", "rules", str(ALERT_TESTS))
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_the_dashboard_is_a_grafana_dashboard_over_the_metrics() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "container-supervisor" and doc["schemaVersion"] >= 36
    titles = [p["title"] for p in doc["panels"]]
    for want in (
        "Errors by type and code",
        "Task latency p50 / p95 / p99",
        "Queue depth by priority",
        "Docker circuit breaker",
        "Cleanup success rate",
        "Oldest leaked resource",
        "Host resources",
    ):
        assert want in titles
    ids = [p["id"] for p in doc["panels"]]
    assert len(set(ids)) == len(ids)
    assert all(p["datasource"]["uid"] == "${datasource}" for p in doc["panels"])
    assert all(e.count("(") == e.count(")") for e in dashboard_exprs())
    names = referenced_metrics()
    assert "supervisor_host_resource" not in names  # the old mixed-unit gauge is gone
    assert {
        "supervisor_breaker_state",
        "supervisor_host_cpu_ratio",
        "supervisor_build_info",
    } <= names
