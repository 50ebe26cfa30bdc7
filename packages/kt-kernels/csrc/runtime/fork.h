// fork() support. A forked child has only the thread that called fork(): the worker pool's threads
// and any lock another thread held are gone. Parts of the runtime that own threads or locks
// register here; one pthread_atfork handler runs them in a fixed order: `prepare` in ascending
// `order` before the fork (take the locks, so no other thread is mid-update), `parent` and `child`
// in descending order after it (release them; the child also rebuilds what it lost).
#pragma once

#include <functional>

namespace kt::runtime {

// Orders used by the runtime (a lock taken earlier must have a smaller order).
constexpr int kForkOrderEngine = 0;  // the engine lock (held for a whole forward / backward)
constexpr int kForkOrderPool = 1;    // the worker pool (held for one parallel phase)

void on_fork(int order, std::function<void()> prepare, std::function<void()> parent,
             std::function<void()> child);

}  // namespace kt::runtime
