#include "runtime/memory_stats.h"

namespace kt::runtime {

namespace {

struct Counters {
  std::array<std::atomic<int64_t>, kMemKinds> live{};
  std::array<std::atomic<int64_t>, kMemKinds> peak{};
  std::atomic<int64_t> total_live{0};
  std::atomic<int64_t> total_peak{0};
};

Counters& counters() {
  static Counters c;
  return c;
}

void raise_to(std::atomic<int64_t>& peak, int64_t value) {
  int64_t seen = peak.load(std::memory_order_relaxed);
  while (value > seen && !peak.compare_exchange_weak(seen, value, std::memory_order_relaxed)) {
  }
}

}  // namespace

const char* mem_kind_name(MemKind kind) {
  switch (kind) {
    case MemKind::weights:
      return "weights";
    case MemKind::lora:
      return "lora";
    case MemKind::cache:
      return "cache";
    case MemKind::pool:
      return "pool";
    case MemKind::scratch:
      return "scratch";
  }
  return "?";
}

void mem_add(MemKind kind, size_t bytes) {
  Counters& c = counters();
  const auto i = static_cast<size_t>(kind);
  const auto n = static_cast<int64_t>(bytes);
  raise_to(c.peak[i], c.live[i].fetch_add(n, std::memory_order_relaxed) + n);
  raise_to(c.total_peak, c.total_live.fetch_add(n, std::memory_order_relaxed) + n);
}

void mem_sub(MemKind kind, size_t bytes) {
  Counters& c = counters();
  const auto n = static_cast<int64_t>(bytes);
  c.live[static_cast<size_t>(kind)].fetch_sub(n, std::memory_order_relaxed);
  c.total_live.fetch_sub(n, std::memory_order_relaxed);
}

MemCounter mem_counter(MemKind kind) {
  Counters& c = counters();
  const auto i = static_cast<size_t>(kind);
  return {c.live[i].load(std::memory_order_relaxed), c.peak[i].load(std::memory_order_relaxed)};
}

int64_t mem_total_peak() { return counters().total_peak.load(std::memory_order_relaxed); }
int64_t mem_total_live() { return counters().total_live.load(std::memory_order_relaxed); }

void mem_reset_peaks() {
  Counters& c = counters();
  for (int i = 0; i < kMemKinds; ++i) {
    c.peak[static_cast<size_t>(i)].store(c.live[static_cast<size_t>(i)].load());
  }
  c.total_peak.store(c.total_live.load());
}

}  // namespace kt::runtime
