// The fp32 helper entries of every runnable ISA against the scalar reference.
//
// Tolerances vs scalar:
//  * stream_rows_f32: an exact copy (non-temporal stores move bits), nothing written outside.
//  * scale_i32_f32: 0 (bit-identical): the same conversion and two products in the same order,
//    nothing written outside the rows.
//  * gemm_f32_nn / nt / tn, cvt_bf16_f32, cvt_f32_bf16, pack_transposed: 0 (bit-identical). The
//    SIMD versions keep the reference's operations and order: one fused multiply-add per product,
//    the same k order per element, 16 interleaved partial sums and the same tree for dot products,
//    the same integer rounding for bf16 (NaN made quiet, denormals kept).
//  * silu_mul, silu_mul_bwd: relative 1e-5 (+1e-30 absolute), for dg plus 1e-6 |dh u| (1 + |g|)
//    (silu' crosses zero near g = -1.28, where a relative bound means nothing). The SIMD exp is
//    a polynomial within a few ulp of libm's expf.
//  * silu_mul_interleaved_bf16: 0 (bit-identical) against the same table's silu_mul and
//    cvt_f32_bf16 on de-interleaved copies (what the engine computed before it had this entry);
//    so against scalar it is within silu_mul's bound above plus bf16's half-ulp rounding.
// Each entry is also checked to give the same bits for every start offset of its arrays.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "gemm_data.h"
#include "kernels/dispatch.h"
#include "kernels/kernels.h"
#include "kernels/self_test.h"

using namespace kt::kernels;

