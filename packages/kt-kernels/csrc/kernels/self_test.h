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

}  // namespace kt::kernels
