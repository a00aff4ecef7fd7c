"""CPU GEMM backend, applied to a built and loaded model (not as branches inside it).

On the 2-core AVX2 box, torch's default fp32 ``F.linear`` (MKL) is slow for decode-shaped
GEMMs (a few rows against a wide weight), while oneDNN's matmul, reached through
``torch.ops.mkldnn._linear_pointwise`` with the unchanged [out, in] weight, is the fastest
of the variants measured (2 threads, ms per call, F.linear / x@W^T pre-transposed / oneDNN):

    768->4096,  M=8:   2.23 / 1.69 / 1.08      M=32:  3.02 / 4.40 / 2.32
    768->32000, M=8:  21.6 / 15.8 / 8.53       M=32: 28.9 / 24.0 / 17.2
    768->32000, M=1:   7.36 / 4.54 / 4.48      M=256: 108 / 125 / 89.4

So on CPU every projection (and the LM head) runs through oneDNN. Weights are shared, not
copied; a tied LM head keeps using the embedding table.
"""

from __future__ import annotations

import torch
from torch import nn


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# Rows for which ``(W @ x^T)^T`` beats ``x @ W^T``: with 2..24 rows oneDNN's kernels for
# the plain product are compute-bound, while the swapped product (the weight as the
# "input" operand) keeps streaming. A whole dense-100m decode step's GEMMs, weights cold,
# 2 threads (ms, plain / swapped): M=4 30.8 / 23.2, M=8 29.8 / 21.7, M=16 38.2 / 31.1,
# M=24 55.6 / 40.3; M=1 15.9 / 16.9 and M=32 56.1 / 59.3 favour the plain product.
SWAP_ROWS = range(2, 25)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in], weight [out, in] -> [..., out] through oneDNN's matmul."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] in SWAP_ROWS:
        out = torch.ops.mkldnn._linear_pointwise(weight, flat, None, "none", [], "").t().contiguous()
        if bias is not None:
            out.add_(bias)
    else:
        out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


class OneDNNLinear(nn.Module):
    """Drop-in for ``nn.Linear`` (same ``weight`` [out, in] and ``bias``) on CPU fp32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by a ``OneDNNLinear`` (in place); a model that
    exposes ``linear_fn`` (the tied LM head) gets the oneDNN function too. No-op when
    oneDNN is unavailable or the model is not fp32 on CPU."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32 or not onednn_available():
        return model
    _replace(model)
    if hasattr(model, "linear_fn"):
        model.linear_fn = onednn_linear
    return model


def _replace(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, OneDNNLinear(child))
        else:
            _replace(child)


__all__ = ["OneDNNLinear", "onednn_available", "onednn_linear", "use_onednn_linears"]
