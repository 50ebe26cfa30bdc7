// The AMX kernels' tile configuration, addressing, row passes and M / N tails (gemm_bf16 on
// TDPBF16PS, gemm_i8 on TDPBSSD), run on a software model of the tile instructions
// (amx_emulator.h), so they are checked on every machine, AMX or not. The file is compiled with
// baseline flags: the kernels use no intrinsic but the (modelled) tile ones. The real instructions
// run in test_gemm and test_gemm_i8 where AMX exists. Tolerance vs scalar as for amx in
// test_gemm.cpp: 2 (Kp + 1) 2^-24 (|C0| + sum_k |A B|) for bf16; 0 for int8 (exact integer sums).
#define KT_CPU_CAPABILITY amx_emulated
#define KT_AMX_GEMM_ONLY
#include "kernels/intrinsics.h"
#include "amx_emulator.h"
#include "kernels/amx/gemm.cpp"

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "check.h"
#include "engine/quant.h"
#include "gemm_data.h"
#include "kernels/quant_kernels.h"

using namespace kt::kernels;

TEST(amx_kernel_on_tile_model_matches_scalar) {
  const KernelTable amx{Isa::amx, &gemm_bf16};
  const KernelTable& ref = *scalar_table();
  std::mt19937 rng(31);
  for (int64_t M : {1, 2, 15, 16, 17, 31, 32, 33, 47, 48, 64, 70}) {
    for (int64_t N : {1, 16, 17, 33, 48, 80}) {
      for (int64_t K : {1, 32, 33, 95}) {
        const auto a = kt::testing::make_a(M, K, 16, rng);
        const auto w = kt::testing::random_bf16(static_cast<size_t>(N * K), rng);
        const auto packed = kt::testing::pack(w, N, K);
        const int64_t nblk = packed_blocks(N), ldc = nblk * kBlockN + 3;
        std::vector<float> C0(static_cast<size_t>((M + 1) * ldc));
        for (auto& x : C0) x = static_cast<float>(rng() % 64) / 8.0f - 4.0f;
        for (bool acc : {false, true}) {
          auto got = C0, want = C0;
          amx_emu::state().dp_calls = 0;
          amx.gemm_bf16(M, nblk, a.Kp, a.data.data(), a.lda, packed.data(), got.data(), ldc, acc);
          ref.gemm_bf16(M, nblk, a.Kp, a.data.data(), a.lda, packed.data(), want.data(), ldc, acc);
          REQUIRE(amx_emu::errors().empty(), "M=%lld N=%lld K=%lld: %s", (long long)M, (long long)N,
                  (long long)K, amx_emu::errors().front().c_str());
          REQUIRE(!amx_emu::state().configured, "tiles not released after the call");
          // One TDPBF16PS per (16-row tile, block, 32 k).
          const int64_t expect = (M + 15) / 16 * nblk * (a.Kp / 32);
          REQUIRE(amx_emu::state().dp_calls == expect,
                  "M=%lld N=%lld K=%lld: %lld dot calls, expected %lld", (long long)M, (long long)N,
                  (long long)K, (long long)amx_emu::state().dp_calls, (long long)expect);
          for (int64_t m = 0; m <= M; ++m) {
            for (int64_t n = 0; n < ldc; ++n) {
              const size_t i = static_cast<size_t>(m * ldc + n);
              if (m == M || n >= nblk * kBlockN) {
                REQUIRE(got[i] == C0[i], "wrote outside C at (%lld, %lld)", (long long)m,
                        (long long)n);
                continue;
              }
              double mag = acc ? std::fabs(C0[i]) : 0.0;
              for (int64_t k = 0; k < K && n < N; ++k) {
                mag += std::fabs(double(bf16_to_f32(a.data[m * a.lda + k])) *
                                 bf16_to_f32(w[n * K + k]));
              }
              const double tol = 2.0 * double(a.Kp + 1) * std::ldexp(mag, -24);
              REQUIRE(std::fabs(double(got[i]) - want[i]) <= tol,
                      "M=%lld N=%lld K=%lld acc=%d at (%lld, %lld): got %g, scalar %g",
                      (long long)M, (long long)N, (long long)K, int(acc), (long long)m,
                      (long long)n, got[i], want[i]);
            }
          }
        }
      }
    }
  }
}

