#include "runtime/big_alloc.h"

#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "runtime/env_switch.h"

namespace kt::runtime {

namespace {

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

bool huge(size_t bytes) { return bytes >= kHugeMinBytes && huge_pages_enabled(); }

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
  if (bytes == 0) bytes = 1;
  return huge(bytes) ? round_up(bytes, kHugePageBytes) : round_up(bytes, align);
}

void* big_alloc(size_t bytes, size_t align) {
  const bool advise = huge(bytes == 0 ? 1 : bytes);
  const size_t size = big_alloc_size(bytes, align);
  void* p = std::aligned_alloc(advise ? kHugePageBytes : align, size);
  if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Advice only: where THP is off (or the kernel lacks it) the block keeps small pages.
  if (advise) (void)madvise(p, size, MADV_HUGEPAGE);
#endif
  return p;
}

void big_free(void* p) { std::free(p); }

}  // namespace kt::runtime
