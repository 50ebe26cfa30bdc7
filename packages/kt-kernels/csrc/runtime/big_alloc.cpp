#include "runtime/big_alloc.h"

#include <cstdint>
#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "runtime/env_switch.h"

namespace kt::runtime {

namespace {

constexpr size_t kPageBytes = 4096;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

#if defined(__linux__)
// `size` bytes (a multiple of 4 KiB) of fresh anonymous memory starting on a 2 MiB boundary:
// map 2 MiB more than asked and unmap the unaligned head and the rest of the tail.
void* map_aligned(size_t size) {
  const size_t span = size + kHugePageBytes;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const auto start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = round_up(start, kHugePageBytes);
  if (aligned > start) (void)munmap(raw, aligned - start);
  const uintptr_t end = aligned + size;
  if (start + span > end) (void)munmap(reinterpret_cast<void*>(end), start + span - end);
  return reinterpret_cast<void*>(aligned);
}
#endif

}  // namespace

bool huge_pages_enabled() {
  static const bool enabled =
      env_switch("KT_HUGE_PAGES",
                 "'1' / 'on' (or unset, 'auto': advise huge pages for big buffers) or '0' / "
                 "'off' (never)")
          .value_or(true);
  return enabled;
}

size_t big_alloc_size(size_t bytes, size_t align) {
  const size_t n = round_up(bytes == 0 ? 1 : bytes, align);
  return n >= kHugeMinBytes ? round_up(n, kPageBytes) : n;
}

void* big_alloc(size_t bytes, size_t align) {
  const size_t size = big_alloc_size(bytes, align);
#if defined(__linux__)
  if (size >= kHugeMinBytes) {
    void* p = map_aligned(size);
#if defined(MADV_HUGEPAGE)
    // Only the whole huge pages: advising the tail would make its first touch fault in a full
    // 2 MiB page past the block's end. Advice only: where THP is off the block keeps small pages.
    const size_t whole = size / kHugePageBytes * kHugePageBytes;
    if (whole > 0 && huge_pages_enabled()) (void)madvise(p, whole, MADV_HUGEPAGE);
#endif
    return p;
  }
#endif
  void* p = std::aligned_alloc(align, size);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

void big_free(void* p, size_t size) {
  if (p == nullptr) return;
#if defined(__linux__)
  if (size >= kHugeMinBytes) {
    (void)munmap(p, size);
    return;
  }
#endif
  std::free(p);
}

}  // namespace kt::runtime
