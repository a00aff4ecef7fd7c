"""The kernels' bf16 paths (bf16_linear.cpp, the bf16 KV cache in write_kv / decode_attention /
prefill_attention, the decode stack over bf16 weights) against torch, in every ISA build this
CPU runs, with both ways of multiplying (vdpbf16ps "dot" where the CPU has AVX512_BF16, and
fp32 FMAs on widened weights, "convert", everywhere).

References are exact-input fp32 torch ops: the bf16 weights (and, for "dot", x rounded to bf16)
widened to fp32, so only the summation order differs and the tolerance stays rounding-sized.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.engine.kernels import cpu_supports_kernels, load_cpu_ops
from services.engine.kernels.cpu_features import cpu_features
from services.engine.kernels.variants import runnable_variants
from services.engine.model.attention import kv_cache_shape, write_kv
from services.engine.model.packing import PANEL, pair_panel_linear, to_pair_panels

pytestmark = pytest.mark.skipif(not cpu_supports_kernels(), reason="the kernels need an AVX2 + FMA CPU")
VARIANTS_HERE = [v.name for v in runnable_variants(cpu_features())]


@pytest.fixture(scope="module", params=VARIANTS_HERE)
def ops(request):
    ops = load_cpu_ops(request.param)
    assert ops is not None and ops.VARIANT == request.param
    return ops


def _close(got, want, tol=1e-5):
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _bf(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16 and widened back (the value a bf16 tensor holds)."""
    return t.to(torch.bfloat16).float()


def test_pair_panels_layout():
    w = torch.randn(70, 5)
    p = to_pair_panels(w)
    assert p.shape == (2, 3, PANEL, 2) and p.dtype == torch.bfloat16
    assert p[1, 2, 3, 0] == w[64 + 3, 4].to(torch.bfloat16) and p[1, 2, 3, 1] == 0  # k = 5 is padding
    assert p[0, 1, 10, 1] == w[10, 3].to(torch.bfloat16) and torch.all(p[1, :, 6:] == 0)  # rows past 70


@pytest.mark.parametrize("rows", [1, 3, 4, 8, 9, 70, 600])
# k: even, odd (padded pair), streams plus leftover pairs
@pytest.mark.parametrize("n_out,k", [(64, 32), (200, 48), (7, 5), (130, 101), (1280, 768)])
@pytest.mark.parametrize("dot", [False, True])
def test_linear_bf16_matches_f_linear_on_the_bf16_values(ops, rows, n_out, k, dot):
    g = torch.Generator().manual_seed(rows * 1000 + n_out)
    w = torch.randn(n_out, k, generator=g) / k ** 0.5
    b = torch.randn(n_out, generator=g)
    x = torch.randn(rows, k, generator=g)
    dot_runs = dot and ops.bf16_dot_supported()
    want = F.linear(_bf(x) if dot_runs else x, _bf(w), b)
    _close(ops.linear_bf16(x, to_pair_panels(w), b, n_out, dot), want)


def test_linear_bf16_rows_views_and_errors(ops):
    w, x = torch.randn(96, 40), torch.randn(3, 100)
    view = x[:, 10:50]  # rows 100 floats apart
    x_in = _bf(view) if ops.bf16_dot_supported() else view  # pair_panel_linear takes "dot" where it runs
    _close(pair_panel_linear(view, to_pair_panels(w), 96, None, ops), F.linear(x_in, _bf(w)))
    _close(ops.linear_bf16(view, to_pair_panels(w), None, 96, False), F.linear(view, _bf(w)))
    panels = to_pair_panels(torch.randn(64, 16))
    with pytest.raises(RuntimeError, match="features"):
        ops.linear_bf16(torch.randn(1, 18), panels, None, 64, True)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.linear_bf16(torch.randn(1, 16), panels.float(), None, 64, True)


def test_bf16_dot_follows_the_cpu(ops):
    """vdpbf16ps runs exactly where the avx512 build meets a CPU with AVX512_BF16."""
    expected = ops.VARIANT == "avx512" and cpu_features().avx512_bf16
    assert ops.bf16_dot_supported() == expected
    assert (ops.OP_ISA["linear_bf16"] == "avx512_bf16") == expected


def _bf16_cache(num_blocks=12, block_size=4, hkv=2, d=8):
    return torch.randn(kv_cache_shape(num_blocks, block_size, hkv, d)).to(torch.bfloat16)


def test_write_kv_rounds_into_a_bf16_cache(ops):
    cache = _bf16_cache()
    want = cache.clone()
    kv = torch.randn(5, 2, 3, 8)
    k, v = kv[:, 0, :2], kv[:, 1, :2]
    slots = torch.tensor([0, 17, 46, 5, 33])
    write_kv(want, k.to(torch.bfloat16), v.to(torch.bfloat16), slots)  # torch's round to nearest even
    ops.write_kv(cache, k, v, slots)
    assert torch.equal(cache, want)


@pytest.mark.parametrize("heads,hkv,d", [(4, 2, 64), (6, 1, 8), (12, 4, 64), (8, 2, 32)])
@pytest.mark.parametrize("window", [0, 5])
def test_decode_attention_reads_a_bf16_cache(ops, heads, hkv, d, window):
    from tests.unit.test_cpu_kernels import _reference_decode

    cache = _bf16_cache(hkv=hkv, d=d)
    tables = torch.tensor([[7, 2, 9, 0], [3, 11, 0, 0], [5, 0, 0, 0]])
    lens = torch.tensor([15, 6, 1])
    q = torch.randn(3, heads + 1, d)[:, :heads]
    got = ops.decode_attention(q, cache, tables, lens, 0.35, window)
    _close(got, _reference_decode(q.contiguous(), cache.float(), tables, lens, 0.35, window or None))


@pytest.mark.parametrize("t,s,window", [(64, 64, 0), (5, 90, 0), (70, 200, 50)])
def test_prefill_attention_takes_bf16_keys(ops, t, s, window):
    from tests.unit.test_cpu_kernels import _reference_prefill

    q = torch.randn(t, 4, 16)
    k, v = torch.randn(2, s, 16).to(torch.bfloat16), torch.randn(2, s, 16).to(torch.bfloat16)
    got = ops.prefill_attention(q, k, v, 0.25, window)
    _close(got, _reference_prefill(q, k.float(), v.float(), 0.25, window))
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.prefill_attention(q, k, v.float(), 0.25, window)
