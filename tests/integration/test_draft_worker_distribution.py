"""Sampled output through a DraftWorker deployment on a real Ray cluster follows the target's
distribution with a deliberately poor draft (a noisy copy of the tiny Llama): chi-square of the
second token given the most likely first one, as the in-process test of the local draft
(tests/engine/test_spec_decode.py) does. The DraftWorker is one Serve replica in its own
process; the engine runs in this process and reaches it as a decode replica's engine does
(``RemoteDraftProposer``), by plain actor calls after the first answer (``deployment_transport:
direct``), and, in a second engine, through the Serve handle only."""

from __future__ import annotations

import time

import pytest
import torch
from ray import serve
from scipy.stats import chisquare

from router.replica_router import request_router_config
from services.config import DraftWorkerConfig
from services.draft_client import remote_proposers
from services.draft_worker import DraftWorkerDeployment
from services.engine import LLM, SamplingParams
from services.engine.engine import LLMEngine
from services.engine.llm import build_engine_config
from services.engine.plugins import HostDeps
from tests.engine.test_spec_decode import noisy_copy, rand_ids
from tests.integration.helpers import ray_head

NAME = "DraftWorker"
ENGINE = dict(device="cpu", block_size=16, num_kv_blocks=256)


def spec(draft: str, transport: str) -> dict:
    # a generous timeout: on a loaded box a late answer would only mean fewer drafts
    return {"method": "draft_model", "model": draft, "deployment": NAME, "num_speculative_tokens": 3,
            "adaptive": False, "deployment_timeout_s": 5.0, "deployment_retry_s": 0.2,
            "deployment_transport": transport}


@pytest.fixture(scope="module")
def draft(tiny_model, tmp_path_factory):
    return noisy_copy(tiny_model, tmp_path_factory.mktemp("draft") / "model", noise=0.5)


@pytest.fixture(scope="module")
def handle(tiny_model, draft):
    config = build_engine_config(tiny_model, **ENGINE, speculative_config=spec(draft, "direct"))
    with ray_head():
        app = DraftWorkerDeployment.options(name=NAME, request_router_config=request_router_config(),
                                            ray_actor_options={"num_cpus": 0.1}).bind(DraftWorkerConfig(NAME, config))
        yield serve.run(app, name="draft-distribution", route_prefix=None, logging_config={"enable_access_log": False})


def remote_llm(target: str, draft: str, handle, transport: str) -> LLM:
    config = build_engine_config(target, **ENGINE, speculative_config=spec(draft, transport))
    llm = object.__new__(LLM)
    llm.engine = LLMEngine(config, HostDeps(proposers=remote_proposers({NAME: handle}, f"test-{transport}")))
    return llm


def wait_draft_worker_free(handle, timeout_s: float = 30.0):
    end = time.monotonic() + timeout_s
    while True:
        s = handle.stats.remote().result(timeout_s=30)
        if s.num_sequences == 0 and s.kv_blocks_free == s.kv_blocks_total:
            return s
        assert time.monotonic() < end, s
        time.sleep(0.2)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("transport", ["direct", "handle"])
def test_sampled_output_through_the_draft_worker_follows_the_target(transport, tiny_model, draft, handle):
    temperature, top_k, n = 8.0, 8, 2000
    baseline = LLM(tiny_model, **ENGINE)
    prompt = rand_ids(17, seed=11)
    t1 = baseline.generate([prompt], SamplingParams(max_tokens=1, temperature=0))[0].token_ids[0]
    lp = baseline.generate([prompt + [t1]], SamplingParams(max_tokens=1, temperature=0, logprobs=top_k))[0].logprobs[0]
    top = sorted(lp, key=lambda t: -lp[t])[:top_k]
    p = torch.softmax(torch.tensor([lp[t] for t in top], dtype=torch.float64) / temperature, dim=0)
    llm = remote_llm(tiny_model, draft, handle, transport)
    outs = llm.generate([prompt] * n, SamplingParams(max_tokens=4, temperature=temperature, top_k=top_k,
                                                     ignore_eos=True))
    seconds = [o.token_ids[1] for o in outs if o.token_ids[0] == t1]
    s, calls = llm.engine.stats, llm.engine.proposer.stats
    assert 0 < s.spec_num_accepted_tokens < s.spec_num_draft_tokens  # the draft is poor, not useless
    assert (calls.num_direct_calls > 0) == (transport == "direct")  # the path under test was taken
    assert len(seconds) > 300 and set(seconds) <= set(top)
    counts = torch.tensor([seconds.count(t) for t in top], dtype=torch.float64)
    stat = chisquare(counts.numpy(), (p * len(seconds)).numpy())
    assert stat.pvalue > 1e-3, (counts.tolist(), (p * len(seconds)).tolist())
    engine = llm.engine
    assert not engine.has_unfinished_requests() and engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    wait_draft_worker_free(handle)  # every finished sequence was released there
