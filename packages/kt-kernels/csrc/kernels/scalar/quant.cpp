// Portable dequantization: the reference of kernels/quant_kernels.h.
#include "kernels/quant_kernels.h"

namespace kt::kernels {
namespace {

void dequant_i8(int64_t npairs, const int8_t* codes, const float* sv, bf16* out) {
  for (int64_t p = 0; p < npairs; ++p) {
    for (int i = 0; i < 32; ++i) {
      out[32 * p + i] = bf16_round_finite(static_cast<float>(codes[32 * p + i]) * sv[i]);
    }
  }
}

void dequant_i4(int64_t npairs, const uint8_t* codes, const float* sv, bf16* out) {
  for (int64_t p = 0; p < npairs; ++p) {
    for (int i = 0; i < 16; ++i) {
      const uint8_t c = codes[16 * p + i];
      out[32 * p + 2 * i] = bf16_round_finite(static_cast<float>(int4_lo(c)) * sv[2 * i]);
      out[32 * p + 2 * i + 1] = bf16_round_finite(static_cast<float>(int4_hi(c)) * sv[2 * i + 1]);
    }
  }
}

}  // namespace

const QuantKernels* scalar_quant_table() {
  static const QuantKernels t{&dequant_i8, &dequant_i4};
  return &t;
}

}  // namespace kt::kernels
