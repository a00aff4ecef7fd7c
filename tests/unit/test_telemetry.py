"""services/telemetry without Ray: OTEL_* parsing, propagation, the router's and workers' spans
(in-memory exporter), the metric contract, the /metrics server, engine queue time."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
import torch
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from services.engine.kv_cache import KVCacheManager, hash_seed
from services.engine.outputs import TokenChunk
from services.engine.request import Request
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler
from services.engine.config import SchedulerConfig
from services.kv_transfer.base import KVPayload, KVTransfer
from services.telemetry import tracing
from services.telemetry.config import MetricsConfig, TracingConfig
from services.telemetry.metrics import (EngineCollector, Identity, RouterMetrics, WorkerMetrics, router_ports,
                                        serve_metrics)
from services.telemetry.router_telemetry import RouterTelemetry
from services.telemetry.worker_telemetry import WorkerTelemetry, traced_stream
from services.types import DecodeCall, GenerateCall, KVHandle, PrefillResult, StreamChunk

CLIENT_TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, provider.get_tracer("test")


def by_name(exporter):
    out = {}
    for s in exporter.get_finished_spans():
        out.setdefault(s.name, []).append(s)
    return out


# ---- config ------------------------------------------------------------------------------
def test_tracing_config_from_env():
    assert not TracingConfig.from_env({}).enabled
    c = TracingConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317",
                                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:4317",
                                "OTEL_TRACES_SAMPLER_ARG": "0.25", "OTEL_SERVICE_NAME": "x"})
    assert (c.endpoint, c.sampler, c.ratio, c.service_name) == ("http://b:4317", "parentbased_traceidratio", 0.25, "x")
    assert TracingConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317"}).ratio == 1.0
    assert not TracingConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a", "OTEL_SDK_DISABLED": "true"}).enabled
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER_ARG"):
        TracingConfig.from_env({"OTEL_TRACES_SAMPLER_ARG": "2"})
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER"):
        TracingConfig.from_env({"OTEL_TRACES_SAMPLER": "sometimes"})


def test_sampler_is_parent_based_trace_id_ratio():
    sampler = tracing.make_sampler(TracingConfig("http://x", ratio=0.5))
    assert "ParentBased" in sampler.get_description() and "TraceIdRatioBased{0.5}" in sampler.get_description()
    assert "AlwaysOnSampler" in tracing.make_sampler(TracingConfig("http://x", "always_on")).get_description()


def test_metrics_config_from_env():
    assert MetricsConfig.from_env({}) == MetricsConfig(True, "127.0.0.1", 9464)
    c = MetricsConfig.from_env({"TANDEM_METRICS_HOST": "0.0.0.0", "TANDEM_METRICS_PORT": "9000"})
    assert (c.host, c.port) == ("0.0.0.0", 9000)
    assert not MetricsConfig.from_env({"TANDEM_METRICS": "off"}).enabled
    with pytest.raises(ValueError, match="TANDEM_METRICS_PORT"):
        MetricsConfig.from_env({"TANDEM_METRICS_PORT": "http"})
    assert router_ports(MetricsConfig())[:3] == [9464, 9465, 9466]


# ---- propagation -------------------------------------------------------------------------
def test_traceparent_round_trip(spans):
    _, tracer = spans
    parent = tracing.context_from(CLIENT_TP)
    span = tracer.start_span("s", context=parent)
    tp = tracing.traceparent_of(span)
    assert tp.startswith(f"00-{CLIENT_TRACE}-") and tp != CLIENT_TP
    assert tracing.trace_id_hex(span) == CLIENT_TRACE
    assert tracing.context_from("garbage") is None and tracing.context_from("") is None
    assert tracing.traceparent_of(trace.INVALID_SPAN) == ""


# ---- router ------------------------------------------------------------------------------
def gen_call(rid="r1", n=5, tp="", **params):
    return GenerateCall(rid, list(range(1, n + 1)), SamplingParams(**{"max_tokens": 4, **params}), traceparent=tp)


def test_router_request_span_and_metrics(spans):
    exporter, tracer = spans
    rt = RouterTelemetry(Identity("m", "router", "r0"), tracer=tracer)
    obs = rt.start([("traceparent", CLIENT_TP)])
    assert obs.trailing_metadata() == (("x-trace-id", CLIENT_TRACE),)
    obs.dispatched(gen_call(temperature=0.5, top_p=0.9, tp=obs.traceparent))
    obs.on_chunk(StreamChunk([7], num_output_tokens=1))
    time.sleep(0.01)
    obs.on_chunk(StreamChunk([8, 9], num_output_tokens=3))
    obs.on_chunk(StreamChunk([10], finish_reason="length", num_cached_tokens=16, num_output_tokens=4))
    obs.end()
    got = by_name(exporter)
    root, route = got["tandem.generate"][0], got["tandem.route"][0]
    assert root.kind == trace.SpanKind.SERVER
    assert format(root.context.trace_id, "032x") == CLIENT_TRACE
    assert format(root.parent.span_id, "016x") == "b7ad6b7169203331"
    assert route.parent.span_id == root.context.span_id
    a = root.attributes
    assert a["gen_ai.request.model"] == "m" and a["gen_ai.request.max_tokens"] == 4
    assert a["gen_ai.request.temperature"] == 0.5 and a["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert a["gen_ai.usage.input_tokens"] == 5 and a["gen_ai.usage.output_tokens"] == 4
    assert a["gen_ai.response.finish_reasons"] == ("length",) and a["tandem.cached_tokens"] == 16
    assert a["tandem.ttft_s"] > 0 and root.status.status_code == trace.StatusCode.UNSET
    reg, labels = rt.metrics.registry, {"model": "m", "role": "router", "replica": "r0"}
    assert reg.get_sample_value("tandem_time_to_first_token_seconds_count", labels) == 1
    assert reg.get_sample_value("tandem_inter_token_latency_seconds_count", labels) == 3
    assert reg.get_sample_value("tandem_e2e_request_latency_seconds_count", labels) == 1
    assert reg.get_sample_value("tandem_prompt_tokens_total", labels) == 5
    assert reg.get_sample_value("tandem_generation_tokens_total", labels) == 4
    assert reg.get_sample_value("tandem_requests_finished_total", {**labels, "finish_reason": "length"}) == 1
    assert reg.get_sample_value("tandem_requests_inflight", labels) == 0


def _router_histogram(rt: RouterTelemetry, name: str):
    """(count, sum, bucket(le)) of one of the router's histograms."""
    reg, labels = rt.metrics.registry, {"model": "m", "role": "router", "replica": "r0"}
    return (reg.get_sample_value(f"{name}_count", labels), reg.get_sample_value(f"{name}_sum", labels),
            lambda le: reg.get_sample_value(f"{name}_bucket", {**labels, "le": le}))


