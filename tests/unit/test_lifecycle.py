"""The request lifecycle (router/lifecycle.py) and the error kinds without Ray: a fake pipeline
stands in for the workers; a fake tokenizer for the model's."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from ray import exceptions as ray_exc
from ray.serve import exceptions as serve_exc

from protos.tandem.v1 import generation_pb2 as pb
from router.errors import ErrorKind, RequestError, classify
from router.lifecycle import AdmissionLimits, RequestLifecycle
from router.servicer import REPLICA_HINT_KEY, generate_input, grpc_status, status_for
from router.validation import MAX_REQUEST_ID, GenerateInput, Limits, RequestValidator
from services.engine.scheduler import EngineOverloadedError
from services.telemetry.metrics import Identity
from services.telemetry.router_telemetry import RouterTelemetry
from services.types import KVTransferError, ModelInfo, PrefillFailedError, StreamChunk

LABELS = {"model": "m", "role": "router", "replica": "r0"}


# ---- error kinds ---------------------------------------------------------------------------
def _in_replica(exc: BaseException) -> BaseException:
    """``exc`` as Ray re-raises it in the caller when a replica raised it."""
    return ray_exc.RayTaskError("submit", "Traceback ...", exc).as_instanceof_cause()


@pytest.mark.parametrize("exc,kind,message", [
    (ValueError("top_p: bad\nTraceback..."), ErrorKind.INVALID_ARGUMENT, "top_p: bad"),
    (_in_replica(ValueError("prompt: too long")), ErrorKind.INVALID_ARGUMENT, "prompt: too long"),
    (EngineOverloadedError("queue full"), ErrorKind.RESOURCE_EXHAUSTED, "queue full"),
    (_in_replica(EngineOverloadedError("queue full")), ErrorKind.RESOURCE_EXHAUSTED, "queue full"),
    (serve_exc.BackPressureError(num_queued_requests=9, max_queued_requests=8), ErrorKind.RESOURCE_EXHAUSTED, None),
    (TimeoutError(), ErrorKind.DEADLINE_EXCEEDED, "deadline exceeded"),
    (_in_replica(TimeoutError()), ErrorKind.DEADLINE_EXCEEDED, "deadline exceeded"),
    (asyncio.CancelledError(), ErrorKind.CANCELLED, "request cancelled"),
    (serve_exc.RequestCancelledError("r1"), ErrorKind.CANCELLED, "request cancelled"),
    (ray_exc.TaskCancelledError(), ErrorKind.CANCELLED, "request cancelled"),
    (KVTransferError("lost"), ErrorKind.UNAVAILABLE, "no worker could serve the request: KVTransferError"),
    (_in_replica(KVTransferError("lost")), ErrorKind.UNAVAILABLE, "no worker could serve the request: KVTransferError"),
    (ConnectionError("channel broke"), ErrorKind.UNAVAILABLE, "no worker could serve the request: ConnectionError"),
    (ray_exc.RayActorError(), ErrorKind.UNAVAILABLE, "no worker could serve the request: RayActorError"),
    (ray_exc.WorkerCrashedError(), ErrorKind.UNAVAILABLE, None),
    (PrefillFailedError("prefill of 'r1' failed: RuntimeError: x"), ErrorKind.INTERNAL,
     "prefill of 'r1' failed: RuntimeError: x"),
    (RuntimeError("boom"), ErrorKind.INTERNAL, "internal error while serving request 'r1'"),
    (RequestError(ErrorKind.NOT_FOUND, "model: 'x' is not served here"), ErrorKind.NOT_FOUND,
     "model: 'x' is not served here"),
])
def test_each_exception_has_its_kind_and_a_one_line_message(exc, kind, message):
    err = classify(exc, "r1")
    assert err.kind == kind
    if message is not None:
        assert err.message == message
    assert "Traceback" not in err.message and "\n" not in err.message


def test_every_kind_has_its_grpc_status():
    for kind in ErrorKind:
        code = grpc_status(kind)
        assert code.name == kind.name and code.value[0] == kind.value  # the canonical code numbers
    assert status_for(EngineOverloadedError("queue full")) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    assert RequestError(ErrorKind.UNAVAILABLE, "x").code == grpc.StatusCode.UNAVAILABLE


# ---- the lifecycle with a fake pipeline -----------------------------------------------------
class FakeResponse:
    """What a Serve handle call is to ``Control``: something to cancel."""

    def __init__(self):
        self.cancelled = asyncio.Event()

    def cancel(self):
        self.cancelled.set()


class FakePipeline:
    """Yields ``chunks``, then raises ``error``, or (``hang``) waits until its call is cancelled
    and raises CancelledError as a cancelled handle call does on the router. Chunks only, no
    finish: every request here ends by abort, deadline, error or cancel unless ``chunks`` finish it."""

    def __init__(self, chunks=(), error: BaseException | None = None, hang: bool = False):
        self.chunks, self.error, self.hang = list(chunks), error, hang
        self.calls, self.responses = [], []
        self.started = asyncio.Event()

    async def run(self, call, ctl):
        self.calls.append(call)
        ctl.routed["unified"] = "u0"
        response = FakeResponse()
        self.responses.append(response)
        ctl.attach(response)
        try:
            for c in self.chunks:
                yield c
            self.started.set()
            if self.error is not None:
                raise self.error
            if self.hang:
                await response.cancelled.wait()
                raise asyncio.CancelledError()
        finally:  # as router/channels.py does: a call left early is cancelled
            ctl.detach(response)
            response.cancel()


class FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) % 500 + 2 for c in text]


def lifecycle(pipeline, max_inflight=8) -> RequestLifecycle:
    info = ModelInfo("m", max_model_len=256, vocab_size=512, eos_token_ids=(1,), block_size=16)
    validator = RequestValidator(info, FakeTokenizer(), Limits(max_prompt_bytes=4096))
    return RequestLifecycle(pipeline, validator, AdmissionLimits(max_inflight), RouterTelemetry(Identity("m", "router", "r0")))


def failed(lc: RequestLifecycle, code: str) -> float:
    return lc.telemetry.metrics.registry.get_sample_value("tandem_requests_failed_total", {**LABELS, "code": code})


def run(coro, timeout_s: float = 10.0):
    """Run a test's coroutine; a request that never ends (an abort or deadline that did not
    cancel its call) fails the test instead of hanging it."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


