// The worker pool's grouped runs (tensor parallel across NUMA nodes): the split of workers into
// groups, every task run exactly once by a worker of its group, exceptions, pinning requests (a
// no-op change on a one-node machine, but the calls must succeed or be ignored), the per-group
// trace events, the cpulist parser, and fork() (the child rebuilds the pool).
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <iterator>
#include <thread>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "runtime/numa.h"
#include "runtime/thread_pool.h"
#include "runtime/trace.h"

using kt::runtime::grouped_for;
using kt::runtime::ThreadPool;

namespace {

const int kThreads[] = {1, 2, 3, 5};
const int kGroups[] = {1, 2, 3};

}  // namespace

TEST(groups_of_covers_every_group_once) {
  for (int n : kThreads) {
    for (int G : kGroups) {
      std::vector<int> workers_of(static_cast<size_t>(G), 0);
      for (int w = 0; w < n; ++w) {
        const std::vector<int> gs = ThreadPool::groups_of(w, n, G);
        REQUIRE(!gs.empty() || n > G, "worker %d of %d serves nothing with %d groups", w, n, G);
        if (n >= G) {
          REQUIRE(gs.size() == 1 && gs[0] == w * G / n, "n=%d G=%d w=%d", n, G, w);
        } else {
          for (size_t i = 0; i < gs.size(); ++i) {
            REQUIRE(gs[i] == w + static_cast<int>(i) * n, "n=%d G=%d w=%d", n, G, w);
          }
        }
        for (int g : gs) ++workers_of[static_cast<size_t>(g)];
      }
      for (int g = 0; g < G; ++g) {
        REQUIRE(workers_of[static_cast<size_t>(g)] >= 1, "group %d of %d has no worker (n=%d)", g,
                G, n);
        if (n < G) REQUIRE(workers_of[static_cast<size_t>(g)] == 1, "n=%d G=%d g=%d", n, G, g);
      }
    }
  }
}

TEST(grouped_runs_every_task_once_on_its_group) {
  for (int rep = 0; rep < 3; ++rep) {
    for (int n : kThreads) {
      for (int G : kGroups) {
        std::vector<int64_t> counts;
        for (int g = 0; g < G; ++g) counts.push_back(37 + 11 * g + rep);
        std::vector<std::vector<std::atomic<int>>> runs(static_cast<size_t>(G));
        std::vector<std::vector<std::atomic<int>>> by(static_cast<size_t>(G));
        for (int g = 0; g < G; ++g) {
          runs[static_cast<size_t>(g)] = std::vector<std::atomic<int>>(counts[g]);
          by[static_cast<size_t>(g)] = std::vector<std::atomic<int>>(counts[g]);
        }
        grouped_for(counts, n, [&](int g, int64_t i, int worker) {
          runs[static_cast<size_t>(g)][static_cast<size_t>(i)].fetch_add(1);
          by[static_cast<size_t>(g)][static_cast<size_t>(i)].store(worker);
        });
        for (int g = 0; g < G; ++g) {
          for (int64_t i = 0; i < counts[g]; ++i) {
            REQUIRE(runs[static_cast<size_t>(g)][static_cast<size_t>(i)].load() == 1,
                    "n=%d G=%d: task (%d, %lld) ran %d times", n, G, g, static_cast<long long>(i),
                    runs[static_cast<size_t>(g)][static_cast<size_t>(i)].load());
            const int w = by[static_cast<size_t>(g)][static_cast<size_t>(i)].load();
            const std::vector<int> gs = ThreadPool::groups_of(w, n, G);
            REQUIRE(std::find(gs.begin(), gs.end(), g) != gs.end(),
                    "n=%d G=%d: task of group %d ran on worker %d", n, G, g, w);
          }
        }
      }
    }
  }
}

TEST(grouped_empty_groups_and_plain_runs_interleave) {
  // Groups without tasks, no tasks at all, and ungrouped runs between grouped ones.
  std::atomic<int> total{0};
  grouped_for({0, 5, 0}, 3, [&](int g, int64_t, int) {
    REQUIRE(g == 1, "task of empty group %d", g);
    total.fetch_add(1);
  });
  REQUIRE(total.load() == 5, "%d", total.load());
  grouped_for({0, 0}, 2, [&](int, int64_t, int) { total.fetch_add(100); });
  REQUIRE(total.load() == 5, "%d", total.load());
  kt::runtime::parallel_for(10, 3, [&](int64_t, int) { total.fetch_add(1); });
  grouped_for({4, 4}, 2, [&](int, int64_t, int) { total.fetch_add(1); });
  REQUIRE(total.load() == 23, "%d", total.load());
}

TEST(grouped_exception_propagates) {
  for (int n : kThreads) {
    bool caught = false;
    try {
      grouped_for({20, 20}, n, [&](int g, int64_t i, int) {
        if (g == 1 && i == 7) throw std::runtime_error("task failed");
      });
    } catch (const std::runtime_error& e) {
      caught = std::string(e.what()) == "task failed";
    }
    REQUIRE(caught, "n=%d: the task's exception was not rethrown", n);
    // The pool still works afterwards.
    std::atomic<int> ran{0};
    grouped_for({3, 3}, n, [&](int, int64_t, int) { ran.fetch_add(1); });
    REQUIRE(ran.load() == 6, "n=%d: %d", n, ran.load());
  }
  bool caught = false;
  try {
    const std::vector<int> nodes = {0};
    grouped_for({1, 1}, 2, [](int, int64_t, int) {}, &nodes);
  } catch (const std::invalid_argument&) {
    caught = true;
  }
  REQUIRE(caught, "a node list of the wrong length must be refused");
}

