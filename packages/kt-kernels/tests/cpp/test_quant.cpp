// The dequantization kernels (kernels/quant_kernels.h) of every runnable ISA: bit-identical to the
// scalar reference, for every int8 code and int4 nibble and scales of varied magnitude. The
// quantization kernels (max |w| and codes) likewise, on data made of ties, zeros, denormals,
// clamped and non-finite values and odd lengths; place_block equals place_row row by row.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "engine/quant.h"
#include "kernels/dispatch.h"
#include "kernels/quant_kernels.h"

using namespace kt::kernels;

TEST(dequant_bit_identical_to_scalar) {
  std::mt19937 rng(7);
  const int64_t npairs = 37;
  std::vector<int8_t> c8(static_cast<size_t>(32 * npairs));
  std::vector<uint8_t> c4(static_cast<size_t>(16 * npairs));
  for (size_t i = 0; i < c8.size(); ++i)
    c8[i] = static_cast<int8_t>(static_cast<int>(i % 256) - 128);
  for (size_t i = 0; i < c4.size(); ++i) c4[i] = static_cast<uint8_t>(rng() & 0xff);
  float sv[32];
  std::uniform_real_distribution<float> u(-30.0f, 10.0f);
  for (float& s : sv)
    s = std::ldexp(1.0f + static_cast<float>(rng() % 1000) / 999.0f, static_cast<int>(u(rng)));
  sv[3] = 0.0f;
  const QuantKernels& ref = *scalar_quant_table();
  std::vector<bf16> want(static_cast<size_t>(32 * npairs)), got(want.size());
  for (Isa isa : available_isas()) {
    const QuantKernels& q = quant_kernels(isa);
    ref.i8(npairs, c8.data(), sv, want.data());
    q.i8(npairs, c8.data(), sv, got.data());
    REQUIRE(std::memcmp(want.data(), got.data(), want.size() * sizeof(bf16)) == 0, "%s int8",
            isa_name(isa));
    ref.i4(npairs, c4.data(), sv, want.data());
    q.i4(npairs, c4.data(), sv, got.data());
    REQUIRE(std::memcmp(want.data(), got.data(), want.size() * sizeof(bf16)) == 0, "%s int4",
            isa_name(isa));
  }
  // The reference itself: code 0x9f of an int4 byte is low -1, high -7.
  uint8_t byte = 0x9f;
  float one[32];
  for (float& s : one) s = 1.0f;
  bf16 out[32];
  std::vector<uint8_t> pair(16, byte);
  ref.i4(1, pair.data(), one, out);
  REQUIRE(bf16_to_f32(out[0]) == -1.0f && bf16_to_f32(out[1]) == -7.0f, "int4 nibble order");
}

