"""Scheduler decisions on pure bookkeeping (no model): budgets, chunking, priorities,
admission limits and preemption."""

import pytest

from services.engine.config import SchedulerConfig
from services.engine.kv_cache import KVCacheManager, hash_seed
from services.engine.request import Request, RequestStatus
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import EngineOverloadedError, Scheduler

BS = 4


def make(num_blocks=64, **cfg):
    kv = KVCacheManager(num_blocks, BS, hash_seed("m", "float32", BS))
    return Scheduler(SchedulerConfig(**cfg), kv)


def req(rid, n, priority=0, t=0.0, first=1):
    return Request(rid, list(range(first, first + n)), SamplingParams(max_tokens=8), priority=priority, arrival_time=t)


def run_step(s, sample=True):
    """Apply a schedule as the engine would: advance counts, append a token to finished prompts."""
    out = s.schedule()
    s.update_after_step(out)
    for rid in out.num_scheduled_tokens:
        r = s.requests[rid]
        if sample and r.num_computed_tokens == r.num_tokens:
            r.output_token_ids.append(7)
    return out


def test_chunked_prefill_under_token_budget_and_decodes_first():
    s = make(max_num_batched_tokens=8)
    s.add(req("long", 20, t=0))
    assert run_step(s).num_scheduled_tokens == {"long": 8}
    assert run_step(s).num_scheduled_tokens == {"long": 8}
    s.add(req("short", 3, t=1))
    out = run_step(s)
    assert out.num_scheduled_tokens == {"long": 4, "short": 3}
    out = run_step(s)
    assert out.num_scheduled_tokens == {"long": 1, "short": 1}


def test_priority_then_arrival_order():
    s = make(max_num_batched_tokens=4)
    s.add(req("late-low", 4, priority=1, t=0))
    s.add(req("b", 4, priority=0, t=2))
    s.add(req("a", 4, priority=0, t=1))
    assert list(run_step(s).num_scheduled_tokens) == ["a"]
    assert "b" in run_step(s).num_scheduled_tokens


def test_admission_limits_reject():
    s = make(max_waiting_requests=2, max_waiting_tokens=100)
    s.add(req("a", 10))
    s.add(req("b", 10))
    with pytest.raises(EngineOverloadedError, match="max_waiting_requests"):
        s.add(req("c", 10))
    s2 = make(max_waiting_tokens=15)
    s2.add(req("a", 10))
    with pytest.raises(EngineOverloadedError, match="max_waiting_tokens"):
        s2.add(req("b", 10))


def test_preemption_frees_lowest_priority_and_recomputes():
    s = make(num_blocks=4, max_num_batched_tokens=64)
    s.add(req("hi", 8, priority=0, t=0))
    s.add(req("lo", 7, priority=1, t=1, first=100))
    run_step(s)  # hi: 2 blocks, lo: 2 blocks, pool full
    assert s.kv.num_free_blocks == 0
    # hi needs a third block for its next token: lo is preempted
    out = run_step(s)
    assert out.preempted_request_ids == ["lo"]
    lo = s.requests["lo"]
    assert lo.status is RequestStatus.PREEMPTED and lo.num_computed_tokens == 0
    assert lo.num_tokens == 8  # its generated token is kept and will be recomputed
    s.finish(s.requests["hi"], "length")
    out = run_step(s)
    # its first full block was hashed before preemption and is still cached: only 4 recomputed
    assert out.num_scheduled_tokens == {"lo": 4} and out.num_cached_tokens == {"lo": 4}
    s.finish(lo, "abort")
    assert s.kv.num_free_blocks == 4 and not s.has_unfinished()


def test_finish_waiting_request_removes_it_from_queue():
    s = make(max_num_batched_tokens=4)
    s.add(req("a", 4, t=0))
    s.add(req("b", 4, t=1))
    s.finish(s.requests["b"], "abort")
    assert s.num_waiting == 1 and s.waiting_tokens == 4
    run_step(s)
    assert list(s.requests) == ["a"]
