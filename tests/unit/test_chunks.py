"""The engine's chunk and the wire's chunk (one merge rule, one field-by-field conversion) and the
typed routing report, without Ray."""

import dataclasses

import pytest

from services.engine.outputs import TokenChunk, merge_chunks
from services.engine.sampling_params import SamplingParams
from services.routing_report import routing_stats
from services.types import RoutingStats, StreamChunk

NOT_ON_THE_WIRE = {"request_id", "stop_reason"}  # the channel keys chunks by id; clients see finish_reason
RENAMED = {"num_imported_cached_tokens": "num_redis_cached_tokens"}


def test_every_engine_field_reaches_the_wire_chunk():
    """A field added to TokenChunk fails here until StreamChunk.from_engine carries it."""
    values = {"request_id": "r", "token_ids": [4, 5], "text": "ab", "logprobs": [{4: -0.5}, {5: -1.5}],
              "finish_reason": "stop", "stop_reason": 2, "num_prompt_tokens": 40, "num_cached_tokens": 32,
              "num_output_tokens": 7, "queue_time_s": 0.25, "num_imported_cached_tokens": 16, "emitted_at": 12.5,
              "num_drafts": 3, "num_draft_tokens": 9, "num_accepted_draft_tokens": 5}
    assert set(values) == {f.name for f in dataclasses.fields(TokenChunk)}
    wire = StreamChunk.from_engine(TokenChunk(**values), traceparent="00-tp")
    for name, value in values.items():
        if name not in NOT_ON_THE_WIRE:
            assert getattr(wire, RENAMED.get(name, name)) == value, name
    assert wire.traceparent == "00-tp" and wire.arrived_at is None


def test_both_chunk_types_merge_by_the_same_rule():
    def pair(**kw):
        return (TokenChunk("r", **kw), StreamChunk(**kw))

    a = pair(token_ids=[1], text="a", logprobs=[{1: -0.1}], num_output_tokens=1, queue_time_s=0.25, emitted_at=11.0)
    b = pair(token_ids=[2, 3], text="bc", finish_reason="length", num_cached_tokens=16, num_output_tokens=3,
             emitted_at=10.0)
    merged = [merge_chunks(x, y) for x, y in zip(a, b)]
    for m in merged:
        assert (m.token_ids, m.text, m.finish_reason, m.num_output_tokens) == ([1, 2, 3], "abc", "length", 3)
        assert m.logprobs == [{1: -0.1}]  # b asked for none: a's only
        assert (m.queue_time_s, m.emitted_at, m.num_cached_tokens) == (0.25, 10.0, 16)
    assert a[0].merge(b[0]) == merged[0]  # the method is the same function
    assert merge_chunks(StreamChunk([1], arrived_at=5.0), StreamChunk([2], arrived_at=4.0)).arrived_at == 4.0
    assert merge_chunks(TokenChunk("r", [1]), TokenChunk("r", [2])).logprobs is None


def test_routing_stats_cross_serve_as_a_plain_dict():
    stats = RoutingStats(load=3, kv_free=17, block_keys=b"\x01" * 16)
    data = stats.as_dict()
    assert {type(v) for v in data.values()} <= {int, bytes}  # Serve's controller unpickles it
    assert RoutingStats.from_dict(data) == stats
    assert RoutingStats.from_dict({}) == RoutingStats.from_dict(None) == RoutingStats(0, 0, b"")


class FakeEngine:
    def __init__(self, hashes):
        self.hashes = hashes
        self.asked = []

    def routing_snapshot(self, max_keys):
        self.asked.append(max_keys)
        stats = dataclasses.make_dataclass("S", ["num_running", "num_waiting", "kv_blocks_free"])(2, 5, 40)
        return stats, self.hashes[-max_keys:] if max_keys else []


def test_routing_report_packs_the_block_keys():
    hashes = [bytes([i]) * 32 for i in range(1, 4)]
    eng = FakeEngine(hashes)
    report = routing_stats(eng, with_keys=True, max_keys=2)
    assert (report.load, report.kv_free) == (7, 40) and eng.asked == [2]
    assert report.block_keys == (int.from_bytes(hashes[1][:8], "little").to_bytes(8, "little")
                                 + int.from_bytes(hashes[2][:8], "little").to_bytes(8, "little"))
    decode = routing_stats(eng, with_keys=False)
    assert decode.block_keys == b"" and eng.asked[-1] == 0


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from services.engine import LLM
    from services.engine.make_model import make_model

    path = make_model("tiny-llama", tmp_path_factory.mktemp("m"))
    return LLM(str(path), device="cpu", kv_cache_memory_gb=0.01, block_size=16).engine


def test_cached_block_hashes_are_the_newest_full_blocks_oldest_first(engine):
    prompt = [(7 * i) % 400 + 3 for i in range(40)]  # two full blocks of 16, and 8 tokens
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0), request_id="a")
    while engine.has_unfinished_requests():
        engine.step()
    chain = engine.prompt_block_hashes(prompt)
    assert len(chain) == 2
    assert engine.cached_block_hashes(10) == chain
    assert engine.cached_block_hashes(1) == chain[1:]
    assert engine.cached_block_hashes(0) == []


def test_async_engine_routing_snapshot_reads_under_the_step_lock(engine):
    from services.engine.async_engine import AsyncEngine

    front = AsyncEngine(engine)
    try:
        stats, hashes = front.routing_snapshot(4)
        assert stats.num_running == stats.num_waiting == 0 and hashes == engine.cached_block_hashes(4)
        assert routing_stats(front, with_keys=True).load == 0
    finally:
        front.shutdown()
