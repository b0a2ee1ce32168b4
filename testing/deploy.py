"""The metric names the shipped alert rules and dashboard use (`deploy/`), so a test can
hold them to what a real daemon exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "supervisor.json"
_NAME = re.compile(r"\b((?:supervisor|process)_[a-z0-9_]+)\b")


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    variables = [v["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return exprs + [a["expr"] for a in doc["annotations"]["list"]] + variables


def referenced_metrics() -> set[str]:
    """Every series name the alert rules and the dashboard query."""
    text = ALERTS.read_text() + "\n".join(dashboard_exprs())
    return set(_NAME.findall(text))


def exposed(metrics_text: str) -> set[str]:
    """The series names a Prometheus text exposition declares (from its `# TYPE` lines, so
    a labelled family with no series yet counts: a counter `x` gives `x_total`, a histogram
    `x_bucket`, `x_count` and `x_sum`)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    names: set[str] = set()
    for line in metrics_text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[:2] == ["#", "TYPE"]:
            name, kind = parts[2], parts[3]
            if kind == "counter" and name.endswith("_total"):
                name = name.removesuffix("_total")  # the text format names counters whole
            names.update(name + s for s in suffixes.get(kind, ("",)))
    return names