async def drain(live) -> list[StreamChunk]:
    return [c async for c in live.stream()]


CHUNKS = [StreamChunk([7], "a", num_cached_tokens=16, num_output_tokens=1),
          StreamChunk([8, 9], "bc", num_cached_tokens=16, num_output_tokens=3),
          StreamChunk([10], "d", finish_reason="length", num_cached_tokens=16, num_output_tokens=4)]


def test_a_request_streams_its_chunks_and_counts_its_usage():
    async def main():
        lc = lifecycle(FakePipeline(CHUNKS))
        live = lc.start(GenerateInput(prompt_token_ids=[5, 6, 7], request_id="r1", priority=2))
        got = await drain(live)
        return lc, live, got

    lc, live, got = run(main())
    assert got == CHUNKS and live.request_id == "r1" and live.routed == {"unified": "u0"}
    assert (live.usage.prompt_tokens, live.usage.completion_tokens, live.usage.cached_prompt_tokens) == (3, 4, 16)
    (call,) = lc.pipeline.calls
    assert call.request_id == "r1" and call.prompt_token_ids == [5, 6, 7] and call.priority == 2
    assert lc.num_inflight == 0
    assert lc.telemetry.metrics.registry.get_sample_value(
        "tandem_requests_finished_total", {**LABELS, "finish_reason": "length"}) == 1


