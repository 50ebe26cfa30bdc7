// The fused dequantize + GEMM kernels (KernelTable::gemm_q8 / gemm_q4) of every ISA runnable here:
// bit-identical to what the engine otherwise does on the same ISA, i.e. dequantizing the blocks
// (engine/quant.h, quant::dequant_blocks) and calling that ISA's gemm_bf16. Odd row counts around
// every micro-tile height, odd block counts, K with padding, int4 groups 32 / 64 / 128 (with a
// partial last group), accumulate on and off, padded lda / ldc (nothing outside C is written), and
// results independent of how a caller splits M and N.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "engine/quant.h"
#include "gemm_data.h"
#include "kernels/dispatch.h"
#include "kernels/quant_kernels.h"

using namespace kt::kernels;
namespace quant = kt::engine::quant;

namespace {

// One quantized weight: N x K codes (the full int8 / int4 range) and scales in the engine's
// storage (packed blocks, scales per packed row), plus its dequantized bf16 blocks.
struct QWeight {
  quant::Format f;
  int64_t N, nblk;
  std::vector<uint8_t> blocks;
  std::vector<float> scales;
  std::vector<bf16> dequant;
};

QWeight make_weight(quant::Kind kind, int64_t N, int64_t K, int64_t group, std::mt19937& rng) {
  QWeight w{quant::make_format(kind, K, group), N, packed_blocks(N), {}, {}, {}};
  const int64_t bb = quant::block_bytes(w.f), rows = w.nblk * kBlockN;
  w.blocks.assign(static_cast<size_t>(w.nblk * bb), 0);
  w.scales.assign(static_cast<size_t>(rows * w.f.ngroups), 0.0f);
  const int lo = kind == quant::Kind::int4 ? -8 : -128, hi = kind == quant::Kind::int4 ? 7 : 127;
  std::uniform_int_distribution<int> code(lo, hi);
  std::uniform_real_distribution<float> mant(1.0f, 2.0f);
  std::uniform_int_distribution<int> expo(-12, -2);
  std::vector<int8_t> row(static_cast<size_t>(K));
  for (int64_t n = 0; n < N; ++n) {
    for (auto& c : row) c = static_cast<int8_t>(code(rng));
    quant::place_row(w.f, row.data(), K, static_cast<int>(n % kBlockN),
                     w.blocks.data() + (n / kBlockN) * bb);
    for (int64_t g = 0; g < w.f.ngroups; ++g) {
      // Every few rows a zero scale (an all-zero group), else a normal one.
      w.scales[n * w.f.ngroups + g] = (n + g) % 7 == 3 ? 0.0f : std::ldexp(mant(rng), expo(rng));
    }
  }
  w.dequant.assign(static_cast<size_t>(w.nblk * kBlockN * w.f.Kp), 0);
  quant::dequant_blocks(*scalar_quant_table(), w.f, w.blocks.data(), w.scales.data(), w.nblk,
                        w.dequant.data());
  return w;
}

// gemm_q8 / gemm_q4 of table t on blocks [b0, b0 + nb) of w.
void fused(const KernelTable& t, const QWeight& w, int64_t M, int64_t b0, int64_t nb, const bf16* A,
           int64_t lda, float* C, int64_t ldc, bool acc) {
  const int64_t bb = quant::block_bytes(w.f);
  const float* sc = w.scales.data() + b0 * kBlockN * w.f.ngroups;
  if (w.f.kind == quant::Kind::int8) {
    t.gemm_q8(M, nb, w.f.Kp, A, lda, reinterpret_cast<const int8_t*>(w.blocks.data()) + b0 * bb, sc,
              C, ldc, acc);
  } else {
    t.gemm_q4(M, nb, w.f.Kp, w.f.group, A, lda, w.blocks.data() + b0 * bb, sc, C, ldc, acc);
  }
}

std::vector<float> initial_c(int64_t M, int64_t ldc, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  std::vector<float> c(static_cast<size_t>((M + 1) * ldc));  // one row past C: must stay
  for (auto& x : c) x = u(rng);
  return c;
}

// The table of `isa` itself (a failed self-test would hand out the next ISA's table instead).
const KernelTable& own_table(Isa isa) {
  const KernelTable& t = kernel_table(isa);
  REQUIRE(t.isa == isa, "%s fell back to %s: %s", isa_name(isa), isa_name(t.isa),
          self_test_status(isa).c_str());
  return t;
}

const char* kind_name(const QWeight& w) { return w.f.kind == quant::Kind::int8 ? "int8" : "int4"; }

void check_case(Isa isa, quant::Kind kind, int64_t M, int64_t N, int64_t K, int64_t group,
                std::mt19937& rng) {
  const KernelTable& t = own_table(isa);
  const QWeight w = make_weight(kind, N, K, group, rng);
  const auto a = kt::testing::make_a(M, K, (M + N) % 3 * 16 + 8, rng);
  const int64_t ldc = w.nblk * kBlockN + 5;
  const auto c0 = initial_c(M, ldc, rng);
  for (bool acc : {false, true}) {
    auto want = c0, got = c0;
    t.gemm_bf16(M, w.nblk, w.f.Kp, a.data.data(), a.lda, w.dequant.data(), want.data(), ldc, acc);
    fused(t, w, M, 0, w.nblk, a.data.data(), a.lda, got.data(), ldc, acc);
    REQUIRE(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0,
            "%s %s M=%lld N=%lld K=%lld group=%lld acc=%d: fused != dequant + gemm_bf16",
            isa_name(isa), kind_name(w), (long long)M, (long long)N, (long long)K,
            (long long)w.f.group, int(acc));
  }
}

}  // namespace

