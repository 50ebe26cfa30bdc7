// Size limits checked where the engine plans its buffers: the constructor (max_tokens) and every
// forward (T). Row indices of the routed (token, slot) pairs are int32, and no buffer may need
// more bytes than a 64-bit process can address, so sizes are checked with overflow-safe
// arithmetic before anything is allocated and a bad size is a ValueError naming the argument.
#pragma once

#include <cstdint>
#include <string>

#include "engine/tensor.h"

namespace kt::engine::limits {

// Routed (token, slot) rows are numbered in int32.
constexpr int64_t kMaxRows = (int64_t{1} << 31) - 1;
// Largest single activation buffer the engine plans (bytes): 2^47 = 128 TiB, the user address
// space of x86-64 with 4-level paging. Anything larger cannot be allocated.
constexpr int64_t kMaxBufferBytes = int64_t{1} << 47;

// a * b, or -1 when the product overflows int64 (a, b >= 0).
inline int64_t mul_or_neg(int64_t a, int64_t b) {
  int64_t r = 0;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r)) return -1;
  return r;
}

// Bytes of the largest per-forward buffer for `tokens` tokens: the float32 gate/up
// intermediates of tokens * top_k rows of max(2 * Ib, KpH) columns; -1 on overflow.
inline int64_t planned_bytes(int64_t tokens, int64_t top_k, int64_t row_elems) {
  const int64_t rows = mul_or_neg(tokens, top_k);
  if (rows < 0) return -1;
  const int64_t elems = mul_or_neg(rows, row_elems);
  if (elems < 0) return -1;
  return mul_or_neg(elems, 4);
}

// The largest token count whose buffers fit both limits (>= 0).
inline int64_t max_tokens_for(int64_t top_k, int64_t row_elems) {
  int64_t by_rows = kMaxRows / top_k;
  const int64_t by_bytes = kMaxBufferBytes / 4 / row_elems / top_k;
  return by_rows < by_bytes ? by_rows : by_bytes;
}

// Throws ValueError when `tokens` (named `what`) exceeds what the engine can plan buffers for.
inline void check_tokens(int64_t tokens, int64_t top_k, int64_t row_elems, const char* what) {
  const int64_t bytes = planned_bytes(tokens, top_k, row_elems);
  const int64_t rows = mul_or_neg(tokens, top_k);
  if (rows < 0 || rows > kMaxRows || bytes < 0 || bytes > kMaxBufferBytes) {
    throw ValueError(std::string(what) + "=" + std::to_string(tokens) +
                     " is too large: with top_k=" + std::to_string(top_k) +
                     " the engine's buffers need tokens * top_k below 2**31 rows and at most "
                     "2**47 bytes each; the largest allowed value here is " +
                     std::to_string(max_tokens_for(top_k, row_elems)));
  }
}

}  // namespace kt::engine::limits
