#include "engine/activation_cache.h"

#include <algorithm>
#include <cstdlib>
#include <new>

#include "runtime/big_alloc.h"
#include "runtime/memory_stats.h"

namespace kt::engine {

using runtime::MemKind;

namespace {
constexpr size_t kPage = 4096;
}

ActivationPool& ActivationPool::instance() {
  // Never destroyed: engines released during interpreter shutdown still return blocks to it.
  static ActivationPool* pool = new ActivationPool();
  return *pool;
}

void* ActivationPool::acquire(size_t bytes, size_t* size) {
  const size_t want = runtime::big_alloc_size(std::max<size_t>(bytes, 64), kPage);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.lower_bound(want);
    if (it != free_.end() && it->first / 2 <= want) {
      void* block = it->second;
      *size = it->first;
      free_bytes_ -= it->first;
      free_.erase(it);
      runtime::mem_sub(MemKind::pool, *size);
      runtime::mem_add(MemKind::cache, *size);
      return block;
    }
    // Free blocks smaller than this request are returned to the system: calls grew, so they
    // would mostly sit unused (with varying T the pool would otherwise keep every size seen).
    for (auto small = free_.begin(); small != free_.end() && small->first < want;) {
      runtime::big_free(small->second, small->first);
      free_bytes_ -= small->first;
      runtime::mem_sub(MemKind::pool, small->first);
      small = free_.erase(small);
    }
  }
  void* block = runtime::big_alloc(want, kPage);
  *size = want;
  runtime::mem_add(MemKind::cache, want);
  return block;
}

void ActivationPool::release(void* block, size_t size) {
  if (block == nullptr) return;
  std::lock_guard<std::mutex> lock(mutex_);
  free_.emplace(size, block);
  free_bytes_ += size;
  runtime::mem_sub(MemKind::cache, size);
  runtime::mem_add(MemKind::pool, size);
}

void ActivationPool::trim() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& [size, block] : free_) {
    runtime::big_free(block, size);
    runtime::mem_sub(MemKind::pool, size);
  }
  free_.clear();
  free_bytes_ = 0;
}

size_t ActivationPool::free_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return free_bytes_;
}

void PooledBuffer::release() {
  if (block_ == nullptr) return;
  ActivationPool::instance().release(block_, size_);
  block_ = nullptr;
  size_ = 0;
}

void* PooledBuffer::ensure(size_t bytes) {
  if (block_ != nullptr && size_ >= bytes) return block_;
  release();
  block_ = ActivationPool::instance().acquire(bytes, &size_);
  return block_;
}

}  // namespace kt::engine