def test_request_ids_are_generated_when_absent_and_bounded():
    async def main():
        lc = lifecycle(FakePipeline(CHUNKS))
        generated = lc.start(GenerateInput(prompt_token_ids=[5]))
        await drain(generated)
        longest = lc.start(GenerateInput(prompt_token_ids=[5], request_id="x" * MAX_REQUEST_ID))
        await drain(longest)
        with pytest.raises(RequestError) as info:
            await drain(lc.start(GenerateInput(prompt_token_ids=[5], request_id="x" * (MAX_REQUEST_ID + 1))))
        return lc, generated, info.value

    lc, generated, err = run(main())
    assert len(generated.request_id) == 32 and lc.pipeline.calls[0].request_id == generated.request_id
    assert lc.pipeline.calls[1].request_id == "x" * MAX_REQUEST_ID and len(lc.pipeline.calls) == 2
    assert err.kind == ErrorKind.INVALID_ARGUMENT and err.message == "request_id: longer than 256 characters"
    assert failed(lc, "INVALID_ARGUMENT") == 1


def test_a_duplicate_request_id_is_rejected_while_the_first_runs():
    async def main():
        pipeline = FakePipeline([CHUNKS[0]], hang=True)
        lc = lifecycle(pipeline)
        first = asyncio.create_task(drain(lc.start(GenerateInput(prompt_token_ids=[5], request_id="dup"))))
        await pipeline.started.wait()
        with pytest.raises(RequestError) as info:
            await drain(lc.start(GenerateInput(prompt_token_ids=[6], request_id="dup")))
        assert lc.abort("dup")
        return lc, info.value, await first

    lc, err, first = run(main())
    assert err.kind == ErrorKind.INVALID_ARGUMENT and err.message == "request_id: 'dup' is already in use"
    assert len(lc.pipeline.calls) == 1  # the duplicate never reached the workers
    assert first[-1].finish_reason == "abort" and "dup" not in lc.inflight  # the id is free again


def test_admission_limit_gives_resource_exhausted():
    async def main():
        pipeline = FakePipeline(hang=True)
        lc = lifecycle(pipeline, max_inflight=2)
        running = [asyncio.create_task(drain(lc.start(GenerateInput(prompt_token_ids=[5], request_id=f"r{i}"))))
                   for i in range(2)]
        while lc.num_inflight < 2:
            await asyncio.sleep(0)
        with pytest.raises(RequestError) as info:
            await drain(lc.start(GenerateInput(prompt_token_ids=[5], request_id="r2")))
        for i in range(2):
            lc.abort(f"r{i}")
        await asyncio.gather(*running)
        return lc, info.value

    lc, err = run(main())
    assert err.kind == ErrorKind.RESOURCE_EXHAUSTED
    assert err.message == "router at its limit of 2 requests in flight"
    assert len(lc.pipeline.calls) == 2 and lc.num_inflight == 0 and failed(lc, "RESOURCE_EXHAUSTED") == 1


def test_abort_ends_the_stream_with_an_abort_chunk_and_the_usage_so_far():
    async def main():
        pipeline = FakePipeline(CHUNKS[:2], hang=True)
        lc = lifecycle(pipeline)
        live = lc.start(GenerateInput(prompt_token_ids=[5, 6], request_id="a"))
        task = asyncio.create_task(drain(live))
        await pipeline.started.wait()
        found, unknown = lc.abort("a"), lc.abort("nope")
        return lc, live, await task, found, unknown

    lc, live, got, found, unknown = run(main())
    assert found and not unknown
    assert [c.finish_reason for c in got] == [None, None, "abort"]
    assert (got[-1].num_output_tokens, got[-1].num_cached_tokens) == (3, 16)
    assert (live.usage.prompt_tokens, live.usage.completion_tokens, live.usage.cached_prompt_tokens) == (2, 3, 16)
    assert lc.num_inflight == 0
    assert lc.telemetry.metrics.registry.get_sample_value(
        "tandem_requests_finished_total", {**LABELS, "finish_reason": "abort"}) == 1


def test_a_passed_deadline_cancels_the_calls_and_gives_deadline_exceeded():
    async def main():
        lc = lifecycle(FakePipeline([CHUNKS[0]], hang=True))
        live = lc.start(GenerateInput(prompt_token_ids=[5], deadline=time.time() + 0.05))
        got = []
        start = time.monotonic()
        with pytest.raises(RequestError) as info:
            async for chunk in live.stream():
                got.append(chunk)
        return lc, got, info.value, time.monotonic() - start

    lc, got, err, took = run(main())
    assert got == [CHUNKS[0]] and err.kind == ErrorKind.DEADLINE_EXCEEDED and err.message == "deadline exceeded"
    assert 0.04 <= took < 2 and lc.num_inflight == 0
    assert lc.pipeline.calls[0].deadline is not None  # the workers stop on their own too
    assert failed(lc, "DEADLINE_EXCEEDED") == 1


