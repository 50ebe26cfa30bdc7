// AVX512_BF16 kernels: vdpbf16ps multiplies a broadcast pair (A[m,k], A[m,k+1]) with one row of a
// packed block (16 outputs x the same k pair) and adds both products into 16 fp32 lanes. The
// fused int8 / int4 kernels build that block row from codes in registers (sign-extend, convert,
// multiply by the scales, vcvtne2ps2bf16) and feed it to the same vdpbf16ps sequence.
// gemm_i8 comes from the ISA below, avx512_vnni (vpdpbusd).
#include "kernels/intrinsics.h"  // first: before anything includes <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels/bf16_dequant.h"
#include "kernels/kernels.h"
#include "kernels/vec_simd.h"
#include "kernels/tile_driver.h"

namespace kt::kernels {
namespace {

// ---- the few intrinsics the loops use --------------------------------------------------------
using VecF = __m512;
using VecI = __m512i;
inline VecF vzero() { return _mm512_setzero_ps(); }
inline VecF vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, VecF v) { _mm512_storeu_ps(p, v); }
// One packed row: 16 outputs x one k pair.
inline __m512i load_pairs(const bf16* p) { return _mm512_loadu_si512(p); }
// (A[m,k], A[m,k+1]) in every 32-bit lane.
inline __m512i bcast_pair(const bf16* a) {
  int32_t v;
  std::memcpy(&v, a, sizeof v);
  return _mm512_set1_epi32(v);
}
inline VecF dot_pairs(VecF acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// The B operand of one block for pair row kk: 16 rows x (even k, odd k) as bf16 pairs.
template <class Src>
struct Operand;

template <>
struct Operand<Bf16Blocks> {
  const bf16* p;
  void init(const Bf16Blocks& b, int64_t) { p = b.p; }
  __m512i load(int64_t kk) const { return load_pairs(p + kk * 32); }
};

// int8: the 32 codes of a pair row are already in bf16 pair order; each half of 16 is scaled by
// its rows' scales (each repeated twice) and both are rounded by one vcvtne2ps2bf16
// (kernels/bf16_dequant.h).
template <>
struct Operand<Q8Blocks> {
  const int8_t* c;
  VecF s_lo, s_hi;  // scales of code i in [0, 16) and [16, 32): row i / 2
  void init(const Q8Blocks& b, int64_t g) {
    c = b.codes;
    const VecF s = _mm512_loadu_ps(b.group_scales(g));
    s_lo = row_scales_lo(s);
    s_hi = row_scales_hi(s);
  }
  __m512i load(int64_t kk) const { return dequant_pair_i8(c + kk * 32, s_lo, s_hi); }
};

// int4: byte j holds row j's pair; both nibbles take row j's scale of the group.
template <>
struct Operand<Q4Blocks> {
  const uint8_t* c;
  VecF s;
  void init(const Q4Blocks& b, int64_t g) {
    c = b.codes;
    const VecI idx =
        _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                           _mm512_set1_epi32(static_cast<int32_t>(b.row_stride())));
    s = _mm512_i32gather_ps(idx, b.group_scales(g), 4);
  }
  __m512i load(int64_t kk) const { return dequant_pair_i4(c + kk * 16, s, s); }
};

// MR rows x NR blocks; 6 x 4 uses 24 accumulators + 4 B rows + 1 broadcast of the 32 zmm, and
// 4 blocks (64 columns) are the width of the engine's tiles.
template <int MR, int NR>
struct Tile {
  template <class Src>
  static void run(const TileArgs<Src>& t) {
    VecF c[MR][NR];
    KT_UNROLL for (int m = 0; m < MR; ++m) {
      KT_UNROLL for (int n = 0; n < NR; ++n) {
        c[m][n] = t.accumulate ? vload(t.C + m * t.ldc + n * kBlockN) : vzero();
      }
    }
    const int64_t pairs = t.Kp / 2, span = t.B.group_pairs(pairs);
    for (int64_t g = 0; g * span < pairs; ++g) {
      Operand<Src> op[NR];
      KT_UNROLL for (int n = 0; n < NR; ++n) op[n].init(t.B.at(n), g);
      const int64_t k1 = std::min(pairs, (g + 1) * span);
      for (int64_t kk = g * span; kk < k1; ++kk) {
        __m512i b[NR];
        KT_UNROLL for (int n = 0; n < NR; ++n) b[n] = op[n].load(kk);
        KT_UNROLL for (int m = 0; m < MR; ++m) {
          const __m512i a = bcast_pair(t.A + m * t.lda + 2 * kk);
          KT_UNROLL for (int n = 0; n < NR; ++n) c[m][n] = dot_pairs(c[m][n], a, b[n]);
        }
      }
    }
    KT_UNROLL for (int m = 0; m < MR; ++m) {
      KT_UNROLL for (int n = 0; n < NR; ++n) vstore(t.C + m * t.ldc + n * kBlockN, c[m][n]);
    }
  }
};

// Fused int8 / int4: 8 x 3 tiles (24 accumulators; the scale vectors may live in L1), one pass
// per 8 rows. Measured (bench_gemm --fused, 96 x 2048 tiles, 1 thread) against dequantize +
// gemm_bf16 with the AVX512_BF16 dequantization (quant.cpp of this folder), Intel Xeon (Emerald
// Rapids): int8 1.2-1.5x faster at 1-2 rows, 1.0-1.4x at 4-8, 0.8-1.0x at 12-16, 0.7-0.9x from
// 24; int4 the same within 0.05. Hence the engine's threshold of 8 rows. (On AMD EPYC Zen 5 the
// fused kernels were 1.3x faster at 16 rows against the older dequantization, which cost about
// twice the instructions; not re-measured there.)
using Gemm = Entries<Tile, 6, 4, 8, 3>;
constexpr int64_t kFusedMaxRows = 8;

}  // namespace

constexpr KernelTable kTable = [] {
  KernelTable t = vec::helper_entries();
  t.gemm_bf16 = &Gemm::gemm_bf16;
  t.gemm_q8 = &Gemm::gemm_q8;
  t.gemm_q4 = &Gemm::gemm_q4;
  t.fused_max_rows_q8 = kFusedMaxRows;
  t.fused_max_rows_q4 = kFusedMaxRows;
  return t;
}();

const KernelTable* avx512_bf16_table() { return &kTable; }

}  // namespace kt::kernels
