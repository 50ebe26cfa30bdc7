// Registration functions of the binding files; module.cpp calls each once.
#pragma once

#include <pybind11/pybind11.h>

namespace kt::bindings {

void register_errors(pybind11::module_& m);
void register_isa(pybind11::module_& m);
void register_engine(pybind11::module_& m);
void register_memory(pybind11::module_& m);

}  // namespace kt::bindings
