// Scratch memory shared by every engine of the process: layers run one at a time, so one set of
// buffers serves them all, sized by the largest call so far (the widest layer at the most tokens).
// Buffers grow on demand (never shrink until release(), which kt_kernels.trim_memory() calls), are
// page aligned, and their contents are undefined when handed out.
#pragma once

#include <atomic>
#include <cstddef>
#include <mutex>
#include <vector>

namespace kt::runtime {

class Scratch {
 public:
  static Scratch& instance();

  // Process-wide buffer number `slot`. Callers hold the engine lock (engine/moe_engine.cpp) while
  // using it.
  void* shared(int slot, size_t bytes);
  // Buffer number `slot` of worker `thread`; call prepare_threads first from the orchestrating
  // thread, then only worker `thread` touches its own buffers.
  void prepare_threads(int n_threads);
  void* local(int thread, int slot, size_t bytes);

  size_t bytes() const { return bytes_.load(); }
  // Frees every buffer (the next use allocates again). Callers hold the engine lock.
  void release();

  ~Scratch();

 private:
  struct Buffer {
    void* ptr = nullptr;
    size_t size = 0;
  };
  void* ensure(Buffer& b, size_t bytes);
  void free_buffer(Buffer& b);

  std::vector<Buffer> shared_;
  std::vector<std::vector<Buffer>> local_;
  std::atomic<size_t> bytes_{0};
};

}  // namespace kt::runtime
