"""Building blocks shared by every decoder: RMSNorm, rotary embedding, gated SiLU MLP.

Shapes: T = tokens in the flat batch, D = hidden size, H = heads, Dh = head_dim,
I = MLP intermediate size.

Rotary embedding follows the Hugging Face "rotate_half" (GPT-NeoX) layout: a head vector
``x = [x1, x2]`` (halves of Dh/2) becomes ``[x1 cos - x2 sin, x2 cos + x1 sin]`` with
angle ``position * inv_freq[i]``. Inverse frequencies for the "linear" and "llama3" rope
types are computed with the same float32 operations as ``transformers`` so that results
match bit for bit before the trigonometry.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, computed in float32."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps
        self.ops = None  # the engine's CPU kernels (services/engine/kernels), set by use_cpu_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> [..., dim], same dtype."""
        if self.ops is not None and x.dim() == 2 and x.stride(-1) == 1:
            return self.ops.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        normed = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return self.weight * normed.to(x.dtype)  # HF order: cast back, then scale

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The residual stream's ``residual += x`` (in place), then the norm of the sum.
        x, residual [T, dim] -> [T, dim]."""
        if self.ops is not None and x.stride(-1) == 1 and residual.stride(-1) == 1:
            return self.ops.rms_norm(x, self.weight, self.eps, residual)
        return self(residual.add_(x))


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] float32 for rope type default / linear / llama3."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = scaling["rope_type"] if scaling else "default"
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope type {rope_type!r} is not supported")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling: low frequencies / factor, high kept, smooth in between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin table for every position up to ``max_positions``, built once, indexed per step."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        # [max_positions, head_dim]: cos in the first half, sin in the second (float32)
        self.register_buffer("cos_sin", torch.empty(max_positions, head_dim), persistent=False)
        self.build_cache()

    @torch.no_grad()
    def build_cache(self) -> None:
        """(Re)compute the table in place on the buffer's device (call after ``to_empty``)."""
        if self.cos_sin.is_meta:
            return
        device = self.cos_sin.device
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(device)
        positions = torch.arange(self.max_positions, device=device, dtype=torch.int64).float()
        freqs = positions[:, None] * inv_freq[None, :]  # [P, Dh/2], same product as transformers
        self.cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64 -> (cos, sin), each [T, 1, Dh/2] in ``dtype``, broadcastable over heads."""
        cos, sin = self.cos_sin[positions].to(dtype).unsqueeze(1).chunk(2, dim=-1)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, Dh] by cos/sin [T, 1, Dh/2] -> new tensor [T, H, Dh] (one allocation)."""
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate rows first, then up) -> silu(gate) * up [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward ``down(silu(gate(x)) * up(x))`` with gate and up fused in one GEMM."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.intermediate_size = intermediate_size
        # weight [2I, D]: rows [0, I) = HF gate_proj, rows [I, 2I) = HF up_proj
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, dtype=dtype)
        self.ops = None  # the engine's CPU kernels, set by use_cpu_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        gate_up = self.gate_up_proj(x)
        act = self.ops.silu_and_mul(gate_up) if self.ops is not None else silu_and_mul(gate_up)
        return self.down_proj(act)
