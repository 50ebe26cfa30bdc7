// gemm_i8 (int8 x int8 -> int32 over VNNI-4 blocks) of every ISA runnable here against the scalar
// reference. Integer sums are exact (modulo 2^32), so every ISA must give the same bits: the
// tolerance is 0. AMX-INT8 runs here only on CPUs that have it; test_amx_emulated.cpp checks the
// AMX kernel on a software model of the tile unit everywhere.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "kernels/dispatch.h"
#include "kernels/kernels.h"
#include "kernels/quant_kernels.h"

using namespace kt::kernels;

namespace {

std::vector<Isa> simd_isas() {
  std::vector<Isa> out;
  for (Isa isa : available_isas()) {
    if (isa == Isa::scalar) continue;
    REQUIRE(kernel_table(isa).isa == isa, "%s fell back: self-test: %s", isa_name(isa),
            self_test_status(isa).c_str());
    out.push_back(isa);
  }
  return out;
}

struct Problem {
  int64_t M, N, K, Kp, lda, nblk, ldc;
  std::vector<int8_t> a, w, packed;  // A (M x lda), W (N x K), packed blocks
  std::vector<int32_t> c0;
};

// Codes over the full int8 range (lo = -128), or the engine's symmetric range (lo = -127).
Problem make_problem(int64_t M, int64_t N, int64_t K, int lo, std::mt19937& rng) {
  Problem p;
  p.M = M;
  p.N = N;
  p.K = K;
  p.Kp = packed_k8(K);
  p.lda = p.Kp + (M + K) % 3 * 16 + 4;
  p.nblk = packed_blocks(N);
  p.ldc = p.nblk * kBlockN + 5;
  std::uniform_int_distribution<int> code(lo, 127);
  p.a.assign(static_cast<size_t>(M * p.lda + 1), 0);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) p.a[m * p.lda + k] = static_cast<int8_t>(code(rng));
  }
  p.w.resize(static_cast<size_t>(N * K));
  for (auto& v : p.w) v = static_cast<int8_t>(code(rng));
  const int64_t bb = i8_block_bytes(p.Kp);
  p.packed.assign(static_cast<size_t>(p.nblk * bb), 0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) p.packed[(n / kBlockN) * bb + i8_offset(n, k)] = p.w[n * K + k];
  }
  for (int64_t b = 0; b < p.nblk; ++b) i8_set_row_sums(p.packed.data() + b * bb, p.Kp);
  std::uniform_int_distribution<int32_t> c(-(1 << 24), 1 << 24);
  p.c0.resize(static_cast<size_t>((M + 1) * p.ldc));
  for (auto& v : p.c0) v = c(rng);
  return p;
}

std::vector<int32_t> run(const KernelTable& t, const Problem& p, bool accumulate) {
  std::vector<int32_t> c = p.c0;
  t.gemm_i8(p.M, p.nblk, p.Kp, p.a.data(), p.lda, p.packed.data(), c.data(), p.ldc, accumulate);
  return c;
}

// Exact int64 value of C[m][n] (n < N) computed from the unpacked matrices.
int64_t exact(const Problem& p, int64_t m, int64_t n) {
  int64_t s = 0;
  for (int64_t k = 0; k < p.K; ++k) s += int64_t{p.a[m * p.lda + k]} * p.w[n * p.K + k];
  return s;
}

}  // namespace

TEST(scalar_reference_is_the_exact_product) {
  std::mt19937 rng(5);
  const KernelTable& ref = kernel_table(Isa::scalar);
  for (int64_t K : {1, 63, 64, 65, 300}) {
    const Problem p = make_problem(5, 37, K, -128, rng);
    for (bool acc : {false, true}) {
      const std::vector<int32_t> c = run(ref, p, acc);
      for (int64_t m = 0; m <= p.M; ++m) {
        for (int64_t n = 0; n < p.ldc; ++n) {
          const size_t i = static_cast<size_t>(m * p.ldc + n);
          int64_t want = p.c0[i];
          if (m < p.M && n < p.nblk * kBlockN) {
            want = (acc ? want : 0) + (n < p.N ? exact(p, m, n) : 0);
          }
          REQUIRE(c[i] == want, "K=%lld acc=%d at (%lld, %lld): %d, want %lld", (long long)K,
                  int(acc), (long long)m, (long long)n, c[i], (long long)want);
        }
      }
    }
  }
}

