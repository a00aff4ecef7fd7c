"""The ``remote`` expert backend, token-exact against transformers: every MoE architecture with
its experts in 2 shards (ExpertService + ExpertShard, each loading only its experts from the
safetensors file), called through in-process stand-ins of their Serve handles (the deployments
themselves: tests/integration/test_expert_remote_serve.py); batched, staggered and preempted.
Outputs are also identical to ``local`` (logprobs included), and no expert weight is resident
in the engine."""

from __future__ import annotations

import random

import pytest

from services.engine import LLM, SamplingParams
from services.engine.model.expert_backends.remote import RemoteExperts
from services.engine.model.experts import LocalExperts
from tests.engine.hf_oracle import hf_greedy
from tests.engine.test_engine_vs_hf import check_against_hf, prompts
from tests.engine.test_expert_offload_vs_hf import GREEDY, MOE_ARCHS
from tests.expert_handles import remote_llm


def check_remote(llm, shards, log) -> None:
    model = llm.engine.model
    assert not any(isinstance(m, LocalExperts) for m in model.modules())
    assert any(isinstance(m, RemoteExperts) for m in model.modules())
    assert not any(".experts." in name for name, _ in model.named_parameters())  # no expert weights here
    totals = log.totals()
    assert totals.num_calls > 0 and totals.num_failures == 0
    assert all(s.svc.stats.num_calls > 0 for s in shards)  # both shards served rows
    assert sum(s.svc.stats.num_calls for s in shards) == totals.num_calls


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_batch_together_matches_transformers_and_local(arch, model_dir):
    path = model_dir(arch)
    options = dict(max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    llm, shards, log = remote_llm(path, **options)
    batch = prompts(llm.engine.model_config.vocab_size)
    outputs = llm.generate(batch, GREEDY)
    check_against_hf(path, batch, outputs)
    local = LLM(path, device="cpu", **options).generate(batch, GREEDY)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in local]
    assert [o.logprobs for o in outputs] == [o.logprobs for o in local]  # bit-identical logits
    check_remote(llm, shards, log)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_staggered_arrivals_match_transformers(arch, model_dir):
    path = model_dir(arch)
    llm, shards, log = remote_llm(path, max_num_batched_tokens=16, num_kv_blocks=64, block_size=8)
    engine = llm.engine
    batch = prompts(engine.model_config.vocab_size, seed=1)
    reqs = []
    for ids in batch:  # a new request every 3 steps, while earlier ones decode
        reqs.append(engine.add_request(ids, GREEDY))
        for _ in range(3):
            engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    outputs = [type("O", (), {"token_ids": r.output_token_ids, "logprobs": r.logprobs}) for r in reqs]
    check_against_hf(path, batch, outputs)
    check_remote(llm, shards, log)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_preemption_keeps_outputs_identical(arch, model_dir):
    # 6 requests x (40 prompt + 24 new) tokens need 6 x 8 blocks of 8; the pool has 20
    path = model_dir(arch)
    llm, shards, log = remote_llm(path, block_size=8, num_kv_blocks=20, max_num_batched_tokens=64)
    vocab = llm.engine.model_config.vocab_size
    batch = [[random.Random(10 + i).randrange(3, vocab) for _ in range(40)] for i in range(6)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outputs = llm.generate(batch, params)
    assert llm.engine.stats.num_preemptions > 0
    for ids, out in zip(batch, outputs):
        assert out.token_ids == hf_greedy(path, ids, 24)[0]
    assert llm.engine.kv.num_free_blocks == 20
    check_remote(llm, shards, log)
