"""What a worker replica records: its spans of each request, KV transfer, and its /metrics.

Spans (children of the router's ``tandem.generate`` through the call's ``traceparent``):

- prefill role: ``tandem.prefill`` from the call to the first token; under it
  ``tandem.prefix_cache.lookup`` (the prefix store's, through the OpenTelemetry API: the
  prefill span is the current span while the request is being prepared) and
  ``tandem.kv_transfer`` (direction "send");
- decode role: ``tandem.decode`` from the call to the last token; under it
  ``tandem.kv_transfer`` (direction "fetch", linked to the sender's span);
- unified role: ``tandem.prefill`` up to the first token, then ``tandem.decode``.

Per-step work is aggregated into attributes (tokens, stream messages, time per output
token), never a span per token. Speculative decoding: a ``tandem.draft`` span event on
``tandem.decode`` for every message whose steps verified drafts (one per engine step unless the
router read slower than the engine produced: ``tandem.draft.steps`` says how many), with the
draft tokens verified and accepted, and the request's totals as attributes at the end. ``traced_stream`` wraps the worker's per-request stream
methods; ``TracedTransfer`` wraps its KV transfer backend. Remote MoE experts: a
``tandem.experts.remote`` span event on ``tandem.decode`` for every message during whose steps
the engine called ExpertWorker shards (calls, failures, summed and mean latency: the calls of
the engine's steps since the request's previous message, the batch's steps it decoded in), and
the request's totals as attributes at the end.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from opentelemetry import trace

from services.kv_transfer.base import KVPayload, KVTransfer
from services.telemetry import tracing
from services.telemetry.config import WORKER_METRICS_PORTS, MetricsConfig, TracingConfig
from services.telemetry.metrics import EngineCollector, Identity, MetricsServer, WorkerMetrics, serve_metrics
from services.types import KVHandle

_CANCELLED = (GeneratorExit,)


class WorkerTelemetry:
    """Tracer and metrics of one worker replica."""

    def __init__(self, identity: Identity, metrics: WorkerMetrics | None = None, tracer: trace.Tracer | None = None):
        self.identity = identity
        self.metrics = metrics or WorkerMetrics(identity)
        self.tracer = tracer or tracing.tracer()
        self.server: MetricsServer | None = None
        self.expert_calls = None  # an ExpertCallLog (services/expert_client.py) when experts are remote

    def watch_expert_calls(self, log) -> None:
        """Observe every remote expert call of ``log`` (histogram) and read its totals (span events)."""
        self.expert_calls = log
        log.observers.append(self.metrics.expert_call)

    @classmethod
    def for_replica(cls, role: str, model: str, replica: str, engine_stats: Callable[[], Any],
                    store_stats: Callable[[], dict | None] = lambda: None) -> "WorkerTelemetry":
        """Set up tracing from ``OTEL_*``; serve /metrics on the first free worker port."""
        replica = replica or f"{role}-{os.getpid()}"
        tracing.setup_tracing(TracingConfig.from_env(), **{"tandem.role": role, "service.instance.id": replica,
                                                           "tandem.model": model})
        telemetry = cls(Identity(model, role, replica))
        telemetry.metrics.registry.register(EngineCollector(telemetry.identity, engine_stats, store_stats))
        telemetry.server = serve_metrics(telemetry.metrics.registry, MetricsConfig.from_env(),
                                         ports=WORKER_METRICS_PORTS)
        return telemetry

    @property
    def metrics_address(self) -> str:
        return self.server.address if self.server is not None else ""

    def traced_transfer(self, transfer: KVTransfer | None) -> KVTransfer | None:
        return TracedTransfer(transfer, self) if transfer is not None else None

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        tracing.shutdown_tracing()

    # ---- spans ---------------------------------------------------------------------------
    def start_span(self, name: str, traceparent: str, attributes: dict) -> trace.Span:
        return self.tracer.start_span(name, context=tracing.context_from(traceparent), attributes={
            "gen_ai.operation.name": "text_completion", "gen_ai.request.model": self.identity.model,
            "tandem.role": self.identity.role, "tandem.replica_id": self.identity.replica, **attributes})


class RequestTrace:
    """The spans of one request on this worker (see the module docstring)."""

    def __init__(self, telemetry: WorkerTelemetry, kind: str, call):
        self.telemetry = telemetry
        self.kind = kind  # "unified" | "prefill" | "decode"
        req = call.call if kind == "decode" else call  # DecodeCall wraps the GenerateCall
        self.traceparent = call.traceparent
        self.attrs = {"tandem.request_id": req.request_id, "gen_ai.usage.input_tokens": len(req.prompt_token_ids),
                      "gen_ai.request.max_tokens": req.params.max_tokens}
        self.prefill: trace.Span | None = None
        self.decode: trace.Span | None = None
        if kind == "decode":
            self.decode = telemetry.start_span("tandem.decode", self.traceparent, self.attrs)
        else:
            self.prefill = telemetry.start_span("tandem.prefill", self.traceparent, self.attrs)
        self.t_first: float | None = None
        self.queue_seen = False
        self.num_tokens = 0  # output tokens of the decode span
        self.num_later_tokens = 0  # of those, after the decode span's first message (the TPOT base)
        self.num_messages = 0
        self.drafts = (0, 0, 0)  # the request's (draft steps, draft tokens, accepted) at the last message
        log = telemetry.expert_calls
        self.expert_seen = log.totals() if log is not None else None  # remote expert call totals then
        self.expert_sums = [0, 0, 0.0]  # the request's remote expert calls, failures, seconds (events sent)

    @property
    def current(self) -> trace.Span:
        return self.prefill if self.prefill is not None else self.decode

    def on_item(self, item) -> None:
        """An item the method yields: a ``PrefillResult`` (prefill) or a ``StreamChunk``."""
        if self.kind == "prefill":
            self._first_chunk(item.first, self.prefill)
            item.traceparent = tracing.traceparent_of(self.prefill)
            self._end_prefill(item.first)
            return
        chunk = item
        if self.prefill is not None and chunk.token_ids:  # unified: the first token ends prefill
            self._first_chunk(chunk, self.prefill)
            self._end_prefill(chunk)
            if chunk.finish_reason is None:
                self.decode = self.telemetry.start_span("tandem.decode", self.traceparent, self.attrs)
                self.t_first = time.perf_counter()
            return
        if self.decode is None:
            return
        if self.t_first is None:
            self._first_chunk(chunk, self.decode)
            self.t_first = time.perf_counter()
        else:
            self.num_later_tokens += len(chunk.token_ids)
        self.num_tokens += len(chunk.token_ids)
        self.num_messages += 1
        self._draft_event(chunk)
        self._expert_event()
        if chunk.finish_reason is not None:
            self._end_decode(chunk.finish_reason)

    def _first_chunk(self, chunk, span: trace.Span) -> None:
        queue = getattr(chunk, "queue_time_s", None)
        if queue is not None and not self.queue_seen:
            self.telemetry.metrics.queue_time.observe(queue)
            span.set_attribute("tandem.queue_time_s", queue)
        self.queue_seen = True
        if span is self.prefill and span.is_recording():
            imported = getattr(chunk, "num_redis_cached_tokens", 0) or 0
            span.set_attributes({"tandem.cached_tokens": chunk.num_cached_tokens,
                                 "tandem.cached_tokens.local": chunk.num_cached_tokens - imported,
                                 "tandem.cached_tokens.redis": imported})

    def _end_prefill(self, chunk) -> None:
        span, self.prefill = self.prefill, None
        if chunk.finish_reason is not None:
            span.set_attribute("gen_ai.response.finish_reasons", [chunk.finish_reason])
        span.set_attribute("gen_ai.usage.output_tokens", len(chunk.token_ids))
        span.end()

    def _draft_event(self, chunk) -> None:
        """A ``tandem.draft`` event for the drafts verified since the previous message."""
        now = (getattr(chunk, "num_drafts", 0), getattr(chunk, "num_draft_tokens", 0),
               getattr(chunk, "num_accepted_draft_tokens", 0))
        steps, drafted, accepted = (a - b for a, b in zip(now, self.drafts))
        self.drafts = now
        if steps > 0 and self.decode.is_recording():
            self.decode.add_event("tandem.draft", {
                "tandem.draft.steps": steps, "tandem.draft.tokens": drafted, "tandem.draft.accepted_tokens": accepted,
                "tandem.draft.emitted_tokens": len(chunk.token_ids)})

    def _expert_event(self) -> None:
        """A ``tandem.experts.remote`` event for the shard calls since the previous message."""
        if self.expert_seen is None:
            return
        now = self.telemetry.expert_calls.totals()
        before, self.expert_seen = self.expert_seen, now
        calls, failures = now.num_calls - before.num_calls, now.num_failures - before.num_failures
        if calls <= 0:
            return
        seconds = now.seconds - before.seconds
        self.expert_sums = [self.expert_sums[0] + calls, self.expert_sums[1] + failures,
                            self.expert_sums[2] + seconds]
        if self.decode.is_recording():
            self.decode.add_event("tandem.experts.remote", {
                "tandem.experts.calls": calls, "tandem.experts.failures": failures,
                "tandem.experts.seconds": seconds, "tandem.experts.mean_call_s": seconds / max(calls - failures, 1)})

    def _end_decode(self, reason: str | None) -> None:
        span, self.decode = self.decode, None
        if span.is_recording():
            attrs = {"gen_ai.usage.output_tokens": self.num_tokens, "tandem.stream_messages": self.num_messages}
            if self.expert_sums[0]:
                attrs.update({"tandem.experts.calls": self.expert_sums[0],
                              "tandem.experts.failures": self.expert_sums[1],
                              "tandem.experts.seconds": self.expert_sums[2]})
            if self.drafts[0]:
                attrs.update({"tandem.draft.steps": self.drafts[0], "tandem.draft.tokens": self.drafts[1],
                              "tandem.draft.accepted_tokens": self.drafts[2]})
            if reason is not None:
                attrs["gen_ai.response.finish_reasons"] = [reason]
            if self.t_first is not None and self.num_later_tokens:
                attrs["tandem.time_per_output_token_s"] = (time.perf_counter() - self.t_first) / self.num_later_tokens
            span.set_attributes(attrs)
        span.end()

    def fail(self, exc: BaseException) -> None:
        for span in (self.prefill, self.decode):
            if span is None:
                continue
            if isinstance(exc, _CANCELLED) or type(exc).__name__ in ("CancelledError", "RequestCancelledError"):
                span.set_attribute("tandem.cancelled", True)
            else:
                tracing.record_error(span, exc, f"{type(exc).__name__}: {exc}"[:512])

    def end(self) -> None:
        if self.prefill is not None:
            self.prefill.end()
            self.prefill = None
        if self.decode is not None:
            self._end_decode(None)


def traced_stream(kind: str):
    """Decorator of an ``EngineWorker`` per-request stream method (``kind``: unified, prefill
    or decode): the request's spans around it, the current span set while it runs."""

    def wrap(method):
        @functools.wraps(method)
        async def wrapper(self, call, *args, **kwargs) -> AsyncIterator:
            telemetry: WorkerTelemetry | None = getattr(self, "telemetry", None)
            source = method(self, call, *args, **kwargs)
            if telemetry is None:
                async for item in source:
                    yield item
                return
            rt = RequestTrace(telemetry, kind, call)
            try:
                while True:
                    with trace.use_span(rt.current or trace.INVALID_SPAN, end_on_exit=False,
                                        record_exception=False, set_status_on_exception=False):
                        try:
                            item = await source.__anext__()
                        except StopAsyncIteration:
                            break
                    rt.on_item(item)
                    yield item
            except BaseException as exc:
                rt.fail(exc)
                raise
            finally:
                rt.end()
                await source.aclose()

        return wrapper

    return wrap


