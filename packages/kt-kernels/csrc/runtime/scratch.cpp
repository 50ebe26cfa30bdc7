#include "runtime/scratch.h"

#include <cstdlib>
#include <new>

#include "runtime/big_alloc.h"
#include "runtime/memory_stats.h"

namespace kt::runtime {

Scratch& Scratch::instance() {
  static Scratch scratch;
  return scratch;
}

Scratch::~Scratch() { release(); }

void* Scratch::ensure(Buffer& b, size_t bytes) {
  if (bytes == 0) bytes = 64;
  if (b.size >= bytes) return b.ptr;
  // Grow by at least a quarter so slowly rising sizes do not reallocate every call.
  size_t want = bytes > b.size + b.size / 4 ? bytes : b.size + b.size / 4;
  want = big_alloc_size(want, 4096);
  free_buffer(b);
  void* p = big_alloc(want, 4096);
  b.ptr = p;
  b.size = want;
  bytes_.fetch_add(want);
  mem_add(MemKind::scratch, want);
  return p;
}

void Scratch::free_buffer(Buffer& b) {
  if (b.ptr == nullptr) return;
  big_free(b.ptr, b.size);
  bytes_.fetch_sub(b.size);
  mem_sub(MemKind::scratch, b.size);
  b.ptr = nullptr;
  b.size = 0;
}

void* Scratch::shared(int slot, size_t bytes) {
  if (static_cast<int>(shared_.size()) <= slot) shared_.resize(static_cast<size_t>(slot) + 1);
  return ensure(shared_[static_cast<size_t>(slot)], bytes);
}

void Scratch::prepare_threads(int n_threads) {
  if (static_cast<int>(local_.size()) < n_threads) local_.resize(static_cast<size_t>(n_threads));
}

void* Scratch::local(int thread, int slot, size_t bytes) {
  auto& list = local_[static_cast<size_t>(thread)];
  if (static_cast<int>(list.size()) <= slot) list.resize(static_cast<size_t>(slot) + 1);
  return ensure(list[static_cast<size_t>(slot)], bytes);
}

void Scratch::release() {
  for (auto& b : shared_) free_buffer(b);
  for (auto& list : local_) {
    for (auto& b : list) free_buffer(b);
  }
}

}  // namespace kt::runtime