def test_router_token_delay_is_observed_per_message_with_tokens(spans):
    _, tracer = spans
    rt = RouterTelemetry(Identity("m", "router", "r0"), tracer=tracer)
    obs = rt.start([])
    now = time.time()
    obs.handed_over(StreamChunk([7], emitted_at=now - 0.003))  # 3 ms old
    obs.handed_over(StreamChunk([8, 9], emitted_at=now - 0.0003))  # merged: its oldest token's stamp, one sample
    obs.handed_over(StreamChunk([], finish_reason="abort", emitted_at=now - 5))  # no tokens: not observed
    obs.handed_over(StreamChunk([10]))  # no stamp (e.g. an older worker): not observed
    obs.end()
    count, total, bucket = _router_histogram(rt, "tandem_router_token_delay_seconds")
    assert count == 2
    assert 0.0033 <= total < 0.5
    assert (bucket("0.00025"), bucket("0.0005"), bucket("0.002"), bucket("0.005")) == (0, 1, 1, 2)


def test_router_dwell_is_observed_per_message_with_tokens(spans):
    _, tracer = spans
    rt = RouterTelemetry(Identity("m", "router", "r0"), tracer=tracer)
    obs = rt.start([])
    now = time.time()
    obs.handed_over(StreamChunk([7], emitted_at=now - 0.02, arrived_at=now - 0.003))  # 3 ms on the router
    obs.handed_over(StreamChunk([8, 9], arrived_at=now - 0.0003))  # no emission stamp: dwell still observed
    obs.handed_over(StreamChunk([], finish_reason="abort", arrived_at=now - 5))  # no tokens: not observed
    obs.handed_over(StreamChunk([10], emitted_at=now - 0.001))  # not stamped on arrival: delay only
    obs.handed_over(StreamChunk([11], arrived_at=now + 60))  # a clock step back counts as 0
    obs.end()
    count, total, bucket = _router_histogram(rt, "tandem_router_dwell_seconds")
    assert count == 3
    assert _router_histogram(rt, "tandem_router_token_delay_seconds")[0] == 2
    assert 0.0033 <= total < 0.5
    assert (bucket("0.0001"), bucket("0.0005"), bucket("0.002"), bucket("0.005")) == (1, 2, 2, 3)


