"""Nothing lost when a part of a deploy/pd.yaml cluster dies (router/migration.py, pd.yaml's two
routers): a decode replica killed mid-stream under 16 concurrent greedy streams, a prefill
replica killed before its hand-offs, one of the two routers killed under load."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from router.servicer import REPLICA_HINT_KEY
from services.engine import LLM, SamplingParams
from tests.integration.helpers import environment, free_port, request, serve_app, wait_all_free
from tests.integration.kills import (StreamRecord, kill_replica, percentile, record_stream, replica_actors,
                                     stats_of, streams_with_a_kill, wait_replaced)

N_STREAMS = 16
MAX_TOKENS = 600  # long enough that no stream ends while the busiest decode replica is found and killed
TWO = {"autoscaling_config": {"min_replicas": 2, "max_replicas": 2, "initial_replicas": 2}}
ENGINE = {"num_kv_blocks": 1024, "block_size": 16, "max_num_seqs": 128}
# one prefill at a time, 16 prompt tokens a step: long prompts wait their turn on their replica
PREFILL = {"max_num_seqs": 1, "max_num_batched_tokens": 16}
PROMPTS = [[3 + i, 40 + 7 * i, 5, 6 + i % 5] for i in range(N_STREAMS)]
LONG_PROMPTS = [[(7 * i + j) % 500 + 4 for j in range(1500)] for i in range(8)]
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def address(tiny_model):
    with environment(TANDEM_METRICS_PORT=str(free_port())), \
            serve_app("pd.yaml", tiny_model, {"engine": ENGINE, "prefill_engine": PREFILL},
                      {"PrefillWorker": TWO, "DecodeWorker": TWO}) as addr:
        assert len(replica_actors("Router")) == 2  # pd.yaml's default
        yield addr


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model, device="cpu", num_kv_blocks=1024)


def busiest(address: str, role: str):
    """The replica of ``role`` with the most requests open now (and that number)."""
    top = max(stats_of(address, role, 2), key=lambda s: s.num_open_streams)
    return top.replica_id, top.num_open_streams


def kill_busiest(address: str, role: str, deployment: str):
    def kill():
        replica, open_streams = busiest(address, role)
        return kill_replica(deployment, replica), open_streams
    return kill


def assert_uninterrupted(records, want, max_tokens: int) -> None:
    for rec, w in zip(records, want):
        assert rec.error is None, rec.error
        assert rec.tokens == w.token_ids and rec.text == w.text
        assert rec.responses[-1].finish_reason == "length"
        assert rec.responses[-1].usage.completion_tokens == max_tokens


def kill_decode(address, llm):
    want = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, **GREEDY))
    reqs = [request(ids=p, max_tokens=MAX_TOKENS, **GREEDY) for p in PROMPTS]
    records, _, (name, on_victim), migrations = streams_with_a_kill(
        address, reqs, [()] * N_STREAMS, kill_busiest(address, "decode", "DecodeWorker"))
    assert_uninterrupted(records, want, MAX_TOKENS)
    assert on_victim >= 1 and migrations == on_victim  # each stream of the killed replica moved once
    # which streams moved is not visible to the client; their stalls are the longest ones
    stalls = sorted((r.longest_gap() * 1e3 for r in records), reverse=True)[:on_victim]
    print(f"\n[decode kill] {on_victim} of {N_STREAMS} streams migrated: stall p50 {percentile(stalls, 50):.0f} ms, "
          f"p99 {percentile(stalls, 99):.0f} ms, max {max(stalls):.0f} ms")
    wait_replaced("DecodeWorker", name, 2)
    wait_all_free(address, timeout_s=30)


def test_a_decode_replica_killed_mid_stream_loses_no_stream(address, llm):
    kill_decode(address, llm)


def test_a_prefill_replica_killed_before_its_hand_offs_loses_no_request(address, llm):
    want = llm.generate(LONG_PROMPTS, SamplingParams(max_tokens=8, **GREEDY))
    reqs = [request(ids=p, max_tokens=8, **GREEDY) for p in LONG_PROMPTS]
    victim, survivor = (s.replica_id for s in stats_of(address, "prefill", 2))
    # half pinned to each prefill replica, which computes one at a time: when the first token
    # comes back, the victim has prefills in progress and waiting
    pins = [((REPLICA_HINT_KEY, victim if i % 2 == 0 else survivor),) for i in range(len(reqs))]
    first_token = lambda records: any(rec.num_tokens for rec in records)
    records, _, name, migrations = streams_with_a_kill(
        address, reqs, pins, lambda: kill_replica("PrefillWorker", victim), ready=first_token)
    assert_uninterrupted(records, want, 8)
    assert migrations >= 1  # the victim's prefills that had not handed off started over elsewhere
    print(f"\n[prefill kill] {migrations:.0f} of {len(reqs) // 2} requests pinned to the killed prefill replica "
          "migrated (the others had handed off)")
    wait_replaced("PrefillWorker", name, 2)
    wait_all_free(address, timeout_s=30)


class RouterKill:
    """``clients`` clients, each on its own channel (so connections spread over both routers),
    sending short streams back to back; one router is killed after ``before_s``; the load goes on
    ``after_s`` more."""

    def __init__(self, address: str, clients: int = 12, before_s: float = 3.0, after_s: float = 6.0):
        self.address, self.clients, self.before_s, self.after_s = address, clients, before_s, after_s
        self.records: list[StreamRecord] = []
        self.killed_at = 0.0
        self.killed = ""

    async def _client(self, stop: asyncio.Event, i: int) -> None:
        # its own connection: channels of one process share subchannels (one TCP connection) by default
        async with grpc.aio.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = pb_grpc.GenerationStub(channel)
            while not stop.is_set():
                rec = StreamRecord()
                self.records.append(rec)
                await record_stream(stub, request(ids=[5 + i, 6, 7], max_tokens=24, **GREEDY), rec, timeout=30)
                if rec.error is not None:
                    await asyncio.sleep(0.05)  # a client's pause before it tries again

    async def run(self) -> "RouterKill":
        stop = asyncio.Event()
        tasks = [asyncio.create_task(self._client(stop, i)) for i in range(self.clients)]
        await asyncio.sleep(self.before_s)
        self.killed = await asyncio.to_thread(kill_replica, "Router")
        self.killed_at = time.monotonic()
        await asyncio.sleep(self.after_s)
        stop.set()
        await asyncio.gather(*tasks)
        return self

    def report(self) -> tuple[list, list, list]:
        """(lost: in flight at the kill and failed, failed in the first second after, failed later)."""
        t = self.killed_at
        lost = [r for r in self.records if r.started < t and r.error is not None]
        first_second = [r for r in self.records if t <= r.started < t + 1.0 and r.error is not None]
        later = [r for r in self.records if r.started >= t + 1.0 and r.error is not None]
        served = [r for r in self.records if r.started >= t + 1.0 and r.error is None]
        print(f"\n[router kill] {len(self.records)} requests; in flight at the kill and lost: {len(lost)}; "
              f"failed in the first second after: {len(first_second)}; started later: {len(served) + len(later)}, "
              f"failed: {len(later)} ({sorted({r.error.code().name for r in lost + first_second + later})})")
        assert served, "no request was served after the kill"
        for r in served:
            assert r.responses[-1].finish_reason == "length" and len(r.tokens) == 24
        return lost, first_second, later


def test_one_of_two_routers_killed_under_load_loses_only_its_streams(address):
    load = asyncio.run(RouterKill(address).run())
    lost, _, later = load.report()
    assert not later, [r.error for r in later[:3]]  # 0 UNAVAILABLE after the first second
    # the killed router held streams: 12 connections, each with a stream in flight almost always
    assert lost and all(r.error.code() == grpc.StatusCode.UNAVAILABLE for r in lost)
    assert len(lost) < load.clients  # the other router held streams too, and kept them
    wait_replaced("Router", load.killed, 2)
    # Ray does not cancel the calls of a caller that died: the dead router's requests run to their
    # end on the workers, and a prefill replica holds the KV it sent for one until kv_hold_s (60 s)
    wait_all_free(address, timeout_s=90)


@pytest.mark.faults
@pytest.mark.timeout(1200)
def test_decode_and_router_kills_three_times_each(address, llm):
    for _ in range(3):
        kill_decode(address, llm)
        load = asyncio.run(RouterKill(address).run())
        assert not load.report()[2]
        wait_replaced("Router", load.killed, 2)