TEST(grouped_pinning_requests) {
  // Group g "on node 0": pool workers run their tasks restricted to node 0's CPUs (all CPUs on a
  // one-node machine); then -1 gives them back their original mask. The caller is never pinned.
  const std::vector<int> home = kt::runtime::thread_affinity();
  const std::vector<int> node0 = kt::runtime::node_cpus(0);
  std::vector<int> allowed;
  std::set_intersection(node0.begin(), node0.end(), home.begin(), home.end(),
                        std::back_inserter(allowed));
  std::atomic<int> bad{0};
  std::vector<int> pinned = {0, 0};
  grouped_for(
      {16, 16}, 3,
      [&](int, int64_t, int worker) {
        if (worker == 0 || allowed.empty()) return;
        const std::vector<int> now = kt::runtime::thread_affinity();
        if (!std::includes(allowed.begin(), allowed.end(), now.begin(), now.end()))
          bad.fetch_add(1);
      },
      &pinned);
  REQUIRE(bad.load() == 0, "%d tasks ran outside node 0", bad.load());
  std::vector<int> unpinned = {-1, -1};
  grouped_for(
      {16, 16}, 3,
      [&](int, int64_t, int worker) {
        if (worker > 0 && kt::runtime::thread_affinity() != home) bad.fetch_add(1);
      },
      &unpinned);
  REQUIRE(bad.load() == 0, "%d tasks ran with a mask other than the original", bad.load());
  REQUIRE(kt::runtime::thread_affinity() == home, "the calling thread's mask changed");
}

TEST(grouped_trace_events_name_the_group) {
  kt::runtime::trace_clear();
  kt::runtime::trace_enable(true);
  const uint32_t caller = kt::runtime::trace_thread_id();
  for (int rep = 0; rep < 5; ++rep) grouped_for({40, 40}, 2, [](int, int64_t, int) {});
  kt::runtime::trace_enable(false);
  int64_t tasks[2] = {0, 0};
  uint32_t tid1 = 0;
  for (const auto& e : kt::runtime::trace_events()) {
    if (e.cat != "worker") continue;
    REQUIRE(e.group == 0 || e.group == 1, "group %lld", static_cast<long long>(e.group));
    tasks[e.group] += e.tasks;
    if (e.group == 0) {
      REQUIRE(e.tid == caller, "group 0 (worker 0) ran on thread %u", e.tid);
    } else {
      REQUIRE(e.tid != caller && (tid1 == 0 || e.tid == tid1), "group 1 on thread %u", e.tid);
      tid1 = e.tid;
    }
  }
  REQUIRE(tasks[0] == 200 && tasks[1] == 200, "%lld %lld", static_cast<long long>(tasks[0]),
          static_cast<long long>(tasks[1]));
  const std::string json = kt::runtime::trace_chrome_json();
  REQUIRE(json.find("\"group\":1") != std::string::npos, "no group in the trace JSON");
  kt::runtime::trace_clear();
}

TEST(parse_cpulist) {
  using kt::runtime::parse_cpulist;
  REQUIRE(parse_cpulist("0-3,8,10-11\n") == std::vector<int>({0, 1, 2, 3, 8, 10, 11}), "list");
  REQUIRE(parse_cpulist("5") == std::vector<int>({5}), "single");
  REQUIRE(parse_cpulist("").empty(), "empty");
  REQUIRE(parse_cpulist("3-1").empty(), "reversed range");
  REQUIRE(parse_cpulist("a-b").empty(), "garbage");
  REQUIRE(parse_cpulist("1,1,0").size() == 2, "repeats");
  REQUIRE(kt::runtime::numa_node_count() >= 1, "nodes");
}

// After the pool ran with several threads, a forked child runs plain and grouped runs on its own
// (new) workers: every task once, no hang (the parent kills a child that takes over 30 s).
TEST(fork_child_rebuilds_the_pool) {
  std::atomic<int64_t> sum{0};
  kt::runtime::parallel_for(64, 4, [&](int64_t i, int) { sum += i; });
  REQUIRE(sum.load() == 64 * 63 / 2, "parent sum %lld", static_cast<long long>(sum.load()));
  const int64_t forks = ThreadPool::instance().forks();
  const pid_t pid = fork();
  REQUIRE(pid >= 0, "fork failed");
  if (pid == 0) {
    std::atomic<int64_t> s{0};
    kt::runtime::parallel_for(64, 4, [&](int64_t i, int) { s += i; });
    std::vector<std::atomic<int>> seen(12);
    grouped_for({4, 4, 4}, 3,
                [&](int g, int64_t i, int) { ++seen[static_cast<size_t>(g * 4 + i)]; });
    bool ok = s.load() == 64 * 63 / 2 && ThreadPool::instance().forks() == forks + 1;
    for (auto& v : seen) ok = ok && v.load() == 1;
    _exit(ok ? 0 : 3);
  }
  int status = 0;
  pid_t done = 0;
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while ((done = waitpid(pid, &status, WNOHANG)) == 0 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (done == 0) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
  }
  REQUIRE(done == pid, "the forked child hung on a pool run");
  REQUIRE(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %d", status);
  REQUIRE(ThreadPool::instance().forks() == forks, "the parent's pool is untouched");
  sum = 0;
  kt::runtime::parallel_for(64, 4, [&](int64_t i, int) { sum += i; });
  REQUIRE(sum.load() == 64 * 63 / 2, "parent sum after fork");
}

int main(int argc, char** argv) { return kt::testing::run_all(argc, argv); }
