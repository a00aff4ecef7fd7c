// Decode attention of one (sequence, KV head) item in 512-bit code: the avx512 build's path for
// cpu_ops.cpp's decode_attention (the avx2 build keeps the 256-bit loops there).
//
// The G query heads of the KV head share one pass over its keys and one over its values:
// - scores: the keys go in tiles of 16 rows (one paged block at block_size 16; a tile may span
//   blocks). Per query head, 16 accumulators (one per key row) take D / 16 FMAs each, and one
//   transpose-add tree (sum16x16) turns them into the tile's 16 scores in one register, where
//   the 256-bit code reduced every (query head, key) pair on its own (a horizontal sum each).
//   bf16 keys are widened to fp32 once per tile (kbuf), not once per query head;
// - softmax per query head over its contiguous row of scores (p[g * len + i]);
// - values: G x NV accumulator registers (G NV <= 24), the value rows widened once per column
//   pass; query heads past 8 go in further groups of up to 8, so every G has a register plan.
// Numerics: fp32 throughout (bf16 is widened exactly), the same products as the 256-bit code,
// summed in another order. A row's result depends only on its own sequence, never on the batch.
//
// Why hand-written: torch has no paged decode attention on CPU (the module path gathers the
// blocks and runs baddbmm + softmax + bmm). Measured against the 256-bit loops (the avx2 build),
// AMD EPYC Zen 4 (avx512-bf16), 2 threads, quiet; one process, both builds alternating, median
// of 15 x 10 calls, bf16 cache, block_size 16, head_dim 64 (/tmp/s25/att_ab.py, 2026-12-03
// 15:50 UTC), ms per call:
//
//   heads / KV heads       B = 32, L = 250     B = 8, L = 250     B = 1, L = 800
//   12 / 4 (dense-100m)    0.613 -> 0.322      0.148 -> 0.085     0.059 -> 0.034
//   9 / 3 (SmolLM2)        0.429 -> 0.233      0.103 -> 0.062     0.045 -> 0.034
//   14 / 2 (qwen2.5-0.5b)  0.811 -> 0.303      0.208 -> 0.082     0.084 -> 0.038

#include "simd.h"

#if TANDEM_AVX512

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace tandem {
inline namespace TANDEM_ISA_NS {
namespace {

constexpr int kTile = 16;          // key rows per score tile (one zmm of scores)
constexpr int64_t kPrefetchTiles = 1;  // how many tiles ahead the score pass fetches keys

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {  // bf16 bits: the high half of the fp32
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// e^x for 16 floats: exp8's method (simd.h) on 512-bit registers.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

// Lane j of the result = the sum of v[j]'s 16 lanes. Three levels inside 128-bit lanes
// (unpack ps, unpack pd) leave, per 128-bit lane L, four vectors' partial sums side by side;
// two 128-bit shuffles add the four lanes and put vectors 4q..4q+3 in lane q.
inline __m512 sum16x16(const __m512 (&v)[16]) {
  __m512 a[8], b[4];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [x0 + x2, y0 + y2, x1 + x3, y1 + y3], x = v[2i], y = v[2i + 1]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {  // per 128-bit lane: the sums over it of v[4k .. 4k + 3]
    const __m512d x = _mm512_castps_pd(a[2 * k]), y = _mm512_castps_pd(a[2 * k + 1]);
    b[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  constexpr int kEven = _MM_SHUFFLE(2, 0, 2, 0), kOdd = _MM_SHUFFLE(3, 1, 3, 1);
  const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], kEven), _mm512_shuffle_f32x4(b[0], b[1], kOdd));
  const __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], kEven), _mm512_shuffle_f32x4(b[2], b[3], kOdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, kEven), _mm512_shuffle_f32x4(c0, c1, kOdd));
}

// scores[0 : n] = scale * q . rows[j] for the tile's 16 fp32 rows (rows past n repeat a valid
// one and are not stored). D % 16 == 0.
inline void tile_scores(const float* q, const float* const* rows, int n, int64_t D, float scale, float* scores) {
  __m512 acc[kTile];
#pragma GCC unroll 16
  for (int j = 0; j < kTile; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __m512 qd = _mm512_loadu_ps(q + d);
#pragma GCC unroll 16
    for (int j = 0; j < kTile; ++j) acc[j] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(rows[j] + d), acc[j]);
  }
  const __mmask16 keep = n >= kTile ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1);
  _mm512_mask_storeu_ps(scores, keep, _mm512_mul_ps(sum16x16(acc), _mm512_set1_ps(scale)));
}

