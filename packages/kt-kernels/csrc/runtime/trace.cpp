#include "runtime/trace.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <mutex>
#include <set>

namespace kt::runtime {

namespace detail {
std::atomic<bool> g_trace_on{false};
}

namespace {

std::mutex& trace_mutex() {
  static std::mutex m;
  return m;
}
std::vector<TraceEvent>& trace_buffer() {
  static std::vector<TraceEvent> v;
  return v;
}
size_t g_dropped = 0;

const std::chrono::steady_clock::time_point& epoch() {
  static const std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  return t0;
}

void json_string(std::string& out, const std::string& s) {
  out += '"';
  for (char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (static_cast<unsigned char>(ch) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", ch);
      out += buf;
    } else {
      out += ch;
    }
  }
  out += '"';
}

}  // namespace

void trace_enable(bool on) {
  (void)epoch();
  detail::g_trace_on.store(on, std::memory_order_relaxed);
}

void trace_clear() {
  std::lock_guard<std::mutex> lock(trace_mutex());
  trace_buffer().clear();
  g_dropped = 0;
}

int64_t trace_now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() -
                                                              epoch())
      .count();
}

uint32_t trace_thread_id() {
  static std::atomic<uint32_t> next{1};
  thread_local const uint32_t id = next.fetch_add(1);
  return id;
}

void trace_record(TraceEvent ev) {
  std::lock_guard<std::mutex> lock(trace_mutex());
  auto& buf = trace_buffer();
  if (buf.size() >= kMaxTraceEvents) {
    ++g_dropped;
    return;
  }
  buf.push_back(std::move(ev));
}

size_t trace_event_count() {
  std::lock_guard<std::mutex> lock(trace_mutex());
  return trace_buffer().size();
}

size_t trace_dropped() {
  std::lock_guard<std::mutex> lock(trace_mutex());
  return g_dropped;
}

std::vector<TraceEvent> trace_events() {
  std::lock_guard<std::mutex> lock(trace_mutex());
  return trace_buffer();
}

std::string trace_chrome_json() {
  const std::vector<TraceEvent> evs = trace_events();
  const long pid = static_cast<long>(::getpid());
  std::string out = "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[";
  bool first = true;
  auto sep = [&] {
    if (!first) out += ",\n";
    first = false;
  };
  char buf[256];
  std::set<uint32_t> tids;
  for (const TraceEvent& e : evs) tids.insert(e.tid);
  sep();
  std::snprintf(buf, sizeof buf,
                "{\"ph\":\"M\",\"pid\":%ld,\"tid\":0,\"name\":\"process_name\",\"args\":{\"name\":"
                "\"kt-kernels\"}}",
                pid);
  out += buf;
  for (uint32_t t : tids) {
    sep();
    std::snprintf(
        buf, sizeof buf,
        "{\"ph\":\"M\",\"pid\":%ld,\"tid\":%u,\"name\":\"thread_name\",\"args\":{\"name\":"
        "\"thread %u\"}}",
        pid, t, t);
    out += buf;
  }
  for (const TraceEvent& e : evs) {
    sep();
    out += "{\"ph\":\"X\",\"name\":";
    json_string(out, e.name);
    out += ",\"cat\":";
    json_string(out, e.cat);
    if (e.tasks >= 0 && e.group >= 0) {
      std::snprintf(buf, sizeof buf,
                    ",\"pid\":%ld,\"tid\":%u,\"ts\":%.3f,\"dur\":%.3f,\"args\":{\"tasks\":%lld,"
                    "\"group\":%lld}}",
                    pid, e.tid, static_cast<double>(e.ts_ns) / 1e3,
                    static_cast<double>(e.dur_ns) / 1e3, static_cast<long long>(e.tasks),
                    static_cast<long long>(e.group));
    } else if (e.tasks >= 0) {
      std::snprintf(buf, sizeof buf,
                    ",\"pid\":%ld,\"tid\":%u,\"ts\":%.3f,\"dur\":%.3f,\"args\":{\"tasks\":%lld}}",
                    pid, e.tid, static_cast<double>(e.ts_ns) / 1e3,
                    static_cast<double>(e.dur_ns) / 1e3, static_cast<long long>(e.tasks));
    } else {
      std::snprintf(buf, sizeof buf,
                    ",\"pid\":%ld,\"tid\":%u,\"ts\":%.3f,\"dur\":%.3f,\"args\":{\"engine\":"
                    "%lld,\"tokens\":%lld}}",
                    pid, e.tid, static_cast<double>(e.ts_ns) / 1e3,
                    static_cast<double>(e.dur_ns) / 1e3, static_cast<long long>(e.engine),
                    static_cast<long long>(e.tokens));
    }
    out += buf;
  }
  out += "]}\n";
  return out;
}

}  // namespace kt::runtime