// W8A8 weight blocks (engine/quant.h, Kind::w8a8): place_row writes the VNNI-4 layout and the row
// sums; dequant_range of any pair range (odd ends included) gives bf16(code * scale) in the pair
// layout, zero beyond the range, on every ISA.
TEST(w8a8_blocks_place_and_dequantize_ranges) {
  namespace q = kt::engine::quant;
  const int64_t K = 150;  // Kp = 192: 48 quads, a ragged tail of zero codes
  const q::Format f = q::make_format(q::Kind::w8a8, K, 128);
  REQUIRE(f.Kp == 192 && f.ngroups == 1 && q::block_bytes(f) == 16 * 192 + 64, "format");
  std::mt19937 rng(11);
  const int64_t nblk = 2;
  std::vector<int8_t> codes(static_cast<size_t>(nblk * 16 * K));
  for (auto& c : codes) c = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
  std::vector<float> scales(static_cast<size_t>(nblk * 16));
  for (auto& s : scales) s = std::ldexp(1.0f + static_cast<float>(rng() % 997) / 997.0f, -7);
  std::vector<uint8_t> blocks(static_cast<size_t>(nblk * q::block_bytes(f)), 0xAB);
  for (int64_t b = 0; b < nblk; ++b) {
    for (int j = 0; j < 16; ++j) {
      q::place_row(f, codes.data() + (b * 16 + j) * K, K, j, blocks.data() + b * q::block_bytes(f));
    }
  }
  for (int64_t b = 0; b < nblk; ++b) {
    const uint8_t* blk = blocks.data() + b * q::block_bytes(f);
    for (int j = 0; j < 16; ++j) {
      int32_t sum = 0, stored;
      for (int64_t k = 0; k < f.Kp; ++k) {
        const int8_t want = k < K ? codes[(b * 16 + j) * K + k] : 0;
        REQUIRE(static_cast<int8_t>(blk[i8_offset(j, k)]) == want, "code (%d, %lld)", j,
                (long long)k);
        sum += want;
      }
      std::memcpy(&stored, blk + 16 * f.Kp + 4 * j, 4);
      REQUIRE(stored == sum, "row sum %d", j);
    }
  }
  const int64_t ranges[][2] = {{0, 96}, {0, 5}, {3, 40}, {7, 8}, {8, 16}, {33, 96}, {95, 96}};
  for (Isa isa : available_isas()) {
    for (const auto& r : ranges) {
      const int64_t kp0 = r[0], kp1 = r[1], dst_Kp = round_up(2 * (kp1 - kp0), 32);
      std::vector<bf16> got(static_cast<size_t>(nblk * 16 * dst_Kp), 0x7777);
      q::dequant_range(quant_kernels(isa), f, blocks.data(), scales.data(), nblk, kp0, kp1,
                       got.data(), dst_Kp);
      for (int64_t b = 0; b < nblk; ++b) {
        for (int64_t kk = 0; kk < dst_Kp; ++kk) {
          for (int j = 0; j < 16; ++j) {
            const int64_t k = 2 * kp0 + kk;
            bf16 want = 0;
            if (kk < 2 * (kp1 - kp0) && k < K) {
              want = bf16_round_finite(static_cast<float>(codes[(b * 16 + j) * K + k]) *
                                       scales[b * 16 + j]);
            }
            const bf16 v = got[b * 16 * dst_Kp + (kk / 2) * 32 + j * 2 + kk % 2];
            REQUIRE(v == want, "%s pairs [%lld, %lld) block %lld (%d, %lld): %04x, want %04x",
                    isa_name(isa), (long long)kp0, (long long)kp1, (long long)b, j, (long long)k, v,
                    want);
          }
        }
      }
    }
  }
}

