// AVX512_BF16 kernels: vdpbf16ps multiplies a broadcast pair (A[m,k], A[m,k+1]) with one row of a
// packed block (16 outputs x the same k pair) and adds both products into 16 fp32 lanes.
// gemm_i8 (int8 blocks, exact int32 sums) runs on AVX512_VNNI's vpdpbusd; see below.
#include "kernels/intrinsics.h"  // first: before anything includes <immintrin.h>

#include <cstring>

#include "kernels/kernels.h"
#include "kernels/vec_simd.h"
#include "kernels/tile_driver.h"

namespace kt::kernels {
namespace {

// ---- the few intrinsics the loops use --------------------------------------------------------
using VecF = __m512;
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

// MR rows x NR blocks; 6 x 4 uses 24 accumulators + 4 B rows + 1 broadcast of the 32 zmm, and
// 4 blocks (64 columns) are the width of the engine's tiles.
template <int MR, int NR>
struct Tile {
  static void run(const TileArgs& t) {
    VecF c[MR][NR];
    KT_UNROLL for (int m = 0; m < MR; ++m) {
      KT_UNROLL for (int n = 0; n < NR; ++n) {
        c[m][n] = t.accumulate ? vload(t.C + m * t.ldc + n * kBlockN) : vzero();
      }
    }
    const int64_t pairs = t.Kp / 2;
    for (int64_t kk = 0; kk < pairs; ++kk) {
      __m512i b[NR];
      KT_UNROLL for (int n = 0; n < NR; ++n) b[n] = load_pairs(t.B + n * t.block_elems + kk * 32);
      KT_UNROLL for (int m = 0; m < MR; ++m) {
        const __m512i a = bcast_pair(t.A + m * t.lda + 2 * kk);
        KT_UNROLL for (int n = 0; n < NR; ++n) c[m][n] = dot_pairs(c[m][n], a, b[n]);
      }
    }
    KT_UNROLL for (int m = 0; m < MR; ++m) {
      KT_UNROLL for (int n = 0; n < NR; ++n) vstore(t.C + m * t.ldc + n * kBlockN, c[m][n]);
    }
  }
};

void gemm_bf16(int64_t M, int64_t nblk, int64_t Kp, const bf16* A, int64_t lda, const bf16* B,
               float* C, int64_t ldc, bool accumulate) {
  gemm_tiled<Tile, 6, 4>(M, nblk, Kp, A, lda, B, C, ldc, accumulate);
}

// ---- int8 x int8 -> int32 (gemm_i8) ----------------------------------------------------------
// Every CPU with AVX512_BF16 has AVX512_VNNI (dispatch requires both for this ISA). vpdpbusd
// multiplies unsigned by signed bytes, 4 per int32 lane, and adds them without saturation. A's
// codes get +128 (xor 0x80: int8 -> the same value + 128 as uint8), so a lane collects
// sum (a + 128) w = sum a w + 128 sum w; the block's row sums remove the second term. All of this
// is exact integer arithmetic modulo 2^32, so results equal the scalar reference bit for bit. One
// k quad of a block (16 rows x 4 k, 64 bytes) is one zmm operand as stored.
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

const KernelTable kTable = KT_KERNEL_TABLE(avx512_bf16, &gemm_bf16, &gemm_i8);

const KernelTable* avx512_bf16_table() { return &kTable; }

}  // namespace kt::kernels
