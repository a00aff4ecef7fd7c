"""deploy/grafana/*.json: well-formed Grafana dashboards whose every query reads contract metrics."""

import importlib.util
import json
import re

import pytest

from tests.dashboard_queries import (CONTRACT, ROOT, dashboard_paths, exposed_names, load, metric_names, panels,
                                     queries)

PATHS = dashboard_paths()
VARIABLES = {"datasource", "model", "role", "replica"}
ROLES = ("router", "prefill", "decode", "unified")
PANEL_TYPES = {"timeseries", "stat", "state-timeline", "gauge", "bargauge", "table"}


def _generator():
    spec = importlib.util.spec_from_file_location("grafana_generate", ROOT / "deploy" / "grafana" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_dashboards():
    assert [p.name for p in PATHS] == ["tandem.json"]


def test_committed_json_is_what_the_generator_writes():
    generator = _generator()
    expected = generator.render()
    for path in generator.TARGETS:
        assert path.is_file(), f"{path} is missing: run `make chart-files`"
        assert path.read_text() == expected, f"{path} is stale: run `make chart-files`"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_dashboard_is_well_formed_grafana(path):
    dashboard = load(path)
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert VARIABLES <= set(variables)
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["w"] >= 1 and grid["h"] >= 1 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            assert "targets" not in panel
            continue
        # Every panel queries the selected data source, never a fixed one.
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert panel["type"] in PANEL_TYPES, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"], panel["title"]
            # A legend names only labels the query keeps (its `by (...)` clauses).
            kept = {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", target["expr"])
                    for label in group.split(",")}
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]))
            assert legend <= kept, f"{panel['title']!r}: legend {legend - kept} not kept by {target['expr']!r}"
        if panel["title"] not in {"Redis circuit breaker"}:
            assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
    # Expanded panels do not overlap (collapsed rows' panels are laid out when opened).
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in occupied, f"{panel['title']!r} overlaps {occupied[(x, y)]!r}"
                occupied[(x, y)] = panel["title"]
    json.dumps(dashboard)  # round-trips


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_every_query_filters_on_the_variables_and_reads_contract_metrics(path):
    allowed = exposed_names()
    for where, expr in queries(load(path)):
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= allowed, f"{where}: {sorted(names - allowed)} not in the metric contract"
        for name in names:  # a histogram is read through its buckets/sum/count, never its bare name
            assert name not in {n for n, kind in CONTRACT.items() if kind == "histogram"}, where
        if where.startswith("panel"):
            assert 'model=~"$model"' in expr, f"{where}: does not filter on $model"
            assert "replica=~\"$replica\"" in expr, f"{where}: does not filter on $replica"
            assert "role=~\"$role\"" in expr or any(f'role="{r}"' in expr for r in ROLES), f"{where}: no role filter"
        if "rate(" in expr:
            assert "[$__rate_interval]" in expr, f"{where}: use $__rate_interval"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_rows_cover_the_slos_and_every_role(path):
    dashboard = load(path)
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    for wanted in ("Latency SLOs", "Throughput", "Queueing", "KV and prefix cache", "KV transfer", "Errors"):
        assert any(r.startswith(wanted) for r in rows), f"no row {wanted!r} in {rows}"
    for role in ROLES:
        row = next(p for p in dashboard["panels"] if p["type"] == "row" and p["title"] == f"Role: {role}")
        assert row["panels"] and all(f'role="{role}"' in t["expr"] for p in row["panels"] for t in p["targets"])
    used = set().union(*(metric_names(expr) for _, expr in queries(dashboard)))
    # Every contract metric is on the dashboard somewhere (histograms through their buckets or count).
    for name, kind in CONTRACT.items():
        series = {f"{name}_bucket", f"{name}_count"} if kind == "histogram" else {name}
        assert used & series, f"{name} is on no panel"


@pytest.mark.parametrize("expr,names", [
    ('histogram_quantile(0.99, sum by (le) (rate(tandem_kv_transfer_seconds_bucket{a="x{y}"}[5m])))',
     {"tandem_kv_transfer_seconds_bucket"}),
    ("sum(rate(a_total[1m] offset 1h)) / on (pod) group_left (node) b * 1e3 > bool 0.5", {"a_total", "b"}),
    ('label_replace(up{job="x"}, "dst", "$1", "src", "(.*)") or vector(0)', {"up"}),
    ("tandem_e2e_request_latency_seconds_count - ignoring(role) tandem_requests_inflight",
     {"tandem_e2e_request_latency_seconds_count", "tandem_requests_inflight"}),
])
def test_metric_names_reads_promql(expr, names):
    assert metric_names(expr) == names
