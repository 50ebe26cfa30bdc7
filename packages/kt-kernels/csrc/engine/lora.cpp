// LoRA: binding the caller's arrays (checked against the layout), and their fp32 kernel-layout
// copy in the process-wide LoRA stage (engine/lora_stage.h), converted when the values changed.
#include <cstring>
#include <string>
#include <vector>

#include "engine/engine_internal.h"
#include "engine/lora_stage.h"
#include "engine/moe_engine.h"
#include "runtime/thread_pool.h"

namespace kt::engine {

using namespace detail;
using runtime::parallel_for;

void MoEEngine::set_lora(const LoraArrays& a) {
  if (r_ == 0) {
    throw StateError(
        "set_lora: this engine has lora_rank=0 (no LoRA); create it with "
        "lora_rank > 0 to bind LoRA weights");
  }
  const std::vector<DType> fl = {DType::f32, DType::bf16};
  const std::vector<DType> f32 = {DType::f32};
  const bool fused = cfg_.lora_fused;
  auto forbid = [&](const View& v, const char* name) {
    if (v.present) {
      throw ValueError(std::string("set_lora: ") + name + " is for lora_layout='" +
                       (fused ? "split" : "fused") + "', but this engine uses lora_layout='" +
                       (fused ? "fused" : "split") + "'");
    }
  };
  const char* rh = "(num_experts, lora_rank, hidden_size)";
  const char* ri = "(num_experts, lora_rank, intermediate_size)";
  const char* ir = "(num_experts, intermediate_size, lora_rank)";
  const char* i2r = "(num_experts, 2 * intermediate_size, lora_rank)";
  const char* hr = "(num_experts, hidden_size, lora_rank)";
  // Gradients: all or none.
  const View* grads_fused[] = {&a.ga_gu, &a.gb_gu, &a.ga_d, &a.gb_d};
  const View* grads_split[] = {&a.ga_g, &a.ga_u, &a.gb_g, &a.gb_u, &a.ga_d, &a.gb_d};
  int given = 0, total = 0;
  if (fused) {
    for (const View* g : grads_fused) given += g->present, ++total;
  } else {
    for (const View* g : grads_split) given += g->present, ++total;
  }
  if (given != 0 && given != total) {
    throw ValueError(fused ? "set_lora: pass all of grad_a_gate_up, grad_b_gate_up, grad_a_down, "
                             "grad_b_down, or none of them"
                           : "set_lora: pass all of grad_a_gate, grad_a_up, grad_b_gate, "
                             "grad_b_up, grad_a_down, grad_b_down, or none of them");
  }
  const bool grads = given == total;
  if (fused) {
    forbid(a.a_g, "a_gate");
    forbid(a.a_u, "a_up");
    forbid(a.b_g, "b_gate");
    forbid(a.b_u, "b_up");
    forbid(a.ga_g, "grad_a_gate");
    forbid(a.ga_u, "grad_a_up");
    forbid(a.gb_g, "grad_b_gate");
    forbid(a.gb_u, "grad_b_up");
    check(a.a_gu, {"a_gate_up", fl, {E_, r_, H_}, rh});
    check(a.b_gu, {"b_gate_up", fl, {E_, 2 * I_, r_}, i2r});
    if (grads) {
      check(a.ga_gu, {"grad_a_gate_up", f32, {E_, r_, H_}, rh, true});
      check(a.gb_gu, {"grad_b_gate_up", f32, {E_, 2 * I_, r_}, i2r, true});
    }
  } else {
    forbid(a.a_gu, "a_gate_up");
    forbid(a.b_gu, "b_gate_up");
    forbid(a.ga_gu, "grad_a_gate_up");
    forbid(a.gb_gu, "grad_b_gate_up");
    check(a.a_g, {"a_gate", fl, {E_, r_, H_}, rh});
    check(a.a_u, {"a_up", fl, {E_, r_, H_}, rh});
    check(a.b_g, {"b_gate", fl, {E_, I_, r_}, ir});
    check(a.b_u, {"b_up", fl, {E_, I_, r_}, ir});
    if (grads) {
      check(a.ga_g, {"grad_a_gate", f32, {E_, r_, H_}, rh, true});
      check(a.ga_u, {"grad_a_up", f32, {E_, r_, H_}, rh, true});
      check(a.gb_g, {"grad_b_gate", f32, {E_, I_, r_}, ir, true});
      check(a.gb_u, {"grad_b_up", f32, {E_, I_, r_}, ir, true});
    }
  }
  check(a.a_d, {"a_down", fl, {E_, r_, I_}, ri});
  check(a.b_d, {"b_down", fl, {E_, H_, r_}, hr});
  if (grads) {
    check(a.ga_d, {"grad_a_down", f32, {E_, r_, I_}, ri, true});
    check(a.gb_d, {"grad_b_down", f32, {E_, H_, r_}, hr, true});
  }
  lora_ = a;
  lora_grads_ = grads;
  lora_bound_ = true;
  lora_updated();
}

void MoEEngine::lora_updated() {
  if (!lora_bound_)
    throw StateError("lora_updated: no LoRA weights are bound; call set_lora first");
  std::lock_guard<std::mutex> lock(engine_mutex());
  lora_version_ = LoraStage::new_version();
}

void MoEEngine::stage_lora() {
  const int64_t RA = RA_;
  const int64_t n_a = E_ * RA * Hb_, n_bgu = E_ * RA * 2 * Ib_, n_ad = E_ * r_ * Ib_;
  const int64_t n_bd = E_ * r_ * Hb_;
  LoraStage& stage = LoraStage::instance();
  bool fresh = false;
  float* base =
      stage.acquire(id_, lora_version_, static_cast<size_t>(n_a + n_bgu + n_ad + n_bd), &fresh);
  a_all_ = base;
  bgu_t_ = base + n_a;
  ad_ = base + n_a + n_bgu;
  bd_t_ = base + n_a + n_bgu + n_ad;
  if (!fresh) {
    convert_lora(base, base + n_a, base + n_a + n_bgu, base + n_a + n_bgu + n_ad);
    stage.mark(id_, lora_version_);
  }
}

void MoEEngine::convert_lora(float* a_all, float* bgu_t, float* ad, float* bd_t) const {
  const int64_t r = r_, RA = RA_;
  const bool fused = cfg_.lora_fused;
  const LoraArrays& L = lora_;
  auto at3 = [](const View& v, int64_t i, int64_t j, int64_t k) {
    return load_f(v, i * v.strides[0] + j * v.strides[1] + k * v.strides[2]);
  };
  parallel_for(E_, threads_, [&](int64_t e, int) {
    float* A = a_all + e * RA * Hb_;
    float* Bt = bgu_t + e * RA * 2 * Ib_;
    float* Ad = ad + e * r * Ib_;
    float* Bdt = bd_t + e * r * Hb_;
    std::memset(A, 0, static_cast<size_t>(RA * Hb_) * sizeof(float));
    std::memset(Bt, 0, static_cast<size_t>(RA * 2 * Ib_) * sizeof(float));
    std::memset(Ad, 0, static_cast<size_t>(r * Ib_) * sizeof(float));
    std::memset(Bdt, 0, static_cast<size_t>(r * Hb_) * sizeof(float));
    for (int64_t q = 0; q < r; ++q) {
      for (int64_t h = 0; h < H_; ++h) {
        if (fused) {
          A[q * Hb_ + h] = at3(L.a_gu, e, q, h);
        } else {
          A[q * Hb_ + h] = at3(L.a_g, e, q, h);
          A[(r + q) * Hb_ + h] = at3(L.a_u, e, q, h);
        }
      }
      for (int64_t i = 0; i < I_; ++i) Ad[q * Ib_ + i] = at3(L.a_d, e, q, i);
      for (int64_t h = 0; h < H_; ++h) Bdt[q * Hb_ + h] = at3(L.b_d, e, h, q);
    }
    const int64_t ld = 2 * Ib_;
    for (int64_t o = 0; o < I_; ++o) {
      const int64_t cg = 32 * (o / 16) + o % 16;  // column of gate row o; up row o is at cg + 16
      for (int64_t q = 0; q < r; ++q) {
        if (fused) {
          Bt[q * ld + cg] = at3(L.b_gu, e, o, q);
          Bt[q * ld + cg + 16] = at3(L.b_gu, e, I_ + o, q);
        } else {
          Bt[q * ld + cg] = at3(L.b_g, e, o, q);
          Bt[(r + q) * ld + cg + 16] = at3(L.b_u, e, o, q);
        }
      }
    }
  });
}

void MoEEngine::check_lora_ready(const char* what) const {
  if (r_ > 0 && !lora_bound_) {
    throw StateError(
        std::string(what) + ": LoRA weights are not set (lora_rank=" + std::to_string(r_) +
        "); call set_lora(...) first, or create the engine " + "with lora_rank=0 for no LoRA");
  }
}

}  // namespace kt::engine
