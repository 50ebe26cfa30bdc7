// Process-wide memory of the engines: live and peak bytes by kind, peak reset, trimming.
#include <pybind11/pybind11.h>

#include "bindings/bindings.h"
#include "engine/activation_cache.h"
#include "engine/moe_engine.h"
#include "runtime/memory_stats.h"

namespace kt::bindings {

namespace py = pybind11;

void register_memory(py::module_& m) {
  m.def(
      "memory_stats",
      []() {
        using runtime::MemKind;
        py::dict d;
        for (int i = 0; i < runtime::kMemKinds; ++i) {
          const auto kind = static_cast<MemKind>(i);
          const runtime::MemCounter c = runtime::mem_counter(kind);
          const std::string name = runtime::mem_kind_name(kind);
          d[py::str(name + "_bytes")] = c.live;
          d[py::str(name + "_peak_bytes")] = c.peak;
        }
        d["total_bytes"] = runtime::mem_total_live();
        d["total_peak_bytes"] = runtime::mem_total_peak();
        return d;
      },
      "Bytes of engine memory of the whole process by kind, live now and peak since the last "
      "reset_memory_peaks(): weights, lora, cache (entries of pending forwards), pool (cache "
      "blocks kept for reuse), scratch; total is their sum.");
  m.def("reset_memory_peaks", &runtime::mem_reset_peaks,
        "Sets every peak of memory_stats() to its live value.");
  m.def(
      "trim_memory",
      []() {
        py::gil_scoped_release nogil;
        engine::MoEEngine::trim_memory();
      },
      "Frees the process-wide scratch buffers and the activation-cache blocks kept for reuse "
      "and the LoRA stage (they are allocated again when needed); pending forwards keep their "
      "cache entries.");
}

}  // namespace kt::bindings
