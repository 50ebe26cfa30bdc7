// AMX kernels: gemm_bf16 on AMX-BF16 (tdpbf16ps) and gemm_i8 on AMX-INT8 (tdpbssd). Both packed
// layouts were made for tiles: 16 consecutive 64-byte rows of a packed block (16 k pairs x 16
// outputs x 2 bf16, or 16 k quads x 16 outputs x 4 int8) are one B tile, loaded with a 64-byte
// stride. A tiles are 16 rows of A (32 bf16 or 64 int8 of K each) with stride lda; C tiles are
// 16 x 16 fp32 or int32.
//
// Tile registers (palette 1): C[mi][ni] = tmm(2*mi + ni) for mi, ni in {0, 1}; A[mi] = tmm(4 + mi);
// B[ni] = tmm(6 + ni). An M tail uses a configuration whose A and C tiles have fewer rows, so no
// row outside A or C is read or written. Tiles a tile shape does not use are left unconfigured
// (rows = colsb = 0) and never touched.
//
// The fused int8 / int4 kernels (gemm_q8 / gemm_q4, bf16 A) dequantize each B tile (16 k pairs of
// one block, 1 KiB) with AVX512_BF16 into a buffer in L1 right before its tile load and then run
// the same tile sequence as gemm_bf16, so their results equal dequantization + gemm_bf16 bit for
// bit; the copy never leaves L1.
//
// The configuration is loaded at the start of every call and the tiles are released at its end:
// the thread may run other AMX code between calls (e.g. another library's kernels), so no tile
// state is assumed to survive a call, and a released thread costs the OS no tile-data saves.
#include "kernels/intrinsics.h"  // first: before anything includes <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/kernels.h"
#include "kernels/weight_blocks.h"
#ifndef KT_AMX_GEMM_ONLY  // (set by the test that runs this file on a model of the tile unit)
#include "kernels/bf16_dequant.h"
#include "kernels/vec_simd.h"
#endif

