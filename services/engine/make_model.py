"""Write Hugging Face checkpoints with random weights, by name, for tests and benchmarks.

``make_model("tiny-llama", out_dir)`` writes ``config.json`` (loadable by
``transformers.AutoModelForCausalLM``), ``model.safetensors`` (or shards plus
``model.safetensors.index.json``), ``generation_config.json`` and ``tokenizer.json``.

Tensor names are the ones real Hub checkpoints use (per-expert MoE tensors such as
``block_sparse_moe.experts.0.w1.weight``), never transformers' in-memory fused layout.

Random init is chosen so that greedy decoding has clear margins: projections and the LM
head are ``N(0, 1/fan_in)`` (each layer adds a contribution of the residual's size, so
attention matters), biases ``N(0, 0.01)``, norm weights ``1 + N(0, 0.01)``, except the final
norm, scaled by ``LOGIT_SCALE`` so that logits have std ~10 (peaked, wide top-1 margins;
the scale does not change which token is the argmax). Untied embeddings are ``N(0, 1)``.

The tokenizer is a byte-level BPE trained in about a second on ``pydoc_data.topics``
(bundled with CPython), vocab ``min(model vocab, 4096)``, with special tokens
``<|bos|>``=0, ``<|eos|>``=1, ``<|pad|>``=2, ``<|im_end|>``=3.
"""

from __future__ import annotations

import functools
import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.engine.model_config import ModelConfig

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|im_end|>")  # ids 0..3
BOS_ID, EOS_ID, IM_END_ID = 0, 1, 3
MAX_TOKENIZER_VOCAB = 4096
LOGIT_SCALE = 10.0  # final norm weight ~10: logit std ~10, peaked, clear greedy margins

_MODEL_TYPES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


@dataclass(frozen=True)
class ModelShape:
    """A named checkpoint recipe."""

    architecture: str  # HF class name written to config.json "architectures"
    config: dict = field(hash=False)  # config.json fields on top of the defaults below
    shards: int = 1  # >1: write model-0000i-of-0000n.safetensors + index.json
    save_dtype: torch.dtype = torch.float32  # dtype of the stored weights
    eos_token_id: int | list[int] = EOS_ID  # generation_config.json eos (a list tests multi-eos)


_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 2048}
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}

SHAPES: dict[str, ModelShape] = {
    "tiny-llama": ModelShape("LlamaForCausalLM", dict(_TINY)),
    "tiny-llama3": ModelShape("LlamaForCausalLM", dict(_TINY, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE),
                              shards=2),
    "tiny-mistral": ModelShape("MistralForCausalLM", dict(_TINY, sliding_window=4096)),
    "tiny-qwen2": ModelShape("Qwen2ForCausalLM", dict(_TINY, num_hidden_layers=3, rope_theta=1e6),
                             eos_token_id=[EOS_ID, IM_END_ID]),
    "tiny-qwen2-tied": ModelShape("Qwen2ForCausalLM", dict(_TINY, tie_word_embeddings=True, rope_theta=1e6),
                                  eos_token_id=[EOS_ID, IM_END_ID]),
    "tiny-qwen3": ModelShape("Qwen3ForCausalLM", dict(  # transformers-5 style rope keys, head_dim != D/H
        _TINY, head_dim=32, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        eos_token_id=[EOS_ID, IM_END_ID]),
    "tiny-mixtral": ModelShape("MixtralForCausalLM", dict(
        _TINY, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6, sliding_window=None)),
    "tiny-qwen2-moe": ModelShape("Qwen2MoeForCausalLM", dict(
        _TINY, num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=96, mlp_only_layers=[1], norm_topk_prob=False), shards=3,
        eos_token_id=[EOS_ID, IM_END_ID]),
    "tiny-qwen3-moe": ModelShape("Qwen3MoeForCausalLM", dict(
        _TINY, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]), eos_token_id=[EOS_ID, IM_END_ID]),
    # benchmark shapes
    "dense-100m": ModelShape("LlamaForCausalLM", dict(
        hidden_size=768, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4,
        intermediate_size=2048, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096),
        save_dtype=torch.bfloat16),
    "qwen2.5-0.5b": ModelShape("Qwen2ForCausalLM", dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
        max_position_embeddings=32768, use_sliding_window=False, max_window_layers=21), save_dtype=torch.bfloat16),
    "tiny-moe": ModelShape("MixtralForCausalLM", dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=1408, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2,
        rope_theta=1e6, max_position_embeddings=4096, sliding_window=None), save_dtype=torch.bfloat16),
    # experts are 95% of its 4.7 GB (bf16): the expert-offload benchmark's model (bench/moe.py)
    "moe-1b": ModelShape("MixtralForCausalLM", dict(
        hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
        intermediate_size=2816, vocab_size=32000, num_local_experts=16, num_experts_per_tok=2,
        rope_theta=1e6, max_position_embeddings=4096, sliding_window=None), shards=4, save_dtype=torch.bfloat16),
}


def list_models() -> list[str]:
    """Names accepted by ``make_model``."""
    return list(SHAPES)


