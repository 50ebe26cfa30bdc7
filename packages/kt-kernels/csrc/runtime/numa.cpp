#include "runtime/numa.h"

#include <dirent.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>

#ifdef KT_HAVE_LIBNUMA
#include <numa.h>
#endif

#include "runtime/env_switch.h"

namespace kt::runtime {

namespace {

int count_sysfs_nodes() {
  DIR* d = opendir("/sys/devices/system/node");
  if (d == nullptr) return 1;
  int n = 0;
  while (dirent* ent = readdir(d)) {
    if (std::strncmp(ent->d_name, "node", 4) == 0 && std::isdigit(ent->d_name[4])) ++n;
  }
  closedir(d);
  return n > 0 ? n : 1;
}

// Large enough for any machine the engine targets; CPUs beyond it are never pinned to.
constexpr int kMaxCpus = 8192;

std::vector<int> read_node_cpus(int node) {
#ifdef KT_HAVE_LIBNUMA
  if (numa_available() >= 0) {
    bitmask* mask = numa_allocate_cpumask();
    std::vector<int> cpus;
    if (mask != nullptr && numa_node_to_cpus(node, mask) == 0) {
      for (unsigned i = 0; i < mask->size && i < static_cast<unsigned>(kMaxCpus); ++i) {
        if (numa_bitmask_isbitset(mask, i)) cpus.push_back(static_cast<int>(i));
      }
    }
    if (mask != nullptr) numa_free_cpumask(mask);
    if (!cpus.empty()) return cpus;
  }
#endif
  std::ifstream in("/sys/devices/system/node/node" + std::to_string(node) + "/cpulist");
  std::string line;
  if (!in || !std::getline(in, line)) return {};
  return parse_cpulist(line);
}

}  // namespace

int numa_node_count() {
  static const int n = [] {
#ifdef KT_HAVE_LIBNUMA
    if (numa_available() >= 0) {
      const int c = numa_num_configured_nodes();
      return c > 0 ? c : 1;
    }
#endif
    return count_sysfs_nodes();
  }();
  return n;
}

void bind_to_node(void* p, size_t bytes, int node) {
#ifdef KT_HAVE_LIBNUMA
  if (p != nullptr && bytes > 0 && numa_available() >= 0 && numa_node_count() > 1) {
    numa_tonode_memory(p, bytes, node);
  }
#else
  (void)p;
  (void)bytes;
  (void)node;
#endif
}

std::vector<int> parse_cpulist(const std::string& text) {
  std::vector<int> cpus;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    while (!item.empty() && std::isspace(static_cast<unsigned char>(item.back()))) item.pop_back();
    while (!item.empty() && std::isspace(static_cast<unsigned char>(item.front()))) {
      item.erase(item.begin());
    }
    if (item.empty()) continue;
    char* end = nullptr;
    const long lo = std::strtol(item.c_str(), &end, 10);
    long hi = lo;
    if (end == item.c_str()) return {};
    if (*end == '-') {
      const char* rest = end + 1;
      hi = std::strtol(rest, &end, 10);
      if (end == rest) return {};
    }
    if (*end != '\0' || lo < 0 || hi < lo || hi >= kMaxCpus) return {};
    for (long c = lo; c <= hi; ++c) cpus.push_back(static_cast<int>(c));
  }
  std::sort(cpus.begin(), cpus.end());
  cpus.erase(std::unique(cpus.begin(), cpus.end()), cpus.end());
  return cpus;
}

std::vector<int> node_cpus(int node) {
  static std::mutex m;
  static std::map<int, std::vector<int>> cache;
  std::lock_guard<std::mutex> lock(m);
  auto it = cache.find(node);
  if (it == cache.end())
    it = cache.emplace(node, node >= 0 ? read_node_cpus(node) : std::vector<int>{}).first;
  return it->second;
}

std::vector<int> thread_affinity() {
  std::vector<int> cpus;
  cpu_set_t* set = CPU_ALLOC(kMaxCpus);
  if (set == nullptr) return cpus;
  const size_t size = CPU_ALLOC_SIZE(kMaxCpus);
  CPU_ZERO_S(size, set);
  if (pthread_getaffinity_np(pthread_self(), size, set) == 0) {
    for (int c = 0; c < kMaxCpus; ++c) {
      if (CPU_ISSET_S(c, size, set)) cpus.push_back(c);
    }
  }
  CPU_FREE(set);
  return cpus;
}

bool set_thread_affinity(const std::vector<int>& cpus) {
  if (cpus.empty()) return false;
  cpu_set_t* set = CPU_ALLOC(kMaxCpus);
  if (set == nullptr) return false;
  const size_t size = CPU_ALLOC_SIZE(kMaxCpus);
  CPU_ZERO_S(size, set);
  for (int c : cpus) {
    if (c >= 0 && c < kMaxCpus) CPU_SET_S(c, size, set);
  }
  const bool ok = pthread_setaffinity_np(pthread_self(), size, set) == 0;
  CPU_FREE(set);
  return ok;
}

bool thread_pinning_enabled() {
  return env_switch("KT_PIN_THREADS",
                    "0 / off (no pinning) or 1 / on (or unset, auto: pin worker groups to their "
                    "NUMA node)")
      .value_or(true);
}

}  // namespace kt::runtime
