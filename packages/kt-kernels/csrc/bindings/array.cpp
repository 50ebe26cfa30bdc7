#include "bindings/array.h"

#include <cstdio>
#include <string>

namespace kt::bindings {

using engine::DType;
using engine::TypeError;
using engine::ValueError;

namespace {

constexpr const char* kVersionedName = "dltensor_versioned";
constexpr const char* kLegacyName = "dltensor";
constexpr const char* kUsedVersionedName = "used_dltensor_versioned";
constexpr const char* kUsedLegacyName = "used_dltensor";

std::string device_name(int32_t type) {
  switch (type) {
    case 1:
      return "CPU";
    case 2:
      return "CUDA";
    case 3:
      return "CUDA host";
    case 4:
      return "OpenCL";
    case 7:
      return "Vulkan";
    case 8:
      return "Metal";
    case 10:
      return "ROCm";
    case 13:
      return "CUDA managed";
    case 14:
      return "oneAPI";
    default:
      return "device type " + std::to_string(type);
  }
}

void set_desc(engine::View& v, const std::string& d) {
  std::snprintf(v.dtype_desc, sizeof v.dtype_desc, "%s", d.c_str());
}

DType dl_dtype(const dl::DataType& t) {
  if (t.lanes != 1) return DType::other;
  if (t.code == dl::kFloat && t.bits == 32) return DType::f32;
  if (t.code == dl::kBfloat && t.bits == 16) return DType::bf16;
  if (t.code == dl::kInt && t.bits == 32) return DType::i32;
  if (t.code == dl::kInt && t.bits == 64) return DType::i64;
  if (t.code == dl::kInt && t.bits == 8) return DType::i8;
  if (t.code == dl::kUInt && t.bits == 8) return DType::u8;
  return DType::other;
}

std::string dl_dtype_desc(const dl::DataType& t) {
  const char* kind = t.code == dl::kFloat    ? "float"
                     : t.code == dl::kBfloat ? "bfloat"
                     : t.code == dl::kInt    ? "int"
                     : t.code == dl::kUInt   ? "uint"
                                             : "code";
  std::string s = std::string(kind) + std::to_string(t.bits);
  if (t.lanes != 1) s += "x" + std::to_string(t.lanes);
  return s;
}

void fill_from_dl(engine::View& v, const dl::Tensor& t, const std::string& name) {
  if (t.device.device_type != dl::kCPU) {
    throw ValueError(name + ": expected a CPU array, got one on " +
                     device_name(t.device.device_type));
  }
  if (t.ndim < 0 || t.ndim > engine::kMaxDims) {
    throw ValueError(name + ": expected at most " + std::to_string(engine::kMaxDims) +
                     " dimensions, got " + std::to_string(t.ndim));
  }
  v.dtype = dl_dtype(t.dtype);
  if (v.dtype == DType::other) set_desc(v, dl_dtype_desc(t.dtype));  // refused by the checks
  v.ndim = t.ndim;
  int64_t compact = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    v.shape[i] = t.shape[i];
    if (v.shape[i] < 0) throw ValueError(name + ": negative extent in the shape");
    v.strides[i] = t.strides != nullptr ? t.strides[i] : compact;
    compact *= v.shape[i];
  }
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  v.present = true;
}

bool has(py::handle obj, const char* attr) { return PyObject_HasAttrString(obj.ptr(), attr) == 1; }

}  // namespace

Array::~Array() {
  if (versioned_ != nullptr && versioned_->deleter != nullptr) versioned_->deleter(versioned_);
  if (legacy_ != nullptr && legacy_->deleter != nullptr) legacy_->deleter(legacy_);
}

