// Causal attention of a prompt chunk over its sequence's keys, fp32, AVX2 + FMA code (in both
// ISA builds, see simd.h).
//
// Flash-attention order: each work item is one KV head and kQ consecutive query positions,
// with the G query heads that share the KV head stacked as the rows of one tile (M = G * kQ
// rows: one pass over the keys serves all of them). The item walks its keys in blocks of kK
// with an online softmax (running row max m and sum l), so no [T, S] score matrix exists and
// key blocks wholly after a row block's last position are never touched (the causal half).
//
// Why: torch's flash attention for CPU ran a 1,024-token dense-100m prefill's attention at
// ~73 GFLOP/s (22 ms a layer), a fifth of the prefill. This kernel, same shapes (12 heads over
// 4 KV heads, head_dim 64), alternating: 15.5-17.7 ms against 21.6-23.1; the whole 1,024-token
// TTFT 0.996 -> 0.929 s (median of 8 alternating pairs).
//
// Shapes: q [T, H, D] fp32; k, v [Hkv, S, D] fp32 or bf16 (any strides, last dim contiguous); query row t sits
// at position S - T + t and sees keys at positions p <= its own (and, with window > 0, p >
// its own - window). D % 8 == 0. Numerics: fp32, sums in another order than torch's.

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <utility>
#include <cmath>
#include <vector>

#include "simd.h"

