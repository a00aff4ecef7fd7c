// CPU fp32 kernels for decode-shaped work, built once per ISA variant (simd.h) by
// services/engine/kernels/__init__.py; the small-M linear lives in panel_linear.cpp, the
// prefill attention in prefill_attention.cpp.
//
// Why they exist: a batch-1 decode step is memory-bound on the weights, and torch's eager ops
// spend most of the rest of the step in per-op overhead on [1, hidden] tensors. Each kernel
// here is one call for what torch does in 5-15 ops, and the small-M linear streams a weight
// panel once at memory speed.
//
// Numerics: fp32 throughout; products are summed in a different order than torch's, so results
// match torch to rounding (tests compare with tolerances), never bit for bit.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "simd.h"

namespace tandem {
inline namespace TANDEM_ISA_NS {
namespace {


// ---- RMSNorm (optionally fused with the residual add) -----------------------------------------

// out[t] = w * (r[t] * rsqrt(mean(r[t]^2) + eps)), where r = x, or r = residual += x when a
// residual is given (updated in place: the next layer's residual stream).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                    const c10::optional<at::Tensor>& residual) {
  check_f32(x, "x");
  check_f32(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [T, D] with contiguous rows");
  const int64_t T = x.size(0), D = x.size(1);
  TORCH_CHECK(weight.numel() == D && weight.is_contiguous(), "weight must be [D] contiguous");
  float* R = nullptr;
  int64_t ldr = 0;
  if (residual.has_value() && residual->defined()) {
    check_f32(*residual, "residual");
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == T && residual->size(1) == D && residual->stride(1) == 1,
                "residual must be [T, D] like x");
    R = residual->data_ptr<float>();
    ldr = residual->stride(0);
  }
  at::Tensor out = at::empty({T, D}, x.options());
  const float* X = x.data_ptr<float>();
  const float* Wt = weight.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  const float epsf = static_cast<float>(eps);
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* src = X + t * ldx;
      if (R) {
        float* r = R + t * ldr;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) r[d] += src[d];
        src = r;
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t d = 0; d < D; ++d) ss += src[d] * src[d];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + epsf);
      float* o = O + t * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = Wt[d] * (src[d] * inv);
    }
  });
  return out;
}

// ---- rotary embedding, in place -----------------------------------------------------------------

// x [T, H, Dh] (any strides, last dim contiguous), cos/sin [T, *, Dh/2] (last dim contiguous):
// x = [x1 cos - x2 sin, x2 cos + x1 sin] per head (the rotate-half layout), in place.
void rope_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
  check_f32(x, "x");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be [T, H, Dh] with a contiguous last dim");
  const int64_t T = x.size(0), H = x.size(1), half = x.size(2) / 2;
  TORCH_CHECK(cos.size(0) == T && sin.size(0) == T && cos.size(-1) == half && sin.size(-1) == half &&
              cos.stride(-1) == 1 && sin.stride(-1) == 1, "cos/sin must be [T, ..., Dh/2] for x's T and Dh");
  float* Xp = x.data_ptr<float>();
  const float* C = cos.data_ptr<float>();
  const float* S = sin.data_ptr<float>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1), sc = cos.stride(0), ss = sin.stride(0);
  at::parallel_for(0, T * H, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / H, h = i % H;
      float* x1 = Xp + t * sx0 + h * sx1;
      float* x2 = x1 + half;
      const float* c = C + t * sc;
      const float* s = S + t * ss;
#pragma omp simd
      for (int64_t d = 0; d < half; ++d) {
        const float a = x1[d], b = x2[d];
        const float ac = a * c[d], bs = b * s[d], bc = b * c[d], as = a * s[d];
        x1[d] = ac - bs;
        x2[d] = bc + as;
      }
    }
  });
}

// ---- SwiGLU activation --------------------------------------------------------------------------

