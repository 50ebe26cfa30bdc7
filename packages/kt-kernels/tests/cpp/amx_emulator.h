// A software model of the AMX tile instructions the AMX kernels use (LDTILECFG, TILELOADD,
// TILESTORED, TILEZERO, TDPBF16PS, TDPBSSD, TILERELEASE), for checking the AMX kernels' tile
// configuration and addressing on machines without AMX. It follows the Intel SDM: palette 1 (8
// tiles of at most 16 rows x 64 bytes), rows = 0 exactly when colsb = 0, a tile used while
// unconfigured faults (#UD), TDPBF16PS and TDPBSSD need C.rows = A.rows, C.colsb = B.colsb,
// A.colsb = 4 B.rows, loads zero the rows and bytes beyond the configuration. TDPBSSD adds, per
// int32 element C[m][n], the products of signed bytes A[m][4p + i] and B[p][4n + i] (i < 4) for
// every row p of B, wrapping modulo 2^32 (no saturation). Any violation is recorded in
// amx_emu::errors().
//
// Include after kernels/intrinsics.h; it replaces the _tile_* names with the model.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace amx_emu {

struct State {
  bool configured = false;
  uint8_t rows[8] = {};
  uint16_t colsb[8] = {};
  uint8_t data[8][16][64] = {};
  int64_t dp_calls = 0;
};

inline State& state() {
  thread_local State s;
  return s;
}

inline std::vector<std::string>& errors() {
  static std::vector<std::string> e;
  return e;
}

inline void fail(const std::string& what) {
  if (errors().size() < 20) errors().push_back(what);
}

inline bool usable(int t, const char* op) {
  State& s = state();
  if (!s.configured) {
    fail(std::string(op) + ": tiles not configured");
    return false;
  }
  if (t < 0 || t >= 8 || s.rows[t] == 0) {
    fail(std::string(op) + ": tile " + std::to_string(t) + " is not configured");
    return false;
  }
  return true;
}

inline void loadconfig(const void* p) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  State& s = state();
  if (b[0] != 1) fail("ldtilecfg: palette " + std::to_string(b[0]) + ", expected 1");
  if (b[1] != 0) fail("ldtilecfg: start_row not 0");
  for (int i = 2; i < 16; ++i) {
    if (b[i] != 0) fail("ldtilecfg: reserved byte " + std::to_string(i) + " not 0");
  }
  for (int t = 0; t < 16; ++t) {
    uint16_t colsb;
    std::memcpy(&colsb, b + 16 + 2 * t, 2);
    const uint8_t rows = b[48 + t];
    if (t >= 8 && (colsb != 0 || rows != 0)) fail("ldtilecfg: tile >= 8 configured (palette 1)");
    if (t < 8) {
      if (rows > 16 || colsb > 64) fail("ldtilecfg: tile " + std::to_string(t) + " too large");
      if ((rows == 0) != (colsb == 0)) {
        fail("ldtilecfg: tile " + std::to_string(t) + " has rows xor colsb zero");
      }
      s.rows[t] = rows;
      s.colsb[t] = colsb;
    }
  }
  s.configured = true;
  std::memset(s.data, 0, sizeof s.data);
}

inline void release() {
  State& s = state();
  s.configured = false;
  std::memset(s.rows, 0, sizeof s.rows);
  std::memset(s.colsb, 0, sizeof s.colsb);
  std::memset(s.data, 0, sizeof s.data);
}

inline void zero(int t) {
  if (usable(t, "tilezero")) std::memset(state().data[t], 0, sizeof state().data[t]);
}

inline void loadd(int t, const void* base, int64_t stride) {
  if (!usable(t, "tileloadd")) return;
  State& s = state();
  std::memset(s.data[t], 0, sizeof s.data[t]);
  for (int r = 0; r < s.rows[t]; ++r) {
    std::memcpy(s.data[t][r], static_cast<const uint8_t*>(base) + r * stride, s.colsb[t]);
  }
}

