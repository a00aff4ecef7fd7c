"""The student: a small Llama with the target's tokenizer, its initialisation and its checkpoint.

The module is the embedded model's training Llama (services/engine/default_model/train.py:
RMSNorm, HF rotary, GQA, SiLU MLP, LM head tied to the embedding; numerically the same as
transformers' ``LlamaForCausalLM`` and so as our engine's), at the target's vocabulary, rope
base and context length.

With V = 49,152 the embedding is most of the draft (V x 256 = 12.6M of ~16M parameters), so it
starts as a low-rank projection of the target's: E_t [V, D_t] = U S W^T (SVD), the student's
E_s = E_t W[:, :d] [V, d] (the d principal directions; tokens the target places near each other
stay near). Dimensions past D_t, if any, start at the usual small random values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from services.engine.default_model.train import Llama, LlamaConfig


@dataclass(frozen=True)
class StudentShape:
    """The draft's architecture (besides what it takes from the target)."""

    hidden_size: int = 256  # residual width d
    num_layers: int = 4  # decoder layers
    num_heads: int = 4  # query heads (head_dim = hidden_size / num_heads)
    num_kv_heads: int = 2  # key/value heads (GQA)
    intermediate_size: int = 768  # MLP width

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"num_heads: hidden_size {self.hidden_size} must split into {self.num_heads} "
                             f"heads of an even width")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: {self.num_kv_heads} must divide num_heads {self.num_heads}")


def student_config(shape: StudentShape, target_config) -> LlamaConfig:
    """The student's LlamaConfig: ``shape`` at the target's (a ``ModelConfig``) vocabulary, rope
    base, RMSNorm epsilon and context length."""
    return LlamaConfig(vocab_size=target_config.vocab_size, hidden_size=shape.hidden_size,
                       intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
                       num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                       max_position_embeddings=target_config.max_position_embeddings,
                       rms_norm_eps=target_config.rms_norm_eps, rope_theta=target_config.rope_theta)


@torch.no_grad()
def projected_embedding(target_embedding: torch.Tensor, dim: int, generator: torch.Generator,
                        std: float = 0.02) -> torch.Tensor:
    """target_embedding [V, D_t] -> [V, dim] float32: its coordinates on its top-``dim`` right
    singular vectors (columns past D_t: normal(0, std) from ``generator``)."""
    e = target_embedding.float()
    r = min(dim, e.shape[1])
    _, _, wt = torch.linalg.svd(e, full_matrices=False)  # wt [D_t, D_t], rows = principal directions
    out = torch.empty(e.shape[0], dim)
    out[:, :r] = e @ wt[:r].T
    if dim > r:
        out[:, r:] = torch.randn(e.shape[0], dim - r, generator=generator) * std
    return out


def build_student(shape: StudentShape, target_config, target_embedding: torch.Tensor, seed: int) -> Llama:
    """A fresh student, deterministic in ``seed``, its embedding projected from the target's."""
    torch.manual_seed(seed)
    model = Llama(student_config(shape, target_config))
    model.embed_tokens.weight.data.copy_(
        projected_embedding(target_embedding, shape.hidden_size, torch.Generator().manual_seed(seed)))
    return model


def hf_config(model: Llama, target_config) -> dict:
    """config.json of the draft (a tied ``LlamaForCausalLM`` stored in bfloat16)."""
    c = model.cfg
    eos = list(target_config.eos_token_ids)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": True, "bos_token_id": target_config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos, "torch_dtype": "bfloat16",
    }


def write_draft(out: Path, model: Llama, target_config, tokenizer) -> None:
    """config.json, generation_config.json, model.safetensors (bfloat16, no lm_head: tied) and the
    target's tokenizer (tokenizer.json + tokenizer_config.json with its special tokens and chat
    template) into ``out``: a checkpoint folder ``draft_model`` loads."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(model, target_config), indent=2) + "\n")
    eos = list(target_config.eos_token_ids)
    gen = {"bos_token_id": target_config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    weights = {f"model.{k}": v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(out / "tokenizer.json")
    config = dict(tokenizer.special_tokens)
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template.source
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
