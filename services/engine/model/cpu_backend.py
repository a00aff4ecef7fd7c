"""The CPU fast paths, installed on a built and loaded model (not as branches in the builder).

Three levels, best available first:
- ``kernels``: the engine's compiled kernels (services/engine/kernels; the ISA variant this CPU
  runs best, avx512 or avx2): panel64 linears, fused residual-add + RMSNorm, in-place rope,
  SwiGLU, K/V writes and decode attention that read the paged cache in place, and a causal
  prefill attention that skips the masked half. Needs AVX2 + FMA and a C++ compiler at first use.
- ``onednn``: oneDNN linears with pre-packed weights (packing.py); torch ops for the rest.
- ``kernels-bf16`` (a bf16 model): bf16 weights in pair panels (vdpbf16ps where the CPU has
  AVX512_BF16), fp32 activations, the bf16 KV cache read and written by the same kernels.
- ``torch``: plain torch everywhere (also every non-CPU model, and bf16 MoE models).

Every level gives the same tokens as transformers (tests/unit/test_models_vs_hf.py runs the
kernels and plain torch); they differ only in summation order, so logits match to rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from services.engine.kernels import load_cpu_ops
from services.engine.model.attention import PagedAttention
from services.engine.model.layers import GatedMLP
from services.engine.model.packing import PairPanelLinear, onednn_available, use_bf16_cpu_linears, use_cpu_linears


def use_cpu_kernels(model: nn.Module, ops) -> nn.Module:
    """Point every module with an ``ops`` slot (norms, attention, MLPs) at ``ops``, in place, and
    tell the runner that decode attention reads ``decode_seq_lens`` instead of a mask. The
    kernels' attention takes head_dim = 8, 16, ... 512; other head sizes keep torch's
    attention. A model whose layers are all ``fusable`` (dense, no q/k norm) with such a head size
    also gets ``decode_stack``: every layer of a decode step in one kernel call."""
    head_dim = model.config.head_dim
    attention_ok = head_dim % 8 == 0 and head_dim <= 512
    for module in model.modules():
        if hasattr(module, "ops") and (attention_ok or not isinstance(module, PagedAttention)):
            module.ops = ops
    model.decode_mask_needed = not attention_ok
    layers = list(model.layers)
    if attention_ok and layers and all(layer.fusable() for layer in layers):
        # the stack holds the rope table as built at load (RotaryEmbedding.build_cache)
        model.decode_stack = ops.DecodeStack(model.embed_tokens.weight, model.rotary.cos_sin, model.norm.weight,
                                             model.norm.eps)
        for layer in layers:
            model.decode_stack.add_layer(*layer.decode_weights())
        # the build's limit: 8 rows in avx2 builds, any decode batch up to 512 in avx512 ones
        model.decode_stack_rows = ops.MAX_STACK_ROWS
    return model


def use_cpu_backend(model: nn.Module, kernels: bool = True, variant: str | None = None) -> str:
    """Install the best CPU path on ``model`` (in place); returns its name (see the module
    docstring). ``kernels=False`` skips the compiled kernels; ``variant`` forces a kernel build
    ("avx512", "avx2", "torch"; None = the environment's choice, see services/engine/kernels)."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype not in (torch.float32, torch.bfloat16):
        return "torch"
    ops = load_cpu_ops(variant) if kernels else None
    if param.dtype == torch.bfloat16:
        return use_bf16_kernels(model, ops) if ops is not None and bf16_kernels_fit(model) else "torch"
    if ops is not None:
        use_cpu_linears(model, ops)
        use_cpu_kernels(model, ops)
        return "kernels"
    if onednn_available():
        use_cpu_linears(model)
        return "onednn"
    return "torch"


def bf16_kernels_fit(model: nn.Module) -> bool:
    """The bf16 kernel path takes dense models (no MoE experts) whose head size the kernels'
    attention takes; others keep plain torch bf16."""
    head_dim = model.config.head_dim
    return head_dim % 8 == 0 and head_dim <= 512 and all(isinstance(layer.mlp, GatedMLP) for layer in model.layers)


class WideningEmbedding(nn.Embedding):
    """A bf16 lookup table whose rows come out fp32 (the activations of the bf16 kernel path)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids).float()


def use_bf16_kernels(model: nn.Module, ops) -> str:
    """bf16 weights, fp32 activations, the KV cache in the engine's dtype (bf16): linears become
    ``PairPanelLinear`` (bf16_linear.cpp), the embedding table stays bf16 and its rows are
    widened at lookup, norms and biases become fp32, then the fp32 kernels (which read and write
    a bf16 KV cache) are installed as for an fp32 model. Returns "kernels-bf16"."""
    emb = model.embed_tokens
    model.embed_tokens = WideningEmbedding(emb.num_embeddings, emb.embedding_dim, _weight=emb.weight)
    model.embed_tokens.weight = emb.weight  # the same parameter (a tied head packs it)
    use_bf16_cpu_linears(model, ops)
    keep = {id(model.embed_tokens.weight)} | {id(m.weight) for m in model.modules() if isinstance(m, PairPanelLinear)}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in keep and p.dtype == torch.bfloat16:
                p.data = p.data.float()
    model.dtype = torch.float32  # activations (rope tables are built fp32)
    use_cpu_kernels(model, ops)
    return "kernels-bf16"


__all__ = ["WideningEmbedding", "bf16_kernels_fit", "use_bf16_kernels", "use_cpu_backend", "use_cpu_kernels"]
