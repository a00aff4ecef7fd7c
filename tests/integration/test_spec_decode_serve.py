"""Speculative decoding over gRPC on a real Ray cluster, with the tiny Llama as target and a
noisy copy of it as the draft (right often, wrong often): local.yaml and pd.yaml with the draft
in the worker's process, spec.yaml with the draft in a DraftWorker deployment. Greedy output is
identical to speculation off (the in-process engine without a proposer), the final usage counts
the request's drafts, ``speculative: false`` opts a request out; killing the DraftWorker replica
(SIGKILL by PID) mid-stream: every request completes, identically, and speculation comes back
with Serve's replacement. One Ray head; the three apps are deployed one after the other."""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

import pytest
import ray
from ray import serve

from router import launcher
from services.engine import LLM, SamplingParams
from tests.engine.test_spec_decode import noisy_copy
from tests.integration.helpers import (DEPLOY, TINY_ENGINE, environment, free_port, ray_head, request,
                                       run_concurrently, tokens, wait_all_free)
from tests.integration.kills import replica_actors, streams_with_a_kill, wait_replaced

GREEDY = dict(temperature=0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [30 + i for i in range(40)], [11, 300, 12, 301, 13], [42] * 20]
MAX_TOKENS = 32
KILL_STREAMS = [[3 + i, 40 + 7 * i, 5, 6 + i % 5] for i in range(8)]
KILL_TOKENS = 300  # long enough that every stream is mid-way when the DraftWorker dies
# in the tests the DraftWorker's answer may take longer than in production: the box is shared
SPEC_TIMING = {"deployment_timeout_s": 0.5, "deployment_retry_s": 0.5}


@pytest.fixture(scope="module")
def head():
    with environment(TANDEM_METRICS_PORT=str(free_port())), ray_head():
        yield


@pytest.fixture(scope="module")
def draft(tiny_model, tmp_path_factory):
    return noisy_copy(tiny_model, tmp_path_factory.mktemp("draft") / "model", noise=0.5)


@pytest.fixture(scope="module")
def oracle(tiny_model):
    """The target alone: speculation off."""
    return LLM(tiny_model, device="cpu", num_kv_blocks=1024)


@contextmanager
def app(config_file: str, model: str, overrides: dict):
    config = launcher.load_config(DEPLOY / config_file, model=model, port=free_port(), overrides=overrides)
    config["applications"][0]["logging_config"] = {"enable_access_log": False}
    address = launcher.deploy(config)
    try:
        yield address
    finally:
        serve.delete("tandem")


def draft_section(draft: str, deployment: str = "") -> dict:
    # adaptive: false drafts every step (the counts and the kill below need drafts in every stream)
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 3, "adaptive": False}
    return {**spec, "deployment": deployment, **SPEC_TIMING} if deployment else spec


def greedy_requests(**extra):
    return [request(ids=p, max_tokens=MAX_TOKENS, **GREEDY, **extra) for p in PROMPTS]


def assert_identical_with_drafts(address, oracle) -> None:
    """Greedy streams equal the target alone; their usage counts drafts (the opt-out's none)."""
    want = oracle.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, **GREEDY))
    got = run_concurrently(address, greedy_requests())
    for responses, w in zip(got, want):
        assert not isinstance(responses, Exception), responses
        assert tokens(responses) == w.token_ids
        usage = responses[-1].usage
        assert usage.completion_tokens == MAX_TOKENS
        assert 0 <= usage.accepted_draft_tokens <= usage.draft_tokens <= 3 * usage.draft_steps
    total = [r[-1].usage for r in got]
    assert sum(u.draft_steps for u in total) > 0 and sum(u.accepted_draft_tokens for u in total) > 0
    opted_out = run_concurrently(address, greedy_requests(speculative=False))
    for responses, w in zip(opted_out, want):
        assert tokens(responses) == w.token_ids
        u = responses[-1].usage
        assert (u.draft_steps, u.draft_tokens, u.accepted_draft_tokens) == (0, 0, 0)


