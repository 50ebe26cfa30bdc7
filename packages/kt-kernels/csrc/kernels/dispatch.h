// Run-time ISA choice: CPUID (runtime/cpu_features.h), the KT_KERNELS_ISA override, a self-test
// of each SIMD table against the scalar reference on first use (kernels/self_test.h), and the
// fallback to the next ISA down the list of kernels/isa_list.h, to scalar.
#pragma once

#include <string>
#include <vector>

#include "kernels/kernels.h"

namespace kt::kernels {

const char* isa_name(Isa isa);
// Every ISA name of kernels/isa_list.h, lowest first, whether or not this build or CPU runs it.
std::vector<std::string> isa_names();
// The same as one string, "scalar, avx2, ...", for messages.
std::string isa_names_text();
// Parses one of isa_names(); false if unknown.
bool parse_isa(const std::string& name, Isa* out);

bool isa_compiled(Isa isa);         // this build contains kernels for it
bool isa_runnable(Isa isa);         // compiled, and this CPU + OS support it
std::vector<Isa> available_isas();  // runnable ISAs, from scalar up to the best

// The ISA to use: `requested` (empty = none) > KT_KERNELS_ISA env var > best runnable.
// An explicit request (argument or env var) that is unknown or not runnable here throws
// std::invalid_argument naming the value and the runnable ISAs. When the chosen ISA fails its
// self-test, the next ISA down the chain is used and a warning is recorded.
Isa select_isa(const std::string& requested);

// The table for a runnable ISA (self-tested on first use; see select_isa for the fallback: a table
// whose ISA failed is that of the ISA it falls back to, so check .isa). Every entry but gemm_q8 /
// gemm_q4 is set: those an ISA folder leaves null come from the ISA below it (kernels.h). Throws
// std::invalid_argument for an ISA that cannot run here. The reference stays valid for the life of
// the process. quant_kernels(isa) (kernels/quant_kernels.h) is completed the same way.
const KernelTable& kernel_table(Isa isa);

// Warnings recorded since the last call (self-test failures, fallbacks); the bindings turn them
// into Python warnings.
std::vector<std::string> take_warnings();

// Result of the self-test of an ISA: "not run", "passed" or "failed: <reason>".
// For tests of the fallback path, KT_KERNELS_FAIL_SELF_TEST=<isa>[,<isa>...] makes the self-test
// of those ISAs fail (read once, when an ISA is first tested in the process).
std::string self_test_status(Isa isa);

}  // namespace kt::kernels
