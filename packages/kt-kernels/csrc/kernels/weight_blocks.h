// Where a gemm kernel's B operand (the weight) comes from: packed bf16 blocks (kernels.h), or int8
// / int4 code blocks with their scales (engine/quant.h) that the kernel dequantizes itself. The
// gemm loops (tile_driver.h and each ISA's micro-tile) are written once over these descriptors;
// each ISA turns a descriptor into register operands its own way, and the scalar reference and the
// AMX staging use the per-element accessors below. Included only by kernels/<isa>/*.cpp; everything
// here has internal linkage.
//
// A descriptor covers consecutive blocks from its first one; at(n) moves it n blocks on. Scales
// come in groups along K: group g covers the pair rows [g * group_pairs, (g + 1) * group_pairs) of
// every block (bf16 and int8: one group, all of K).
#pragma once

#ifndef KT_CPU_CAPABILITY
#error "weight_blocks.h belongs to the per-ISA kernel files only"
#endif

#include <cstdint>

#include "kernels/kernels.h"
#include "kernels/quant_kernels.h"

namespace kt::kernels {
namespace {

struct Bf16Blocks {
  const bf16* p;
  int64_t block;  // bf16 elements per block (16 Kp)
  Bf16Blocks at(int64_t n) const { return {p + n * block, block}; }
  int64_t group_pairs(int64_t pairs) const { return pairs; }
  float value(int j, int64_t k) const { return bf16_to_f32(p[(k / 2) * 32 + j * 2 + (k % 2)]); }
};

struct Q8Blocks {
  const int8_t* codes;
  const float* scales;  // one per row
  int64_t block;        // bytes per block (16 Kp)
  Q8Blocks at(int64_t n) const { return {codes + n * block, scales + n * kBlockN, block}; }
  int64_t group_pairs(int64_t pairs) const { return pairs; }
  // Scale of row j in group g, and the distance between the scales of consecutive rows.
  float scale(int j, int64_t /*g*/) const { return scales[j]; }
  const float* group_scales(int64_t /*g*/) const { return scales; }
  int64_t row_stride() const { return 1; }
  int8_t code(int64_t i) const { return codes[i]; }  // code number i of the first block
  // Row j, depth k, dequantized exactly as quant_kernels.h does.
  float value(int j, int64_t k) const {
    return bf16_to_f32(
        bf16_round_finite(static_cast<float>(code((k / 2) * 32 + j * 2 + (k % 2))) * scale(j, 0)));
  }
};

struct Q4Blocks {
  const uint8_t* codes;  // two per byte, code i in the low (i even) or high nibble of byte i / 2
  const float* scales;   // ngroups per row, row-major
  int64_t block;         // bytes per block (8 Kp)
  int64_t ngroups;
  int64_t gpairs;  // pair rows per group (group / 2)
  Q4Blocks at(int64_t n) const {
    return {codes + n * block, scales + n * kBlockN * ngroups, block, ngroups, gpairs};
  }
  int64_t group_pairs(int64_t /*pairs*/) const { return gpairs; }
  float scale(int j, int64_t g) const { return scales[j * ngroups + g]; }
  const float* group_scales(int64_t g) const { return scales + g; }
  int64_t row_stride() const { return ngroups; }
  int8_t code(int64_t i) const {
    const uint8_t byte = codes[i / 2];
    return (i % 2) ? int4_hi(byte) : int4_lo(byte);
  }
  float value(int j, int64_t k) const {
    return bf16_to_f32(bf16_round_finite(static_cast<float>(code((k / 2) * 32 + j * 2 + (k % 2))) *
                                         scale(j, (k / 2) / gpairs)));
  }
};

// Pair rows [kp0, kp0 + npairs) of the first block as packed bf16 (32 values per pair row), all in
// scale group g: the B tile an AMX kernel loads. The bf16 source needs no copy.
template <class Src>
void stage_pairs(const Src& b, int64_t g, int64_t kp0, int64_t npairs, bf16* out) {
  float sv[32];
  for (int i = 0; i < 32; ++i) sv[i] = b.scale(i / 2, g);
  for (int64_t p = 0; p < npairs; ++p) {
    for (int i = 0; i < 32; ++i) {
      out[32 * p + i] = bf16_round_finite(static_cast<float>(b.code(32 * (kp0 + p) + i)) * sv[i]);
    }
  }
}

}  // namespace
}  // namespace kt::kernels
