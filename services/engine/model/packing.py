"""CPU weight layout, applied to a built and loaded model (not as branches inside it).

On AVX2 CPUs with torch's MKL, ``x @ W^T`` with ``W`` stored [out, in] (the ``nn.Linear``
layout) runs decode-shaped GEMMs (a handful of rows) markedly slower than ``x @ Wt`` with
``Wt`` stored [in, out] contiguous: measured on the 2-core box, one thread, M = 1:
768->4096 0.70 ms vs 0.27 ms, 768->32000 7.0 ms vs 4.9 ms; large M is on par. So on CPU
every dense projection keeps its weight transposed. The transposed copy replaces the
original (no extra memory), except a tied LM head, which stays shared with the embedding.
"""

from __future__ import annotations

import torch
from torch import nn


class TransposedLinear(nn.Module):
    """``y = x @ weight_t + bias`` with ``weight_t`` [in, out] contiguous."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        flat = x.reshape(-1, self.in_features)
        out = torch.mm(flat, self.weight_t) if self.bias is None else torch.addmm(self.bias, flat, self.weight_t)
        return out.view(*x.shape[:-1], self.out_features)


def transpose_linears(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by a ``TransposedLinear`` (in place)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, TransposedLinear(child))
        else:
            transpose_linears(child)
    return model
