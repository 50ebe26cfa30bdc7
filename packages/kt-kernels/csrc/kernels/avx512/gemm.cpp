// AVX-512F kernels: packed bf16 pairs are widened to fp32 with a shift (even k: lane << 16) and a
// mask (odd k: lane & 0xffff0000), then multiplied with broadcasts of A[m,k] and A[m,k+1] by FMA.
// A bf16 x bf16 product is exact in fp32, so each FMA rounds once, like the scalar mul + add:
// on normal numbers the results equal the scalar reference bit for bit. The fused int8 / int4
// kernels form the same fp32 values from codes: sign-extend, convert, multiply by the row scale,
// round to bf16 with integer arithmetic.
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

// bf16 rounding (nearest even, integer arithmetic as quant_kernels.h) of 16 finite fp32 values,
// widened back to fp32: the values a dequantized block would hand to even_k / odd_k.
inline VecF round_bf16(VecF v) {
  const VecI bits = _mm512_castps_si512(v);
  const VecI lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const VecI r = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(int32_t(0xffff0000u))));
}
inline VecF scaled(VecI codes, VecF s) {
  return round_bf16(_mm512_mul_ps(_mm512_cvtepi32_ps(codes), s));
}

// The 16 scales of one block's rows in group g.
template <class Src>
inline VecF row_scales(const Src& b, int64_t g) {
  if (b.row_stride() == 1) return _mm512_loadu_ps(b.group_scales(g));
  const VecI idx =
      _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                         _mm512_set1_epi32(static_cast<int32_t>(b.row_stride())));
  return _mm512_i32gather_ps(idx, b.group_scales(g), 4);
}

// One block's B operand for pair row kk: the even-k and odd-k values of its 16 rows as fp32.
template <class Src>
struct Operand;

template <>
struct Operand<Bf16Blocks> {
  const bf16* p;
  void init(const Bf16Blocks& b, int64_t) { p = b.p; }
  void load(int64_t kk, VecF& b0, VecF& b1) const {
    const VecI pr = load_pairs(p + kk * 32);
    b0 = even_k(pr);
    b1 = odd_k(pr);
  }
};

// int8: 32 codes as 16 words (even code low byte, odd code high byte), sign-extended to 32 bits.
template <>
struct Operand<Q8Blocks> {
  const int8_t* c;
  VecF s;
  void init(const Q8Blocks& b, int64_t g) {
    c = b.codes;
    s = row_scales(b, g);
  }
  void load(int64_t kk, VecF& b0, VecF& b1) const {
    const VecI w =
        _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + kk * 32)));
    b0 = scaled(_mm512_srai_epi32(_mm512_slli_epi32(w, 24), 24), s);
    b1 = scaled(_mm512_srai_epi32(w, 8), s);
  }
};

// int4: 16 bytes, byte j = row j's pair (even code low nibble), sign-extended to 32 bits.
template <>
struct Operand<Q4Blocks> {
  const uint8_t* c;
  VecF s;
  void init(const Q4Blocks& b, int64_t g) {
    c = b.codes;
    s = row_scales(b, g);
  }
  void load(int64_t kk, VecF& b0, VecF& b1) const {
    const VecI w =
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + kk * 16)));
    b0 = scaled(_mm512_srai_epi32(_mm512_slli_epi32(w, 28), 28), s);
    b1 = scaled(_mm512_srai_epi32(w, 4), s);
  }
};

// A's rows are widened to fp32 a chunk of depth at a time, into an L1 buffer, before the FMAs
// read them as broadcasts (load-port work only). Widening a broadcast pair in the inner loop
// instead took two vector ALU instructions per row and k pair (shift, mask), on the two ports the
// FMAs need: 36 FMAs came with 18 such instructions per k pair of a 6 x 3 tile, now with 6 (B's)
// and the chunk's one pass (measured: docs/performance.md). The widening is exact, so the bits
// are unchanged.
constexpr int64_t kChunkPairs = 128;  // k pairs per chunk: MR rows x 1 KiB of fp32

// Rows [0, MR) of A, k pairs [kp0, kp1), as fp32 into out (row m at out + m * 2 * kChunkPairs).
template <int MR>
inline void widen_rows(const bf16* A, int64_t lda, int64_t kp0, int64_t kp1, float* out) {
  for (int m = 0; m < MR; ++m) {
    vec::cvt_bf16_f32(2 * (kp1 - kp0), A + m * lda + 2 * kp0, out + m * 2 * kChunkPairs);
  }
}

