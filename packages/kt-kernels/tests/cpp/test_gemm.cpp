// gemm_bf16 of every ISA runnable here against the scalar reference.
//
// Tolerances vs scalar:
//  * avx2, avx512, avx512_vnni (avx512's gemm_bf16): 0 (bit-identical). They add the products of
//  A[m,k] and B[n,k] in the same k
//    order as the reference, starting from the same C, and a bf16 x bf16 product is exact in fp32,
//    so an FMA rounds exactly where the reference's add does. (Holds for normal numbers; a product
//    below 2^-126 would round differently, which these tests do not produce.)
//  * avx512_bf16, amx: |got - ref| <= 2 (Kp + 1) 2^-24 (|C0| + sum_k |A[m,k] B[n,k]|). vdpbf16ps
//    and tdpbf16ps add the two (or more) products of a pair in their own order and flush
//    denormals; each of the two sums has at most Kp + 1 roundings of relative size 2^-24.
// AMX runs here only on CPUs that have it; test_amx_emulated.cpp checks the AMX kernel's tile
// configuration and addressing on a software model of the tile unit everywhere.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "gemm_data.h"
#include "kernels/dispatch.h"
#include "kernels/kernels.h"

using namespace kt::kernels;
using kt::testing::MatA;

namespace {

bool bit_exact(Isa isa) {
  return isa == Isa::scalar || isa == Isa::avx2 || isa == Isa::avx512 || isa == Isa::avx512_vnni;
}

// The SIMD ISAs runnable here, each checked to really be served by its own kernels (so a failed
// self-test cannot hide behind the fallback).
std::vector<Isa> simd_isas() {
  std::vector<Isa> out;
  for (Isa isa : available_isas()) {
    if (isa == Isa::scalar) continue;
    const KernelTable& t = kernel_table(isa);
    REQUIRE(t.isa == isa, "%s fell back to %s: self-test: %s", isa_name(isa), isa_name(t.isa),
            self_test_status(isa).c_str());
    out.push_back(isa);
  }
  std::printf("  SIMD ISAs runnable here:");
  for (Isa isa : out) std::printf(" %s", isa_name(isa));
  std::printf("%s\n", out.empty() ? " none" : "");
  return out;
}

struct Problem {
  MatA a;
  int64_t N, nblk, ldc;
  std::vector<bf16> w, packed;
  std::vector<float> c0;
};

Problem make_problem(int64_t M, int64_t N, int64_t K, std::mt19937& rng) {
  Problem p{kt::testing::make_a(M, K, /*lda_pad=*/(M + K) % 3 * 16 + 32, rng),
            N,
            packed_blocks(N),
            packed_blocks(N) * kBlockN + 5,
            {},
            {},
            {}};
  p.w = kt::testing::random_bf16(static_cast<size_t>(N * K), rng);
  p.packed = kt::testing::pack(p.w, N, K);
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  p.c0.resize(static_cast<size_t>((M + 1) * p.ldc));
  for (auto& x : p.c0) x = u(rng);
  return p;
}

std::vector<float> run(const KernelTable& t, const Problem& p, bool accumulate) {
  std::vector<float> c = p.c0;
  t.gemm_bf16(p.a.M, p.nblk, p.a.Kp, p.a.data.data(), p.a.lda, p.packed.data(), c.data(), p.ldc,
              accumulate);
  return c;
}

void compare(Isa isa, const Problem& p, bool accumulate, const std::vector<float>& got,
             const std::vector<float>& want) {
  const int64_t M = p.a.M, width = p.nblk * kBlockN;
  for (int64_t m = 0; m <= M; ++m) {
    for (int64_t n = 0; n < p.ldc; ++n) {
      const size_t i = static_cast<size_t>(m * p.ldc + n);
      if (m == M || n >= width) {
        REQUIRE(std::memcmp(&got[i], &p.c0[i], sizeof(float)) == 0,
                "%s M=%lld N=%lld K=%lld: wrote outside C at (%lld, %lld)", isa_name(isa),
                (long long)M, (long long)p.N, (long long)p.a.K, (long long)m, (long long)n);
        continue;
      }
      double tol = 0.0;
      if (!bit_exact(isa)) {
        double mag = accumulate ? std::fabs(p.c0[i]) : 0.0;
        if (n < p.N) {
          for (int64_t k = 0; k < p.a.K; ++k) {
            mag += std::fabs(static_cast<double>(bf16_to_f32(p.a.data[m * p.a.lda + k])) *
                             bf16_to_f32(p.w[n * p.a.K + k]));
          }
        }
        tol = 2.0 * static_cast<double>(p.a.Kp + 1) * std::ldexp(mag, -24);
      }
      const double diff = std::fabs(static_cast<double>(got[i]) - want[i]);
      REQUIRE(diff <= tol,
              "%s M=%lld N=%lld K=%lld acc=%d at (%lld, %lld): got %.9g, scalar %.9g, tol %.3g",
              isa_name(isa), (long long)M, (long long)p.N, (long long)p.a.K, int(accumulate),
              (long long)m, (long long)n, got[i], want[i], tol);
    }
  }
}

}  // namespace

