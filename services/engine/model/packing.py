"""CPU GEMM backends, applied to a built and loaded model (not as branches inside it).

Two layouts of the same [out, in] fp32 weight, one per backend (``use_cpu_linears`` picks), and
one for bf16 weights (``use_bf16_cpu_linears``: ``PairPanelLinear``, bf16 pairs of k side by side
in 64-column panels, see services/engine/kernels/bf16_linear.cpp):

- **panel64** (``PanelLinear``, with the engine's kernels, services/engine/kernels): W stored as
  [ceil(out / 64), in, 64], 64 output columns of every input row side by side. A decode GEMV
  reads each panel once, front to back, at memory speed (``linear_small``, 1..8 rows). More
  rows: in the avx512 build, the kernels' ``linear_medium`` (panel_gemm.cpp, a 6 x 64 register
  tile per panel); in the avx2 build, 9..511 rows run one batched torch matmul over the panels
  and 512+ rows (prompt chunks) copy the panels to W^T [in, out] and run one plain GEMM, where
  MKL's full-width blocking wins. One copy of the weights serves every step (rows past ``out``
  are zero padding).
- **oneDNN packed** (``OneDNNLinear``, where the kernels cannot build): each weight reordered
  once, at load, into oneDNN's blocked layout (``_reorder_linear_weight``, batch hint
  ``PACK_HINT_ROWS``) and multiplied by ``torch.ops.mkldnn._linear_pointwise``; the packed
  matrix replaces the plain one, so it costs no extra memory.

Whole dense-100m step's GEMMs, 2 threads, ms, median (the 33 weights with the LM head up to 32
rows; the 32 layer weights from 160 rows; /tmp bench script, 2026-11-27 19:13 UTC, one run,
VM noise about +-10%):

    rows M                     1      2      4      8     16     32    160   1024
    oneDNN, packed         14.4   17.1   19.2   22.0   35.0   52.1    144    906
    panel64                11.8   14.6   16.7   23.3   40.1   57.6    132    843

SmolLM2-135M's 30 layers of linears (qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536),
torch's batched matmul / mm over the panels vs ``linear_medium``, ms, best of 7 alternating
rounds (AMD EPYC Zen 4, avx512-bf16, 2 cores, shared box at load average 8-9, /tmp/p15/mm.py,
2026-12-02 23:52-00:01 UTC):

    rows M                     16     32     64    128    512   1024
    1 thread, torch         109.1  115.0  246.7  440.4   1319   2805
    1 thread, medium         39.9   77.6  143.3  268.8   1004   2170
    2 threads, torch        153.7  266.0   1015   1036      -      -
    2 threads, medium        40.2  114.2  632.9  593.5      -      -

(1 thread, 128 rows: 101 GFLOP/s, about the fp32 FMA peak of one Zen 4 core; the 2-thread
figures suffer from the load, both alike.)

Earlier oneDNN measurements (plain weight vs packed, hint 1 / 32 / 128) chose the hint: one
packing with hint 128 was the fastest or within 3% of it at every row count. A tied LM head
cannot give up the embedding table (the lookup reads it), so it gets a packed copy.
"""

from __future__ import annotations

import torch
from torch import nn

