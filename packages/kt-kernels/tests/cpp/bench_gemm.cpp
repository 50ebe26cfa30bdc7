// Single-thread micro-benchmark of gemm_bf16 and gemm_i8 per ISA (GFLOP/s or GOP/s = 2 M N K /
// time). Time is this thread's CPU time (best of repeated calls), so other load on the machine
// disturbs it little.
//   bench_gemm [--isa NAME] [--smoke] [--fused] [--limits] [--lora]
// --fused: only the fused dequantize + GEMM comparison at small M (bench_fused below).
// --limits: only the roofline of one forward tile (bench_limits below).
// --lora: only the fp32 LoRA products at the engine's shapes (bench_lora below).
// --smoke: one tiny run per shape (a ctest check that the benchmark itself works); exits 77
// (skipped) when the requested ISA cannot run here.
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "engine/quant.h"
#include "gemm_data.h"
#include "kernels/dispatch.h"
#include "kernels/quant_kernels.h"

using namespace kt::kernels;

namespace {

double thread_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Seconds per call of `once`: the best of batches of `inner` calls, at least 5 batches and at
// least min_seconds of this thread's CPU time in all.
template <class F>
double best_call_seconds(F&& once, double min_seconds, int64_t inner = 1) {
  double best = 1e30;
  const double start = thread_seconds();
  for (int reps = 0; reps < 5 || thread_seconds() - start < min_seconds; ++reps) {
    const double t0 = thread_seconds();
    for (int64_t i = 0; i < inner; ++i) once();
    best = std::min(best, (thread_seconds() - t0) / static_cast<double>(inner));
  }
  return best;
}

// isa's own kernel table, or null after printing a "fell back" cell where this machine runs the
// table of another ISA in its place (a column of a per-ISA table).
const KernelTable* own_table_or_cell(Isa isa) {
  const KernelTable& t = kernel_table(isa);
  if (t.isa == isa) return &t;
  std::printf(" %12s", "fell back");
  return nullptr;
}

// The engine's operands start on 64-byte lines (scratch is page aligned, weights 64-byte
// aligned, rows a multiple of 64 bytes apart); std::vector's 16-byte alignment would make every
// 64-byte tile row straddle two lines and measure a slower kernel than the engine runs.
template <typename T>
struct Aligned {
  T* p = nullptr;
  size_t n = 0;
  explicit Aligned(size_t count)
      : p(static_cast<T*>(std::aligned_alloc(64, round64(count)))), n(count) {
    if (p == nullptr) throw std::bad_alloc();
    std::memset(p, 0, round64(count));
  }
  template <class V>
  explicit Aligned(const V& v) : Aligned(v.size()) {
    std::memcpy(p, v.data(), v.size() * sizeof(T));
  }
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
  ~Aligned() { std::free(p); }
  T* data() const { return p; }
  T& operator[](size_t i) const { return p[i]; }
  static size_t round64(size_t count) { return (count * sizeof(T) + 63) / 64 * 64; }
};

struct Shape {
  const char* name;
  int64_t M, N, K;
};

double bench(const KernelTable& t, const Shape& s, bool smoke, bool int8) {
  std::mt19937 rng(5);
  const auto a_rows = kt::testing::make_a(s.M, s.K, 0, rng);
  const Aligned<bf16> a(a_rows.data);
  const auto w = kt::testing::random_bf16(static_cast<size_t>(s.N * s.K), rng);
  const Aligned<bf16> packed(kt::testing::pack(w, s.N, s.K));
  const int64_t nblk = packed_blocks(s.N), ldc = nblk * kBlockN;
  const Aligned<float> c(static_cast<size_t>(s.M * ldc));
  // int8 operands: codes of the same sizes (values do not change the speed).
  const int64_t Kp8 = packed_k8(s.K);
  const Aligned<int8_t> a8(static_cast<size_t>(s.M * Kp8)),
      w8(static_cast<size_t>(nblk * i8_block_bytes(Kp8)));
  for (int64_t m = 0; m < s.M; ++m) {
    for (int64_t k = 0; k < s.K; ++k) a8[m * Kp8 + k] = static_cast<int8_t>(rng() % 255 - 127);
  }
  for (size_t i = 0; i < w8.n; ++i) w8[i] = static_cast<int8_t>(rng() % 255 - 127);
  const Aligned<int32_t> c8(static_cast<size_t>(s.M * ldc));
  auto once = [&] {
    if (int8) {
      t.gemm_i8(s.M, nblk, Kp8, a8.data(), Kp8, w8.data(), c8.data(), ldc, true);
    } else {
      t.gemm_bf16(s.M, nblk, a_rows.Kp, a.data(), a_rows.lda, packed.data(), c.data(), ldc, true);
    }
  };
  once();
  if (smoke) return 0.0;
  return 2.0 * s.M * s.N * s.K / best_call_seconds(once, 0.4) * 1e-9;
}

// Fused dequantize + GEMM against dequantization into a scratch buffer + gemm_bf16, per call on
// one engine tile (6 blocks = 96 columns, like the forward gate_up and down tiles) at small M.
// "cold": every call reads other blocks of a weight set far larger than the caches (decode, where
// each expert's weights come from memory once per forward); "hot": the same blocks each call.
void bench_fused(const std::vector<Isa>& isas, bool smoke) {
  namespace quant = kt::engine::quant;
  const int64_t nblk = 6, K = smoke ? 64 : 2048;
  const int64_t sets = smoke ? 2 : 512;  // cold: 512 tiles of 6 blocks (~100 MB of int8 codes)
  std::mt19937 rng(9);
  std::printf(
      "\nfused dequantize + GEMM vs dequantize + gemm_bf16, one 96 x %lld tile per call "
      "[us per call, 1 thread]\n",
      (long long)K);
  std::printf("%-12s %-5s %-5s %4s %10s %10s %7s\n", "isa", "kind", "data", "M", "dequant+gemm",
              "fused", "ratio");
  for (quant::Kind kind : {quant::Kind::int8, quant::Kind::int4}) {
    const quant::Format f = quant::make_format(kind, K, 128);
    const int64_t bb = quant::block_bytes(f), tile_bytes = nblk * bb;
    const int64_t tile_scales = nblk * kBlockN * f.ngroups;
    const Aligned<uint8_t> codes(static_cast<size_t>(sets * tile_bytes));
    for (size_t i = 0; i < codes.n; ++i) codes[i] = static_cast<uint8_t>(rng() & 0x77);
    std::vector<float> scales(static_cast<size_t>(sets * tile_scales), 0.01f);
    const Aligned<bf16> scratch(static_cast<size_t>(nblk * kBlockN * f.Kp));
    for (Isa isa : isas) {
      const KernelTable& t = kernel_table(isa);
      const QuantKernels& qk = quant_kernels(isa);
      for (bool cold : {true, false}) {
        for (int64_t M : {1, 2, 4, 8, 12, 16, 24, 32, 48, 64}) {
          if (smoke && M > 2) break;
          const auto a_rows = kt::testing::make_a(M, K, 0, rng);
          const Aligned<bf16> a(a_rows.data);
          const int64_t lda = a_rows.lda;
          const Aligned<float> c(static_cast<size_t>(M * nblk * kBlockN));
          double best[2] = {1e30, 1e30};
          for (int path = 0; path < 2; ++path) {
            int64_t set = 0;
            auto once = [&] {
              const uint8_t* w = codes.data() + set * tile_bytes;
              const float* sc = scales.data() + set * tile_scales;
              if (cold) set = (set + 1) % sets;
              if (path == 0) {
                quant::dequant_blocks(qk, f, w, sc, nblk, scratch.data());
                t.gemm_bf16(M, nblk, f.Kp, a.data(), lda, scratch.data(), c.data(), nblk * kBlockN,
                            false);
              } else if (kind == quant::Kind::int8) {
                t.gemm_q8(M, nblk, f.Kp, a.data(), lda, reinterpret_cast<const int8_t*>(w), sc,
                          c.data(), nblk * kBlockN, false);
              } else {
                t.gemm_q4(M, nblk, f.Kp, f.group, a.data(), lda, w, sc, c.data(), nblk * kBlockN,
                          false);
              }
            };
            once();
            if (!smoke) best[path] = best_call_seconds(once, 0.15, 64);
          }
          if (smoke) continue;
          std::printf("%-12s %-5s %-5s %4lld %10.2f %10.2f %7.2f\n", isa_name(isa),
                      kind == quant::Kind::int8 ? "int8" : "int4", cold ? "cold" : "hot",
                      (long long)M, best[0] * 1e6, best[1] * 1e6, best[0] / best[1]);
          std::fflush(stdout);
        }
      }
    }
  }
}

// What bounds one engine forward tile (64 rows x 96 columns x K 2048, 1 thread): gemm_bf16 with
// every operand in L1 (32 x 32 x 256), the tile with its weights in L2 (the same panel every
// call), the tile with its weights streamed from memory (a different panel each call, from a pool
// of twice the L3), and that stream read alone. If the stream overlapped the arithmetic, the
// streamed tile would take max(stream, L2 tile); if not, their sum.
void bench_limits(const std::vector<Isa>& isas, bool smoke) {
  const int64_t M = 64, nblk = 6, K = smoke ? 64 : 2048, N = nblk * kBlockN;
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  const int64_t panel = N * K;  // bf16 elements per weight panel
  const int64_t panel_bytes = panel * static_cast<int64_t>(sizeof(bf16));
  const int64_t pool_bytes =
      smoke ? 4 * panel_bytes : std::max<int64_t>(2 * (l3 > 0 ? l3 : 0), 512 << 20);
  const int64_t panels = std::max<int64_t>(2, pool_bytes / panel_bytes);
  std::mt19937 rng(3);
  const auto a_rows = kt::testing::make_a(M, K, 0, rng);
  const Aligned<bf16> a(a_rows.data);
  const Aligned<bf16> pool(static_cast<size_t>(panels * panel));
  const auto w = kt::testing::random_bf16(static_cast<size_t>(panel), rng);
  const auto packed = kt::testing::pack(w, N, K);
  for (int64_t p = 0; p < panels; ++p) {
    std::memcpy(pool.data() + p * panel, packed.data(), static_cast<size_t>(panel_bytes));
  }
  const Aligned<float> c(static_cast<size_t>(M * N));
  const auto small_a = kt::testing::make_a(32, 256, 0, rng);
  const Aligned<bf16> a1(small_a.data);
  const Aligned<bf16> b1(kt::testing::pack(kt::testing::random_bf16(32 * 256, rng), 32, 256));
  // Seconds per call: best of batches that each pass over `calls` calls.
  auto time_calls = [&](int64_t calls, const auto& once) {
    once(0);
    if (smoke) return 1.0;
    double best = 1e30;
    for (int rep = 0; rep < 5; ++rep) {
      const double t0 = thread_seconds();
      for (int64_t i = 0; i < calls; ++i) once(i);
      best = std::min(best, (thread_seconds() - t0) / static_cast<double>(calls));
    }
    return best;
  };
  volatile uint64_t sink = 0;
  const double stream = time_calls(panels, [&](int64_t i) {
    const uint64_t* p = reinterpret_cast<const uint64_t*>(pool.data() + (i % panels) * panel);
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t j = 0; j < panel / 4; j += 4) {
      s0 += p[j];
      s1 += p[j + 1];
      s2 += p[j + 2];
      s3 += p[j + 3];
    }
    sink = sink + s0 + s1 + s2 + s3;
  });
  const double tile_flop = 2.0 * M * N * K;
  std::printf(
      "\nwhat bounds a forward tile %lld x %lld x %lld (1 thread; weight stream alone: %.1f "
      "GB/s)\n",
      (long long)M, (long long)N, (long long)K, panel_bytes / stream * 1e-9);
  std::printf("%-12s %10s %10s %12s %12s %14s\n", "isa", "in L1", "tile in L2", "tile stream",
              "sum model", "overlap model");
  for (Isa isa : isas) {
    const KernelTable& t = kernel_table(isa);
    if (t.isa != isa) continue;
    const double l1 = time_calls(2000, [&](int64_t) {
      t.gemm_bf16(32, 2, 256, a1.data(), small_a.lda, b1.data(), c.data(), 32, false);
    });
    const double l2 = time_calls(200, [&](int64_t) {
      t.gemm_bf16(M, nblk, K, a.data(), a_rows.lda, pool.data(), c.data(), N, false);
    });
    const double streamed = time_calls(panels, [&](int64_t i) {
      t.gemm_bf16(M, nblk, K, a.data(), a_rows.lda, pool.data() + (i % panels) * panel, c.data(), N,
                  false);
    });
    if (smoke) continue;
    auto gf = [&](double sec) { return tile_flop / sec * 1e-9; };
    std::printf("%-12s %10.1f %10.1f %12.1f %12.1f %14.1f   [GFLOP/s]\n", isa_name(isa),
                2.0 * 32 * 32 * 256 / l1 * 1e-9, gf(l2), gf(streamed), gf(l2 + stream),
                gf(std::max(l2, stream)));
    std::fflush(stdout);
  }
}

