"""Telemetry settings, read once from the environment of the process.

Tracing follows the OpenTelemetry SDK's own variables (so a collector sidecar, the Helm
chart or a shell export configures every process the same way):

    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT   OTLP/gRPC collector;
                                        tracing is off when neither is set
    OTEL_TRACES_SAMPLER                 parentbased_traceidratio (default), traceidratio,
                                        parentbased_always_on, always_on, always_off, ...
    OTEL_TRACES_SAMPLER_ARG             ratio for the *traceidratio samplers [1.0]
    OTEL_SERVICE_NAME                   service.name resource attribute [tandem]
    OTEL_SDK_DISABLED=true, OTEL_TRACES_EXPORTER=none   tracing off whatever else is set
    OTEL_BSP_SCHEDULE_DELAY, OTEL_EXPORTER_OTLP_INSECURE, ...  read by the SDK itself

Metrics (Prometheus text over HTTP, one endpoint per process):

    TANDEM_METRICS_HOST   bind address [127.0.0.1]; the Helm chart sets 0.0.0.0
    TANDEM_METRICS_PORT   the router's port [9464]; workers take the first free port of
                          9465..9496 (a router whose port is taken does the same)
    TANDEM_METRICS=off    no metrics endpoint (the metrics are still counted)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
            "parentbased_traceidratio")
ROUTER_METRICS_PORT = 9464
WORKER_METRICS_PORTS = range(9465, 9497)  # 9465..9496


@dataclass(frozen=True)
class TracingConfig:
    """How (and whether) this process exports spans."""

    endpoint: str | None  # OTLP/gRPC collector address; None = tracing off
    sampler: str = "parentbased_traceidratio"  # one of SAMPLERS
    ratio: float = 1.0  # sampled fraction of new traces (the *traceidratio samplers)
    service_name: str = "tandem"  # service.name of every span of this process

    @property
    def enabled(self) -> bool:
        return self.endpoint is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "TracingConfig":
        env = os.environ if env is None else env
        endpoint = (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                    or "").strip()
        disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        if disabled or env.get("OTEL_TRACES_EXPORTER", "").strip() == "none":
            endpoint = ""
        sampler = (env.get("OTEL_TRACES_SAMPLER") or "parentbased_traceidratio").strip().lower()
        if sampler not in SAMPLERS:
            raise ValueError(f"OTEL_TRACES_SAMPLER: must be one of {SAMPLERS}, got {sampler!r}")
        raw = (env.get("OTEL_TRACES_SAMPLER_ARG") or "1.0").strip()
        try:
            ratio = float(raw)
        except ValueError:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG: must be a number in [0, 1], got {raw!r}") from None
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG: must be in [0, 1], got {ratio}")
        return cls(endpoint or None, sampler, ratio, (env.get("OTEL_SERVICE_NAME") or "tandem").strip())


@dataclass(frozen=True)
class MetricsConfig:
    """Where this process serves /metrics."""

    enabled: bool = True  # False: no HTTP endpoint
    host: str = "127.0.0.1"  # bind address
    port: int = ROUTER_METRICS_PORT  # the router's port (0 = any free port)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "MetricsConfig":
        env = os.environ if env is None else env
        raw = (env.get("TANDEM_METRICS_PORT") or str(ROUTER_METRICS_PORT)).strip()
        if not raw.isdigit() or int(raw) > 65535:
            raise ValueError(f"TANDEM_METRICS_PORT: must be a port number, got {raw!r}")
        return cls(enabled=env.get("TANDEM_METRICS", "on").strip().lower() not in ("off", "0", "false"),
                   host=(env.get("TANDEM_METRICS_HOST") or "127.0.0.1").strip(), port=int(raw))
