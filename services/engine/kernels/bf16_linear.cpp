// Linear over bf16 weights with fp32 activations and output, any number of rows. Built once per
// ISA variant (simd.h); the AVX512_BF16 path is compiled per function (TANDEM_BF16_TARGET).
//
// Weight layout "pair panels" (packing.py to_pair_panels): W [N, K] stored as bf16
// [NB, K2, 64, 2], NB = ceil(N / 64), K2 = ceil(K / 2): element [b, i, j, t] = bf16(W[64 b + j,
// 2 i + t]), zero past N and K. Read as 32-bit words, word [b, i, j] holds column j's weights
// for k = 2i (low half) and 2i + 1 (high half): exactly the operand vdpbf16ps multiplies with a
// broadcast (x[2i], x[2i + 1]) pair, and two integer ops away from fp32 (k even: word << 16;
// k odd: word & 0xffff0000). A panel is read front to back, like panel64's, at half the bytes.
//
// Two ways to multiply, same layout:
// - "dot" (AVX512_BF16 CPUs): x rounded to bf16 pairs once, then vdpbf16ps: 32 multiply-adds
//   per instruction, products exact in fp32 (sums in another order than torch's bf16 GEMM);
// - "convert" (every variant): weights widened to fp32 in registers, x stays fp32, fp32 FMAs:
//   the result of F.linear(x, W.bfloat16().float()) to rounding.
// Rows go in groups of up to 4 per panel pass (the group's x in L1, the panel from L2 after
// the first group); the work is split over (panel, row block) items.
//
// Measured (AMD EPYC Zen 4 with AVX512_BF16, 2 cores, shared box, load average 7-10; one
// process, candidates alternating, median ms over dense-100m's weights, the 33 matrices of a
// step; /tmp/cpud/ab_bf16.py, 2026-12-02 21:04 UTC). fp32 = the panel64 path (linear_small for
// <= 8 rows, torch matmul over panels above, MKL on W^T from 512 rows); torch bf16 = torch.mm
// on plain bf16 weights (oneDNN with AVX512_BF16):
//
//   rows, threads      fp32     bf16 dot   bf16 convert   torch bf16
//   1, 1              11.5        7.4          7.9            -
//   8, 1              24.1       12.6         18.7            -
//   32, 1             99.4       32.3         52.9          43.2
//   1024, 2           2762       1793         3516          1540 (min 1532; dot min 1306)
//
// So the dot path wins at every row count up to a batch, and is level with oneDNN's bf16 GEMM
// on a 1,024-row prompt chunk (noisy: the box was shared), which is why one kernel (and one
// copy of the weights) serves every row count.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "simd.h"

namespace tandem {
inline namespace TANDEM_ISA_NS {
namespace {

constexpr int64_t kStreamsBf16 = 4;  // concurrent k streams per panel, as panel_linear.cpp's kStreams
constexpr int64_t kRowBlock = 64;    // rows of one work item (a panel stays in L2 across them)

inline __m256 bf16_lo8(__m256i w) { return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)); }
inline __m256 bf16_hi8(__m256i w) { return _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(-65536))); }

// "convert", 256-bit: MR rows of x (fp32, rows ldx apart, K2 pairs) against 8 NV columns of one
// pair panel (P: its first word of those columns; a k pair row is 64 words). out [MR, 64].
template <int MR, int NV>
inline void pair_block8(const float* x, int64_t ldx, int64_t K2, const uint32_t* P, float* out) {
  __m256 c[MR][NV];
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) c[m][n] = _mm256_setzero_ps();
  auto step = [&](int64_t i) {
    const uint32_t* b = P + i * kPanel;
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 8 * n));
      const __m256 lo = bf16_lo8(w), hi = bf16_hi8(w);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        c[m][n] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + m * ldx + 2 * i), lo, c[m][n]);
        c[m][n] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + m * ldx + 2 * i + 1), hi, c[m][n]);
      }
    }
  };
  const int64_t L = K2 / kStreamsBf16;
  for (int64_t i = 0; i < L; ++i)
    for (int64_t s = 0; s < kStreamsBf16; ++s) step(s * L + i);
  for (int64_t i = kStreamsBf16 * L; i < K2; ++i) step(i);
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) _mm256_storeu_ps(out + m * kPanel + 8 * n, c[m][n]);
}

template <int MR>
inline void pair_rows_convert(const float* x, int64_t ldx, int64_t K2, const uint32_t* P, float* out) {
#if TANDEM_AVX512
  constexpr int NV = MR <= 3 ? 8 : 4;  // 32 registers: up to 24 accumulators, 1-2 passes
#else
  constexpr int NV = MR == 1 ? 8 : MR == 2 ? 4 : 2;  // 16 registers
#endif
  for (int64_t c0 = 0; c0 < kPanel; c0 += 8 * NV) pair_block8<MR, NV>(x, ldx, K2, P + c0, out + c0);
}

