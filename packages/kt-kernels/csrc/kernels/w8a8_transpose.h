// The transposed repack of W8A8 weight blocks in one pass (dequant_i8x4_t, quant_kernels.h), for
// the AVX-512 quantization tables: the byte shuffles are shared, the bf16 rounding is the
// including ISA's (integer rounding on AVX-512F, vcvtne2ps2bf16 on AVX512_BF16; the same bits).
// Included only by kernels/<isa>/quant.cpp; everything here has internal linkage.
#pragma once

#ifndef KT_CPU_CAPABILITY
#error "w8a8_transpose.h belongs to the per-ISA kernel files only"
#endif

#include <cstdint>
#include <cstring>

#include "kernels/intrinsics.h"
#include "kernels/kernels.h"

namespace kt::kernels {
namespace {

// A 16 x 16 sub-tile of codes (16 rows n of a source block, depths k0 .. k0 + 15: 4 quads, 256
// contiguous bytes) becomes 8 pair rows of a destination block (pair row p: rows 2p and 2p + 1,
// 16 columns k x 2). Lane L of quad i holds rows 4L .. 4L + 3 (a dword of 4 depths each); one
// byte shuffle per lane puts rows 4L, 4L + 1 interleaved by depth in its low qword and rows
// 4L + 2, 4L + 3 in its high one, so qword p of quad i is pair row p at columns 4i .. 4i + 3. A
// 4 x 8 qword transpose then gathers each pair row: out[r] holds pair rows 2r (bytes 0..31) and
// 2r + 1 (bytes 32..63).
inline void quads_to_pair_rows(const int8_t* s, __m512i out[4]) {
  const __m512i idx =
      _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15));
  __m512i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm512_shuffle_epi8(_mm512_loadu_si512(s + 64 * i), idx);
  // Lane L: a = (q0, q1) of pair row 2L, b = of 2L + 1; c, d likewise from q2, q3.
  const __m512i a = _mm512_unpacklo_epi64(q[0], q[1]), b = _mm512_unpackhi_epi64(q[0], q[1]);
  const __m512i c = _mm512_unpacklo_epi64(q[2], q[3]), d = _mm512_unpackhi_epi64(q[2], q[3]);
  const __m512i ac01 = _mm512_shuffle_i64x2(a, c, 0x44), bd01 = _mm512_shuffle_i64x2(b, d, 0x44);
  const __m512i ac23 = _mm512_shuffle_i64x2(a, c, 0xee), bd23 = _mm512_shuffle_i64x2(b, d, 0xee);
  out[0] = _mm512_shuffle_i64x2(ac01, bd01, 0x88);  // lanes a0 c0 b0 d0
  out[1] = _mm512_shuffle_i64x2(ac01, bd01, 0xdd);  // a1 c1 b1 d1
  out[2] = _mm512_shuffle_i64x2(ac23, bd23, 0x88);
  out[3] = _mm512_shuffle_i64x2(ac23, bd23, 0xdd);
}

// The scales of a pair row's 32 codes: rows 2p and 2p + 1 alternately.
inline __m512 pair_scales(const float* row_scales) {
  int64_t two;
  std::memcpy(&two, row_scales, sizeof two);
  return _mm512_castsi512_ps(_mm512_set1_epi64(two));
}

// dequant32(lo, hi, s): the 32 codes lo (0..15), hi (16..31) times s as 32 bf16. Source blocks
// are read in sub-tile order; the next block's sub-tile (4 lines, a block stride away: no hardware
// prefetcher follows) is fetched while the current one is converted.
template <class Dequant32>
void transpose_dequant_w8a8(int64_t nsrc, const int8_t* blk, const float* scales, int64_t Kp,
                            int64_t k0, int64_t nblk, bf16* dst, int64_t ldd, Dequant32 dequant32) {
  const int64_t block_bytes = i8_block_bytes(Kp);
  for (int64_t b = 0; b < nsrc; ++b) {
    const int8_t* src = blk + b * block_bytes;
    __m512 s[8];
    for (int p = 0; p < 8; ++p) s[p] = pair_scales(scales + 16 * b + 2 * p);
    for (int64_t ob = 0; ob < nblk; ++ob) {
      bf16* o = dst + ob * ldd + b * 8 * 32;
      const int64_t kb = k0 + 16 * ob;
      if (kb >= Kp) {
        for (int p = 0; p < 8; ++p) _mm512_storeu_si512(o + 32 * p, _mm512_setzero_si512());
        continue;
      }
      const int8_t* sub = src + (kb / 4) * 64;
      if (b + 1 < nsrc) {
        for (int l = 0; l < 4; ++l) {
          _mm_prefetch(reinterpret_cast<const char*>(sub + block_bytes) + 64 * l, _MM_HINT_T0);
        }
      }
      __m512i rows[4];
      quads_to_pair_rows(sub, rows);
      for (int r = 0; r < 4; ++r) {
        _mm512_storeu_si512(o + 64 * r, dequant32(_mm512_castsi512_si128(rows[r]),
                                                  _mm512_extracti32x4_epi32(rows[r], 1), s[2 * r]));
        _mm512_storeu_si512(o + 64 * r + 32,
                            dequant32(_mm512_extracti32x4_epi32(rows[r], 2),
                                      _mm512_extracti32x4_epi32(rows[r], 3), s[2 * r + 1]));
      }
    }
  }
  // Pair rows past the last source row (16 nsrc is not a multiple of 32): zero.
  const int64_t p_end = packed_k(16 * nsrc) / 2;
  for (int64_t ob = 0; ob < nblk; ++ob) {
    for (int64_t p = 8 * nsrc; p < p_end; ++p) {
      _mm512_storeu_si512(dst + ob * ldd + 32 * p, _mm512_setzero_si512());
    }
  }
}

}  // namespace
}  // namespace kt::kernels