// gate_up [T, 2I] (gate columns, then up) -> silu(gate) * up [T, I]; silu(g) = g / (1 + exp(-g)).
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  check_f32(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "gate_up must be [T, 2I] with contiguous rows");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2, ld = gate_up.stride(0);
  at::Tensor out = at::empty({T, I}, gate_up.options());
  const float* G = gate_up.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, T, std::max<int64_t>(1, 4096 / std::max<int64_t>(I, 1)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* g = G + t * ld;
      const float* u = g + I;
      float* o = O + t * I;
      int64_t j = 0;
      for (; j + 8 <= I; j += 8) {
        const __m256 gv = _mm256_loadu_ps(g + j);
        const __m256 sig = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
        _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_div_ps(gv, sig), _mm256_loadu_ps(u + j)));
      }
      for (; j < I; ++j) o[j] = (g[j] / (1.f + std::exp(-g[j]))) * u[j];
    }
  });
  return out;
}

// ---- paged KV cache -----------------------------------------------------------------------------

// kv_cache [2, Hkv, N, bs, D] contiguous, fp32 or bf16; k, v [T, Hkv, D] fp32 (last dim contiguous); slots [T] int64
// (slot = block * bs + offset): cache[0/1, h, slot] = k/v[t, h].
void write_kv(at::Tensor kv_cache, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots) {
  check_kv_dtype(kv_cache, "kv_cache");
  check_f32(k, "k");
  check_f32(v, "v");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "kv_cache must be a contiguous [2, Hkv, N, bs, D] tensor");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), "slots must be contiguous int64");
  const int64_t Hkv = kv_cache.size(1), slots_total = kv_cache.size(2) * kv_cache.size(3), D = kv_cache.size(4);
  const int64_t T = slots.numel();
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.size(0) == T && v.size(0) == T && k.size(1) == Hkv &&
              v.size(1) == Hkv && k.size(2) == D && v.size(2) == D && k.stride(2) == 1 && v.stride(2) == 1,
              "k and v must be [T, Hkv, D] matching slots and the cache");
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sl[t] >= 0 && sl[t] < slots_total, "slot ", sl[t], " is outside the cache");
  const float* Kp = k.data_ptr<float>();
  const float* Vp = v.data_ptr<float>();
  auto store = [&](auto* Kc) {  // float, or uint16_t for bf16 (rounded to nearest even, as torch)
    auto* Vc = Kc + Hkv * slots_total * D;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < Hkv; ++h) {
        const float* ks = Kp + t * k.stride(0) + h * k.stride(1);
        const float* vs = Vp + t * v.stride(0) + h * v.stride(1);
        auto* kd = Kc + (h * slots_total + sl[t]) * D;
        auto* vd = Vc + (h * slots_total + sl[t]) * D;
        if constexpr (std::is_same_v<std::remove_pointer_t<decltype(Kc)>, float>) {
          std::copy_n(ks, D, kd);
          std::copy_n(vs, D, vd);
        } else {
          for (int64_t d = 0; d < D; ++d) kd[d] = bf16_bits(ks[d]), vd[d] = bf16_bits(vs[d]);
        }
      }
  };
  if (kv_cache.scalar_type() == at::kBFloat16)
    store(reinterpret_cast<uint16_t*>(kv_cache.data_ptr<at::BFloat16>()));
  else
    store(kv_cache.data_ptr<float>());
}

// NQ query rows (compile-time, so the accumulators stay in registers) against one key row.
template <int NQ, typename C>
inline void dots_n(const float* const* qs, const C* k, int64_t D, float scale, float* scores) {
  __m256 acc[NQ];
  for (int g = 0; g < NQ; ++g) acc[g] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 kv = load8(k + d);
    for (int g = 0; g < NQ; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qs[g] + d), kv, acc[g]);
  }
  for (int g = 0; g < NQ; ++g) scores[g] = hsum8(acc[g]) * scale;
}

// Dot products of G query rows with one key row: scores[g] = scale * q_g . k (D % 8 == 0).
template <typename C>
inline void dots(const float* const* qs, int64_t G, const C* k, int64_t D, float scale, float* scores) {
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) dots_n<4>(qs + g, k, D, scale, scores + g);
  switch (G - g) {
    case 3: dots_n<3>(qs + g, k, D, scale, scores + g); break;
    case 2: dots_n<2>(qs + g, k, D, scale, scores + g); break;
    case 1: dots_n<1>(qs + g, k, D, scale, scores + g); break;
    default: break;
  }
}

