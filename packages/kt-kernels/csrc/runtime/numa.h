// NUMA topology, placement and thread affinity. With libnuma (found at build time:
// KT_HAVE_LIBNUMA) memory of a tensor-parallel slice is bound to its node; without it, or on a
// single-node machine, binding is a no-op and every slice lives where the kernel's first-touch
// policy puts it (the engine has each slice's pages first written by that slice's worker group).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace kt::runtime {

// NUMA nodes of this machine (libnuma, else /sys/devices/system/node/node*, else 1).
int numa_node_count();

// Binds the pages of [p, p + bytes) to `node` before they are first touched (no-op without
// libnuma or with one node).
void bind_to_node(void* p, size_t bytes, int node);

// CPUs of a Linux cpulist ("0-3,8,10-11"), ascending without repeats; empty if malformed.
std::vector<int> parse_cpulist(const std::string& text);

// CPUs of NUMA node `node` (libnuma, else /sys/devices/system/node/node<node>/cpulist); empty
// when unknown. Read once per node.
std::vector<int> node_cpus(int node);

// The CPUs the calling thread may run on (empty if the query fails).
std::vector<int> thread_affinity();

// Restricts the calling thread to `cpus`; false (and no change) when cpus is empty or the call
// fails.
bool set_thread_affinity(const std::vector<int>& cpus);

// Whether worker groups are pinned to their NUMA node's CPUs: KT_PIN_THREADS=0 turns it off,
// unset / empty / 1 leaves it on; any other value throws std::invalid_argument.
bool thread_pinning_enabled();

}  // namespace kt::runtime
