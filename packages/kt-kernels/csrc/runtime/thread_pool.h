// One persistent worker pool per process, shared by every engine. The calling thread takes part
// as worker 0; tasks of a phase are handed out by an atomic counter, and run() returns once all of
// them finished (the barrier between phases). Idle workers spin briefly, then sleep on a
// condition variable, so they never starve the caller when there are more threads than cores.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kt::runtime {

class ThreadPool {
 public:
  // task(index, worker) for index in [0, n_tasks); worker in [0, n_threads).
  using TaskFn = std::function<void(int64_t, int)>;

  static ThreadPool& instance();

  // Runs n_tasks tasks on n_threads threads (the caller plus n_threads - 1 workers; the pool grows
  // to that size on demand). One run at a time: concurrent callers queue on a mutex. The first
  // exception thrown by a task is rethrown here once every thread has stopped.
  void run(int64_t n_tasks, int n_threads, const TaskFn& task);

  // Threads the pool holds (workers + caller).
  int size() const;

  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

 private:
  ThreadPool() = default;
  void grow(int n_threads);
  void worker_loop(int id, uint64_t seen);
  void work(int id);

  std::mutex run_mutex_;  // one run() at a time

  std::mutex mutex_;
  std::condition_variable wake_;  // workers wait for a new generation
  std::condition_variable done_;  // the caller waits for the last worker
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};  // workers of this generation that have not finished
  bool stop_ = false;

  // The current run.
  const TaskFn* task_ = nullptr;
  int64_t n_tasks_ = 0;
  int n_threads_ = 1;
  std::atomic<int64_t> next_{0};
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
  std::mutex error_mutex_;
};

// Runs task(i, worker) for i in [0, n) on the process pool with n_threads threads; runs inline when
// n_threads <= 1 or n <= 1.
void parallel_for(int64_t n, int n_threads, const ThreadPool::TaskFn& task);

// Default thread count: KT_NUM_THREADS if set, else one per physical core. A KT_NUM_THREADS that
// is not an integer in [1, 4096] throws std::invalid_argument.
int default_thread_count();

}  // namespace kt::runtime
