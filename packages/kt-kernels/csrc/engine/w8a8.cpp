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
constexpr int kTmpSlot = 0;  // the thread's local scratch slot for a row of floats

}  // namespace

float quantize_row(const kernels::KernelTable& k, const kernels::QuantKernels& qk, const bf16* x,
                   int64_t K, int64_t Kp, int8_t* q, float* tmp) {
  std::memset(q + K, 0, static_cast<size_t>(Kp - K));
  k.cvt_bf16_f32(K, x, tmp);  // exact
  float amax = 0.0f;
  const bool finite = qk.absmax(K, tmp, &amax);
  if (!finite || amax == 0.0f) {
    std::memset(q, 0, static_cast<size_t>(K));
    return finite ? 0.0f : std::numeric_limits<float>::quiet_NaN();
  }
  const float s = amax / 127.0f;
  qk.quantize(K, tmp, s, 127.0f, q);  // IEEE division, round half to even, clamp
  return s;
}

void quantize_rows(const kernels::KernelTable& k, const kernels::QuantKernels& qk, int64_t n,
                   const bf16* src, int64_t lds, int64_t K, int8_t* q, int64_t ldq, float* scales,
                   int nt) {
  const int64_t tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
  runtime::parallel_for(tasks, nt, [&](int64_t task, int th) {
    float* tmp = static_cast<float*>(
        runtime::Scratch::instance().local(th, kTmpSlot, static_cast<size_t>(K) * sizeof(float)));
    const int64_t end = std::min(n, (task + 1) * kRowsPerTask);
    for (int64_t r = task * kRowsPerTask; r < end; ++r) {
      scales[r] = quantize_row(k, qk, src + r * lds, K, ldq, q + r * ldq, tmp);
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

float quantize_scaled(const kernels::QuantKernels& qk, const ScaledSpan* spans, int nspans,
                      float* tmp) {
  int64_t total = 0;
  for (int i = 0; i < nspans; ++i) {
    qk.scale_bf16(spans[i].n, spans[i].g, spans[i].sw, tmp + total);
    total += spans[i].n;
  }
  float amax = 0.0f;
  const bool finite = qk.absmax(total, tmp, &amax);
  const float s = finite ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
  const float r = 127.0f / amax;  // finite unless amax is 0 or below 127 / FLT_MAX
  total = 0;
  for (int i = 0; i < nspans; ++i) {
    const ScaledSpan& sp = spans[i];
    if (!(s > 0.0f)) {  // 0 or NaN: codes 0
      std::memset(sp.q, 0, static_cast<size_t>(sp.n));
    } else if (r <= std::numeric_limits<float>::max()) {
      qk.quantize_mul(sp.n, tmp + total, r, 127.0f, sp.q);
    } else {
      qk.quantize(sp.n, tmp + total, s, 127.0f, sp.q);
    }
    std::memset(sp.q + sp.n, 0, static_cast<size_t>(sp.padded - sp.n));
    total += sp.n;
  }
  return s;
}

}  // namespace w8a8

// ---- the int8 tile bodies of MoEEngine::run_forward ---------------------------------------------

using kernels::bf16;
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
  k_.scale_i32_f32(M, ncols, acc, ncols, sx, sl.sgu.as<float>() + gb * kBlockN, C, ldc);
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
  k_.scale_i32_f32(M, ncols, acc, ncols, sh, sl.sd.as<float>() + gb * kBlockN, C, ldc);
}

// ---- the int8 backward (backward_dtype "int8") ------------------------------------------------

int64_t MoEEngine::w8a8_dy_depth() const { return kernels::packed_k8(kBlockN * nbH_); }

MoEEngine::DguCodes MoEEngine::w8a8_dgu_layout() const {
  DguCodes lay;
  for (const auto& sl : sl_) {
    lay.seg_off.push_back(lay.ld);
    lay.depth.push_back(kernels::packed_k8(2 * kBlockN * sl->nb));
    lay.ld += lay.depth.back();
  }
  return lay;
}

void MoEEngine::w8a8_quantize_dy(int64_t e, int64_t M, const bf16* dy, int64_t ldy, int8_t* dq,
                                 float* sdq, float* tmp) const {
  // A row's down scales are the same in every slice (rows are quantized whole).
  const float* sw = sl_[0]->sd.as<float>() + e * nbH_ * kBlockN;
  const int64_t depth = w8a8_dy_depth();
  for (int64_t m = 0; m < M; ++m) {
    const w8a8::ScaledSpan sp{dy + m * ldy, sw, H_, depth, dq + m * depth};
    sdq[m] = w8a8::quantize_scaled(*qk_, &sp, 1, tmp);
  }
}

void MoEEngine::w8a8_quantize_dgu(int64_t e, int64_t M, const bf16* dgu, const DguCodes& lay,
                                  int8_t* gq, float* sgq, float* tmp) const {
  const int64_t Ib2 = 2 * Ib_;
  std::vector<w8a8::ScaledSpan> spans(sl_.size());
  for (int64_t m = 0; m < M; ++m) {
    for (size_t s = 0; s < sl_.size(); ++s) {
      const Slice& sl = *sl_[s];
      // Slice s's dGU columns [32 b0, 32 (b0 + nb)) pair with its gate_up rows in block order.
      const int64_t c0 = 2 * kBlockN * sl.b0, n = 2 * kBlockN * sl.nb;
      spans[s] = {dgu + m * Ib2 + c0, sl.sgu.as<float>() + e * 2 * sl.nb * kBlockN, n, lay.depth[s],
                  gq + m * lay.ld + lay.seg_off[s]};
    }
    sgq[m] = w8a8::quantize_scaled(*qk_, spans.data(), static_cast<int>(spans.size()), tmp);
  }
}

}  // namespace kt::engine
