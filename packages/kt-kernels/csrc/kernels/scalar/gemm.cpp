// Portable reference kernels: the definition every SIMD path is tested against. The fused int8 /
// int4 entries run the same loops with each weight value dequantized where it is read.
#include "kernels/kernels.h"
#include "kernels/weight_blocks.h"

namespace kt::kernels {
namespace {

template <class Src>
void gemm(int64_t M, int64_t nblk, int64_t Kp, const bf16* A, int64_t lda, const Src& B, float* C,
          int64_t ldc, bool accumulate) {
  for (int64_t m = 0; m < M; ++m) {
    const bf16* a = A + m * lda;
    for (int64_t b = 0; b < nblk; ++b) {
      const Src w = B.at(b);
      for (int j = 0; j < kBlockN; ++j) {
        float acc = accumulate ? C[m * ldc + b * kBlockN + j] : 0.0f;
        for (int64_t k = 0; k < Kp; ++k) acc += bf16_to_f32(a[k]) * w.value(j, k);
        C[m * ldc + b * kBlockN + j] = acc;
      }
    }
  }
}

void gemm_bf16(int64_t M, int64_t nblk, int64_t Kp, const bf16* A, int64_t lda, const bf16* B,
               float* C, int64_t ldc, bool accumulate) {
  gemm(M, nblk, Kp, A, lda, Bf16Blocks{B, kBlockN * Kp}, C, ldc, accumulate);
}

void gemm_q8(int64_t M, int64_t nblk, int64_t Kp, const bf16* A, int64_t lda, const int8_t* codes,
             const float* scales, float* C, int64_t ldc, bool accumulate) {
  gemm(M, nblk, Kp, A, lda, Q8Blocks{codes, scales, kBlockN * Kp}, C, ldc, accumulate);
}

void gemm_q4(int64_t M, int64_t nblk, int64_t Kp, int64_t group, const bf16* A, int64_t lda,
             const uint8_t* codes, const float* scales, float* C, int64_t ldc, bool accumulate) {
  const Q4Blocks src{codes, scales, kBlockN * Kp / 2, (Kp + group - 1) / group, group / 2};
  gemm(M, nblk, Kp, A, lda, src, C, ldc, accumulate);
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
    KernelTable t{};
    t.gemm_bf16 = &gemm_bf16;
    t.gemm_q8 = &gemm_q8;
    t.gemm_q4 = &gemm_q4;
    t.gemm_i8 = &gemm_i8;
    fill_scalar_helpers(&t);
    return t;
  }();
  return &table;
}

}  // namespace kt::kernels
