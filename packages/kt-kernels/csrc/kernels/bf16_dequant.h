// Dequantization of one pair row of weight codes (16 packed rows x 2 depths, kernels.h and
// engine/quant.h) into 32 bf16 in registers with AVX512_BF16: widen, convert, multiply by the
// scales, then one vcvtne2ps2bf16 rounds all 32 products. vcvtne2ps2bf16 rounds to nearest even
// like bf16_round_finite (quant_kernels.h) for every finite input that is not a denormal; a
// product of a code and a stored scale (0 or normal, engine/quant.h) never is, so the bits equal
// the scalar reference's. Shared by the AVX512_BF16 dequantization table, the fused AVX512_BF16
// kernels and the AMX kernels' B-tile staging. Included only by kernels/<isa>/*.cpp compiled
// with AVX512_BF16; everything here has internal linkage.
#pragma once

#ifndef KT_CPU_CAPABILITY
#error "bf16_dequant.h belongs to the per-ISA kernel files only"
#endif

#include <cstdint>

#include "kernels/intrinsics.h"

namespace kt::kernels {
namespace {

// From the 16 scales of rows 0..15: the scales of codes 0..15 (rows 0..7, each twice) and of
// codes 16..31 (rows 8..15, each twice) of a pair row.
inline __m512 row_scales_lo(__m512 s) {
  return _mm512_permutexvar_ps(_mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0), s);
}
inline __m512 row_scales_hi(__m512 s) {
  return _mm512_permutexvar_ps(
      _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8), s);
}

// int8: 32 codes in bf16 pair order (code i: row i / 2, depth i % 2), codes 0..15 in lo and
// 16..31 in hi; s_lo / s_hi are the scales of codes 0..15 / 16..31.
inline __m512i dequant_codes_i8(__m128i lo, __m128i hi, __m512 s_lo, __m512 s_hi) {
  const __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), s_lo);
  const __m512 b = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), s_hi);
  return (__m512i)_mm512_cvtne2ps_pbh(b, a);
}
inline __m512i dequant_pair_i8(const int8_t* c, __m512 s_lo, __m512 s_hi) {
  return dequant_codes_i8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)),
                          _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16)), s_lo, s_hi);
}

// int4: 16 bytes, byte j holding code 2 j (row j, even depth) in its low nibble and code 2 j + 1
// (odd depth) in its high nibble; s_even / s_odd are the scales of codes 2 j / 2 j + 1 (for a
// weight block both are the 16 row scales). The even and odd products are rounded by one
// vcvtne2ps2bf16 ([even 0..15 | odd 0..15]) and interleaved into pairs.
inline __m512i dequant_pair_i4(const uint8_t* c, __m512 s_even, __m512 s_odd) {
  const __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
  const __m512 ev =
      _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 28), 28)), s_even);
  const __m512 od = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(w, 4)), s_odd);
  const __m512i split = (__m512i)_mm512_cvtne2ps_pbh(od, ev);
  // Word 2 j <- word j (even depth of row j), word 2 j + 1 <- word 16 + j (odd depth).
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                         8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, split);
}

}  // namespace
}  // namespace kt::kernels