def make_model(name: str, out_dir: str | Path, seed: int = 0, *, shards: int | None = None,
               overrides: dict | None = None) -> Path:
    """Write checkpoint ``name`` with random weights (seeded) into ``out_dir``; return the path.

    ``shards`` overrides the shape's shard count; ``overrides`` updates config.json fields
    (e.g. ``{"sliding_window": 8}``) before the weights are drawn.
    """
    if name not in SHAPES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(SHAPES)}")
    shape = SHAPES[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = _config_json(shape, overrides or {})
    config = ModelConfig.from_dict(raw, source=f"{name} config")
    # the name joins the seed so that equally shaped models (tiny-llama, tiny-mistral) differ
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 1000 + seed)
    tensors = random_weights(config, gen, shape.save_dtype)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    generation = {"bos_token_id": BOS_ID, "eos_token_id": shape.eos_token_id, "pad_token_id": 2}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _write_safetensors(tensors, out, shards or shape.shards, metadata={"format": "pt", "seed": str(seed)})
    (out / "tokenizer.json").write_text(_tokenizer_json(min(config.vocab_size, MAX_TOKENIZER_VOCAB)))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID], "pad_token": SPECIAL_TOKENS[2]}, indent=2) + "\n")
    return out


def _config_json(shape: ModelShape, overrides: dict) -> dict:
    raw = {"architectures": [shape.architecture], "model_type": _MODEL_TYPES[shape.architecture],
           "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
           "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": 2,
           "initializer_range": 0.02, "use_cache": True,
           "torch_dtype": str(shape.save_dtype).removeprefix("torch."), "attention_dropout": 0.0}
    raw.update(shape.config)
    raw.update(overrides)
    return raw


def hf_tensor_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, in a fixed order, as Hub checkpoints name them."""
    d, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, d)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (d,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (d,)
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[f"{p}.self_attn.{proj}.weight"] = (rows, d)
            if c.attention_bias:
                shapes[f"{p}.self_attn.{proj}.bias"] = (rows,)
        shapes[f"{p}.self_attn.o_proj.weight"] = (d, q)
        if c.o_proj_bias:
            shapes[f"{p}.self_attn.o_proj.bias"] = (d,)
        if c.qk_norm:
            shapes[f"{p}.self_attn.q_norm.weight"] = (c.head_dim,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (c.head_dim,)
        shapes.update(_ffn_shapes(c, i, p))
    shapes["model.norm.weight"] = (d,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, d)
    return shapes


def _mlp_shapes(prefix: str, d: int, i: int, names=("gate_proj", "up_proj", "down_proj")) -> dict:
    gate, up, down = names
    return {f"{prefix}.{gate}.weight": (i, d), f"{prefix}.{up}.weight": (i, d), f"{prefix}.{down}.weight": (d, i)}


def _ffn_shapes(c: ModelConfig, layer: int, p: str) -> dict[str, tuple[int, ...]]:
    d = c.hidden_size
    if not c.is_moe_layer(layer):
        return _mlp_shapes(f"{p}.mlp", d, c.intermediate_size)
    if c.architecture == "MixtralForCausalLM":
        shapes = {f"{p}.block_sparse_moe.gate.weight": (c.num_experts, d)}
        for e in range(c.num_experts):
            shapes.update(_mlp_shapes(f"{p}.block_sparse_moe.experts.{e}", d, c.moe_intermediate_size,
                                      ("w1", "w3", "w2")))
        return shapes
    shapes = {f"{p}.mlp.gate.weight": (c.num_experts, d)}
    for e in range(c.num_experts):
        shapes.update(_mlp_shapes(f"{p}.mlp.experts.{e}", d, c.moe_intermediate_size))
    if c.shared_expert_intermediate_size:
        shapes.update(_mlp_shapes(f"{p}.mlp.shared_expert", d, c.shared_expert_intermediate_size))
        shapes[f"{p}.mlp.shared_expert_gate.weight"] = (1, d)
    return shapes


def _init_std(c: ModelConfig, name: str, shape: tuple[int, ...]) -> float:
    """Standard deviation of the random normal init of tensor ``name``."""
    if name == "lm_head.weight" or (name == "model.embed_tokens.weight" and c.tie_word_embeddings):
        return 1.0 / math.sqrt(c.hidden_size)  # unit-variance logits before the final norm's scale
    if name == "model.embed_tokens.weight":
        return 1.0
    if name.endswith(".bias"):
        return 0.1
    if name.endswith("gate.weight") and "_proj" not in name:  # MoE router: clear top-k
        return 2.0 / math.sqrt(shape[1])
    return 1.0 / math.sqrt(shape[1])


def random_weights(c: ModelConfig, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random tensors for every checkpoint name of ``c`` (see module docstring for the scales)."""
    tensors = {}
    for name, shape in hf_tensor_shapes(c).items():
        if name.endswith("norm.weight"):
            scale = LOGIT_SCALE if name == "model.norm.weight" else 1.0
            t = scale * (1.0 + 0.1 * torch.randn(shape, generator=gen))
        else:
            t = torch.randn(shape, generator=gen).mul_(_init_std(c, name, shape))
        tensors[name] = t.to(dtype)
    return tensors


def _write_safetensors(tensors: dict[str, torch.Tensor], out: Path, shards: int, metadata: dict) -> None:
    """One ``model.safetensors``, or ``shards`` files of about equal bytes plus the index."""
    for stale in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
        stale.unlink()
    if shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
        return
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    groups: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    done = 0
    for name, t in tensors.items():
        groups[min(shards - 1, done * shards // total)][name] = t
        done += t.numel() * t.element_size()
    groups = [g for g in groups if g]
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(out / file), metadata=metadata)
        weight_map.update({name: file for name in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    """Byte-level BPE trained on CPython's bundled docs; returns tokenizer.json text."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((topics[k] for k in sorted(topics)), trainer)
    return tok.to_str()
