// Process-wide profiler: per engine call, one event for the call and one per phase, recorded by the
// thread that runs the call, with the steady clock (a vDSO read, no system call). Off by default:
// the only cost when off is one relaxed atomic load per engine call (and per pool thread and
// parallel phase, for the per-thread "worker" events). Events are written out as
// Chrome trace JSON (chrome://tracing, Perfetto): complete ("X") events nest by time on a thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace kt::runtime {

struct TraceEvent {
  std::string name;  // "forward", "backward", the phase ("gate_up", "down_t", ...) or "tasks"
  std::string cat;   // "call", "phase" or "worker" (one pool thread's share of a phase)
  int64_t engine;    // the engine's id
  int64_t tokens;    // T of the call
  uint32_t tid;      // small per-thread index of the recording thread
  int64_t ts_ns;     // start, ns since the profiler's epoch
  int64_t dur_ns;
  int64_t tasks = -1;  // "worker" events: tasks this thread ran in one parallel phase
  int64_t group = -1;  // "worker" events of a grouped phase: the group (= tensor-parallel slice)
};

namespace detail {
extern std::atomic<bool> g_trace_on;
}

inline bool trace_enabled() { return detail::g_trace_on.load(std::memory_order_relaxed); }
void trace_enable(bool on);
void trace_clear();

// Nanoseconds of the steady clock since the profiler's epoch (process start).
int64_t trace_now_ns();
// A small index for the calling thread (1, 2, ... in order of first use).
uint32_t trace_thread_id();

// Appends one event (bounded: beyond kMaxEvents events are counted as dropped).
constexpr size_t kMaxTraceEvents = size_t{1} << 22;
void trace_record(TraceEvent ev);
size_t trace_event_count();
size_t trace_dropped();
std::vector<TraceEvent> trace_events();

// The recorded events as Chrome trace JSON (one object, "traceEvents" with ts/dur in µs).
std::string trace_chrome_json();

}  // namespace kt::runtime
