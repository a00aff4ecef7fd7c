"""Observability of every Tandem process: OpenTelemetry traces and Prometheus metrics.

- ``tracing``: SDK setup from the standard ``OTEL_*`` variables, W3C propagation helpers;
- ``metrics``: the metric contract (names, labels, buckets) and the per-process /metrics server;
- ``router_telemetry``: the router's per-request span root and request metrics;
- ``worker_telemetry``: the workers' spans, KV transfer instrumentation, engine gauges.

Span and metric names are listed in README.md ("Observability").
"""

from services.telemetry.router_telemetry import TRACE_ID_KEY, RequestTelemetry, RouterTelemetry
from services.telemetry.worker_telemetry import WorkerTelemetry, traced_stream

__all__ = ["TRACE_ID_KEY", "RequestTelemetry", "RouterTelemetry", "WorkerTelemetry", "traced_stream"]
