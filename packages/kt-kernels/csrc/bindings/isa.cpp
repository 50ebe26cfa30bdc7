// ISA selection and error translation for Python.
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings/bindings.h"
#include "engine/tensor.h"
#include "kernels/dispatch.h"

namespace kt::bindings {

namespace py = pybind11;

void register_errors(py::module_& /*m*/) {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const engine::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const engine::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const engine::StateError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });
}

void register_isa(py::module_& m) {
  m.def("isa_names", &kernels::isa_names,
        "Every kernel ISA this version knows, lowest first, whether or not it runs here.");
  m.def(
      "available_isas",
      []() {
        std::vector<std::string> out;
        for (kernels::Isa isa : kernels::available_isas()) out.emplace_back(kernels::isa_name(isa));
        return out;
      },
      "ISAs whose kernels are compiled in and run on this CPU, scalar first.");
  m.def(
      "select_isa",
      [](const std::string& requested) {
        return std::string(kernels::isa_name(kernels::select_isa(requested)));
      },
      py::arg("requested") = "",
      "The ISA an engine would use: requested > KT_KERNELS_ISA > best (after self-tests).");
  m.def("take_warnings", &kernels::take_warnings,
        "Dispatch warnings recorded since the last call (self-test failures, fallbacks).");
  m.def(
      "self_test_status",
      [](const std::string& name) {
        kernels::Isa isa;
        if (!kernels::parse_isa(name, &isa)) {
          throw engine::ValueError("isa: expected one of " + kernels::isa_names_text() + ", got '" +
                                   name + "'");
        }
        return kernels::self_test_status(isa);
      },
      py::arg("isa"));
}

}  // namespace kt::bindings