// gemm_i8 (AMX-INT8, tdpbssd) on the tile model: bitwise equal to the scalar reference (exact
// integer sums), one TDPBSSD per (16-row tile, block, 64 k), nothing written outside C.
TEST(amx_int8_kernel_on_tile_model_matches_scalar) {
  const KernelTable& ref = *scalar_table();
  std::mt19937 rng(37);
  std::uniform_int_distribution<int> code(-128, 127);
  for (int64_t M : {1, 2, 15, 16, 17, 31, 32, 33, 47, 64, 70}) {
    for (int64_t N : {1, 16, 17, 33, 48, 80}) {
      for (int64_t K : {1, 63, 64, 65, 200}) {
        const int64_t Kp = packed_k8(K), lda = Kp + 20, nblk = packed_blocks(N);
        const int64_t ldc = nblk * kBlockN + 3, bb = i8_block_bytes(Kp);
        std::vector<int8_t> a(static_cast<size_t>(M * lda + 1), 0);
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t k = 0; k < K; ++k) a[m * lda + k] = static_cast<int8_t>(code(rng));
        }
        std::vector<int8_t> b(static_cast<size_t>(nblk * bb), 0);
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t k = 0; k < K; ++k) {
            b[(n / kBlockN) * bb + i8_offset(n, k)] = static_cast<int8_t>(code(rng));
          }
        }
        for (int64_t blk = 0; blk < nblk; ++blk) i8_set_row_sums(b.data() + blk * bb, Kp);
        std::vector<int32_t> C0(static_cast<size_t>((M + 1) * ldc));
        for (auto& x : C0) x = static_cast<int32_t>(rng() % 100000) - 50000;
        for (bool acc : {false, true}) {
          auto got = C0, want = C0;
          amx_emu::state().dp_calls = 0;
          gemm_i8(M, nblk, Kp, a.data(), lda, b.data(), got.data(), ldc, acc);
          ref.gemm_i8(M, nblk, Kp, a.data(), lda, b.data(), want.data(), ldc, acc);
          REQUIRE(amx_emu::errors().empty(), "M=%lld N=%lld K=%lld: %s", (long long)M, (long long)N,
                  (long long)K, amx_emu::errors().front().c_str());
          REQUIRE(!amx_emu::state().configured, "tiles not released after the call");
          const int64_t expect = (M + 15) / 16 * nblk * (Kp / 64);
          REQUIRE(amx_emu::state().dp_calls == expect,
                  "M=%lld N=%lld K=%lld: %lld dot calls, expected %lld", (long long)M, (long long)N,
                  (long long)K, (long long)amx_emu::state().dp_calls, (long long)expect);
          REQUIRE(got == want, "M=%lld N=%lld K=%lld acc=%d: differs from scalar", (long long)M,
                  (long long)N, (long long)K, int(acc));
        }
      }
    }
  }
}

