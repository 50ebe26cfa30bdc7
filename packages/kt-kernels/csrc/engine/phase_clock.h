// Per-phase timing of one engine call: last_timings(), and, with the profiler on, trace events and
// the engine's profile totals (runtime/trace.h).
#pragma once

#include <chrono>
#include <cstdint>
#include <iterator>
#include <map>
#include <string>

#include "engine/moe_engine.h"
#include "runtime/trace.h"

namespace kt::engine::detail {

// Times the phases of one engine call with the steady clock. When the profiler is on (checked once
// per call) each phase also becomes a trace event nested in one event for the whole call, and the
// engine's per-phase totals (profile_summary) are updated.
class PhaseClock {
 public:
  // Starts the clock and forgets the previous timings with this prefix.
  PhaseClock(std::map<std::string, double>& out, const char* prefix, int64_t engine, int64_t tokens,
             std::map<std::string, PhaseStat>* stats)
      : out_(out),
        prefix_(prefix),
        last_(std::chrono::steady_clock::now()),
        start_(last_),
        engine_(engine),
        tokens_(tokens),
        tracing_(runtime::trace_enabled()),
        stats_(tracing_ ? stats : nullptr) {
    for (auto it = out_.begin(); it != out_.end();) {
      it = it->first.compare(0, prefix_.size(), prefix_) == 0 ? out_.erase(it) : std::next(it);
    }
    if (tracing_) last_ns_ = start_ns_ = runtime::trace_now_ns();
  }
  // Adds the time since the last mark to `phase` (phases may run several times).
  void mark(const char* phase) {
    const auto now = std::chrono::steady_clock::now();
    const double ms = std::chrono::duration<double, std::milli>(now - last_).count();
    out_[prefix_ + phase] += ms;
    last_ = now;
    if (tracing_) {
      const int64_t ns = runtime::trace_now_ns();
      runtime::trace_record(
          {phase, "phase", engine_, tokens_, runtime::trace_thread_id(), last_ns_, ns - last_ns_});
      last_ns_ = ns;
      if (stats_) {
        PhaseStat& st = (*stats_)[prefix_ + phase];
        st.calls += 1;
        st.total_ms += ms;
      }
    }
  }
  void total() {
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_)
            .count();
    out_[prefix_ + "total"] = ms;
    if (tracing_) {
      const int64_t ns = runtime::trace_now_ns();
      std::string call = prefix_.substr(0, prefix_.size() - 1);  // "forward." -> "forward"
      runtime::trace_record(
          {call, "call", engine_, tokens_, runtime::trace_thread_id(), start_ns_, ns - start_ns_});
      if (stats_) {
        PhaseStat& st = (*stats_)[prefix_ + "total"];
        st.calls += 1;
        st.total_ms += ms;
      }
    }
  }

 private:
  std::map<std::string, double>& out_;
  std::string prefix_;
  std::chrono::steady_clock::time_point last_, start_;
  int64_t engine_, tokens_;
  bool tracing_;
  std::map<std::string, PhaseStat>* stats_;
  int64_t last_ns_ = 0, start_ns_ = 0;
};

}  // namespace kt::engine::detail