// acc[g, c0 : c0 + 8 NV] = sum_t w[t, g] * V[t, c0 : c0 + 8 NV] for the G query heads, over the
// rows [start, L) of one KV head's paged values: G x NV register accumulators (G NV <= 12), where
// the general loop below loads and stores its sums in memory for every row. Same sums in the same
// order (bit-identical output); B = 32 sequences of 100-200 tokens, 12 heads over 4 KV heads,
// head_dim 64, alternating: 0.833 -> 0.679 ms (B = 8: 0.162 -> 0.137).
template <int G, int NV, typename C>
inline void weighted_values(const float* w, const C* Vh, const int64_t* table, int64_t bs, int64_t D,
                            int64_t start, int64_t L, int64_t c0, float* acc) {
  __m256 c[G][NV];
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
    for (int u = 0; u < NV; ++u) c[g][u] = _mm256_setzero_ps();
  for (int64_t t = start; t < L;) {
    const int64_t blk = t / bs, end = std::min(L, (blk + 1) * bs);
    const C* vv = Vh + (table[blk] * bs + t % bs) * D + c0;
    for (; t < end; ++t, vv += D) {
      __m256 v[NV];
#pragma GCC unroll 8
      for (int u = 0; u < NV; ++u) v[u] = load8(vv + 8 * u);
      const float* wt = w + (t - start) * G;
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        const __m256 x = _mm256_broadcast_ss(wt + g);
#pragma GCC unroll 8
        for (int u = 0; u < NV; ++u) c[g][u] = _mm256_fmadd_ps(x, v[u], c[g][u]);
      }
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
    for (int u = 0; u < NV; ++u) _mm256_storeu_ps(acc + g * D + c0 + 8 * u, c[g][u]);
}

// weighted_values over all D columns, in passes of 8 NV; false where G or D has no register plan.
template <int G, int NV, typename C>
inline bool weighted_values_all(const float* w, const C* Vh, const int64_t* table, int64_t bs, int64_t D,
                                int64_t start, int64_t L, float* acc) {
  if (D % (8 * NV)) return false;
  for (int64_t c0 = 0; c0 < D; c0 += 8 * NV) weighted_values<G, NV>(w, Vh, table, bs, D, start, L, c0, acc);
  return true;
}

// The register plan for G query heads per KV head (G NV <= 12 accumulators), run over all D
// columns; false (nothing written) where there is none: G > 4, or D not a multiple of 8 NV.
template <typename C>
inline bool weighted_values_fast(int64_t G, const float* w, const C* Vh, const int64_t* table, int64_t bs,
                                 int64_t D, int64_t start, int64_t L, float* acc) {
  switch (G) {
    case 1: return weighted_values_all<1, 8>(w, Vh, table, bs, D, start, L, acc);
    case 2: return weighted_values_all<2, 4>(w, Vh, table, bs, D, start, L, acc);
    case 3: return weighted_values_all<3, 4>(w, Vh, table, bs, D, start, L, acc);
    case 4: return weighted_values_all<4, 2>(w, Vh, table, bs, D, start, L, acc);
    default: return false;
  }
}

// One query token per sequence, read straight from the paged cache (no gather copy).
// q [B, H, D] (last dim contiguous), kv_cache [2, Hkv, N, bs, D] contiguous, block_tables [B, W]
// int64, seq_lens [B] int64 (tokens in cache, this step's included), window > 0 keeps only the
// last `window` positions -> out [B, H, D]. Scores are scale * q.k, softmax in fp32. The G query
// heads of a KV head share one pass over its keys and one over its values.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale, int64_t window) {
  check_f32(q, "q");
  check_kv_dtype(kv_cache, "kv_cache");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [B, H, D] with a contiguous last dim");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "kv_cache must be a contiguous [2, Hkv, N, bs, D] tensor");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.is_contiguous(),
              "block_tables must be contiguous [B, W] int64");
  TORCH_CHECK(seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous(), "seq_lens must be contiguous int64");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = kv_cache.size(1), N = kv_cache.size(2), bs = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D && H % Hkv == 0, "q heads/dim do not fit the cache");
  TORCH_CHECK(D % 8 == 0 && D <= 512, "head_dim must be a multiple of 8 up to 512, got ", D);
  TORCH_CHECK(block_tables.size(0) == B && seq_lens.numel() == B, "one block table and seq_len per query");
  const int64_t W = block_tables.size(1), G = H / Hkv;
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  int64_t max_len = 1;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= W * bs, "seq_len ", lens[b], " does not fit its block table");
    for (int64_t i = 0; i < (lens[b] + bs - 1) / bs; ++i)
      TORCH_CHECK(bt[b * W + i] >= 0 && bt[b * W + i] < N, "block id ", bt[b * W + i], " is outside the cache");
    max_len = std::max(max_len, lens[b]);
  }
  at::Tensor out = at::empty({B, H, D}, q.options());
  const float* Q = q.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  // Kc: the cache's keys, float or uint16_t (bf16 bits); its values follow them
  auto attend = [&](const auto* Kc) {
  using C = std::remove_const_t<std::remove_pointer_t<decltype(Kc)>>;
  const C* Vc = Kc + Hkv * N * bs * D;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(max_len * G);  // p[t * G + g]: scores, then probabilities
    std::vector<float> acc(G * D);
    std::vector<const float*> qs(G);
    std::vector<float> mx(G), inv(G);
#if TANDEM_AVX512
    std::vector<float> kbuf(16 * D);
    std::vector<float*> outs(G);
#endif
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv, L = lens[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, L - window) : 0;
      const int64_t* table = bt + b * W;
      const C* Kh = Kc + h * N * bs * D;
      const C* Vh = Vc + h * N * bs * D;
      for (int64_t g = 0; g < G; ++g) qs[g] = Q + b * q.stride(0) + (h * G + g) * q.stride(1);
#if TANDEM_AVX512
      for (int64_t g = 0; g < G; ++g) outs[g] = O + (b * H + h * G + g) * D;
      if (decode_head_512(qs.data(), G, Kh, Vh, table, bs, D, start, L, sc, p.data(), kbuf.data(), outs.data()))
        continue;
#endif
      std::fill(mx.begin(), mx.end(), -INFINITY);
      for (int64_t t = start; t < L;) {  // block by block: one table lookup per block
        const int64_t blk = t / bs, end = std::min(L, (blk + 1) * bs);
        const C* row = Kh + (table[blk] * bs + t % bs) * D;
        for (; t < end; ++t, row += D) {
          float* st = p.data() + (t - start) * G;
          dots(qs.data(), G, row, D, sc, st);
          for (int64_t g = 0; g < G; ++g) mx[g] = std::max(mx[g], st[g]);
        }
      }
      const int64_t len = L - start, n = len * G;
      for (int64_t t = 0; t < len; ++t)
        for (int64_t g = 0; g < G; ++g) p[t * G + g] -= mx[g];
      int64_t j = 0;
      for (; j + 8 <= n; j += 8) _mm256_storeu_ps(p.data() + j, exp8(_mm256_loadu_ps(p.data() + j)));
      for (; j < n; ++j) p[j] = std::exp(p[j]);
      std::fill(inv.begin(), inv.end(), 0.f);
      for (int64_t t = 0; t < len; ++t)
        for (int64_t g = 0; g < G; ++g) inv[g] += p[t * G + g];
      for (int64_t g = 0; g < G; ++g) inv[g] = 1.f / inv[g];
      for (int64_t t = 0; t < len; ++t)
        for (int64_t g = 0; g < G; ++g) p[t * G + g] *= inv[g];
      if (weighted_values_fast(G, p.data(), Vh, table, bs, D, start, L, acc.data())) {
        for (int64_t g = 0; g < G; ++g) std::copy_n(acc.data() + g * D, D, O + (b * H + h * G + g) * D);
        continue;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = start; t < L;) {
        const int64_t blk = t / bs, end = std::min(L, (blk + 1) * bs);
        const C* vv = Vh + (table[blk] * bs + t % bs) * D;
        for (; t < end; ++t, vv += D) {
          const float* pt = p.data() + (t - start) * G;
          for (int64_t g = 0; g < G; ++g) {
            const __m256 w = _mm256_set1_ps(pt[g]);
            float* a = acc.data() + g * D;
            for (int64_t d = 0; d < D; d += 8)
              _mm256_storeu_ps(a + d, _mm256_fmadd_ps(w, load8(vv + d), _mm256_loadu_ps(a + d)));
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) std::copy_n(acc.data() + g * D, D, O + (b * H + h * G + g) * D);
    }
  });
  };
  if (kv_cache.scalar_type() == at::kBFloat16)
    attend(reinterpret_cast<const uint16_t*>(kv_cache.data_ptr<at::BFloat16>()));
  else
    attend(kv_cache.data_ptr<float>());
  return out;
}

