"""One decoder-only transformer for every supported architecture, over the paged KV cache.

Llama, Mistral, Qwen2/3 and their MoE variants differ only in flags of ``ModelConfig``:
q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3), sliding window (Mistral), tied LM head,
and whether a layer's feed-forward is a dense MLP or a Mixture-of-Experts block.

Shapes: T = tokens of the flat batch (all sequences concatenated, no batch dim), D = hidden
size, H / Hkv = query / key-value heads, Dh = head_dim, V = vocab size.

Weights are fused at load time (see ``registry.py``): ``qkv_proj`` holds q, k, v rows in
that order, ``gate_up_proj`` holds gate then up rows.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from services.engine.model.attention import AttentionMetadata, PagedAttention
from services.engine.model.experts import ExpertFactory, ExpertSpec, LocalExperts, MoEBlock
from services.engine.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rope
from services.engine.model.packing import SMALL_ROWS, PanelLinear
from services.engine.model_config import ModelConfig


class Attention(nn.Module):
    """Fused QKV projection, optional q/k norm, rope, paged attention, output projection."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        # weight [(H + 2 Hkv) * Dh, D]: q rows, then k rows, then v rows
        self.qkv_proj = nn.Linear(c.hidden_size, self.q_size + 2 * self.kv_size, bias=c.attention_bias, dtype=dtype)
        self.o_proj = nn.Linear(self.q_size, c.hidden_size, bias=c.o_proj_bias, dtype=dtype)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype) if c.qk_norm else None
        self.attn = PagedAttention(c.num_heads, c.num_kv_heads, c.head_dim, scale=c.head_dim ** -0.5,
                                   sliding_window=c.sliding_window)
        self.ops = None  # the engine's CPU kernels, set by use_cpu_kernels (rope in place)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """x [T, D], cos/sin [T, 1, Dh/2], kv_cache [2, Hkv, blocks, block_size, Dh] -> [T, D]."""
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) Dh]
        qk_size = self.q_size + self.kv_size
        v = qkv[:, qk_size:].view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is None and self.ops is not None:  # rotate q and k inside qkv, one kernel call
            self.ops.rope_(qkv[:, :qk_size].view(t, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)
            q = qkv[:, :self.q_size].view(t, self.num_heads, self.head_dim)
            k = qkv[:, self.q_size:qk_size].view(t, self.num_kv_heads, self.head_dim)
        elif self.q_norm is None:  # rotate q and k heads together in one pass
            qk = apply_rope(qkv[:, :qk_size].view(t, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        else:  # Qwen3: RMSNorm per head before rope
            q = apply_rope(self.q_norm(qkv[:, :self.q_size].view(t, self.num_heads, self.head_dim)), cos, sin)
            k = apply_rope(self.k_norm(qkv[:, self.q_size:qk_size].view(t, self.num_kv_heads, self.head_dim)),
                           cos, sin)
        out = self.attn(q, k, v, kv_cache, meta)  # [T, H, Dh]
        return self.o_proj(out.reshape(t, self.q_size))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``."""

    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype, expert_backend: ExpertFactory):
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.self_attn = Attention(c, dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        if c.is_moe_layer(layer):
            moe_layers = sum(map(c.is_moe_layer, range(c.num_layers)))
            spec = ExpertSpec(layer, c.num_experts, c.hidden_size, c.moe_intermediate_size, dtype, moe_layers)
            self.mlp = MoEBlock(spec, c.num_experts_per_tok, c.norm_topk_prob,
                                c.shared_expert_intermediate_size, expert_backend)
        else:
            self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, dtype)

    def fusable(self) -> bool:
        """A dense MLP, no q/k norm, panel64 weights: the layer the kernels' ``DecodeStack`` runs."""
        return (isinstance(self.mlp, GatedMLP) and self.self_attn.q_norm is None
                and isinstance(self.mlp.down_proj, PanelLinear))

    def decode_weights(self) -> tuple:
        """The arguments of ``DecodeStack.add_layer`` for this (``fusable``) layer, in order."""
        a, mlp, pa = self.self_attn, self.mlp, self.self_attn.attn
        return (self.input_layernorm.weight, self.post_attention_layernorm.weight, self.input_layernorm.eps,
                a.qkv_proj.weight, a.qkv_proj.bias, a.o_proj.weight, a.o_proj.bias, mlp.gate_up_proj.weight,
                mlp.down_proj.weight, a.num_heads, a.num_kv_heads, a.head_dim, mlp.intermediate_size, pa.scale,
                pa.sliding_window or 0)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D]: the previous layer's output (the embeddings for layer 0, ``residual`` None);
        residual [T, D]: the residual stream before adding x. Returns (this layer's output, the
        residual stream before adding it); ``residual`` is updated in place. Same sums as
        ``h = x + attn(norm(x)); out = h + ffn(norm(h))``, with each add fused into the next norm."""
        if residual is None:
            residual, normed = x, self.input_layernorm(x)
        else:
            normed = self.input_layernorm.add_forward(x, residual)
        attn = self.self_attn(normed, cos, sin, kv_cache, meta)
        return self.mlp(self.post_attention_layernorm.add_forward(attn, residual)), residual


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head, driven by ``ModelConfig``.

    ``forward`` returns final-normed hidden states for every input token; the runner picks
    the rows it samples from and calls ``compute_logits`` on those only.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 expert_backend: ExpertFactory = LocalExperts):
        super().__init__()
        c = config
        self.config = config
        self.dtype = dtype
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(c, i, dtype, expert_backend) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        # None when tied: compute_logits uses embed_tokens.weight
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False,
                                                                    dtype=dtype)
        self.linear_fn = F.linear  # GEMM of the tied LM head; a CPU backend may swap it (packing.py)
        self.rotary = RotaryEmbedding(c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling)
        # every layer in one kernel call for decode-only steps of <= decode_stack_rows rows; the
        # CPU backend sets both when all layers are ``fusable`` (cpu_backend.py), else None
        self.decode_stack = None
        self.decode_stack_rows = SMALL_ROWS

    def uses_decode_stack(self, num_tokens: int, meta: AttentionMetadata) -> bool:
        """A decode-only step of at most ``decode_stack_rows`` rows on a model with a decode stack."""
        return self.decode_stack is not None and not meta.prefills and num_tokens <= self.decode_stack_rows

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids [T] int64, positions [T] int64 (position of each token in its sequence),
        kv_caches: one [2, Hkv, blocks, block_size, Dh] tensor per layer (written in place)
        -> hidden [T, D] after the final norm."""
        if self.uses_decode_stack(input_ids.shape[0], meta):  # embedding to final norm in one call
            return self.decode_stack.forward(input_ids, positions, kv_caches, meta.slot_mapping,
                                             meta.decode_block_tables, meta.decode_seq_lens)
        cos, sin = self.rotary(positions, self.dtype)
        x, residual = self.embed_tokens(input_ids), None  # [T, D]; the lookup is a new tensor
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, cos, sin, kv_cache, meta)
        return self.norm.add_forward(x, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> logits [N, V] float32."""
        if self.lm_head is None:
            return self.linear_fn(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()
