// One persistent worker pool per process, shared by every engine. The calling thread takes part
// as worker 0; tasks of a phase are handed out by an atomic counter, and run() returns once all of
// them finished (the barrier between phases). Idle workers spin briefly, then sleep on a
// condition variable, so they never starve the caller when there are more threads than cores.
//
// run_grouped() splits the workers into groups with one task counter each (tensor parallel: group
// g computes slice g, on NUMA node g's CPUs when the caller asks for pinning).
//
// fork(): a handler (runtime/fork.h) waits for the running phase, and the child forgets the
// parent's workers and starts its own on the next run.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
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

  // task(group, index, worker) for index in [0, tasks_per_group[group]).
  using GroupTaskFn = std::function<void(int, int64_t, int)>;

  // Runs G = tasks_per_group.size() lists of tasks on n_threads threads split into G groups. With
  // n_threads >= G, worker w belongs to group w * G / n_threads (every group has a worker); with
  // fewer threads, worker w serves groups w, w + n_threads, ... in that order. A worker only
  // takes tasks of its own group(s). `group_node` (may be null or empty: no pinning) names the
  // NUMA node of each group; pool workers (not the calling thread, which belongs to the
  // application) are then pinned to the CPUs of their groups' node before they take tasks, and
  // stay pinned until a later grouped run asks otherwise; node -1 (or a worker whose groups lie
  // on different nodes) restores the worker's original mask. Affinity failures are ignored.
  // Exceptions propagate as in run().
  void run_grouped(const std::vector<int64_t>& tasks_per_group, int n_threads,
                   const GroupTaskFn& task, const std::vector<int>* group_node = nullptr);

  // The groups worker `worker` of n_threads serves, in order (the split described above).
  static std::vector<int> groups_of(int worker, int n_threads, int n_groups);

  // Threads the pool holds (workers + caller).
  int size() const;
  // Times a forked child rebuilt the pool (fork() is handled: the child starts new workers on
  // its next run instead of waiting for the parent's, which do not exist there).
  int64_t forks() const { return forks_.load(); }

  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

 private:
  ThreadPool() = default;
  void grow(int n_threads);
  struct Affinity;  // a pool worker's own CPU mask and the node it is pinned to
  void worker_loop(int id, uint64_t seen);
  void work(int id, Affinity* aff);
  void work_grouped(int id, Affinity* aff);
  void start(int n_threads);
  void finish();
  void before_fork();
  void after_fork_parent();
  void after_fork_child();
  std::atomic<int64_t> forks_{0};

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
  // The current grouped run (group_task_ non-null): one padded counter per group.
  struct alignas(64) Counter {
    std::atomic<int64_t> next{0};
  };
  const GroupTaskFn* group_task_ = nullptr;
  const std::vector<int64_t>* group_tasks_ = nullptr;
  const std::vector<int>* group_node_ = nullptr;
  std::unique_ptr<Counter[]> counters_;
  size_t n_counters_ = 0;
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
  std::mutex error_mutex_;
};

// Runs task(i, worker) for i in [0, n) on the process pool with n_threads threads; runs inline when
// n_threads <= 1 or n <= 1.
void parallel_for(int64_t n, int n_threads, const ThreadPool::TaskFn& task);

// ThreadPool::run_grouped on the process pool; runs inline (groups in order, worker 0) when
// n_threads <= 1.
void grouped_for(const std::vector<int64_t>& tasks_per_group, int n_threads,
                 const ThreadPool::GroupTaskFn& task, const std::vector<int>* group_node = nullptr);

// Default thread count: KT_NUM_THREADS if set, else one per physical core. A KT_NUM_THREADS that
// is not an integer in [1, 4096] throws std::invalid_argument.
int default_thread_count();

}  // namespace kt::runtime
