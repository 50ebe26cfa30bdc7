#include "engine/tensor.h"

#include <algorithm>
#include <numeric>
#include <sstream>

namespace kt::engine {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::f32:
      return "float32";
    case DType::bf16:
      return "bfloat16";
    case DType::i32:
      return "int32";
    case DType::i64:
      return "int64";
    case DType::i8:
      return "int8";
    case DType::u8:
      return "uint8";
    case DType::other:
      break;
  }
  return "an unsupported dtype";
}

int64_t dtype_size(DType d) {
  switch (d) {
    case DType::f32:
    case DType::i32:
      return 4;
    case DType::bf16:
      return 2;
    case DType::i64:
      return 8;
    case DType::i8:
    case DType::u8:
      return 1;
    case DType::other:
      break;
  }
  return 1;
}

int64_t View::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

namespace {

std::string join(const int64_t* v, int n) {
  std::ostringstream s;
  s << "(";
  for (int i = 0; i < n; ++i) s << (i ? ", " : "") << v[i];
  if (n == 1) s << ",";
  s << ")";
  return s.str();
}

std::string dtype_list(const std::vector<DType>& ds) {
  std::string out;
  for (size_t i = 0; i < ds.size(); ++i) {
    if (i) out += i + 1 == ds.size() ? " or " : ", ";
    out += dtype_name(ds[i]);
  }
  return out;
}

}  // namespace

std::string View::shape_str() const { return join(shape, ndim); }
std::string View::strides_str() const { return join(strides, ndim); }

void check(const View& v, const Expect& e) {
  const std::string name = e.name;
  if (!v.present) throw TypeError(name + ": expected an array, got None");
  if (std::find(e.dtypes.begin(), e.dtypes.end(), v.dtype) == e.dtypes.end()) {
    throw TypeError(name + ": expected dtype " + dtype_list(e.dtypes) + ", got " +
                    (v.dtype == DType::other && v.dtype_desc[0]
                         ? std::string(v.dtype_desc)
                         : std::string(dtype_name(v.dtype))));
  }
  const int nd = static_cast<int>(e.shape.size());
  if (v.ndim != nd) {
    throw ValueError(name + ": expected " + std::to_string(nd) + " dimensions " + e.shape_desc +
                     ", got " + std::to_string(v.ndim) + " with shape " + v.shape_str());
  }
  for (int i = 0; i < nd; ++i) {
    if (e.shape[static_cast<size_t>(i)] >= 0 && v.shape[i] != e.shape[static_cast<size_t>(i)]) {
      std::vector<int64_t> want(e.shape);
      std::ostringstream s;
      s << "(";
      for (int j = 0; j < nd; ++j) {
        s << (j ? ", " : "");
        if (want[static_cast<size_t>(j)] >= 0) {
          s << want[static_cast<size_t>(j)];
        } else {
          s << v.shape[j];
        }
      }
      s << ")";
      throw ValueError(name + ": expected shape " + e.shape_desc + " = " + s.str() + ", got " +
                       v.shape_str());
    }
  }
  if (v.numel() > 0 && v.data == nullptr) throw ValueError(name + ": data pointer is null");
  if (reinterpret_cast<uintptr_t>(v.data) % static_cast<uintptr_t>(dtype_size(v.dtype)) != 0) {
    throw ValueError(name + ": data is not aligned to its element size (" +
                     std::to_string(dtype_size(v.dtype)) + " bytes); pass an aligned copy");
  }
  if (v.numel() == 0) return;  // nothing is read or written
  // Strides: positive for every dimension of extent > 1 (no negative or zero strides).
  for (int i = 0; i < nd; ++i) {
    if (v.shape[i] > 1 && v.strides[i] <= 0) {
      throw ValueError(name + ": expected positive strides, got strides " + v.strides_str() +
                       " for shape " + v.shape_str());
    }
  }
  if (e.inner_contiguous && nd > 0 && v.shape[nd - 1] > 1 && v.strides[nd - 1] != 1) {
    throw ValueError(name + ": expected the last dimension to be contiguous (stride 1), got " +
                     "strides " + v.strides_str() + " for shape " + v.shape_str());
  }
  if (e.writable) {
    if (v.readonly) throw ValueError(name + ": is read-only; expected a writable array");
    // No two elements may share memory: sorted by stride, each stride must step over the whole
    // extent of the dimensions below it.
    if (v.numel() > 1) {
      std::vector<int> dims;
      for (int i = 0; i < nd; ++i) {
        if (v.shape[i] > 1) dims.push_back(i);
      }
      std::sort(dims.begin(), dims.end(),
                [&](int a, int b) { return v.strides[a] < v.strides[b]; });
      int64_t span = 1;
      for (int d : dims) {
        if (v.strides[d] < span) {
          throw ValueError(name + ": elements overlap in memory (strides " + v.strides_str() +
                           " for shape " + v.shape_str() + "); expected a writable array " +
                           "whose elements are distinct");
        }
        span = v.strides[d] * v.shape[d];
      }
    }
  }
}

}  // namespace kt::engine
