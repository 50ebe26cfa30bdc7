#include "runtime/thread_pool.h"

#include "runtime/trace.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <iterator>
#include <new>
#include <stdexcept>
#include <string>

#include "runtime/cpu_features.h"
#include "runtime/fork.h"
#include "runtime/numa.h"

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
  static ThreadPool* pool = [] {
    auto* p = new ThreadPool();
    on_fork(
        kForkOrderPool, [p] { p->before_fork(); }, [p] { p->after_fork_parent(); },
        [p] { p->after_fork_child(); });
    return p;
  }();
  return *pool;
}

// Before fork(): wait for the running phase (if any) and hold both locks, so the child starts
// with no run in progress and no lock owned by a thread that does not exist there.
void ThreadPool::before_fork() {
  run_mutex_.lock();
  mutex_.lock();
}

void ThreadPool::after_fork_parent() {
  mutex_.unlock();
  run_mutex_.unlock();
}

// In the child only the forking thread exists. The workers' handles are forgotten without a join
// (they name threads of the parent; destroying a joinable std::thread would terminate), the
// condition variables start afresh (their waiters were the parent's workers), and the next run
// starts new workers, so engines old and new work in the child.
void ThreadPool::after_fork_child() {
  auto* lost = new std::vector<std::thread>(std::move(workers_));  // leaked on purpose
  (void)lost;
  workers_.clear();
  new (&wake_) std::condition_variable();
  new (&done_) std::condition_variable();
  pending_.store(0);
  task_ = nullptr;
  group_task_ = nullptr;
  group_tasks_ = nullptr;
  group_node_ = nullptr;
  forks_.fetch_add(1);
  mutex_.unlock();
  run_mutex_.unlock();
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
// Grouped runs: one event per thread, phase and group, with the group in its args.
struct WorkSpan {
  explicit WorkSpan(int g = -1) : group(g) {}
  bool on = trace_enabled();
  int64_t t0 = on ? trace_now_ns() : 0;
  int64_t tasks = 0;
  int group;
  ~WorkSpan() {
    if (on && tasks > 0) {
      TraceEvent ev{"tasks", "worker", -1, -1, trace_thread_id(), t0, trace_now_ns() - t0};
      ev.tasks = tasks;
      ev.group = group;
      trace_record(std::move(ev));
    }
  }
};

}  // namespace

// A pool worker's CPU mask as the thread started (restored when it is unpinned) and the NUMA node
// it is pinned to (-1: not pinned). Only the worker itself reads or changes it.
struct ThreadPool::Affinity {
  std::vector<int> home = thread_affinity();
  int node = -1;

  void pin(int want) {
    if (want == node) return;
    if (want >= 0) {
      // Only CPUs this thread was allowed to use (containers, taskset); none left: stay as is.
      std::vector<int> cpus;
      const std::vector<int> on_node = node_cpus(want);
      std::set_intersection(on_node.begin(), on_node.end(), home.begin(), home.end(),
                            std::back_inserter(cpus));
      set_thread_affinity(cpus);  // failure ignored: the work is the same, only slower
    } else {
      set_thread_affinity(home);
    }
    node = want;
  }
};

std::vector<int> ThreadPool::groups_of(int worker, int n_threads, int n_groups) {
  std::vector<int> gs;
  if (n_groups <= 0 || n_threads <= 0 || worker < 0 || worker >= n_threads) return gs;
  if (n_threads >= n_groups) {
    gs.push_back(static_cast<int>(static_cast<int64_t>(worker) * n_groups / n_threads));
  } else {
    for (int g = worker; g < n_groups; g += n_threads) gs.push_back(g);
  }
  return gs;
}