std::unique_ptr<Array> import_array(py::handle obj, const char* cname) {
  auto out = std::make_unique<Array>();
  const std::string name = cname;
  if (obj.is_none()) return out;

  // Device first: never ask a GPU tensor for a capsule.
  if (has(obj, "__dlpack_device__")) {
    py::tuple dev;
    try {
      dev = py::tuple(obj.attr("__dlpack_device__")());
    } catch (py::error_already_set& e) {
      throw ValueError(name + ": expected a CPU array; reading its DLPack device failed: " +
                       std::string(py::str(e.value())));
    }
    const int type = dev.size() > 0 ? dev[0].cast<int>() : -1;
    if (type != dl::kCPU) {
      throw ValueError(name + ": expected a CPU array, got one on " + device_name(type));
    }
  }

  bool via_interface = false;
  if (has(obj, "__dlpack__")) {
    py::object capsule;
    try {
      try {
        py::dict kwargs;
        kwargs["max_version"] = py::make_tuple(dl::kMajorVersion, 0);
        capsule = obj.attr("__dlpack__")(**kwargs);
      } catch (py::error_already_set& e) {
        if (!e.matches(PyExc_TypeError)) throw;
        capsule = obj.attr("__dlpack__")();  // producer predates max_version
      }
    } catch (py::error_already_set& e) {
      // NumPy cannot export bfloat16 (ml_dtypes) through DLPack: use its array interface.
      if (!has(obj, "__array_interface__")) {
        throw ValueError(
            name + ": could not be exported through DLPack: " + std::string(py::str(e.value())));
      }
      via_interface = true;
    }
    if (!via_interface) {
      PyObject* cap = capsule.ptr();
      if (!PyCapsule_CheckExact(cap)) {
        throw TypeError(name + ": __dlpack__() did not return a DLPack capsule");
      }
      const char* cap_name = PyCapsule_GetName(cap);
      if (cap_name != nullptr && std::string(cap_name) == kVersionedName) {
        auto* m =
            static_cast<dl::ManagedTensorVersioned*>(PyCapsule_GetPointer(cap, kVersionedName));
        if (m == nullptr) throw py::error_already_set();
        PyCapsule_SetName(cap, kUsedVersionedName);  // consumed: we call the deleter
        out->versioned_ = m;
        if (m->version.major != dl::kMajorVersion) {
          throw ValueError(name + ": DLPack version " + std::to_string(m->version.major) + "." +
                           std::to_string(m->version.minor) + " is not supported; expected 1.x");
        }
        fill_from_dl(out->view, m->dl_tensor, name);
        out->view.readonly = (m->flags & dl::kFlagReadOnly) != 0;
      } else if (cap_name != nullptr && std::string(cap_name) == kLegacyName) {
        auto* m = static_cast<dl::ManagedTensor*>(PyCapsule_GetPointer(cap, kLegacyName));
        if (m == nullptr) throw py::error_already_set();
        PyCapsule_SetName(cap, kUsedLegacyName);
        out->legacy_ = m;
        fill_from_dl(out->view, m->dl_tensor, name);
      } else {
        throw TypeError(name + ": __dlpack__() returned a capsule named '" +
                        (cap_name ? cap_name : "") + "'; expected 'dltensor' or " +
                        "'dltensor_versioned' (was it consumed already?)");
      }
      return out;
    }
  }

  if (!via_interface && !has(obj, "__array_interface__")) {
    throw TypeError(name +
                    ": expected an array (a torch tensor, a NumPy array or another object "
                    "with __dlpack__), got " +
                    std::string(py::str(py::type::of(obj).attr("__name__"))));
  }

  // NumPy array interface (version 3).
  py::dict ai = obj.attr("__array_interface__");
  py::tuple shape = ai["shape"];
  const std::string typestr = py::str(ai["typestr"]);
  DType dt = DType::other;
  if (typestr == "<f4") dt = DType::f32;
  if (typestr == "<i4") dt = DType::i32;
  if (typestr == "<i8") dt = DType::i64;
  if (typestr == "|i1") dt = DType::i8;
  if (typestr == "|u1") dt = DType::u8;
  if (typestr == "<V2" && has(obj, "dtype") &&
      std::string(py::str(obj.attr("dtype").attr("name"))) == "bfloat16") {
    dt = DType::bf16;
  }
  if (dt == DType::other) {
    std::string desc = typestr;
    if (has(obj, "dtype")) desc = py::str(obj.attr("dtype"));
    set_desc(out->view, desc);  // refused by the checks, which know what was expected
  }
  if (ai.contains("mask") && !ai["mask"].is_none()) {
    throw TypeError(name + ": masked arrays are not supported");
  }
  const int nd = static_cast<int>(shape.size());
  if (nd > engine::kMaxDims) {
    throw ValueError(name + ": expected at most " + std::to_string(engine::kMaxDims) +
                     " dimensions, got " + std::to_string(nd));
  }
  engine::View& v = out->view;
  v.dtype = dt;
  v.ndim = nd;
  const int64_t item = engine::dtype_size(dt);
  py::object strides = ai.contains("strides") ? py::object(ai["strides"]) : py::none();
  int64_t compact = 1;
  for (int i = nd - 1; i >= 0; --i) {
    v.shape[i] = shape[static_cast<size_t>(i)].cast<int64_t>();
    if (strides.is_none()) {
      v.strides[i] = compact;
    } else {
      const int64_t bytes = py::tuple(strides)[static_cast<size_t>(i)].cast<int64_t>();
      if (bytes % item != 0) {
        throw ValueError(name + ": strides (in bytes) must be multiples of the element size");
      }
      v.strides[i] = bytes / item;
    }
    compact *= v.shape[i];
  }
  py::tuple data = ai["data"];
  v.data = reinterpret_cast<void*>(data[0].cast<uintptr_t>());
  v.readonly = data[1].cast<bool>();
  v.present = true;
  out->keep_ = py::reinterpret_borrow<py::object>(obj);
  return out;
}

}  // namespace kt::bindings