class TestLocalDraft:
    @pytest.fixture(scope="class")
    def address(self, head, tiny_model, draft):
        with app("local.yaml", tiny_model, {"engine": {**TINY_ENGINE, "speculative": draft_section(draft)}}) as addr:
            yield addr

    def test_unified_worker_with_its_own_draft_is_lossless(self, address, oracle):
        assert_identical_with_drafts(address, oracle)
        wait_all_free(address, timeout_s=30)


class TestPrefillDecodeLocalDraft:
    @pytest.fixture(scope="class")
    def address(self, head, tiny_model, draft):
        overrides = {"engine": TINY_ENGINE, "decode_engine": {"speculative": draft_section(draft)}}
        with app("pd.yaml", tiny_model, overrides) as addr:
            yield addr

    def test_decode_worker_with_its_own_draft_is_lossless(self, address, oracle):
        assert_identical_with_drafts(address, oracle)
        wait_all_free(address, timeout_s=30)


def draft_worker(method: str):
    return getattr(serve.get_deployment_handle("DraftWorker", "tandem"), method).remote().result(timeout_s=30)


def wait_draft_worker_free(timeout_s: float = 30.0):
    end = time.monotonic() + timeout_s
    while True:
        s = draft_worker("stats")
        if s.num_sequences == 0 and s.kv_blocks_free == s.kv_blocks_total:
            return s
        assert time.monotonic() < end, s
        time.sleep(0.2)


def kill_draft_worker() -> str:
    """SIGKILL the DraftWorker replica's process (its PID asked from its actor); its actor name."""
    (victim,) = replica_actors("DraftWorker")
    actor = ray.get_actor(victim["name"], namespace=victim["namespace"])
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    return victim["name"]


class TestDraftWorker:
    @pytest.fixture(scope="class")
    def address(self, head, tiny_model, draft):
        overrides = {"engine": TINY_ENGINE, "decode_engine": {"speculative": draft_section(draft, "DraftWorker")}}
        with app("spec.yaml", tiny_model, overrides) as addr:
            yield addr

    def test_decode_worker_with_a_shared_draft_worker_is_lossless(self, address, oracle):
        assert_identical_with_drafts(address, oracle)
        wait_all_free(address, timeout_s=30)
        stats = wait_draft_worker_free()  # every finished sequence was released there
        assert stats.num_calls > 0 and stats.num_proposed_tokens > 0 and stats.num_accepted_tokens > 0

    @pytest.mark.timeout(420)
    def test_killing_the_draft_worker_mid_stream_loses_nothing(self, address, oracle):
        want = oracle.generate(KILL_STREAMS, SamplingParams(max_tokens=KILL_TOKENS, **GREEDY))
        reqs = [request(ids=p, max_tokens=KILL_TOKENS, **GREEDY) for p in KILL_STREAMS]
        drafted = lambda records: all(rec.num_tokens >= 20 for rec in records)
        records, _, victim, migrations = streams_with_a_kill(address, reqs, [()] * len(reqs), kill_draft_worker,
                                                            ready=drafted)
        for rec, w in zip(records, want):
            assert rec.error is None, rec.error
            assert rec.tokens == w.token_ids and rec.text == w.text
            assert rec.responses[-1].finish_reason == "length"
            assert rec.responses[-1].usage.completion_tokens == KILL_TOKENS
            assert rec.responses[-1].usage.draft_steps > 0  # drafted before the kill at least
        assert migrations == 0  # the decode replicas never failed: the streams stayed where they were
        print(f"\n[draft worker kill] longest stall {max(r.longest_gap() for r in records) * 1e3:.0f} ms")
        wait_replaced("DraftWorker", victim, 1)
        wait_all_free(address, timeout_s=30)
        end = time.monotonic() + 60
        while True:  # Serve's replacement starts empty; the decode replica's next calls fill it
            (responses,) = run_concurrently(address, [request(ids=PROMPTS[0], max_tokens=MAX_TOKENS, **GREEDY)])
            assert tokens(responses) == oracle.generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_TOKENS,
                                                                                     **GREEDY))[0].token_ids
            if responses[-1].usage.draft_steps > 0:
                break
            assert time.monotonic() < end, "speculation did not resume with the new DraftWorker"
            time.sleep(0.5)
        wait_draft_worker_free()
