// The expert activation h = act(g, u) of the gate/up outputs, and its backward. The default
// (SiLU, no clamp, no offset) is the ISA kernel pair silu_mul / silu_mul_bwd of kernels.h; every
// other variant is the portable code of activation.cpp. The variant is resolved once, when the
// engine is built: the hot loops call forward() / backward() per tile, never branch per element.
//
//   gc = min(g, limit), uc = clamp(u, -limit, limit)   (limit = +inf: no clamp)
//   h  = f(gc) * (cap_u(uc) + up_offset)
//   f  = silu    cap_g(g) * sigmoid(alpha g)              (alpha = 1, no cap: SiLU)
//        gelu    g / 2 * (1 + erf(g / sqrt 2))
//        gelu_tanh  g / 2 * (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3)))
//        relu2   max(g, 0)^2
//   cap_c(x) = c tanh(x / c), the soft-cap (c = +inf: x itself; silu only)
// Backward (torch's conventions): dg = dh * (cap_u(uc) + up_offset) * f'(gc) where g <= limit,
// else 0; du = dh * f(gc) * cap_u'(uc) where -limit <= u <= limit, else 0 (the gradient passes
// at the boundary, as torch.clamp's does).
#pragma once

#include <cstdint>
#include <limits>
#include <string>

#include "kernels/kernels.h"

namespace kt::engine::activation {

enum class Kind { silu, gelu, gelu_tanh, relu2 };

struct Spec {
  Kind kind = Kind::silu;
  float alpha = 1.0f;
  float limit = std::numeric_limits<float>::infinity();
  float up_offset = 0.0f;
  float gate_cap = std::numeric_limits<float>::infinity();  // soft-caps (+inf: none)
  float up_cap = std::numeric_limits<float>::infinity();
  bool capped() const {
    return gate_cap != std::numeric_limits<float>::infinity() ||
           up_cap != std::numeric_limits<float>::infinity();
  }
  // SiLU without clamp, offset or caps: the ISA kernels' silu_mul pair.
  bool is_default() const {
    return kind == Kind::silu && alpha == 1.0f && limit == std::numeric_limits<float>::infinity() &&
           up_offset == 0.0f && !capped();
  }
};

// Parses and checks the engine options (ValueError naming the option). limit or a cap <= 0 or
// NaN and a non-finite alpha or up_offset are refused; alpha != 1 and caps only with "silu".
Spec parse(const std::string& name, double alpha, double limit, double up_offset,
           double gate_cap = std::numeric_limits<double>::infinity(),
           double up_cap = std::numeric_limits<double>::infinity());
// The canonical name of a kind ("silu", "gelu", "gelu_tanh", "relu2").
const char* name(Kind kind);

// Portable variant code (every Spec; the default too, for tests of the generic path).
void forward_generic(const Spec& a, int64_t n, const float* g, const float* u, float* h);
void backward_generic(const Spec& a, int64_t n, const float* g, const float* u, const float* dh,
                      float* dg, float* du);

// h = act(g, u) for n elements (h may alias g).
inline void forward(const Spec& a, bool use_kernels, const kernels::KernelTable& k, int64_t n,
                    const float* g, const float* u, float* h) {
  if (use_kernels) {
    k.silu_mul(n, g, u, h);
  } else {
    forward_generic(a, n, g, u, h);
  }
}

// dg, du of dh for n elements.
inline void backward(const Spec& a, bool use_kernels, const kernels::KernelTable& k, int64_t n,
                     const float* g, const float* u, const float* dh, float* dg, float* du) {
  if (use_kernels) {
    k.silu_mul_bwd(n, g, u, dh, dg, du);
  } else {
    backward_generic(a, n, g, u, dh, dg, du);
  }
}

}  // namespace kt::engine::activation
