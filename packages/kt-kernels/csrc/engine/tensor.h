// Array views the engine works on (what the bindings make of a DLPack tensor or a NumPy array),
// the argument checks every public entry point runs before it touches a pointer, and the error
// types the bindings turn into Python exceptions.
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/kernels.h"

namespace kt::engine {

// Python TypeError: an argument has the wrong kind (dtype, not an array).
struct TypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
// Python ValueError: wrong shape, rank, strides, values.
struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
// Python RuntimeError: the call is not allowed in the engine's current state.
struct StateError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class DType : int { f32 = 0, bf16 = 1, i32 = 2, i64 = 3, other = 4, i8 = 5, u8 = 6 };

const char* dtype_name(DType d);
int64_t dtype_size(DType d);

constexpr int kMaxDims = 4;

// A strided CPU array. Strides are in elements (DLPack's convention).
struct View {
  void* data = nullptr;
  DType dtype = DType::other;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};
  bool readonly = false;
  bool present = false;      // false: the argument was not given (None)
  char dtype_desc[24] = {};  // the producer's name for a dtype the engine has no DType for

  int64_t numel() const;
  std::string shape_str() const;
  std::string strides_str() const;
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
};

// What an argument must look like. -1 in `shape` accepts any extent.
struct Expect {
  const char* name;
  std::vector<DType> dtypes;
  std::vector<int64_t> shape;
  const char* shape_desc;  // e.g. "(T, hidden_size)"
  bool writable = false;
  bool inner_contiguous = false;  // the last dimension must have stride 1
};

// Throws TypeError / ValueError naming the argument and the expected value.
void check(const View& v, const Expect& e);

// Reads element [i, j] (or [e, i, j]) of a float array of any supported float dtype.
inline float load_f(const View& v, int64_t off) {
  if (v.dtype == DType::f32) return v.ptr<const float>()[off];
  return kernels::bf16_to_f32(v.ptr<const kernels::bf16>()[off]);
}
inline void store_f(const View& v, int64_t off, float x) {
  if (v.dtype == DType::f32) {
    v.ptr<float>()[off] = x;
  } else {
    v.ptr<kernels::bf16>()[off] = kernels::f32_to_bf16(x);
  }
}
inline int64_t load_i(const View& v, int64_t off) {
  if (v.dtype == DType::i64) return v.ptr<const int64_t>()[off];
  return v.ptr<const int32_t>()[off];
}

}  // namespace kt::engine
