// The _core extension module: version, CPU features. Other binding files add their parts through
// the registration functions declared in bindings/bindings.h.
#include <pybind11/pybind11.h>

#include "bindings/bindings.h"
#include "runtime/cpu_features.h"
#include "runtime/numa.h"
#include "runtime/thread_pool.h"
#include "runtime/trace.h"

namespace py = pybind11;

#ifndef KT_KERNELS_VERSION
#error "KT_KERNELS_VERSION must be defined by the build"
#endif

// Bumped whenever the Python-visible C++ API gains or changes something, so pure-Python packages
// can gate on features without parsing versions.
// 2: MoEEngine, ISA selection; 3: profiler, int8/int4 weights; 4: worker groups per tp slice
// (MoEEngine.pinned_threads, numa_node_count), activation_dtype (W8A8); 5: activation_policy,
// memory_stats / reset_memory_peaks / trim_memory; 6: activation variants (activation_*),
// set_biases, the process-wide LoRA stage; 7: backward_dtype (int8 dx products of W8A8).
constexpr int kAbiVersion = 7;

PYBIND11_MODULE(_core, m) {
  m.doc() = "kt-kernels compiled engine";
  m.attr("__version__") = KT_KERNELS_VERSION;
  m.attr("ABI_VERSION") = kAbiVersion;

  m.def(
      "cpu_features",
      []() {
        py::dict out;
        for (const auto& [name, on] : kt::runtime::cpu_features().as_list())
          out[py::str(name)] = on;
        return out;
      },
      "ISA flags of this CPU that the OS enables, named as in /proc/cpuinfo.");
  m.def("physical_core_count", &kt::runtime::physical_core_count,
        "Physical cores this process may run on.");
  m.def("default_thread_count", &kt::runtime::default_thread_count,
        "Threads an engine uses by default: KT_NUM_THREADS, else one per physical core.");
  m.def("numa_node_count", &kt::runtime::numa_node_count, "NUMA nodes of this machine.");

  m.def("trace_enable", &kt::runtime::trace_enable, py::arg("on"),
        "Turn the process-wide profiler on or off.");
  m.def("trace_enabled", &kt::runtime::trace_enabled, "Whether the profiler is on.");
  m.def("trace_clear", &kt::runtime::trace_clear, "Forget the recorded trace events.");
  m.def("trace_event_count", &kt::runtime::trace_event_count, "Recorded trace events.");
  m.def("trace_dropped", &kt::runtime::trace_dropped, "Events dropped past the buffer limit.");
  m.def(
      "trace_chrome_json",
      []() {
        std::string s;
        {
          py::gil_scoped_release nogil;
          s = kt::runtime::trace_chrome_json();
        }
        return s;
      },
      "The recorded events as Chrome trace JSON.");

  kt::bindings::register_errors(m);
  kt::bindings::register_isa(m);
  kt::bindings::register_engine(m);
  kt::bindings::register_memory(m);
}
