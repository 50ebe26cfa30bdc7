// Process-wide byte counters of the engine's memory, by kind: live bytes now and the peak since
// the last reset_peaks(). Every allocation of engine memory reports here (lock free).
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>

namespace kt::runtime {

enum class MemKind : int {
  weights = 0,  // packed base weights and their scales
  lora = 1,     // the LoRA stage: one engine's LoRA weights in fp32 (engine/lora_stage.h)
  cache = 2,    // activation cache entries handed to pending forwards
  pool = 3,     // activation cache blocks kept free for reuse (engine/activation_cache.h)
  scratch = 4,  // the process-wide scratch buffers (runtime/scratch.h)
};
constexpr int kMemKinds = 5;

// "weights", "lora", "cache", "pool", "scratch".
const char* mem_kind_name(MemKind kind);

struct MemCounter {
  int64_t live = 0;
  int64_t peak = 0;
};

void mem_add(MemKind kind, size_t bytes);
void mem_sub(MemKind kind, size_t bytes);
MemCounter mem_counter(MemKind kind);
// Peak of the sum of several kinds (tracked together, so it is the true peak of the sum).
int64_t mem_total_peak();
int64_t mem_total_live();
// Sets every peak to its live value.
void mem_reset_peaks();

}  // namespace kt::runtime
