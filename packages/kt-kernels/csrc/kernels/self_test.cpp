// The kernel self-test (kernels/self_test.h). Compiled with baseline flags: it only calls the
// tables' entries, for ISAs that run here.
#include "kernels/self_test.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/quant_kernels.h"

namespace kt::kernels {
namespace {

// Deterministic small values that bf16 holds exactly (k / 64, |k| <= 128), so the test data is the
// same on every machine and no rounding happens before the kernels run.
struct Lcg {
  uint64_t state;
  int next(int span) {  // in [-span, span]
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<int>((state >> 33) % static_cast<uint64_t>(2 * span + 1)) - span;
  }
};

struct Case {
  int64_t M, N, K;
};

// One gemm_bf16 comparison; empty string when the kernel agrees with the reference.
std::string check_gemm(const KernelTable& table, const KernelTable& ref, const Case& c,
                       bool accumulate, uint64_t seed) {
  const int64_t Kp = packed_k(c.K);
  const int64_t nblk = packed_blocks(c.N);
  const int64_t lda = Kp + 8;              // row padding the kernel must skip
  const int64_t ldc = nblk * kBlockN + 3;  // columns the kernel must not touch
  const int64_t pad_rows = 2;              // rows after C the kernel must not touch
  Lcg rng{seed};
  std::vector<bf16> A(static_cast<size_t>(c.M * lda + 1), 0);
  for (int64_t m = 0; m < c.M; ++m) {
    for (int64_t k = 0; k < c.K; ++k) A[m * lda + k] = f32_to_bf16(rng.next(128) / 64.0f);
  }
  std::vector<bf16> B(static_cast<size_t>(packed_elems(c.N, c.K)), 0);
  for (int64_t n = 0; n < c.N; ++n) {
    for (int64_t k = 0; k < c.K; ++k) {
      B[(n / kBlockN) * kBlockN * Kp + (k / 2) * 32 + (n % kBlockN) * 2 + (k % 2)] =
          f32_to_bf16(rng.next(128) / 64.0f);
    }
  }
  const float sentinel = -12345.5f;
  std::vector<float> C0(static_cast<size_t>((c.M + pad_rows) * ldc), sentinel);
  for (int64_t m = 0; m < c.M; ++m) {
    for (int64_t n = 0; n < nblk * kBlockN; ++n) C0[m * ldc + n] = rng.next(64) / 8.0f;
  }
  std::vector<float> got = C0, want = C0;
  table.gemm_bf16(c.M, nblk, Kp, A.data(), lda, B.data(), got.data(), ldc, accumulate);
  ref.gemm_bf16(c.M, nblk, Kp, A.data(), lda, B.data(), want.data(), ldc, accumulate);

  for (int64_t m = 0; m < c.M + pad_rows; ++m) {
    for (int64_t n = 0; n < ldc; ++n) {
      const size_t i = static_cast<size_t>(m * ldc + n);
      const bool inside = m < c.M && n < nblk * kBlockN;
      auto where = [&] {
        std::ostringstream msg;
        msg << "gemm_bf16 M=" << c.M << " N=" << c.N << " K=" << c.K
            << " accumulate=" << (accumulate ? "on" : "off") << " at (" << m << ", " << n << ")";
        return msg.str();
      };
      if (!inside) {
        if (got[i] != sentinel) return where() + ": wrote outside C";
        continue;
      }
      // Bound on the difference of two fp32 sums of the same Kp + 1 terms in different orders.
      double mag = accumulate ? std::fabs(C0[i]) : 0.0;
      for (int64_t k = 0; k < c.K; ++k) {
        mag += std::fabs(
            bf16_to_f32(A[m * lda + k]) *
            bf16_to_f32(
                B[(n / kBlockN) * kBlockN * Kp + (k / 2) * 32 + (n % kBlockN) * 2 + (k % 2)]));
      }
      const double tol = 2.0 * static_cast<double>(Kp + 1) * std::ldexp(mag, -24) + 1e-30;
      const double diff = std::fabs(static_cast<double>(got[i]) - want[i]);
      if (!(diff <= tol)) {
        std::ostringstream msg;
        msg << where() << ": got " << got[i] << ", reference " << want[i];
        return msg.str();
      }
    }
  }
  return {};
}

// One gemm_i8 comparison: integer sums are exact, so the kernel must equal the reference bit for
// bit (full int8 range in A and W, so every sign and the -128 extreme of both occur).
std::string check_gemm_i8(const KernelTable& table, const KernelTable& ref, const Case& c,
                          bool accumulate, uint64_t seed) {
  const int64_t Kp = packed_k8(c.K);
  const int64_t nblk = packed_blocks(c.N);
  const int64_t lda = Kp + 8;              // row padding the kernel must skip
  const int64_t ldc = nblk * kBlockN + 3;  // columns the kernel must not touch
  const int64_t pad_rows = 2;              // rows after C the kernel must not touch
  Lcg rng{seed};
  std::vector<int8_t> A(static_cast<size_t>(c.M * lda + 4), 0);
  for (int64_t m = 0; m < c.M; ++m) {
    for (int64_t k = 0; k < c.K; ++k) A[m * lda + k] = static_cast<int8_t>(rng.next(128));
  }
  const int64_t bb = i8_block_bytes(Kp);
  std::vector<int8_t> B(static_cast<size_t>(nblk * bb), 0);
  for (int64_t n = 0; n < c.N; ++n) {
    for (int64_t k = 0; k < c.K; ++k) {
      B[(n / kBlockN) * bb + i8_offset(n, k)] = static_cast<int8_t>(rng.next(128));
    }
  }
  for (int64_t b = 0; b < nblk; ++b) i8_set_row_sums(B.data() + b * bb, Kp);
  const int32_t sentinel = -12345;
  std::vector<int32_t> C0(static_cast<size_t>((c.M + pad_rows) * ldc), sentinel);
  for (int64_t m = 0; m < c.M; ++m) {
    for (int64_t n = 0; n < nblk * kBlockN; ++n) C0[m * ldc + n] = rng.next(1 << 20);
  }
  std::vector<int32_t> got = C0, want = C0;
  table.gemm_i8(c.M, nblk, Kp, A.data(), lda, B.data(), got.data(), ldc, accumulate);
  ref.gemm_i8(c.M, nblk, Kp, A.data(), lda, B.data(), want.data(), ldc, accumulate);
  if (got != want) {
    for (size_t i = 0; i < got.size(); ++i) {
      if (got[i] == want[i]) continue;
      std::ostringstream msg;
      msg << "gemm_i8 M=" << c.M << " N=" << c.N << " K=" << c.K
          << " accumulate=" << (accumulate ? "on" : "off") << " at (" << i / ldc << ", " << i % ldc
          << "): got " << got[i] << ", reference " << want[i];
      return msg.str();
    }
  }
  return {};
}

// Values for the helper checks: small integers / 16, so products and short sums are exact, plus a
// sprinkling of ties, denormals, infinities and NaN for the conversions.
std::vector<float> test_floats(size_t n, uint64_t seed, bool specials) {
  Lcg rng{seed};
  std::vector<float> v(n);
  for (auto& x : v) x = rng.next(200) / 16.0f;
  if (specials && n >= 8) {
    const uint32_t bits[] = {0x3f808000u, 0x3f818000u, 0x00000001u, 0x80400000u,
                             0x7f800000u, 0xff800000u, 0x7fc00001u, 0xff812345u};
    for (size_t i = 0; i < 8; ++i) std::memcpy(&v[(i * 7 + 3) % n], &bits[i], sizeof(float));
  }
  return v;
}

bool same_bits(const float* a, const float* b, size_t n) { return std::memcmp(a, b, n * 4) == 0; }

std::string check_helpers(const KernelTable& t, const KernelTable& ref) {
  // Small fp32 products (exact on these values, so every correct order agrees).
  for (int64_t M : {1, 5, 9}) {
    for (int64_t N : {3, 8, 19, 33}) {
      for (int64_t K : {1, 16, 37}) {
        const int64_t ld = 40;
        const auto A = test_floats(static_cast<size_t>(ld * ld), M * 100 + N, false);
        const auto B = test_floats(static_cast<size_t>(ld * ld), K * 7 + 1, false);
        const auto C0 = test_floats(static_cast<size_t>(M * ld), 5, false);
        const gemm_f32_nn_fn fns[3][2] = {{t.gemm_f32_nn, ref.gemm_f32_nn},
                                          {t.gemm_f32_nt, ref.gemm_f32_nt},
                                          {t.gemm_f32_tn, ref.gemm_f32_tn}};
        const char* names[3] = {"gemm_f32_nn", "gemm_f32_nt", "gemm_f32_tn"};
        for (int f = 0; f < 3; ++f) {
          for (bool acc : {false, true}) {
            auto got = C0, want = C0;
            fns[f][0](M, N, K, 0.5f, A.data(), ld, B.data(), ld, got.data(), ld, acc);
            fns[f][1](M, N, K, 0.5f, A.data(), ld, B.data(), ld, want.data(), ld, acc);
            if (!same_bits(got.data(), want.data(), got.size())) {
              std::ostringstream msg;
              msg << names[f] << " M=" << M << " N=" << N << " K=" << K << " accumulate=" << acc
                  << " differs from the reference";
              return msg.str();
            }
          }
        }
      }
    }
  }
  // Conversions: bit-exact, specials included.
  for (size_t n : {1, 7, 16, 37}) {
    const auto x = test_floats(n, n, true);
    std::vector<bf16> got(n + 1, 0x1234), want(n + 1, 0x1234);
    t.cvt_f32_bf16(static_cast<int64_t>(n), x.data(), got.data());
    ref.cvt_f32_bf16(static_cast<int64_t>(n), x.data(), want.data());
    if (got != want) return "cvt_f32_bf16 n=" + std::to_string(n) + " differs from the reference";
    std::vector<float> back(n + 1, 7.0f), back_ref(n + 1, 7.0f);
    t.cvt_bf16_f32(static_cast<int64_t>(n), want.data(), back.data());
    ref.cvt_bf16_f32(static_cast<int64_t>(n), want.data(), back_ref.data());
    if (!same_bits(back.data(), back_ref.data(), n + 1)) {
      return "cvt_bf16_f32 n=" + std::to_string(n) + " differs from the reference";
    }
  }
  // Row copies: the same values, at every alignment, nothing outside the rows.
  for (int64_t off : {0, 1, 5}) {
    const int64_t rows = 3, cols = 37, lds = 41, ldd = 40;
    const auto src = test_floats(static_cast<size_t>(rows * lds), 14, true);
    std::vector<float> got(static_cast<size_t>(off + rows * ldd), 3.0f), want = got;
    t.stream_rows_f32(rows, cols, src.data(), lds, got.data() + off, ldd);
    ref.stream_rows_f32(rows, cols, src.data(), lds, want.data() + off, ldd);
    if (!same_bits(got.data(), want.data(), got.size())) {
      return "stream_rows_f32 offset=" + std::to_string(off) + " differs from the reference";
    }
  }
  // W8A8 scaling: the same two products, with and without column scales.
  for (const bool cols : {true, false}) {
    const int64_t M = 3, N = 37, ldacc = 40, ldc = 41;
    std::vector<int32_t> acc(static_cast<size_t>(M * ldacc));
    for (size_t i = 0; i < acc.size(); ++i) {
      acc[i] = static_cast<int32_t>((i * 2654435761u) % 2000003u) - 1000001;
    }
    const auto sa = test_floats(static_cast<size_t>(M), 15, false);
    const auto sw = test_floats(static_cast<size_t>(N), 16, false);
    std::vector<float> got(static_cast<size_t>(M * ldc), 3.0f), want = got;
    t.scale_i32_f32(M, N, acc.data(), ldacc, sa.data(), cols ? sw.data() : nullptr, got.data(),
                    ldc);
    ref.scale_i32_f32(M, N, acc.data(), ldacc, sa.data(), cols ? sw.data() : nullptr, want.data(),
                      ldc);
    if (!same_bits(got.data(), want.data(), got.size())) {
      return std::string("scale_i32_f32 ") + (cols ? "with" : "without") +
             " column scales differs from the reference";
    }
  }
  // SiLU gate: a polynomial exp may differ from libm's in the last bits.
  for (int64_t n : {1, 13, 40}) {
    const auto g = test_floats(static_cast<size_t>(n), 11, false);
    const auto u = test_floats(static_cast<size_t>(n), 12, false);
    const auto dh = test_floats(static_cast<size_t>(n), 13, false);
    std::vector<float> out(static_cast<size_t>(3 * n)), want(static_cast<size_t>(3 * n));
    t.silu_mul(n, g.data(), u.data(), out.data());
    ref.silu_mul(n, g.data(), u.data(), want.data());
    t.silu_mul_bwd(n, g.data(), u.data(), dh.data(), out.data() + n, out.data() + 2 * n);
    ref.silu_mul_bwd(n, g.data(), u.data(), dh.data(), want.data() + n, want.data() + 2 * n);
    for (size_t i = 0; i < out.size(); ++i) {
      if (!(std::fabs(out[i] - want[i]) <= 1e-5f * std::fabs(want[i]) + 1e-5f)) {
        return std::string(i < static_cast<size_t>(n) ? "silu_mul" : "silu_mul_bwd") +
               " differs from the reference beyond 1e-5 (relative + absolute)";
      }
    }
  }
  // The forward's h from interleaved gate / up rows: the bits of this table's own silu_mul and
  // cvt_f32_bf16 on de-interleaved copies.
  {
    const int64_t M = 3, nq = 2, ldgu = 70, ldh = 37;
    const auto gu = test_floats(static_cast<size_t>(M * ldgu), 17, true);
    std::vector<bf16> got(static_cast<size_t>(M * ldh), 0x1234), want = got;
    t.silu_mul_interleaved_bf16(M, nq, gu.data(), ldgu, got.data(), ldh);
    silu_mul_interleaved_bf16_by_parts(t, M, nq, gu.data(), ldgu, want.data(), ldh);
    if (got != want) return "silu_mul_interleaved_bf16 differs from silu_mul + cvt_f32_bf16";
  }
  // Transposed repack: bit-exact.
  for (int64_t N : {16, 40}) {
    for (int64_t K : {32, 70}) {
      const int64_t Kp = packed_k(K);
      std::vector<bf16> w(static_cast<size_t>(packed_elems(N, K)));
      Lcg rng{static_cast<uint64_t>(N * K)};
      for (auto& x : w) x = static_cast<bf16>(rng.next(30000) + 30000);
      const int64_t nblk = Kp / kBlockN;
      const size_t out_elems = static_cast<size_t>(nblk * packed_block_elems(N));
      std::vector<bf16> got(out_elems, 1), want(out_elems, 2);
      t.pack_transposed(w.data(), N, Kp, 0, nblk, got.data(), packed_block_elems(N));
      ref.pack_transposed(w.data(), N, Kp, 0, nblk, want.data(), packed_block_elems(N));
      if (got != want)
        return "pack_transposed N=" + std::to_string(N) + " differs from the reference";
    }
  }
  // The int8 transposed repack (codes and row sums): bit-exact.
  for (int64_t N : {16, 40, 80}) {
    for (int64_t K : {64, 130}) {
      const int64_t Kp = packed_k8(K), blk = i8_block_bytes(Kp), ldd = i8_block_bytes(packed_k8(N));
      std::vector<int8_t> w(static_cast<size_t>(packed_blocks(N) * blk));
      Lcg rng{static_cast<uint64_t>(N * K + 1)};
      for (auto& x : w) x = static_cast<int8_t>(rng.next(127));
      const int64_t nblk = Kp / kBlockN;
      std::vector<int8_t> got(static_cast<size_t>(nblk * ldd), 1), want(got.size(), 2);
      t.pack_transposed_i8(w.data(), N, Kp, 0, nblk, got.data(), ldd);
      ref.pack_transposed_i8(w.data(), N, Kp, 0, nblk, want.data(), ldd);
      if (got != want)
        return "pack_transposed_i8 N=" + std::to_string(N) + " differs from the reference";
    }
  }
  return {};
}

// The fused dequantize + GEMM entries against dequantization + the same table's gemm_bf16: equal
// bit for bit (kernels.h). Codes cover the whole int8 / int4 range; scales are normal.
std::string check_fused(const KernelTable& t) {
  if (t.gemm_q8 == nullptr && t.gemm_q4 == nullptr) return {};
  const Case cases[] = {{1, 16, 32}, {7, 40, 96}, {13, 33, 128}};
  uint64_t seed = 77;
  for (const Case& c : cases) {
    const int64_t Kp = packed_k(c.K), nblk = packed_blocks(c.N), lda = Kp + 8;
    const int64_t ldc = nblk * kBlockN + 3, rows = nblk * kBlockN;
    Lcg rng{seed++};
    std::vector<bf16> A(static_cast<size_t>(c.M * lda), 0);
    for (int64_t m = 0; m < c.M; ++m) {
      for (int64_t k = 0; k < c.K; ++k) A[m * lda + k] = f32_to_bf16(rng.next(128) / 64.0f);
    }
    std::vector<float> C0(static_cast<size_t>(c.M * ldc));
    for (float& x : C0) x = rng.next(64) / 8.0f;
    for (int64_t group : {int64_t{0}, int64_t{32}, int64_t{64}, int64_t{128}}) {
      const bool int4 = group > 0;
      if (int4 ? t.gemm_q4 == nullptr : t.gemm_q8 == nullptr) continue;
      const int64_t ng = int4 ? (Kp + group - 1) / group : 1;
      std::vector<int8_t> codes(
          static_cast<size_t>(rows * Kp));  // code i of block b: b * 16 Kp + i
      for (auto& q : codes) {
        const int span = int4 ? 8 : 128, v = rng.next(span);  // [-span, span - 1]
        q = static_cast<int8_t>(v == span ? -span : v);
      }
      std::vector<uint8_t> packed(codes.size() / 2);
      for (size_t i = 0; i < packed.size(); ++i) {
        packed[i] = static_cast<uint8_t>((static_cast<uint8_t>(codes[2 * i]) & 0x0f) |
                                         (static_cast<uint8_t>(codes[2 * i + 1]) << 4));
      }
      std::vector<float> scales(static_cast<size_t>(rows * ng));
      for (float& x : scales) x = std::ldexp(1.0f + rng.next(500) / 1024.0f, rng.next(6) - 9);
      std::vector<bf16> B(codes.size());
      for (int64_t b = 0; b < nblk; ++b) {
        for (int64_t i = 0; i < kBlockN * Kp; ++i) {
          const int64_t row = b * kBlockN + (i % 32) / 2, g = int4 ? (i / 32) * 2 / group : 0;
          B[b * kBlockN * Kp + i] = bf16_round_finite(
              static_cast<float>(codes[b * kBlockN * Kp + i]) * scales[row * ng + g]);
        }
      }
      for (bool accumulate : {false, true}) {
        auto got = C0, want = C0;
        t.gemm_bf16(c.M, nblk, Kp, A.data(), lda, B.data(), want.data(), ldc, accumulate);
        if (int4) {
          t.gemm_q4(c.M, nblk, Kp, group, A.data(), lda, packed.data(), scales.data(), got.data(),
                    ldc, accumulate);
        } else {
          t.gemm_q8(c.M, nblk, Kp, A.data(), lda, codes.data(), scales.data(), got.data(), ldc,
                    accumulate);
        }
        if (!same_bits(got.data(), want.data(), got.size())) {
          std::ostringstream msg;
          msg << (int4 ? "gemm_q4 group=" + std::to_string(group) : std::string("gemm_q8"))
              << " M=" << c.M << " N=" << c.N << " K=" << c.K
              << " differs from dequantization + gemm_bf16";
          return msg.str();
        }
      }
    }
  }
  return {};
}

}  // namespace

void silu_mul_interleaved_bf16_by_parts(const KernelTable& table, int64_t M, int64_t nq,
                                        const float* gu, int64_t ldgu, bf16* h, int64_t ldh) {
  float out[16];
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t q = 0; q < nq; ++q) {
      const float* g = gu + m * ldgu + 32 * q;
      table.silu_mul(16, g, g + 16, out);
      table.cvt_f32_bf16(16, out, h + m * ldh + 16 * q);
    }
  }
}

// Sizes that reach every tail of every kernel: M below, at and above the micro-tile heights
// (4, 6, 16 and 32 rows), odd block counts, K with and without zero padding, then every helper.
std::string run_self_test(const KernelTable& table) {
  const KernelTable& ref = *scalar_table();
  const Case cases[] = {{1, 16, 32}, {7, 40, 33}, {13, 80, 95}, {20, 33, 64}, {35, 72, 130}};
  uint64_t seed = 1;
  for (const Case& c : cases) {
    for (bool accumulate : {false, true}) {
      std::string err = check_gemm(table, ref, c, accumulate, seed++);
      if (!err.empty()) return err;
      err = check_gemm_i8(table, ref, c, accumulate, seed++);
      if (!err.empty()) return err;
    }
  }
  std::string err = check_helpers(table, ref);
  return err.empty() ? check_fused(table) : err;
}

}  // namespace kt::kernels
