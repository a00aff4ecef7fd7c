"""Telemetry settings, read once from the environment of the process.

Tracing follows the OpenTelemetry SDK's own variables (so a collector sidecar, the Helm chart
or a shell export configures every process the same way): the OTLP endpoint (tracing is off
without one), the sampler and its ratio, the service name; ``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none`` turn it off. Metrics (Prometheus text over HTTP, one endpoint per
process) follow ``TANDEM_METRICS*``. services/engine/env.py reads them all and lists each one
with its meaning and default; the SDK reads its other variables (``OTEL_BSP_*``, ...) itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.engine import env as env_vars

SAMPLERS = env_vars.TRACE_SAMPLERS
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
        """``env``: the variables (default: this process's environment)."""
        endpoint = env_vars.otlp_traces_endpoint(env)
        if env_vars.otel_sdk_disabled(env) or env_vars.traces_exporter(env) == "none":
            endpoint = None
        return cls(endpoint, env_vars.traces_sampler(env), env_vars.traces_sampler_ratio(env),
                   env_vars.service_name(env))


@dataclass(frozen=True)
class MetricsConfig:
    """Where this process serves /metrics."""

    enabled: bool = True  # False: no HTTP endpoint
    host: str = "127.0.0.1"  # bind address
    port: int = ROUTER_METRICS_PORT  # the router's port (0 = any free port)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "MetricsConfig":
        """``env``: the variables (default: this process's environment)."""
        return cls(enabled=env_vars.metrics_enabled(env), host=env_vars.metrics_host(env),
                   port=env_vars.metrics_port(env))
