#include "runtime/cpu_features.h"

#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <set>
#include <sstream>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define KT_X86 1
#endif

namespace kt::runtime {
namespace {

#ifdef KT_X86
struct Regs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};

Regs cpuid(unsigned leaf, unsigned sub) {
  Regs r;
  __cpuid_count(leaf, sub, r.a, r.b, r.c, r.d);
  return r;
}

// XGETBV via its encoding so this file needs no -mxsave.
uint64_t xgetbv0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

bool bit(unsigned v, int i) { return (v >> i) & 1u; }

// Linux keeps AMX tile data off until a process asks (arch_prctl ARCH_REQ_XCOMP_PERM).
bool request_amx_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchGetXcompPerm = 0x1022;
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  uint64_t bitmask = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &bitmask) != 0) return false;
  return (bitmask >> kXfeatureXtiledata) & 1u;
#else
  return false;
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
  const unsigned max_leaf = cpuid(0, 0).a;
  if (max_leaf < 1) return f;
  const Regs l1 = cpuid(1, 0);
  const bool osxsave = bit(l1.c, 27);
  if (!osxsave) return f;  // The OS saves no extended state: only SSE code is safe.
  const uint64_t xcr0 = xgetbv0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;                    // XMM + YMM state
  const bool os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;     // opmask + ZMM_Hi256 + Hi16_ZMM
  const bool os_amx = (xcr0 & (3ull << 17)) == (3ull << 17);  // XTILECFG + XTILEDATA

  const bool avx = bit(l1.c, 28) && os_avx;
  f.fma = bit(l1.c, 12) && avx;
  f.f16c = bit(l1.c, 29) && avx;
  if (max_leaf < 7) return f;
  const Regs l7 = cpuid(7, 0);
  const Regs l7s1 = cpuid(7, 1);
  f.avx2 = bit(l7.b, 5) && avx;
  f.avx512f = bit(l7.b, 16) && os_avx512;
  f.avx512dq = bit(l7.b, 17) && f.avx512f;
  f.avx512bw = bit(l7.b, 30) && f.avx512f;
  f.avx512vl = bit(l7.b, 31) && f.avx512f;
  f.avx512_vnni = bit(l7.c, 11) && f.avx512f;
  f.avx512_bf16 = bit(l7s1.a, 5) && f.avx512f;
  const bool amx_tile = bit(l7.d, 24);
  if (amx_tile && os_amx && request_amx_permission()) {
    f.amx_tile = true;
    f.amx_bf16 = bit(l7.d, 22);
    f.amx_int8 = bit(l7.d, 25);
  }
  return f;
}
#else
CpuFeatures detect() { return CpuFeatures{}; }
#endif

}  // namespace

std::vector<std::pair<std::string, bool>> CpuFeatures::as_list() const {
  return {{"avx2", avx2},
          {"fma", fma},
          {"f16c", f16c},
          {"avx512f", avx512f},
          {"avx512bw", avx512bw},
          {"avx512vl", avx512vl},
          {"avx512dq", avx512dq},
          {"avx512_bf16", avx512_bf16},
          {"avx512_vnni", avx512_vnni},
          {"amx_tile", amx_tile},
          {"amx_bf16", amx_bf16},
          {"amx_int8", amx_int8}};
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

int physical_core_count() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) {
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? static_cast<int>(n) : 1;
  }
  // Count distinct (package, core) pairs among the CPUs we may use; SMT siblings share one.
  std::set<std::pair<int, int>> cores;
  int logical = 0;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &set)) continue;
    ++logical;
    const std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
    std::ifstream core_file(base + "core_id"), pkg_file(base + "physical_package_id");
    int core = -1, pkg = -1;
    if (!(core_file >> core) || !(pkg_file >> pkg)) {
      cores.insert({-1, cpu});  // No topology exposed: count each logical CPU.
      continue;
    }
    cores.insert({pkg, core});
  }
  const int n = static_cast<int>(cores.size());
  return n > 0 ? n : (logical > 0 ? logical : 1);
}

}  // namespace kt::runtime
