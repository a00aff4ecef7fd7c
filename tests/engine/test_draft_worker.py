"""A draft hosted elsewhere (``speculative: {method: draft_model, deployment: D}``) on tiny Llamas:
the engine's ``RemoteDraftProposer`` and the DraftWorker's ``DraftService`` with the real draft
model, joined by an in-process stand-in for the Serve handle (the deployment itself runs over
gRPC in tests/integration/test_spec_decode_serve.py). Greedy output identical to no speculation,
per-request acceptance counts, a slow or dead DraftWorker failing closed, every KV block free."""

import time

import pytest

from services.config import DraftWorkerConfig
from services.draft_client import RemoteDraftProposer
from services.draft_service import DraftService
from services.engine import LLM, SamplingParams
from services.engine.engine import LLMEngine
from services.engine.llm import build_engine_config
from services.engine.plugins import HostDeps
from tests.draft_handles import InProcessHandle
from tests.engine.test_spec_decode import PROMPTS, noisy_copy, rand_ids, repetitive

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def target(model_dir):
    return model_dir("tiny-llama")


@pytest.fixture(scope="module")
def poor_draft(target, tmp_path_factory):
    return noisy_copy(target, tmp_path_factory.mktemp("draft") / "model", noise=0.5)


@pytest.fixture(scope="module")
def baseline(target):
    return LLM(target, device="cpu", block_size=16, num_kv_blocks=128)


def remote_llm(target, draft, timeout_s=10.0, retry_s=0.2, k=3):
    """An LLM whose draft_model proposer calls a DraftService through an in-process handle;
    returns (llm, handle)."""
    spec = {"method": "draft_model", "model": draft, "deployment": "D", "num_speculative_tokens": k,
            "deployment_timeout_s": timeout_s, "deployment_retry_s": retry_s, "adaptive": False}
    config = build_engine_config(target, device="cpu", block_size=16, num_kv_blocks=128, speculative_config=spec)
    handle = InProcessHandle(DraftService.from_config(DraftWorkerConfig("D", config), "r1"))
    handle.config = DraftWorkerConfig("D", config)  # a replacement replica is built from it
    deps = HostDeps(proposers={"D": lambda options, info: RemoteDraftProposer(handle, options, info, "engine-1")})
    llm = object.__new__(LLM)
    llm.engine = LLMEngine(config, deps)
    return llm, handle


def assert_all_free(llm, handle):
    engine = llm.engine
    assert not engine.has_unfinished_requests() and engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    end = time.monotonic() + 5
    while handle.svc.sessions and time.monotonic() < end:  # releases travel shortly after the finish
        time.sleep(0.01)
    kv = handle.svc.proposer.kv
    assert not handle.svc.sessions and not handle.svc.proposer.shadows
    assert kv.num_free_blocks == kv.pool.num_blocks


def test_greedy_output_is_identical_with_a_remote_draft_batched_and_staggered(target, poor_draft, baseline):
    expected = [o.token_ids for o in baseline.generate(PROMPTS, GREEDY)]
    llm, handle = remote_llm(target, poor_draft)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == expected
    s = llm.engine.stats
    assert s.spec_num_drafts > 0 and 0 < s.spec_num_accepted_tokens < s.spec_num_draft_tokens
    assert handle.svc.stats.num_accepted_tokens == s.spec_num_accepted_tokens  # the client reported each
    assert_all_free(llm, handle)
    engine, pending, reqs, step = llm.engine, list(PROMPTS), [], 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:
            reqs.append(engine.add_request(pending.pop(0), GREEDY))
        engine.step()
        step += 1
    assert [r.output_token_ids for r in reqs] == expected
    assert sum(r.num_draft_tokens for r in reqs) > 0
    assert_all_free(llm, handle)