def test_router_failed_request_has_error_status(spans):
    exporter, tracer = spans
    rt = RouterTelemetry(Identity("m", "router", "r0"), tracer=tracer)
    obs = rt.start(None)  # no client context: a new trace
    assert obs.trace_id and obs.traceparent.startswith(f"00-{obs.trace_id}-")
    obs.failed("INVALID_ARGUMENT", 3, ValueError("prompt: bad"), "prompt: bad")
    obs.end()
    root = by_name(exporter)["tandem.generate"][0]
    assert root.status.status_code == trace.StatusCode.ERROR and "INVALID_ARGUMENT" in root.status.description
    assert root.attributes["rpc.grpc.status_code"] == 3
    assert any(e.name == "exception" for e in root.events)
    assert by_name(exporter)["tandem.route"][0].status.status_code == trace.StatusCode.ERROR
    labels = {"model": "m", "role": "router", "replica": "r0", "code": "INVALID_ARGUMENT"}
    assert rt.metrics.registry.get_sample_value("tandem_requests_failed_total", labels) == 1


def test_router_cancel_is_not_an_error(spans):
    exporter, tracer = spans
    rt = RouterTelemetry(Identity("m", "router", "r0"), tracer=tracer)
    obs = rt.start(None)
    obs.cancelled(5.0)
    root = by_name(exporter)["tandem.generate"][0]
    assert root.status.status_code == trace.StatusCode.UNSET and root.attributes["rpc.grpc.status_code"] == 1
    obs2 = rt.start(None)
    obs2.cancelled(0.0)
    assert by_name(exporter)["tandem.generate"][1].status.status_code == trace.StatusCode.ERROR


# ---- workers -----------------------------------------------------------------------------
class FakeTransfer(KVTransfer):
    name = "fake"

    def __init__(self):
        self.sent = []

    def send(self, payload, traceparent=""):
        self.sent.append(traceparent)
        return KVHandle("fake", payload.request_id, payload.num_tokens, payload.kv.shape[2], payload.kv.shape[3],
                        "float32", tuple(payload.kv.shape), traceparent=traceparent)

    async def fetch(self, handle):
        return KVPayload(handle.request_id, torch.zeros(handle.shape), handle.num_tokens)

    def release(self, handle):
        pass

    def num_held(self):
        return 0


class FakeWorker:
    def __init__(self, telemetry, fail=False):
        self.telemetry = telemetry
        self.transfer = telemetry.traced_transfer(FakeTransfer())
        self.fail = fail

    @traced_stream("prefill")
    async def prefill(self, call):
        with trace.get_tracer("tandem").start_as_current_span("tandem.prefix_cache.lookup"):
            pass  # as the prefix store does, through the global API: parented by the current span
        if self.fail:
            raise RuntimeError("boom")
        handle = self.transfer.send(KVPayload(call.request_id, torch.zeros(2, 2, 1, 4, 1, 2), 4), call.traceparent)
        yield PrefillResult(call.request_id, StreamChunk([5], num_cached_tokens=16, queue_time_s=0.02), handle)

    @traced_stream("decode")
    async def decode(self, call):
        await self.transfer.fetch(call.kv)
        yield StreamChunk([6], num_output_tokens=2, queue_time_s=0.001)
        yield StreamChunk([7, 8], num_output_tokens=4, finish_reason="stop")

    @traced_stream("unified")
    async def generate(self, call):
        yield StreamChunk([6], num_output_tokens=1, queue_time_s=0.003)
        yield StreamChunk([7], num_output_tokens=2, finish_reason="length")


def drain(agen):
    async def main():
        return [x async for x in agen]
    return asyncio.run(main())