// ---- the decoder stack for a decode-only step ----------------------------------------------------

// Rows of a decode step the stack takes: 8 (linear_small's) in the avx2 build, where fp32 rows
// past 8 run torch's matmul in the module path; in the avx512 build any decode batch up to this,
// since linear_medium is what the module path runs for 9+ fp32 rows (and linear_bf16 takes any M).
// Per-layer Python dispatch cost ~6 ms of a 77 ms step at 32 rows (SmolLM2, 30 layers).
constexpr int64_t kMaxStackRows = TANDEM_AVX512 ? 512 : kMaxSmallRows;

// A decode-row linear over either weight layout, the kernel the module path (packing.py) runs for
// these rows: fp32 panel64 [NB, K, 64] (linear_small up to 8 rows, then linear_medium) or bf16
// pair panels [NB, K2, 64, 2] (linear_bf16, vdpbf16ps where the CPU has it).
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, int64_t n) {
  if (w.scalar_type() == at::kBFloat16) return linear_bf16(x, w, bias, n, true);
#if TANDEM_AVX512
  if (x.size(0) > kMaxSmallRows) return linear_medium(x, w, bias, n);
#endif
  return linear_small(x, w, bias, n);
}

// One dense pre-norm layer's fixed arguments (no q/k norm, SwiGLU MLP, panel64 or pair-panel
// weights; norms and biases fp32).
struct DecodeLayerWeights {
  at::Tensor ln1, ln2;          // [D] input / post-attention RMSNorm weights
  double eps;                   // RMSNorm epsilon
  at::Tensor qkv_w, qkv_b;      // [NB, D, 64] q, k, v rows fused; bias [q + 2 kv] or undefined
  at::Tensor o_w, o_b;          // [NB, q, 64]; bias [D] or undefined
  at::Tensor gate_up_w, down_w; // [NB, D, 64] gate rows then up rows; [NB, I, 64]
  int64_t num_heads, num_kv_heads, head_dim, intermediate;
  double scale;                 // attention score scale
  int64_t window;               // sliding window, 0 = none
};