inline void stored(int t, void* base, int64_t stride) {
  if (!usable(t, "tilestored")) return;
  State& s = state();
  for (int r = 0; r < s.rows[t]; ++r) {
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, s.data[t][r], s.colsb[t]);
  }
}

inline float bf16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The operand checks shared by the dot-product instructions.
inline bool dp_operands_ok(int c, int a, int b, const char* op) {
  if (!usable(c, op) || !usable(a, op) || !usable(b, op)) return false;
  State& s = state();
  const std::string o(op);
  if (c == a || c == b || a == b) fail(o + ": tile operands must differ");
  if (s.rows[c] != s.rows[a]) fail(o + ": C.rows != A.rows");
  if (s.colsb[c] != s.colsb[b]) fail(o + ": C.colsb != B.colsb");
  if (s.colsb[a] != 4 * s.rows[b]) fail(o + ": A.colsb != 4 * B.rows");
  return true;
}

inline void dpbssd(int c, int a, int b) {
  if (!dp_operands_ok(c, a, b, "tdpbssd")) return;
  State& s = state();
  ++s.dp_calls;
  const int rows = s.rows[c], cols = s.colsb[c] / 4, quads = s.colsb[a] / 4;
  for (int m = 0; m < rows; ++m) {
    for (int n = 0; n < cols; ++n) {
      int32_t cv;
      std::memcpy(&cv, s.data[c][m] + 4 * n, 4);
      uint32_t acc = static_cast<uint32_t>(cv);
      for (int p = 0; p < quads; ++p) {
        for (int i = 0; i < 4; ++i) {
          const int av = static_cast<int8_t>(s.data[a][m][4 * p + i]);
          const int bv = static_cast<int8_t>(s.data[b][p][4 * n + i]);
          acc += static_cast<uint32_t>(av * bv);
        }
      }
      cv = static_cast<int32_t>(acc);
      std::memcpy(s.data[c][m] + 4 * n, &cv, 4);
    }
  }
}

inline void dpbf16ps(int c, int a, int b) {
  if (!dp_operands_ok(c, a, b, "tdpbf16ps")) return;
  State& s = state();
  ++s.dp_calls;
  // Widen the operands first: A as [m][k], B as [k][n] (k = 2 * pair + half).
  float af[16][32] = {}, bf[32][16] = {}, cf[16][16] = {};
  const int rows = s.rows[c], cols = s.colsb[c] / 4, pairs = s.colsb[a] / 4;
  for (int m = 0; m < rows; ++m) {
    for (int k = 0; k < 2 * pairs; ++k) af[m][k] = bf16_at(s.data[a][m] + 2 * k);
    std::memcpy(cf[m], s.data[c][m], 4 * static_cast<size_t>(cols));
  }
  for (int p = 0; p < pairs; ++p) {
    for (int n = 0; n < cols; ++n) {
      bf[2 * p][n] = bf16_at(s.data[b][p] + 4 * n);
      bf[2 * p + 1][n] = bf16_at(s.data[b][p] + 4 * n + 2);
    }
  }
  for (int m = 0; m < rows; ++m) {
    for (int n = 0; n < cols; ++n) {
      float acc = cf[m][n];
      for (int k = 0; k < 2 * pairs; ++k) acc += af[m][k] * bf[k][n];
      cf[m][n] = acc;
    }
    std::memcpy(s.data[c][m], cf[m], 4 * static_cast<size_t>(cols));
  }
}

}  // namespace amx_emu

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#undef _tile_dpbssd
#define _tile_loadconfig(cfg) ::amx_emu::loadconfig(cfg)
#define _tile_release() ::amx_emu::release()
#define _tile_loadd(t, base, stride) ::amx_emu::loadd(t, base, stride)
#define _tile_stored(t, base, stride) ::amx_emu::stored(t, base, stride)
#define _tile_zero(t) ::amx_emu::zero(t)
#define _tile_dpbf16ps(c, a, b) ::amx_emu::dpbf16ps(c, a, b)
#define _tile_dpbssd(c, a, b) ::amx_emu::dpbssd(c, a, b)
