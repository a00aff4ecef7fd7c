"""The asyncio engine: streaming chunks, concurrent requests, abort frees blocks at once."""

import asyncio

import pytest

from services.engine import AsyncEngine, LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def path(model_dir):
    return model_dir("tiny-llama")


@pytest.fixture(scope="module")
def engine(path):
    eng = AsyncEngine.from_model(path, device="cpu", num_kv_blocks=64, block_size=8)
    yield eng
    eng.shutdown()


async def collect(stream):
    chunks = [c async for c in stream]
    return chunks


def test_streams_match_offline_generation(engine, path):
    prompts = [[5, 6, 7, 8], list(range(10, 40)), [99] * 9]
    expected = LLM(path, device="cpu", num_kv_blocks=64).generate(prompts, GREEDY)

    async def main():
        streams = [engine.add_request(p, GREEDY) for p in prompts]
        return await asyncio.gather(*(collect(s) for s in streams))

    results = asyncio.run(main())
    for chunks, want in zip(results, expected):
        assert [t for c in chunks for t in c.token_ids] == want.token_ids
        assert "".join(c.text for c in chunks) == want.text
        assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
        assert chunks[-1].num_output_tokens == 16 and chunks[-1].num_prompt_tokens == len(want.prompt_token_ids)
    assert engine.stats().kv_blocks_free == 64


def test_abort_frees_blocks_and_ends_stream(engine):
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)

    async def main():
        stream = engine.add_request(list(range(3, 30)), params, request_id="victim")
        first = await stream.__anext__()
        assert first.token_ids
        assert engine.abort("victim")
        rest = [c async for c in stream]
        return rest

    rest = asyncio.run(main())
    assert rest[-1].finish_reason == "abort"
    stats = engine.stats()
    assert stats.kv_blocks_free == 64 and stats.num_running == 0


def test_leaving_the_stream_aborts(engine):
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)

    async def main():
        stream = engine.add_request(list(range(3, 30)), params)
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(main())
    assert engine.stats().kv_blocks_free == 64


def test_bad_request_raises_immediately(engine):
    async def main():
        with pytest.raises(ValueError, match="prompt_token_ids"):
            engine.add_request([1, 10**8], GREEDY)
        return await collect(engine.add_request([4, 5], SamplingParams(max_tokens=2, temperature=0)))

    assert asyncio.run(main())[-1].finish_reason == "length"
