// Weight-only quantized storage of the frozen base weights (weight_dtype "int8" / "int4").
//
// Internal layout: the packed bf16 block layout of kernels/kernels.h with codes in place of bf16
// values. Element (n, k) of block b (rows 16b .. 16b + 15) is code number
//     i = (k / 2) * 32 + (n % 16) * 2 + (k % 2)
// of the block: int8 stores code i in byte i (16 * Kp bytes per block); int4 stores it in byte i /
// 2, low nibble for even i, high nibble for odd i (two's complement, -8 .. 7; 8 * Kp bytes per
// block). Scales are float32 per (row, group) in row order of the packed rows: scale[row * ngroups
// + g], g = k / group; int8 has one group per row (group = Kp). The value is float(code) * scale,
// rounded to bf16 when a block is dequantized for the bf16 GEMM kernels.
//
// W8A8 (weight_dtype int8 with activation_dtype int8, Kind::w8a8): the same int8 codes and
// per-row scales, but in the int8 block layout of the int8 GEMM (kernels/kernels.h, "VNNI-4"):
// code (n, k) of a block at byte (k / 4) * 64 + (n % 16) * 4 + k % 4 with Kp = K rounded up to 64,
// then 16 int32 row sums (i8_block_bytes(Kp) bytes per block). Dequantized values are the same
// bf16(code * scale) as int8's.
//
// Quantization (symmetric): per row and group, scale = max|w| / qmax (qmax 127 for int8, 7 for
// int4), code = round_half_even(w / scale) clamped to [-qmax, qmax]; an all-zero group has scale 0,
// and so has a group whose scale would be below the smallest normal float (2^-126; its values are
// below the bf16 normals too). Stored scales are therefore 0 or normal, so no product code * scale
// is a denormal and the fused kernels equal dequantization + GEMM bit for bit on every ISA
// (kernels.h, gemm_q8_fn); pre-quantized scales are flushed the same way (flush_scale).
#pragma once

#include <cstdint>

#include "kernels/kernels.h"
#include "kernels/quant_kernels.h"

namespace kt::engine::quant {

enum class Kind : int { bf16 = 0, int8 = 1, int4 = 2, w8a8 = 3 };

struct Format {
  Kind kind = Kind::bf16;
  int64_t group = 0;    // int4: group size along K; int8, w8a8: Kp
  int64_t Kp = 0;       // padded depth of the weight
  int64_t ngroups = 1;  // scales per row
};

Format make_format(Kind kind, int64_t K, int64_t group);

// The depth at which bf16 weight blocks are stored (gate_up: depth H; down, with one
// tensor-parallel slice: depth I): Kp plus one 32-deep step of zeros when the block stride (32 * Kp
// bytes) is a multiple of 16 KiB and Kp >= 1024. Backward's transposed repack reads the same
// 512-byte slice of every block; at such strides those slices share cache sets (and DRAM banks)
// once huge pages make the physical stride equal the virtual one, which made that repack 1.3x
// slower at Kp = 2048 (1.1-1.5x at 1024 to 7168). The zero step adds exact zeros to every sum (32 /
// Kp more work); the rows that meet it (x, dY, h) are as deep, their padding zero.
int64_t unaliased_depth(int64_t Kp);
inline int qmax(Kind k) { return k == Kind::int4 ? 7 : 127; }
// Bytes of one packed block of 16 rows.
int64_t block_bytes(const Format& f);

// Quantizes one row of K finite floats: codes[0, K) and scales[0, ngroups), with the ISA's
// kernels (every table gives the same bits). Returns false if a value is not finite.
bool quantize_row(const kernels::QuantKernels& qk, const Format& f, const float* w, int64_t K,
                  int8_t* codes, float* scales);

// A scale as stored: below the smallest normal float it becomes 0.
inline float flush_scale(float s) { return s < 0x1p-126f ? 0.0f : s; }

// Writes a row of K codes as row j (0 .. 15) of a block (codes at k >= K are zero; w8a8: also the
// row's code sum). The element-by-element definition of place_block.
void place_row(const Format& f, const int8_t* codes, int64_t K, int j, uint8_t* blk);

// Writes a whole block: row j (0 .. 15) has the K codes codes[j * ld + k], k < K; the block's
// bytes equal place_row of each row into it (whatever the block held before).
void place_block(const Format& f, const int8_t* codes, int64_t ld, int64_t K, uint8_t* blk);

// int4: the same from codes already packed two per byte in row order (byte m of row j at
// nib[j * ld + m] holds codes 2m (low nibble) and 2m + 1; ceil(K / 2) bytes per row, the high
// nibble of the last byte zero when K is odd).
void place_block_nibbles(const Format& f, const uint8_t* nib, int64_t ld, int64_t K, uint8_t* blk);

// Dequantizes nblk consecutive packed blocks (first block at `blk`, its first row's scales at
// `scales`) into nblk packed bf16 blocks.
void dequant_blocks(const kernels::QuantKernels& qk, const Format& f, const uint8_t* blk,
                    const float* scales, int64_t nblk, kernels::bf16* dst);

// Dequantizes the depth pairs [kp0, kp1) (k in [2 kp0, 2 kp1)) of nblk consecutive blocks into
// nblk packed bf16 blocks of depth dst_Kp (a multiple of 32 >= 2 (kp1 - kp0); the rest is zero).
// w8a8: kp0 and kp1 should be even (whole k quads); an odd end costs one scalar-order detour.
// Each block's range is prefetched while the one before it is dequantized; fetch_after: also the
// range of the block after the last (which must exist), for a caller that goes on to it.
void dequant_range(const kernels::QuantKernels& qk, const Format& f, const uint8_t* blk,
                   const float* scales, int64_t nblk, int64_t kp0, int64_t kp1, kernels::bf16* dst,
                   int64_t dst_Kp, bool fetch_after = false);

}  // namespace kt::engine::quant
