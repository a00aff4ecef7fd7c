// Small-M linear over panel64 weights (decode GEMV), and the read-bandwidth probe that shares
// its access pattern. Built once per ISA variant (simd.h).
//
// Weight layout "panel64": W [N, K] (nn.Linear, out x in) stored as [NB, K, 64] with
// NB = ceil(N / 64), element [b, k, j] = W[b * 64 + j, k] (rows past N are zero). One panel is
// 64 output columns for every k, so a 1-row GEMV reads it front to back.
//
// Numerics: fp32 throughout; products are summed in a different order than torch's, so results
// match torch to rounding (tests compare with tolerances), never bit for bit.

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "simd.h"

// 1 = the 512-bit plan below runs in the avx512 build (measured: see panel_rows16).
#ifndef TANDEM_LINEAR_SMALL_512
#define TANDEM_LINEAR_SMALL_512 1
#endif

namespace tandem {
inline namespace TANDEM_ISA_NS {
namespace {

// ---- small-M linear over panel64 weights ------------------------------------------------------

// A panel is read as kStreams concurrent front-to-back streams (its k range cut in kStreams
// equal parts, walked in step): one stream per core leaves DRAM bandwidth unused, several keep
// more cache misses in flight. Measured on the 2-core box over a model's worth of weights:
// 1 stream 25-30 GB/s, 2 streams 29-37, 4 streams 28-38 (torch's sum read 21-34 meanwhile).
constexpr int64_t kStreams = 4;

// MR rows of x against 8 NV columns of one panel (P points at the first column), over all of K:
// MR x NV register accumulators, each k row of the panel slice loaded once for the MR rows.
// out [MR, 64] (row stride kPanel) receives the dot products. MR x NV <= 8 keeps accumulators,
// the NV panel vectors and the broadcast within the 16 ymm registers.
template <int MR, int NV, bool kFetchRest = false>
inline void panel_block(const float* x, int64_t ldx, int64_t K, const float* P, float* out) {
  __m256 c[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NV; ++n) c[m][n] = _mm256_setzero_ps();
  auto step = [&](int64_t k) {
    const float* b = P + k * kPanel;
    if constexpr (kFetchRest)  // the k row's other column blocks, for the later passes
      for (int l = 8 * NV; l < kPanel; l += 16) _mm_prefetch(reinterpret_cast<const char*>(b + l), _MM_HINT_T0);
    __m256 bv[NV];
    for (int n = 0; n < NV; ++n) bv[n] = _mm256_loadu_ps(b + 8 * n);
    for (int m = 0; m < MR; ++m) {
      const __m256 a = _mm256_broadcast_ss(x + m * ldx + k);
      for (int n = 0; n < NV; ++n) c[m][n] = _mm256_fmadd_ps(a, bv[n], c[m][n]);
    }
  };
  const int64_t L = K / kStreams;  // each stream's k length; rows past kStreams * L follow
  for (int64_t k = 0; k < L; ++k)
    for (int64_t s = 0; s < kStreams; ++s) step(s * L + k);
  for (int64_t k = kStreams * L; k < K; ++k) step(k);
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NV; ++n) _mm256_storeu_ps(out + m * kPanel + 8 * n, c[m][n]);
}

// MR (1..4) rows against a whole panel: 64 / (8 NV) column blocks, NV = 8 / MR rounded down to
// a divisor of 8. Measured (2-core box, 300 MB of model-shaped weights, cold, alternating): 8 rows
// as two 4-row passes of this 28.9 -> 23.4 ms, 4 rows 21.2 -> 19.8 ms, 2 rows 12.6 -> 11.2 ms,
// against the earlier kernel that kept partial sums in memory.
// With more than one column block, the first pass prefetches the rest of each k row it reads, so
// that every cache line of the panel is requested from DRAM in one front-to-back sweep and the
// later passes find it in cache. Without that, each pass was its own strided sweep over DRAM
// (8 alternating rounds, same 300 MB: 4 rows 17.9 -> 13.0 ms, 8 rows 23.0 -> 18.9, 2 rows
// 10.8 -> 10.1; 1 row, one pass, 8.0).
template <int MR>
inline void panel_rows(const float* x, int64_t ldx, int64_t K, const float* P, float* out) {
  constexpr int NV = MR == 1 ? 8 : MR == 2 ? 4 : 2;
  if constexpr (NV == 8) {
    panel_block<MR, NV>(x, ldx, K, P, out);
  } else {
    panel_block<MR, NV, true>(x, ldx, K, P, out);
    for (int64_t c0 = 8 * NV; c0 < kPanel; c0 += 8 * NV) panel_block<MR, NV>(x, ldx, K, P + c0, out + c0);
  }
}

#if TANDEM_AVX512
// The same register plan at 512 bits: MR rows x NV zmm vectors (16 columns each) of one panel.
template <int MR, int NV, bool kFetchRest = false>
inline void panel_block16(const float* x, int64_t ldx, int64_t K, const float* P, float* out) {
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) c[m][n] = _mm512_setzero_ps();
  auto step = [&](int64_t k) {
    const float* b = P + k * kPanel;
    if constexpr (kFetchRest)
      for (int l = 16 * NV; l < kPanel; l += 16) _mm_prefetch(reinterpret_cast<const char*>(b + l), _MM_HINT_T0);
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) bv[n] = _mm512_loadu_ps(b + 16 * n);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 a = _mm512_set1_ps(x[m * ldx + k]);
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) c[m][n] = _mm512_fmadd_ps(a, bv[n], c[m][n]);
    }
  };
  const int64_t L = K / kStreams;
  for (int64_t k = 0; k < L; ++k)
    for (int64_t s = 0; s < kStreams; ++s) step(s * L + k);
  for (int64_t k = kStreams * L; k < K; ++k) step(k);
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) _mm512_storeu_ps(out + m * kPanel + 16 * n, c[m][n]);
}