namespace kt::kernels {
namespace {

constexpr int kTileRows = 16;   // rows of A and C per tile; k pairs (quads) per B tile
constexpr int kTileBytes = 64;  // bytes per tile row (16 fp32 / int32, 32 bf16 or 64 int8)

// The 64-byte operand of LDTILECFG (Intel SDM, "TILECFG"): palette, start row, 14 reserved bytes,
// then bytes-per-row of tiles 0..15 (uint16) and rows of tiles 0..15 (uint8).
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads exactly 64 bytes");
static_assert(offsetof(TileConfig, colsb) == 16 && offsetof(TileConfig, rows) == 48,
              "TILECFG field offsets");

// rows0 / rows1: rows of the first / second M tile (rows1 = 0: a single M tile).
TileConfig make_config(int rows0, int rows1) {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  auto set = [&cfg](int tile, int rows) {
    cfg.rows[tile] = static_cast<uint8_t>(rows);
    cfg.colsb[tile] = rows > 0 ? kTileBytes : 0;
  };
  set(0, rows0);      // C[0][0]
  set(1, rows0);      // C[0][1]
  set(2, rows1);      // C[1][0]
  set(3, rows1);      // C[1][1]
  set(4, rows0);      // A[0]
  set(5, rows1);      // A[1]
  set(6, kTileRows);  // B[0]: 16 k pairs (bf16) or quads (int8)
  set(7, kTileRows);  // B[1]
  return cfg;
}

// One thread's current tile configuration (the tile config lives in each thread's state).
thread_local TileConfig tls_config;
thread_local int tls_rows0 = -1, tls_rows1 = -1;

void configure(int rows0, int rows1) {
  if (rows0 == tls_rows0 && rows1 == tls_rows1) return;
  tls_config = make_config(rows0, rows1);
  _tile_loadconfig(&tls_config);
  tls_rows0 = rows0;
  tls_rows1 = rows1;
}

void release() {
  _tile_release();
  tls_rows0 = tls_rows1 = -1;
}

// ---- tile operations. GCC's _tile_* macros paste the tile number into the instruction text, so
// the ids below are literals, spelled once each.
#define KT_C_INIT(id, ptr)             \
  do {                                 \
    if (accumulate) {                  \
      _tile_loadd(id, ptr, ldc_bytes); \
    } else {                           \
      _tile_zero(id);                  \
    }                                  \
  } while (0)

// int8 blocks of gemm_i8 (kernels.h), loaded in place like packed bf16 blocks.
struct I8Blocks {
  const int8_t* p;
  int64_t block;  // bytes per block (i8_block_bytes(Kp): codes, then the row sums)
  I8Blocks at(int64_t n) const { return {p + n * block, block}; }
};

// The B tile of the first block of b at depth k0 (16 block rows from row k0 / 2 of bf16 pairs or
// k0 / 4 of int8 quads, i.e. from element k0 * 16): stored blocks are loaded in place; codes are
// dequantized into `stage` first (a tile never straddles a scale group: groups are multiples of
// 32 k).
inline const void* b_tile(const Bf16Blocks& b, int64_t k0, int64_t, bf16*) {
  return b.p + k0 * kBlockN;
}
inline const void* b_tile(const I8Blocks& b, int64_t k0, int64_t, bf16*) {
  return b.p + k0 * kBlockN;
}
#ifndef KT_AMX_GEMM_ONLY
// The 16 pair rows from kp0 of the first block of codes, in scale group g, as one packed bf16 B
// tile: AVX512_BF16 dequantization (kernels/bf16_dequant.h), the same bits as stage_pairs.
inline void stage_tile(const Q8Blocks& b, int64_t g, int64_t kp0, bf16* out) {
  const __m512 s = _mm512_loadu_ps(b.group_scales(g));
  const __m512 s_lo = row_scales_lo(s), s_hi = row_scales_hi(s);
  const int8_t* c = b.codes + 32 * kp0;
  for (int p = 0; p < kTileRows; ++p) {
    _mm512_store_si512(out + 32 * p, dequant_pair_i8(c + 32 * p, s_lo, s_hi));
  }
}
inline void stage_tile(const Q4Blocks& b, int64_t g, int64_t kp0, bf16* out) {
  const __m512i idx =
      _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                         _mm512_set1_epi32(static_cast<int32_t>(b.row_stride())));
  const __m512 s = _mm512_i32gather_ps(idx, b.group_scales(g), 4);
  const uint8_t* c = b.codes + 16 * kp0;
  for (int p = 0; p < kTileRows; ++p) {
    _mm512_store_si512(out + 32 * p, dequant_pair_i4(c + 16 * p, s, s));
  }
}
#else
// On the tile model (baseline flags): the per-element staging of weight_blocks.h.
template <class Src>
void stage_tile(const Src& b, int64_t g, int64_t kp0, bf16* out) {
  stage_pairs(b, g, kp0, kTileRows, out);
}
#endif
template <class Src>
const void* b_tile(const Src& b, int64_t k0, int64_t Kp, bf16* stage) {
  stage_tile(b, k0 / 2 / b.group_pairs(Kp / 2), k0 / 2, stage);
  return stage;
}

// MB M tiles (16 rows each, fewer in a tail) x NB packed blocks, over all of K. T is the element
// type of A (bf16 or int8), TC that of C (float or int32); B is a weight source (bf16 or int8
// blocks, or int8 / int4 codes staged as bf16).
template <int MB, int NB, typename T, typename TC, class Src>
void tile(int64_t Kp, const T* A, int64_t lda, const Src& B, TC* C, int64_t ldc, bool accumulate) {
  alignas(64) bf16 stage[2][kTileRows * 32];  // used by code sources only
  const Src B1 = B.at(NB > 1 ? 1 : 0);
  constexpr bool kInt8 = std::is_same_v<T, int8_t>;
  constexpr int64_t kTileK = kTileBytes / static_cast<int64_t>(sizeof(T));  // k per A / B tile
  const int64_t ldc_bytes = ldc * static_cast<int64_t>(sizeof(TC));
  const int64_t lda_bytes = lda * static_cast<int64_t>(sizeof(T));
  TC* C1 = C + kTileRows * ldc;  // second M tile
  const T* A1 = A + kTileRows * lda;
  KT_C_INIT(0, C);
  if constexpr (NB > 1) KT_C_INIT(1, C + kBlockN);
  if constexpr (MB > 1) {
    KT_C_INIT(2, C1);
    if constexpr (NB > 1) KT_C_INIT(3, C1 + kBlockN);
  }
  for (int64_t k0 = 0; k0 < Kp; k0 += kTileK) {
    _tile_loadd(6, b_tile(B, k0, Kp, stage[0]), kTileBytes);
    if constexpr (NB > 1) _tile_loadd(7, b_tile(B1, k0, Kp, stage[1]), kTileBytes);
    _tile_loadd(4, A + k0, lda_bytes);
    if constexpr (kInt8) {
      _tile_dpbssd(0, 4, 6);
      if constexpr (NB > 1) _tile_dpbssd(1, 4, 7);
    } else {
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (NB > 1) _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (MB > 1) {
      _tile_loadd(5, A1 + k0, lda_bytes);
      if constexpr (kInt8) {
        _tile_dpbssd(2, 5, 6);
        if constexpr (NB > 1) _tile_dpbssd(3, 5, 7);
      } else {
        _tile_dpbf16ps(2, 5, 6);
        if constexpr (NB > 1) _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  _tile_stored(0, C, ldc_bytes);
  if constexpr (NB > 1) _tile_stored(1, C + kBlockN, ldc_bytes);
  if constexpr (MB > 1) {
    _tile_stored(2, C1, ldc_bytes);
    if constexpr (NB > 1) _tile_stored(3, C1 + kBlockN, ldc_bytes);
  }
}

#undef KT_C_INIT

template <int MB, typename T, typename TC, class Src>
void tile_cols(int nb, int64_t Kp, const T* A, int64_t lda, const Src& B, TC* C, int64_t ldc,
               bool accumulate) {
  if (nb == 2) {
    tile<MB, 2>(Kp, A, lda, B, C, ldc, accumulate);
  } else {
    tile<MB, 1>(Kp, A, lda, B, C, ldc, accumulate);
  }
}

// Bytes of A per pass over B's column pairs. Each pair's k loop reads its 32 rows of A from L2; a
// pass over more rows than L2 keeps next to the weight panel sends them to L3 between pairs.
// Measured (one thread, bf16, 6 blocks, depth 2080, all in cache): 512 rows in one pass 1,036-1,062
// GFLOP/s, in passes of 128 rows (532 KiB) 1,352-1,366; 128 rows alone 1,696.
constexpr int64_t kPassBytes = int64_t{512} << 10;

// Passes of A (outer; a multiple of 32 rows, at most kPassBytes where rows allow), N in pairs of
// blocks, M in 32-row steps (inner), as the other ISAs within a pass. Full 32-row steps come
// first under one configuration, then the M tail (if any) under a second one, so a call loads at
// most two configurations. Every C tile sums its full depth in one k loop, so the passes do not
// change any result.
template <typename T, typename TC, class Src>
void gemm_tiles(int64_t M, int64_t nblk, int64_t Kp, const T* A, int64_t lda, const Src& B, TC* C,
                int64_t ldc, bool accumulate) {
  if (M <= 0 || nblk <= 0) return;
  const int64_t full = M / (2 * kTileRows) * (2 * kTileRows);
  if (full > 0) {
    configure(kTileRows, kTileRows);
    const int64_t row_bytes = lda * static_cast<int64_t>(sizeof(T));
    const int64_t pass =
        std::max<int64_t>(1, kPassBytes / (2 * kTileRows * row_bytes)) * 2 * kTileRows;
    for (int64_t p0 = 0; p0 < full; p0 += pass) {
      const int64_t p1 = std::min(full, p0 + pass);
      for (int64_t n0 = 0; n0 < nblk; n0 += 2) {
        const int nb = nblk - n0 >= 2 ? 2 : 1;
        for (int64_t m0 = p0; m0 < p1; m0 += 2 * kTileRows) {
          tile_cols<2>(nb, Kp, A + m0 * lda, lda, B.at(n0), C + m0 * ldc + n0 * kBlockN, ldc,
                       accumulate);
        }
      }
    }
  }
  const int64_t rem = M - full;  // 0 .. 31 rows
  if (rem > 0) {
    const int rows0 = static_cast<int>(rem >= kTileRows ? kTileRows : rem);
    const int rows1 = static_cast<int>(rem > kTileRows ? rem - kTileRows : 0);
    configure(rows0, rows1);
    for (int64_t n0 = 0; n0 < nblk; n0 += 2) {
      const int nb = nblk - n0 >= 2 ? 2 : 1;
      const T* a = A + full * lda;
      TC* c = C + full * ldc + n0 * kBlockN;
      if (rows1 > 0) {
        tile_cols<2>(nb, Kp, a, lda, B.at(n0), c, ldc, accumulate);
      } else {
        tile_cols<1>(nb, Kp, a, lda, B.at(n0), c, ldc, accumulate);
      }
    }
  }
  release();
}

void gemm_bf16(int64_t M, int64_t nblk, int64_t Kp, const bf16* A, int64_t lda, const bf16* B,
               float* C, int64_t ldc, bool accumulate) {
  gemm_tiles(M, nblk, Kp, A, lda, Bf16Blocks{B, kBlockN * Kp}, C, ldc, accumulate);
}

void gemm_q8(int64_t M, int64_t nblk, int64_t Kp, const bf16* A, int64_t lda, const int8_t* codes,
             const float* scales, float* C, int64_t ldc, bool accumulate) {
  gemm_tiles(M, nblk, Kp, A, lda, Q8Blocks{codes, scales, kBlockN * Kp}, C, ldc, accumulate);
}

void gemm_q4(int64_t M, int64_t nblk, int64_t Kp, int64_t group, const bf16* A, int64_t lda,
             const uint8_t* codes, const float* scales, float* C, int64_t ldc, bool accumulate) {
  const Q4Blocks src{codes, scales, kBlockN * Kp / 2, (Kp + group - 1) / group, group / 2};
  gemm_tiles(M, nblk, Kp, A, lda, src, C, ldc, accumulate);
}

// tdpbssd: signed x signed bytes, 4 per int32 lane, added without saturation (exact modulo 2^32,
// like the scalar reference). The row sums after each block's codes are not needed here.
void gemm_i8(int64_t M, int64_t nblk, int64_t Kp, const int8_t* A, int64_t lda, const int8_t* B,
             int32_t* C, int64_t ldc, bool accumulate) {
  gemm_tiles(M, nblk, Kp, A, lda, I8Blocks{B, i8_block_bytes(Kp)}, C, ldc, accumulate);
}

}  // namespace

#ifndef KT_AMX_GEMM_ONLY
// Up to 32 rows (one 32-row step) the fused kernels dequantize each B tile once, as many times as
// dequantize + gemm_bf16 does, and the copy stays in L1 instead of passing through L2; each
// further 32-row step dequantizes it again. Measured (bench_gemm --fused, 96 x 2048 tiles, 1
// thread, 64-byte aligned operands, Intel Xeon (Emerald Rapids)) against dequantize + gemm_bf16,
// weights out of / in cache: int8 1.45-1.50x / 1.11-1.19x up to 32 rows, 1.03-1.05x / 0.76-0.78x
// at 48-64; int4 1.02-1.22x / 1.02-1.22x up to 32 rows, 0.78-0.86x / 0.73-0.84x at 48-64. In the
// engine, int8 fused up to 64 rows equals the copy path with cached weights (E = 16, 48 and 64 rows
// per expert: 13.8 vs 14.5 ms and 17.4 vs 17.7 ms per forward) and streamed ones (T = 1024, 64
// rows: 141 vs 142 ms). Hence 64 rows for int8 and 32 for int4.
constexpr int64_t kFusedMaxRowsQ8 = 4 * kTileRows;
constexpr int64_t kFusedMaxRowsQ4 = 2 * kTileRows;
constexpr KernelTable kTable = [] {
  KernelTable t = vec::helper_entries();
  t.gemm_bf16 = &gemm_bf16;
  t.gemm_q8 = &gemm_q8;
  t.gemm_q4 = &gemm_q4;
  t.fused_max_rows_q8 = kFusedMaxRowsQ8;
  t.fused_max_rows_q4 = kFusedMaxRowsQ4;
  t.gemm_i8 = &gemm_i8;
  return t;
}();

const KernelTable* amx_table() { return &kTable; }
#endif

}  // namespace kt::kernels
