"""Prefix pins under a small KV pool (no model, no Redis): the hang of issue 18.

A request about to be queued pins its locally cached prefix and the blocks it imports from the
Redis tier (``KVCacheManager.pin_cached_prefix`` / ``import_blocks``), so that LRU reuse cannot
evict them before it is admitted. Before the fix nothing but admission released those pins,
and the scheduler admits strictly in queue order: when the head of the queue (typically a
preempted long request) needed more blocks than the pins of the requests queued *behind* it
left free, and nothing was running, no step could ever free a block. Every stream stalled until
its client's deadline. Now a failing allocation first drops the pins of other unadmitted
requests (newest first): a pin only keeps blocks from LRU reuse, so dropping one costs at most
a recompute later.

The import rule of ``LLMEngine.import_prefix_blocks`` (import only when the free blocks could
also hold the rest of the prompt) is applied here as the engine applies it.
"""

import random

from services.engine.config import SchedulerConfig
from services.engine.kv_cache import KVCacheManager, block_hash_chain, hash_seed
from services.engine.request import Request
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler

BS = 16
POOL = 96


def make(num_blocks=POOL, **cfg) -> Scheduler:
    kv = KVCacheManager(num_blocks, BS, hash_seed("m", "float32", BS))
    return Scheduler(SchedulerConfig(**{"max_num_batched_tokens": 2048, **cfg}), kv)


def req(rid: str, prompt: list[int], max_tokens: int, t: float) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival_time=t)


def distinct(tag: int, n: int) -> list[int]:
    return [tag * 10_000 + i for i in range(n)]