namespace {

std::vector<Isa> isas() {
  std::vector<Isa> out;
  for (Isa isa : available_isas()) {
    REQUIRE(kernel_table(isa).isa == isa, "%s fell back: %s", isa_name(isa),
            self_test_status(isa).c_str());
    out.push_back(isa);
  }
  return out;
}

std::vector<float> randn(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

using GemmF32 = gemm_f32_nn_fn;
struct GemmCase {
  const char* name;
  GemmF32 KernelTable::* entry;
  bool trans_a;  // A stored K x M
  bool trans_b;  // B stored N x K
};
const GemmCase kGemms[] = {{"gemm_f32_nn", &KernelTable::gemm_f32_nn, false, false},
                           {"gemm_f32_nt", &KernelTable::gemm_f32_nt, false, true},
                           {"gemm_f32_tn", &KernelTable::gemm_f32_tn, true, false}};

}  // namespace

TEST(gemm_f32_bit_identical_to_scalar) {
  const KernelTable& ref = kernel_table(Isa::scalar);
  std::mt19937 rng(21);
  const int64_t sizes[] = {1, 3, 4, 5, 8, 15, 16, 17, 31, 33, 64, 100};
  for (Isa isa : isas()) {
    const KernelTable& t = kernel_table(isa);
    for (const GemmCase& g : kGemms) {
      for (int64_t M : sizes) {
        for (int64_t N : sizes) {
          for (int64_t K : {1, 3, 8, 16, 17, 40, 200}) {
            const int64_t lda = (g.trans_a ? M : K) + 3, ldb = (g.trans_b ? K : N) + 5, ldc = N + 2;
            const auto A = randn(static_cast<size_t>((g.trans_a ? K : M) * lda), rng);
            const auto B = randn(static_cast<size_t>((g.trans_b ? N : K) * ldb), rng);
            const auto C0 = randn(static_cast<size_t>(M * ldc), rng);
            for (bool acc : {false, true}) {
              auto got = C0, want = C0;
              (t.*g.entry)(M, N, K, 0.375f, A.data(), lda, B.data(), ldb, got.data(), ldc, acc);
              (ref.*g.entry)(M, N, K, 0.375f, A.data(), lda, B.data(), ldb, want.data(), ldc, acc);
              REQUIRE(same_bits(got, want), "%s %s M=%lld N=%lld K=%lld acc=%d", isa_name(isa),
                      g.name, (long long)M, (long long)N, (long long)K, int(acc));
            }
          }
        }
      }
    }
  }
}

// Depths past one pass of the nn / tn products (vec_simd.h: kDepthPass = 256), where C carries
// over between passes: the bits of the scalar reference's single pass.
TEST(gemm_f32_bit_identical_across_depth_passes) {
  const KernelTable& ref = kernel_table(Isa::scalar);
  std::mt19937 rng(23);
  for (Isa isa : isas()) {
    const KernelTable& t = kernel_table(isa);
    for (const GemmCase& g : kGemms) {
      for (int64_t M : {1, 6, 17}) {
        for (int64_t N : {5, 40}) {
          for (int64_t K : {255, 256, 257, 600}) {
            const int64_t lda = (g.trans_a ? M : K) + 1, ldb = (g.trans_b ? K : N) + 3, ldc = N;
            const auto A = randn(static_cast<size_t>((g.trans_a ? K : M) * lda), rng);
            const auto B = randn(static_cast<size_t>((g.trans_b ? N : K) * ldb), rng);
            const auto C0 = randn(static_cast<size_t>(M * ldc), rng);
            for (bool acc : {false, true}) {
              auto got = C0, want = C0;
              (t.*g.entry)(M, N, K, -1.25f, A.data(), lda, B.data(), ldb, got.data(), ldc, acc);
              (ref.*g.entry)(M, N, K, -1.25f, A.data(), lda, B.data(), ldb, want.data(), ldc, acc);
              REQUIRE(same_bits(got, want), "%s %s M=%lld N=%lld K=%lld acc=%d", isa_name(isa),
                      g.name, (long long)M, (long long)N, (long long)K, int(acc));
            }
          }
        }
      }
    }
  }
}

// Same values at every start offset (alignment) of A, B and C: the same bits.
TEST(gemm_f32_independent_of_alignment) {
  std::mt19937 rng(5);
  const int64_t M = 7, N = 37, K = 45, ld = 50;
  const auto A = randn(ld * ld, rng), B = randn(ld * ld, rng), C0 = randn(M * ld, rng);
  for (Isa isa : isas()) {
    const KernelTable& t = kernel_table(isa);
    for (const GemmCase& g : kGemms) {
      std::vector<float> first;
      for (int off = 0; off < 16; off += 3) {
        std::vector<float> a(A.size() + off), b(B.size() + off), c(C0.size() + off);
        std::copy(A.begin(), A.end(), a.begin() + off);
        std::copy(B.begin(), B.end(), b.begin() + off);
        std::copy(C0.begin(), C0.end(), c.begin() + off);
        (t.*g.entry)(M, N, K, 1.0f, a.data() + off, ld, b.data() + off, ld, c.data() + off, ld,
                     true);
        std::vector<float> out(c.begin() + off, c.end());
        if (first.empty()) first = out;
        REQUIRE(same_bits(first, out), "%s %s differs at offset %d", isa_name(isa), g.name, off);
      }
    }
  }
}

// Empty sizes: nothing is read past the arrays, and the results equal the reference (K = 0 gives
// C = 0 or leaves C as it is).
TEST(gemm_f32_empty_sizes) {
  const KernelTable& ref = kernel_table(Isa::scalar);
  std::mt19937 rng(2);
  const auto A = randn(64, rng), B = randn(64, rng), C0 = randn(64, rng);
  for (Isa isa : isas()) {
    const KernelTable& t = kernel_table(isa);
    for (const GemmCase& g : kGemms) {
      for (int64_t M : {0, 3}) {
        for (int64_t N : {0, 5}) {
          for (int64_t K : {0, 2}) {
            for (bool acc : {false, true}) {
              auto got = C0, want = C0;
              (t.*g.entry)(M, N, K, 2.0f, A.data(), 8, B.data(), 8, got.data(), 8, acc);
              (ref.*g.entry)(M, N, K, 2.0f, A.data(), 8, B.data(), 8, want.data(), 8, acc);
              REQUIRE(same_bits(got, want), "%s %s M=%lld N=%lld K=%lld acc=%d", isa_name(isa),
                      g.name, (long long)M, (long long)N, (long long)K, int(acc));
            }
          }
        }
      }
    }
  }
}

TEST(conversions_bit_identical_to_scalar) {
  const KernelTable& ref = kernel_table(Isa::scalar);
  std::mt19937 rng(8);
  // Every bf16 bit pattern, then fp32 values around every rounding case.
  std::vector<bf16> all(65536);
  for (int i = 0; i < 65536; ++i) all[i] = static_cast<bf16>(i);
  std::vector<float> f32;
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 200000; ++i) {
    uint32_t b = bits(rng);
    if (i % 4 == 1) b = (b & 0xffff0000u) | 0x8000u;  // exact ties
    if (i % 4 == 2) b = (b & 0x807fffffu);            // zero / denormal exponents
    if (i % 4 == 3) b = (b | 0x7f800000u);            // Inf / NaN exponents
    float f;
    std::memcpy(&f, &b, 4);
    f32.push_back(f);
  }
  for (Isa isa : isas()) {
    const KernelTable& t = kernel_table(isa);
    for (int64_t n : {int64_t(1), int64_t(7), int64_t(16), int64_t(17), int64_t(65536)}) {
      std::vector<float> got(n + 3, 9.0f), want(n + 3, 9.0f);
      t.cvt_bf16_f32(n, all.data() + (65536 - n), got.data() + 1);
      ref.cvt_bf16_f32(n, all.data() + (65536 - n), want.data() + 1);
      REQUIRE(same_bits(got, want), "%s cvt_bf16_f32 n=%lld", isa_name(isa), (long long)n);
    }
    for (int64_t n : {int64_t(1), int64_t(9), int64_t(31), int64_t(200000)}) {
      std::vector<bf16> got(n + 3, 0x5555), want(n + 3, 0x5555);
      t.cvt_f32_bf16(n, f32.data() + 1, got.data() + 1);
      ref.cvt_f32_bf16(n, f32.data() + 1, want.data() + 1);
      REQUIRE(got == want, "%s cvt_f32_bf16 n=%lld", isa_name(isa), (long long)n);
    }
  }
}

