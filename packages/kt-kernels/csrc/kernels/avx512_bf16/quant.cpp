// AVX512_BF16 dequantization (kernels/quant_kernels.h): each pair row of 32 codes is widened,
// converted, scaled and rounded by one vcvtne2ps2bf16 (kernels/bf16_dequant.h), bit-exact with the
// scalar reference for the scales the engine stores (0 or normal); the W8A8 transposed repack
// rounds the same way after its byte shuffles (kernels/w8a8_transpose.h). Load-time quantization
// has no AVX512_BF16 form: it falls back to the next ISA down (kernels/dispatch.cpp).
#include "kernels/intrinsics.h"  // first: before anything includes <immintrin.h>

#include "kernels/bf16_dequant.h"
#include "kernels/quant_kernels.h"
#include "kernels/w8a8_transpose.h"

namespace kt::kernels {
namespace {

void dequant_i8(int64_t npairs, const int8_t* codes, const float* sv, bf16* out) {
  const __m512 s_lo = _mm512_loadu_ps(sv), s_hi = _mm512_loadu_ps(sv + 16);
  for (int64_t p = 0; p < npairs; ++p) {
    _mm512_storeu_si512(out + 32 * p, dequant_pair_i8(codes + 32 * p, s_lo, s_hi));
  }
}

void dequant_i4(int64_t npairs, const uint8_t* codes, const float* sv, bf16* out) {
  const __m512 s_lo = _mm512_loadu_ps(sv), s_hi = _mm512_loadu_ps(sv + 16);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512 s_even = _mm512_permutex2var_ps(s_lo, even, s_hi);
  const __m512 s_odd = _mm512_permutex2var_ps(s_lo, odd, s_hi);
  for (int64_t p = 0; p < npairs; ++p) {
    _mm512_storeu_si512(out + 32 * p, dequant_pair_i4(codes + 16 * p, s_even, s_odd));
  }
}

// One VNNI-4 quad (16 rows x 4 k, 64 bytes = 32 words, word 2n + h = row n's depths 2h, 2h + 1)
// is permuted into the codes of depth pairs 2q and 2q + 1 in pair order (the even words, then the
// odd ones), then each half is dequantized from the register.
void dequant_i8x4(int64_t nquads, const int8_t* codes, const float* sv, bf16* out) {
  const __m512 s_lo = _mm512_loadu_ps(sv), s_hi = _mm512_loadu_ps(sv + 16);
  const __m512i idx = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
                                       30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  for (int64_t q = 0; q < nquads; ++q) {
    const __m512i pairs = _mm512_permutexvar_epi16(idx, _mm512_loadu_si512(codes + 64 * q));
    _mm512_storeu_si512(out + 64 * q,
                        dequant_codes_i8(_mm512_extracti32x4_epi32(pairs, 0),
                                         _mm512_extracti32x4_epi32(pairs, 1), s_lo, s_hi));
    _mm512_storeu_si512(out + 64 * q + 32,
                        dequant_codes_i8(_mm512_extracti32x4_epi32(pairs, 2),
                                         _mm512_extracti32x4_epi32(pairs, 3), s_lo, s_hi));
  }
}

void dequant_i8x4_t(int64_t nsrc, const int8_t* blk, const float* scales, int64_t Kp, int64_t k0,
                    int64_t nblk, bf16* dst, int64_t ldd) {
  transpose_dequant_w8a8(
      nsrc, blk, scales, Kp, k0, nblk, dst, ldd,
      [](__m128i lo, __m128i hi, __m512 s) { return dequant_codes_i8(lo, hi, s, s); });
}

}  // namespace

// Dequantization entries only; absmax and quantize come from the ISA below.
constexpr QuantKernels kQuantTable = [] {
  QuantKernels t{};
  t.i8 = &dequant_i8;
  t.i4 = &dequant_i4;
  t.i8x4 = &dequant_i8x4;
  t.i8x4_t = &dequant_i8x4_t;
  return t;
}();

const QuantKernels* avx512_bf16_quant_table() { return &kQuantTable; }

}  // namespace kt::kernels
