// Allocation of the engine's big buffers: the packed weights, the scratch, the activation cache
// and the LoRA stage. A block of at least kHugeMinBytes is its own anonymous mapping (mmap /
// munmap: freed memory goes back to the system at once, whatever malloc's thresholds), 2 MiB-
// aligned, with its whole 2 MiB pages advised as transparent huge pages (madvise MADV_HUGEPAGE, on
// Linux where THP is 'always' or 'madvise'): the backward's transposed weight reads (3 KiB runs
// 24-64 KiB apart) and the gathers of token rows otherwise walk a page-table entry every few
// lines. The tail past the last whole 2 MiB page keeps small pages, so a block is never resident
// beyond its own bytes (rounded to 4 KiB). KT_HUGE_PAGES=0 (or off) advises nothing; 1 / on /
// unset advise; another value throws from huge_pages_enabled(), which MoEEngine's constructor
// calls first (a ValueError).
#pragma once

#include <cstddef>

namespace kt::runtime {

inline constexpr size_t kHugePageBytes = size_t{2} << 20;
inline constexpr size_t kHugeMinBytes = size_t{8} << 20;  // smaller blocks gain little

// Whether blocks of kHugeMinBytes or more are advised as huge pages (KT_HUGE_PAGES, read once).
// Throws std::invalid_argument for a value it does not know.
bool huge_pages_enabled();

// The bytes big_alloc(bytes, align) reserves (what memory_stats counts): `bytes` rounded up to
// `align`, and a block of kHugeMinBytes or more to whole 4 KiB pages. big_alloc_size of its own
// result returns it unchanged.
size_t big_alloc_size(size_t bytes, size_t align);

// A block of big_alloc_size(bytes, align) bytes aligned to `align` (a power of two, at most 4096)
// or more; throws std::bad_alloc. Free it with big_free(p, big_alloc_size(bytes, align)).
void* big_alloc(size_t bytes, size_t align);
void big_free(void* p, size_t size);

}  // namespace kt::runtime