TEST(stream_rows_copy_exactly) {
  // Every start offset within a 64-byte line (and one not float-aligned), widths around the
  // vector sizes: the rows' bits, and nothing written between or after them.
  std::mt19937 rng(21);
  std::uniform_int_distribution<uint32_t> bits;
  const int64_t rows = 5, lds = 150;
  std::vector<float> src(static_cast<size_t>(rows * lds));
  for (float& v : src) {
    const uint32_t b = bits(rng);
    std::memcpy(&v, &b, 4);
  }
  for (Isa isa : isas()) {
    const KernelTable& t = kernel_table(isa);
    for (int64_t cols : {int64_t(1), int64_t(7), int64_t(8), int64_t(16), int64_t(31), int64_t(96),
                         int64_t(130)}) {
      for (int64_t off = 0; off < 17; ++off) {
        const int64_t ldd = cols + 3;
        std::vector<float> dst(static_cast<size_t>(off + rows * ldd + 8), -2.5f);
        t.stream_rows_f32(rows, cols, src.data(), lds, dst.data() + off, ldd);
        bool ok = true;
        for (int64_t i = 0; i < static_cast<int64_t>(dst.size()); ++i) {
          const int64_t j = i - off, r = j / ldd, c = j % ldd;
          const bool inside = j >= 0 && r < rows && c < cols;
          const float want = inside ? src[static_cast<size_t>(r * lds + c)] : -2.5f;
          ok = ok && std::memcmp(&dst[static_cast<size_t>(i)], &want, 4) == 0;
        }
        REQUIRE(ok, "%s stream_rows_f32 cols=%lld offset=%lld", isa_name(isa), (long long)cols,
                (long long)off);
      }
    }
    // A destination that is not float-aligned takes plain stores.
    std::vector<unsigned char> raw(4 * 40 + 8, 0);
    float* odd = reinterpret_cast<float*>(raw.data() + 2);
    t.stream_rows_f32(1, 40, src.data(), lds, odd, 40);
    REQUIRE(std::memcmp(raw.data() + 2, src.data(), 4 * 40) == 0, "%s stream_rows_f32 unaligned",
            isa_name(isa));
  }
}

TEST(scale_i32_f32_matches_scalar) {
  const KernelTable& ref = kernel_table(Isa::scalar);
  std::mt19937 rng(22);
  std::uniform_int_distribution<int32_t> ints(-(1 << 30), 1 << 30);
  std::uniform_real_distribution<float> scales(1e-6f, 1e-2f);
  const int64_t M = 4, ldacc = 140;
  std::vector<int32_t> acc(static_cast<size_t>(M * ldacc));
  for (int32_t& v : acc) v = ints(rng);
  std::vector<float> sa(static_cast<size_t>(M)), sw(static_cast<size_t>(ldacc));
  for (float& v : sa) v = scales(rng);
  for (float& v : sw) v = scales(rng);
  for (Isa isa : isas()) {
    const KernelTable& t = kernel_table(isa);
    for (int64_t N :
         {int64_t(1), int64_t(7), int64_t(16), int64_t(33), int64_t(96), int64_t(130)}) {
      for (const bool cols : {true, false}) {
        const int64_t ldc = N + 5;
        std::vector<float> got(static_cast<size_t>(M * ldc + 3), -2.5f), want = got;
        const float* w = cols ? sw.data() : nullptr;
        t.scale_i32_f32(M, N, acc.data(), ldacc, sa.data(), w, got.data(), ldc);
        ref.scale_i32_f32(M, N, acc.data(), ldacc, sa.data(), w, want.data(), ldc);
        REQUIRE(std::memcmp(got.data(), want.data(), 4 * got.size()) == 0,
                "%s scale_i32_f32 N=%lld cols=%d", isa_name(isa), (long long)N, int(cols));
        REQUIRE(want[static_cast<size_t>(N)] == -2.5f, "scale_i32_f32 wrote past a row");
      }
    }
  }
}

