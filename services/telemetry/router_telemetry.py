"""What the router records per request: the ``tandem.generate`` span tree root and the
request-level Prometheus metrics.

One ``RequestTelemetry`` per Generate call (the servicer drives it):

    start(metadata) -> dispatched(call) -> (on_chunk(chunk), handed_over(chunk))...
        -> finished | failed | cancelled -> end()

Spans: ``tandem.generate`` (SERVER, the whole request, continuing the client's W3C
``traceparent`` metadata or starting a trace) with ``tandem.route`` under it (the router's
work before a worker sees the request: validation, tokenization, admission). The workers'
spans are children of ``tandem.generate`` through ``GenerateCall.traceparent``. Per-token
work is aggregated into attributes; span events: ``first_token``, and ``tandem.migration`` per
migration (router/migration.py: the stream moved to another replica after its replica failed).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from opentelemetry import trace

from services.telemetry import tracing
from services.telemetry.config import MetricsConfig, TracingConfig
from services.telemetry.metrics import Identity, MetricsServer, RouterMetrics, router_ports, serve_metrics

TRACE_ID_KEY = "x-trace-id"  # trailing metadata key carrying the request's trace id
RPC_SERVICE = "tandem.v1.Generation"
_NOT_ERRORS = ("OK", "CANCELLED")  # a client cancel is not the server's failure


class RouterTelemetry:
    """Tracer and metrics of one router replica."""

    def __init__(self, identity: Identity, metrics: RouterMetrics | None = None, tracer: trace.Tracer | None = None):
        self.identity = identity
        self.metrics = metrics or RouterMetrics(identity)
        self.tracer = tracer or tracing.tracer()
        self.server: MetricsServer | None = None

    @classmethod
    def for_replica(cls, model: str, replica: str) -> "RouterTelemetry":
        """Set up tracing from ``OTEL_*`` and serve /metrics (``TANDEM_METRICS_*``)."""
        replica = replica or f"router-{os.getpid()}"
        tracing.setup_tracing(TracingConfig.from_env(), **{"tandem.role": "router", "service.instance.id": replica,
                                                           "tandem.model": model})
        telemetry = cls(Identity(model, "router", replica))
        config = MetricsConfig.from_env()
        telemetry.server = serve_metrics(telemetry.metrics.registry, config, ports=router_ports(config))
        return telemetry

    @property
    def metrics_address(self) -> str:
        return self.server.address if self.server is not None else ""

    def start(self, metadata: Iterable[tuple[str, str]] | None) -> "RequestTelemetry":
        return RequestTelemetry(self, metadata)

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        tracing.shutdown_tracing()


class RequestTelemetry:
    """Span and metrics of one Generate call (see the module docstring for the order of calls)."""

    def __init__(self, owner: RouterTelemetry, metadata: Iterable[tuple[str, str]] | None):
        self.metrics = owner.metrics
        self.t0 = time.perf_counter()
        self._last = self.t0
        self.first_token_s: float | None = None
        self.num_prompt_tokens = 0
        self.num_output_tokens = 0
        self.num_messages = 0
        self.dispatched_ = False
        self._ended = False
        headers = dict(metadata or ())
        parent = tracing.context_from(headers.get("traceparent", ""), headers.get("tracestate", ""))
        tracer = owner.tracer
        self.span = tracer.start_span("tandem.generate", context=parent, kind=trace.SpanKind.SERVER, attributes={
            "rpc.system": "grpc", "rpc.service": RPC_SERVICE, "rpc.method": "Generate",
            "gen_ai.operation.name": "text_completion", "gen_ai.request.model": owner.identity.model,
            "tandem.router.replica_id": owner.identity.replica})
        self.route = tracer.start_span("tandem.route", context=trace.set_span_in_context(self.span))
        self.traceparent = tracing.traceparent_of(self.span)  # what the workers continue
        self.trace_id = tracing.trace_id_hex(self.span)
        self.metrics.inflight.inc()

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TRACE_ID_KEY, self.trace_id),) if self.trace_id else ()

    def dispatched(self, call) -> None:
        """The validated ``GenerateCall`` goes to the workers: route is over."""
        self.dispatched_ = True
        self.num_prompt_tokens = len(call.prompt_token_ids)
        if self.span.is_recording():
            p = call.params
            attrs = {"gen_ai.response.id": call.request_id, "tandem.request_id": call.request_id,
                     "gen_ai.request.max_tokens": p.max_tokens, "gen_ai.request.temperature": p.temperature,
                     "gen_ai.request.top_p": p.top_p, "gen_ai.request.top_k": p.top_k,
                     "gen_ai.usage.input_tokens": self.num_prompt_tokens, "tandem.priority": call.priority}
            if p.seed is not None:
                attrs["gen_ai.request.seed"] = p.seed
            if p.stop:
                attrs["gen_ai.request.stop_sequences"] = list(p.stop)
            self.span.set_attributes(attrs)
            self.route.set_attribute("gen_ai.usage.input_tokens", self.num_prompt_tokens)
        self.route.end()

    def on_chunk(self, chunk) -> None:
        """A ``StreamChunk`` is about to be sent to the client."""
        now = time.perf_counter()
        n = len(chunk.token_ids)
        self.num_messages += 1
        if n:
            if self.first_token_s is None:
                self.first_token_s = now - self.t0
                self.metrics.ttft.observe(self.first_token_s)
                self.span.add_event("first_token")
                if n > 1:  # tokens that came with the first one reach the client at once
                    self._observe_itl(0.0, n - 1)
            else:
                self._observe_itl(now - self._last, n)
            self._last = now
        self.num_output_tokens = chunk.num_output_tokens or self.num_output_tokens + n
        if chunk.finish_reason is not None:
            self.finished(chunk.finish_reason, chunk.num_cached_tokens)

    def migrated(self, migration) -> None:
        """The request moves to another replica (a ``router.migration.Migration``)."""
        self.metrics.migrations(migration.reason).inc()
        self.span.add_event("tandem.migration", {
            "tandem.migration.reason": migration.reason, "tandem.migration.role": migration.role,
            "tandem.migration.from_replica": migration.from_replica, "tandem.migration.attempt": migration.attempt,
            "tandem.migration.resumed_tokens": migration.num_resumed_tokens})

    def handed_over(self, chunk) -> None:
        """The response message built from ``chunk`` goes to gRPC now: observe the token delay
        (``tandem_router_token_delay_seconds``) and the router dwell (``tandem_router_dwell_seconds``)
        of a message that carries tokens.

        ``chunk.emitted_at`` is the engine's ``time.time()`` when it produced the oldest token of
        the chunk, in the worker's process; both ends read the same clock on one machine (across
        machines the clocks' offset is in the value; a negative difference counts as 0).
        ``chunk.arrived_at`` is this router's ``time.time()`` when that token arrived here.
        """
        if not chunk.token_ids:
            return
        now = time.time()
        if chunk.emitted_at is not None:
            self.metrics.token_delay.observe(max(now - chunk.emitted_at, 0.0))
        if chunk.arrived_at is not None:
            self.metrics.dwell.observe(max(now - chunk.arrived_at, 0.0))

    def _observe_itl(self, gap: float, n: int) -> None:
        per_token = gap / n
        for _ in range(n):
            self.metrics.itl.observe(per_token)

    def finished(self, reason: str, num_cached_tokens: int = 0) -> None:
        if self._ended:
            return
        e2e = time.perf_counter() - self.t0
        m = self.metrics
        (m.finished.get(reason) or m.finished["abort"]).inc()
        m.e2e.observe(e2e)
        self._count_tokens()
        if self.span.is_recording():
            self.span.set_attributes({
                "gen_ai.response.finish_reasons": [reason], "gen_ai.usage.output_tokens": self.num_output_tokens,
                "tandem.cached_tokens": num_cached_tokens, "tandem.e2e_s": e2e, "tandem.stream_messages":
                    self.num_messages, "rpc.grpc.status_code": 0})
            if self.first_token_s is not None:
                self.span.set_attribute("tandem.ttft_s", self.first_token_s)
        self._close()

    def failed(self, code_name: str, code_value: int, exc: BaseException | None, message: str) -> None:
        """The request ends with a non-OK gRPC status."""
        if self._ended:
            return
        self.metrics.failed(code_name).inc()
        self._count_tokens()
        self.span.set_attributes({"rpc.grpc.status_code": code_value, "gen_ai.usage.output_tokens":
                                  self.num_output_tokens})
        if code_name not in _NOT_ERRORS:
            tracing.record_error(self.span, exc, f"{code_name}: {message}")
            if not self.dispatched_:
                tracing.record_error(self.route, exc, f"{code_name}: {message}")
        self._close()

    def cancelled(self, time_remaining: float | None) -> None:
        """The call was cancelled: by the client, or by its deadline when none is left."""
        if time_remaining is not None and time_remaining <= 0:
            self.failed("DEADLINE_EXCEEDED", 4, None, "deadline exceeded")
        else:
            self.failed("CANCELLED", 1, None, "request cancelled")

    def _count_tokens(self) -> None:
        if self.dispatched_:
            self.metrics.prompt_tokens.inc(self.num_prompt_tokens)
        if self.num_output_tokens:
            self.metrics.generation_tokens.inc(self.num_output_tokens)

    def _close(self) -> None:
        self._ended = True
        self.metrics.inflight.dec()
        if not self.dispatched_:
            self.route.end()
        self.span.end()

    def end(self) -> None:
        """Always called last: a request that neither finished nor failed counts as cancelled."""
        if not self._ended:
            self.failed("CANCELLED", 1, None, "request cancelled")
