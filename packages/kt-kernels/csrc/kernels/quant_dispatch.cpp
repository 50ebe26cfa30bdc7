// quant_kernels(isa): the dequantization table for an ISA (baseline flags; names no intrinsics).
#include "kernels/quant_kernels.h"

namespace kt::kernels {

const QuantKernels& quant_kernels(Isa isa) {
  const int level = static_cast<int>(isa);
#ifdef KT_KERNELS_HAVE_AVX512
  if (level >= static_cast<int>(Isa::avx512)) return *avx512_quant_table();
#endif
#ifdef KT_KERNELS_HAVE_AVX2
  if (level >= static_cast<int>(Isa::avx2)) return *avx2_quant_table();
#endif
  (void)level;
  return *scalar_quant_table();
}

}  // namespace kt::kernels
