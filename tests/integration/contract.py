"""What every deployment shape must do, over a real gRPC channel to a real Serve app.

Test modules subclass ``ClusterContract`` and provide the module-scoped fixtures
``address`` (router host:port) and ``tiny_model`` (the served checkpoint).
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from services.engine import LLM, SamplingParams
from tests.integration.helpers import request, run_concurrently, text, tokens, wait_all_free

PROMPTS = ["The for statement", "A class is", "Exceptions are raised when", "import os"]
ID_PROMPTS = [[5, 6, 7, 8], list(range(10, 45)), [99] * 17, list(range(200, 216))]


def long_request(**kw) -> pb.GenerateRequest:
    return request(ids=[7, 8, 9, 10, 11], max_tokens=1900, temperature=0, ignore_eos=True, **kw)


class ClusterContract:
    def test_health_and_reflection(self, address):
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "tandem.v1.Generation"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=5)
            names = {s.name for r in replies for s in r.list_services_response.service}
            assert {"tandem.v1.Generation", "grpc.health.v1.Health"} <= names

    def test_model_info_and_tokenize(self, address, tiny_model):
        from services.engine.tokenizer import Tokenizer

        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            assert info.vocab_size == 512 and info.max_context_length == 2048 and list(info.eos_token_ids) == [1]
            ids = stub.Tokenize(pb.TokenizeRequest(text=PROMPTS[0]), timeout=5).token_ids
            assert list(ids) == Tokenizer(tiny_model).encode(PROMPTS[0])

    def test_greedy_matches_in_process_engine(self, address, tiny_model):
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        want = LLM(tiny_model, device="cpu", num_kv_blocks=256).generate(PROMPTS + ID_PROMPTS, params)
        reqs = [request(prompt=p, max_tokens=24, temperature=0, ignore_eos=True) for p in PROMPTS]
        reqs += [request(ids=p, max_tokens=24, temperature=0, ignore_eos=True) for p in ID_PROMPTS]
        for got, w in zip(run_concurrently(address, reqs), want):
            assert not isinstance(got, Exception), got
            assert tokens(got) == w.token_ids
            assert text(got) == w.text
            last = got[-1]
            assert last.finish_reason == "length" and all(not r.finish_reason for r in got[:-1])
            assert last.usage.prompt_tokens == len(w.prompt_token_ids)
            assert last.usage.completion_tokens == 24

    def test_sampling_options_match_in_process_engine(self, address, tiny_model):
        params = SamplingParams(max_tokens=12, temperature=0.8, top_k=40, seed=123, logprobs=2, ignore_eos=True)
        want = LLM(tiny_model, device="cpu", num_kv_blocks=256).generate([ID_PROMPTS[1]], params)[0]
        got = run_concurrently(address, [request(ids=ID_PROMPTS[1], max_tokens=12, temperature=0.8, top_k=40,
                                                 seed=123, logprobs=2, ignore_eos=True)])[0]
        assert tokens(got) == want.token_ids
        lps = [lp for r in got for lp in r.logprobs]
        assert [lp.token_id for lp in lps] == want.token_ids
        assert all(len(lp.top) >= 2 for lp in lps)

    def test_stop_and_usage_with_prefix_cache(self, address, tiny_model):
        prompt = list(range(20, 60))  # 40 tokens: 2 full blocks of 16 can be reused
        first, second = run_concurrently(address, [request(ids=prompt, max_tokens=5, temperature=0)])[0], None
        second = run_concurrently(address, [request(ids=prompt, max_tokens=5, temperature=0)])[0]
        assert first[-1].usage.prompt_tokens == 40 and second[-1].usage.cached_prompt_tokens == 32
        assert tokens(first) == tokens(second)
        stop_id = tokens(first)[2]
        got = run_concurrently(address, [request(ids=prompt, max_tokens=5, temperature=0, stop_token_ids=[stop_id])])[0]
        assert tokens(got) == tokens(first)[:3] and got[-1].finish_reason == "stop"
        assert got[-1].usage.completion_tokens == 3

    def test_64_concurrent_streams_complete(self, address):
        reqs = [request(ids=[3 + i % 50, 4, 5 + i % 7], max_tokens=8 + i % 5, temperature=0, ignore_eos=True)
                for i in range(64)]
        results = run_concurrently(address, reqs)
        for req, got in zip(reqs, results):
            assert not isinstance(got, Exception), got
            assert got[-1].finish_reason == "length"
            assert len(tokens(got)) == req.sampling.max_tokens == got[-1].usage.completion_tokens
            assert got[-1].usage.prompt_tokens == 3
        wait_all_free(address)

    @pytest.mark.parametrize("kw,code", [
        (dict(prompt="hi", prompt_token_ids=[5]), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="hi", model="no-such-model"), grpc.StatusCode.NOT_FOUND),
        (dict(prompt="hi", sampling=pb.SamplingParams(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="hi", sampling=pb.SamplingParams(top_p=0)), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="hi", sampling=pb.SamplingParams(max_tokens=5000)), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt_token_ids=[5, 100000]), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="x" * (10 << 20)), grpc.StatusCode.INVALID_ARGUMENT),
    ], ids=["both", "neither", "unknown-model", "temperature", "top_p", "too-long", "id-outside-vocab", "10MB"])
    def test_bad_requests_are_rejected_and_serving_goes_on(self, address, kw, code):
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(pb.GenerateRequest(**kw), timeout=30))
            assert info.value.code() == code
            assert "Traceback" not in info.value.details() and info.value.details()
            ok = list(stub.Generate(request(ids=[5, 6], max_tokens=2, temperature=0), timeout=30))
            assert ok[-1].finish_reason
        wait_all_free(address)

    def test_cancel_mid_stream_frees_every_block(self, address):
        with grpc.insecure_channel(address) as channel:
            call = pb_grpc.GenerationStub(channel).Generate(long_request(), timeout=60)
            got = [next(call), next(call)]
            assert tokens(got)
            call.cancel()
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.CANCELLED
        wait_all_free(address, timeout_s=5)

    def test_deadline_expiry_frees_every_block(self, address):
        with grpc.insecure_channel(address) as channel:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                list(pb_grpc.GenerationStub(channel).Generate(long_request(), timeout=1.0))
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - start < 5
        wait_all_free(address, timeout_s=5)

    def test_abort_rpc_ends_the_stream(self, address):
        req = long_request()
        req.request_id = "to-abort"

        async def main():
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.GenerationStub(channel)
                call = stub.Generate(req, timeout=60)
                got = [await call.read()]
                assert (await stub.Abort(pb.AbortRequest(request_id="to-abort"), timeout=10)).found
                while (r := await call.read()) is not grpc.aio.EOF:
                    got.append(r)
                missing = await stub.Abort(pb.AbortRequest(request_id="to-abort"), timeout=10)
                return got, missing.found

        got, found_again = asyncio.run(main())
        assert got[-1].finish_reason == "abort" and not found_again
        assert got[-1].usage.completion_tokens >= 1
        wait_all_free(address, timeout_s=5)


def stream_in_background(address: str, req: pb.GenerateRequest):
    """Start a stream in a thread; returns (thread, result dict with 'responses' or 'error')."""
    out: dict = {"responses": []}

    def run():
        with grpc.insecure_channel(address) as channel:
            try:
                for r in pb_grpc.GenerationStub(channel).Generate(req, timeout=60):
                    out["responses"].append(r)
            except grpc.RpcError as exc:
                out["error"] = exc
                out["error_time"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out
