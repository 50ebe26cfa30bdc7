// Shared loop structure of the SIMD gemm kernels. Included only by kernels/<isa>/*.cpp (compiled
// with that ISA's flags); everything here has internal linkage, so no wide copy of it can ever be
// merged into baseline code.
//
// A kernel provides a micro-tile `template <int MR, int NR> struct Tile { template <class Src>
// static void run(const TileArgs<Src>&); }` computing MR rows x NR packed blocks over all of K,
// with B read from a weight source (weight_blocks.h: packed bf16, or int8 / int4 codes dequantized
// in registers); the int8 x int8 kernels (gemm_i8) use TileArgsI8 and gemm_tiled_i8. The driver
// walks N in groups of NR blocks (outer) and M in groups of MR rows (inner), so one panel of B (NR
// blocks, all of K) stays in L2 while every row of A passes over it. (Blocking K as well, to keep
// the panel in L1, measured no faster on Zen 5 for M up to 1024 and K up to 2048: the L2 feeds the
// panel fast enough.) Tails use the smaller instantiations, which run the same k order per output
// element, so results never depend on how a caller splits M or N, nor on where B comes from.
#pragma once

#ifndef KT_CPU_CAPABILITY
#error "tile_driver.h belongs to the per-ISA kernel files only"
#endif

#include <cstdint>

#include "kernels/kernels.h"
#include "kernels/weight_blocks.h"

#if defined(__GNUC__) && !defined(__clang__)
#define KT_UNROLL _Pragma("GCC unroll 16")
#elif defined(__clang__)
#define KT_UNROLL _Pragma("unroll")
#else
#define KT_UNROLL
#endif

namespace kt::kernels {
namespace {

// bf16 A, fp32 C, B from a weight source (weight_blocks.h).
template <class Src>
struct TileArgs {
  int64_t Kp;
  const bf16* A;
  int64_t lda;
  Src B;     // first block of the tile
  float* C;  // first row, first column of the tile
  int64_t ldc;
  bool accumulate;
};

// TA: element type of A and B (int8 for gemm_i8); TC: of C (int32).
template <typename TA, typename TC>
struct TileArgsT {
  int64_t Kp;
  const TA* A;
  int64_t lda;
  const TA* B;          // first block of the tile
  int64_t block_elems;  // distance between consecutive packed blocks (elements of TA)
  TC* C;                // first row, first column of the tile
  int64_t ldc;
  bool accumulate;
};
using TileArgsI8 = TileArgsT<int8_t, int32_t>;

// Calls Tile<mr, nr>::run with compile-time mr <= MR, nr <= NR chosen from run-time values.
template <template <int, int> class Tile, int MR, int NR, typename Args>
inline void run_cols(int nr, const Args& t) {
  if constexpr (NR > 1) {
    if (nr < NR) return run_cols<Tile, MR, NR - 1>(nr, t);
  }
  Tile<MR, NR>::run(t);
}

template <template <int, int> class Tile, int MR, int NR, typename Args>
inline void run_rows(int mr, int nr, const Args& t) {
  if constexpr (MR > 1) {
    if (mr < MR) return run_rows<Tile, MR - 1, NR>(mr, nr, t);
  }
  run_cols<Tile, MR, NR>(nr, t);
}

template <template <int, int> class Tile, int MR, int NR, class Src>
void gemm_tiled(int64_t M, int64_t nblk, int64_t Kp, const bf16* A, int64_t lda, const Src& B,
                float* C, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < nblk; n0 += NR) {
    const int nr = static_cast<int>(nblk - n0 < NR ? nblk - n0 : NR);
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int mr = static_cast<int>(M - m0 < MR ? M - m0 : MR);
      const TileArgs<Src> t{Kp,  A + m0 * lda, lda, B.at(n0), C + m0 * ldc + n0 * kBlockN,
                            ldc, accumulate};
      run_rows<Tile, MR, NR>(mr, nr, t);
    }
  }
}

template <template <int, int> class Tile, int MR, int NR, typename TA, typename TC>
void gemm_tiled_blocks(int64_t M, int64_t nblk, int64_t Kp, const TA* A, int64_t lda, const TA* B,
                       int64_t block, TC* C, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < nblk; n0 += NR) {
    const int nr = static_cast<int>(nblk - n0 < NR ? nblk - n0 : NR);
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int mr = static_cast<int>(M - m0 < MR ? M - m0 : MR);
      const TileArgsT<TA, TC> t{
          Kp,  A + m0 * lda, lda, B + n0 * block, block, C + m0 * ldc + n0 * kBlockN,
          ldc, accumulate};
      run_rows<Tile, MR, NR>(mr, nr, t);
    }
  }
}

// The three bf16-A entry points of an ISA over one micro-tile: gemm_bf16 and the fused gemm_q8 /
// gemm_q4 (kernels.h), tiled MR x NR for bf16 and QMR x QNR for codes (results do not depend on
// the tiling; the fused kernels run at small M, where other shapes may suit the registers better).
template <template <int, int> class Tile, int MR, int NR, int QMR, int QNR>
struct Entries {
  static void gemm_bf16(int64_t M, int64_t nblk, int64_t Kp, const bf16* A, int64_t lda,
                        const bf16* B, float* C, int64_t ldc, bool accumulate) {
    gemm_tiled<Tile, MR, NR>(M, nblk, Kp, A, lda, Bf16Blocks{B, kBlockN * Kp}, C, ldc, accumulate);
  }
  static void gemm_q8(int64_t M, int64_t nblk, int64_t Kp, const bf16* A, int64_t lda,
                      const int8_t* codes, const float* scales, float* C, int64_t ldc,
                      bool accumulate) {
    gemm_tiled<Tile, QMR, QNR>(M, nblk, Kp, A, lda, Q8Blocks{codes, scales, kBlockN * Kp}, C, ldc,
                               accumulate);
  }
  static void gemm_q4(int64_t M, int64_t nblk, int64_t Kp, int64_t group, const bf16* A,
                      int64_t lda, const uint8_t* codes, const float* scales, float* C, int64_t ldc,
                      bool accumulate) {
    const Q4Blocks src{codes, scales, kBlockN * Kp / 2, (Kp + group - 1) / group, group / 2};
    gemm_tiled<Tile, QMR, QNR>(M, nblk, Kp, A, lda, src, C, ldc, accumulate);
  }
};

// gemm_i8 over int8 blocks (kernels.h): a block is i8_block_bytes(Kp) bytes, row sums included.
template <template <int, int> class Tile, int MR, int NR>
void gemm_tiled_i8(int64_t M, int64_t nblk, int64_t Kp, const int8_t* A, int64_t lda,
                   const int8_t* B, int32_t* C, int64_t ldc, bool accumulate) {
  gemm_tiled_blocks<Tile, MR, NR>(M, nblk, Kp, A, lda, B, i8_block_bytes(Kp), C, ldc, accumulate);
}

}  // namespace
}  // namespace kt::kernels