def test_per_request_counts_reach_the_last_chunk(target):
    llm, handle = remote_llm(target, target, k=4)  # the target as its own draft: every proposal accepted
    engine = llm.engine
    engine.add_request(rand_ids(9, 6), GREEDY)
    chunks = []
    while engine.has_unfinished_requests():
        chunks += engine.step()
    last = chunks[-1]
    assert last.finished and last.num_drafts > 0 and last.num_draft_tokens > 0
    assert last.num_accepted_draft_tokens == last.num_draft_tokens  # rolled back nothing, accepted all
    assert len(chunks) < 24 // 2  # the accepted runs came as chunks of up to k + 1 tokens
    assert_all_free(llm, handle)


def test_a_slow_draft_worker_only_costs_the_speculation(target, poor_draft, baseline):
    expected = [o.token_ids for o in baseline.generate(PROMPTS, GREEDY)]
    llm, handle = remote_llm(target, poor_draft, timeout_s=0.02, retry_s=0.05)
    handle.delay_s = 0.5
    t0 = time.monotonic()
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
    proposer = llm.engine.proposer
    assert llm.engine.stats.spec_num_drafts == 0 and proposer.stats.num_timeouts > 0
    assert time.monotonic() - t0 < 0.02 * 24 * 2 + 10  # no step waited for the slow answers
    handle.delay_s = 0.0
    proposer.timeout_s = 10.0  # answers now come in time, even on a loaded machine
    time.sleep(0.6)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
    assert llm.engine.stats.spec_num_drafts > 0
    assert_all_free(llm, handle)


def test_a_draft_worker_that_dies_and_comes_back_empty(target, poor_draft, baseline):
    prompts = [repetitive(10, 21), rand_ids(12, 22)]
    expected = [o.token_ids for o in baseline.generate(prompts, SamplingParams(max_tokens=40, temperature=0,
                                                                             ignore_eos=True))]
    llm, handle = remote_llm(target, poor_draft, retry_s=0.01)
    engine = llm.engine
    reqs = [engine.add_request(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)) for p in prompts]
    for _ in range(6):
        engine.step()
    before = engine.stats.spec_num_drafts
    assert before > 0
    handle.error = ConnectionError("The actor died unexpectedly before finishing this task.")
    for _ in range(4):
        engine.step()
    assert engine.stats.spec_num_drafts == before and engine.proposer.stats.num_errors > 0
    time.sleep(0.02)
    handle.error, handle.svc = None, DraftService.from_config(handle.config, "r2")  # Serve's replacement: empty
    while engine.has_unfinished_requests():
        engine.step()
        time.sleep(0.015)
    assert [r.output_token_ids for r in reqs] == expected
    assert engine.stats.spec_num_drafts > before  # speculation resumed after one resync per sequence
    assert handle.svc.stats.num_resyncs == len(prompts) and engine.proposer.replica_id == "r2"
    assert_all_free(llm, handle)  # released to the replacement, which held them since the resync


def test_sampled_requests_get_the_draft_probabilities_and_seeds_reproduce(target, poor_draft):
    llm, handle = remote_llm(target, poor_draft)
    seen = []
    propose = handle.svc.propose

    def recording(calls, now=None):
        replies = propose(calls, now)
        seen.extend(p for r in replies for p in r.proposals if p.token_ids)
        return replies

    handle.svc.propose = recording
    params = SamplingParams(max_tokens=20, temperature=1.5, top_k=20, seed=77, ignore_eos=True)
    prompt = rand_ids(12, seed=8)
    first = llm.generate([prompt], params)[0].token_ids
    noisy = SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)
    mixed = llm.generate([rand_ids(6, 9), prompt], [noisy, params])[1].token_ids
    assert first == mixed == llm.generate([prompt], params)[0].token_ids
    assert seen and all(p.probs is not None and p.probs.shape == (len(p.token_ids), 512) for p in seen)
    s = llm.engine.stats
    assert s.spec_num_drafts > 0 and 0 < s.spec_num_accepted_tokens < s.spec_num_draft_tokens
    assert_all_free(llm, handle)