// Odd sizes around every micro-tile edge (3, 6 rows; 1, 2, 4 blocks; 2 AMX tiles), K below / at /
// above 64 and with a ragged tail, full int8 range and the engine's symmetric one.
TEST(gemm_i8_bitwise_equal_to_scalar_on_odd_sizes) {
  const KernelTable& ref = kernel_table(Isa::scalar);
  std::mt19937 rng(77);
  const int64_t Ms[] = {1, 2, 3, 4, 5, 6, 7, 12, 13, 16, 17, 31, 32, 33, 70};
  const int64_t Ns[] = {1, 16, 17, 40, 64, 100};
  const int64_t Ks[] = {1, 3, 63, 64, 65, 130, 300};
  for (Isa isa : simd_isas()) {
    const KernelTable& t = kernel_table(isa);
    for (int64_t M : Ms) {
      for (int64_t N : Ns) {
        for (int64_t K : Ks) {
          const Problem p = make_problem(M, N, K, (M + N + K) % 2 ? -128 : -127, rng);
          for (bool acc : {false, true}) {
            const std::vector<int32_t> got = run(t, p, acc), want = run(ref, p, acc);
            REQUIRE(got == want, "%s M=%lld N=%lld K=%lld acc=%d differs from scalar",
                    isa_name(isa), (long long)M, (long long)N, (long long)K, int(acc));
          }
        }
      }
    }
  }
}

// Rows enough for the AMX kernel to pass over B more than once (A of 1.2 MB: passes of 224 rows,
// then a tail).
TEST(gemm_i8_bitwise_equal_to_scalar_over_many_rows) {
  const KernelTable& ref = kernel_table(Isa::scalar);
  std::mt19937 rng(78);
  const Problem p = make_problem(600, 100, 2048, -127, rng);
  for (Isa isa : simd_isas()) {
    for (bool acc : {false, true}) {
      REQUIRE(run(kernel_table(isa), p, acc) == run(ref, p, acc),
              "%s M=600 N=100 K=2048 acc=%d differs from scalar", isa_name(isa), int(acc));
    }
  }
}

// Extreme codes everywhere: the largest |sums| (K * 128 * 128) and the u8 offset of vpdpbusd at
// its limits; results must still be exact.
TEST(gemm_i8_extreme_codes) {
  const KernelTable& ref = kernel_table(Isa::scalar);
  std::mt19937 rng(3);
  Problem p = make_problem(9, 48, 4096, -128, rng);
  for (int64_t m = 0; m < p.M; ++m) {
    for (int64_t k = 0; k < p.K; ++k) p.a[m * p.lda + k] = static_cast<int8_t>(m % 2 ? -128 : 127);
  }
  const int64_t bb = i8_block_bytes(p.Kp);
  for (int64_t n = 0; n < p.N; ++n) {
    for (int64_t k = 0; k < p.K; ++k) {
      const int8_t v = static_cast<int8_t>(n % 3 == 0 ? -128 : (n % 3 == 1 ? 127 : -127));
      p.w[n * p.K + k] = v;
      p.packed[(n / kBlockN) * bb + i8_offset(n, k)] = v;
    }
  }
  for (int64_t b = 0; b < p.nblk; ++b) i8_set_row_sums(p.packed.data() + b * bb, p.Kp);
  const std::vector<int32_t> want = run(ref, p, false);
  for (int64_t m = 0; m < p.M; ++m) {
    for (int64_t n = 0; n < p.N; ++n) {
      REQUIRE(want[m * p.ldc + n] == exact(p, m, n), "scalar (%lld, %lld)", (long long)m,
              (long long)n);
    }
  }
  for (Isa isa : simd_isas()) {
    REQUIRE(run(kernel_table(isa), p, false) == want, "%s differs on extreme codes", isa_name(isa));
  }
}