// The fused transposed repack of W8A8 blocks (i8x4_t) where an ISA has one: element by element
// bf16(code * scale) at its transposed place, zero past the source rows and past Kp, the same bits
// as the scalar dequantization followed by the scalar pack_transposed, and nothing written between
// destination blocks. ISAs without one (scalar, avx2) leave the entry null.
TEST(w8a8_transposed_dequantization) {
  namespace q = kt::engine::quant;
  const int64_t K = 150;  // Kp = 192
  const q::Format f = q::make_format(q::Kind::w8a8, K, 128);
  const int64_t bb = q::block_bytes(f), max_src = 3;
  std::mt19937 rng(12);
  std::vector<int8_t> codes(static_cast<size_t>(max_src * 16 * K));
  for (size_t i = 0; i < codes.size(); ++i) {
    codes[i] = static_cast<int8_t>(i % 7 == 0 ? -127 + static_cast<int>(i % 3)
                                              : static_cast<int>(rng() % 255) - 127);
  }
  std::vector<float> scales(static_cast<size_t>(max_src * 16));
  for (auto& s : scales) s = std::ldexp(1.0f + static_cast<float>(rng() % 997) / 997.0f, -9);
  scales[5] = 0.0f;
  std::vector<uint8_t> blocks(static_cast<size_t>(max_src * bb), 0);
  for (int64_t b = 0; b < max_src; ++b) {
    for (int j = 0; j < 16; ++j) {
      q::place_row(f, codes.data() + (b * 16 + j) * K, K, j, blocks.data() + b * bb);
    }
  }
  const auto* src = reinterpret_cast<const int8_t*>(blocks.data());
  const QuantKernels& ref = *scalar_quant_table();
  const KernelTable& ref_t = kernel_table(Isa::scalar);
  int tested = 0;
  for (Isa isa : available_isas()) {
    const QuantKernels& qk = quant_kernels(isa);
    if (qk.i8x4_t == nullptr) {
      REQUIRE(isa == Isa::scalar || isa == Isa::avx2, "%s has no fused transposed dequantization",
              isa_name(isa));
      continue;
    }
    ++tested;
    for (int64_t nsrc = 1; nsrc <= max_src; ++nsrc) {
      const int64_t KpT = packed_k(16 * nsrc), ldd = 16 * KpT + 48;  // a gap between blocks
      for (const int64_t k0 : {0, 16, 48, 144, 176}) {
        for (const int64_t nblk : {1, 2, 3, 6}) {
          std::vector<bf16> got(static_cast<size_t>(nblk * ldd), 0x7777);
          qk.i8x4_t(nsrc, src, scales.data(), f.Kp, k0, nblk, got.data(), ldd);
          // Two steps with the scalar kernels: every source block's rows over the whole depth,
          // then the transposed repack of those bf16 blocks.
          std::vector<bf16> rows(static_cast<size_t>(nsrc * 16 * f.Kp));
          for (int64_t b = 0; b < nsrc; ++b) {
            float sv[32];
            for (int i = 0; i < 32; ++i) sv[i] = scales[static_cast<size_t>(16 * b + i / 2)];
            ref.i8x4(f.Kp / 4, src + b * bb, sv, rows.data() + b * 16 * f.Kp);
          }
          std::vector<bf16> two(static_cast<size_t>(nblk * ldd), 0x7777);
          ref_t.pack_transposed(rows.data(), 16 * nsrc, f.Kp, k0, nblk, two.data(), ldd);
          REQUIRE(got == two, "%s nsrc=%lld k0=%lld nblk=%lld: differs from dequantize + transpose",
                  isa_name(isa), (long long)nsrc, (long long)k0, (long long)nblk);
          for (int64_t ob = 0; ob < nblk; ++ob) {
            for (int64_t p = 0; p < KpT / 2; ++p) {
              for (int c = 0; c < 16; ++c) {
                for (int i = 0; i < 2; ++i) {
                  const int64_t n = 2 * p + i, k = k0 + 16 * ob + c;
                  bf16 want = 0;
                  if (n < 16 * nsrc && k < K) {
                    want = bf16_round_finite(static_cast<float>(codes[n * K + k]) * scales[n]);
                  }
                  const bf16 v = got[ob * ldd + 32 * p + 2 * c + i];
                  REQUIRE(v == want, "%s nsrc=%lld k0=%lld (n %lld, k %lld): %04x, want %04x",
                          isa_name(isa), (long long)nsrc, (long long)k0, (long long)n, (long long)k,
                          v, want);
                }
              }
            }
            for (int64_t e = 16 * KpT; e < ldd; ++e) {
              REQUIRE(got[ob * ldd + e] == 0x7777, "%s wrote between destination blocks",
                      isa_name(isa));
            }
          }
        }
      }
    }
  }
  const auto avail = available_isas();
  const bool has_avx512 = std::find(avail.begin(), avail.end(), Isa::avx512) != avail.end();
  REQUIRE(!has_avx512 || tested > 0, "no ISA ran the fused kernel");
}

namespace {

// Groups of floats that stress the quantization kernels; each comes with scales to try.
struct QuantCase {
  std::vector<float> w;
  std::vector<float> scales;  // extra scales besides max|w| / qm (some force clamping)
};

std::vector<QuantCase> quant_cases(int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<QuantCase> cases;
  auto at = [&](std::vector<float>& v, int64_t i) -> float& { return v[static_cast<size_t>(i)]; };
  QuantCase c;
  c.w.resize(static_cast<size_t>(n));
  // Gaussian values.
  for (auto& x : c.w) x = nd(rng) * 0.02f;
  c.scales = {0.02f / 127.0f, 1e-3f, 3e-4f};
  cases.push_back(c);
  // Ties: halves of multiples of a power-of-two scale (exact quotients m + 0.5), both signs, up to
  // and past +-qmax (clamped).
  for (int64_t i = 0; i < n; ++i) {
    const int m = static_cast<int>(rng() % 300) - 150;
    at(c.w, i) = (static_cast<float>(m) + 0.5f) * 0x1p-7f;
  }
  c.scales = {0x1p-7f, 0x1p-6f, 0x1p-9f};
  cases.push_back(c);
  // Ties of scales that are not powers of two (whose reciprocals are inexact: w * (1 / s) misses
  // some of these ties where w / s hits them).
  for (const float s : {3 * 0x1p-10f, 5 * 0x1p-11f, 7 * 0x1p-12f, 11 * 0x1p-9f}) {
    for (int64_t i = 0; i < n; ++i) {
      const int m = static_cast<int>(rng() % 280) - 140;
      at(c.w, i) = (static_cast<float>(m) + 0.5f) * s;  // exact: a small odd integer times 2^e
    }
    c.scales = {s};
    cases.push_back(c);
  }
  // Zeros of both signs among small values; then all zeros.
  for (int64_t i = 0; i < n; ++i) {
    at(c.w, i) = i % 3 == 0 ? 0.0f : i % 3 == 1 ? -0.0f : nd(rng) * 1e-3f;
  }
  c.scales = {1e-3f / 127.0f, 1e-5f};
  cases.push_back(c);
  for (auto& x : c.w) x = (rng() & 1) ? 0.0f : -0.0f;
  c.scales = {1.0f};
  cases.push_back(c);
  // Denormal inputs and quotients: values near the bottom of the float range, scales at and just
  // above the smallest normal.
  for (auto& x : c.w) x = nd(rng) * 0x1p-124f;
  for (int64_t i = 0; i < n; i += 5) at(c.w, i) = nd(rng) * 0x1p-140f;  // denormal w
  c.scales = {0x1p-126f, 0x1.8p-126f, 0x1p-120f, 3.0f};
  cases.push_back(c);
  // Huge values: quotients overflow to infinity and clamp.
  for (auto& x : c.w) x = nd(rng) * 1e37f;
  c.scales = {1e37f / 127.0f, 0x1p-126f};
  cases.push_back(c);
  return cases;
}

}  // namespace