def test_worker_spans_parent_to_the_router_and_each_other(spans, monkeypatch):
    exporter, tracer = spans
    monkeypatch.setattr(trace, "get_tracer", lambda *a, **k: tracer)  # stand-in for the global provider
    prefill_w = FakeWorker(WorkerTelemetry(Identity("m", "prefill", "p0"), tracer=tracer))
    decode_w = FakeWorker(WorkerTelemetry(Identity("m", "decode", "d0"), tracer=tracer))
    router_span = tracer.start_span("tandem.generate", context=tracing.context_from(CLIENT_TP))
    call = gen_call(tp=tracing.traceparent_of(router_span))
    (result,) = drain(prefill_w.prefill(call))
    chunks = drain(decode_w.decode(DecodeCall(call, 5, None, result.kv, traceparent=call.traceparent)))
    router_span.end()
    assert [c.token_ids for c in chunks] == [[6], [7, 8]]
    got = {name: s[0] for name, s in by_name(exporter).items()}
    root = got["tandem.generate"].context.span_id
    prefill, decode = got["tandem.prefill"], got["tandem.decode"]
    assert prefill.parent.span_id == root and decode.parent.span_id == root
    assert got["tandem.prefix_cache.lookup"].parent.span_id == prefill.context.span_id
    sends = [s for s in by_name(exporter)["tandem.kv_transfer"] if s.attributes["tandem.kv.direction"] == "send"]
    fetch = [s for s in by_name(exporter)["tandem.kv_transfer"] if s.attributes["tandem.kv.direction"] == "fetch"]
    assert sends[0].parent.span_id == prefill.context.span_id and fetch[0].parent.span_id == decode.context.span_id
    assert fetch[0].links[0].context.span_id == sends[0].context.span_id  # the handle names the send span
    assert result.traceparent == tracing.traceparent_of(_as_span(prefill))
    assert prefill.attributes["tandem.queue_time_s"] == 0.02 and prefill.attributes["tandem.cached_tokens"] == 16
    assert prefill.attributes["tandem.replica_id"] == "p0" and decode.attributes["tandem.replica_id"] == "d0"
    assert decode.attributes["gen_ai.usage.output_tokens"] == 3
    assert decode.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert decode.attributes["tandem.stream_messages"] == 2 and decode.attributes["tandem.time_per_output_token_s"] >= 0
    assert {s.context.trace_id for s in exporter.get_finished_spans()} == {int(CLIENT_TRACE, 16)}
    reg = prefill_w.telemetry.metrics.registry
    labels = {"model": "m", "role": "prefill", "replica": "p0"}
    assert reg.get_sample_value("tandem_request_queue_time_seconds_count", labels) == 1
    assert reg.get_sample_value("tandem_kv_transfer_bytes_total", {**labels, "direction": "send"}) == 2 * 2 * 4 * 2 * 4
    dreg = decode_w.telemetry.metrics.registry
    dl = {"model": "m", "role": "decode", "replica": "d0"}
    assert dreg.get_sample_value("tandem_kv_transfer_seconds_count", {**dl, "direction": "fetch"}) == 1
    assert dreg.get_sample_value("tandem_request_queue_time_seconds_count", dl) == 1


def _as_span(readable):
    return trace.NonRecordingSpan(readable.context)


def test_worker_error_sets_status(spans):
    exporter, tracer = spans
    w = FakeWorker(WorkerTelemetry(Identity("m", "prefill", "p0"), tracer=tracer), fail=True)
    with pytest.raises(RuntimeError):
        drain(w.prefill(gen_call()))
    span = by_name(exporter)["tandem.prefill"][0]
    assert span.status.status_code == trace.StatusCode.ERROR
    assert span.events[0].name == "exception"


def test_unified_worker_has_prefill_then_decode(spans):
    exporter, tracer = spans
    w = FakeWorker(WorkerTelemetry(Identity("m", "unified", "u0"), tracer=tracer))
    drain(w.generate(gen_call()))
    got = by_name(exporter)
    assert got["tandem.prefill"][0].end_time <= got["tandem.decode"][0].start_time
    assert got["tandem.decode"][0].attributes["gen_ai.usage.output_tokens"] == 1


# ---- metrics contract --------------------------------------------------------------------
class Stats:
    num_running, num_waiting, kv_blocks_total, kv_blocks_free = 2, 1, 100, 60
    num_prompt_tokens, num_cached_prompt_tokens = 500, 128