// Odd sizes around every micro-tile edge: rows 1..MR+1 and beyond 2 AMX tiles, block counts
// 1..7 (tails of 3-block and 2-block tiles, N not a multiple of 16), K below / at / above 32.
TEST(gemm_matches_scalar_on_odd_sizes) {
  const KernelTable& ref = kernel_table(Isa::scalar);
  std::mt19937 rng(1234);
  const int64_t Ms[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17, 31, 32, 33, 47, 70};
  const int64_t Ns[] = {1, 16, 17, 40, 48, 64, 100};
  const int64_t Ks[] = {1, 31, 32, 33, 95, 200};
  for (Isa isa : simd_isas()) {
    const KernelTable& t = kernel_table(isa);
    for (int64_t M : Ms) {
      for (int64_t N : Ns) {
        for (int64_t K : Ks) {
          const Problem p = make_problem(M, N, K, rng);
          for (bool accumulate : {false, true}) {
            compare(isa, p, accumulate, run(t, p, accumulate), run(ref, p, accumulate));
          }
        }
      }
    }
  }
}

TEST(gemm_matches_scalar_at_model_sizes) {
  const KernelTable& ref = kernel_table(Isa::scalar);
  std::mt19937 rng(99);
  struct S {
    int64_t M, N, K;
  } sizes[] = {{37, 768, 2048},
               {61, 2048, 768},
               {129, 200, 72},
               {300, 100, 2048}};  // A of 1.2 MB: AMX runs it in passes of 96 rows + a tail
  for (Isa isa : simd_isas()) {
    for (const S& s : sizes) {
      const Problem p = make_problem(s.M, s.N, s.K, rng);
      compare(isa, p, true, run(kernel_table(isa), p, true), run(ref, p, true));
    }
  }
}

// Splitting M and N across calls (as the engine's threads do) gives the same bits as one call.
TEST(gemm_result_independent_of_caller_tiling) {
  std::mt19937 rng(7);
  const Problem p = make_problem(45, 7 * kBlockN - 3, 161, rng);
  for (Isa isa : available_isas()) {
    const KernelTable& t = kernel_table(isa);
    for (bool accumulate : {false, true}) {
      const std::vector<float> whole = run(t, p, accumulate);
      std::vector<float> split = p.c0;
      const int64_t row_steps[] = {1, 2, 5, 11, 26};
      const int64_t blk_steps[] = {1, 2, 4};
      int64_t m0 = 0;
      for (int i = 0; m0 < p.a.M; ++i) {
        const int64_t rows = std::min<int64_t>(row_steps[i % 5], p.a.M - m0);
        int64_t b0 = 0;
        for (int j = 0; b0 < p.nblk; ++j) {
          const int64_t blks = std::min<int64_t>(blk_steps[(i + j) % 3], p.nblk - b0);
          t.gemm_bf16(rows, blks, p.a.Kp, p.a.data.data() + m0 * p.a.lda, p.a.lda,
                      p.packed.data() + b0 * kBlockN * p.a.Kp,
                      split.data() + m0 * p.ldc + b0 * kBlockN, p.ldc, accumulate);
          b0 += blks;
        }
        m0 += rows;
      }
      REQUIRE(std::memcmp(whole.data(), split.data(), whole.size() * sizeof(float)) == 0,
              "%s: split calls differ from one call (accumulate=%d)", isa_name(isa),
              int(accumulate));
    }
  }
}