TEST(every_runnable_isa_has_fused_kernels) {
  for (Isa isa : available_isas()) {
    const KernelTable& t = own_table(isa);
    REQUIRE(t.gemm_q8 != nullptr && t.gemm_q4 != nullptr, "%s has no fused kernels", isa_name(isa));
  }
}

TEST(fused_int8_bit_identical_on_odd_sizes) {
  std::mt19937 rng(21);
  for (Isa isa : available_isas()) {
    const bool scalar = isa == Isa::scalar;  // slow reference: fewer sizes
    for (int64_t M : {1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17, 33}) {
      if (scalar && M > 9) continue;
      for (int64_t N : {16, 17, 48, 100}) {
        for (int64_t K : {32, 33, 95, 200}) check_case(isa, quant::Kind::int8, M, N, K, 0, rng);
      }
    }
  }
}

TEST(fused_int4_bit_identical_on_odd_sizes_and_groups) {
  std::mt19937 rng(22);
  for (Isa isa : available_isas()) {
    const bool scalar = isa == Isa::scalar;
    for (int64_t group : {32, 64, 128}) {
      for (int64_t M : {1, 2, 3, 5, 6, 7, 8, 9, 16, 17}) {
        if (scalar && M > 7) continue;
        for (int64_t N : {16, 40, 100}) {
          // K = 200: Kp 224, so the last group of 64 / 128 is partial.
          for (int64_t K : {64, 200, 256}) check_case(isa, quant::Kind::int4, M, N, K, group, rng);
        }
      }
    }
  }
}

TEST(fused_bit_identical_at_model_sizes) {
  std::mt19937 rng(23);
  for (Isa isa : available_isas()) {
    if (isa == Isa::scalar) continue;
    check_case(isa, quant::Kind::int8, 3, 96, 2048, 0, rng);
    check_case(isa, quant::Kind::int4, 5, 96, 2048, 128, rng);
    check_case(isa, quant::Kind::int4, 8, 64, 768, 64, rng);
  }
}

// Splitting M and N across calls gives the same bits as one call (the engine splits both).
TEST(fused_result_independent_of_caller_tiling) {
  std::mt19937 rng(24);
  for (Isa isa : available_isas()) {
    const KernelTable& t = own_table(isa);
    for (quant::Kind kind : {quant::Kind::int8, quant::Kind::int4}) {
      const int64_t M = 23, N = 7 * kBlockN - 3, K = 192;
      const QWeight w = make_weight(kind, N, K, 64, rng);
      const auto a = kt::testing::make_a(M, K, 16, rng);
      const int64_t ldc = w.nblk * kBlockN + 1;
      const auto c0 = initial_c(M, ldc, rng);
      auto whole = c0, split = c0;
      fused(t, w, M, 0, w.nblk, a.data.data(), a.lda, whole.data(), ldc, true);
      const int64_t row_steps[] = {1, 2, 5, 11};
      const int64_t blk_steps[] = {1, 2, 4};
      int64_t m0 = 0;
      for (int i = 0; m0 < M; ++i) {
        const int64_t rows = std::min<int64_t>(row_steps[i % 4], M - m0);
        int64_t b0 = 0;
        for (int j = 0; b0 < w.nblk; ++j) {
          const int64_t nb = std::min<int64_t>(blk_steps[(i + j) % 3], w.nblk - b0);
          fused(t, w, rows, b0, nb, a.data.data() + m0 * a.lda, a.lda,
                split.data() + m0 * ldc + b0 * kBlockN, ldc, true);
          b0 += nb;
        }
        m0 += rows;
      }
      REQUIRE(whole == split, "%s %s: split calls differ from one call", isa_name(isa),
              kind == quant::Kind::int8 ? "int8" : "int4");
    }
  }
}

TEST(fused_empty_is_a_no_op) {
  std::mt19937 rng(25);
  const QWeight w = make_weight(quant::Kind::int8, 32, 64, 0, rng);
  const auto a = kt::testing::make_a(4, 64, 0, rng);
  for (Isa isa : available_isas()) {
    const KernelTable& t = own_table(isa);
    const auto c0 = initial_c(4, 32, rng);
    auto c = c0;
    fused(t, w, 0, 0, w.nblk, a.data.data(), a.lda, c.data(), 32, false);
    fused(t, w, 4, 0, 0, a.data.data(), a.lda, c.data(), 32, false);
    REQUIRE(c == c0, "%s wrote C for an empty product", isa_name(isa));
  }
}

int main(int argc, char** argv) { return kt::testing::run_all(argc, argv); }
