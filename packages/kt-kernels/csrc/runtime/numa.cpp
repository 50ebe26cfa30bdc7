#include "runtime/numa.h"

#include <dirent.h>

#include <cctype>
#include <cstring>

#ifdef KT_HAVE_LIBNUMA
#include <numa.h>
#endif

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

}  // namespace kt::runtime
