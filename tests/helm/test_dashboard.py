"""The Grafana dashboard (helm/dgserve/dashboards/dgserve.json, importable by hand or through the chart's
ConfigMap) plots only metrics the units export."""

from __future__ import annotations

import json
import re

from tests.cluster.test_metrics import Recorder, recorded_unit_metrics

from .chart import CHART

DASHBOARD = CHART / "dashboards" / "dgserve.json"


def exported_names(monkeypatch) -> set[str]:
    um = recorded_unit_metrics(monkeypatch)
    um.all_to_all([{"bytes": 1024, "busbw_gbs": 1.0}])  # the self-test gauge is made when the sweep reports
    return {f"ray_{r.name}" for r in Recorder.made}  # Ray's exporter prefixes application metrics with ray_


def test_every_metric_the_dashboard_plots_is_exported(monkeypatch):
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"ray_dgserve_[a-z_]+", e)}
    exported = exported_names(monkeypatch)
    assert used and used <= exported, used - exported
    # every dgserve metric has a panel, so a new one is not silently left off the dashboard
    assert exported <= used, exported - used
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"]) and dash["uid"] == "dgserve-overview"
