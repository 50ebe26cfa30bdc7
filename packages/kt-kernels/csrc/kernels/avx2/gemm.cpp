// AVX2 + FMA kernels: like AVX-512F, bf16 pairs are widened to fp32 with a shift (even k) and a
// mask (odd k) and fed to FMA with broadcasts of A[m,k], A[m,k+1]. A packed block row (16 outputs)
// is two ymm halves of 8. Results equal the scalar reference bit for bit on normal numbers. The
// fused int8 / int4 kernels form the same fp32 values from codes: sign-extend, convert, multiply by
// the row scale, round to bf16 with integer arithmetic.
// gemm_i8 (int8 blocks, exact int32 sums) widens codes to int16 for vpmaddwd; see below.
#include "kernels/intrinsics.h"  // first: before anything includes <immintrin.h>

#include <algorithm>
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

// bf16 rounding (nearest even, integer arithmetic as quant_kernels.h) of 8 finite fp32 values,
// widened back to fp32: the values a dequantized block would hand to even_k / odd_k.
inline VecF round_bf16(VecF v) {
  const VecI bits = _mm256_castps_si256(v);
  const VecI lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const VecI r = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb);
  return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(int32_t(0xffff0000u))));
}
inline VecF scaled(VecI codes, VecF s) {
  return round_bf16(_mm256_mul_ps(_mm256_cvtepi32_ps(codes), s));
}

// The 8 scales of rows [8 h, 8 h + 8) of one block in group g.
template <class Src>
inline VecF row_scales(const Src& b, int64_t g, int h) {
  const float* p = b.group_scales(g) + 8 * h * b.row_stride();
  if (b.row_stride() == 1) return _mm256_loadu_ps(p);
  const VecI idx = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0),
                                      _mm256_set1_epi32(static_cast<int32_t>(b.row_stride())));
  return _mm256_i32gather_ps(p, idx, 4);
}

// One block's B operand for pair row kk, half h (rows 8 h .. 8 h + 7): even-k and odd-k fp32.
template <class Src>
struct Operand;

template <>
struct Operand<Bf16Blocks> {
  const bf16* p;
  void init(const Bf16Blocks& b, int64_t) { p = b.p; }
  void load(int64_t kk, int h, VecF& b0, VecF& b1) const {
    const VecI pr = load_pairs(p + kk * 32 + h * 2 * kLanes);
    b0 = even_k(pr);
    b1 = odd_k(pr);
  }
};

// int8: 16 codes as 8 words (even code low byte, odd code high byte), sign-extended to 32 bits.
template <>
struct Operand<Q8Blocks> {
  const int8_t* c;
  VecF s[kHalves];
  void init(const Q8Blocks& b, int64_t g) {
    c = b.codes;
    for (int h = 0; h < kHalves; ++h) s[h] = row_scales(b, g, h);
  }
  void load(int64_t kk, int h, VecF& b0, VecF& b1) const {
    const VecI w = _mm256_cvtepi16_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + kk * 32 + h * 2 * kLanes)));
    b0 = scaled(_mm256_srai_epi32(_mm256_slli_epi32(w, 24), 24), s[h]);
    b1 = scaled(_mm256_srai_epi32(w, 8), s[h]);
  }
};

// int4: 8 bytes, byte j = row j's pair (even code low nibble), sign-extended to 32 bits.
template <>
struct Operand<Q4Blocks> {
  const uint8_t* c;
  VecF s[kHalves];
  void init(const Q4Blocks& b, int64_t g) {
    c = b.codes;
    for (int h = 0; h < kHalves; ++h) s[h] = row_scales(b, g, h);
  }
  void load(int64_t kk, int h, VecF& b0, VecF& b1) const {
    const VecI w = _mm256_cvtepi8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + kk * 16 + h * kLanes)));
    b0 = scaled(_mm256_srai_epi32(_mm256_slli_epi32(w, 28), 28), s[h]);
    b1 = scaled(_mm256_srai_epi32(w, 4), s[h]);
  }
};

// MR rows x NR blocks (2 ymm per block); 4 x 1 uses 8 accumulators + 4 widened B + 2 A of 16 ymm.
template <int MR, int NR>
struct Tile {
  static constexpr int NV = NR * kHalves;
  template <class Src>
  static void run(const TileArgs<Src>& t) {
    VecF c[MR][NV];
    KT_UNROLL for (int m = 0; m < MR; ++m) {
      KT_UNROLL for (int v = 0; v < NV; ++v) {
        c[m][v] = t.accumulate ? vload(t.C + m * t.ldc + v * kLanes) : vzero();
      }
    }
    const int64_t pairs = t.Kp / 2, span = t.B.group_pairs(pairs);
    for (int64_t g = 0; g * span < pairs; ++g) {
      Operand<Src> op[NR];
      KT_UNROLL for (int n = 0; n < NR; ++n) op[n].init(t.B.at(n), g);
      const int64_t k1 = std::min(pairs, (g + 1) * span);
      for (int64_t kk = g * span; kk < k1; ++kk) {
        VecF b0[NV], b1[NV];
        KT_UNROLL for (int v = 0; v < NV; ++v) op[v / kHalves].load(kk, v % kHalves, b0[v], b1[v]);
        KT_UNROLL for (int m = 0; m < MR; ++m) {
          const VecI p = bcast_pair(t.A + m * t.lda + 2 * kk);
          const VecF a0 = even_k(p), a1 = odd_k(p);
          KT_UNROLL for (int v = 0; v < NV; ++v) {
            c[m][v] = vfma(a0, b0[v], c[m][v]);
            c[m][v] = vfma(a1, b1[v], c[m][v]);
          }
        }
      }
    }
    KT_UNROLL for (int m = 0; m < MR; ++m) {
      KT_UNROLL for (int v = 0; v < NV; ++v) vstore(t.C + m * t.ldc + v * kLanes, c[m][v]);
    }
  }
};