from services.engine.malloc import huge_page_empty

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
    ``linear_small``, which reads each panel once at memory speed; more rows run torch GEMMs
    (``panel_linear``; see the module docstring for the measurements)."""

    def __init__(self, linear: nn.Linear, ops):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(to_panels(linear.weight), requires_grad=False)
        self.bias = linear.bias
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= SMALL_ROWS and x.stride(1) == 1:  # decode: straight to the kernel
            return self.ops.linear_small(x, self.weight, self.bias, self.out_features)
        return panel_linear(x, self.weight, self.out_features, self.bias, self.ops)


class PairPanelLinear(PanelLinear):
    """``PanelLinear`` with bf16 weights: ``weight`` is the bf16 pair-panel matrix
    [ceil(out / 64), ceil(in / 2), 64, 2] (``to_pair_panels``), ``bias`` fp32; x and the output
    are fp32. Every row count runs the kernels' ``linear_bf16`` (vdpbf16ps on AVX512_BF16 CPUs,
    fp32 FMAs on widened weights elsewhere)."""

    def __init__(self, linear: nn.Linear, ops):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(to_pair_panels(linear.weight), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pair_panel_linear(x, self.weight, self.out_features, self.bias, self.ops)


def to_pair_panels(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> bf16 pair panels [ceil(N / 64), ceil(K / 2), 64, 2]: [b, i, j, t] =
    bf16(weight[64 b + j, 2 i + t]), zero past N and K (the layout of bf16_linear.cpp)."""
    n, k = weight.shape
    nb, k2 = -(-n // PANEL), -(-k // 2)
    padded = torch.zeros(nb * PANEL, 2 * k2, dtype=torch.bfloat16)
    padded[:n, :k] = weight.detach()
    out = huge_page_empty((nb, k2, PANEL, 2), torch.bfloat16)  # streamed every decode step: 2 MiB pages
    return out.copy_(padded.view(nb, PANEL, k2, 2).transpose(1, 2))


def pair_panel_linear(x: torch.Tensor, panels: torch.Tensor, n_out: int, bias: torch.Tensor | None,
                      ops) -> torch.Tensor:
    """x [..., K] (fp32; bf16 is widened), bf16 pair panels [NB, K2, 64, 2] -> [..., n_out] fp32."""
    flat = x.reshape(-1, x.shape[-1]).float()
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    return ops.linear_bf16(flat, panels, bias, n_out).view(*x.shape[:-1], n_out)


def to_panels(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> panel64 [ceil(N / 64), K, 64]: [b, k, j] = weight[64 b + j, k], zero past N."""
    n, k = weight.shape
    nb = -(-n // PANEL)
    padded = torch.zeros(nb * PANEL, k, dtype=weight.dtype)
    padded[:n] = weight.detach()
    out = huge_page_empty((nb, k, PANEL), weight.dtype)  # streamed every decode step: 2 MiB pages
    return out.copy_(padded.view(nb, PANEL, k).transpose(1, 2))


def panel_linear(x: torch.Tensor, panels: torch.Tensor, n_out: int, bias: torch.Tensor | None, ops) -> torch.Tensor:
    """x [..., K], panels [NB, K, 64] -> [..., n_out] (``x @ W^T + bias``)."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    medium = getattr(ops, "linear_medium", None)  # the avx512 build's 9+ row kernel
    if rows <= SMALL_ROWS and flat.stride(-1) == 1:
        out = ops.linear_small(flat, panels, bias, n_out)
    elif medium is not None and flat.stride(-1) == 1:
        out = medium(flat, panels, bias, n_out)
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
        pack, apply = to_panels, lambda h, p: panel_linear(h, p, model.config.vocab_size, None, ops)
    else:
        make, pack, apply = OneDNNLinear, pack_weight, packed_linear
    with torch.no_grad():
        _replace(model, make)
        if hasattr(model, "linear_fn") and getattr(model, "lm_head", None) is None:
            model.linear_fn = TiedHead(model.embed_tokens.weight, pack, apply)
    return model


def use_bf16_cpu_linears(model: nn.Module, ops) -> nn.Module:
    """Replace every ``nn.Linear`` of a bf16 CPU model by ``PairPanelLinear`` (in place), and a
    tied LM head by a ``TiedHead`` over pair panels of the table. The model's activations must
    then be fp32 (cpu_backend.use_cpu_backend converts the rest of it)."""
    with torch.no_grad():
        _replace(model, lambda linear: PairPanelLinear(linear, ops))
        if hasattr(model, "linear_fn") and getattr(model, "lm_head", None) is None:
            vocab = model.config.vocab_size
            model.linear_fn = TiedHead(model.embed_tokens.weight, to_pair_panels,
                                       lambda h, p: pair_panel_linear(h, p, vocab, None, ops))
    return model


def _replace(module: nn.Module, make) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
        else:
            _replace(child, make)


__all__ = ["OneDNNLinear", "PairPanelLinear", "PanelLinear", "TiedHead", "onednn_available", "pack_weight",
           "packed_linear", "pair_panel_linear", "panel_linear", "to_pair_panels", "to_panels", "use_bf16_cpu_linears",
           "use_cpu_linears"]
