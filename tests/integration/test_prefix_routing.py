"""Prefix-aware routing over real Ray Serve + gRPC: two unified replicas, local prefix cache only.

Which replica served a request is read from the reply's trailing metadata
(``x-tandem-replica``); a request is pinned with the same key in its request metadata.
"""

import asyncio
import time

import grpc
import pytest

from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from router.replica_router import STATS_PERIOD_S
from tests.integration.contract import long_request
from tests.integration.helpers import TINY_ENGINE, request, serve_app, tokens, wait_all_free, worker_stats

KEY = "x-tandem-replica"
PREFIX = [(11 * i) % 480 + 20 for i in range(96)]  # 6 full blocks of 16


@pytest.fixture(scope="module")
def address(tiny_model):
    with serve_app("local.yaml", tiny_model, {"engine": TINY_ENGINE},
                   deployments={"UnifiedWorker": {"num_replicas": 2}}) as addr:
        yield addr


def replica_ids(address: str) -> list[str]:
    end = time.monotonic() + 30
    while True:
        ids = sorted({s.replica_id for s in worker_stats(address) if s.role == "unified"})
        if len(ids) == 2:
            return ids
        assert time.monotonic() < end, f"expected 2 unified replicas, saw {ids}"
        time.sleep(0.5)


async def generate(stub, req, hint: str = ""):
    """(responses, replica that served) of one request."""
    call = stub.Generate(req, timeout=60, metadata=((KEY, hint),) if hint else None)
    got = [r async for r in call]
    served = dict(await call.trailing_metadata() or ()).get(KEY, "")
    return got, served


def suffixed(i: int, **kw):
    return request(ids=PREFIX + [400 + i, 401 + i, 402 + i], max_tokens=4, temperature=0, ignore_eos=True, **kw)


def test_requests_go_where_their_prefix_is_cached_until_that_replica_is_saturated(address):
    first, second = replica_ids(address)

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            # 1. the hint pins the prefix onto `second`; the trailers say where it ran
            got, served = await generate(stub, suffixed(0), hint=second)
            assert served == second and len(tokens(got)) == 4
            await asyncio.sleep(3 * STATS_PERIOD_S + 1)  # replicas report cached blocks per interval

            # 2. loads balanced (both idle): every request sharing the prefix goes to `second`
            #    (without prefix knowledge the tie-break would alternate between the replicas)
            placed = []
            for i in range(1, 5):
                got, served = await generate(stub, suffixed(i))
                placed.append(served)
                assert got[-1].usage.cached_prompt_tokens >= 96 - 16, got[-1].usage
            assert placed == [second] * 4

            # 3. `second` saturated (long streams pinned to it): the prefix request goes to `first`
            hogs = [asyncio.ensure_future(generate(stub, long_request(), hint=second)) for _ in range(12)]
            try:
                await asyncio.sleep(1.0)
                got, served = await generate(stub, suffixed(9))
                assert served == first and len(tokens(got)) == 4
                assert got[-1].usage.cached_prompt_tokens == 0  # cold on `first`: computed there
            finally:
                for h in hogs:
                    h.cancel()
                await asyncio.gather(*hogs, return_exceptions=True)

    asyncio.run(main())
    wait_all_free(address)


def test_unknown_hint_is_ignored(address):
    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            return await generate(pb_grpc.GenerationStub(channel), suffixed(20), hint="no-such-replica")

    got, served = asyncio.run(main())
    assert len(tokens(got)) == 4 and served in replica_ids(address)
