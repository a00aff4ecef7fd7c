"""A seeded protobuf fuzz of every method over a real gRPC channel to a real Serve app
(deploy/local.yaml, unified mode): the corpus of tests/integration/fuzz_cases.py, sent as raw
bytes (identity serializers), 8 calls at a time.

Every answer is a clean status (OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED,
DEADLINE_EXCEEDED): never UNKNOWN, INTERNAL or UNAVAILABLE, never a message naming an exception
class, a traceback or an echoed value of thousands of characters; every OK stream ends with a
finish reason. Afterwards no Serve replica has been replaced (no process died), every KV block
is free and a normal request gets its tokens. `make test` runs 500 cases; `make test-faults`
(marker ``faults``) 20,000 more with another seed.
"""

from __future__ import annotations

import asyncio
import collections
import time

import grpc
import pytest
import ray

from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.fuzz_cases import Case, cases
from tests.integration.helpers import TINY_ENGINE, request, serve_app, tokens, wait_all_free, worker_stats

CLEAN = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
LEAKS = ("Traceback", "Unexpected", "<class", "DecodeError", "Error parsing", "Exception")
MAX_DETAILS = 600  # characters: router/errors.py caps messages at 512
CONCURRENCY = 8
CALL_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def address(tiny_model):
    with serve_app("local.yaml", tiny_model, {"engine": TINY_ENGINE}) as addr:
        yield addr


def _model_id(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_id


def _replica_actors() -> set[str]:
    """Names of the Serve replica actors now alive (a replaced replica gets a new name)."""
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]}


async def _send(channel: grpc.aio.Channel, case: Case) -> tuple[grpc.StatusCode, str, list[bytes]]:
    try:
        if case.streaming:
            call = channel.unary_stream(case.method)(case.payload, timeout=CALL_TIMEOUT_S)
            return grpc.StatusCode.OK, "", [r async for r in call]
        return grpc.StatusCode.OK, "", [await channel.unary_unary(case.method)(case.payload, timeout=CALL_TIMEOUT_S)]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", []


def _problems(case: Case, code: grpc.StatusCode, details: str, replies: list[bytes]) -> list[str]:
    found = []
    if code not in CLEAN:
        found.append(f"{case.label}: {code.name} {details[:300]!r}")
    if any(leak in details for leak in LEAKS) or len(details) > MAX_DETAILS:
        found.append(f"{case.label}: {code.name} details leak or are long: {details[:300]!r} ({len(details)} chars)")
    if code == grpc.StatusCode.OK and case.method.endswith("/Generate"):
        last = pb.GenerateResponse.FromString(replies[-1]) if replies else None
        if last is None or not last.finish_reason:
            found.append(f"{case.label}: OK stream without a finish reason")
    return found


def fuzz(address: str, seed: int, n: int) -> tuple[collections.Counter, list[str], list[str]]:
    """Send the ``n`` cases of ``seed``; (count per status, problems, distinct INVALID_ARGUMENT prefixes)."""
    corpus = cases(seed, n, _model_id(address))

    async def main():
        counts, problems, invalid = collections.Counter(), [], set()
        gate = asyncio.Semaphore(CONCURRENCY)
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            async def one(case):
                async with gate:
                    code, details, replies = await _send(channel, case)
                counts[code.name] += 1
                problems.extend(_problems(case, code, details, replies))
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    invalid.add(details.split(":", 1)[0])
            await asyncio.gather(*(one(c) for c in corpus))
        return counts, problems, sorted(invalid)

    return asyncio.run(main())


def _check_fuzz(address: str, seed: int, n: int) -> None:
    before = _replica_actors()
    workers_before = {s.replica_id for s in worker_stats(address)}
    start = time.monotonic()
    counts, problems, invalid_fields = fuzz(address, seed, n)
    print(f"fuzz seed={seed} n={n} in {time.monotonic() - start:.1f}s: {dict(counts)}; "
          f"INVALID_ARGUMENT fields: {invalid_fields}")
    assert not problems, "\n".join(problems[:30])
    assert sum(counts.values()) == n
    # the corpus reached the parser, the validator and the engine (not a degenerate corpus)
    assert counts["OK"] >= n // 20 and counts["INVALID_ARGUMENT"] >= n // 4, counts
    assert "request" in invalid_fields and "prompt" in invalid_fields, invalid_fields
    # nothing died, nothing leaked, serving goes on
    assert _replica_actors() == before
    assert {s.replica_id for s in worker_stats(address)} == workers_before
    wait_all_free(address, timeout_s=30)
    with grpc.insecure_channel(address) as channel:
        got = list(pb_grpc.GenerationStub(channel).Generate(
            request(ids=[5, 6, 7], max_tokens=4, temperature=0, ignore_eos=True), timeout=30))
    assert len(tokens(got)) == 4 and got[-1].finish_reason == "length"


def _raw(address: str, method: str, payload: bytes, streaming: bool) -> tuple[grpc.StatusCode, str]:
    async def main():
        async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]) as channel:
            code, details, _ = await _send(channel, Case(method, streaming, payload, method))
            return code, details

    return asyncio.run(main())


GENERATE = "/tandem.v1.Generation/Generate"
PROBES = {  # issue 18's probes: (method, request bytes, streaming) -> (code, details start, details contain)
    "model-16000": (GENERATE, pb.GenerateRequest(prompt="hi", model="x" * 16_000), True,
                    grpc.StatusCode.NOT_FOUND, "model: 'xxx", "(16000 characters)"),
    "tokenize-model-16000": ("/tandem.v1.Generation/Tokenize", pb.TokenizeRequest(text="hi", model="y" * 16_000), False,
                             grpc.StatusCode.NOT_FOUND, "model: 'yyy", "(16000 characters)"),
    "temperature-inf": (GENERATE, request(prompt="hi", temperature=float("inf")), True,
                        grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature: ", "finite"),
    "top_p-nan": (GENERATE, request(prompt="hi", top_p=float("nan")), True,
                  grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: ", "nan"),
    "17-stop-strings": (GENERATE, request(prompt="hi", stop=[f"s{i}" for i in range(17)]), True,
                        grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop: ", "limit of 16"),
    "5MiB-request": (GENERATE, request(prompt="z" * (5 << 20)), True,
                     grpc.StatusCode.INVALID_ARGUMENT, "request: ", "exceeds the limit of 4194304 bytes"),
    "invalid-utf8": (GENERATE, b"\x1a\x02\xff\xfe", True,
                     grpc.StatusCode.INVALID_ARGUMENT, "request: not a valid tandem.v1.GenerateRequest", ""),
    "admin-corrupt": ("/tandem.v1.Admin/GetWorkerStats", b"\x0a\x05ab", False,
                      grpc.StatusCode.INVALID_ARGUMENT, "request: not a valid tandem.v1.GetWorkerStatsRequest", ""),
}


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_issue_probes_get_a_clean_code_and_a_short_message(address, probe):
    method, message, streaming, code, start, contains = PROBES[probe]
    payload = message if isinstance(message, bytes) else message.SerializeToString()
    got_code, details = _raw(address, method, payload, streaming)
    assert (got_code, details[:len(start)]) == (code, start), details[:300]
    assert contains in details and len(details) <= MAX_DETAILS


@pytest.mark.timeout(300)
def test_fuzz_500_seeded_cases_get_only_clean_status_codes(address):
    _check_fuzz(address, seed=18, n=500)


@pytest.mark.faults
@pytest.mark.timeout(1800)
def test_fuzz_20000_more_cases_get_only_clean_status_codes(address):
    _check_fuzz(address, seed=1804, n=20_000)