// Splitting M and N across calls (as the engine's threads do) gives the same bits as one call.
TEST(gemm_i8_independent_of_caller_tiling) {
  std::mt19937 rng(9);
  const Problem p = make_problem(45, 7 * kBlockN - 3, 161, -127, rng);
  const int64_t bb = i8_block_bytes(p.Kp);
  for (Isa isa : available_isas()) {
    const KernelTable& t = kernel_table(isa);
    const std::vector<int32_t> whole = run(t, p, true);
    std::vector<int32_t> split = p.c0;
    int64_t m0 = 0;
    for (int i = 0; m0 < p.M; ++i) {
      const int64_t rows = std::min<int64_t>(1 + i % 5 * 3, p.M - m0);
      for (int64_t b0 = 0; b0 < p.nblk;) {
        const int64_t blks = std::min<int64_t>(1 + (i + b0) % 3, p.nblk - b0);
        t.gemm_i8(rows, blks, p.Kp, p.a.data() + m0 * p.lda, p.lda, p.packed.data() + b0 * bb,
                  split.data() + m0 * p.ldc + b0 * kBlockN, p.ldc, true);
        b0 += blks;
      }
      m0 += rows;
    }
    REQUIRE(whole == split, "%s: split calls differ from one call", isa_name(isa));
  }
}

TEST(gemm_i8_empty_is_a_no_op) {
  std::mt19937 rng(4);
  const Problem p = make_problem(4, 32, 64, -127, rng);
  for (Isa isa : available_isas()) {
    const KernelTable& t = kernel_table(isa);
    std::vector<int32_t> c = p.c0;
    t.gemm_i8(0, p.nblk, p.Kp, p.a.data(), p.lda, p.packed.data(), c.data(), p.ldc, false);
    t.gemm_i8(p.M, 0, p.Kp, p.a.data(), p.lda, p.packed.data(), c.data(), p.ldc, false);
    REQUIRE(c == p.c0, "%s wrote C for an empty product", isa_name(isa));
  }
}

// The VNNI-4 dequantization (backward's bf16 copy of W8A8 weights): the same bits on every ISA,
// and the values of the pair-layout int8 dequantization of the same codes.
TEST(dequant_i8x4_bit_identical_and_consistent) {
  std::mt19937 rng(21);
  const int64_t nquads = 13;
  std::vector<int8_t> codes(static_cast<size_t>(64 * nquads));
  for (size_t i = 0; i < codes.size(); ++i)
    codes[i] = static_cast<int8_t>(static_cast<int>(i * 37 % 256) - 128);
  float sv[32];
  for (int n = 0; n < 16; ++n) {
    sv[2 * n] = sv[2 * n + 1] =
        std::ldexp(1.0f + static_cast<float>(rng() % 1000) / 999.0f, -static_cast<int>(rng() % 20));
  }
  sv[6] = sv[7] = 0.0f;
  // The same codes in pair order, for the pair-layout kernel.
  std::vector<int8_t> pairs(codes.size());
  for (int64_t q = 0; q < nquads; ++q) {
    for (int h = 0; h < 2; ++h) {
      for (int n = 0; n < 16; ++n) {
        for (int i = 0; i < 2; ++i) {
          pairs[64 * q + 32 * h + 2 * n + i] = codes[64 * q + 4 * n + 2 * h + i];
        }
      }
    }
  }
  const QuantKernels& ref = *scalar_quant_table();
  std::vector<bf16> want(codes.size()), got(codes.size()), via_pairs(codes.size());
  ref.i8x4(nquads, codes.data(), sv, want.data());
  ref.i8(2 * nquads, pairs.data(), sv, via_pairs.data());
  REQUIRE(want == via_pairs, "scalar i8x4 differs from i8 on the reordered codes");
  for (Isa isa : available_isas()) {
    std::fill(got.begin(), got.end(), bf16{0x1234});
    quant_kernels(isa).i8x4(nquads, codes.data(), sv, got.data());
    REQUIRE(got == want, "%s i8x4 differs from the scalar reference", isa_name(isa));
  }
}

