// AMX adds no quantization kernels of its own: every QuantKernels entry falls back to the ISA
// below (kernels/dispatch.cpp).
#include "kernels/quant_kernels.h"

namespace kt::kernels {

const QuantKernels* amx_quant_table() { return nullptr; }

}  // namespace kt::kernels
