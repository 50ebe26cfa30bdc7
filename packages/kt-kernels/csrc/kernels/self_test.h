// The self-test of a kernel table against the scalar reference, run by kernels/dispatch.cpp on
// the first use of each SIMD ISA: gemm_bf16 within the bound of a different summation order,
// gemm_i8 and the fp32 helpers bit for bit (silu_mul(_bwd) within 1e-5), the fused dequantize +
// GEMM entries bit for bit against dequantization + the table's own gemm_bf16. Sizes reach every
// tail of every kernel; writes outside C are caught.
#pragma once

#include <string>

#include "kernels/kernels.h"

namespace kt::kernels {

// Empty when `table` (a complete table: no null entry but gemm_q8 / gemm_q4) passes, else what
// failed first.
std::string run_self_test(const KernelTable& table);

// What table.silu_mul_interleaved_bf16 must equal bit for bit: the table's own silu_mul and
// cvt_f32_bf16, per 16-column gate / up pair of each row (the self-test and ctest compare them).
void silu_mul_interleaved_bf16_by_parts(const KernelTable& table, int64_t M, int64_t nq,
                                        const float* gu, int64_t ldgu, bf16* h, int64_t ldh);

}  // namespace kt::kernels