TEST(quantize_kernels_bit_identical_to_scalar) {
  std::mt19937 rng(3);
  const QuantKernels& ref = *scalar_quant_table();
  const int64_t lengths[] = {0,  1,  2,  3,  7,  8,  9,   15,  16,  17,  31,
                             32, 33, 47, 63, 64, 65, 127, 128, 129, 255, 2051};
  for (const int64_t n : lengths) {
    for (const QuantCase& c : quant_cases(n, rng)) {
      float want_max = -1.0f;
      REQUIRE(ref.absmax(n, c.w.data(), &want_max), "n %lld: finite", (long long)n);
      for (Isa isa : available_isas()) {
        const QuantKernels& q = quant_kernels(isa);
        float got_max = -1.0f;
        REQUIRE(q.absmax(n, c.w.data(), &got_max), "%s n %lld: finite", isa_name(isa),
                (long long)n);
        REQUIRE(std::memcmp(&got_max, &want_max, sizeof(float)) == 0, "%s n %lld: max %a, want %a",
                isa_name(isa), (long long)n, got_max, want_max);
        for (const float qm : {127.0f, 7.0f}) {
          std::vector<float> scales = c.scales;
          if (want_max > 0.0f && want_max / qm >= 0x1p-126f) scales.push_back(want_max / qm);
          for (const float s : scales) {
            std::vector<int8_t> want(static_cast<size_t>(n) + 1, 0x55), got = want;
            ref.quantize(n, c.w.data(), s, qm, want.data());
            q.quantize(n, c.w.data(), s, qm, got.data());
            for (int64_t k = 0; k <= n; ++k) {
              REQUIRE(got[static_cast<size_t>(k)] == want[static_cast<size_t>(k)],
                      "%s n %lld qm %g s %a: code %lld of w %a is %d, want %d", isa_name(isa),
                      (long long)n, qm, s, (long long)k, k < n ? c.w[static_cast<size_t>(k)] : 0.f,
                      got[static_cast<size_t>(k)], want[static_cast<size_t>(k)]);
            }
          }
        }
      }
    }
  }
  // The reference itself: ties round to even, quotients clamp to +-qm.
  const float w[] = {0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 200.0f, -200.0f, 7.5f};
  int8_t codes[9];
  ref.quantize(9, w, 1.0f, 127.0f, codes);
  const int8_t want[] = {0, 2, 2, 0, -2, -2, 127, -127, 8};
  REQUIRE(std::memcmp(codes, want, sizeof want) == 0, "round half even and clamp");
  ref.quantize(9, w, 1.0f, 7.0f, codes);
  REQUIRE(codes[6] == 7 && codes[7] == -7 && codes[8] == 7, "int4 clamp");
}

