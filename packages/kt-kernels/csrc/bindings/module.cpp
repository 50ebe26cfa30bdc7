// The _core extension module: version, CPU features. Other binding files add their parts through
// the registration functions declared in bindings/bindings.h.
#include <pybind11/pybind11.h>

#include "bindings/bindings.h"
#include "runtime/cpu_features.h"
#include "runtime/thread_pool.h"

namespace py = pybind11;

#ifndef KT_KERNELS_VERSION
#error "KT_KERNELS_VERSION must be defined by the build"
#endif

// Bumped whenever the Python-visible C++ API gains or changes something, so pure-Python packages
// can gate on features without parsing versions.
constexpr int kAbiVersion = 2;  // 2: MoEEngine, ISA selection

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

  kt::bindings::register_errors(m);
  kt::bindings::register_isa(m);
  kt::bindings::register_engine(m);
}