def prefix_hashes(kv: KVCacheManager, prompt: list[int]) -> list[bytes]:
    """What the tier looks up: every full prompt block but the one holding the last token."""
    return block_hash_chain(kv.seed, prompt, BS)[:(len(prompt) - 1) // BS]


def pin_local(kv: KVCacheManager, rid: str, prompt: list[int]) -> int:
    return kv.pin_cached_prefix(rid, prefix_hashes(kv, prompt))


def import_remote(kv: KVCacheManager, rid: str, prompt: list[int], remote: set[bytes]) -> int:
    """The Redis tier's import: the hits after the local pins, if the rest of the prompt fits."""
    hashes = prefix_hashes(kv, prompt)[kv.num_pinned(rid):]
    n = next((i for i, h in enumerate(hashes) if h not in remote), len(hashes))
    need = kv.blocks_needed(len(prompt)) - kv.num_pinned(rid)
    if n == 0 or need > kv.num_free_blocks:
        return 0
    kv.import_blocks(rid, hashes[:n])
    return n


def step(s: Scheduler, finished: list[Request]):
    """One engine step on bookkeeping only: sample token 7 for every request whose tokens are all
    computed, finish it at max_tokens (as ``LLMEngine._append_tokens`` does)."""
    out = s.schedule()
    s.update_after_step(out)
    for rid in out.num_scheduled_tokens:
        r = s.requests[rid]
        if r.num_computed_tokens == r.num_tokens:
            r.output_token_ids.append(7)
            if len(r.output_token_ids) >= r.params.max_tokens:
                s.finish(r, "length")
                finished.append(r)
    return out


def run_until_done(s: Scheduler, finished: list[Request], max_steps: int = 3000) -> int:
    for i in range(max_steps):
        if not s.has_unfinished():
            return i
        step(s, finished)
    raise AssertionError(f"stuck: {s.num_running} running, {s.num_waiting} waiting, "
                         f"{s.kv.num_free_blocks} of {s.kv.pool.num_blocks} blocks free, "
                         f"pins {dict((k, len(v)) for k, v in s.kv._pins.items())}")


def test_pins_of_requests_behind_a_preempted_one_no_longer_stall_the_pool():
    s, done = make(), []
    a = req("a", distinct(1, 40 * BS), 200, t=0)  # 40 blocks, grows to 53
    b = req("b", distinct(2, 56 * BS - 1), 100, t=1)  # 56 blocks: a + b fill the pool
    s.add(a)
    s.add(b)
    step(s, done)
    assert s.kv.num_free_blocks == 0
    out = step(s, done)  # a needs its 41st block: b is preempted and heads the queue
    assert out.preempted_request_ids == ["b"]
    remote = set()
    late = []
    for i in range(5):  # five requests arrive; their prefixes are in Redis (10 blocks each)
        prompt = distinct(10 + i, 10 * BS + 1)
        remote.update(prefix_hashes(s.kv, prompt))
        rid = f"c{i}"
        assert pin_local(s.kv, rid, prompt) == 0
        assert import_remote(s.kv, rid, prompt, remote) == 10
        late.append(req(rid, prompt, 8, t=2 + i))
        s.add(late[-1])
    assert s.kv.num_free_blocks == 5  # the imports took what b's preemption freed
    run_until_done(s, done)
    assert sorted(r.request_id for r in done) == ["a", "b", "c0", "c1", "c2", "c3", "c4"]
    assert all(len(r.output_token_ids) == r.params.max_tokens for r in done)
    assert s.kv.num_free_blocks == POOL and not s.kv._pins


def test_a_running_request_takes_pinned_blocks_before_preempting_anyone():
    s, done = make(num_blocks=8), []
    s.add(req("a", distinct(1, 4 * BS), 4 * BS, t=0))  # 4 blocks, grows to 8
    step(s, done)
    prompt = distinct(2, 4 * BS + 1)
    remote = set(prefix_hashes(s.kv, prompt))
    assert import_remote(s.kv, "q", prompt, remote) == 0  # the rest of q's prompt would not fit
    s.kv.import_blocks("q", prefix_hashes(s.kv, prompt)[:4])  # pinned anyway (e.g. before a grew)
    assert s.kv.num_free_blocks == 0
    out = step(s, done)
    assert out.preempted_request_ids == [] and s.kv.num_pinned("q") == 0
    # unpinned and still cached, but evictable: a's new block reused the chain's tail first
    assert s.kv.num_cached_blocks(prefix_hashes(s.kv, prompt)) == 3
    run_until_done(s, done)
    assert [r.request_id for r in done] == ["a"]


def test_pins_of_the_request_being_admitted_are_kept():
    s, done = make(num_blocks=12), []
    p = distinct(3, 8 * BS + 1)
    remote = set(prefix_hashes(s.kv, p))
    assert import_remote(s.kv, "p", p, remote) == 8
    other = distinct(4, 2 * BS + 1)
    s.kv.import_blocks("o", prefix_hashes(s.kv, other))  # a newer pin holder, not queued yet
    s.add(req("p", p, 4, t=0))
    out = step(s, done)  # p needs its 8 pinned blocks + 1: fits without touching o's pins
    assert out.num_cached_tokens == {"p": 8 * BS} and s.kv.num_pinned("o") == 2


def closed_loop(seed: int, steps: int = 1500) -> tuple[int, int]:
    """The tester's workload of issue 18 on bookkeeping: 8 clients, each sending one request
    after another (a long prefix shared by all, a prefix of its own, a short question), into a
    96-block pool; every finished prompt's full blocks are "written back" to a Redis set, and an
    arriving request pins its local hits and imports the Redis ones. Arrivals of one step look
    their prefixes up together (the lookups run concurrently in a worker). Returns (requests
    finished, longest run of steps with requests open and nothing scheduled)."""
    rng = random.Random(seed)
    s, done, remote = make(), [], set()
    shared = distinct(1, 30 * BS)
    own = [distinct(100 + c, rng.randrange(5, 16) * BS) for c in range(8)]
    busy, next_at, n = {}, [0] * 8, 0
    stalled = longest = 0
    for t in range(steps):
        arrivals = []
        for c in range(8):
            if c not in busy and next_at[c] <= t:
                prompt = shared + own[c] + distinct(1000 + n, rng.randrange(1, 40))
                arrivals.append((c, f"r{n}", prompt, rng.randrange(8, 64)))
                n += 1
        for c, rid, prompt, _ in arrivals:
            pin_local(s.kv, rid, prompt)
        for c, rid, prompt, max_tokens in arrivals:
            import_remote(s.kv, rid, prompt, remote)
            s.add(req(rid, prompt, max_tokens, t=t + c / 10))
            busy[c] = rid
        before = len(done)
        out = step(s, done)
        for r in done[before:]:
            remote.update(block_hash_chain(s.kv.seed, r.prompt_token_ids, BS))
            c = next(c for c, rid in busy.items() if rid == r.request_id)
            del busy[c]
            next_at[c] = t + rng.randrange(0, 3)
        stalled = stalled + 1 if out.is_empty and s.has_unfinished() else 0
        longest = max(longest, stalled)
    return len(done), longest


def test_closed_loop_with_shared_prefixes_never_stalls():
    for seed in range(6):
        finished, longest_stall = closed_loop(seed)
        assert longest_stall == 0, f"seed {seed}: {longest_stall} steps with requests open and nothing scheduled"
        assert finished > 40, f"seed {seed}: only {finished} requests finished"
