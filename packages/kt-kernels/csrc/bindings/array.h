// Arrays from Python: DLPack (`__dlpack__`, legacy "dltensor" and versioned "dltensor_versioned"
// capsules) and, for NumPy arrays DLPack cannot export (ml_dtypes bfloat16), the NumPy array
// interface. The result owns the producer's export: the memory stays valid while it lives.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>

#include "engine/tensor.h"

namespace kt::bindings {

namespace py = pybind11;

// The DLPack ABI (https://dmlc.github.io/dlpack/latest/c_api.html), version 1.x, as far as a
// consumer needs it.
namespace dl {
struct Device {
  int32_t device_type;
  int32_t device_id;
};
struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};
struct PackVersion {
  uint32_t major;
  uint32_t minor;
};
struct ManagedTensorVersioned {
  PackVersion version;
  void* manager_ctx;
  void (*deleter)(ManagedTensorVersioned* self);
  uint64_t flags;
  Tensor dl_tensor;
};
constexpr int32_t kCPU = 1;
constexpr uint8_t kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4;
constexpr uint64_t kFlagReadOnly = 1u << 0;
constexpr uint32_t kMajorVersion = 1;
}  // namespace dl

// An imported array. Destroy it with the GIL held (producers' deleters may touch Python objects).
class Array {
 public:
  Array() = default;
  ~Array();
  Array(const Array&) = delete;
  Array& operator=(const Array&) = delete;

  engine::View view;

 private:
  friend std::unique_ptr<Array> import_array(py::handle obj, const char* name);
  py::object keep_;  // array-interface path: the array itself
  dl::ManagedTensor* legacy_ = nullptr;
  dl::ManagedTensorVersioned* versioned_ = nullptr;
};

// None -> an Array whose view is not present. Raises TypeError / ValueError (through the engine's
// error types) naming `name` when obj is not a usable CPU array.
std::unique_ptr<Array> import_array(py::handle obj, const char* name);

}  // namespace kt::bindings
