// Test data for gemm_bf16: random bf16 matrices, packing into the VNNI block layout.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/kernels.h"

namespace kt::testing {

using kernels::bf16;

// bf16 values with full 8-bit significands over a few binades, so sums really round.
inline std::vector<bf16> random_bf16(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> mant(-1.0f, 1.0f);
  std::uniform_int_distribution<int> expo(-3, 3);
  std::vector<bf16> v(n);
  for (auto& x : v) x = kernels::f32_to_bf16(std::ldexp(mant(rng), expo(rng)));
  return v;
}

// A: M x K values in rows of stride lda (>= Kp); padding columns zero.
struct MatA {
  int64_t M, K, Kp, lda;
  std::vector<bf16> data;
};
inline MatA make_a(int64_t M, int64_t K, int64_t lda_pad, std::mt19937& rng) {
  MatA a{M, K, kernels::packed_k(K), kernels::packed_k(K) + lda_pad, {}};
  a.data.assign(static_cast<size_t>(M * a.lda + 1), 0);
  const auto vals = random_bf16(static_cast<size_t>(M * K), rng);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) a.data[m * a.lda + k] = vals[m * K + k];
  }
  return a;
}

// W: N x K (nn.Linear layout), packed.
inline std::vector<bf16> pack(const std::vector<bf16>& w, int64_t N, int64_t K) {
  const int64_t Kp = kernels::packed_k(K);
  std::vector<bf16> out(static_cast<size_t>(kernels::packed_elems(N, K)), 0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      out[(n / kernels::kBlockN) * kernels::kBlockN * Kp + (k / 2) * 32 +
          (n % kernels::kBlockN) * 2 + (k % 2)] = w[n * K + k];
    }
  }
  return out;
}

}  // namespace kt::testing
