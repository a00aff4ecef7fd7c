"""A minimal OTLP/gRPC trace receiver: the ``TraceService`` of opentelemetry-proto on a socket.

Used by the tracing integration test (keeps every span) and by the tracing-overhead
benchmark (counts spans only), in place of an OpenTelemetry collector.

    python -m bench.otlp_receiver --port 4317      # count spans until Ctrl-C / SIGTERM
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    return getattr(v, kind) if kind else None


def attributes(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class ReceivedSpan:
    """One exported span, flattened."""

    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind (2 = SERVER)
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    attributes: dict
    resource: dict  # resource attributes of the exporting process
    events: list[str] = field(default_factory=list)  # event names
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace_id, span_id)
    start_ns: int = 0
    end_ns: int = 0


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: "OtlpTraceReceiver"):
        self.receiver = receiver

    def Export(self, request, context):
        self.receiver._add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpTraceReceiver:
    """Receive spans on ``127.0.0.1:port`` (0 = a free port); ``keep=False`` only counts them."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, keep: bool = True):
        self.keep = keep
        self._lock = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self.num_spans = 0
        self.num_exports = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise RuntimeError(f"otlp receiver: cannot bind {host}:{port}")
        self.endpoint = f"http://{host}:{self.port}"

    def start(self) -> "OtlpTraceReceiver":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=1).wait()

    def _add(self, request) -> None:
        spans = []
        count = 0
        for rs in request.resource_spans:
            resource = attributes(rs.resource.attributes) if self.keep else {}
            for ss in rs.scope_spans:
                count += len(ss.spans)
                if not self.keep:
                    continue
                for s in ss.spans:
                    spans.append(ReceivedSpan(
                        s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.kind, s.status.code,
                        s.status.message, attributes(s.attributes), resource, [e.name for e in s.events],
                        [(ln.trace_id.hex(), ln.span_id.hex()) for ln in s.links], s.start_time_unix_nano,
                        s.end_time_unix_nano))
        with self._lock:
            self._spans.extend(spans)
            self.num_spans += count
            self.num_exports += 1
            self._lock.notify_all()

    def spans(self, trace_id: str | None = None) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]

    def wait_for(self, predicate, timeout_s: float = 30.0) -> list[ReceivedSpan]:
        """Until ``predicate(spans)`` is true; returns the spans (raises TimeoutError)."""
        end = time.monotonic() + timeout_s
        with self._lock:
            while not predicate(list(self._spans)):
                left = end - time.monotonic()
                if left <= 0:
                    names = sorted({(s.name, s.trace_id[:8]) for s in self._spans})
                    raise TimeoutError(f"spans not received within {timeout_s}s; have {names}")
                self._lock.wait(left)
            return list(self._spans)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4317)
    p.add_argument("--keep", action="store_true", help="keep the spans (default: count only)")
    args = p.parse_args(argv)
    receiver = OtlpTraceReceiver(args.host, args.port, keep=args.keep).start()
    print(f"otlp receiver on {receiver.endpoint}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(10):
            print(f"spans {receiver.num_spans} exports {receiver.num_exports}", flush=True)
    except KeyboardInterrupt:
        pass
    receiver.stop()
    print(f"spans {receiver.num_spans} exports {receiver.num_exports}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