// Into L1: `cols` elements of each of `rows` consecutive cache rows (D apart) from p. The blocks of a
// sequence lie anywhere in the pool, so the hardware prefetcher cannot run ahead of a block
// boundary; each tile or block fetches the next one while it computes. Measured with the KV pools
// of 8 layers (past L3), blocks shuffled, alternating (/tmp/s25/att_real.py, 16:05 UTC), ms a
// call: dense-100m's shapes B = 32, L = 250: 0.875 -> 0.735; B = 8: 0.162 -> 0.118; qwen2.5-0.5b's
// B = 32: 0.552 -> 0.438 (a later run, on a slower moment of the shared host: 1.01-1.16x).
template <typename C>
inline void prefetch_rows(const C* p, int64_t rows, int64_t D, int64_t cols) {
  const int64_t bytes = cols * static_cast<int64_t>(sizeof(C));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < bytes; o += 64)
      _mm_prefetch(reinterpret_cast<const char*>(p + r * D) + o, _MM_HINT_T0);
}

// out[g, c0 : c0 + 16 NV] = sum_t w[g * len + t - start] V[t, c0 : c0 + 16 NV] for G query heads
// over the rows [start, L) of one KV head's paged values.
template <int G, int NV, typename C>
inline void values_pass(const float* w, int64_t len, const C* Vh, const int64_t* table, int64_t bs, int64_t D,
                        int64_t start, int64_t L, int64_t c0, float* const* outs) {
  __m512 acc[G][NV];
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
    for (int u = 0; u < NV; ++u) acc[g][u] = _mm512_setzero_ps();
  for (int64_t t = start; t < L;) {
    const int64_t blk = t / bs, end = std::min(L, (blk + 1) * bs);
    const C* vv = Vh + (table[blk] * bs + t % bs) * D + c0;
    if (end < L) prefetch_rows(Vh + table[blk + 1] * bs * D + c0, std::min(bs, L - end), D, 16 * NV);  // the next block
    for (; t < end; ++t, vv += D) {
      __m512 v[NV];
#pragma GCC unroll 8
      for (int u = 0; u < NV; ++u) v[u] = load16(vv + 16 * u);
      const float* wt = w + (t - start);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        const __m512 x = _mm512_set1_ps(wt[g * len]);
#pragma GCC unroll 8
        for (int u = 0; u < NV; ++u) acc[g][u] = _mm512_fmadd_ps(x, v[u], acc[g][u]);
      }
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
    for (int u = 0; u < NV; ++u) _mm512_storeu_ps(outs[g] + c0 + 16 * u, acc[g][u]);
}

// The value passes of G <= 8 query heads over all D columns: the widest NV (8, 4, 2, 1 zmm)
// that divides D / 16 with G NV <= 24 accumulators.
template <int G, typename C>
inline void values_group(const float* w, int64_t len, const C* Vh, const int64_t* table, int64_t bs, int64_t D,
                         int64_t start, int64_t L, float* const* outs) {
  const int64_t chunks = D / 16;
  auto passes = [&](auto nv) {
    constexpr int NV = decltype(nv)::value;
    for (int64_t c0 = 0; c0 < D; c0 += 16 * NV) values_pass<G, NV>(w, len, Vh, table, bs, D, start, L, c0, outs);
  };
  if constexpr (G * 8 <= 24) {
    if (chunks % 8 == 0) return passes(std::integral_constant<int, 8>());
  }
  if constexpr (G * 4 <= 24) {
    if (chunks % 4 == 0) return passes(std::integral_constant<int, 4>());
  }
  if (chunks % 2 == 0) return passes(std::integral_constant<int, 2>());
  passes(std::integral_constant<int, 1>());
}

template <typename C>
void values_any(int64_t G, const float* w, int64_t len, const C* Vh, const int64_t* table, int64_t bs, int64_t D,
                int64_t start, int64_t L, float* const* outs) {
  for (int64_t g0 = 0; g0 < G; g0 += 8) {
    const float* wg = w + g0 * len;
    float* const* og = outs + g0;
    switch (std::min<int64_t>(8, G - g0)) {
      case 1: values_group<1>(wg, len, Vh, table, bs, D, start, L, og); break;
      case 2: values_group<2>(wg, len, Vh, table, bs, D, start, L, og); break;
      case 3: values_group<3>(wg, len, Vh, table, bs, D, start, L, og); break;
      case 4: values_group<4>(wg, len, Vh, table, bs, D, start, L, og); break;
      case 5: values_group<5>(wg, len, Vh, table, bs, D, start, L, og); break;
      case 6: values_group<6>(wg, len, Vh, table, bs, D, start, L, og); break;
      case 7: values_group<7>(wg, len, Vh, table, bs, D, start, L, og); break;
      default: values_group<8>(wg, len, Vh, table, bs, D, start, L, og); break;
    }
  }
}

// softmax in place over p[0 : n)
inline void softmax_row(float* p, int64_t n) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(p + i));
  float mx = _mm512_reduce_max_ps(m);
  for (; i < n; ++i) mx = std::max(mx, p[i]);
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 s = _mm512_setzero_ps();
  for (i = 0; i + 16 <= n; i += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + i), vm));
    _mm512_storeu_ps(p + i, e);
    s = _mm512_add_ps(s, e);
  }
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + i), vm));
    _mm512_mask_storeu_ps(p + i, k, e);
    s = _mm512_add_ps(s, _mm512_maskz_mov_ps(k, e));
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(s));
  for (i = 0; i + 16 <= n; i += 16) _mm512_storeu_ps(p + i, _mm512_mul_ps(_mm512_loadu_ps(p + i), inv));
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(p + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p + i), inv));
  }
}

}  // namespace

