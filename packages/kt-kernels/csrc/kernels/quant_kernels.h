// Dequantization of weight codes (weight_dtype int8 / int4, and the int8 blocks of W8A8,
// engine/quant.h) into the packed bf16 block layout, the two steps of load-time quantization of a
// group of float weights (its max |w|, then its codes), also used for W8A8's activation rows, and
// the steps of the int8 backward's gradient rows (engine/w8a8.h), one implementation per ISA folder
// (kernels/<isa>/quant.cpp). The engine picks the table with quant_kernels(isa); entries a folder
// leaves null use the next ISA down (kernels/isa_list.h; avx512_bf16 has dequantization only, amx
// none of its own). Every implementation gives the scalar reference's bits: a product of a small
// integer (or a bf16 value) and a float32 scale is one IEEE multiply, and the bf16 rounding below
// is integer arithmetic; a code is one IEEE division w / s (quantize_mul: one product w * r)
// rounded half to even (the default rounding mode's nearbyint) and clamped, and a maximum of finite
// magnitudes is exact in any order.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/kernels.h"

namespace kt::kernels {

// For p in [0, npairs), i in [0, 32): out[32 p + i] = bf16(float(code(p, i)) * sv[i]), where code
// (p, i) is codes[32 p + i] (int8) or, for int4, the low (i even) or high (i odd) nibble of
// codes[16 p + i / 2] as a two's-complement 4-bit integer. One pair p is a run of 16 rows x 2
// depths of a packed block; sv holds each row's scale twice.
using dequant_i8_fn = void (*)(int64_t npairs, const int8_t* codes, const float* sv, bf16* out);
using dequant_i4_fn = void (*)(int64_t npairs, const uint8_t* codes, const float* sv, bf16* out);
// The same from int8 blocks of the VNNI-4 layout (kernels.h): for quad q in [0, nquads) (64 codes
// of 16 rows x 4 depths at codes + 64 q, code (n, 4q + d) at byte 64 q + 4 n + d), writes the two
// depth pairs 2q and 2q + 1 in the bf16 pair layout:
//     out[64 q + 32 h + 2 n + i] = bf16(float(codes[64 q + 4 n + 2 h + i]) * sv[2 n + i]).
using dequant_i8x4_fn = void (*)(int64_t nquads, const int8_t* codes, const float* sv, bf16* out);
// The transposed repack of W8A8 weight blocks for the backward in one pass: the bf16 blocks of
// W^T that dequantization (i8x4) followed by pack_transposed (kernels.h) would make, without the
// bf16 copy in between. Source: nsrc blocks of the VNNI-4 layout, block b at
// blk + b * i8_block_bytes(Kp) (16 rows n, depth Kp, code (n, k) at byte 64 (k / 4) + 4 n + k % 4),
// row n's scale at scales[16 b + n]. Writes nblk blocks of 16 columns (depth k = k0 + 16 ob + c,
// k0 a multiple of 16) and packed_k(16 nsrc) pair rows, block ob at dst + ob * ldd:
//     dst[ob * ldd + 32 p + 2 c + i] = bf16(float(code(n, k)) * scales[n]),  n = 2 p + i,
// with row n of block n / 16, and 0 where n >= 16 nsrc or k >= Kp. Null in tables without a
// fused form (scalar, avx2): callers then dequantize and transpose in two steps (the same bits).
using dequant_i8x4_t_fn = void (*)(int64_t nsrc, const int8_t* blk, const float* scales, int64_t Kp,
                                   int64_t k0, int64_t nblk, bf16* dst, int64_t ldd);

// Load-time quantization of one group of n floats (engine/quant.h). absmax: *amax = max |w[k]|
// (+0 for n = 0 or all zeros); returns false, *amax unspecified, if a value is Inf or NaN.
using quant_absmax_fn = bool (*)(int64_t n, const float* w, float* amax);
// quantize, for finite w and a scale s > 0: codes[k] = int8(min(qm, max(-qm, nearbyint(w[k] / s))))
// with IEEE division (not a product with 1 / s) and round half to even.
using quant_codes_fn = void (*)(int64_t n, const float* w, float s, float qm, int8_t* codes);

// Run-time quantization of gradient rows (engine/w8a8.h, backward_dtype int8).
// scale_bf16: v[k] = float(g[k]) * sw[k], one IEEE multiply.
using scale_bf16_fn = void (*)(int64_t n, const bf16* g, const float* sw, float* v);
// quantize_mul: as quantize, with a product by r in place of the division:
// codes[k] = int8(min(qm, max(-qm, nearbyint(w[k] * r)))) for finite w and r.
using quant_codes_mul_fn = void (*)(int64_t n, const float* w, float r, float qm, int8_t* codes);

struct QuantKernels {
  dequant_i8_fn i8 = nullptr;
  dequant_i4_fn i4 = nullptr;
  dequant_i8x4_fn i8x4 = nullptr;
  dequant_i8x4_t_fn i8x4_t = nullptr;  // may stay null (see dequant_i8x4_t_fn)
  quant_absmax_fn absmax = nullptr;
  quant_codes_fn quantize = nullptr;
  scale_bf16_fn scale_bf16 = nullptr;
  quant_codes_mul_fn quantize_mul = nullptr;
};

inline namespace KT_ISA_NAMESPACE {

// bf16 rounding (nearest even) of a finite float: the scalar definition SIMD paths reproduce.
inline bf16 bf16_round_finite(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<bf16>(bits >> 16);
}
inline int8_t int4_lo(uint8_t byte) {
  return static_cast<int8_t>(static_cast<int8_t>(byte << 4) >> 4);
}
inline int8_t int4_hi(uint8_t byte) { return static_cast<int8_t>(static_cast<int8_t>(byte) >> 4); }

}  // namespace KT_ISA_NAMESPACE

// Each ISA folder defines <isa>_quant_table() (kernels/<isa>/quant.cpp); null entries, or a null
// table, fall back to the next ISA down like KernelTable entries (kernels/dispatch.cpp).
#define KT_ISA_QUANT_GETTER(name, flags, features) const QuantKernels* name##_quant_table();
KT_ISA_LIST(KT_ISA_QUANT_GETTER)
#undef KT_ISA_QUANT_GETTER

// The complete table for `isa`; throws std::invalid_argument for an ISA that cannot run here.
const QuantKernels& quant_kernels(Isa isa);

}  // namespace kt::kernels