// The int8 transposed repack (backward's W^T of W8A8 weights): the scalar reference is the
// transpose element by element (codes, zero padding, row sums), every ISA gives its bytes, for
// any k0 / nblk / ldd, and gemm_i8 on it gives A . W exactly.
TEST(pack_transposed_i8_is_the_transpose) {
  std::mt19937 rng(31);
  const KernelTable& ref = kernel_table(Isa::scalar);
  for (int64_t N : {16, 37, 64, 100}) {
    for (int64_t K : {40, 64, 130}) {
      const Problem p = make_problem(3, N, K, -127, rng);
      const int64_t NT = packed_k8(N), bbt = i8_block_bytes(NT) + 32;  // ldd with a gap
      const int64_t nblk = p.Kp / kBlockN;
      // Scalar reference against the element-wise definition (k >= K and n >= N are zero).
      std::vector<int8_t> want(static_cast<size_t>(nblk * bbt), 5);
      ref.pack_transposed_i8(p.packed.data(), N, p.Kp, 0, nblk, want.data(), bbt);
      for (int64_t k = 0; k < p.Kp; ++k) {
        int8_t* blk = want.data() + (k / kBlockN) * bbt;
        int32_t sum = 0;
        for (int64_t n = 0; n < NT; ++n) {
          const int8_t v = (k < K && n < N) ? p.w[n * K + k] : 0;
          REQUIRE(blk[i8_offset(k, n)] == v, "N=%lld K=%lld code (%lld, %lld)", (long long)N,
                  (long long)K, (long long)k, (long long)n);
          sum += v;
        }
        int32_t got_sum;
        std::memcpy(&got_sum, blk + kBlockN * NT + 4 * (k % kBlockN), 4);
        REQUIRE(got_sum == sum, "N=%lld K=%lld row sum %lld", (long long)N, (long long)K,
                (long long)k);
      }
      for (int64_t b = 0; b < nblk; ++b) {  // the gap after each block is not written
        for (int64_t i = i8_block_bytes(NT); i < bbt; ++i) REQUIRE(want[b * bbt + i] == 5, "gap");
      }
      // Every ISA, by parts: k0 at every block, one or two blocks per call; rows beyond Kp zero.
      for (Isa isa : available_isas()) {
        const KernelTable& t = kernel_table(isa);
        std::vector<int8_t> got(want.size() + 2 * bbt, 5);
        for (int64_t b0 = 0; b0 < nblk + 2;) {
          const int64_t n = std::min<int64_t>(1 + b0 % 2, nblk + 2 - b0);
          t.pack_transposed_i8(p.packed.data(), N, p.Kp, b0 * kBlockN, n, got.data() + b0 * bbt,
                               bbt);
          b0 += n;
        }
        REQUIRE(std::equal(want.begin(), want.end(), got.begin()), "%s N=%lld K=%lld differs",
                isa_name(isa), (long long)N, (long long)K);
        for (int64_t i = 0; i < i8_block_bytes(NT); ++i) {
          REQUIRE(got[want.size() + i] == 0 && got[want.size() + bbt + i] == 0,
                  "%s: rows beyond Kp not zero", isa_name(isa));
        }
        // gemm_i8 on the transpose: C = B (M x N codes) . W (N x K).
        const int64_t M = 5, ldb = NT;
        std::vector<int8_t> Bm(static_cast<size_t>(M * ldb), 0);
        std::uniform_int_distribution<int> code(-127, 127);
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t n = 0; n < N; ++n) Bm[m * ldb + n] = static_cast<int8_t>(code(rng));
        }
        // Contiguous blocks for gemm_i8: repack again with ldd = the block size.
        std::vector<int8_t> packed_t(static_cast<size_t>(nblk * i8_block_bytes(NT)));
        t.pack_transposed_i8(p.packed.data(), N, p.Kp, 0, nblk, packed_t.data(),
                             i8_block_bytes(NT));
        std::vector<int32_t> C(static_cast<size_t>(M * p.Kp));
        t.gemm_i8(M, nblk, NT, Bm.data(), ldb, packed_t.data(), C.data(), p.Kp, false);
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t k = 0; k < K; ++k) {
            int64_t s = 0;
            for (int64_t n = 0; n < N; ++n) s += int64_t{Bm[m * ldb + n]} * p.w[n * K + k];
            REQUIRE(C[m * p.Kp + k] == s, "%s: gemm_i8 on the transpose (%lld, %lld)",
                    isa_name(isa), (long long)m, (long long)k);
          }
        }
      }
    }
  }
}

int main(int argc, char** argv) { return kt::testing::run_all(argc, argv); }