// Many rows of a deep A (1.2 MB: the AMX kernel passes over B in steps of 96 rows) give the same
// bits in one call as in calls of 32 rows, which each fit one pass.
TEST(gemm_many_rows_equal_calls_of_32_rows) {
  std::mt19937 rng(8);
  const Problem p = make_problem(300, 100, 2048, rng);
  for (Isa isa : available_isas()) {
    const KernelTable& t = kernel_table(isa);
    const std::vector<float> whole = run(t, p, true);
    std::vector<float> split = p.c0;
    for (int64_t m0 = 0; m0 < p.a.M; m0 += 32) {
      t.gemm_bf16(std::min<int64_t>(32, p.a.M - m0), p.nblk, p.a.Kp, p.a.data.data() + m0 * p.a.lda,
                  p.a.lda, p.packed.data(), split.data() + m0 * p.ldc, p.ldc, true);
    }
    REQUIRE(std::memcmp(whole.data(), split.data(), whole.size() * sizeof(float)) == 0,
            "%s: one call of 300 rows differs from calls of 32", isa_name(isa));
  }
}

// M = 0 or no blocks: nothing is read or written.
TEST(gemm_empty_is_a_no_op) {
  std::mt19937 rng(3);
  const Problem p = make_problem(4, 32, 64, rng);
  for (Isa isa : available_isas()) {
    const KernelTable& t = kernel_table(isa);
    std::vector<float> c = p.c0;
    t.gemm_bf16(0, p.nblk, p.a.Kp, p.a.data.data(), p.a.lda, p.packed.data(), c.data(), p.ldc,
                false);
    t.gemm_bf16(p.a.M, 0, p.a.Kp, p.a.data.data(), p.a.lda, p.packed.data(), c.data(), p.ldc,
                false);
    REQUIRE(c == p.c0, "%s wrote C for an empty product", isa_name(isa));
  }
}

// NaN and Inf in A reach exactly the outputs of their row; other rows stay finite.
TEST(gemm_propagates_nan_and_inf) {
  std::mt19937 rng(11);
  Problem p = make_problem(10, 40, 70, rng);
  p.a.data[3 * p.a.lda + 5] = 0x7fc0;   // NaN
  p.a.data[6 * p.a.lda + 69] = 0x7f80;  // +Inf (row 6 gets +-Inf or NaN)
  for (Isa isa : available_isas()) {
    const std::vector<float> c = run(kernel_table(isa), p, false);
    for (int64_t m = 0; m < p.a.M; ++m) {
      for (int64_t n = 0; n < p.N; ++n) {
        const float v = c[m * p.ldc + n];
        if (m == 3) {
          REQUIRE(std::isnan(v), "%s: row 3 col %lld is %g, not NaN", isa_name(isa), (long long)n,
                  v);
        } else if (m == 6) {
          REQUIRE(!std::isfinite(v), "%s: row 6 col %lld is finite", isa_name(isa), (long long)n);
        } else {
          REQUIRE(std::isfinite(v), "%s: row %lld col %lld is %g", isa_name(isa), (long long)m,
                  (long long)n, v);
        }
      }
    }
  }
}

int main(int argc, char** argv) { return kt::testing::run_all(argc, argv); }