namespace tandem {
inline namespace TANDEM_ISA_NS {
namespace {

constexpr int64_t kQ = 32;  // query positions per work item
constexpr int64_t kK = 64;  // keys per block (the score tile's width)
constexpr int kMR = 6;      // rows of a register tile

// The tiles' fixed-count loops carry "#pragma GCC unroll": unrolled that early, GCC 12 keeps the
// accumulator arrays in registers; without it, it stored every accumulator to the stack on every
// step of the reduction (measured: the whole kernel ~2x slower, 34 against 16 ms at 1,024 tokens).

// s[r, 0:16] = sum_d a[r, d] * kt[d, 0:16] for r < MR (a row stride lda, kt row stride ldk).
template <int MR>
inline void tile_qk(const float* a, int64_t lda, const float* kt, int64_t ldk, int64_t D, float* s) {
  __m256 c[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) c[r][0] = c[r][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 b0 = _mm256_loadu_ps(kt + d * ldk), b1 = _mm256_loadu_ps(kt + d * ldk + 8);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r * lda + d);
      c[r][0] = _mm256_fmadd_ps(x, b0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(x, b1, c[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(s + r * kK, c[r][0]);
    _mm256_storeu_ps(s + r * kK + 8, c[r][1]);
  }
}

// o[r, 0:8 NV] += sum_{j < n} p[r, j] * v[j, 0:8 NV] for r < MR (o row stride ldo, v row stride ldv).
template <int MR, int NV>
inline void tile_pv(const float* p, const float* v, int64_t ldv, int64_t n, float* o, int64_t ldo) {
  __m256 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int u = 0; u < NV; ++u) c[r][u] = _mm256_loadu_ps(o + r * ldo + 8 * u);
  for (int64_t j = 0; j < n; ++j) {
    __m256 b[NV];
#pragma GCC unroll 2
    for (int u = 0; u < NV; ++u) b[u] = _mm256_loadu_ps(v + j * ldv + 8 * u);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 x = _mm256_broadcast_ss(p + r * kK + j);
#pragma GCC unroll 2
      for (int u = 0; u < NV; ++u) c[r][u] = _mm256_fmadd_ps(x, b[u], c[r][u]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int u = 0; u < NV; ++u) _mm256_storeu_ps(o + r * ldo + 8 * u, c[r][u]);
}

// The MR-row tile functions for one row count, so a tile loop can end on a partial tile.
struct RowTiles {
  void (*qk)(const float*, int64_t, const float*, int64_t, int64_t, float*);
  void (*pv16)(const float*, const float*, int64_t, int64_t, float*, int64_t);
  void (*pv8)(const float*, const float*, int64_t, int64_t, float*, int64_t);
};

template <int MR>
constexpr RowTiles row_tiles() {
  return {&tile_qk<MR>, &tile_pv<MR, 2>, &tile_pv<MR, 1>};
}

constexpr RowTiles kTiles[kMR + 1] = {{}, row_tiles<1>(), row_tiles<2>(), row_tiles<3>(),
                                      row_tiles<4>(), row_tiles<5>(), row_tiles<6>()};

// Largest of the 8 lanes.
inline float hsum_max8(__m256 v) {
  const __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  return _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
}

// What one work item reads and writes (pointers into the call's tensors).
struct Problem {
  const float* q;      // [T, H, D]
  int64_t q_t, q_h;    // q strides of t and h
  const float* kt;     // K^T by key block: [Hkv, Sp / kK, D, kK], Sp = S rounded up to kK, zero past S
  const float* v;      // V packed: [Hkv, Sp, D], zero past S
  float* out;          // [T, H, D] contiguous
  int64_t T, S, H, G, D, Sp, window;
  float scale;
};

// Scratch of one thread: Q tile (scaled), scores/probabilities, output sums, row max and sum.
struct Scratch {
  std::vector<float> qt, s, o, m, l;
  explicit Scratch(int64_t M, int64_t D) : qt(M * D), s(M * kK), o(M * D), m(M), l(M) {}
};

// Softmax step of one key block for rows [0, M): mask, new row max, p = e^(s - max) in place,
// rescale the row's running sum and output by e^(old max - new max). Row r is position pos0 +
// r % nq; keys of the block start at position key0, n of them valid.
void online_softmax(const Problem& pb, Scratch& w, int64_t M, int64_t nq, int64_t pos0, int64_t key0, int64_t n) {
  for (int64_t r = 0; r < M; ++r) {
    float* s = w.s.data() + r * kK;
    const int64_t pos = pos0 + r % nq;
    const int64_t lo = pb.window > 0 ? std::max<int64_t>(0, pos - pb.window + 1 - key0) : 0;
    const int64_t hi = std::min<int64_t>(n, pos - key0 + 1);  // keys [lo, hi) of the block are seen
    __m256 mv = _mm256_set1_ps(w.m[r]);
    if (lo > 0 || hi < kK) {  // a boundary block: mask first
      for (int64_t j = 0; j < kK; ++j)
        if (j < lo || j >= hi) s[j] = -INFINITY;
    }
    for (int64_t j = 0; j < kK; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + j));
    const float mx = std::max(hsum_max8(mv), w.m[r]);
    if (mx == -INFINITY) {  // nothing seen yet: p = 0, sums stay 0
      std::fill_n(s, kK, 0.f);
      continue;
    }
    mv = _mm256_set1_ps(mx);
    for (int64_t j = 0; j < kK; j += 8) _mm256_storeu_ps(s + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv)));
    if (lo > 0 || hi < kK) {  // exp8 clamps at e^-87.3, not 0: masked keys get exactly 0
      const int64_t a = std::min(lo, kK), b = std::clamp<int64_t>(hi, a, kK);  // lo may pass the block, hi precede it
      std::fill(s, s + a, 0.f);
      std::fill(s + b, s + kK, 0.f);
    }
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < kK; j += 8) sum = _mm256_add_ps(sum, _mm256_loadu_ps(s + j));
    const float alpha = std::exp(w.m[r] - mx);  // 0 for the first block seen (m = -inf)
    w.l[r] = w.l[r] * alpha + hsum8(sum);
    w.m[r] = mx;
    if (alpha != 1.f) {
      const __m256 av = _mm256_set1_ps(alpha);
      float* o = w.o.data() + r * pb.D;
      for (int64_t d = 0; d < pb.D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(av, _mm256_loadu_ps(o + d)));
    }
  }
}

// One work item: KV head h, query rows [t0, t0 + nq).
void attend(const Problem& pb, Scratch& w, int64_t h, int64_t t0, int64_t nq) {
  const int64_t D = pb.D, M = pb.G * nq, pos0 = pb.S - pb.T + t0;
  for (int64_t r = 0; r < M; ++r) {  // row r: query head h * G + r / nq at t0 + r % nq, times scale
    const float* src = pb.q + (t0 + r % nq) * pb.q_t + (h * pb.G + r / nq) * pb.q_h;
    for (int64_t d = 0; d < D; ++d) w.qt[r * D + d] = src[d] * pb.scale;
  }
  std::fill_n(w.o.data(), M * D, 0.f);
  std::fill_n(w.m.data(), M, -INFINITY);
  std::fill_n(w.l.data(), M, 0.f);
  const int64_t last = pos0 + nq - 1;  // the item's last position: later keys are never seen
  const int64_t first = pb.window > 0 ? std::max<int64_t>(0, pos0 - pb.window + 1) : 0;
  const float* kt = pb.kt + h * D * pb.Sp;
  const float* v = pb.v + h * pb.Sp * D;
  for (int64_t key0 = first / kK * kK; key0 <= last; key0 += kK) {
    const int64_t n = std::min(kK, pb.S - key0);
    for (int64_t r = 0; r < M; r += kMR) {
      const RowTiles& t = kTiles[std::min<int64_t>(kMR, M - r)];
      for (int64_t j = 0; j < kK; j += 16)
        t.qk(w.qt.data() + r * D, D, kt + key0 * D + j, kK, D, w.s.data() + r * kK + j);
    }
    online_softmax(pb, w, M, nq, pos0, key0, n);
    for (int64_t r = 0; r < M; r += kMR) {
      const RowTiles& t = kTiles[std::min<int64_t>(kMR, M - r)];
      int64_t d = 0;
      for (; d + 16 <= D; d += 16) t.pv16(w.s.data() + r * kK, v + key0 * D + d, D, n, w.o.data() + r * D + d, D);
      if (d < D) t.pv8(w.s.data() + r * kK, v + key0 * D + d, D, n, w.o.data() + r * D + d, D);
    }
  }
  for (int64_t r = 0; r < M; ++r) {
    const float inv = 1.f / w.l[r];
    float* dst = pb.out + ((t0 + r % nq) * pb.H + h * pb.G + r / nq) * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = w.o[r * D + d] * inv;
  }
}

// fp32 from fp32 or bf16 storage (bf16: the high half of an fp32).
inline float widen(float f) { return f; }
inline float widen(at::BFloat16 b) { return static_cast<float>(b); }

// K, V [Hkv, S, D] (any strides; fp32, or bf16 gathered from a bf16 cache) -> fp32 K^T by key
// block [Hkv, Sp / kK, D, kK] and V [Hkv, Sp, D], zero past S: every tile the items read has
// rows kK * 4 or D * 4 bytes apart, whatever S and the source strides (one [D, S] K^T would
// put them S * 4 bytes apart: 4 KiB at S = 1,024).
template <typename C>
std::pair<at::Tensor, at::Tensor> pack_kv(const at::Tensor& k, const at::Tensor& v, int64_t Sp) {
  const int64_t Hkv = k.size(0), S = k.size(1), D = k.size(2);
  const auto f32 = k.options().dtype(at::kFloat);
  at::Tensor kt = at::zeros({Hkv, Sp / kK, D, kK}, f32);
  at::Tensor vp = at::zeros({Hkv, Sp, D}, f32);
  const C* ks = k.data_ptr<C>();
  const C* vs = v.data_ptr<C>();
  float* kd = kt.data_ptr<float>();
  float* vd = vp.data_ptr<float>();
  at::parallel_for(0, Hkv * (Sp / kK), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {  // one key block of one head
      const int64_t h = i / (Sp / kK), key0 = i % (Sp / kK) * kK, n = std::min(kK, S - key0);
      for (int64_t j = 0; j < n; ++j) {
        const C* krow = ks + h * k.stride(0) + (key0 + j) * k.stride(1);
        const C* vrow = vs + h * v.stride(0) + (key0 + j) * v.stride(1);
        float* vdst = vd + (h * Sp + key0 + j) * D;
        for (int64_t d = 0; d < D; ++d) kd[(i * D + d) * kK + j] = widen(krow[d]);
        for (int64_t d = 0; d < D; ++d) vdst[d] = widen(vrow[d]);
      }
    }
  });
  return {kt, vp};
}

}  // namespace

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                             int64_t window) {
  check_f32(q, "q");
  check_kv_dtype(k, "k");
  check_kv_dtype(v, "v");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "k and v must have one dtype");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q must be [T, H, D], k and v [Hkv, S, D]");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "q, k and v need a contiguous last dim");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(0), S = k.size(1);
  TORCH_CHECK(v.sizes() == k.sizes(), "k and v must have the same shape");
  TORCH_CHECK(k.size(2) == D && H % Hkv == 0, "q heads/dim do not fit k: q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(D % 8 == 0 && D <= 512, "head_dim must be a multiple of 8 up to 512, got ", D);
  TORCH_CHECK(T >= 1 && T <= S, "need 1 <= query tokens <= keys, got ", T, " and ", S);
  const int64_t Sp = (S + kK - 1) / kK * kK;
  const auto [kt, vp] = k.scalar_type() == at::kBFloat16 ? pack_kv<at::BFloat16>(k, v, Sp) : pack_kv<float>(k, v, Sp);
  at::Tensor out = at::empty({T, H, D}, q.options());
  const Problem pb{q.data_ptr<float>(), q.stride(0), q.stride(1), kt.data_ptr<float>(), vp.data_ptr<float>(),
                   out.data_ptr<float>(), T, S, H, H / Hkv, D, Sp, window,
                   static_cast<float>(scale)};
  // Items (KV head, row block), latest row blocks first: they see the most keys. Threads take
  // the next item as they finish one, which balances the causal triangle.
  const int64_t blocks = (T + kQ - 1) / kQ, items = Hkv * blocks;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Scratch w(pb.G * kQ, D);
    for (int64_t i = next++; i < items; i = next++) {
      const int64_t b = blocks - 1 - i / Hkv, t0 = b * kQ;
      attend(pb, w, i % Hkv, t0, std::min(kQ, T - t0));
    }
  });
  return out;
}

}  // namespace TANDEM_ISA_NS
}  // namespace tandem