// MR rows x NR blocks; 6 x 3 uses 18 accumulators + 6 widened B rows + 2 A broadcasts.
template <int MR, int NR>
struct Tile {
  template <class Src>
  static void run(const TileArgs<Src>& t) {
    alignas(64) float a32[MR][2 * kChunkPairs];
    VecF c[MR][NR];
    KT_UNROLL for (int m = 0; m < MR; ++m) {
      KT_UNROLL for (int n = 0; n < NR; ++n) {
        c[m][n] = t.accumulate ? vload(t.C + m * t.ldc + n * kBlockN) : vzero();
      }
    }
    const int64_t pairs = t.Kp / 2, span = t.B.group_pairs(pairs);
    int64_t chunk0 = 0, chunk1 = 0;  // the pairs held in a32
    for (int64_t g = 0; g * span < pairs; ++g) {
      Operand<Src> op[NR];
      KT_UNROLL for (int n = 0; n < NR; ++n) op[n].init(t.B.at(n), g);
      const int64_t k1 = std::min(pairs, (g + 1) * span);
      for (int64_t kk = g * span; kk < k1;) {
        if (kk >= chunk1) {
          chunk0 = kk;
          chunk1 = std::min(pairs, kk + kChunkPairs);
          widen_rows<MR>(t.A, t.lda, chunk0, chunk1, &a32[0][0]);
        }
        for (const int64_t stop = std::min(k1, chunk1); kk < stop; ++kk) {
          VecF b0[NR], b1[NR];
          KT_UNROLL for (int n = 0; n < NR; ++n) op[n].load(kk, b0[n], b1[n]);
          const int64_t i = 2 * (kk - chunk0);
          KT_UNROLL for (int m = 0; m < MR; ++m) {
            const VecF a0 = _mm512_set1_ps(a32[m][i]), a1 = _mm512_set1_ps(a32[m][i + 1]);
            KT_UNROLL for (int n = 0; n < NR; ++n) {
              c[m][n] = vfma(a0, b0[n], c[m][n]);
              c[m][n] = vfma(a1, b1[n], c[m][n]);
            }
          }
        }
      }
    }
    KT_UNROLL for (int m = 0; m < MR; ++m) {
      KT_UNROLL for (int n = 0; n < NR; ++n) vstore(t.C + m * t.ldc + n * kBlockN, c[m][n]);
    }
  }
};

// Fused int8 / int4: 8 x 3 tiles, so up to 8 rows dequantize each block row once (9 rows take a
// second pass). Measured (bench_gemm --fused, AMD EPYC, 96 x 2048 tiles, 1 thread) against
// dequantize + gemm_bf16: 1.3-1.7x faster at 1 row, 1.2-1.4x at 8, 0.9-1.0x at 12; hence the
// engine's threshold of 8 rows.
using Gemm = Entries<Tile, 6, 3, 8, 3>;
constexpr int64_t kFusedMaxRows = 8;

// ---- int8 x int8 -> int32 (gemm_i8) ----------------------------------------------------------
// AVX-512F/BW without VNNI: codes are sign-extended to int16 and multiplied with vpmaddwd (two
// exact int16 products per int32 lane; no saturating vpmaddubsw). One k quad of a block (64 bytes:
// 16 rows x 4 k) widens to 2 zmm of 8 rows x 4 k; A's 4 codes of the quad are widened and
// broadcast to every 64-bit lane. The two int32 lanes of a row (k0 + k1, k2 + k3) are added and
// narrowed at the end.

inline __m512i load_quad_i16(const int8_t* p) {  // 32 codes (8 rows x 4 k) -> int16
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512i bcast_quad_i16(const int8_t* a) {  // a[0..3] as int16 in every 64-bit lane
  int32_t v;
  std::memcpy(&v, a, sizeof v);
  return _mm512_broadcastq_epi64(_mm_cvtepi8_epi16(_mm_cvtsi32_si128(v)));
}
// 8 row dot products of one accumulator: the two halves of a row share a 64-bit lane.
inline __m256i halves_to_rows(__m512i acc) {
  return _mm512_cvtepi64_epi32(_mm512_add_epi32(acc, _mm512_srli_epi64(acc, 32)));
}

// MR rows x NR blocks; 4 x 2 uses 16 accumulators + 4 widened B + 1 A broadcast + the products
// (6 x 2 measured slower: GCC spills some of its 24 accumulators).
template <int MR, int NR>
struct TileI8 {
  static void run(const TileArgsI8& t) {
    VecI c[MR][NR][2];
    KT_UNROLL for (int m = 0; m < MR; ++m) {
      KT_UNROLL for (int n = 0; n < NR; ++n) c[m][n][0] = c[m][n][1] = _mm512_setzero_si512();
    }
    const int64_t quads = t.Kp / 4;
    for (int64_t q = 0; q < quads; ++q) {
      VecI b[NR][2];
      KT_UNROLL for (int n = 0; n < NR; ++n) {
        b[n][0] = load_quad_i16(t.B + n * t.block_elems + 64 * q);
        b[n][1] = load_quad_i16(t.B + n * t.block_elems + 64 * q + 32);
      }
      KT_UNROLL for (int m = 0; m < MR; ++m) {
        const VecI a = bcast_quad_i16(t.A + m * t.lda + 4 * q);
        KT_UNROLL for (int n = 0; n < NR; ++n) {
          c[m][n][0] = _mm512_add_epi32(c[m][n][0], _mm512_madd_epi16(a, b[n][0]));
          c[m][n][1] = _mm512_add_epi32(c[m][n][1], _mm512_madd_epi16(a, b[n][1]));
        }
      }
    }
    KT_UNROLL for (int m = 0; m < MR; ++m) {
      KT_UNROLL for (int n = 0; n < NR; ++n) {
        VecI s = _mm512_inserti64x4(_mm512_castsi256_si512(halves_to_rows(c[m][n][0])),
                                    halves_to_rows(c[m][n][1]), 1);
        int32_t* dst = t.C + m * t.ldc + n * kBlockN;
        if (t.accumulate) s = _mm512_add_epi32(_mm512_loadu_si512(dst), s);
        _mm512_storeu_si512(dst, s);
      }
    }
  }
};

void gemm_i8(int64_t M, int64_t nblk, int64_t Kp, const int8_t* A, int64_t lda, const int8_t* B,
             int32_t* C, int64_t ldc, bool accumulate) {
  gemm_tiled_i8<TileI8, 4, 2>(M, nblk, Kp, A, lda, B, C, ldc, accumulate);
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

const KernelTable* avx512_table() { return &kTable; }

}  // namespace kt::kernels
