// One Python engine object, several Python threads: the engine releases the GIL while it runs, so
// without a guard a second thread could enter the same engine (and pop the other thread's cache
// entry) or close it (and free the weights under the running call). CallState admits one call at
// a time: a second concurrent call raises StateError at once, and close() waits for the running
// call (with the GIL released) before it frees anything; calls after close() raise StateError.
// In a forked child a call that was running in the parent does not count: its thread does not
// exist there.
#pragma once

#include <unistd.h>

#include <condition_variable>
#include <mutex>
#include <string>

#include "engine/tensor.h"

namespace kt::bindings {

class CallState {
 public:
  // Enters a call named `what`; throws StateError when another call runs or the engine is closed
  // (or closing).
  void enter(const char* what) {
    std::lock_guard<std::mutex> lock(mutex_);
    forget_parent_call();
    if (closing_) throw engine::StateError(std::string(what) + ": the engine is closed");
    if (busy_) {
      throw engine::StateError(
          std::string(what) + ": another thread is inside " + running_ +
          "() on this engine; calls on one engine must not overlap (use one engine per thread, "
          "or serialize the calls with a lock)");
    }
    busy_ = true;
    busy_pid_ = getpid();
    running_ = what;
  }

  void leave() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      busy_ = false;
      running_ = nullptr;
    }
    idle_.notify_all();
  }

  // Marks the engine closing (new calls raise) and waits until no call runs. Call with the GIL
  // released: the running call may need it to return.
  void close_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    forget_parent_call();
    closing_ = true;
    idle_.wait(lock, [&] { return !busy_; });
  }

  // Runs f() once no call runs, holding the state lock (so no call starts meanwhile). Call with
  // the GIL released.
  template <typename F>
  auto read(F f) {
    std::unique_lock<std::mutex> lock(mutex_);
    forget_parent_call();
    idle_.wait(lock, [&] { return !busy_; });
    return f();
  }

  bool closing() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return closing_;
  }

 private:
  // A call marked running by another process (this one is a forked child): its thread is gone.
  void forget_parent_call() {
    if (busy_ && busy_pid_ != getpid()) {
      busy_ = false;
      running_ = nullptr;
    }
  }

  mutable std::mutex mutex_;
  std::condition_variable idle_;
  bool busy_ = false;
  pid_t busy_pid_ = 0;
  bool closing_ = false;
  const char* running_ = nullptr;
};

// RAII: CallState::enter in the constructor, leave in the destructor.
class CallGuard {
 public:
  CallGuard(CallState& s, const char* what) : s_(s) { s_.enter(what); }
  ~CallGuard() { s_.leave(); }
  CallGuard(const CallGuard&) = delete;
  CallGuard& operator=(const CallGuard&) = delete;

 private:
  CallState& s_;
};

}  // namespace kt::bindings
