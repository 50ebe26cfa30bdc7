// AVX512_VNNI kernels: gemm_i8 (int8 blocks, exact int32 sums) on vpdpbusd. Everything else comes
// from avx512, the ISA below: CPUs with AVX512_VNNI but no AVX512_BF16 (Cascade Lake, Ice Lake)
// keep that ISA's bf16 GEMMs and gain 3-4x on the int8 x int8 ones of W8A8 (docs/performance.md).
// CPUs with AVX512_BF16 have AVX512_VNNI too, so avx512_bf16 takes this gemm_i8 as well.
#include "kernels/intrinsics.h"  // first: before anything includes <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels/kernels.h"
#include "kernels/tile_driver.h"

namespace kt::kernels {
namespace {

// vpdpbusd multiplies unsigned by signed bytes, 4 per int32 lane, and adds them without
// saturation. A's codes get +128 (xor 0x80: int8 -> the same value + 128 as uint8), so a lane
// collects sum (a + 128) w = sum a w + 128 sum w; the block's row sums remove the second term. All
// of this is exact integer arithmetic modulo 2^32, so results equal the scalar reference bit for
// bit. One k quad of a block (16 rows x 4 k, 64 bytes) is one zmm operand as stored.
// acc + the 4 u8 x s8 products of each 32-bit lane. Written as inline assembly for GCC and Clang:
// GCC 12 keeps the accumulator tile of the intrinsic (_mm512_dpbusd_epi32) in memory, storing it
// back on every k step, which halves the kernel's speed; the same instruction here lets the 24
// accumulators stay in registers.
inline __m512i dpbusd(__m512i acc, __m512i a_u8, __m512i b_s8) {
#if defined(__GNUC__)
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a_u8), "v"(b_s8));
  return acc;
#else
  return _mm512_dpbusd_epi32(acc, a_u8, b_s8);
#endif
}
inline __m512i bcast_quad_u8(const int8_t* a) {
  uint32_t v;
  std::memcpy(&v, a, sizeof v);
  return _mm512_set1_epi32(static_cast<int32_t>(v ^ 0x80808080u));
}

// MR rows x NR blocks; 6 x 4 uses 24 accumulators + 4 B quads + 1 broadcast of the 32 zmm.
template <int MR, int NR>
struct TileI8 {
  static void run(const TileArgsI8& t) {
    __m512i c[MR][NR];
    KT_UNROLL for (int m = 0; m < MR; ++m) {
      KT_UNROLL for (int n = 0; n < NR; ++n) c[m][n] = _mm512_setzero_si512();
    }
    const int64_t quads = t.Kp / 4;
    for (int64_t q = 0; q < quads; ++q) {
      __m512i b[NR];
      KT_UNROLL for (int n = 0; n < NR; ++n) {
        b[n] = _mm512_loadu_si512(t.B + n * t.block_elems + 64 * q);
      }
      KT_UNROLL for (int m = 0; m < MR; ++m) {
        const __m512i a = bcast_quad_u8(t.A + m * t.lda + 4 * q);
        KT_UNROLL for (int n = 0; n < NR; ++n) c[m][n] = dpbusd(c[m][n], a, b[n]);
      }
    }
    KT_UNROLL for (int n = 0; n < NR; ++n) {
      // 128 * row sum, from the 16 int32 after the block's codes.
      const __m512i bias =
          _mm512_slli_epi32(_mm512_loadu_si512(t.B + n * t.block_elems + kBlockN * t.Kp), 7);
      KT_UNROLL for (int m = 0; m < MR; ++m) {
        int32_t* dst = t.C + m * t.ldc + n * kBlockN;
        __m512i s = _mm512_sub_epi32(c[m][n], bias);
        if (t.accumulate) s = _mm512_add_epi32(_mm512_loadu_si512(dst), s);
        _mm512_storeu_si512(dst, s);
      }
    }
  }
};

void gemm_i8(int64_t M, int64_t nblk, int64_t Kp, const int8_t* A, int64_t lda, const int8_t* B,
             int32_t* C, int64_t ldc, bool accumulate) {
  gemm_tiled_i8<TileI8, 6, 4>(M, nblk, Kp, A, lda, B, C, ldc, accumulate);
}

}  // namespace

// One entry; the null ones fall back to avx512 (kernels/dispatch.cpp).
constexpr KernelTable kTable = [] {
  KernelTable t{};
  t.gemm_i8 = &gemm_i8;
  return t;
}();

const KernelTable* avx512_vnni_table() { return &kTable; }

}  // namespace kt::kernels