template <typename C>
bool decode_head_512(const float* const* qs, int64_t G, const C* Kh, const C* Vh, const int64_t* table, int64_t bs,
                     int64_t D, int64_t start, int64_t L, float scale, float* p, float* kbuf, float* const* outs) {
  if (D % 16 != 0) return false;
  const int64_t len = L - start;
  const float* rows[kTile];
  const auto prefetch_keys = [&](int64_t from, int64_t to) {
    for (int64_t t = from; t < std::min(L, to); ++t) prefetch_rows(Kh + (table[t / bs] * bs + t % bs) * D, 1, D, D);
  };
  prefetch_keys(start + kTile, start + kPrefetchTiles * kTile);
  for (int64_t t0 = start; t0 < L; t0 += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, L - t0));
    prefetch_keys(t0 + kPrefetchTiles * kTile, t0 + (kPrefetchTiles + 1) * kTile);  // keys kPrefetchTiles tiles ahead
    for (int j = 0; j < kTile; ++j) {
      const int64_t t = t0 + std::min(j, n - 1);  // rows past n repeat the last valid one
      const C* src = Kh + (table[t / bs] * bs + t % bs) * D;
      if constexpr (std::is_same_v<C, float>) {
        rows[j] = src;
      } else {
        float* dst = kbuf + j * D;
        if (j < n)
          for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, load16(src + d));
        rows[j] = j < n ? dst : kbuf + (n - 1) * D;
      }
    }
    for (int64_t g = 0; g < G; ++g) tile_scores(qs[g], rows, n, D, scale, p + g * len + (t0 - start));
  }
  for (int64_t g = 0; g < G; ++g) softmax_row(p + g * len, len);
  values_any(G, p, len, Vh, table, bs, D, start, L, outs);
  return true;
}

template bool decode_head_512<float>(const float* const*, int64_t, const float*, const float*, const int64_t*,
                                     int64_t, int64_t, int64_t, int64_t, float, float*, float*, float* const*);
template bool decode_head_512<uint16_t>(const float* const*, int64_t, const uint16_t*, const uint16_t*,
                                        const int64_t*, int64_t, int64_t, int64_t, int64_t, float, float*, float*,
                                        float* const*);

}  // namespace TANDEM_ISA_NS
}  // namespace tandem

#endif  // TANDEM_AVX512
