// Portable reference kernels: the definition every SIMD path is tested against.
#include "kernels/kernels.h"

namespace kt::kernels {
namespace {

void gemm_bf16(int64_t M, int64_t nblk, int64_t Kp, const bf16* A, int64_t lda, const bf16* B,
               float* C, int64_t ldc, bool accumulate) {
  const int64_t block = kBlockN * Kp;
  for (int64_t m = 0; m < M; ++m) {
    const bf16* a = A + m * lda;
    for (int64_t b = 0; b < nblk; ++b) {
      const bf16* w = B + b * block;
      for (int64_t j = 0; j < kBlockN; ++j) {
        float acc = accumulate ? C[m * ldc + b * kBlockN + j] : 0.0f;
        for (int64_t k = 0; k < Kp; ++k) {
          acc += bf16_to_f32(a[k]) * bf16_to_f32(w[(k / 2) * 32 + j * 2 + (k % 2)]);
        }
        C[m * ldc + b * kBlockN + j] = acc;
      }
    }
  }
}

// Products summed in uint32: wrap-around (modulo 2^32) is defined there, and is what the SIMD
// and AMX integer instructions do.
void gemm_i8(int64_t M, int64_t nblk, int64_t Kp, const int8_t* A, int64_t lda, const int8_t* B,
             int32_t* C, int64_t ldc, bool accumulate) {
  const int64_t block = i8_block_bytes(Kp);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* a = A + m * lda;
    for (int64_t b = 0; b < nblk; ++b) {
      const int8_t* w = B + b * block;
      for (int64_t j = 0; j < kBlockN; ++j) {
        int32_t* c = C + m * ldc + b * kBlockN + j;
        uint32_t acc = accumulate ? static_cast<uint32_t>(*c) : 0u;
        for (int64_t k = 0; k < Kp; ++k) {
          acc += static_cast<uint32_t>(static_cast<int32_t>(a[k]) * w[i8_offset(j, k)]);
        }
        *c = static_cast<int32_t>(acc);
      }
    }
  }
}

}  // namespace

const KernelTable* scalar_table() {
  static const KernelTable table = [] {
    KernelTable t{Isa::scalar, &gemm_bf16};
    fill_scalar_helpers(&t);
    t.gemm_i8 = &gemm_i8;
    return t;
  }();
  return &table;
}

}  // namespace kt::kernels
