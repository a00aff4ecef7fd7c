"""The token channel's two ends without Ray: worker outboxes (services/stream_channel.py) and
router inboxes (router/channels.py)."""

import asyncio
import time
from types import SimpleNamespace

import pytest

from router.channels import Inbox, ReplicaLink
from services.stream_channel import ChannelHub, Outbox, merge_chunks
from services.types import ChunkBatch, Route, StreamChunk, WrongReplicaError


def chunk(ids, text="", finish=None, n=0, lp=None):
    return StreamChunk(list(ids), text, lp, finish, 3, 1, n)


def test_merge_keeps_order_and_the_later_counters():
    m = merge_chunks(chunk([1], "a", n=1, lp=[{1: -0.1}]), chunk([2, 3], "bc", "length", n=3, lp=[{2: -1}, {3: -2}]))
    assert (m.token_ids, m.text, m.finish_reason, m.num_output_tokens) == ([1, 2, 3], "abc", "length", 3)
    assert m.logprobs == [{1: -0.1}, {2: -1}, {3: -2}]


def test_merge_keeps_the_tier_split_and_the_first_queue_time():
    first = StreamChunk([1], "a", None, None, 40, 32, 1, "", num_redis_cached_tokens=16, queue_time_s=0.25)
    later = StreamChunk([2], "b", None, "stop", 40, 32, 2, "", num_redis_cached_tokens=16)
    m = merge_chunks(first, later)
    assert (m.num_cached_tokens, m.num_redis_cached_tokens, m.queue_time_s) == (32, 16, 0.25)


def test_merge_keeps_the_earliest_emission_stamp():
    def stamped(ids, at):
        return StreamChunk(list(ids), emitted_at=at)

    assert merge_chunks(stamped([1], 10.0), stamped([2], 11.0)).emitted_at == 10.0
    assert merge_chunks(stamped([1], 11.0), stamped([2], 10.0)).emitted_at == 10.0  # out of order: still the oldest
    assert merge_chunks(stamped([1], None), stamped([2], 11.0)).emitted_at == 11.0
    assert merge_chunks(stamped([1], 10.0), stamped([], None)).emitted_at == 10.0  # e.g. an abort chunk after it
    assert merge_chunks(stamped([1], None), stamped([2], None)).emitted_at is None
    box = Outbox()
    for i, at in enumerate((5.0, 6.0, 7.0)):
        box.put("a", stamped([i], at))
    assert box.take()[0][1].emitted_at == 5.0


def test_merge_keeps_the_earliest_arrival_stamp():
    def arrived(ids, at):
        return StreamChunk(list(ids), arrived_at=at)

    assert merge_chunks(arrived([1], 10.0), arrived([2], 11.0)).arrived_at == 10.0
    assert merge_chunks(arrived([1], None), arrived([2], 11.0)).arrived_at == 11.0
    assert merge_chunks(arrived([1], 10.0), arrived([], None)).arrived_at == 10.0
    assert merge_chunks(arrived([1], None), arrived([2], None)).arrived_at is None

    async def main():
        box = Inbox()  # the router's inbox merges with merge_chunks: the oldest token's arrival stays
        for i, at in enumerate((5.0, 6.0, 7.0)):
            box.put(arrived([i], at))
        return await box.get()

    merged = asyncio.run(main())
    assert merged.token_ids == [0, 1, 2] and merged.arrived_at == 5.0


def test_replica_link_stamps_each_chunk_on_arrival():
    first, other, later = chunk([1]), chunk([5]), chunk([2], finish="length")

    async def batches():
        yield ChunkBatch([("a", first), ("b", other)])
        await asyncio.sleep(0.01)
        yield ChunkBatch([("a", later)])

    class Channel:  # what handle.options(stream=True).channel.remote(...) returns
        def __aiter__(self):
            return batches()

        def cancel(self):
            pass

    handle = SimpleNamespace(options=lambda **_: SimpleNamespace(channel=SimpleNamespace(remote=lambda **_: Channel())))

    async def main():
        before = time.time()
        link = ReplicaLink(handle, "router", "r1")
        boxes = link.inboxes["a"], link.inboxes["b"] = Inbox(), Inbox()
        await link._task  # the channel ends after two batches
        return before, boxes, time.time()

    before, (a, b), after = asyncio.run(main())
    assert before <= first.arrived_at == other.arrived_at < later.arrived_at <= after  # one stamp per batch
    assert a.chunk.token_ids == [1, 2] and a.chunk.arrived_at == first.arrived_at
    assert b.chunk.arrived_at == other.arrived_at and isinstance(a.error, ConnectionError)


def test_outbox_holds_one_merged_chunk_per_request():
    box = Outbox()
    box.put("a", chunk([1], "x"))
    box.put("b", chunk([7]))
    box.put("a", chunk([2], "y"))
    items = dict(box.take())
    assert items["a"].token_ids == [1, 2] and items["a"].text == "xy" and items["b"].token_ids == [7]
    assert box.take() == [] and not box.ready.is_set()


def test_hub_rejects_calls_meant_for_another_replica():
    hub = ChannelHub("r1")
    hub.check(Route("router", "r1"))
    hub.check(Route("router", ""))
    with pytest.raises(WrongReplicaError):
        hub.check(Route("router", "r2"))


def test_channel_batches_every_request_of_its_router():
    async def main():
        hub = ChannelHub("r1")
        route, other = Route("A", "r1"), Route("B", "r1")

        async def source(ids):
            for i in ids:
                yield chunk([i], finish="length" if i == ids[-1] else None)

        await asyncio.gather(hub.pump(route, "x", source([1, 2])), hub.pump(route, "y", source([5])),
                             hub.pump(other, "z", source([9])))
        stream = hub.stream(route)
        batch = await anext(stream)
        await stream.aclose()
        return batch

    batch = asyncio.run(main())
    got = {rid: c.token_ids for rid, c in batch.chunks}
    assert got == {"x": [1, 2], "y": [5]}  # router B's request is not on router A's channel


def test_inbox_merges_unread_chunks_then_raises_its_error():
    async def main():
        box = Inbox()
        box.put(chunk([1], "a"))
        box.put(chunk([2], "b"))
        first = await box.get()
        box.put(chunk([3], "c"))
        box.fail(ConnectionError("gone"))
        second = await box.get()  # chunks that arrived before the error are still delivered
        with pytest.raises(ConnectionError):
            await box.get()
        return first, second

    first, second = asyncio.run(main())
    assert first.token_ids == [1, 2] and first.text == "ab" and second.token_ids == [3]


def test_inbox_wakes_its_reader():
    async def main():
        box = Inbox()
        reader = asyncio.ensure_future(box.get())
        await asyncio.sleep(0)
        box.put(chunk([4]))
        return await asyncio.wait_for(reader, 1)

    assert asyncio.run(main()).token_ids == [4]