def collect(registry) -> dict[tuple, float]:
    from prometheus_client import generate_latest

    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_engine_collector_reads_at_scrape_time():
    ident = Identity("m", "prefill", "p0")
    reg = CollectorRegistry()
    store = {"queries_tokens": {"local": 64, "redis": 48}, "hits_tokens": {"local": 16, "redis": 32},
             "errors": {"get": 2}, "corrupt_blobs": 1, "breaker_open": 1}
    current = {"store": None}
    reg.register(EngineCollector(ident, lambda: Stats, lambda: current["store"]))
    base = (("model", "m"), ("replica", "p0"), ("role", "prefill"))
    got = collect(reg)
    assert got[("tandem_kv_blocks_used", base)] == 40 and got[("tandem_kv_blocks_total", base)] == 100
    assert got[("tandem_requests_running", base)] == 2 and got[("tandem_requests_waiting", base)] == 1
    assert got[("tandem_prefix_cache_queries_total", base + (("tier", "local"),))] == 500
    assert got[("tandem_prefix_cache_hits_total", base + (("tier", "redis"),))] == 0
    assert got[("tandem_redis_breaker_open", base)] == 0
    current["store"] = store
    got = collect(reg)
    assert got[("tandem_prefix_cache_queries_total", base + (("tier", "redis"),))] == 48
    assert got[("tandem_prefix_cache_hits_total", base + (("tier", "local"),))] == 16
    assert got[("tandem_redis_errors_total", tuple(sorted(base + (("op", "get"),))))] == 2
    assert got[("tandem_redis_errors_total", tuple(sorted(base + (("op", "set"),))))] == 0
    assert got[("tandem_prefix_cache_corrupt_blobs_total", base)] == 1
    assert got[("tandem_redis_breaker_open", base)] == 1


CONTRACT_ROUTER = {"tandem_time_to_first_token_seconds", "tandem_inter_token_latency_seconds",
                   "tandem_e2e_request_latency_seconds", "tandem_prompt_tokens", "tandem_generation_tokens",
                   "tandem_requests_finished", "tandem_requests_failed", "tandem_requests_inflight",
                   "tandem_router_token_delay_seconds", "tandem_router_dwell_seconds"}
CONTRACT_WORKER = {"tandem_request_queue_time_seconds", "tandem_requests_running", "tandem_requests_waiting",
                   "tandem_kv_blocks_used", "tandem_kv_blocks_total", "tandem_prefix_cache_queries",
                   "tandem_prefix_cache_hits", "tandem_prefix_cache_corrupt_blobs", "tandem_redis_errors",
                   "tandem_redis_breaker_open", "tandem_kv_transfer_bytes", "tandem_kv_transfer_seconds"}


def test_metrics_server_serves_the_contract():
    router = RouterMetrics(Identity("m", "router", "r0"))
    worker = WorkerMetrics(Identity("m", "decode", "d0"))
    worker.registry.register(EngineCollector(Identity("m", "decode", "d0"), lambda: Stats))
    servers = []
    try:
        for metrics, expected in ((router, CONTRACT_ROUTER), (worker, CONTRACT_WORKER)):
            server = serve_metrics(metrics.registry, MetricsConfig(port=0), ports=[0])
            servers.append(server)
            text = urllib.request.urlopen(f"http://{server.address}/metrics", timeout=5).read().decode()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            assert expected <= set(families), expected - set(families)
            for fam in families.values():
                for s in fam.samples:
                    assert {"model", "role", "replica"} <= set(s.labels), s
    finally:
        for s in servers:
            s.stop()


def test_the_processes_export_exactly_the_contract():
    from prometheus_client import generate_latest

    from services.telemetry.metrics import CONTRACT

    worker = WorkerMetrics(Identity("m", "decode", "d0"))
    worker.registry.register(EngineCollector(Identity("m", "decode", "d0"), lambda: Stats))
    exported = {}
    for registry in (RouterMetrics(Identity("m", "router", "r0")).registry, worker.registry):
        for fam in text_string_to_metric_families(generate_latest(registry).decode()):
            if not fam.name.endswith("_created"):  # serve_metrics turns these off in the real processes
                exported[fam.name + "_total" if fam.type == "counter" else fam.name] = fam.type
    assert exported == CONTRACT
    failed = RouterMetrics(Identity("m", "router", "r0")).registry.get_sample_value(
        "tandem_requests_failed_total", {"model": "m", "role": "router", "replica": "r0", "code": "UNAVAILABLE"})
    assert failed == 0  # known codes are exported before the first failure


