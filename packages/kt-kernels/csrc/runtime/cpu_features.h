// CPU feature detection: CPUID for what the processor has, XGETBV for what the OS saves on
// context switches, and (for AMX) the Linux permission request for tile data. Compiled with
// baseline x86-64 flags so it is safe to run before any wide instruction.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace kt::runtime {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512dq = false;
  bool avx512_bf16 = false;
  bool avx512_vnni = false;
  bool amx_tile = false;  // AMX flags are true only once Linux granted tile data to this process.
  bool amx_bf16 = false;
  bool amx_int8 = false;

  // Flag names as /proc/cpuinfo spells them, in a fixed order.
  std::vector<std::pair<std::string, bool>> as_list() const;
};

// Detected once (thread-safe), then cached.
const CpuFeatures& cpu_features();

// Number of physical cores this process may run on (affinity mask, one per SMT sibling group).
int physical_core_count();

}  // namespace kt::runtime
