// NUMA topology and placement. With libnuma (found at build time: KT_HAVE_LIBNUMA) memory of a
// tensor-parallel slice is bound to its node; without it, or on a single-node machine, these are
// no-ops and every slice lives where the kernel's first-touch policy puts it.
#pragma once

#include <cstddef>

namespace kt::runtime {

// NUMA nodes of this machine (libnuma, else /sys/devices/system/node/node*, else 1).
int numa_node_count();

// Binds the pages of [p, p + bytes) to `node` before they are first touched (no-op without
// libnuma or with one node).
void bind_to_node(void* p, size_t bytes, int node);

}  // namespace kt::runtime