// The fp32 LoRA products (kernels.h: nn, nt, tn) at the shapes the engine calls them with at
// Qwen3-30B-A3B sizes (H 2048, I 768, rank 8, so RA = 16 for gate and up), operands in cache, best
// call of repeated ones, 1 thread, GFLOP/s = 2 M N K / time.
void bench_lora(const std::vector<Isa>& isas, bool smoke) {
  struct Product {
    const char* name;
    char kind;  // 'n': nn, 't': nt (dots), 'T': tn (outer products)
    int64_t M, N, K;
  };
  const Product products[] = {
      {"nt x A^T 64x16x2048", 't', 64, 16, 2048},   {"nt h Ad^T 64x8x768", 't', 64, 8, 768},
      {"nt dY Bd 128x8x2048", 't', 128, 8, 2048},   {"nt dGU Bgu 128x16x192", 't', 128, 16, 192},
      {"nn gate_up B 256x96x16", 'n', 256, 96, 16}, {"nn down B 256x96x8", 'n', 256, 96, 8},
      {"tn grad 16x192x128", 'T', 16, 192, 128},    {"tn grad 8x96x128", 'T', 8, 96, 128},
  };
  std::printf("%-24s", "LoRA fp32 (M x N x K)");
  for (Isa isa : isas) std::printf(" %12s", isa_name(isa));
  std::printf("   [GFLOP/s, 1 thread]\n");
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  for (const Product& pr : products) {
    const int64_t M = smoke ? std::min<int64_t>(pr.M, 5) : pr.M;
    const int64_t N = smoke ? std::min<int64_t>(pr.N, 7) : pr.N;
    const int64_t K = smoke ? std::min<int64_t>(pr.K, 19) : pr.K;
    // A is M x K (K x M for tn), B is K x N for nn / tn and N x K for nt: row-major, packed.
    const Aligned<float> a(static_cast<size_t>(M * K)), b(static_cast<size_t>(K * N)),
        c(static_cast<size_t>(M * N));
    for (size_t i = 0; i < a.n; ++i) a[i] = nd(rng);
    for (size_t i = 0; i < b.n; ++i) b[i] = nd(rng);
    std::printf("%-24s", pr.name);
    for (Isa isa : isas) {
      const KernelTable* own = own_table_or_cell(isa);
      if (own == nullptr) continue;
      const KernelTable& t = *own;
      auto once = [&] {
        if (pr.kind == 'n') {
          t.gemm_f32_nn(M, N, K, 0.5f, a.data(), K, b.data(), N, c.data(), N, true);
        } else if (pr.kind == 't') {
          t.gemm_f32_nt(M, N, K, 0.5f, a.data(), K, b.data(), K, c.data(), N, true);
        } else {
          t.gemm_f32_tn(M, N, K, 0.5f, a.data(), M, b.data(), N, c.data(), N, true);
        }
      };
      once();
      std::printf(" %12.1f", smoke ? 0.0 : 2.0 * M * N * K / best_call_seconds(once, 0.2) * 1e-9);
      std::fflush(stdout);
    }
    std::printf("\n");
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string only;
  bool smoke = false, fused_only = false, limits_only = false, lora_only = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--smoke")) {
      smoke = true;
    } else if (!std::strcmp(argv[i], "--fused")) {
      fused_only = true;
    } else if (!std::strcmp(argv[i], "--limits")) {
      limits_only = true;
    } else if (!std::strcmp(argv[i], "--lora")) {
      lora_only = true;
    } else if (!std::strcmp(argv[i], "--isa") && i + 1 < argc) {
      only = argv[++i];
    } else {
      std::fprintf(stderr,
                   "usage: bench_gemm [--isa NAME] [--smoke] [--fused] [--limits] [--lora]\n");
      return 2;
    }
  }
  std::vector<Isa> isas;
  if (!only.empty()) {
    Isa isa;
    if (!parse_isa(only, &isa)) {
      std::fprintf(stderr, "unknown ISA '%s'\n", only.c_str());
      return 2;
    }
    if (!isa_runnable(isa)) {
      std::printf("%s cannot run here: skipped\n", only.c_str());
      return 77;
    }
    isas.push_back(isa);
  } else {
    isas = available_isas();
  }
  if (fused_only || smoke) bench_fused(isas, smoke);
  if (limits_only || smoke) bench_limits(isas, smoke);
  if (lora_only || smoke) bench_lora(isas, smoke);
  if (fused_only || limits_only || lora_only) return 0;
  const Shape shapes[] = {
      {"in-cache 16x48x256", 16, 48, 256},        {"gate/up rows=32", 32, 768, 2048},
      {"engine tile 128x64x2048", 128, 64, 2048}, {"engine tile 128x64x768", 128, 64, 768},
      {"gate/up rows=256", 256, 768, 2048},       {"down rows=256", 256, 2048, 768},
      {"dense 1024x1536x2048", 1024, 1536, 2048},
  };
  for (bool int8 : {false, true}) {
    std::printf("%-24s", int8 ? "gemm_i8 (M x N x K)" : "gemm_bf16 (M x N x K)");
    for (Isa isa : isas) std::printf(" %12s", isa_name(isa));
    std::printf("   [%s, 1 thread]\n", int8 ? "GOP/s" : "GFLOP/s");
    for (const Shape& s : shapes) {
      std::printf("%-24s", s.name);
      for (Isa isa : isas) {
        const KernelTable* t = own_table_or_cell(isa);
        if (t == nullptr) continue;
        const Shape run = smoke ? Shape{s.name, std::min<int64_t>(s.M, 9),
                                        std::min<int64_t>(s.N, 40), std::min<int64_t>(s.K, 70)}
                                : s;
        std::printf(" %12.1f", bench(*t, run, smoke, int8));
        std::fflush(stdout);
      }
      std::printf("\n");
    }
  }
  return 0;
}
