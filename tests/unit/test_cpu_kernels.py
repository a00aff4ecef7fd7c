"""The engine's compiled CPU kernels (services/engine/kernels/cpu_ops.cpp) against torch.

Every kernel is compared with the torch ops it replaces on shapes that exercise its edges:
padded weight panels, biases, rows read through strides, GQA, out-of-order block tables,
sliding windows; and bad arguments must raise instead of reading outside a tensor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.engine.kernels import cpu_supports_kernels, load_cpu_ops
from services.engine.kernels.cpu_features import cpu_features
from services.engine.kernels.variants import runnable_variants
from services.engine.model.attention import block_rows, decode_mask, gather_rows, kv_cache_shape, write_kv
from services.engine.model.layers import apply_rope
from services.engine.model.packing import PANEL, SMALL_ROWS, panel_linear, to_panels

pytestmark = pytest.mark.skipif(not cpu_supports_kernels(), reason="the kernels need an AVX2 + FMA CPU")


# every ISA build this CPU runs (an AVX-512 machine tests the avx2 build too); the torch
# fallback is the reference in every test here and in test_models_vs_hf.py
VARIANTS_HERE = [v.name for v in runnable_variants(cpu_features())]


@pytest.fixture(scope="module", params=VARIANTS_HERE)
def ops(request):
    ops = load_cpu_ops(request.param)
    assert ops is not None, "the CPU kernels did not build (see the warning logged by load_cpu_ops)"
    assert ops.VARIANT == request.param
    assert ops.PANEL == PANEL and ops.MAX_SMALL_ROWS == SMALL_ROWS
    return ops


def _close(got, want, tol=1e-5):
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 40, 600])
# k: whole streams (32, 48, 768), streams plus leftover rows (101, 1030), leftover rows only (5)
@pytest.mark.parametrize("n_out,k", [(64, 32), (200, 48), (7, 5), (130, 101), (64, 1030), (1280, 768)])
@pytest.mark.parametrize("bias", [False, True])
def test_panel_linear_matches_f_linear(ops, rows, n_out, k, bias):
    g = torch.Generator().manual_seed(rows * 1000 + n_out)
    w = torch.randn(n_out, k, generator=g) / k ** 0.5  # unit-scale outputs, so 1e-5 is rounding-sized
    b = torch.randn(n_out, generator=g) if bias else None
    x = torch.randn(rows, k, generator=g)
    panels = to_panels(w)
    assert panels.shape == (-(-n_out // PANEL), k, PANEL)
    _close(panel_linear(x, panels, n_out, b, ops), F.linear(x, w, b))
    # 3-D input keeps its leading dims
    _close(panel_linear(x.view(rows, 1, k), panels, n_out, b, ops), F.linear(x, w, b).view(rows, 1, n_out))


@pytest.mark.parametrize("rows", [9, 13, 96, 97, 200])
def test_linear_medium_matches_f_linear(ops, rows):
    # the avx512 build's kernel for 9+ rows; rows past a 96-row task and a 6-row tile, a partial
    # last panel (130 = 2 x 64 + 2 columns), a bias
    if not hasattr(ops, "linear_medium"):
        assert ops.VARIANT == "avx2" and ops.OP_ISA["linear_medium"].startswith("torch")
        return
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(130, 101, generator=g) / 101 ** 0.5, torch.randn(130, generator=g)
    x = torch.randn(rows, 140, generator=g)[:, 20:121]  # strided rows
    _close(ops.linear_medium(x, to_panels(w), b, 130), F.linear(x, w, b))
    _close(ops.linear_medium(x, to_panels(w), None, 130), F.linear(x, w))
    with pytest.raises(RuntimeError, match="features"):
        ops.linear_medium(torch.randn(9, 100), to_panels(w), None, 130)


def test_linear_small_reads_strided_rows(ops):
    w, x = torch.randn(96, 40), torch.randn(3, 100)
    view = x[:, 10:50]  # rows 100 floats apart
    _close(ops.linear_small(view, to_panels(w), None, 96), F.linear(view, w))


def test_linear_small_rejects_bad_arguments(ops):
    panels = to_panels(torch.randn(64, 16))
    with pytest.raises(RuntimeError, match="1..8 rows"):
        ops.linear_small(torch.randn(9, 16), panels, None, 64)
    with pytest.raises(RuntimeError, match="features"):
        ops.linear_small(torch.randn(1, 15), panels, None, 64)
    with pytest.raises(RuntimeError, match="n_out"):
        ops.linear_small(torch.randn(1, 16), panels, None, 65)
    with pytest.raises(RuntimeError, match="float32"):
        ops.linear_small(torch.randn(1, 16, dtype=torch.float64), panels, None, 64)


@pytest.mark.parametrize("rows,dim", [(1, 768), (5, 64), (33, 100)])
def test_rms_norm_and_fused_residual_add(ops, rows, dim):
    x, w = torch.randn(rows, dim), torch.randn(dim)
    _close(ops.rms_norm(x, w, 1e-6), F.rms_norm(x, (dim,), w, 1e-6))
    residual = torch.randn(rows, dim)
    want_residual = residual + x
    got = ops.rms_norm(x, w, 1e-5, residual)
    _close(residual, want_residual)  # updated in place
    _close(got, F.rms_norm(want_residual, (dim,), w, 1e-5))


@pytest.mark.parametrize("tokens,heads,head_dim", [(1, 16, 64), (7, 3, 32), (20, 6, 16)])
def test_rope_in_place_matches_apply_rope(ops, tokens, heads, head_dim):
    table = torch.randn(50, head_dim)
    positions = torch.randint(0, 50, (tokens,))
    cos, sin = table[positions].unsqueeze(1).chunk(2, dim=-1)
    # q/k heads as a strided view inside a wider row, as in the fused qkv output
    qkv = torch.randn(tokens, (heads + 2) * head_dim)
    x = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    want = apply_rope(x.clone(), cos, sin)
    untouched = qkv[:, heads * head_dim:].clone()
    ops.rope_(x, cos, sin)
    _close(x, want, tol=1e-6)
    assert torch.equal(qkv[:, heads * head_dim:], untouched)


@pytest.mark.parametrize("rows,width", [(1, 2048), (6, 100)])
def test_silu_and_mul(ops, rows, width):
    gate_up = torch.randn(rows, 2 * width) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    _close(ops.silu_and_mul(gate_up), F.silu(gate) * up, tol=1e-6)


def _cache(num_blocks=12, block_size=4, hkv=2, d=8):
    return torch.randn(kv_cache_shape(num_blocks, block_size, hkv, d))


def test_write_kv_matches_torch(ops):
    cache = _cache()
    want = cache.clone()
    kv = torch.randn(5, 2, 3, 8)  # [T, k/v/extra, Hkv, D]: k and v are strided views
    k, v = kv[:, 0, :2], kv[:, 1, :2]
    slots = torch.tensor([0, 17, 46, 5, 33])
    write_kv(want, k, v, slots)
    ops.write_kv(cache, k, v, slots)
    assert torch.equal(cache, want)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.write_kv(cache, k, v, torch.tensor([0, 1, 2, 3, 48]))


def _reference_decode(q, cache, tables, lens, scale, window):
    """The torch decode path: gather each sequence's blocks, masked softmax attention."""
    b, h, d = q.shape
    hkv = cache.shape[1]
    groups = h // hkv
    width = tables.shape[1] * cache.shape[3]
    rows = block_rows(tables.reshape(-1), hkv, cache.shape[2])
    keys = gather_rows(cache[0], rows).view(hkv * b, -1, d)
    values = gather_rows(cache[1], rows).view(hkv * b, -1, d)
    mask = decode_mask(lens, width, window, torch.float32, hkv)
    qg = q.view(b, hkv, groups, d).transpose(0, 1).reshape(hkv * b, groups, d)
    probs = torch.softmax(torch.baddbmm(mask, qg, keys.transpose(1, 2), alpha=scale), dim=-1)
    return torch.bmm(probs, values).view(hkv, b, groups, d).transpose(0, 1).reshape(b, h, d)


