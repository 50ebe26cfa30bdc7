// Portable dequantization and quantization: the reference of kernels/quant_kernels.h.
#include "kernels/quant_kernels.h"

#include <algorithm>
#include <cmath>

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

void dequant_i8x4(int64_t nquads, const int8_t* codes, const float* sv, bf16* out) {
  for (int64_t q = 0; q < nquads; ++q) {
    for (int h = 0; h < 2; ++h) {
      for (int n = 0; n < 16; ++n) {
        for (int i = 0; i < 2; ++i) {
          const int8_t c = codes[64 * q + 4 * n + 2 * h + i];
          out[64 * q + 32 * h + 2 * n + i] =
              bf16_round_finite(static_cast<float>(c) * sv[2 * n + i]);
        }
      }
    }
  }
}

bool absmax(int64_t n, const float* w, float* amax) {
  float m = 0.0f;
  for (int64_t k = 0; k < n; ++k) {
    if (!std::isfinite(w[k])) return false;
    m = std::max(m, std::fabs(w[k]));
  }
  *amax = m;
  return true;
}

void quantize(int64_t n, const float* w, float s, float qm, int8_t* codes) {
  for (int64_t k = 0; k < n; ++k) {
    const float q = std::nearbyint(w[k] / s);
    codes[k] = static_cast<int8_t>(std::min(qm, std::max(-qm, q)));
  }
}

void scale_bf16(int64_t n, const bf16* g, const float* sw, float* v) {
  for (int64_t k = 0; k < n; ++k) v[k] = bf16_to_f32(g[k]) * sw[k];
}

void quantize_mul(int64_t n, const float* w, float r, float qm, int8_t* codes) {
  for (int64_t k = 0; k < n; ++k) {
    const float q = std::nearbyint(w[k] * r);
    codes[k] = static_cast<int8_t>(std::min(qm, std::max(-qm, q)));
  }
}

}  // namespace

constexpr QuantKernels kQuantTable = [] {
  QuantKernels t{};
  t.i8 = &dequant_i8;
  t.i4 = &dequant_i4;
  t.i8x4 = &dequant_i8x4;
  t.absmax = &absmax;
  t.quantize = &quantize;
  t.scale_bf16 = &scale_bf16;
  t.quantize_mul = &quantize_mul;
  return t;
}();

const QuantKernels* scalar_quant_table() { return &kQuantTable; }

}  // namespace kt::kernels