// One layer for T <= kMaxStackRows decode rows: the same kernels in the same order as the module path
// (services/engine/model/decoder.py). x [T, D] is the previous layer's output; stream [T, D] the
// residual stream before adding it (undefined for layer 0, where x is the embeddings and becomes
// the stream). cos/sin [T, 1, Dh/2]; kv_cache, slots, block_tables, seq_lens as for write_kv /
// decode_attention. Returns (layer output [T, D], residual stream); the stream is updated in place.
std::pair<at::Tensor, at::Tensor> decode_layer(const DecodeLayerWeights& w, const at::Tensor& x, at::Tensor stream,
                                               const at::Tensor& cos, const at::Tensor& sin, at::Tensor kv_cache,
                                               const at::Tensor& slots, const at::Tensor& block_tables,
                                               const at::Tensor& seq_lens) {
  const int64_t T = x.size(0), D = x.size(1), Dh = w.head_dim;
  const int64_t q_size = w.num_heads * Dh, kv_size = w.num_kv_heads * Dh;
  at::Tensor h;
  if (stream.defined()) {
    h = rms_norm(x, w.ln1, w.eps, stream);
  } else {
    stream = x;
    h = rms_norm(x, w.ln1, w.eps, c10::nullopt);
  }
  const auto opt = [](const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
  at::Tensor qkv = linear_rows(h, w.qkv_w, opt(w.qkv_b), q_size + 2 * kv_size);
  rope_(qkv.narrow(1, 0, q_size + kv_size).view({T, w.num_heads + w.num_kv_heads, Dh}), cos, sin);
  const at::Tensor q = qkv.narrow(1, 0, q_size).view({T, w.num_heads, Dh});
  write_kv(kv_cache, qkv.narrow(1, q_size, kv_size).view({T, w.num_kv_heads, Dh}),
           qkv.narrow(1, q_size + kv_size, kv_size).view({T, w.num_kv_heads, Dh}), slots);
  at::Tensor attn = decode_attention(q, kv_cache, block_tables, seq_lens, w.scale, w.window);
  at::Tensor o = linear_rows(attn.view({T, q_size}), w.o_w, opt(w.o_b), D);
  at::Tensor h2 = rms_norm(o, w.ln2, w.eps, stream);
  at::Tensor act = silu_and_mul(linear_rows(h2, w.gate_up_w, c10::nullopt, 2 * w.intermediate));
  return {linear_rows(act, w.down_w, c10::nullopt, D), stream};
}

// Every layer of a dense model and its two ends (embedding lookup, rope table, final norm),
// held once at load so a decode step is one call from Python (per-layer Python dispatch took
// ~35 us a layer under cProfile). The tensors share the model's storage.
class DecodeStack {
 public:
  // embed [V, D] (the lookup table, fp32 or bf16), cos_sin [P, Dh] (cos in the first half of a row, sin in the
  // second: RotaryEmbedding's table), final RMSNorm weight [D] and epsilon.
  DecodeStack(at::Tensor embed, at::Tensor cos_sin, at::Tensor norm_w, double norm_eps)
      : embed_(std::move(embed)), cos_sin_(std::move(cos_sin)), norm_w_(std::move(norm_w)), norm_eps_(norm_eps) {
    for (const at::Tensor* t : {&cos_sin_, &norm_w_}) check_f32(*t, "model end");
    check_kv_dtype(embed_, "embed");  // fp32 or bf16 (rows widened to fp32 at lookup)
    TORCH_CHECK(embed_.dim() == 2 && cos_sin_.dim() == 2 && cos_sin_.is_contiguous() && norm_w_.numel() == embed_.size(1),
                "decode stack ends: embed [V, D], contiguous cos_sin [P, Dh], norm weight [D]");
  }

  void add_layer(at::Tensor ln1, at::Tensor ln2, double eps, at::Tensor qkv_w, c10::optional<at::Tensor> qkv_b,
                 at::Tensor o_w, c10::optional<at::Tensor> o_b, at::Tensor gate_up_w, at::Tensor down_w,
                 int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t intermediate, double scale,
                 int64_t window) {
    for (const at::Tensor* t : {&ln1, &ln2}) check_f32(*t, "layer norm weight");
    const bool bf16 = qkv_w.scalar_type() == at::kBFloat16;
    for (const at::Tensor* t : {&qkv_w, &o_w, &gate_up_w, &down_w}) {
      const bool ok = bf16 ? t->scalar_type() == at::kBFloat16 && t->dim() == 4 && t->size(2) == kPanel
                           : t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(2) == kPanel;
      TORCH_CHECK(ok, "decode stack weights must be all panel64 (fp32) or all bf16 pair panels [NB, K2, 64, 2]");
    }
    layers_.push_back({ln1, ln2, eps, qkv_w, qkv_b.value_or(at::Tensor()), o_w, o_b.value_or(at::Tensor()),
                       gate_up_w, down_w, num_heads, num_kv_heads, head_dim, intermediate, scale, window});
  }

  // input_ids, positions [T <= kMaxStackRows] int64; kv_caches one per layer -> hidden [T, D] after the final
  // norm (CausalLM.forward's result). Ids or positions outside the tables raise (index_select).
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& positions, const std::vector<at::Tensor>& kv_caches,
                     const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& seq_lens) const {
    TORCH_CHECK(kv_caches.size() == layers_.size(), "one kv cache per layer: ", layers_.size(), " layers, ",
                kv_caches.size(), " caches");
    TORCH_CHECK(input_ids.dim() == 1 && input_ids.size(0) >= 1 && input_ids.size(0) <= kMaxStackRows,
                "the decode stack takes 1..", kMaxStackRows, " rows");
    TORCH_CHECK(positions.sizes() == input_ids.sizes(), "one position per input id");
    const at::Tensor cs = cos_sin_.index_select(0, positions);  // [T, Dh]
    const int64_t half = cs.size(1) / 2;
    const at::Tensor cos = cs.narrow(1, 0, half), sin = cs.narrow(1, half, half);
    at::Tensor out = embed_.index_select(0, input_ids).to(at::kFloat), stream;  // [T, D], a new tensor
    for (size_t i = 0; i < layers_.size(); ++i)
      std::tie(out, stream) = decode_layer(layers_[i], out, stream, cos, sin, kv_caches[i], slots, block_tables,
                                           seq_lens);
    return rms_norm(out, norm_w_, norm_eps_, stream);
  }

  int64_t size() const { return static_cast<int64_t>(layers_.size()); }

 private:
  at::Tensor embed_, cos_sin_, norm_w_;
  double norm_eps_;
  std::vector<DecodeLayerWeights> layers_;
};

}  // namespace
}  // namespace TANDEM_ISA_NS
}  // namespace tandem

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace tandem;
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("linear_small", &linear_small, "x [M<=8, K] @ panel64 weight -> [M, N]", py::arg("x"), py::arg("w"),
        py::arg("bias"), py::arg("n_out"), release());
  m.def("linear_bf16", &linear_bf16, "x [M, K] fp32 @ bf16 pair-panel weight -> [M, N] fp32", py::arg("x"),
        py::arg("w"), py::arg("bias"), py::arg("n_out"), py::arg("dot") = true, release());