// The gradient-row entries of the int8 backward (engine/w8a8.h): scale_bf16 and quantize_mul, the
// same bits on every ISA on the cases above (as factors r = 1 / s, and the row's own 127 / max),
// bf16 inputs of every exponent, and the reference's own definition.
TEST(scale_bf16_and_quantize_mul_bit_identical_to_scalar) {
  std::mt19937 rng(11);
  const QuantKernels& ref = *scalar_quant_table();
  const int64_t lengths[] = {0, 1, 7, 15, 16, 17, 33, 64, 129, 2051};
  for (const int64_t n : lengths) {
    for (const QuantCase& c : quant_cases(n, rng)) {
      float amax = 0.0f;
      REQUIRE(ref.absmax(n, c.w.data(), &amax), "finite");
      std::vector<float> factors;
      for (const float s : c.scales) factors.push_back(1.0f / s);
      if (amax > 0.0f) factors.push_back(127.0f / amax);
      for (Isa isa : available_isas()) {
        const QuantKernels& q = quant_kernels(isa);
        for (const float r : factors) {
          if (!std::isfinite(r)) continue;
          std::vector<int8_t> want(static_cast<size_t>(n) + 1, 0x55), got = want;
          ref.quantize_mul(n, c.w.data(), r, 127.0f, want.data());
          q.quantize_mul(n, c.w.data(), r, 127.0f, got.data());
          REQUIRE(got == want, "%s n %lld r %a: quantize_mul differs", isa_name(isa), (long long)n,
                  r);
        }
      }
    }
    // scale_bf16 over bf16 patterns of every exponent (finite), channel scales of varied size.
    std::vector<bf16> g(static_cast<size_t>(n));
    std::vector<float> sw(static_cast<size_t>(n));
    for (int64_t k = 0; k < n; ++k) {
      g[static_cast<size_t>(k)] = static_cast<bf16>((rng() % 0x7f80u) | (k % 2 ? 0x8000u : 0u));
      sw[static_cast<size_t>(k)] = std::ldexp(1.0f + static_cast<float>(rng() % 1000) / 999.0f,
                                              static_cast<int>(rng() % 40) - 30);
    }
    std::vector<float> want(static_cast<size_t>(n) + 1, 7.0f), got = want;
    ref.scale_bf16(n, g.data(), sw.data(), want.data());
    for (int64_t k = 0; k < n; ++k) {
      const float v = bf16_to_f32(g[static_cast<size_t>(k)]) * sw[static_cast<size_t>(k)];
      REQUIRE(std::memcmp(&want[static_cast<size_t>(k)], &v, sizeof v) == 0, "scalar scale_bf16");
    }
    for (Isa isa : available_isas()) {
      std::fill(got.begin(), got.end(), 7.0f);
      quant_kernels(isa).scale_bf16(n, g.data(), sw.data(), got.data());
      REQUIRE(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0,
              "%s n %lld: scale_bf16 differs", isa_name(isa), (long long)n);
    }
  }
  // The reference: a product, ties to even, clamped.
  const float w[] = {0.25f, 0.75f, 1.25f, -0.25f, -0.75f, 100.0f, -100.0f};
  int8_t codes[7];
  ref.quantize_mul(7, w, 2.0f, 127.0f, codes);
  const int8_t want[] = {0, 2, 2, 0, -2, 127, -127};
  REQUIRE(std::memcmp(codes, want, sizeof want) == 0, "quantize_mul: round half even and clamp");
}

TEST(absmax_rejects_non_finite_anywhere) {
  const float bad[] = {std::numeric_limits<float>::infinity(),
                       -std::numeric_limits<float>::infinity(),
                       std::numeric_limits<float>::quiet_NaN(), -std::nanf("")};
  for (const int64_t n : {1, 7, 16, 17, 40, 131}) {
    for (int64_t pos = 0; pos < n; pos += (n > 20 ? 3 : 1)) {
      for (const float b : bad) {
        std::vector<float> w(static_cast<size_t>(n), 0.25f);
        w[static_cast<size_t>(pos)] = b;
        for (Isa isa : available_isas()) {
          float m = 0.0f;
          REQUIRE(!quant_kernels(isa).absmax(n, w.data(), &m), "%s n %lld pos %lld value %a",
                  isa_name(isa), (long long)n, (long long)pos, b);
        }
      }
    }
  }
}