def test_a_worker_failure_is_one_kind_and_frees_the_request():
    async def main():
        lc = lifecycle(FakePipeline([CHUNKS[0]], error=KVTransferError("lost")))
        with pytest.raises(RequestError) as info:
            await drain(lc.start(GenerateInput(prompt_token_ids=[5])))
        return lc, info.value

    lc, err = run(main())
    assert err.kind == ErrorKind.UNAVAILABLE and isinstance(err.__cause__, KVTransferError)
    assert lc.num_inflight == 0 and failed(lc, "UNAVAILABLE") == 1


def test_bad_input_fails_before_any_worker_sees_it():
    async def main():
        lc = lifecycle(FakePipeline(CHUNKS))
        errors = []
        for request in (GenerateInput(), GenerateInput(prompt="hi", model="other"),
                        GenerateInput(prompt="hi", sampling=generate_input(
                            pb.GenerateRequest(sampling=pb.SamplingParams(top_p=1.5))).sampling)):
            with pytest.raises(RequestError) as info:
                await drain(lc.start(request))
            errors.append(info.value)
        return lc, errors

    lc, errors = run(main())
    assert [(e.kind, e.message.split(":")[0]) for e in errors] == [
        (ErrorKind.INVALID_ARGUMENT, "prompt"), (ErrorKind.NOT_FOUND, "model"),
        (ErrorKind.INVALID_ARGUMENT, "sampling.top_p")]
    assert lc.pipeline.calls == [] and lc.num_inflight == 0


def test_a_cancelled_client_propagates_and_counts_as_cancelled():
    async def main():
        pipeline = FakePipeline([CHUNKS[0]], hang=True)
        lc = lifecycle(pipeline)
        task = asyncio.create_task(drain(lc.start(GenerateInput(prompt_token_ids=[5]))))
        await pipeline.started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return lc

    lc = run(main())
    assert lc.num_inflight == 0
    assert failed(lc, "CANCELLED") == 1


def test_tokenize_checks_the_model_and_the_text():
    async def main():
        lc = lifecycle(FakePipeline())
        ids = await lc.tokenize("hi", "m")
        kinds = []
        for text, model in (("", ""), ("hi", "other")):
            with pytest.raises(RequestError) as info:
                await lc.tokenize(text, model)
            kinds.append(info.value.kind)
        return ids, kinds

    ids, kinds = run(main())
    assert ids == FakeTokenizer().encode("hi") and kinds == [ErrorKind.INVALID_ARGUMENT, ErrorKind.NOT_FOUND]


# ---- the gRPC adapter's conversion -----------------------------------------------------------
def test_generate_input_from_a_grpc_request_and_its_metadata():
    request = pb.GenerateRequest(prompt_token_ids=[5, 6], request_id="r", priority=3, model="m",
                                 sampling=pb.SamplingParams(max_tokens=4, temperature=0, stop=["x"], seed=9))
    metadata = ((REPLICA_HINT_KEY, "p1"), ("traceparent", "00-abc-def-01"), ("tracestate", "k=v"))
    got = generate_input(request, 123.0, metadata)
    assert (got.prompt, got.prompt_token_ids, got.request_id, got.priority, got.model) == ("", [5, 6], "r", 3, "m")
    assert (got.deadline, got.replica_hint, got.traceparent, got.tracestate) == (123.0, "p1", "00-abc-def-01", "k=v")
    s = got.sampling
    assert (s.max_tokens, s.temperature, s.seed, s.stop, s.top_p, s.logprobs) == (4, 0.0, 9, ("x",), None, None)
    assert generate_input(pb.GenerateRequest(prompt="hi")).sampling == type(s)()  # nothing set: all defaults