TEST(silu_within_tolerance_of_scalar) {
  const KernelTable& ref = kernel_table(Isa::scalar);
  std::mt19937 rng(13);
  const int64_t n = 50003;
  auto g = randn(n, rng, 6.0f);
  const auto u = randn(n, rng), dh = randn(n, rng);
  // Extremes: overflow and underflow of exp(-g), zeros, NaN, infinities.
  const float extremes[] = {-120.0f, -89.0f, -88.5f, -87.5f, -30.0f, -0.0f,    0.0f,     30.0f,
                            87.5f,   88.5f,  89.0f,  120.0f, NAN,    INFINITY, -INFINITY};
  for (size_t i = 0; i < sizeof extremes / sizeof extremes[0]; ++i) g[i * 101] = extremes[i];
  for (Isa isa : isas()) {
    const KernelTable& t = kernel_table(isa);
    std::vector<float> h(n), h_ref(n), dg(n), dg_ref(n), du(n), du_ref(n);
    t.silu_mul(n, g.data(), u.data(), h.data());
    ref.silu_mul(n, g.data(), u.data(), h_ref.data());
    t.silu_mul_bwd(n, g.data(), u.data(), dh.data(), dg.data(), du.data());
    ref.silu_mul_bwd(n, g.data(), u.data(), dh.data(), dg_ref.data(), du_ref.data());
    const std::vector<float>* outs[3][2] = {{&h, &h_ref}, {&dg, &dg_ref}, {&du, &du_ref}};
    const char* names[3] = {"h", "dg", "du"};
    for (int o = 0; o < 3; ++o) {
      for (int64_t i = 0; i < n; ++i) {
        const float a = (*outs[o][0])[i], b = (*outs[o][1])[i];
        if (std::isnan(b) || std::isinf(b)) {
          REQUIRE(std::memcmp(&a, &b, 4) == 0 || (std::isnan(a) && std::isnan(b)),
                  "%s %s[%lld] g=%g: got %g, scalar %g", isa_name(isa), names[o], (long long)i,
                  g[i], a, b);
          continue;
        }
        // dg = dh u silu'(g) passes through 0 near g = -1.28: bound it by its terms' size.
        const float scale = o == 1 ? std::fabs(dh[i] * u[i]) * (1.0f + std::fabs(g[i])) : 0.0f;
        REQUIRE(std::fabs(a - b) <= 1e-5f * std::fabs(b) + 1e-6f * scale + 1e-30f,
                "%s %s[%lld] g=%g: got %.9g, scalar %.9g", isa_name(isa), names[o], (long long)i,
                g[i], a, b);
      }
    }
    // Tails run the vector code under a mask: element i gives the same bits at any n > i.
    std::vector<float> h_short(n);
    t.silu_mul(37, g.data(), u.data(), h_short.data());
    REQUIRE(std::memcmp(h_short.data(), h.data(), 37 * 4) == 0, "%s silu tail", isa_name(isa));
  }
}

TEST(silu_mul_interleaved_bf16_is_silu_mul_then_cvt) {
  std::mt19937 rng(19);
  for (Isa isa : available_isas()) {
    const KernelTable& t = kernel_table(isa);
    for (int64_t M : {1, 5, 33}) {
      for (int64_t nq : {1, 3, 6}) {
        const int64_t ldgu = 32 * nq + 5, ldh = 16 * nq + 3;
        auto gu = randn(static_cast<size_t>(M * ldgu), rng, 6.0f);
        gu[0] = NAN;  // specials keep their bits too
        gu[1] = INFINITY;
        gu[2] = -120.0f;
        std::vector<bf16> got(static_cast<size_t>(M * ldh), 0x1234), want = got;
        t.silu_mul_interleaved_bf16(M, nq, gu.data(), ldgu, got.data(), ldh);
        silu_mul_interleaved_bf16_by_parts(t, M, nq, gu.data(), ldgu, want.data(), ldh);
        // Bit for bit, and the columns past 16 nq of each row (sentinels) untouched.
        REQUIRE(got == want, "%s silu_mul_interleaved_bf16 M=%lld nq=%lld", isa_name(isa),
                (long long)M, (long long)nq);
      }
    }
  }
}

