"""The ``offload`` expert backend, token-exact against transformers: every MoE architecture with
a budget of one expert per layer (top-2 routing: every step of every layer misses), experts
read from the safetensors file on demand; batched, staggered and preempted. Its counters and
the resident memory of a process that runs it are checked too."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from services.engine import LLM, SamplingParams
from services.engine.make_model import make_model
from services.engine.model.expert_backends.offload import OffloadExperts
from services.engine.model_config import ModelConfig
from tests.engine.hf_oracle import hf_greedy
from tests.engine.test_engine_vs_hf import NEW_TOKENS, check_against_hf, prompts

MOE_ARCHS = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe"]
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=1)


def one_expert_per_layer(path: str) -> dict:
    """``experts`` options whose byte budget holds exactly one fp32 expert per MoE layer."""
    c = ModelConfig.from_pretrained(path)
    moe_layers = sum(map(c.is_moe_layer, range(c.num_layers)))
    return {"backend": "offload", "cache_bytes": moe_layers * 3 * c.moe_intermediate_size * c.hidden_size * 4}


def offload_layers(llm: LLM) -> list[OffloadExperts]:
    return [m for m in llm.engine.model.modules() if isinstance(m, OffloadExperts)]


def check_counters(llm: LLM, prefetch: bool = True) -> None:
    layers = offload_layers(llm)
    assert layers and all(b.cache.num_slots == 1 and b.store.__class__.__name__ == "FileStore" for b in layers)
    stats = llm.engine.snapshot_stats().experts
    assert [s.layer for s in stats] == [b.spec.layer for b in layers]
    for s in stats:
        assert s.backend == "offload" and s.misses > 0 and s.resident_bytes == s.capacity_bytes
        assert s.bytes_loaded == (s.misses + s.prefetch_loads) * s.capacity_bytes
        assert s.window_uses == s.hits + s.misses  # a short run: the whole run is in the trace
        assert s.window_hits == s.hits
        if not prefetch:  # demand paging only: no policy beats Belady's MIN
            assert s.window_hits <= s.window_oracle_hits


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_batch_together_matches_transformers(arch, model_dir):
    path = model_dir(arch)
    llm = LLM(path, device="cpu", max_num_batched_tokens=24, num_kv_blocks=64, block_size=8,
              experts=one_expert_per_layer(path))
    batch = prompts(llm.engine.model_config.vocab_size)
    outputs = llm.generate(batch, GREEDY)
    check_against_hf(path, batch, outputs)
    check_counters(llm)


@pytest.mark.parametrize("arch,policy,prefetch", [("tiny-mixtral", "lfu", False), ("tiny-qwen2-moe", "decay", True),
                                                  ("tiny-qwen3-moe", "lru", True)])
def test_staggered_arrivals_match_transformers(arch, policy, prefetch, model_dir):
    path = model_dir(arch)
    experts = dict(one_expert_per_layer(path), policy=policy, prefetch=prefetch)
    llm = LLM(path, device="cpu", max_num_batched_tokens=16, num_kv_blocks=64, block_size=8, experts=experts)
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
    check_counters(llm, prefetch)
    # prefetch loads into the next MoE layer: every one but the first gets some
    assert all((s.prefetch_loads > 0) == prefetch for s in engine.snapshot_stats().experts[1:])


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_preemption_keeps_outputs_identical(arch, model_dir):
    # 6 requests x (40 prompt + 24 new) tokens need 6 x 8 blocks of 8; the pool has 20
    path = model_dir(arch)
    llm = LLM(path, device="cpu", block_size=8, num_kv_blocks=20, max_num_batched_tokens=64,
              experts=one_expert_per_layer(path))
    vocab = llm.engine.model_config.vocab_size
    batch = [[random.Random(10 + i).randrange(3, vocab) for _ in range(40)] for i in range(6)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outputs = llm.generate(batch, params)
    assert llm.engine.stats.num_preemptions > 0
    for ids, out in zip(batch, outputs):
        assert out.token_ids == hf_greedy(path, ids, 24)[0]
    assert llm.engine.kv.num_free_blocks == 20
    check_counters(llm)


# --- resident memory --------------------------------------------------------------------------

RSS_SCRIPT = r"""
import json, sys
def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
from services.engine import LLM, SamplingParams
params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
# a dense model first: the kernels' library, thread pools and tokenizer code are in "before"
LLM(sys.argv[3], device="cpu", num_kv_blocks=16, block_size=16).generate([[5, 6, 7, 8] * 8] * 2, params)
before = rss()
llm = LLM(sys.argv[1], device="cpu", num_kv_blocks=16, block_size=16, experts=json.loads(sys.argv[2]))
out = llm.generate([[5, 6, 7, 8] * 8] * 2, params)
print(json.dumps({"before": before, "after": rss(), "tokens": out[0].token_ids}))
"""


@pytest.fixture(scope="module")
def wide_moe(tmp_path_factory) -> str:
    """Mixtral with 2 x 32 experts of 3 MiB each (192 MiB of experts, fp32) and ~1 MiB of the rest."""
    return str(make_model("tiny-mixtral", tmp_path_factory.mktemp("wide-moe"), overrides={
        "hidden_size": 256, "intermediate_size": 1024, "num_local_experts": 32, "vocab_size": 512}))


def measure(path: str, experts: dict, warmup: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, path, json.dumps(experts), warmup], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_offload_keeps_resident_memory_within_budget_plus_dense_weights(wide_moe, model_dir):
    expert = 3 * 256 * 1024 * 4  # one fp32 expert: 3 MiB
    experts_total = 2 * 32 * expert  # 192 MiB
    warmup = model_dir("tiny-llama")
    local = measure(wide_moe, {"backend": "local"}, warmup)
    offload = measure(wide_moe, {"backend": "offload", "cache_bytes": 4 * expert}, warmup)  # 2 slots per layer
    assert offload["tokens"] == local["tokens"]
    grew_local = local["after"]["VmHWM"] - local["before"]["VmRSS"]
    grew_offload = offload["after"]["VmHWM"] - offload["before"]["VmRSS"]
    # dense weights (~1.5 MiB), KV (16 blocks x 16 tokens x 2 layers x 2 x 128 x 4 B = 0.5 MiB),
    # activations, tokenizer and allocator slack: well under 40 MiB on this model
    assert grew_offload <= 4 * expert + 40 * 2**20, (grew_offload, grew_local)
    assert grew_local >= experts_total, (grew_local, local)  # the measurement sees the experts
