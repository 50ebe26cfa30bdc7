// ISA selection: names, CPUID-based availability, KT_KERNELS_ISA, explicit-request errors, the
// self-test and (with KT_KERNELS_FAIL_SELF_TEST set by ctest) the fallback chain; the null-entry
// fallback rule of the tables.
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "kernels/compiled_isas.h"
#include "kernels/dispatch.h"
#include "kernels/quant_kernels.h"
#include "runtime/cpu_features.h"

using namespace kt::kernels;

namespace {

std::vector<Isa> all_isas() {
  std::vector<Isa> out;
  for (int i = 0; i < kIsaCount; ++i) out.push_back(static_cast<Isa>(i));
  return out;
}
const std::vector<Isa> kAll = all_isas();

// The tables an ISA folder itself defines (null: none, or not compiled).
const KernelTable* folder_table(Isa isa) {
  switch (isa) {
#define KT_CASE(name) \
  case Isa::name:     \
    return name##_table();
    KT_COMPILED_ISAS(KT_CASE)
#undef KT_CASE
    default:
      return nullptr;
  }
}
const QuantKernels* folder_quant_table(Isa isa) {
  switch (isa) {
#define KT_CASE(name) \
  case Isa::name:     \
    return name##_quant_table();
    KT_COMPILED_ISAS(KT_CASE)
#undef KT_CASE
    default:
      return nullptr;
  }
}

bool forced_fail(Isa isa) {
  const char* env = std::getenv("KT_KERNELS_FAIL_SELF_TEST");
  return env != nullptr &&
         ("," + std::string(env) + ",").find("," + std::string(isa_name(isa)) + ",") !=
             std::string::npos;
}

// The ISA the fallback chain should land on from `isa`.
Isa expected_from(Isa isa) {
  for (int i = static_cast<int>(isa); i > 0; --i) {
    const Isa cand = static_cast<Isa>(i);
    if (isa_runnable(cand) && !forced_fail(cand)) return cand;
  }
  return Isa::scalar;
}

std::string thrown_message(const std::string& request) {
  try {
    select_isa(request);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

struct EnvVar {
  std::string name;
  EnvVar(const char* n, const char* value) : name(n) { setenv(n, value, 1); }
  ~EnvVar() { unsetenv(name.c_str()); }
};

}  // namespace

// Every entry of a complete table is the folder's own or, where the folder leaves it null, that
// of the complete table of the ISA below (the runnable ISAs below are all compiled ones).
TEST(null_entries_fall_back_to_the_isa_below) {
  const auto avail = available_isas();
  for (size_t i = 1; i < avail.size(); ++i) {
    const Isa isa = avail[i], below = avail[i - 1];
    const QuantKernels* own_q = folder_quant_table(isa);
    const QuantKernels &q = quant_kernels(isa), &qb = quant_kernels(below);
#define KT_EXPECT(own, t, tb, e)                                                          \
  REQUIRE(t.e != nullptr && t.e == (own != nullptr && own->e != nullptr ? own->e : tb.e), \
          "%s: entry " #e, isa_name(isa))
    KT_EXPECT(own_q, q, qb, i8);
    KT_EXPECT(own_q, q, qb, i4);
    KT_EXPECT(own_q, q, qb, i8x4);
    // i8x4_t may be null (quant_kernels.h), but never where the ISA below has one.
    REQUIRE(q.i8x4_t == (own_q != nullptr && own_q->i8x4_t != nullptr ? own_q->i8x4_t : qb.i8x4_t),
            "%s: entry i8x4_t", isa_name(isa));
    KT_EXPECT(own_q, q, qb, absmax);
    KT_EXPECT(own_q, q, qb, quantize);
    const KernelTable &t = kernel_table(isa), &tb = kernel_table(below);
    if (t.isa != isa || tb.isa != below) continue;  // self-test fallback (dispatch_fallback)
    const KernelTable* own = folder_table(isa);
    KT_EXPECT(own, t, tb, gemm_bf16);
    KT_EXPECT(own, t, tb, gemm_i8);
    KT_EXPECT(own, t, tb, gemm_f32_nn);
    KT_EXPECT(own, t, tb, gemm_f32_nt);
    KT_EXPECT(own, t, tb, gemm_f32_tn);
    KT_EXPECT(own, t, tb, cvt_bf16_f32);
    KT_EXPECT(own, t, tb, cvt_f32_bf16);
    KT_EXPECT(own, t, tb, silu_mul);
    KT_EXPECT(own, t, tb, silu_mul_bwd);
    KT_EXPECT(own, t, tb, silu_mul_interleaved_bf16);
    KT_EXPECT(own, t, tb, pack_transposed);
    KT_EXPECT(own, t, tb, pack_transposed_i8);
#undef KT_EXPECT
    // The fused entries go with gemm_bf16: from the same table, null included.
    const KernelTable& g = own != nullptr && own->gemm_bf16 != nullptr ? *own : tb;
    REQUIRE(t.gemm_q8 == g.gemm_q8 && t.gemm_q4 == g.gemm_q4 &&
                t.fused_max_rows_q8 == g.fused_max_rows_q8 &&
                t.fused_max_rows_q4 == g.fused_max_rows_q4,
            "%s: fused entries not those of its gemm_bf16", isa_name(isa));
  }
  REQUIRE(kernel_table(Isa::scalar).isa == Isa::scalar, "scalar table");
}

TEST(names_round_trip) {
  REQUIRE(isa_names().size() == static_cast<size_t>(kIsaCount), "isa_names size");
  for (Isa isa : kAll) {
    Isa back;
    REQUIRE(parse_isa(isa_name(isa), &back) && back == isa, "%s", isa_name(isa));
    REQUIRE(isa_names()[static_cast<size_t>(isa)] == isa_name(isa), "%s", isa_name(isa));
  }
  Isa x;
  REQUIRE(!parse_isa("avx9", &x), "avx9 parsed");
  REQUIRE(!parse_isa("", &x), "empty parsed");
}

TEST(availability_follows_cpu_features) {
  const auto& f = kt::runtime::cpu_features();
  REQUIRE(isa_runnable(Isa::scalar), "scalar must always run");
  if (!(f.avx2 && f.fma)) REQUIRE(!isa_runnable(Isa::avx2), "avx2 runnable without AVX2/FMA");
  if (!f.avx512f) REQUIRE(!isa_runnable(Isa::avx512), "avx512 runnable without AVX-512F");
  if (!f.avx512_bf16) REQUIRE(!isa_runnable(Isa::avx512_bf16), "avx512_bf16 without the flag");
  if (!f.amx_bf16) REQUIRE(!isa_runnable(Isa::amx), "amx runnable without AMX-BF16");
  // gemm_i8 of these ISAs uses vpdpbusd / tdpbssd.
  if (!f.avx512_vnni) REQUIRE(!isa_runnable(Isa::avx512_vnni), "avx512_vnni without VNNI");
  if (!f.avx512_vnni) REQUIRE(!isa_runnable(Isa::avx512_bf16), "avx512_bf16 without VNNI");
  if (!f.amx_int8) REQUIRE(!isa_runnable(Isa::amx), "amx runnable without AMX-INT8");
  const auto avail = available_isas();
  REQUIRE(!avail.empty() && avail.front() == Isa::scalar, "available_isas starts with scalar");
  for (size_t i = 1; i < avail.size(); ++i) REQUIRE(avail[i - 1] < avail[i], "not ascending");
  std::printf("  runnable:");
  for (Isa isa : avail) std::printf(" %s", isa_name(isa));
  std::printf("\n");
}

TEST(default_is_best_runnable_after_fallback) {
  unsetenv("KT_KERNELS_ISA");
  const Isa best = available_isas().back();
  REQUIRE(select_isa("") == expected_from(best), "got %s", isa_name(select_isa("")));
  REQUIRE(kernel_table(best).isa == expected_from(best), "table of %s", isa_name(best));
}

TEST(explicit_request_and_env) {
  for (Isa isa : available_isas()) {
    REQUIRE(select_isa(isa_name(isa)) == expected_from(isa), "request %s", isa_name(isa));
    EnvVar env("KT_KERNELS_ISA", isa_name(isa));
    REQUIRE(select_isa("") == expected_from(isa), "env %s", isa_name(isa));
    // The argument beats the env var.
    REQUIRE(select_isa("scalar") == Isa::scalar, "argument over env");
  }
  EnvVar env("KT_KERNELS_ISA", " AVX2 ");
  if (isa_runnable(Isa::avx2)) REQUIRE(select_isa("") == expected_from(Isa::avx2), "case/space");
}

TEST(bad_requests_name_the_runnable_isas) {
  std::string msg = thrown_message("avx9");
  REQUIRE(msg.find("isa='avx9'") != std::string::npos &&
              msg.find("runnable here: scalar") != std::string::npos,
          "message: %s", msg.c_str());
  {
    EnvVar env("KT_KERNELS_ISA", "sse9");
    msg = thrown_message("");
    REQUIRE(msg.find("KT_KERNELS_ISA='sse9'") != std::string::npos, "message: %s", msg.c_str());
  }
  for (Isa isa : kAll) {
    if (isa_runnable(isa)) continue;
    msg = thrown_message(isa_name(isa));
    REQUIRE(msg.find("cannot run here") != std::string::npos, "message: %s", msg.c_str());
    bool threw = false;
    try {
      kernel_table(isa);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    REQUIRE(threw, "kernel_table(%s) did not throw", isa_name(isa));
  }
}

TEST(self_test_status_and_warnings) {
  for (Isa isa : available_isas()) kernel_table(isa);
  std::vector<std::string> warnings = take_warnings();
  for (Isa isa : kAll) {
    const std::string status = self_test_status(isa);
    std::printf("  %-12s %s\n", isa_name(isa), status.c_str());
    if (!isa_runnable(isa)) {
      REQUIRE(status == "not run", "%s: %s", isa_name(isa), status.c_str());
    } else if (forced_fail(isa)) {
      REQUIRE(status.rfind("failed: ", 0) == 0, "%s: %s", isa_name(isa), status.c_str());
      bool warned = false;
      for (const auto& w : warnings) warned |= w.find(isa_name(isa)) != std::string::npos;
      REQUIRE(warned, "no warning recorded for %s", isa_name(isa));
    } else {
      REQUIRE(status == "passed", "%s: %s", isa_name(isa), status.c_str());
    }
  }
  for (const auto& w : warnings) std::printf("  warning: %s\n", w.c_str());
  REQUIRE(take_warnings().empty(), "warnings are handed out once");
}

int main(int argc, char** argv) { return kt::testing::run_all(argc, argv); }
