// AVX2 + FMA kernels: like AVX-512F, bf16 pairs are widened to fp32 with a shift (even k) and a
// mask (odd k) and fed to FMA with broadcasts of A[m,k], A[m,k+1]. A packed block row (16 outputs)
// is two ymm halves of 8. Results equal the scalar reference bit for bit on normal numbers.
#include "kernels/intrinsics.h"  // first: before anything includes <immintrin.h>

#include <cstring>

#include "kernels/kernels.h"
#include "kernels/vec_simd.h"
#include "kernels/tile_driver.h"

namespace kt::kernels {
namespace {

// ---- the few intrinsics the loops use --------------------------------------------------------
using VecF = __m256;
using VecI = __m256i;
constexpr int kLanes = 8;
constexpr int kHalves = kBlockN / kLanes;  // ymm per block row
inline VecF vzero() { return _mm256_setzero_ps(); }
inline VecF vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, VecF v) { _mm256_storeu_ps(p, v); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecI load_pairs(const bf16* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline VecI bcast_pair(const bf16* a) {
  int32_t v;
  std::memcpy(&v, a, sizeof v);
  return _mm256_set1_epi32(v);
}
inline VecF even_k(VecI pairs) { return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)); }
inline VecF odd_k(VecI pairs) {
  return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(int32_t(0xffff0000u))));
}

// MR rows x NR blocks (2 ymm per block); 4 x 1 uses 8 accumulators + 4 widened B + 2 A of 16 ymm.
template <int MR, int NR>
struct Tile {
  static constexpr int NV = NR * kHalves;
  static void run(const TileArgs& t) {
    VecF c[MR][NV];
    KT_UNROLL for (int m = 0; m < MR; ++m) {
      KT_UNROLL for (int v = 0; v < NV; ++v) {
        c[m][v] = t.accumulate ? vload(t.C + m * t.ldc + v * kLanes) : vzero();
      }
    }
    const int64_t pairs = t.Kp / 2;
    for (int64_t kk = 0; kk < pairs; ++kk) {
      VecF b0[NV], b1[NV];
      KT_UNROLL for (int v = 0; v < NV; ++v) {
        const VecI p =
            load_pairs(t.B + (v / kHalves) * t.block_elems + kk * 32 + (v % kHalves) * 2 * kLanes);
        b0[v] = even_k(p);
        b1[v] = odd_k(p);
      }
      KT_UNROLL for (int m = 0; m < MR; ++m) {
        const VecI p = bcast_pair(t.A + m * t.lda + 2 * kk);
        const VecF a0 = even_k(p), a1 = odd_k(p);
        KT_UNROLL for (int v = 0; v < NV; ++v) {
          c[m][v] = vfma(a0, b0[v], c[m][v]);
          c[m][v] = vfma(a1, b1[v], c[m][v]);
        }
      }
    }
    KT_UNROLL for (int m = 0; m < MR; ++m) {
      KT_UNROLL for (int v = 0; v < NV; ++v) vstore(t.C + m * t.ldc + v * kLanes, c[m][v]);
    }
  }
};

void gemm_bf16(int64_t M, int64_t nblk, int64_t Kp, const bf16* A, int64_t lda, const bf16* B,
               float* C, int64_t ldc, bool accumulate) {
  gemm_tiled<Tile, 4, 1>(M, nblk, Kp, A, lda, B, C, ldc, accumulate);
}

}  // namespace

const KernelTable kTable = KT_KERNEL_TABLE(avx2, &gemm_bf16);

const KernelTable* avx2_table() { return &kTable; }

}  // namespace kt::kernels