void ThreadPool::work_grouped(int id, Affinity* aff) {
  const int n_groups = static_cast<int>(group_tasks_->size());
  const std::vector<int> mine = groups_of(id, n_threads_, n_groups);
  if (aff != nullptr && group_node_ != nullptr && !group_node_->empty()) {
    // One node for all of this worker's groups, else unpinned.
    int want = -1;
    for (size_t i = 0; i < mine.size(); ++i) {
      const int nd = (*group_node_)[static_cast<size_t>(mine[i])];
      want = i == 0 ? nd : (nd == want ? want : -1);
    }
    aff->pin(want);
  }
  const GroupTaskFn& task = *group_task_;
  for (int g : mine) {
    const int64_t n = (*group_tasks_)[static_cast<size_t>(g)];
    std::atomic<int64_t>& next = counters_[static_cast<size_t>(g)].next;
    WorkSpan span(g);
    for (;;) {
      if (failed_.load(std::memory_order_relaxed)) return;
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) break;
      ++span.tasks;
      try {
        task(g, i, id);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
        failed_.store(true);
      }
    }
  }
}

void ThreadPool::work(int id, Affinity* aff) {
  if (id >= n_threads_) return;
  if (group_task_ != nullptr) {
    work_grouped(id, aff);
    return;
  }
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
  Affinity aff;
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
    work(id, &aff);
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lock(mutex_);
      done_.notify_one();
    }
  }
}

// Starts a generation for the run described by the members (the caller holds run_mutex_).
void ThreadPool::start(int n_threads) {
  grow(n_threads);
  n_threads_ = n_threads;
  failed_.store(false);
  error_ = nullptr;
  const int n_workers = static_cast<int>(workers_.size());
  pending_.store(n_workers, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  wake_.notify_all();
}

// The caller's share, the wait for every worker of this generation (those beyond n_threads
// finish at once), then the first exception, if any.
void ThreadPool::finish() {
  work(0, nullptr);
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
  group_task_ = nullptr;
  group_tasks_ = nullptr;
  group_node_ = nullptr;
  if (error_) {
    std::exception_ptr e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
}

void ThreadPool::run(int64_t n_tasks, int n_threads, const TaskFn& task) {
  if (n_tasks <= 0) return;
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  if (n_threads < 1) n_threads = 1;
  task_ = &task;
  n_tasks_ = n_tasks;
  next_.store(0);
  start(n_threads);
  finish();
}

void ThreadPool::run_grouped(const std::vector<int64_t>& tasks_per_group, int n_threads,
                             const GroupTaskFn& task, const std::vector<int>* group_node) {
  int64_t total = 0;
  for (int64_t n : tasks_per_group) total += std::max<int64_t>(n, 0);
  if (total <= 0) return;
  if (group_node != nullptr && !group_node->empty() &&
      group_node->size() != tasks_per_group.size()) {
    throw std::invalid_argument("run_grouped: group_node needs one node per group");
  }
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  if (n_threads < 1) n_threads = 1;
  const size_t G = tasks_per_group.size();
  if (n_counters_ < G) {
    counters_ = std::make_unique<Counter[]>(G);
    n_counters_ = G;
  }
  for (size_t g = 0; g < G; ++g) counters_[g].next.store(0, std::memory_order_relaxed);
  group_task_ = &task;
  group_tasks_ = &tasks_per_group;
  group_node_ = group_node;
  start(n_threads);
  finish();
}

void parallel_for(int64_t n, int n_threads, const ThreadPool::TaskFn& task) {
  if (n <= 0) return;
  if (n_threads <= 1 || n == 1) {
    for (int64_t i = 0; i < n; ++i) task(i, 0);
    return;
  }
  ThreadPool::instance().run(n, n_threads, task);
}

void grouped_for(const std::vector<int64_t>& tasks_per_group, int n_threads,
                 const ThreadPool::GroupTaskFn& task, const std::vector<int>* group_node) {
  if (n_threads <= 1) {
    for (size_t g = 0; g < tasks_per_group.size(); ++g) {
      for (int64_t i = 0; i < tasks_per_group[g]; ++i) task(static_cast<int>(g), i, 0);
    }
    return;
  }
  ThreadPool::instance().run_grouped(tasks_per_group, n_threads, task, group_node);
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
