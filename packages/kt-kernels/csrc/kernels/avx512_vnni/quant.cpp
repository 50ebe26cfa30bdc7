// AVX512_VNNI has no quantization kernels of its own: every entry comes from avx512, the ISA below
// (kernels/dispatch.cpp).
#include "kernels/quant_kernels.h"

namespace kt::kernels {

const QuantKernels* avx512_vnni_quant_table() { return nullptr; }

}  // namespace kt::kernels
