// Medium-M linear over panel64 weights (9..511 rows: decode batches past linear_small's 8 rows,
// short prompt chunks), AVX-512 build only. Weight layout: panel_linear.cpp's panel64,
// W [N, K] stored as [NB, K, 64], element [b, k, j] = W[b * 64 + j, k].
//
// Why a kernel of our own: below 512 rows packing.py ran one batched torch matmul over the
// panels ([rows, K] x [NB, K, 64]), i.e. NB small GEMMs of 64 columns, where MKL's blocking for
// narrow B does not reach the FMA peak. Here each thread takes whole panels (K x 64 fp32: 147 KB
// at K = 576, 393 KB at K = 1536, so it stays in L2 while every row tile passes over it) and
// runs a 6 x 64 register tile: 24 zmm accumulators, the panel's 4 zmm of row k loaded once for 6
// rows, 6 broadcasts, 24 FMAs per k. Measured figures: see packing.py's module docstring.
//
// The first row tile of a panel reads it from memory (147 KB in ~10 us at one core's share of the
// bandwidth, against ~4.4 us of FMAs), so while a thread works on one panel it prefetches the
// next one it will take into L2, spread over the row tiles. SmolLM2's 30 layers + head at 2
// threads, best of 9 alternating (/tmp/pg/ab.py): 16 rows 26.8 -> 25.5 ms, 32 rows 47.1 -> 44.6,
// 64 and 128 rows unchanged within 2%.
//
// Numerics: fp32, each output summed over k in order (0..K-1), one accumulator per output; torch
// sums in another order, so results match to rounding (tests compare with tolerances).

#include <ATen/Parallel.h>

#include <algorithm>

#include "simd.h"

#if TANDEM_AVX512

namespace tandem {
inline namespace TANDEM_ISA_NS {
namespace {

constexpr int64_t kTileRows = 6;    // rows of the register tile (6 x 4 zmm accumulators)
constexpr int64_t kChunkRows = 96;  // rows of one task: a task is (panel, chunk of rows)

// MR rows of x (row stride ldx) against one whole panel P [K, 64]; y (row stride ldy) gets the
// first `cols` (1..64) columns, plus bias (B, or nullptr) of those columns.
template <int MR>
inline void tile(const float* x, int64_t ldx, int64_t K, const float* P, const float* B, float* y, int64_t ldy,
                 int64_t cols, const char* pf, int64_t ppk) {
  __m512 c[MR][4];
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < 4; ++n) c[m][n] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* b = P + k * kPanel;
    if (pf)
      for (int64_t u = 0; u < ppk; ++u) _mm_prefetch(pf + (k * ppk + u) * 64, _MM_HINT_T1);
    __m512 bv[4];
#pragma GCC unroll 4
    for (int n = 0; n < 4; ++n) bv[n] = _mm512_loadu_ps(b + 16 * n);
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      const __m512 a = _mm512_set1_ps(x[m * ldx + k]);
#pragma GCC unroll 4
      for (int n = 0; n < 4; ++n) c[m][n] = _mm512_fmadd_ps(a, bv[n], c[m][n]);
    }
  }
#pragma GCC unroll 4
  for (int n = 0; n < 4; ++n) {
    const int64_t left = cols - 16 * n;
    if (left <= 0) break;
    const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
    const __m512 bias = B ? _mm512_maskz_loadu_ps(mask, B + 16 * n) : _mm512_setzero_ps();
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) _mm512_mask_storeu_ps(y + m * ldy + 16 * n, mask, _mm512_add_ps(c[m][n], bias));
  }
}

inline void tile_rows(int64_t mr, const float* x, int64_t ldx, int64_t K, const float* P, const float* B, float* y,
                      int64_t ldy, int64_t cols, const char* pf, int64_t ppk) {
  switch (mr) {
    case 1: return tile<1>(x, ldx, K, P, B, y, ldy, cols, pf, ppk);
    case 2: return tile<2>(x, ldx, K, P, B, y, ldy, cols, pf, ppk);
    case 3: return tile<3>(x, ldx, K, P, B, y, ldy, cols, pf, ppk);
    case 4: return tile<4>(x, ldx, K, P, B, y, ldy, cols, pf, ppk);
    case 5: return tile<5>(x, ldx, K, P, B, y, ldy, cols, pf, ppk);
    default: return tile<6>(x, ldx, K, P, B, y, ldy, cols, pf, ppk);
  }
}

}  // namespace

// x [M, K] (rows contiguous), w [NB, K, 64] panel64, bias [N] or undefined -> [M, N].
at::Tensor linear_medium(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                         int64_t n_out) {
  check_f32(x, "x");
  check_f32(w, "w");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [M, K] with contiguous rows");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == kPanel && w.is_contiguous(), "w must be a contiguous [NB, K, 64] panel64 weight");
  const int64_t M = x.size(0), K = x.size(1), NB = w.size(0);
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
  const int64_t ldx = x.stride(0), chunks = (M + kChunkRows - 1) / kChunkRows;
  at::parallel_for(0, NB * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks, r0 = (t % chunks) * kChunkRows, r1 = std::min(M, r0 + kChunkRows);
      const float* P = W + b * K * kPanel;
      const int64_t cols = std::min(kPanel, n_out - b * kPanel);
      // the next panel this thread takes (when it is another one): its 4 K cache lines are
      // prefetched into L2 over this panel's row tiles, ppk lines per k of each tile
      const int64_t nt = (r1 - r0 + kTileRows - 1) / kTileRows, lines = 4 * K;
      const bool next_other = t + 1 < t1 && (t + 1) / chunks != b;
      const char* nxt = next_other ? reinterpret_cast<const char*>(W + (b + 1) * K * kPanel) : nullptr;
      const int64_t ppk = (4 + nt - 1) / nt;
      for (int64_t m0 = r0, i = 0; m0 < r1; m0 += kTileRows, ++i) {
        const bool live = nxt && i * K * ppk < lines;
        tile_rows(std::min(kTileRows, r1 - m0), X + m0 * ldx, ldx, K, P, B ? B + b * kPanel : nullptr,
                  Y + m0 * n_out + b * kPanel, n_out, cols, live ? nxt + i * K * ppk * 64 : nullptr,
                  std::min(ppk, std::max<int64_t>(0, (lines - i * K * ppk) / K)));
      }
    }
  });
  return y;
}

}  // namespace TANDEM_ISA_NS
}  // namespace tandem

#endif  // TANDEM_AVX512
