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
PANEL = 64  # output columns per panel of the panel64 layout (the kernels' ``PANEL``)
SMALL_ROWS = 8  # rows up to which PanelLinear calls the kernels' linear_small
LARGE_ROWS = 512  # rows from which PanelLinear copies the panels to W^T for one plain GEMM


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


class PanelLinear(nn.Module):
    """Drop-in for ``nn.Linear`` on CPU fp32 with the engine's kernels: ``weight`` is the panel64
    matrix [ceil(out / 64), in, 64] (``to_panels``). 1..8 rows (decode) run through the kernels'
    ``linear_small``, which reads each panel once at memory speed; more rows run one batched
    torch matmul over the panels (see the module docstring for both measurements)."""

    def __init__(self, linear: nn.Linear, ops):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(to_panels(linear.weight), requires_grad=False)
        self.bias = linear.bias
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= SMALL_ROWS:  # decode: straight to the kernel (~10 us less)
            return self.ops.linear_small(x, self.weight, self.bias, self.out_features)
        return panel_linear(x, self.weight, self.out_features, self.bias, self.ops)


def to_panels(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> panel64 [ceil(N / 64), K, 64]: [b, k, j] = weight[64 b + j, k], zero past N."""
    n, k = weight.shape
    nb = -(-n // PANEL)
    padded = torch.zeros(nb * PANEL, k, dtype=weight.dtype)
    padded[:n] = weight.detach()
    return padded.view(nb, PANEL, k).transpose(1, 2).contiguous()


def panel_linear(x: torch.Tensor, panels: torch.Tensor, n_out: int, bias: torch.Tensor | None, ops) -> torch.Tensor:
    """x [..., K], panels [NB, K, 64] -> [..., n_out] (``x @ W^T + bias``)."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if rows <= SMALL_ROWS and flat.stride(-1) == 1:
        out = ops.linear_small(flat, panels, bias, n_out)
    else:
        if rows < LARGE_ROWS:  # one batched matmul over the panels: [NB, rows, 64] -> [rows, NB * 64]
            out = torch.matmul(flat, panels).transpose(0, 1).reshape(rows, -1)
        else:  # the panels laid out as W^T [K, NB * 64] (a copy), then one plain GEMM
            nb, k, width = panels.shape
            out = torch.mm(flat, panels.permute(1, 0, 2).reshape(k, nb * width))
        if out.shape[1] != n_out:
            out = out[:, :n_out].contiguous()
        if bias is not None:
            out.add_(bias)
    return out.view(*x.shape[:-1], n_out)


class TiedHead:
    """``linear_fn`` of a tied LM head: a packed copy of the embedding table (the lookup keeps
    the plain table). ``pack`` / ``apply`` are one linear backend's weight transform and GEMM."""

    def __init__(self, table: torch.Tensor, pack, apply):
        self.table = table
        self.packed = pack(table)
        self.apply = apply

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if weight is not self.table:
            raise ValueError("TiedHead called with another weight than the table it packed")
        return self.apply(hidden, self.packed)


def use_cpu_linears(model: nn.Module, ops=None) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` (in place): by ``PanelLinear`` when the engine's
    CPU kernels ``ops`` are given, else by ``OneDNNLinear``; a tied LM head (``lm_head is None``)
    gets a ``TiedHead`` in the same layout. No-op unless the model is fp32 on CPU (and, without
    kernels, oneDNN is available)."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32 or (ops is None and not onednn_available()):
        return model
    if ops is not None:
        make = lambda linear: PanelLinear(linear, ops)  # noqa: E731
        head = TiedHead(model.embed_tokens.weight, to_panels,
                        lambda h, p: panel_linear(h, p, model.config.vocab_size, None, ops)) \
            if hasattr(model, "embed_tokens") else None
    else:
        make = OneDNNLinear
        head = TiedHead(model.embed_tokens.weight, pack_weight, packed_linear) \
            if hasattr(model, "embed_tokens") else None
    with torch.no_grad():
        _replace(model, make)
        if hasattr(model, "linear_fn") and getattr(model, "lm_head", None) is None:
            model.linear_fn = head
    return model


def _replace(module: nn.Module, make) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
        else:
            _replace(child, make)


__all__ = ["OneDNNLinear", "PanelLinear", "TiedHead", "onednn_available", "pack_weight", "packed_linear",
           "panel_linear", "to_panels", "use_cpu_linears"]
