// AVX-512F kernels: packed bf16 pairs are widened to fp32 with a shift (even k: lane << 16) and a
// mask (odd k: lane & 0xffff0000), then multiplied with broadcasts of A[m,k] and A[m,k+1] by FMA.
// A bf16 x bf16 product is exact in fp32, so each FMA rounds once, like the scalar mul + add:
// on normal numbers the results equal the scalar reference bit for bit.
#include "kernels/intrinsics.h"  // first: before anything includes <immintrin.h>

#include <cstring>

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
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline VecI load_pairs(const bf16* p) { return _mm512_loadu_si512(p); }
inline VecI bcast_pair(const bf16* a) {
  int32_t v;
  std::memcpy(&v, a, sizeof v);
  return _mm512_set1_epi32(v);
}
inline VecF even_k(VecI pairs) { return _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)); }
inline VecF odd_k(VecI pairs) {
  return _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(int32_t(0xffff0000u))));
}

// MR rows x NR blocks; 6 x 3 uses 18 accumulators + 6 widened B rows + 2 A broadcasts.
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
      VecF b0[NR], b1[NR];
      KT_UNROLL for (int n = 0; n < NR; ++n) {
        const VecI p = load_pairs(t.B + n * t.block_elems + kk * 32);
        b0[n] = even_k(p);
        b1[n] = odd_k(p);
      }
      KT_UNROLL for (int m = 0; m < MR; ++m) {
        const VecI p = bcast_pair(t.A + m * t.lda + 2 * kk);
        const VecF a0 = even_k(p), a1 = odd_k(p);
        KT_UNROLL for (int n = 0; n < NR; ++n) {
          c[m][n] = vfma(a0, b0[n], c[m][n]);
          c[m][n] = vfma(a1, b1[n], c[m][n]);
        }
      }
    }
    KT_UNROLL for (int m = 0; m < MR; ++m) {
      KT_UNROLL for (int n = 0; n < NR; ++n) vstore(t.C + m * t.ldc + n * kBlockN, c[m][n]);
    }
  }
};

void gemm_bf16(int64_t M, int64_t nblk, int64_t Kp, const bf16* A, int64_t lda, const bf16* B,
               float* C, int64_t ldc, bool accumulate) {
  gemm_tiled<Tile, 6, 3>(M, nblk, Kp, A, lda, B, C, ldc, accumulate);
}

}  // namespace

const KernelTable kTable = KT_KERNEL_TABLE(avx512, &gemm_bf16);

const KernelTable* avx512_table() { return &kTable; }

}  // namespace kt::kernels