TEST(pack_transposed_bit_identical_to_scalar) {
  const KernelTable& ref = kernel_table(Isa::scalar);
  std::mt19937 rng(17);
  for (Isa isa : isas()) {
    const KernelTable& t = kernel_table(isa);
    for (int64_t N : {1, 16, 17, 40, 72, 130}) {
      for (int64_t K : {1, 32, 33, 70, 200}) {
        const auto w = kt::testing::random_bf16(static_cast<size_t>(N * K), rng);
        const auto packed = kt::testing::pack(w, N, K);
        const int64_t Kp = packed_k(K);
        // The whole transpose in one call, then from a later k0 with a few blocks (and one past
        // Kp).
        const int64_t total = Kp / kBlockN;
        const int64_t starts[][2] = {
            {0, total}, {total > 1 ? 1 : 0, total > 1 ? total - 1 : 1}, {total - 1, 2}};
        for (const auto& s : starts) {
          const size_t elems = static_cast<size_t>(s[1] * packed_block_elems(N));
          std::vector<bf16> got(elems + 5, 0x1111), want(elems + 5, 0x1111);
          const int64_t ldd = packed_block_elems(N);
          t.pack_transposed(packed.data(), N, Kp, s[0] * kBlockN, s[1], got.data(), ldd);
          ref.pack_transposed(packed.data(), N, Kp, s[0] * kBlockN, s[1], want.data(), ldd);
          REQUIRE(got == want, "%s N=%lld K=%lld k0=%lld nblk=%lld", isa_name(isa), (long long)N,
                  (long long)K, (long long)(s[0] * kBlockN), (long long)s[1]);
        }
        // And the reference itself: block b of W^T holds W[n, k] at depth n of row k.
        if (isa == Isa::scalar) {
          const int64_t nblk = total;
          std::vector<bf16> wt(static_cast<size_t>(nblk * packed_block_elems(N)));
          ref.pack_transposed(packed.data(), N, Kp, 0, nblk, wt.data(), packed_block_elems(N));
          const int64_t KpT = packed_k(N);
          for (int64_t k = 0; k < K; ++k) {
            for (int64_t n = 0; n < N; ++n) {
              const bf16 v =
                  wt[(k / kBlockN) * kBlockN * KpT + (n / 2) * 32 + (k % kBlockN) * 2 + n % 2];
              REQUIRE(v == w[n * K + k], "reference transpose wrong at n=%lld k=%lld", (long long)n,
                      (long long)k);
            }
          }
        }
      }
    }
  }
}

// A few source blocks at a time (the quantized backward's grouping), into destination blocks with
// a gap between them: the same bits as one call, and the gaps untouched.
TEST(pack_transposed_by_source_groups) {
  std::mt19937 rng(23);
  for (Isa isa : isas()) {
    const KernelTable& t = kernel_table(isa);
    for (int64_t N : {16, 48, 80, 130}) {
      const int64_t K = 96, Kp = packed_k(K), nblk = Kp / kBlockN;
      const auto packed =
          kt::testing::pack(kt::testing::random_bf16(static_cast<size_t>(N * K), rng), N, K);
      const int64_t block = packed_block_elems(N), ldd = block + 40;
      std::vector<bf16> want(static_cast<size_t>(nblk * block));
      t.pack_transposed(packed.data(), N, Kp, 0, nblk, want.data(), block);
      const int64_t nsrc = packed_blocks(N);
      for (int64_t g : {2, 4}) {  // the last group may be shorter (odd)
        std::vector<bf16> got(static_cast<size_t>(nblk * ldd), 0x2222);
        for (int64_t j0 = 0; j0 < nsrc; j0 += g) {
          const int64_t rows = std::min(g, nsrc - j0) * kBlockN;
          t.pack_transposed(packed.data() + j0 * kBlockN * Kp, rows, Kp, 0, nblk,
                            got.data() + j0 * 8 * 32, ldd);
        }
        for (int64_t b = 0; b < nblk; ++b) {
          REQUIRE(std::equal(want.begin() + b * block, want.begin() + (b + 1) * block,
                             got.begin() + b * ldd),
                  "%s N=%lld g=%lld block %lld differs", isa_name(isa), (long long)N, (long long)g,
                  (long long)b);
          REQUIRE(std::all_of(got.begin() + b * ldd + block, got.begin() + (b + 1) * ldd,
                              [](bf16 v) { return v == 0x2222; }),
                  "%s N=%lld g=%lld wrote past block %lld", isa_name(isa), (long long)N,
                  (long long)g, (long long)b);
        }
      }
    }
  }
}

int main(int argc, char** argv) { return kt::testing::run_all(argc, argv); }