// Fused int8 / int4: 8 x 1 tiles, so up to 8 rows dequantize each block row once (9 rows take a
// second pass). Measured (bench_gemm --fused, AMD EPYC, 96 x 2048 tiles, 1 thread) against
// dequantize + gemm_bf16: 1.5-1.9x faster at 1 row, 1.1-1.5x at 4, 1.0-1.3x at 8, 0.8-0.9x at 12;
// hence the engine's threshold of 8 rows.
using Gemm = Entries<Tile, 4, 1, 8, 1>;
constexpr int64_t kFusedMaxRows = 8;

// ---- int8 x int8 -> int32 (gemm_i8) ----------------------------------------------------------
// No VNNI here: codes are sign-extended to int16 and multiplied with vpmaddwd, which adds two
// exact int16 products into each int32 lane (vpmaddubsw is avoided: its int16 sums saturate).
// One k quad of a block (64 bytes: 16 rows x 4 k) widens to 4 ymm of 4 rows x 4 k; A's 4 codes of
// the quad are widened and broadcast to every 64-bit lane. Each int32 lane then collects the
// (k0, k1) or (k2, k3) half of one row's dot product; the halves are added at the end (hadd).

inline __m256i load_quad_i16(const int8_t* p) {  // 16 codes (4 rows x 4 k) -> int16
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i bcast_quad_i16(const int8_t* a) {  // a[0..3] as int16 in every 64-bit lane
  int32_t v;
  std::memcpy(&v, a, sizeof v);
  return _mm256_broadcastq_epi64(_mm_cvtepi8_epi16(_mm_cvtsi32_si128(v)));
}
// 16 row dot products from the 4 accumulators of one block row (two halves per row).
inline void finish_i8(const __m256i acc[4], int32_t* c, bool accumulate) {
  for (int h = 0; h < 2; ++h) {
    // hadd per 128-bit lane gives rows [0 1 4 5 | 2 3 6 7] of the 8; restore the order.
    const __m256i s = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[2 * h], acc[2 * h + 1]), 0xD8);
    __m256i* dst = reinterpret_cast<__m256i*>(c + 8 * h);
    _mm256_storeu_si256(dst, accumulate ? _mm256_add_epi32(_mm256_loadu_si256(dst), s) : s);
  }
}

// MR rows x NR blocks; 2 x 1 uses 8 accumulators + 2 A broadcasts + widened B and products of the
// 16 ymm (3 x 1 and 4 x 1 measured slower: spills).
template <int MR, int NR>
struct TileI8 {
  static void run(const TileArgsI8& t) {
    __m256i c[MR][NR][4];
    KT_UNROLL for (int m = 0; m < MR; ++m) {
      KT_UNROLL for (int n = 0; n < NR; ++n) {
        KT_UNROLL for (int v = 0; v < 4; ++v) c[m][n][v] = _mm256_setzero_si256();
      }
    }
    const int64_t quads = t.Kp / 4;
    for (int64_t q = 0; q < quads; ++q) {
      __m256i a[MR];
      KT_UNROLL for (int m = 0; m < MR; ++m) a[m] = bcast_quad_i16(t.A + m * t.lda + 4 * q);
      KT_UNROLL for (int n = 0; n < NR; ++n) {
        KT_UNROLL for (int v = 0; v < 4; ++v) {
          const __m256i b = load_quad_i16(t.B + n * t.block_elems + 64 * q + 16 * v);
          KT_UNROLL for (int m = 0; m < MR; ++m) {
            c[m][n][v] = _mm256_add_epi32(c[m][n][v], _mm256_madd_epi16(a[m], b));
          }
        }
      }
    }
    KT_UNROLL for (int m = 0; m < MR; ++m) {
      KT_UNROLL for (int n = 0; n < NR; ++n) {
        finish_i8(c[m][n], t.C + m * t.ldc + n * kBlockN, t.accumulate);
      }
    }
  }
};

void gemm_i8(int64_t M, int64_t nblk, int64_t Kp, const int8_t* A, int64_t lda, const int8_t* B,
             int32_t* C, int64_t ldc, bool accumulate) {
  gemm_tiled_i8<TileI8, 2, 1>(M, nblk, Kp, A, lda, B, C, ldc, accumulate);
}

}  // namespace

constexpr KernelTable kTable = [] {
  KernelTable t = vec::helper_entries();
  t.gemm_bf16 = &Gemm::gemm_bf16;
  t.gemm_q8 = &Gemm::gemm_q8;
  t.gemm_q4 = &Gemm::gemm_q4;
  t.fused_max_rows_q8 = kFusedMaxRows;
  t.fused_max_rows_q4 = kFusedMaxRows;
  t.gemm_i8 = &gemm_i8;
  return t;
}();

const KernelTable* avx2_table() { return &kTable; }

}  // namespace kt::kernels