#if TANDEM_AVX512
// "dot", one k pair row i: c[m][0:4] += (x pair of row m) . (the panel's 4 zmm of row i).
// (A function, not a lambda: a lambda would not inherit the function's target attribute.)
template <int MR>
TANDEM_BF16_TARGET inline void dot_step(__m512 (&c)[MR][4], const uint32_t* xb, int64_t ldb, const uint32_t* P,
                                        int64_t i) {
  const uint32_t* b = P + i * kPanel;
  __m512i w[4];
#pragma GCC unroll 4
  for (int n = 0; n < 4; ++n) w[n] = _mm512_loadu_si512(b + 16 * n);
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    const __m512i a = _mm512_set1_epi32(static_cast<int>(xb[m * ldb + i]));
#pragma GCC unroll 4
    for (int n = 0; n < 4; ++n) c[m][n] = _mm512_dpbf16_ps(c[m][n], (__m512bh)a, (__m512bh)w[n]);
  }
}

// Cache lines of the next work item's panel that a row group fetches into L2 while it computes
// from the current one (Prefetch::lines from `from`, spread over the group's k steps). Without
// it, each panel's first row group waited on memory while the others ran from L2. Measured,
// dense-100m's 33 matrices, 2 threads, one process, both builds alternating, median of 9 (AMD
// EPYC Zen 4, avx512-bf16; /tmp/s25/lin_ab.py, 2026-12-03 16:10 UTC), ms per step's linears:
// 1 row 6.21 -> 6.12, 8 rows 8.60 -> 7.98, 16 rows 11.63 -> 9.38, 32 rows 16.92 -> 15.61; and at
// 16:35, 16 rows 8.94 -> 8.03, 32 rows 14.87 -> 14.52, but 128 rows 49.9 -> 52.9 (repeated: 49.6
// -> 54.0), so only decode batches (<= 64 rows, one row block a panel) prefetch.
struct Prefetch {
  const char* from = nullptr;
  int64_t lines = 0;
};

// "dot": MR rows of x as bf16 pairs (xb, rows ldb words apart) against the whole pair panel P:
// MR x 4 zmm accumulators, each k pair row of the panel (4 zmm) loaded once for the MR rows.
template <int MR, bool PF>
TANDEM_BF16_TARGET inline void pair_rows_dot(const uint32_t* xb, int64_t ldb, int64_t K2, const uint32_t* P,
                                             float* out, Prefetch pf) {
  __m512 c[MR][4];
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < 4; ++n) c[m][n] = _mm512_setzero_ps();
  const int64_t L = K2 / kStreamsBf16;
  const int64_t per_step = L > 0 ? (pf.lines + L - 1) / L : 0;
  int64_t line = 0;
  for (int64_t i = 0; i < L; ++i) {
    if constexpr (PF)
      for (int64_t e = line + per_step; line < e && line < pf.lines; ++line) _mm_prefetch(pf.from + 64 * line, _MM_HINT_T1);
#pragma GCC unroll 4
    for (int64_t s = 0; s < kStreamsBf16; ++s) dot_step<MR>(c, xb, ldb, P, s * L + i);
  }
  for (int64_t i = kStreamsBf16 * L; i < K2; ++i) dot_step<MR>(c, xb, ldb, P, i);
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < 4; ++n) _mm512_storeu_ps(out + m * kPanel + 16 * n, c[m][n]);
}

TANDEM_BF16_TARGET void dot_group(int64_t MR, const uint32_t* xb, int64_t ldb, int64_t K2, const uint32_t* P,
                                  float* out, Prefetch pf) {
  if (pf.lines > 0) {
    switch (MR) {
      case 1: return pair_rows_dot<1, true>(xb, ldb, K2, P, out, pf);
      case 2: return pair_rows_dot<2, true>(xb, ldb, K2, P, out, pf);
      case 3: return pair_rows_dot<3, true>(xb, ldb, K2, P, out, pf);
      default: return pair_rows_dot<4, true>(xb, ldb, K2, P, out, pf);
    }
  }
  switch (MR) {
    case 1: return pair_rows_dot<1, false>(xb, ldb, K2, P, out, pf);
    case 2: return pair_rows_dot<2, false>(xb, ldb, K2, P, out, pf);
    case 3: return pair_rows_dot<3, false>(xb, ldb, K2, P, out, pf);
    default: return pair_rows_dot<4, false>(xb, ldb, K2, P, out, pf);
  }
}
#endif

void convert_group(int64_t MR, const float* x, int64_t ldx, int64_t K2, const uint32_t* P, float* out) {
  switch (MR) {
    case 1: return pair_rows_convert<1>(x, ldx, K2, P, out);
    case 2: return pair_rows_convert<2>(x, ldx, K2, P, out);
    case 3: return pair_rows_convert<3>(x, ldx, K2, P, out);
    default: return pair_rows_convert<4>(x, ldx, K2, P, out);
  }
}

}  // namespace

