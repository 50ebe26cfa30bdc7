#include "runtime/thread_pool.h"

#include "runtime/trace.h"

#include <chrono>
#include <cstdlib>
#include <exception>
#include <stdexcept>
#include <string>

#include "runtime/cpu_features.h"

namespace kt::runtime {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// How long an idle thread polls before it sleeps: long enough to catch the next phase of the same
// forward/backward without a wake-up, short enough not to steal a core from the caller for long.
constexpr auto kSpin = std::chrono::microseconds(50);

}  // namespace

ThreadPool& ThreadPool::instance() {
  // Never destroyed: workers may still be parked at interpreter exit, and joining them from a
  // static destructor could deadlock. The OS reclaims them with the process.
  static ThreadPool* pool = new ThreadPool();
  return *pool;
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

int ThreadPool::size() const { return static_cast<int>(workers_.size()) + 1; }

void ThreadPool::grow(int n_threads) {
  while (static_cast<int>(workers_.size()) + 1 < n_threads) {
    const int id = static_cast<int>(workers_.size()) + 1;
    // A new worker starts at the current generation, so it waits for the next run's.
    const uint64_t gen = generation_.load(std::memory_order_acquire);
    workers_.emplace_back([this, id, gen] { worker_loop(id, gen); });
  }
}

namespace {

// With the profiler on: one trace event per thread and parallel phase, spanning the tasks that
// thread ran (nested in the engine's phase event on the calling thread).
struct WorkSpan {
  bool on = trace_enabled();
  int64_t t0 = on ? trace_now_ns() : 0;
  int64_t tasks = 0;
  ~WorkSpan() {
    if (on && tasks > 0) {
      TraceEvent ev{"tasks", "worker", -1, -1, trace_thread_id(), t0, trace_now_ns() - t0};
      ev.tasks = tasks;
      trace_record(std::move(ev));
    }
  }
};

}  // namespace

void ThreadPool::work(int id) {
  if (id >= n_threads_) return;
  const TaskFn& task = *task_;
  WorkSpan span;
  for (;;) {
    if (failed_.load(std::memory_order_relaxed)) return;
    const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= n_tasks_) return;
    ++span.tasks;
    try {
      task(i, id);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!error_) error_ = std::current_exception();
      failed_.store(true);
    }
  }
}

void ThreadPool::worker_loop(int id, uint64_t seen) {
  for (;;) {
    // Spin, then sleep until a new generation starts.
    const auto until = std::chrono::steady_clock::now() + kSpin;
    uint64_t gen = generation_.load(std::memory_order_acquire);
    while (gen == seen && std::chrono::steady_clock::now() < until) {
      for (int i = 0; i < 64; ++i) cpu_relax();
      gen = generation_.load(std::memory_order_acquire);
    }
    if (gen == seen) {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      gen = generation_.load(std::memory_order_acquire);
    }
    seen = gen;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stop_) return;
    }
    work(id);
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lock(mutex_);
      done_.notify_one();
    }
  }
}

void ThreadPool::run(int64_t n_tasks, int n_threads, const TaskFn& task) {
  if (n_tasks <= 0) return;
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  if (n_threads < 1) n_threads = 1;
  grow(n_threads);
  task_ = &task;
  n_tasks_ = n_tasks;
  n_threads_ = n_threads;
  next_.store(0);
  failed_.store(false);
  error_ = nullptr;
  const int n_workers = static_cast<int>(workers_.size());
  pending_.store(n_workers, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  wake_.notify_all();
  work(0);
  // Wait for every worker of this generation (those beyond n_threads finish at once).
  const auto until = std::chrono::steady_clock::now() + kSpin;
  while (pending_.load(std::memory_order_acquire) != 0 &&
         std::chrono::steady_clock::now() < until) {
    for (int i = 0; i < 64; ++i) cpu_relax();
  }
  if (pending_.load(std::memory_order_acquire) != 0) {
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return pending_.load(std::memory_order_acquire) == 0; });
  }
  task_ = nullptr;
  if (error_) {
    std::exception_ptr e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
}

void parallel_for(int64_t n, int n_threads, const ThreadPool::TaskFn& task) {
  if (n <= 0) return;
  if (n_threads <= 1 || n == 1) {
    for (int64_t i = 0; i < n; ++i) task(i, 0);
    return;
  }
  ThreadPool::instance().run(n, n_threads, task);
}

int default_thread_count() {
  if (const char* env = std::getenv("KT_NUM_THREADS")) {
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && v > 0 && v <= 4096) return static_cast<int>(v);
    if (*env != '\0') {
      throw std::invalid_argument(std::string("KT_NUM_THREADS='") + env +
                                  "' is not a thread count: expected an integer in [1, 4096]");
    }
  }
  return physical_core_count();
}

}  // namespace kt::runtime