#if TANDEM_AVX512
  m.def("linear_medium", &linear_medium, "x [M, K] @ panel64 weight -> [M, N] (9..511 rows)", py::arg("x"),
        py::arg("w"), py::arg("bias"), py::arg("n_out"), release());
#endif
  m.def("bf16_dot_supported", &bf16_dot_supported, "this build and CPU run vdpbf16ps (AVX512_BF16)");
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally after residual += x", py::arg("x"), py::arg("weight"),
        py::arg("eps"), py::arg("residual") = py::none(), release());
  m.def("rope_", &rope_, "rotate-half rotary embedding in place", release());
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up", release());
  m.def("write_kv", &write_kv, "store new K/V at their cache slots", release());
  m.def("decode_attention", &decode_attention, "one-query attention over the paged cache", release());
  m.def("prefill_attention", &prefill_attention, "causal attention of a prompt chunk over its keys",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("window"), release());
  py::class_<DecodeStack>(m, "DecodeStack", "a dense model's decoder layers for decode-only steps (MAX_STACK_ROWS rows)",
                          py::module_local())
      .def(py::init<at::Tensor, at::Tensor, at::Tensor, double>(), py::arg("embed"), py::arg("cos_sin"),
           py::arg("norm_weight"), py::arg("norm_eps"))
      .def("add_layer", &DecodeStack::add_layer)
      .def("forward", &DecodeStack::forward, release())
      .def("__len__", &DecodeStack::size);
  m.def("read_streams", &read_streams, "sum of x read as linear_small reads weights (a bandwidth probe)",
        release());
  m.attr("VARIANT") = TANDEM_ISA_NAME;
  // op -> the vector ISA of the code it runs in this build ("avx2": 256-bit AVX2 + FMA code)
  py::dict op_isa;
  op_isa["linear_small"] = linear_small_isa();
  op_isa["linear_bf16"] = linear_bf16_isa();
  op_isa["linear_medium"] = TANDEM_AVX512 ? "avx512" : "torch (batched matmul over the panels)";
  for (const char* op : {"rms_norm", "rope_", "silu_and_mul", "write_kv", "prefill_attention"})
    op_isa[op] = "avx2";
  op_isa["decode_attention"] = TANDEM_AVX512 ? "avx512 (head_dim % 16 == 0, else avx2)" : "avx2";
  op_isa["DecodeStack"] = std::string("linear_small ") + linear_small_isa() + (TANDEM_AVX512 ? ", linear_medium avx512" : "") +
                          ", linear_bf16 " + linear_bf16_isa() +
                          ", the rest avx2";
  m.attr("OP_ISA") = op_isa;
  m.attr("PANEL") = kPanel;
  m.attr("MAX_SMALL_ROWS") = kMaxSmallRows;
  m.attr("MAX_STACK_ROWS") = kMaxStackRows;
}
