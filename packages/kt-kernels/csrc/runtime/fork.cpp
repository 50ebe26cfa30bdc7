#include "runtime/fork.h"

#include <pthread.h>

#include <algorithm>
#include <mutex>
#include <vector>

namespace kt::runtime {
namespace {

struct Handler {
  int order;
  std::function<void()> prepare, parent, child;
};

struct Registry {
  std::mutex mutex;  // held from prepare to parent / child
  std::vector<Handler> handlers;
};

Registry& registry() {
  // Never destroyed: a fork may happen while static destructors run.
  static Registry* r = new Registry();
  return *r;
}

void prepare_all() {
  Registry& r = registry();
  r.mutex.lock();
  for (auto& h : r.handlers) h.prepare();
}

void parent_all() {
  Registry& r = registry();
  for (auto it = r.handlers.rbegin(); it != r.handlers.rend(); ++it) it->parent();
  r.mutex.unlock();
}

void child_all() {
  Registry& r = registry();
  for (auto it = r.handlers.rbegin(); it != r.handlers.rend(); ++it) it->child();
  r.mutex.unlock();
}

}  // namespace

void on_fork(int order, std::function<void()> prepare, std::function<void()> parent,
             std::function<void()> child) {
  static std::once_flag once;
  std::call_once(once, [] { pthread_atfork(prepare_all, parent_all, child_all); });
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  Handler h{order, std::move(prepare), std::move(parent), std::move(child)};
  auto at = std::upper_bound(r.handlers.begin(), r.handlers.end(), order,
                             [](int o, const Handler& x) { return o < x.order; });
  r.handlers.insert(at, std::move(h));
}

}  // namespace kt::runtime
