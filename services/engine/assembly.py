"""The one place an engine is put together from its config, in this order:

    resolve device/dtype -> build the model with its expert backend -> load the weights
    -> quantize -> CPU backend (kernels) -> tokenizer, KV pool, scheduler, runner -> proposer + policy

Each step gets only its part of the ``EngineConfig``; the variants (expert backend, quantizer,
proposer) come from their registries with the host's ``HostDeps`` (services/engine/plugins.py).
The expert backend is chosen before the weights are loaded because the loader installs each
expert through it; the proposer comes last because it is built for the target (``TargetInfo``:
a draft model checks the target's tokenizer and sizes its own KV pool like the target's).
``LLMEngine`` calls ``assemble`` and nothing else builds engine parts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.engine.checkpoint import checkpoint_fingerprint
from services.engine.config import EngineConfig, resolve_device
from services.engine.kv_cache import KVCacheManager, hash_seed
from services.engine.malloc import keep_large_buffers_in_heap
from services.engine.model.cpu_backend import use_cpu_backend
from services.engine.model.expert_backends import EXPERT_BACKENDS
from services.engine.model.registry import load_model
from services.engine.plugins import HostDeps
from services.engine.quantization import QUANTIZERS
from services.engine.request import Request
from services.engine.runner import ModelRunner, kv_bytes_per_block
from services.engine.sampler import Sampler
from services.engine.scheduler import Scheduler
from services.engine.spec_decode import PROPOSERS
from services.engine.spec_decode.base import Proposer, TargetInfo
from services.engine.spec_decode.policy import PolicyConfig, SpeculationPolicy
from services.engine.tokenizer import Tokenizer


@dataclass
class EngineParts:
    """What ``assemble`` built; ``LLMEngine`` owns these for its lifetime."""

    device: torch.device  # where weights, KV and activations live
    dtype: torch.dtype  # weights, activations and KV
    model: torch.nn.Module  # the loaded CausalLM (quantized, CPU backend installed)
    cpu_backend: str  # "kernels" | "onednn" | "torch" (services/engine/model/cpu_backend.py)
    tokenizer: Tokenizer  # the model's own tokenizer
    fingerprint: str  # the checkpoint's identity (prefix cache keys)
    max_model_len: int  # prompt + output tokens at most
    kv: KVCacheManager  # block pool, tables, prefix index
    scheduler: Scheduler  # batching and admission over ``kv``
    runner: ModelRunner  # runs a step's tokens through ``model`` over the paged caches
    proposer: Proposer | None  # speculative proposer (services/engine/spec_decode); None = off
    policy: SpeculationPolicy | None  # when to propose (spec_decode/policy.py); None with no proposer


def assemble(config: EngineConfig, deps: HostDeps,
             before_free: Callable[[Request, str], None] | None = None) -> EngineParts:
    """Build every part of an engine for ``config``. ``before_free(req, reason)`` is called by the
    scheduler when a request finishes, before its blocks are freed."""
    device, dtype = resolve_device(config)
    if device.type == "cpu":
        keep_large_buffers_in_heap()  # see malloc.py: +15-25% decode throughput measured
    experts = EXPERT_BACKENDS.create(config.experts, deps)
    model = load_model(config.model, device=device, dtype=dtype, expert_backend=experts)
    model = QUANTIZERS.create(config.quantization, deps)(model)
    cpu_backend = use_cpu_backend(model)  # CPU fp32 / bf16 kernels where they apply; see cpu_backend.py
    mc = model.config
    max_model_len = config.max_model_len or mc.max_position_embeddings
    if max_model_len > mc.max_position_embeddings:
        raise ValueError(f"max_model_len: {max_model_len} exceeds the model's max_position_embeddings "
                         f"({mc.max_position_embeddings})")
    cache = config.cache
    num_blocks = cache.num_kv_blocks or max(1, cache.memory_bytes // kv_bytes_per_block(
        mc.num_layers, cache.block_size, mc.num_kv_heads, mc.head_dim, dtype))
    fingerprint = checkpoint_fingerprint(config.model)
    seed = hash_seed(fingerprint, str(dtype).removeprefix("torch."), cache.block_size)
    kv = KVCacheManager(num_blocks, cache.block_size, seed, cache.enable_prefix_caching)
    scheduler = Scheduler(config.scheduler, kv, before_free=before_free)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    runner = ModelRunner(model, kv, num_blocks, device, dtype, Sampler(generator))
    tokenizer = Tokenizer(config.model)
    proposer, policy = None, None
    if config.speculative is not None:
        target = TargetInfo(mc, tokenizer, device, dtype, cache.block_size, num_blocks, max_model_len, config.seed)
        proposer = PROPOSERS.create(config.speculative, deps)(target)
        policy = SpeculationPolicy(PolicyConfig(adaptive=getattr(config.speculative.options, "adaptive", True)))
    return EngineParts(device, dtype, model, cpu_backend, tokenizer, fingerprint, max_model_len,
                       kv, scheduler, runner, proposer, policy)