// Calls whose A exceeds one pass (512 KiB) run M in several passes over the column pairs: int8
// still equals the scalar reference, and bf16 gives the bits of calls of 32 rows, which each fit
// one pass. Each product is still counted once.
TEST(amx_kernels_on_tile_model_in_row_passes) {
  std::mt19937 rng(41);
  std::uniform_int_distribution<int> code(-128, 127);
  {  // int8: depth 2048, lda 2068 bytes: passes of 224 rows, then 128, then a 24-row tail
    const int64_t M = 600, N = 40, Kp = 2048, lda = Kp + 20, nblk = packed_blocks(N);
    const int64_t ldc = nblk * kBlockN, bb = i8_block_bytes(Kp);
    std::vector<int8_t> a(static_cast<size_t>(M * lda));
    for (auto& x : a) x = static_cast<int8_t>(code(rng));
    std::vector<int8_t> b(static_cast<size_t>(nblk * bb), 0);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < Kp; ++k) {
        b[(n / kBlockN) * bb + i8_offset(n, k)] = static_cast<int8_t>(code(rng));
      }
    }
    for (int64_t blk = 0; blk < nblk; ++blk) i8_set_row_sums(b.data() + blk * bb, Kp);
    std::vector<int32_t> got(static_cast<size_t>(M * ldc)), want(got.size());
    amx_emu::state().dp_calls = 0;
    gemm_i8(M, nblk, Kp, a.data(), lda, b.data(), got.data(), ldc, false);
    scalar_table()->gemm_i8(M, nblk, Kp, a.data(), lda, b.data(), want.data(), ldc, false);
    REQUIRE(amx_emu::errors().empty(), "int8: %s", amx_emu::errors().front().c_str());
    REQUIRE(amx_emu::state().dp_calls == (M + 15) / 16 * nblk * (Kp / 64), "int8: dot calls");
    REQUIRE(got == want, "int8 M=600 in passes differs from scalar");
  }
  {  // bf16: depth 2048, lda 2080: passes of 96 rows, then a 12-row tail
    const int64_t M = 300, N = 40, K = 2048;
    const auto a = kt::testing::make_a(M, K, 32, rng);
    const auto packed = kt::testing::pack(kt::testing::random_bf16(N * K, rng), N, K);
    const int64_t nblk = packed_blocks(N), ldc = nblk * kBlockN;
    std::vector<float> whole(static_cast<size_t>(M * ldc)), split(whole.size());
    amx_emu::state().dp_calls = 0;
    gemm_bf16(M, nblk, a.Kp, a.data.data(), a.lda, packed.data(), whole.data(), ldc, false);
    REQUIRE(amx_emu::errors().empty(), "bf16: %s", amx_emu::errors().front().c_str());
    REQUIRE(amx_emu::state().dp_calls == (M + 15) / 16 * nblk * (a.Kp / 32), "bf16: dot calls");
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
      gemm_bf16(std::min<int64_t>(32, M - m0), nblk, a.Kp, a.data.data() + m0 * a.lda, a.lda,
                packed.data(), split.data() + m0 * ldc, ldc, false);
    }
    REQUIRE(whole == split, "bf16 M=300 in passes differs from calls of 32 rows");
  }
}

TEST(tile_model_int8_semantics) {
  // One TDPBSSD of a 1-row A (4 k) and a 1-row B (one quad of 16 columns): signed bytes, 4 per
  // lane, added to C with wrap-around.
  TileConfig cfg = make_config(1, 0);
  cfg.rows[6] = 1;
  cfg.colsb[4] = 4;  // A: 1 row x 4 bytes = 4 * B.rows
  amx_emu::errors().clear();
  _tile_loadconfig(&cfg);
  const int8_t A[4] = {-128, 127, -1, 2};
  int8_t B[64];
  for (int i = 0; i < 64; ++i) B[i] = static_cast<int8_t>(i % 4 == 0 ? -128 : i - 32);
  int32_t C[16];
  for (int n = 0; n < 16; ++n) C[n] = n == 5 ? 2147483647 : n;
  _tile_loadd(0, C, 64);
  _tile_loadd(4, A, 4);
  _tile_loadd(6, B, 64);
  _tile_dpbssd(0, 4, 6);
  _tile_stored(0, C, 64);
  _tile_release();
  REQUIRE(amx_emu::errors().empty(), "%s", amx_emu::errors().front().c_str());
  for (int n = 0; n < 16; ++n) {
    const int64_t dot =
        int64_t{-128} * -128 + 127 * (4 * n + 1 - 32) - (4 * n + 2 - 32) + 2 * (4 * n + 3 - 32);
    const int64_t start = n == 5 ? 2147483647 : n;
    const int32_t want = static_cast<int32_t>(static_cast<uint32_t>(start + dot));
    REQUIRE(C[n] == want, "column %d: %d, want %d", n, C[n], want);
  }
}

