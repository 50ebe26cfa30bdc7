// quant_kernels(isa): the dequantization table for an ISA (baseline flags; names no intrinsics).
#include "kernels/quant_kernels.h"

namespace kt::kernels {
namespace {

// The best folder table at or below `level`, with the entries it leaves null taken from the
// tables below it.
QuantKernels complete_quant_table(int level) {
  QuantKernels t{};
  auto fill = [&t](const QuantKernels& from) {
    if (t.i8 == nullptr) t.i8 = from.i8;
    if (t.i4 == nullptr) t.i4 = from.i4;
    if (t.i8x4 == nullptr) t.i8x4 = from.i8x4;
    if (t.absmax == nullptr) t.absmax = from.absmax;
    if (t.quantize == nullptr) t.quantize = from.quantize;
  };
#ifdef KT_KERNELS_HAVE_AVX512_BF16
  if (level >= static_cast<int>(Isa::avx512_bf16)) fill(*avx512_bf16_quant_table());
#endif
#ifdef KT_KERNELS_HAVE_AVX512
  if (level >= static_cast<int>(Isa::avx512)) fill(*avx512_quant_table());
#endif
#ifdef KT_KERNELS_HAVE_AVX2
  if (level >= static_cast<int>(Isa::avx2)) fill(*avx2_quant_table());
#endif
  (void)level;
  fill(*scalar_quant_table());
  return t;
}

}  // namespace

const QuantKernels& quant_kernels(Isa isa) {
  static const QuantKernels tables[kIsaCount] = {complete_quant_table(0), complete_quant_table(1),
                                                 complete_quant_table(2), complete_quant_table(3),
                                                 complete_quant_table(4)};
  const int level = static_cast<int>(isa);
  return tables[level >= 0 && level < kIsaCount ? level : 0];
}

}  // namespace kt::kernels
