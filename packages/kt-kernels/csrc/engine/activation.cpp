#include "engine/activation.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "engine/tensor.h"

namespace kt::engine::activation {

namespace {

constexpr float kSqrt1_2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kSqrt2_Pi = 0.79788456080286535588f;
constexpr float kTanhCube = 0.044715f;

// f(g) and f'(g) of each kind, inlined into one loop per kind.
template <Kind K>
inline float act(float g, float alpha) {
  if constexpr (K == Kind::silu) {
    return g / (1.0f + std::exp(-alpha * g));
  } else if constexpr (K == Kind::gelu) {
    return 0.5f * g * (1.0f + std::erf(g * kSqrt1_2));
  } else if constexpr (K == Kind::gelu_tanh) {
    return 0.5f * g * (1.0f + std::tanh(kSqrt2_Pi * (g + kTanhCube * g * g * g)));
  } else {
    const float r = g > 0.0f ? g : 0.0f;
    return r * r;
  }
}

template <Kind K>
inline void act_grad(float g, float alpha, float& f, float& df) {
  if constexpr (K == Kind::silu) {
    const float sig = 1.0f / (1.0f + std::exp(-alpha * g));
    f = g * sig;
    df = sig * (1.0f + alpha * g * (1.0f - sig));
  } else if constexpr (K == Kind::gelu) {
    const float cdf = 0.5f * (1.0f + std::erf(g * kSqrt1_2));
    f = g * cdf;
    df = cdf + g * kInvSqrt2Pi * std::exp(-0.5f * g * g);
  } else if constexpr (K == Kind::gelu_tanh) {
    const float t = std::tanh(kSqrt2_Pi * (g + kTanhCube * g * g * g));
    f = 0.5f * g * (1.0f + t);
    df = 0.5f * (1.0f + t) +
         0.5f * g * (1.0f - t * t) * kSqrt2_Pi * (1.0f + 3.0f * kTanhCube * g * g);
  } else {
    const float r = g > 0.0f ? g : 0.0f;
    f = r * r;
    df = 2.0f * r;
  }
}

// c tanh(x / c) and its derivative 1 - tanh^2 (c = +inf: x and 1).
inline float cap(float x, float c) { return std::isinf(c) ? x : c * std::tanh(x / c); }
inline float cap_grad(float x, float c, float& d) {
  if (std::isinf(c)) {
    d = 1.0f;
    return x;
  }
  const float t = std::tanh(x / c);
  d = 1.0f - t * t;
  return c * t;
}

// Soft-capped SiLU: cap_g(g) * sigmoid(alpha g), and its derivative.
inline float capped_silu(float g, float alpha, float c) {
  return cap(g, c) / (1.0f + std::exp(-alpha * g));
}
inline void capped_silu_grad(float g, float alpha, float c, float& f, float& df) {
  const float sig = 1.0f / (1.0f + std::exp(-alpha * g));
  float dcap;
  const float cg = cap_grad(g, c, dcap);
  f = cg * sig;
  df = dcap * sig + cg * alpha * sig * (1.0f - sig);
}

template <Kind K, bool Capped>
void fwd(const Spec& a, int64_t n, const float* g, const float* u, float* h) {
  const float lim = a.limit, off = a.up_offset, alpha = a.alpha;
  for (int64_t i = 0; i < n; ++i) {
    const float gc = std::min(g[i], lim);
    const float uc = std::min(std::max(u[i], -lim), lim);
    if constexpr (Capped) {
      h[i] = capped_silu(gc, alpha, a.gate_cap) * (cap(uc, a.up_cap) + off);
    } else {
      h[i] = act<K>(gc, alpha) * (uc + off);
    }
  }
}

template <Kind K, bool Capped>
void bwd(const Spec& a, int64_t n, const float* g, const float* u, const float* dh, float* dg,
         float* du) {
  const float lim = a.limit, off = a.up_offset, alpha = a.alpha;
  for (int64_t i = 0; i < n; ++i) {
    const float gc = std::min(g[i], lim);
    const float uc = std::min(std::max(u[i], -lim), lim);
    float f, df, up = uc, dup = 1.0f;
    if constexpr (Capped) {
      capped_silu_grad(gc, alpha, a.gate_cap, f, df);
      up = cap_grad(uc, a.up_cap, dup);
    } else {
      act_grad<K>(gc, alpha, f, df);
    }
    dg[i] = g[i] <= lim ? dh[i] * (up + off) * df : 0.0f;
    du[i] = (u[i] >= -lim && u[i] <= lim) ? dh[i] * f * dup : 0.0f;
  }
}

}  // namespace

const char* name(Kind kind) {
  switch (kind) {
    case Kind::silu:
      return "silu";
    case Kind::gelu:
      return "gelu";
    case Kind::gelu_tanh:
      return "gelu_tanh";
    case Kind::relu2:
      return "relu2";
  }
  return "?";
}

Spec parse(const std::string& nm, double alpha, double limit, double up_offset, double gate_cap,
           double up_cap) {
  Spec a;
  if (nm == "silu" || nm == "swish") {
    a.kind = Kind::silu;
  } else if (nm == "gelu") {
    a.kind = Kind::gelu;
  } else if (nm == "gelu_tanh" || nm == "gelu_pytorch_tanh") {
    a.kind = Kind::gelu_tanh;
  } else if (nm == "relu2") {
    a.kind = Kind::relu2;
  } else {
    throw ValueError("activation: expected 'silu', 'gelu', 'gelu_tanh' or 'relu2', got '" + nm +
                     "'");
  }
  if (!std::isfinite(alpha) || alpha <= 0.0) {
    throw ValueError("activation_alpha: expected a finite number > 0, got " +
                     std::to_string(alpha));
  }
  if (alpha != 1.0 && a.kind != Kind::silu) {
    throw ValueError(
        "activation_alpha: only the 'silu' activation (g * sigmoid(alpha * g)) takes "
        "an alpha; got " +
        std::to_string(alpha) + " with '" + nm + "'");
  }
  if (std::isnan(limit) || limit <= 0.0) {
    throw ValueError("activation_limit: expected None or a number > 0, got " +
                     std::to_string(limit));
  }
  if (!std::isfinite(up_offset)) {
    throw ValueError("activation_up_offset: expected a finite number, got " +
                     std::to_string(up_offset));
  }
  for (const auto& [what, c] : {std::pair<const char*, double>{"activation_gate_softcap", gate_cap},
                                {"activation_up_softcap", up_cap}}) {
    if (std::isnan(c) || c <= 0.0) {
      throw ValueError(std::string(what) + ": expected None or a number > 0, got " +
                       std::to_string(c));
    }
    if (!std::isinf(c) && a.kind != Kind::silu) {
      throw ValueError(std::string(what) + ": soft-caps go with the 'silu' activation only; got '" +
                       nm + "'");
    }
  }
  a.gate_cap = static_cast<float>(gate_cap);
  a.up_cap = static_cast<float>(up_cap);
  a.alpha = static_cast<float>(alpha);
  a.limit = static_cast<float>(limit);
  a.up_offset = static_cast<float>(up_offset);
  return a;
}

void forward_generic(const Spec& a, int64_t n, const float* g, const float* u, float* h) {
  if (a.capped()) return fwd<Kind::silu, true>(a, n, g, u, h);  // parse: caps are silu only
  switch (a.kind) {
    case Kind::silu:
      return fwd<Kind::silu, false>(a, n, g, u, h);
    case Kind::gelu:
      return fwd<Kind::gelu, false>(a, n, g, u, h);
    case Kind::gelu_tanh:
      return fwd<Kind::gelu_tanh, false>(a, n, g, u, h);
    case Kind::relu2:
      return fwd<Kind::relu2, false>(a, n, g, u, h);
  }
}

void backward_generic(const Spec& a, int64_t n, const float* g, const float* u, const float* dh,
                      float* dg, float* du) {
  if (a.capped()) return bwd<Kind::silu, true>(a, n, g, u, dh, dg, du);
  switch (a.kind) {
    case Kind::silu:
      return bwd<Kind::silu, false>(a, n, g, u, dh, dg, du);
    case Kind::gelu:
      return bwd<Kind::gelu, false>(a, n, g, u, dh, dg, du);
    case Kind::gelu_tanh:
      return bwd<Kind::gelu_tanh, false>(a, n, g, u, dh, dg, du);
    case Kind::relu2:
      return bwd<Kind::relu2, false>(a, n, g, u, dh, dg, du);
  }
}

}  // namespace kt::engine::activation
