// W8A8 forward (weight_dtype "int8" with activation_dtype "int8"): the activations entering the two
// base GEMMs are quantized to int8 per row, the GEMMs run int8 x int8 -> int32 (gemm_i8, exact),
// and a float epilogue applies both scales. The weights are stored as int8 blocks of the VNNI-4
// layout (engine/quant.h, Kind::w8a8).
//
// Math per expert (x rows already rounded to bf16, as on the bf16 path):
//   sx = max|x_row| / 127, qx = round_half_even(x / sx) clamped to [-127, 127] (float32 ops; a
//   row of zeros has sx = 0 and codes 0; a row with NaN or Inf has sx = NaN and codes 0, so its
//   outputs are NaN)
//   acc = qx . qW^T in int32 (exact)
//   g | u = (float(acc) * sx) * sw, evaluated left to right in float32, then + the LoRA term in
//   float32 from bf16 x exactly as the bf16 path
//   h = silu(g) * u rounded to bf16 as on the bf16 path, then quantized the same way per row over
//   the whole intermediate width I (one scale per row, whatever the tensor-parallel split)
//   y = (float(acc_h) * sh) * sw_down + the LoRA term from bf16 h.
// With tp slices, the h scale is still one per row over all of I, and a row's down weight scale
// is the same in every slice (rows are quantized whole). Each slice's int32 partial product over
// its columns of I is scaled on its own, on that slice's worker group, and the float partials are
// added per token in slice order like the bf16 path: results match tp = 1 to float32 rounding and
// do not depend on the thread count.
//
// Backward is straight-through: the gradients are those of the weight-only int8 path (weights
// dequantized to bf16(code * scale)), evaluated on the activations this forward cached ([g | u],
// bf16 x, x A^T, h Ad^T). Quantizing the activations is treated as the identity.
//
// backward_dtype "int8" also runs backward's two base products (dh = dY Wd and dx = dGU Wgu) as
// int8 x int8 GEMMs, on the weights' own codes. A weight is W = diag(sw) Q (one scale per output
// channel, i.e. per row of the depth these products sum over), so g W = (g * sw) Q: per routed
// row (the scales belong to its expert)
//   v = float(g) * sw, elementwise in float32 (g: the bf16 dY row, or the bf16 [dg | du] row over
//   every slice's columns)
//   sv = max|v| / 127 and qv = round_half_even(v * (127 / max|v|)) clamped to [-127, 127]: a
//   product where x above divides by its scale (a division per element costs as much as the rest
//   of the row's quantization); where 127 / max|v| overflows (max|v| < 127 / FLT_MAX), v / sv.
//   A zero row has sv = 0 and codes 0; a row with NaN or Inf has sv = NaN and codes 0.
//   product = float(qv . Q in int32) * sv.
// The gradient rows meet the codes of Q^T, repacked tile by tile (kernels.h, pack_transposed_i8)
// as the bf16 path repacks its dequantized copy. The LoRA terms, dw and the LoRA gradients are
// those of the bf16 backward on the same values.
#pragma once

#include <cstdint>

#include "kernels/kernels.h"
#include "kernels/quant_kernels.h"

namespace kt::engine::w8a8 {

// Largest K the int32 accumulation allows: |sum of K products of codes in [-127, 127]| must stay
// below 2^31 (131072 * 127 * 128 < 2^31, which also covers -128 in pre-quantized weight codes).
constexpr int64_t kMaxDepth = 131072;

// Quantizes K bf16 values to codes q[0, K) and zeros q[K, Kp); returns the row's scale (see the
// math above). With the ISA's kernels (the same bits on every ISA); tmp holds K floats.
float quantize_row(const kernels::KernelTable& k, const kernels::QuantKernels& qk,
                   const kernels::bf16* x, int64_t K, int64_t Kp, int8_t* q, float* tmp);

// quantize_row for rows [0, n): src rows of stride lds, codes of stride ldq, scales[n]. Parallel on
// the process pool (each thread's row of floats in its local scratch slot 0); results do not
// depend on the thread count.
void quantize_rows(const kernels::KernelTable& k, const kernels::QuantKernels& qk, int64_t n,
                   const kernels::bf16* src, int64_t lds, int64_t K, int8_t* q, int64_t ldq,
                   float* scales, int nt);

// dst row p = src row rows[p] (codes of stride ld, and its scale), p in [0, n). Parallel.
void gather_rows(int64_t n, const int32_t* rows, const int8_t* src, const float* ssrc, int64_t ld,
                 int8_t* dst, float* sdst, int nt);

// One run of a gradient row for quantize_scaled: v = float(g[k]) * sw[k] for k < n, codes into
// q[0, n) and zeros into q[n, padded).
struct ScaledSpan {
  const kernels::bf16* g;
  const float* sw;
  int64_t n, padded;
  int8_t* q;
};

// Quantizes the spans of one row with one scale over all of them (the math above); returns it.
// tmp holds the sum of the spans' n floats.
float quantize_scaled(const kernels::QuantKernels& qk, const ScaledSpan* spans, int nspans,
                      float* tmp);

}  // namespace kt::engine::w8a8
