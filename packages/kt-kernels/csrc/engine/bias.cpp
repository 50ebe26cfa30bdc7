// Frozen expert biases (engine/moe_engine.h, set_biases): copied to float32 in the engine's
// column orders, added after the gate_up GEMM and LoRA terms (so g, u, the cache and a
// recomputed forward include them) and to slice 0's partial of the down product. Their share of
// the routing-weight gradient, dout . b_down[e], is taken per routed row in backward.
#include <algorithm>

#include "engine/moe_engine.h"

namespace kt::engine {

void MoEEngine::set_biases(const View& gate_up, const View& gate, const View& up,
                           const View& down) {
  const std::vector<DType> fl = {DType::f32, DType::bf16};
  const bool fused = gate_up.present;
  if (fused && (gate.present || up.present)) {
    throw ValueError("set_biases: pass either gate_up=... or gate=... and up=..., not both");
  }
  if (!fused && gate.present != up.present) {
    throw ValueError("set_biases: gate=... and up=... go together (both (E, I))");
  }
  const bool has_gu = fused || gate.present;
  if (fused) {
    check(gate_up, {"gate_up", fl, {E_, 2 * I_}, "(num_experts, 2 * intermediate_size)"});
  } else if (has_gu) {
    check(gate, {"gate", fl, {E_, I_}, "(num_experts, intermediate_size)"});
    check(up, {"up", fl, {E_, I_}, "(num_experts, intermediate_size)"});
  }
  if (down.present) check(down, {"down", fl, {E_, H_}, "(num_experts, hidden_size)"});
  const int64_t E = E_, I = I_, H = H_, Ib = Ib_, Hb = Hb_;
  bias_gu_.reset(0);
  bias_d_.reset(0);
  if (has_gu) {
    // E x 2Ib in the packed column order: per 16 columns of I, gate then up (as the gu rows).
    bias_gu_.reset(static_cast<size_t>(E * 2 * Ib) * sizeof(float));
    float* b = bias_gu_.as<float>();
    std::fill(b, b + E * 2 * Ib, 0.0f);
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t i = 0; i < I; ++i) {
        const int64_t col = 32 * (i / 16) + i % 16;
        float gv, uv;
        if (fused) {
          gv = load_f(gate_up, e * gate_up.strides[0] + i * gate_up.strides[1]);
          uv = load_f(gate_up, e * gate_up.strides[0] + (I + i) * gate_up.strides[1]);
        } else {
          gv = load_f(gate, e * gate.strides[0] + i * gate.strides[1]);
          uv = load_f(up, e * up.strides[0] + i * up.strides[1]);
        }
        b[e * 2 * Ib + col] = gv;
        b[e * 2 * Ib + col + 16] = uv;
      }
    }
  }
  if (down.present) {
    bias_d_.reset(static_cast<size_t>(E * Hb) * sizeof(float));
    float* b = bias_d_.as<float>();
    std::fill(b, b + E * Hb, 0.0f);
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t h = 0; h < H; ++h)
        b[e * Hb + h] = load_f(down, e * down.strides[0] + h * down.strides[1]);
    }
  }
}

void MoEEngine::add_bias(const Buf& bias, int64_t e, int64_t ld_bias, int64_t c0, int64_t n,
                         int64_t M, float* C, int64_t ldc) {
  const float* b = bias.as<float>() + e * ld_bias + c0;
  for (int64_t m = 0; m < M; ++m) {
    float* row = C + m * ldc;
    for (int64_t c = 0; c < n; ++c) row[c] += b[c];
  }
}

void MoEEngine::down_bias_dw(int64_t e, int64_t M, const kernels::bf16* dy, int64_t ld,
                             float* dw) const {
  const float* b = bias_d_.as<float>() + e * Hb_;
  for (int64_t m = 0; m < M; ++m) {
    const kernels::bf16* row = dy + m * ld;
    float acc = 0.0f;
    for (int64_t h = 0; h < H_; ++h) acc += kernels::bf16_to_f32(row[h]) * b[h];
    dw[m] = acc;
  }
}

}  // namespace kt::engine