// The fused int8 / int4 kernels stage each B tile through L1 and then run the tile sequence of
// gemm_bf16: bit-identical to dequantization + gemm_bf16 on the same (modelled) tiles.
TEST(amx_fused_kernels_on_tile_model_equal_dequant_plus_gemm) {
  namespace quant = kt::engine::quant;
  std::mt19937 rng(32);
  for (quant::Kind kind : {quant::Kind::int8, quant::Kind::int4}) {
    for (int64_t group : {32, 64, 128}) {
      if (kind == quant::Kind::int8 && group != 32) continue;
      for (int64_t M : {1, 5, 16, 17, 33}) {
        for (int64_t N : {16, 48}) {
          for (int64_t K : {32, 96, 200}) {
            const quant::Format f = quant::make_format(kind, K, group);
            const int64_t nblk = packed_blocks(N), bb = quant::block_bytes(f);
            std::vector<uint8_t> blocks(static_cast<size_t>(nblk * bb));
            for (auto& b : blocks) b = static_cast<uint8_t>(rng() & 0xff);
            std::vector<float> scales(static_cast<size_t>(nblk * kBlockN * f.ngroups));
            for (auto& s : scales) s = std::ldexp(1.0f + float(rng() % 256) / 256.0f, -7);
            std::vector<bf16> dq(static_cast<size_t>(nblk * kBlockN * f.Kp));
            quant::dequant_blocks(*scalar_quant_table(), f, blocks.data(), scales.data(), nblk,
                                  dq.data());
            const auto a = kt::testing::make_a(M, K, 16, rng);
            const int64_t ldc = nblk * kBlockN + 3;
            std::vector<float> C0(static_cast<size_t>((M + 1) * ldc));
            for (auto& x : C0) x = static_cast<float>(rng() % 64) / 8.0f - 4.0f;
            for (bool acc : {false, true}) {
              auto got = C0, want = C0;
              gemm_bf16(M, nblk, f.Kp, a.data.data(), a.lda, dq.data(), want.data(), ldc, acc);
              if (kind == quant::Kind::int8) {
                gemm_q8(M, nblk, f.Kp, a.data.data(), a.lda,
                        reinterpret_cast<const int8_t*>(blocks.data()), scales.data(), got.data(),
                        ldc, acc);
              } else {
                gemm_q4(M, nblk, f.Kp, group, a.data.data(), a.lda, blocks.data(), scales.data(),
                        got.data(), ldc, acc);
              }
              REQUIRE(amx_emu::errors().empty(), "%s", amx_emu::errors().front().c_str());
              REQUIRE(got == want, "%s M=%lld N=%lld K=%lld group=%lld acc=%d: fused differs",
                      kind == quant::Kind::int8 ? "int8" : "int4", (long long)M, (long long)N,
                      (long long)K, (long long)group, int(acc));
            }
          }
        }
      }
    }
  }
}

TEST(tile_model_catches_bad_configurations) {
  // The model itself: a shape mismatch and use of an unconfigured tile are reported.
  TileConfig cfg = make_config(16, 0);
  amx_emu::errors().clear();
  _tile_loadconfig(&cfg);
  _tile_zero(2);  // rows1 = 0: tile 2 unconfigured
  REQUIRE(!amx_emu::errors().empty(), "unconfigured tile not caught");
  amx_emu::errors().clear();
  cfg.rows[4] = 8;  // A rows != C rows
  _tile_loadconfig(&cfg);
  _tile_dpbf16ps(0, 4, 6);
  REQUIRE(!amx_emu::errors().empty(), "shape mismatch not caught");
  _tile_release();
  amx_emu::errors().clear();
}

int main(int argc, char** argv) { return kt::testing::run_all(argc, argv); }
