// Memory of the activation cache: one process-wide pool of page-aligned blocks that every engine's
// cache entries draw from and return to. A forward that saves for backward takes blocks sized for
// the rows it routed; backward (or clear_cache) hands them back, and the next forward of any layer
// reuses them, so the memory held is that of the entries alive at once, not of every layer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>

namespace kt::engine {

class ActivationPool {
 public:
  static ActivationPool& instance();

  // A block of at least `bytes` (page aligned, contents undefined): a free block not more than
  // twice that size when there is one (the smallest such), else a new one, and then the free
  // blocks smaller than `bytes` are freed. Sets *size.
  void* acquire(size_t bytes, size_t* size);
  void release(void* block, size_t size);
  // Frees the blocks kept for reuse (blocks in use are not affected).
  void trim();
  size_t free_bytes() const;

 private:
  mutable std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // size -> block
  size_t free_bytes_ = 0;
};

// One growable buffer of a cache entry, backed by the pool.
class PooledBuffer {
 public:
  PooledBuffer() = default;
  PooledBuffer(const PooledBuffer&) = delete;
  PooledBuffer& operator=(const PooledBuffer&) = delete;
  ~PooledBuffer() { release(); }

  // At least `count` elements of T; the contents are undefined when the buffer had to grow.
  template <typename T>
  T* get(int64_t count) {
    return static_cast<T*>(ensure(static_cast<size_t>(count < 0 ? 0 : count) * sizeof(T)));
  }
  // The current block (null before the first get), as T.
  template <typename T>
  T* data() const {
    return static_cast<T*>(block_);
  }
  void release();
  size_t bytes() const { return size_; }

 private:
  void* ensure(size_t bytes);
  void* block_ = nullptr;
  size_t size_ = 0;
};

}  // namespace kt::engine