class TracedTransfer(KVTransfer):
    """A KV transfer backend with a ``tandem.kv_transfer`` span and metrics on send and fetch."""

    def __init__(self, inner: KVTransfer, telemetry: WorkerTelemetry):
        self.inner = inner
        self.telemetry = telemetry
        self.name = inner.name

    def send(self, payload: KVPayload, traceparent: str = "") -> KVHandle:
        nbytes = payload.kv.element_size() * payload.kv.nelement()
        t0 = time.perf_counter()
        with self._span("send", nbytes, payload.kv.shape[2], []) as span:
            handle = self.inner.send(payload, tracing.traceparent_of(span) or traceparent)
        self._observe("send", nbytes, time.perf_counter() - t0)
        return handle

    async def fetch(self, handle: KVHandle) -> KVPayload:
        nbytes = _handle_nbytes(handle)
        t0 = time.perf_counter()
        with self._span("fetch", nbytes, handle.num_blocks, tracing.link_to(handle.traceparent)):
            payload = await self.inner.fetch(handle)
        self._observe("fetch", nbytes, time.perf_counter() - t0)
        return payload

    def release(self, handle: KVHandle) -> None:
        self.inner.release(handle)

    def num_held(self) -> int:
        return self.inner.num_held()

    def _span(self, direction: str, nbytes: int, num_blocks: int, links):
        return self.telemetry.tracer.start_as_current_span("tandem.kv_transfer", links=links, attributes={
            "tandem.kv.direction": direction, "tandem.kv.bytes": nbytes, "tandem.kv.num_blocks": num_blocks,
            "tandem.kv.backend": self.inner.name, "tandem.replica_id": self.telemetry.identity.replica})

    def _observe(self, direction: str, nbytes: int, seconds: float) -> None:
        m = self.telemetry.metrics
        m.transfer_bytes[direction].inc(nbytes)
        m.transfer_seconds[direction].observe(seconds)


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1,
             "float8_e4m3fn": 1, "float8_e5m2": 1}


def _handle_nbytes(handle: KVHandle) -> int:
    return math.prod(handle.shape) * _ITEMSIZE.get(handle.dtype, 4)
