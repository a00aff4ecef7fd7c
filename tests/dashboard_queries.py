"""The PromQL of the Grafana dashboards in deploy/grafana/, and the metric names it uses.

Shared by tests/unit/test_dashboards.py (names against the metric contract) and the live
test that scrapes /metrics (names against what the processes really export).

``metric_names(expr)`` is a small PromQL reader, enough for dashboard queries: it drops
string literals, label matchers ``{...}``, ranges ``[...]``, grouping clauses
(``by (...)``, ``without``, ``on``, ``ignoring``, ``group_left/right``), numbers and
durations; what is left that is neither a function call nor a keyword is a metric name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

# The contract (services/telemetry/metrics.py) is defined once; re-exported for the dashboard tests.
from services.telemetry.metrics import CONTRACT

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"


_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan", "atan2"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-zA-Z_$]+")
_NUMBER = re.compile(r"(?<![\w:$])(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)")
_IDENT = re.compile(r"(?<![\w$])[a-zA-Z_:][a-zA-Z0-9_:]*")


def exposed_names(contract: dict[str, str] = CONTRACT) -> set[str]:
    """Every series name the contract's metrics appear under in /metrics output."""
    names = set()
    for name, kind in contract.items():
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names one PromQL expression reads."""
    text = _STRING.sub(" ", expr)
    while _MATCHERS.search(text):
        text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group(0)
        is_call = text[match.end():].lstrip().startswith("(")
        if not is_call and word.lower() not in _KEYWORDS:
            names.add(word)
    return names


def dashboard_paths() -> list[Path]:
    return sorted(GRAFANA.glob("*.json"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, rows' collapsed panels included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def variable_query(variable: dict) -> str | None:
    """The PromQL inside a query variable (label_values(EXPR, label) or query_result(EXPR))."""
    if variable.get("type") != "query":
        return None
    query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
    match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query) or \
        re.fullmatch(r"\s*query_result\((.*)\)\s*", query)
    if match is None:
        raise ValueError(f"variable {variable['name']}: not label_values(...) or query_result(...): {query!r}")
    return match.group(1)


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of a dashboard."""
    found = [(f"panel {p['title']!r} target {t['refId']}", t["expr"])
             for p in panels(dashboard) if p["type"] != "row" for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        expr = variable_query(variable)
        if expr is not None:
            found.append((f"variable {variable['name']}", expr))
    return found


def all_metric_names() -> dict[str, set[str]]:
    """Metric name -> the places (file: panel/variable) that read it, over every dashboard."""
    used: dict[str, set[str]] = {}
    for path in dashboard_paths():
        for where, expr in queries(load(path)):
            for name in metric_names(expr):
                used.setdefault(name, set()).add(f"{path.name}: {where}")
    return used