bool bf16_dot_supported() {
#if TANDEM_AVX512
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

const char* linear_bf16_isa() {
  if (bf16_dot_supported()) return "avx512_bf16";
  return TANDEM_AVX512 ? "avx512" : "avx2";
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       int64_t n_out, bool dot) {
  check_f32(x, "x");
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kBFloat16, "w must be a bfloat16 CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [M, K] with contiguous rows");
  TORCH_CHECK(w.dim() == 4 && w.size(2) == kPanel && w.size(3) == 2 && w.is_contiguous(),
              "w must be a contiguous [NB, K2, 64, 2] bf16 pair-panel weight");
  const int64_t M = x.size(0), K = x.size(1), NB = w.size(0), K2 = w.size(1);
  TORCH_CHECK(K2 == (K + 1) / 2, "x has ", K, " features, the weight ", 2 * K2, " (pairs)");
  TORCH_CHECK(n_out > (NB - 1) * kPanel && n_out <= NB * kPanel, "n_out ", n_out, " does not fit ", NB, " panels");
  const float* B = nullptr;
  if (bias.has_value() && bias->defined()) {
    check_f32(*bias, "bias");
    TORCH_CHECK(bias->numel() == n_out && bias->is_contiguous(), "bias must be [N] contiguous");
    B = bias->data_ptr<float>();
  }
  dot = dot && bf16_dot_supported();
  at::Tensor y = at::empty({M, n_out}, x.options());
  if (M == 0) return y;
  // x as the kernels read it: fp32 rows of 2 K2 (zero-padded), or bf16 pairs of K2 words
  std::vector<float> xf;
  std::vector<uint32_t> xb;
  const float* X = x.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  if (dot) {
    xb.resize(M * K2);
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t i = 0; i < K2; ++i) {
          const uint32_t lo = bf16_bits(X[m * ldx + 2 * i]);
          const uint32_t hi = 2 * i + 1 < K ? bf16_bits(X[m * ldx + 2 * i + 1]) : 0u;
          xb[m * K2 + i] = lo | (hi << 16);
        }
    });
  } else if (K % 2) {
    xf.assign(M * 2 * K2, 0.f);
    for (int64_t m = 0; m < M; ++m) std::copy_n(X + m * ldx, K, xf.data() + m * 2 * K2);
  }
  const float* XF = xf.empty() ? X : xf.data();
  const int64_t ldf = xf.empty() ? ldx : 2 * K2;
  const uint32_t* W = reinterpret_cast<const uint32_t*>(w.data_ptr<at::BFloat16>());
  float* Y = y.data_ptr<float>();
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, NB * blocks, 1, [&](int64_t i0, int64_t i1) {
    alignas(64) float out[4 * kPanel];
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t b = item / blocks, r0 = item % blocks * kRowBlock, r1 = std::min(M, r0 + kRowBlock);
      const uint32_t* P = W + b * K2 * kPanel;
      const int64_t cols = std::min(kPanel, n_out - b * kPanel);
      // the item's first row group reads its panel from memory, the later ones from L2: they
      // fetch the thread's next panel meanwhile, a share each (none when the item has one group)
      const int64_t groups = (r1 - r0 + 3) / 4;
      // (decode batches only: one row block per panel; measured, prompt chunks lost 6-8% with it)
      const bool next_panel = blocks == 1 && item + 1 < i1;
      const int64_t share = groups > 1 ? (K2 * kPanel * 4 / 64 + groups - 2) / (groups - 1) : 0;
      for (int64_t m0 = r0; m0 < r1; m0 += 4) {
        const int64_t mr = std::min<int64_t>(4, r1 - m0), gi = (m0 - r0) / 4;
#if TANDEM_AVX512
        Prefetch pf;
        if (next_panel && gi > 0) {
          const int64_t first = (gi - 1) * share, total = K2 * kPanel * 4 / 64;
          pf = {reinterpret_cast<const char*>(W + (b + 1) * K2 * kPanel) + 64 * first,
                std::max<int64_t>(0, std::min(share, total - first))};
        }
        if (dot)
          dot_group(mr, xb.data() + m0 * K2, K2, K2, P, out, pf);
        else
#endif
          convert_group(mr, XF + m0 * ldf, ldf, K2, P, out);
        for (int64_t m = 0; m < mr; ++m)
          for (int64_t j = 0; j < cols; ++j)
            Y[(m0 + m) * n_out + b * kPanel + j] = out[m * kPanel + j] + (B ? B[b * kPanel + j] : 0.f);
      }
    }
  });
  return y;
}

}  // namespace TANDEM_ISA_NS
}  // namespace tandem
