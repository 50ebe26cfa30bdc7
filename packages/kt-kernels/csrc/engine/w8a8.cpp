#include "engine/w8a8.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "engine/moe_engine.h"
#include "runtime/scratch.h"
#include "runtime/thread_pool.h"

namespace kt::engine {
namespace w8a8 {

using kernels::bf16;

namespace {

constexpr int64_t kRowsPerTask = 16;

// Round half to even of |v| <= 2^22 in float32 arithmetic: adding 1.5 * 2^23 leaves no fraction
// bits, so the add rounds v to an integer (the current mode: nearest even), and the subtraction is
// exact. The same as rint(), without a library call per element.
inline float round_even(float v) {
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
}

}  // namespace

float quantize_row(const bf16* x, int64_t K, int64_t Kp, int8_t* q) {
  // max |x| on the bf16 bit patterns: magnitudes order like their sign-cleared bits, and any
  // pattern >= 0x7f80 is Inf or NaN.
  uint16_t mbits = 0;
  for (int64_t k = 0; k < K; ++k) mbits = std::max<uint16_t>(mbits, x[k] & 0x7fffu);
  for (int64_t k = K; k < Kp; ++k) q[k] = 0;
  if (mbits >= 0x7f80u || mbits == 0) {
    for (int64_t k = 0; k < K; ++k) q[k] = 0;
    return mbits == 0 ? 0.0f : std::numeric_limits<float>::quiet_NaN();
  }
  const float s = kernels::bf16_to_f32(mbits) / 127.0f;
  // |x / s| <= 127 (1 + 2^-23) for normal s (a few hundred for a subnormal one), so rounding and
  // then clamping as integers (a loop the compiler vectorizes) equals clamping first.
  for (int64_t k = 0; k < K; ++k) {
    int32_t c = static_cast<int32_t>(round_even(kernels::bf16_to_f32(x[k]) / s));
    c = c > 127 ? 127 : c;
    c = c < -127 ? -127 : c;
    q[k] = static_cast<int8_t>(c);
  }
  return s;
}

void quantize_rows(int64_t n, const bf16* src, int64_t lds, int64_t K, int8_t* q, int64_t ldq,
                   float* scales, int nt) {
  const int64_t tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
  runtime::parallel_for(tasks, nt, [&](int64_t task, int) {
    const int64_t end = std::min(n, (task + 1) * kRowsPerTask);
    for (int64_t r = task * kRowsPerTask; r < end; ++r) {
      scales[r] = quantize_row(src + r * lds, K, ldq, q + r * ldq);
    }
  });
}

void gather_rows(int64_t n, const int32_t* rows, const int8_t* src, const float* ssrc, int64_t ld,
                 int8_t* dst, float* sdst, int nt) {
  const int64_t per_task = 4 * kRowsPerTask;
  const int64_t tasks = (n + per_task - 1) / per_task;
  runtime::parallel_for(tasks, nt, [&](int64_t task, int) {
    const int64_t end = std::min(n, (task + 1) * per_task);
    for (int64_t p = task * per_task; p < end; ++p) {
      std::memcpy(dst + p * ld, src + rows[p] * ld, static_cast<size_t>(ld));
      sdst[p] = ssrc[rows[p]];
    }
  });
}

void apply_scales(int64_t M, int64_t N, const int32_t* acc, int64_t ldacc, const float* sa,
                  const float* sw, float* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    const int32_t* a = acc + m * ldacc;
    const float s = sa[m];
    float* c = C + m * ldc;
    for (int64_t j = 0; j < N; ++j) c[j] = (static_cast<float>(a[j]) * s) * sw[j];
  }
}

}  // namespace w8a8

// ---- the int8 tile bodies of MoEEngine::run_forward ---------------------------------------------

using kernels::kBlockN;

int64_t MoEEngine::w8a8_h_stride() const {
  // Slice s reads h codes [16 b0, 16 b0 + KpI) (its depth padded to 64; the padding meets zero
  // weights), so rows are as wide as the widest such end.
  int64_t end = 0;
  for (const auto& sl : sl_) end = std::max(end, kBlockN * sl->b0 + sl->KpI);
  return kernels::round_up(end, kernels::kPackK8);
}

void MoEEngine::w8a8_gate_up_tile(int64_t e, int64_t p0, int64_t np, int64_t M, const int8_t* xq,
                                  int64_t ldq, const float* sx, float* C, int64_t ldc, int th,
                                  int slot) const {
  const Slice& sl = *sl_[static_cast<size_t>(slice_of(p0))];
  const int64_t gb = e * 2 * sl.nb + 2 * (p0 - sl.b0);  // gate block p0, then up block p0, ...
  const int64_t ncols = 2 * kBlockN * np;
  int32_t* acc = static_cast<int32_t*>(runtime::Scratch::instance().local(
      th, slot, static_cast<size_t>(M * ncols) * sizeof(int32_t)));
  k_.gemm_i8(M, 2 * np, fgu_.Kp, xq, ldq, sl.wgu.as<int8_t>() + gb * quant::block_bytes(fgu_), acc,
             ncols, false);
  w8a8::apply_scales(M, ncols, acc, ncols, sx, sl.sgu.as<float>() + gb * kBlockN, C, ldc);
}

void MoEEngine::w8a8_down_tile(int s, int64_t e, int64_t b0, int64_t nb, int64_t M,
                               const int8_t* hq, int64_t ldq, const float* sh, float* C,
                               int64_t ldc, int th, int slot) const {
  const int64_t ncols = kBlockN * nb;
  int32_t* acc = static_cast<int32_t*>(runtime::Scratch::instance().local(
      th, slot, static_cast<size_t>(M * ncols) * sizeof(int32_t)));
  const int64_t gb = e * nbH_ + b0;
  const Slice& sl = *sl_[static_cast<size_t>(s)];
  k_.gemm_i8(M, nb, sl.KpI, hq + kBlockN * sl.b0, ldq,
             sl.wd.as<int8_t>() + gb * quant::block_bytes(sl.fd), acc, ncols, false);
  // A row's scale is the same in every slice (rows are quantized whole).
  w8a8::apply_scales(M, ncols, acc, ncols, sh, sl.sd.as<float>() + gb * kBlockN, C, ldc);
}

}  // namespace kt::engine
