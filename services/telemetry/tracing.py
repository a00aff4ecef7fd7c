"""OpenTelemetry tracing of one process: SDK setup from ``OTEL_*``, W3C propagation helpers.

Every process (the router and each worker replica) calls ``setup_tracing`` once. With no
OTLP endpoint configured nothing is installed: the OpenTelemetry API then hands out
non-recording spans that only carry the incoming trace context along, so the hooks cost
next to nothing. Code anywhere may use the API (``opentelemetry.trace.get_tracer("tandem")``);
its spans land in the provider installed here.

Propagation is explicit: a request's context crosses a Serve handle as the W3C
``traceparent`` string in the call's dataclass (services/types.py), because the handle does
not carry OpenTelemetry's context by itself.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.telemetry.config import TracingConfig

log = logging.getLogger("tandem.telemetry")
TRACER_NAME = "tandem"
_PROPAGATOR = TraceContextTextMapPropagator()
_setup_lock = threading.Lock()
_provider = None  # the SDK TracerProvider this process installed (OpenTelemetry's API is process-global)


def make_sampler(config: TracingConfig):
    """The SDK sampler named by ``config`` (ParentBased(TraceIdRatio) by default)."""
    from opentelemetry.sdk.trace import sampling

    base = {"always_on": sampling.ALWAYS_ON, "always_off": sampling.ALWAYS_OFF,
            "traceidratio": sampling.TraceIdRatioBased(config.ratio)}
    name = config.sampler.removeprefix("parentbased_")
    return sampling.ParentBased(base[name]) if config.sampler.startswith("parentbased_") else base[name]


def make_provider(config: TracingConfig, attributes: dict, exporter=None):
    """A TracerProvider with this process's resource and a BatchSpanProcessor to ``exporter``
    (default: OTLP/gRPC to ``config.endpoint``)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=config.endpoint)
    resource = Resource.create({"service.name": config.service_name, "process.pid": os.getpid(),
                                "host.name": socket.gethostname(), **attributes})
    provider = TracerProvider(resource=resource, sampler=make_sampler(config))
    provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_* tune it
    return provider


def setup_tracing(config: TracingConfig | None = None, **attributes) -> bool:
    """Install the SDK for this process once (``attributes``: extra resource attributes such
    as ``tandem.role`` and ``service.instance.id``). Returns True when spans are exported."""
    global _provider
    config = config or TracingConfig.from_env()
    with _setup_lock:
        if _provider is not None:
            return True
        if not config.enabled:
            return False
        _provider = make_provider(config, {k: v for k, v in attributes.items() if v not in (None, "")})
        trace.set_tracer_provider(_provider)
    log.info("tracing: exporting spans to %s (sampler %s, ratio %s)", config.endpoint, config.sampler, config.ratio)
    return True


def shutdown_tracing(timeout_ms: int = 2000) -> None:
    """Export what is buffered and stop the exporter (replica shutdown)."""
    global _provider
    with _setup_lock:
        provider, _provider = _provider, None
    if provider is not None:
        try:
            provider.force_flush(timeout_ms)
        finally:
            provider.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


# ---- W3C trace context ---------------------------------------------------------------------
def context_from(traceparent: str, tracestate: str = "") -> otel_context.Context | None:
    """The context a ``traceparent`` names (None when empty or malformed: a new trace starts)."""
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    ctx = _PROPAGATOR.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def traceparent_of(span: trace.Span) -> str:
    """The W3C ``traceparent`` naming ``span`` ("" when it has no valid context)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def trace_id_hex(span: trace.Span) -> str:
    """32 hex digits of the span's trace id ("" when it has none)."""
    ctx = span.get_span_context()
    return trace.format_trace_id(ctx.trace_id) if ctx.is_valid else ""


def link_to(traceparent: str) -> list[trace.Link]:
    """A span link to the span a ``traceparent`` names (none when empty)."""
    ctx = context_from(traceparent)
    return [trace.Link(trace.get_current_span(ctx).get_span_context())] if ctx is not None else []


def record_error(span: trace.Span, exc: BaseException | None, description: str) -> None:
    """Mark ``span`` failed: ERROR status with ``description``, and the exception as an event."""
    if exc is not None:
        span.record_exception(exc)
        span.set_attribute("error.type", type(exc).__name__)
    span.set_status(trace.Status(trace.StatusCode.ERROR, description))
