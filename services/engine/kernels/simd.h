// Helpers shared by the CPU kernels' translation units, and the ISA level of this build.
//
// The same sources are compiled once per kernel variant (services/engine/kernels/variants.py):
// "avx2" with -mavx2 -mfma, "avx512" with -mavx512f/bw/vl/dq on top. TANDEM_AVX512 says which
// one this is; code written for 512-bit vectors sits under it, the AVX2 code serves both (in
// the avx512 build the compiler may give it 32 vector registers and EVEX encodings). Every
// symbol lives in the inline namespace tandem::TANDEM_ISA_NS, so two variants loaded in one
// process (the tests, the A/B benches) never bind each other's functions.
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define TANDEM_AVX512 1
#define TANDEM_ISA_NS avx512
#define TANDEM_ISA_NAME "avx512"
#else
#define TANDEM_AVX512 0
#define TANDEM_ISA_NS avx2
#define TANDEM_ISA_NAME "avx2"
#endif

// Functions for AVX512_BF16 (vdpbf16ps) in the avx512 build: compiled for that extension one
// function at a time, called only after bf16_supported() (an AVX-512 CPU need not have it).
#define TANDEM_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace tandem {
inline namespace TANDEM_ISA_NS {

constexpr int64_t kPanel = 64;        // output columns per panel64 weight panel
constexpr int64_t kMaxSmallRows = 8;  // rows of linear_small (and of the decode stack)

inline void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
}

// e^x for 8 floats (|error| <= 2 ulp for x in [-87, 88]; clamped outside): x = n ln2 + r with
// |r| <= ln2 / 2 (Cody-Waite split of ln2), e^r by Cephes' degree-7 polynomial, times 2^n.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// 8 floats from fp32 or bf16 storage (a bf16 is the high half of its fp32: shift it up).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// fp32 -> bf16 bits, round to nearest even (torch's .to(torch.bfloat16)); NaN stays a quiet NaN.
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

// A KV cache tensor: fp32 or bf16 storage (the kernels compute in fp32 either way).
inline void check_kv_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16), name,
              " must be a float32 or bfloat16 CPU tensor");
}

// Sum of the 8 lanes.
inline float hsum8(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// ---- kernels called across translation units ---------------------------------------------------

// panel_linear.cpp: x [M <= 8, K] @ panel64 weight [NB, K, 64] (+ bias [N]) -> [M, N].
at::Tensor linear_small(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                        int64_t n_out);
#if TANDEM_AVX512
// panel_gemm.cpp: x [M, K] @ panel64 weight [NB, K, 64] (+ bias [N]) -> [M, N], any M (used for 9..511).
at::Tensor linear_medium(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                         int64_t n_out);
#endif
// panel_linear.cpp: the ISA of linear_small's code path in this build ("avx512" or "avx2").
const char* linear_small_isa();
// panel_linear.cpp: the read-bandwidth probe (sum of x read as linear_small reads weights).
double read_streams(const at::Tensor& x);
// bf16_linear.cpp: x [M, K] fp32 @ bf16 pair-panel weight [NB, K2, 64, 2] (+ bias) -> [M, N] fp32;
// dot: vdpbf16ps where the CPU has AVX512_BF16 (x rounded to bf16), else fp32 FMAs.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       int64_t n_out, bool dot);
bool bf16_dot_supported();       // this build and CPU run vdpbf16ps
const char* linear_bf16_isa();   // "avx512_bf16", "avx512" or "avx2"
#if TANDEM_AVX512
// decode_attention512.cpp: one (sequence, KV head) item of decode attention, 512-bit. qs[g]: the
// G query rows; Kh / Vh: the KV head's keys / values in the paged cache (C = float or uint16_t,
// bf16 bits), rows [start, L) through table (bs rows a block); p: G (L - start) floats of
// scratch; kbuf: 16 D floats of scratch; outs[g]: the G output rows (D floats). False, with
// nothing written, where there is no plan (D % 16 != 0).
template <typename C>
bool decode_head_512(const float* const* qs, int64_t G, const C* Kh, const C* Vh, const int64_t* table, int64_t bs,
                     int64_t D, int64_t start, int64_t L, float scale, float* p, float* kbuf, float* const* outs);
#endif
// prefill_attention.cpp
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                             int64_t window);

}  // namespace TANDEM_ISA_NS
}  // namespace tandem
