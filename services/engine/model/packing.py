"""CPU GEMM backend, applied to a built and loaded model (not as branches inside it).

On the 2-core AVX2 box, torch's default fp32 ``F.linear`` (MKL) is slow for decode-shaped
GEMMs (a few rows against a wide weight); oneDNN's matmul, reached through
``torch.ops.mkldnn._linear_pointwise``, is faster, and faster again when the weight is
reordered once, at load, into oneDNN's blocked layout (``_reorder_linear_weight``) instead of
being passed as the plain [out, in] matrix on every call. Whole dense-100m step's GEMMs
(33 weights, 300 MB), 2 threads, ms, median of 9 (bench: /tmp script, 2026-11-27):

    rows M                        1      2      8     16     32     64    160    512
    oneDNN, plain weight (*)   15.4   20.4   22.2   29.2   55.8   97.9    204    673
    oneDNN, packed, hint 1     12.5   22.6   27.0   32.2   55.1   95.4    209    626
    oneDNN, packed, hint 32    12.7   12.8   18.7   26.4   43.1   85.4    198    573
    oneDNN, packed, hint 128   12.5   12.6   19.2   27.0   43.1   87.0    199    552

(*) what this module did before: plain weight, and ``(W x^T)^T`` for 2..24 rows.
One packing with a batch-size hint of ``PACK_HINT_ROWS`` is the fastest or within 3% of it at
every row count, so each weight is packed once and serves every step, prefill and decode.

The packed weight replaces the plain one as the module's ``weight`` parameter (same shape,
numel and dtype; layout ``torch._mkldnn``), so packing costs no extra memory. A tied LM head
cannot give up the embedding table (the lookup reads it), so it gets a packed copy.
"""

from __future__ import annotations

import torch
from torch import nn

PACK_HINT_ROWS = 128  # batch-size hint of oneDNN's weight layout (see the table above)


def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] fp32 (plain) -> the same matrix in oneDNN's blocked layout (a copy)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_HINT_ROWS)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in], packed weight [out, in] (``pack_weight``) -> [..., out]."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], packed.shape[0])


class OneDNNLinear(nn.Module):
    """Drop-in for ``nn.Linear`` on CPU fp32: ``weight`` [out, in] is the packed matrix."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(pack_weight(linear.weight), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight, self.bias)


class TiedHead:
    """``linear_fn`` of a tied LM head: the packed copy of the embedding table."""

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.packed = pack_weight(table)

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if weight is not self.table:
            raise ValueError("TiedHead called with another weight than the table it packed")
        return packed_linear(hidden, self.packed)


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by a ``OneDNNLinear`` (in place, weights packed);
    a model with a tied LM head (``lm_head is None``, ``linear_fn``) gets a ``TiedHead``.
    No-op when oneDNN is unavailable or the model is not fp32 on CPU."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32 or not onednn_available():
        return model
    with torch.no_grad():
        _replace(model)
        if hasattr(model, "linear_fn") and getattr(model, "lm_head", None) is None:
            model.linear_fn = TiedHead(model.embed_tokens.weight)
    return model


def _replace(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, OneDNNLinear(child))
        else:
            _replace(child)


__all__ = ["OneDNNLinear", "TiedHead", "onednn_available", "pack_weight", "packed_linear", "use_onednn_linears"]