# G = heads / hkv query heads per KV head: 1-4 take register accumulators in the value pass
# where head_dim fits their column blocks (64 here; 8 does not), 6 the general loop
@pytest.mark.parametrize("heads,hkv", [(4, 2), (2, 2), (6, 1), (12, 4), (8, 2)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("d", [8, 64])
def test_decode_attention_reads_the_paged_cache(ops, heads, hkv, window, d):
    cache = _cache(hkv=hkv, d=d)
    tables = torch.tensor([[7, 2, 9, 0], [3, 11, 0, 0], [5, 0, 0, 0]])  # out of order, zero-padded
    lens = torch.tensor([15, 6, 1])
    q = torch.randn(3, heads + 1, d)[:, :heads]  # a strided view, as sliced from qkv
    got = ops.decode_attention(q, cache, tables, lens, 0.35, window or 0)
    _close(got, _reference_decode(q.contiguous(), cache, tables, lens, 0.35, window))


# the avx512 build's 512-bit path (head_dim % 16 == 0): key tiles of 16 rows across blocks of 16 and
# of 5 (a tile spans blocks), partial last tiles, G = 1, 7 (qwen2.5-0.5b) and 16 (two groups of 8
# query heads in the value pass), head_dim 16, 64 and 128 (value passes of 1, 4 and 2 x 4 zmm)
@pytest.mark.parametrize("heads,hkv,d", [(3, 3, 64), (14, 2, 64), (16, 1, 16), (9, 3, 128), (32, 2, 64)])
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_long_sequences(ops, heads, hkv, d, block_size, dtype):
    g = torch.Generator().manual_seed(heads * 100 + d + block_size)
    lens = torch.tensor([1, 17, 16 * 7 + 3, 150])
    width = -(-150 // block_size)
    cache = torch.randn(kv_cache_shape(4 * width + 3, block_size, hkv, d), generator=g).to(dtype)
    tables = torch.randperm(4 * width + 3, generator=g)[:4 * width].view(4, width).contiguous()
    q = torch.randn(4, heads, d, generator=g)
    for window in (0, 37):
        got = ops.decode_attention(q, cache, tables, lens, 0.2, window)
        _close(got, _reference_decode(q, cache.float(), tables, lens, 0.2, window or None))
    # a row's result does not depend on the rows batched with it
    alone = ops.decode_attention(q[2:3], cache, tables[2:3], lens[2:3], 0.2, 0)
    assert torch.equal(alone, ops.decode_attention(q, cache, tables, lens, 0.2, 0)[2:3])


def test_decode_attention_rejects_bad_tables(ops):
    cache, q = _cache(), torch.randn(1, 2, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.decode_attention(q, cache, torch.tensor([[12]]), torch.tensor([3]), 1.0, 0)
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        ops.decode_attention(q, cache, torch.tensor([[1]]), torch.tensor([5]), 1.0, 0)


def _reference_prefill(q, k, v, scale, window):
    """torch SDPA with the explicit mask: query t at position S - T + t sees keys p <= it (and
    p > it - window)."""
    t, s = q.shape[0], k.shape[1]
    q_pos, k_pos = torch.arange(s - t, s).unsqueeze(1), torch.arange(s).unsqueeze(0)
    mask = k_pos <= q_pos
    if window:
        mask &= k_pos > q_pos - window
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


# (T, S, H, Hkv, D, window): the whole prompt (T == S) at tile and block edges, a chunk after
# cached context (T < S), no GQA, head dims that end on an 8-wide d tile, sliding windows
# shorter than a key block and than the chunk, one token
@pytest.mark.parametrize("t,s,heads,hkv,d,window", [
    (64, 64, 4, 2, 16, 0), (97, 97, 6, 2, 64, 0), (5, 90, 4, 2, 16, 0), (100, 300, 8, 8, 32, 0),
    (70, 200, 4, 2, 24, 50), (33, 33, 6, 2, 8, 7), (200, 200, 3, 1, 40, 64), (1, 1, 2, 1, 8, 0),
    (1, 130, 4, 4, 16, 0), (128, 128, 4, 2, 16, 2)])  # window 2: a key block before the window of later rows
def test_prefill_attention_matches_masked_sdpa(ops, t, s, heads, hkv, d, window):
    q = torch.randn(t, heads + 1, d)[:, :heads]  # a strided view, as sliced from qkv
    k_rows, v_rows = torch.randn(s, hkv, d), torch.randn(s, hkv, d)
    k, v = k_rows.transpose(0, 1), v_rows.transpose(0, 1)  # [Hkv, S, D] views of [S, Hkv, D]
    got = ops.prefill_attention(q, k, v, d ** -0.5, window)
    assert got.shape == (t, heads, d) and got.is_contiguous()
    _close(got, _reference_prefill(q.contiguous(), k.contiguous(), v.contiguous(), d ** -0.5, window))


def test_prefill_attention_rejects_bad_shapes(ops):
    q, kv = torch.randn(4, 4, 16), torch.randn(2, 4, 16)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ops.prefill_attention(torch.randn(4, 4, 12), torch.randn(2, 4, 12), torch.randn(2, 4, 12), 1.0, 0)
    with pytest.raises(RuntimeError, match="query tokens <= keys"):
        ops.prefill_attention(torch.randn(5, 4, 16), kv, kv, 1.0, 0)
    with pytest.raises(RuntimeError, match="do not fit"):
        ops.prefill_attention(torch.randn(4, 3, 16), kv, kv, 1.0, 0)
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        ops.prefill_attention(q, kv.transpose(1, 2), kv.transpose(1, 2), 1.0, 0)


def test_engine_backend_uses_the_kernels_and_the_decode_stack(ops, tmp_path):
    """use_cpu_backend installs the kernels on a dense model, with a decode stack that takes
    decode-only steps of <= SMALL_ROWS rows, and kernels=False gives oneDNN."""
    from services.engine.make_model import make_model
    from services.engine.model.cpu_backend import use_cpu_backend
    from services.engine.model.packing import PanelLinear, onednn_available
    from services.engine.model.registry import load_model

    path = make_model("tiny-llama", tmp_path / "m")
    model = load_model(path)
    assert use_cpu_backend(model, variant=ops.VARIANT) == "kernels"
    assert model.decode_mask_needed is False
    assert all(isinstance(m.self_attn.qkv_proj, PanelLinear) for m in model.layers)
    assert len(model.decode_stack) == len(model.layers)
    # the stack takes what the module path runs on kernels: 8 rows in avx2 builds (torch's matmul
    # past that), any decode batch up to 512 where linear_medium exists (avx512)
    assert ops.MAX_STACK_ROWS == (512 if hasattr(ops, "linear_medium") else SMALL_ROWS)
    assert model.uses_decode_stack(ops.MAX_STACK_ROWS, _decode_meta(1))
    assert not model.uses_decode_stack(ops.MAX_STACK_ROWS + 1, _decode_meta(1))
    if onednn_available():
        assert use_cpu_backend(load_model(path), kernels=False) == "onednn"
    # a head size the kernels' attention does not take: torch attention and mask, kernels elsewhere
    odd = load_model(make_model("tiny-llama", tmp_path / "h12", overrides={"head_dim": 12}))
    assert use_cpu_backend(odd, variant=ops.VARIANT) == "kernels" and odd.decode_mask_needed is True
    assert odd.decode_stack is None
    assert all(layer.self_attn.attn.ops is None and layer.input_layernorm.ops is ops for layer in odd.layers)
    # bf16 dense models take the bf16 kernel path (test_bf16_vs_hf.py; MoE keeps plain torch bf16)
    assert use_cpu_backend(load_model(path, dtype=torch.bfloat16), variant=ops.VARIANT) == "kernels-bf16"
    # q/k norm (Qwen3) and MoE layers run the kernels module by module, not as one call
    for name in ("tiny-qwen3", "tiny-mixtral"):
        other = load_model(make_model(name, tmp_path / name))
        assert use_cpu_backend(other, variant=ops.VARIANT) == "kernels"
        assert other.decode_stack is None
        assert all(layer.input_layernorm.ops is ops for layer in other.layers)


def _decode_meta(rows: int, seq_len: int = 1):
    from services.engine.model.attention import AttentionMetadata
    return AttentionMetadata(slot_mapping=torch.arange(rows) * 16 + seq_len - 1, num_decodes=rows,
                             decode_block_tables=torch.arange(rows).view(rows, 1), decode_mask=None,
                             decode_seq_lens=torch.full((rows,), seq_len), prefills=())


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 32])
def test_decode_stack_matches_the_module_path(ops, tmp_path, rows):
    """One decode step through the stack gives the hidden states and KV writes of the same
    kernels run module by module (summation order is the same, so to rounding); past 8 rows
    (avx512 builds) the stack's linears are linear_medium, as the modules' are."""
    from services.engine.make_model import make_model
    from services.engine.model.cpu_backend import use_cpu_backend
    from services.engine.model.registry import load_model

    model = load_model(make_model("tiny-llama", tmp_path / "m"))
    use_cpu_backend(model, variant=ops.VARIANT)
    c = model.config
    g = torch.Generator().manual_seed(rows)
    caches = [torch.randn(2, c.num_kv_heads, rows, 16, c.head_dim, generator=g) for _ in model.layers]
    ids = torch.randint(0, c.vocab_size, (rows,), generator=g)
    meta, pos = _decode_meta(rows, seq_len=5), torch.full((rows,), 4)
    assert model.uses_decode_stack(rows, meta) == (rows <= ops.MAX_STACK_ROWS)
    with torch.inference_mode():
        stack_caches = [t.clone() for t in caches]
        via_stack = model(ids, pos, stack_caches, meta)
        stack, model.decode_stack = model.decode_stack, None
        via_modules = model(ids, pos, caches, meta)
        model.decode_stack = stack
    _close(via_stack, via_modules)
    for a, b in zip(stack_caches, caches):
        _close(a, b)


@pytest.mark.parametrize("n", [8, 1000, 100_003])
def test_read_streams_sums_every_whole_vector(ops, n):
    """The bandwidth probe reads (and sums) every float of the whole 8-float vectors of x."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    want = x[: n // 8 * 8].double().sum().item()
    assert ops.read_streams(x) == pytest.approx(want, rel=1e-4, abs=1e-3)