def test_port_scan_skips_taken_ports():
    reg = CollectorRegistry()
    first = serve_metrics(reg, MetricsConfig(), ports=[0])
    port = int(first.address.rsplit(":", 1)[1])
    try:
        second = serve_metrics(reg, MetricsConfig(), ports=[port, 0])
        assert second is not None and second.address != first.address
        second.stop()
        assert serve_metrics(reg, MetricsConfig(), ports=[port]) is None
        assert serve_metrics(reg, MetricsConfig(enabled=False), ports=[0]) is None
    finally:
        first.stop()


# ---- engine queue time -------------------------------------------------------------------
def test_scheduler_stamps_first_scheduled_time():
    s = Scheduler(SchedulerConfig(), KVCacheManager(16, 4, hash_seed("m", "float32", 4)))
    r = Request("a", [1, 2, 3], SamplingParams(max_tokens=2), arrival_time=time.monotonic() - 0.5)
    s.add(r)
    assert r.queue_time is None
    s.schedule()
    assert 0.5 <= r.queue_time < 5


def test_token_chunk_merge_keeps_the_queue_time():
    a = TokenChunk("a", [1], queue_time_s=0.25)
    assert a.merge(TokenChunk("a", [2])).queue_time_s == 0.25
    assert TokenChunk("a", [1]).merge(TokenChunk("a", [2], queue_time_s=0.5)).queue_time_s == 0.5


def test_token_chunk_merge_keeps_the_earliest_emission_stamp():
    assert TokenChunk("a", [1], emitted_at=10.0).merge(TokenChunk("a", [2], emitted_at=11.0)).emitted_at == 10.0
    assert TokenChunk("a", [1], emitted_at=11.0).merge(TokenChunk("a", [2], emitted_at=10.0)).emitted_at == 10.0
    assert TokenChunk("a", [1]).merge(TokenChunk("a", [2], emitted_at=11.0)).emitted_at == 11.0
    assert TokenChunk("a", [1], emitted_at=10.0).merge(TokenChunk("a", [], finish_reason="abort")).emitted_at == 10.0


def test_engine_step_stamps_its_output(tmp_path):
    from services.engine import LLM
    from services.engine.make_model import make_model

    eng = LLM(str(make_model("tiny-llama", tmp_path / "m")), device="cpu", kv_cache_memory_gb=0.01).engine
    for rid in ("a", "b"):
        eng.add_request([1, 2, 3], SamplingParams(max_tokens=2, temperature=0), request_id=rid)
    before = time.time()
    chunks = eng.step()
    assert len(chunks) == 2 and before <= chunks[0].emitted_at == chunks[1].emitted_at <= time.time()


def test_decode_span_has_a_draft_event_per_message_with_drafts(spans):
    exporter, tracer = spans

    class Speculating(FakeWorker):
        @traced_stream("decode")
        async def decode(self, call):
            yield StreamChunk([6], num_output_tokens=2)
            yield StreamChunk([7, 8, 9], num_output_tokens=5, num_drafts=1, num_draft_tokens=3,
                              num_accepted_draft_tokens=2)
            yield StreamChunk([10], num_output_tokens=6, num_drafts=2, num_draft_tokens=6, num_accepted_draft_tokens=2)
            yield StreamChunk([11, 12, 13, 14, 15], num_output_tokens=11, num_drafts=4, num_draft_tokens=12,
                              num_accepted_draft_tokens=5, finish_reason="length")  # two steps in one message

    w = Speculating(WorkerTelemetry(Identity("m", "decode", "d0"), tracer=tracer))
    call = gen_call()
    kv = KVHandle("fake", call.request_id, 5, 1, 16, "float32", (2, 2, 1, 16, 1, 2))
    drain(w.decode(DecodeCall(call, 5, None, kv)))
    (span,) = by_name(exporter)["tandem.decode"]
    events = [dict(e.attributes) for e in span.events if e.name == "tandem.draft"]
    assert events == [
        {"tandem.draft.steps": 1, "tandem.draft.tokens": 3, "tandem.draft.accepted_tokens": 2,
         "tandem.draft.emitted_tokens": 3},
        {"tandem.draft.steps": 1, "tandem.draft.tokens": 3, "tandem.draft.accepted_tokens": 0,
         "tandem.draft.emitted_tokens": 1},
        {"tandem.draft.steps": 2, "tandem.draft.tokens": 6, "tandem.draft.accepted_tokens": 3,
         "tandem.draft.emitted_tokens": 5}]
    assert (span.attributes["tandem.draft.steps"], span.attributes["tandem.draft.tokens"],
            span.attributes["tandem.draft.accepted_tokens"]) == (4, 12, 5)
