"""One OpenTelemetry trace per request across processes (deploy/pd.yaml, real OTLP/gRPC receiver).

The cluster's processes get the standard ``OTEL_*`` variables through the environment the
local Ray head is started with (every Ray worker process inherits it), export with the SDK's
OTLP/gRPC exporter to ``bench.otlp_receiver`` (opentelemetry-proto's TraceService on a
socket), and the test reads the spans as a collector would.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import grpc
import pytest

from bench.otlp_receiver import OtlpTraceReceiver
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.helpers import TINY_ENGINE, environment, free_port, request

SERVER, ERROR = 2, 2  # Span.SpanKind.SPAN_KIND_SERVER, Status.STATUS_CODE_ERROR


def otel_env(endpoint: str) -> dict:
    return {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "1.0", "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": "tandem-test",
            "TANDEM_METRICS_PORT": str(free_port())}


@pytest.fixture(scope="module")
def cluster(tiny_model):
    from tests.integration.helpers import serve_app

    receiver = OtlpTraceReceiver().start()
    try:
        with environment(**otel_env(receiver.endpoint)), serve_app("pd.yaml", tiny_model,
                                                                    {"engine": TINY_ENGINE}) as address:
            yield address, receiver, Path(tiny_model).name
    finally:
        receiver.stop()


def generate(address: str, req, metadata=()):
    """Send one request; returns (responses or the RpcError, trailing metadata as a dict)."""

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            call = pb_grpc.GenerationStub(channel).Generate(req, metadata=metadata, timeout=60)
            try:
                got = [r async for r in call]
            except grpc.aio.AioRpcError as exc:
                got = exc
            return got, dict(await call.trailing_metadata() or ())

    return asyncio.run(main())


def new_traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def one(spans, name, **attrs):
    found = [s for s in spans if s.name == name and all(s.attributes.get(k) == v for k, v in attrs.items())]
    assert len(found) == 1, f"{len(found)} spans {name} {attrs}: {[(s.name, s.attributes) for s in spans]}"
    return found[0]


WANTED = {"tandem.generate", "tandem.route", "tandem.prefix_cache.lookup", "tandem.prefill", "tandem.kv_transfer",
          "tandem.decode"}


def test_one_trace_across_router_prefill_and_decode(cluster):
    address, receiver, model_id = cluster
    traceparent, trace_id, client_span = new_traceparent()
    got, trailing = generate(address, request(ids=list(range(30, 70)), max_tokens=6, temperature=0.5, top_p=0.9,
                                              seed=7, ignore_eos=True), [("traceparent", traceparent)])
    assert not isinstance(got, Exception), got
    assert sum(len(r.token_ids) for r in got) == 6
    assert trailing.get("x-trace-id") == trace_id

    def complete(spans):
        mine = [s for s in spans if s.trace_id == trace_id]
        return WANTED <= {s.name for s in mine} and sum(s.name == "tandem.kv_transfer" for s in mine) == 2

    receiver.wait_for(complete, timeout_s=30)
    spans = receiver.spans(trace_id)
    root = one(spans, "tandem.generate")
    route, prefill, decode = one(spans, "tandem.route"), one(spans, "tandem.prefill"), one(spans, "tandem.decode")
    lookup = one(spans, "tandem.prefix_cache.lookup")
    send = one(spans, "tandem.kv_transfer", **{"tandem.kv.direction": "send"})
    fetch = one(spans, "tandem.kv_transfer", **{"tandem.kv.direction": "fetch"})

    # parent links: client -> generate -> {route, prefill, decode}; prefill -> {lookup, send}; decode -> fetch
    assert root.kind == SERVER and root.parent_span_id == client_span
    for child in (route, prefill, decode):
        assert child.parent_span_id == root.span_id, child.name
    assert lookup.parent_span_id == prefill.span_id and send.parent_span_id == prefill.span_id
    assert fetch.parent_span_id == decode.span_id and (trace_id, send.span_id) in fetch.links

    # three processes: router, prefill replica, decode replica
    roles = {s.name: s.resource.get("tandem.role") for s in (root, prefill, decode)}
    assert roles == {"tandem.generate": "router", "tandem.prefill": "prefill", "tandem.decode": "decode"}
    pids = {root.resource["process.pid"], prefill.resource["process.pid"], decode.resource["process.pid"]}
    assert len(pids) == 3 and os.getpid() not in pids
    assert lookup.resource["process.pid"] == send.resource["process.pid"] == prefill.resource["process.pid"]
    assert fetch.resource["process.pid"] == decode.resource["process.pid"]
    assert root.resource["service.name"] == "tandem-test"
    assert prefill.attributes["tandem.replica_id"] == prefill.resource["service.instance.id"]

    # GenAI semantic conventions + tandem.*
    a = root.attributes
    assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.request.model"] == model_id
    assert a["gen_ai.request.max_tokens"] == 6 and a["gen_ai.request.temperature"] == pytest.approx(0.5)
    assert a["gen_ai.request.top_p"] == pytest.approx(0.9) and a["gen_ai.request.seed"] == 7
    assert a["gen_ai.usage.input_tokens"] == 40 and a["gen_ai.usage.output_tokens"] == 6
    assert a["gen_ai.response.finish_reasons"] == ("length",) and a["tandem.ttft_s"] > 0
    assert a["rpc.system"] == "grpc" and a["rpc.grpc.status_code"] == 0 and root.status_code != ERROR
    assert prefill.attributes["gen_ai.usage.input_tokens"] == 40 and "tandem.queue_time_s" in prefill.attributes
    assert prefill.attributes["gen_ai.request.model"] == a["gen_ai.request.model"]
    assert decode.attributes["gen_ai.usage.output_tokens"] == 5  # the first token came from prefill
    assert decode.attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert send.attributes["tandem.kv.bytes"] == fetch.attributes["tandem.kv.bytes"] > 0
    # spans nest in time
    assert root.start_ns <= prefill.start_ns <= prefill.end_ns <= decode.end_ns <= root.end_ns


def test_a_trace_starts_at_the_router_without_client_context(cluster):
    address, receiver, _ = cluster
    got, trailing = generate(address, request(ids=[5, 6, 7, 8], max_tokens=2, temperature=0))
    assert not isinstance(got, Exception), got
    trace_id = trailing["x-trace-id"]
    assert len(trace_id) == 32
    receiver.wait_for(lambda spans: {"tandem.generate", "tandem.prefill"} <=
                      {s.name for s in spans if s.trace_id == trace_id}, timeout_s=30)
    assert one(receiver.spans(trace_id), "tandem.generate").parent_span_id == ""


def test_failed_request_span_has_error_status(cluster):
    address, receiver, _ = cluster
    traceparent, trace_id, client_span = new_traceparent()
    got, trailing = generate(address, request(ids=[10 ** 9], max_tokens=2), [("traceparent", traceparent)])
    assert isinstance(got, grpc.aio.AioRpcError) and got.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailing.get("x-trace-id") == trace_id
    receiver.wait_for(lambda spans: any(s.trace_id == trace_id and s.name == "tandem.generate" for s in spans))
    root = one(receiver.spans(trace_id), "tandem.generate")
    assert root.status_code == ERROR and "INVALID_ARGUMENT" in root.status_message
    assert "exception" in root.events and root.attributes["rpc.grpc.status_code"] == 3
    assert root.parent_span_id == client_span
