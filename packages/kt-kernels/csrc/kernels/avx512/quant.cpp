// AVX-512F dequantization (kernels/quant_kernels.h): 16 codes per step widened to int32, converted,
// multiplied by the row scales and rounded to bf16 with integer arithmetic (bit-exact with the
// scalar reference). int4 pairs are first unpacked to 32 int8 codes with byte shuffles.
#include "kernels/intrinsics.h"  // first: before anything includes <immintrin.h>

#include "kernels/quant_kernels.h"

namespace kt::kernels {
namespace {

inline __m256i round16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

inline void pair32(const int8_t* c, const __m512& s0, const __m512& s1, bf16* o) {
  const __m512 a = _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c))));
  const __m512 b = _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16))));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), round16(_mm512_mul_ps(a, s0)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), round16(_mm512_mul_ps(b, s1)));
}

// 16 bytes of int4 pairs -> 32 int8 codes in order (low nibble first).
inline void unpack_i4(const uint8_t* c, int8_t* out) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c));
  const __m128i m = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
  const __m128i lo = _mm_sub_epi8(_mm_xor_si128(_mm_and_si128(v, m), eight), eight);
  const __m128i hi =
      _mm_sub_epi8(_mm_xor_si128(_mm_and_si128(_mm_srli_epi16(v, 4), m), eight), eight);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_unpacklo_epi8(lo, hi));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm_unpackhi_epi8(lo, hi));
}

void dequant_i8(int64_t npairs, const int8_t* codes, const float* sv, bf16* out) {
  const __m512 s0 = _mm512_loadu_ps(sv), s1 = _mm512_loadu_ps(sv + 16);
  for (int64_t p = 0; p < npairs; ++p) pair32(codes + 32 * p, s0, s1, out + 32 * p);
}

void dequant_i4(int64_t npairs, const uint8_t* codes, const float* sv, bf16* out) {
  const __m512 s0 = _mm512_loadu_ps(sv), s1 = _mm512_loadu_ps(sv + 16);
  alignas(64) int8_t tmp[32];
  for (int64_t p = 0; p < npairs; ++p) {
    unpack_i4(codes + 16 * p, tmp);
    pair32(tmp, s0, s1, out + 32 * p);
  }
}

// One VNNI-4 quad (16 rows x 4 k, 64 bytes = 32 words, word 2n + h = row n's depths 2h, 2h + 1)
// -> the codes of depth pairs 2q and 2q + 1 in pair order: the even words, then the odd ones.
inline void unpack_quad(const int8_t* c, int8_t* out) {
  const __m512i idx = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
                                       30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  _mm512_storeu_si512(out, _mm512_permutexvar_epi16(idx, _mm512_loadu_si512(c)));
}

void dequant_i8x4(int64_t nquads, const int8_t* codes, const float* sv, bf16* out) {
  const __m512 s0 = _mm512_loadu_ps(sv), s1 = _mm512_loadu_ps(sv + 16);
  alignas(64) int8_t tmp[64];
  for (int64_t q = 0; q < nquads; ++q) {
    unpack_quad(codes + 64 * q, tmp);
    pair32(tmp, s0, s1, out + 64 * q);
    pair32(tmp + 32, s0, s1, out + 64 * q + 32);
  }
}

}  // namespace

const QuantKernels* avx512_quant_table() {
  static const QuantKernels t{&dequant_i8, &dequant_i4, &dequant_i8x4};
  return &t;
}

}  // namespace kt::kernels