// quantize_row (engine/quant.h) through every ISA's kernels: same codes and scales as through the
// scalar reference, for int8 rows and int4 groups (all-zero groups, a group below the smallest
// normal scale, a ragged last group), and false on a non-finite value.
TEST(quantize_row_bit_identical_across_isas) {
  namespace q = kt::engine::quant;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 0.03f);
  for (const q::Kind kind : {q::Kind::int8, q::Kind::int4, q::Kind::w8a8}) {
    for (const int64_t K : {1, 33, 200, 256, 333}) {
      const q::Format f = q::make_format(kind, K, 32);
      std::vector<float> w(static_cast<size_t>(K));
      for (auto& x : w) x = nd(rng);
      for (int64_t k = 0; k < std::min<int64_t>(K, 32); ++k) w[static_cast<size_t>(k)] = 0.0f;
      for (int64_t k = 64; k < std::min<int64_t>(K, 96); ++k) w[static_cast<size_t>(k)] = 1e-38f;
      for (int64_t k = 100; k < K; k += 7) w[static_cast<size_t>(k)] = 0.25f;  // ties for int4
      std::vector<int8_t> want_c(static_cast<size_t>(K)), got_c(want_c.size());
      std::vector<float> want_s(static_cast<size_t>(f.ngroups), -1.0f), got_s(want_s.size());
      REQUIRE(q::quantize_row(*scalar_quant_table(), f, w.data(), K, want_c.data(), want_s.data()),
              "finite");
      for (Isa isa : available_isas()) {
        std::fill(got_s.begin(), got_s.end(), -2.0f);
        REQUIRE(q::quantize_row(quant_kernels(isa), f, w.data(), K, got_c.data(), got_s.data()),
                "finite");
        REQUIRE(got_c == want_c, "%s kind %d K %lld: codes", isa_name(isa), (int)kind,
                (long long)K);
        REQUIRE(std::memcmp(got_s.data(), want_s.data(), want_s.size() * sizeof(float)) == 0,
                "%s kind %d K %lld: scales", isa_name(isa), (int)kind, (long long)K);
        std::vector<float> nan_w = w;
        nan_w[static_cast<size_t>(K - 1)] = std::nanf("");
        REQUIRE(
            !q::quantize_row(quant_kernels(isa), f, nan_w.data(), K, got_c.data(), got_s.data()),
            "%s: NaN", isa_name(isa));
      }
      if (kind == q::Kind::int4 && K >= 96) REQUIRE(want_s[0] == 0.0f && want_s[2] == 0.0f, "0");
    }
  }
}

// place_block and place_block_nibbles write the bytes place_row writes, row by row, for every
// kind and ragged depths (odd K, K short of a pair, a quad or a 32-column block).
TEST(place_block_equals_place_row) {
  namespace q = kt::engine::quant;
  std::mt19937 rng(9);
  for (const q::Kind kind : {q::Kind::int8, q::Kind::int4, q::Kind::w8a8}) {
    for (const int64_t K : {1, 2, 3, 5, 31, 32, 63, 64, 130, 255, 256, 1000}) {
      const q::Format f = q::make_format(kind, K, 32);
      const int64_t ld = K + 3;
      const int qm = q::qmax(kind);
      std::vector<int8_t> codes(static_cast<size_t>(16 * ld));
      for (auto& c : codes) c = static_cast<int8_t>(static_cast<int>(rng() % (2 * qm + 1)) - qm);
      const size_t bb = static_cast<size_t>(q::block_bytes(f));
      std::vector<uint8_t> want(bb, 0), got(bb, 0xA5);
      for (int j = 0; j < 16; ++j) q::place_row(f, codes.data() + j * ld, K, j, want.data());
      q::place_block(f, codes.data(), ld, K, got.data());
      REQUIRE(got == want, "kind %d K %lld", (int)kind, (long long)K);
      if (kind == q::Kind::int4) {
        const int64_t nb = (K + 1) / 2, ldn = nb + 1;
        std::vector<uint8_t> nib(static_cast<size_t>(16 * ldn), 0xEE);
        for (int j = 0; j < 16; ++j) {
          for (int64_t m = 0; m < nb; ++m) {
            const auto lo = static_cast<uint8_t>(codes[static_cast<size_t>(j * ld + 2 * m)] & 0x0f);
            const auto hi =
                2 * m + 1 < K
                    ? static_cast<uint8_t>(codes[static_cast<size_t>(j * ld + 2 * m + 1)] << 4)
                    : uint8_t{0};
            nib[static_cast<size_t>(j * ldn + m)] = static_cast<uint8_t>(lo | hi);
          }
        }
        std::fill(got.begin(), got.end(), 0x5A);
        q::place_block_nibbles(f, nib.data(), ldn, K, got.data());
        REQUIRE(got == want, "nibbles K %lld", (long long)K);
      }
    }
  }
}

int main(int argc, char** argv) { return kt::testing::run_all(argc, argv); }