// 2..4 rows against a whole panel in one pass: MR x 4 zmm accumulators (<= 16 of the 32
// registers), where the 256-bit plan needs 2-4 column passes. 1 row keeps the 256-bit plan (one
// pass already; the zmm one was no faster). Measured against the avx2 build in one process,
// alternating, 16 rounds over dense-100m's 300 MB of panels, 1 thread (AMD EPYC Zen 4, 2 cores,
// shared box, load average 10-12), median ms avx2 -> avx512: 1 row 19.6 -> 21.7 (a second run
// 11.1 -> 11.6), 2 rows 25.9 -> 21.1 (15.2 -> 12.6), 4 rows 34.9 -> 25.4 (22.9 -> 14.1),
// 8 rows (two 4-row groups) 46.3 -> 30.9 (31.0 -> 21.3).
template <int MR>
inline void panel_rows16(const float* x, int64_t ldx, int64_t K, const float* P, float* out) {
  panel_block16<MR, 4>(x, ldx, K, P, out);
}
#endif

// MR (1..4) rows of x against one panel, by the plan this build runs.
inline void panel_group(int64_t MR, const float* x, int64_t ldx, int64_t K, const float* P, float* out) {
#if TANDEM_AVX512 && TANDEM_LINEAR_SMALL_512
  switch (MR) {
    case 1: return panel_rows<1>(x, ldx, K, P, out);
    case 2: return panel_rows16<2>(x, ldx, K, P, out);
    case 3: return panel_rows16<3>(x, ldx, K, P, out);
    default: return panel_rows16<4>(x, ldx, K, P, out);
  }
#else
  switch (MR) {
    case 1: return panel_rows<1>(x, ldx, K, P, out);
    case 2: return panel_rows<2>(x, ldx, K, P, out);
    case 3: return panel_rows<3>(x, ldx, K, P, out);
    default: return panel_rows<4>(x, ldx, K, P, out);
  }
#endif
}

}  // namespace

const char* linear_small_isa() {
  return TANDEM_AVX512 && TANDEM_LINEAR_SMALL_512 ? "avx512 (2-8 rows; 1 row avx2)" : "avx2";
}

// A read-bandwidth probe (bench/sysperf.py): the sum of x, each thread reading its contiguous
// share as kStreams interleaved streams, the access pattern of linear_small. torch's sum reads
// one stream per thread, which on some machines leaves bandwidth unused.
double read_streams(const at::Tensor& x) {
  check_f32(x, "x");
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  const float* X = x.data_ptr<float>();
  const int64_t n8 = x.numel() / 8;  // whole vectors; the tail under 8 floats is not read
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  std::vector<double> part(nt, 0.0);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lo = n8 * t / nt, hi = n8 * (t + 1) / nt, L = (hi - lo) / kStreams;
      const float* base = X + 8 * lo;
      __m256 acc[kStreams];
      for (int64_t s = 0; s < kStreams; ++s) acc[s] = _mm256_setzero_ps();
      for (int64_t i = 0; i < L; ++i)
        for (int64_t s = 0; s < kStreams; ++s) acc[s] = _mm256_add_ps(acc[s], _mm256_loadu_ps(base + 8 * (s * L + i)));
      for (int64_t i = kStreams * L; i < hi - lo; ++i) acc[0] = _mm256_add_ps(acc[0], _mm256_loadu_ps(base + 8 * i));
      float v[8];
      for (int64_t s = 1; s < kStreams; ++s) acc[0] = _mm256_add_ps(acc[0], acc[s]);
      _mm256_storeu_ps(v, acc[0]);
      for (float f : v) part[t] += f;
    }
  });
  double total = 0.0;
  for (double p : part) total += p;
  return total;
}

// x [M, K] (M <= 8, rows contiguous), w [NB, K, 64] panel64, bias [N] or undefined -> [M, N].
at::Tensor linear_small(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                        int64_t n_out) {
  check_f32(x, "x");
  check_f32(w, "w");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [M, K] with contiguous rows");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == kPanel && w.is_contiguous(), "w must be a contiguous [NB, K, 64] panel64 weight");
  const int64_t M = x.size(0), K = x.size(1), NB = w.size(0);
  TORCH_CHECK(M >= 1 && M <= kMaxSmallRows, "linear_small takes 1..", kMaxSmallRows, " rows, got ", M);
  TORCH_CHECK(w.size(1) == K, "x has ", K, " features, the weight ", w.size(1));
  TORCH_CHECK(n_out > (NB - 1) * kPanel && n_out <= NB * kPanel, "n_out ", n_out, " does not fit ", NB, " panels");
  const float* B = nullptr;
  if (bias.has_value() && bias->defined()) {
    check_f32(*bias, "bias");
    TORCH_CHECK(bias->numel() == n_out && bias->is_contiguous(), "bias must be [N] contiguous");
    B = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({M, n_out}, x.options());
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    alignas(32) float out[kMaxSmallRows * kPanel];
    for (int64_t b = b0; b < b1; ++b) {
      const float* P = W + b * K * kPanel;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {  // rows 4..7 re-read the panel, mostly from L2
        const float* xr = X + m0 * ldx;
        float* o = out + m0 * kPanel;
        panel_group(std::min<int64_t>(4, M - m0), xr, ldx, K, P, o);
      }
      const int64_t cols = std::min(kPanel, n_out - b * kPanel);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < cols; ++j)
          Y[m * n_out + b * kPanel + j] = out[m * kPanel + j] + (B ? B[b * kPanel + j] : 0.f);
    }
  });
  return y;
}

}  // namespace TANDEM_ISA_NS
}  // namespace tandem
