// What the MoEEngine source files share and nothing else includes: tile shapes, scratch slots,
// the engine lock, the tile lists, the activation cache entry and the per-call context. The
// engine's members are defined by concern: moe_engine.cpp (construction, slices, memory),
// weights.cpp (loading and reading the packed weights), lora.cpp (binding and staging LoRA),
// forward.cpp, backward.cpp; also bias.cpp and w8a8.cpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include "engine/activation_cache.h"
#include "engine/moe_engine.h"
#include "engine/tensor.h"
#include "kernels/kernels.h"
#include "runtime/scratch.h"

namespace kt::engine {

namespace detail {

using kernels::bf16;
using kernels::kBlockN;

// Tile shapes. Forward tiles may split an expert's rows (rows are independent); backward tiles
// own gradient slices and walk all rows of their expert in order, so gradients are reduced in a
// fixed order whatever the thread count.
inline constexpr int64_t kRowsGather = 64;  // rows per gather / LoRA-A task
// Rows per forward GEMM tile: an expert's weights stream from memory once per tile of rows, so
// larger tiles read them fewer times (128 -> 512: forward 1.13x at T = 4096, Qwen3-30B-A3B layer).
inline constexpr int64_t kRowsFwd = 512;
// Buffers written once by GEMM tiles and read in a later phase - the cached [g | u], the down
// tiles' y and the backward's dx partials - are written with non-temporal stores when they are
// this large: they leave the caches before they are read anyway, and writing past the caches
// skips each line's read for ownership (Qwen3-30B-A3B layer, 2 threads, step: T=1024 bf16 1.06x,
// W8A8 + int8 backward 1.12x; T=4096 bf16 1.07x, W8A8 + int8 backward 1.14x). Smaller ones
// (8 MiB of [g | u] at the `small` bench shape) are still cached when read, which streaming
// would lose (measured: the backward right after 1.06x slower). The x and dY rows gathered in
// expert order are streamed by the same rule (T=4096: forward gather 19.4 -> 16.7 ms, backward
// gather 20.5 -> 16.5 ms).
inline constexpr int64_t kStreamMinBytes = int64_t{32} << 20;
// Whether a write-once buffer of `floats` fp32 values is streamed (kStreamMinBytes).
inline bool streamed(int64_t floats) {
  return floats * static_cast<int64_t>(sizeof(float)) >= kStreamMinBytes;
}
// Rows [p0, p1) of a buffer in expert order (ld bf16 each, ld even) from token rows:
// dst + p * ld = src + slot_tok[p] * ld; with non-temporal stores when `stream` (streamed()).
inline void gather_rows(const kernels::KernelTable& k, const bf16* src, const int32_t* slot_tok,
                        int64_t p0, int64_t p1, int64_t ld, bf16* dst, bool stream) {
  for (int64_t p = p0; p < p1; ++p) {
    const bf16* row = src + slot_tok[p] * ld;
    if (stream) {
      k.stream_rows_f32(1, ld / 2, reinterpret_cast<const float*>(row), 0,
                        reinterpret_cast<float*>(dst + p * ld), 0);
    } else {
      std::memcpy(dst + p * ld, row, static_cast<size_t>(ld) * sizeof(bf16));
    }
  }
}
inline constexpr int64_t kPairsFwd = 3;    // gate/up block pairs per gate_up tile (96 columns)
inline constexpr int64_t kBlocksDown = 6;  // H blocks per down tile (96 columns)
inline constexpr int64_t kPairsBwd = 6;    // I blocks per backward down^T tile (96 columns)
inline constexpr int64_t kBlocksBwdH = 6;  // H blocks per backward gate_up^T tile (96 columns)
inline constexpr int64_t kRowsBwd = 128;   // rows per step inside a backward tile
inline constexpr int64_t kTokensCombine = 16;

// Process-wide scratch slots. Forward and backward buffers of similar size share a slot.
enum SharedSlot : int {
  kSlotRows = 0,   // fwd: x rows in expert order (S x KpH bf16); bwd: dY rows, same size
  kSlotH = 1,      // fwd: h (S x KpI bf16); bwd: dGU (S x 2Ib bf16)
  kSlotY = 2,      // fwd: y per slot (S x Hb fp32); bwd: dx per slot, same size
  kSlotTok = 3,    // bwd: dout rows as bf16 (T x KpH)
  kSlotSmall = 4,  // bwd: dY Bd (S x r), dw partials, (dGU B) partials, (dGU B) reduced
  // W8A8 forward only (engine/w8a8.h):
  kSlotQTok = 5,     // x codes per token (T x KpH8 int8)
  kSlotQRows = 6,    // x codes per slot (S x KpH8), then h codes (S x w8a8_h_stride())
  kSlotQScales = 7,  // their row scales: T per token, S per slot for x, S for h
  kSlotGU = 8,       // bwd: [g | u] (S x 2Ib fp32) recomputed for a forward that did not keep it
  kSlotX = 9,        // x rows as bf16 (T x KpH) of a forward that keeps no cache, or recomputed
  kSlotXA = 10,      // x A^T (S x RA) then h Ad^T (S x r), the same
};

enum LocalSlot : int { kL0 = 0, kL1, kL2, kL3, kL4, kL5, kL6, kL7, kL8, kL9, kLocalSlots };

template <typename T>
T* local_buf(int thread, int slot, int64_t count) {
  return static_cast<T*>(
      runtime::Scratch::instance().local(thread, slot, static_cast<size_t>(count) * sizeof(T)));
}

template <typename T>
T* shared_buf(int slot, int64_t count) {
  return static_cast<T*>(
      runtime::Scratch::instance().shared(slot, static_cast<size_t>(count) * sizeof(T)));
}

// The lock every engine holds while it runs: layers run one at a time and share the scratch pool.
// fork() waits for the running call and the child starts with the lock free (runtime/fork.h).
std::mutex& engine_mutex();

struct Tile {
  int64_t e, m0, m1, n0, n1;
};

// The row tiles of the per-row phases (gather, LoRA products): each expert's rows [off[e],
// off[e + 1]) in runs of at most kRowsGather, expert by expert.
inline std::vector<Tile> gather_tiles(const int64_t* off, int64_t E) {
  std::vector<Tile> tiles;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t m0 = off[e]; m0 < off[e + 1]; m0 += kRowsGather) {
      tiles.push_back({e, m0, std::min(off[e + 1], m0 + kRowsGather), 0, 0});
    }
  }
  return tiles;
}

// One phase's tiles split by tensor-parallel slice, for run_slices: tiles[s] run on worker group s.
struct SliceTiles {
  std::vector<std::vector<Tile>> tiles;
  std::vector<int64_t> counts;  // tiles[s].size()
  const Tile& at(int s, int64_t i) const {
    return tiles[static_cast<size_t>(s)][static_cast<size_t>(i)];
  }
};

// add(b0, b1, out) appends to out, in the order they are to run, the tiles of the slice that owns
// I blocks [b0, b1); it is called once per slice, in slice order.
template <class Slices, class AddTiles>
SliceTiles slice_tiles(const Slices& slices, AddTiles&& add) {
  SliceTiles st;
  st.tiles.resize(slices.size());
  st.counts.reserve(slices.size());
  for (size_t si = 0; si < slices.size(); ++si) {
    add(slices[si]->b0, slices[si]->b0 + slices[si]->nb, st.tiles[si]);
    st.counts.push_back(static_cast<int64_t>(st.tiles[si].size()));
  }
  return st;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows ahead at which the loops over gathered rows (one token's row each) prefetch.
inline constexpr int64_t kRowsAhead = 8;
// Prefetches the cache lines of n elements of T from p: for loops that read rows in an order no
// hardware prefetcher follows (rows of other tokens or slots), a few rows ahead.
template <typename T>
inline void prefetch_span(const T* p, int64_t n) {
  const char* b = reinterpret_cast<const char*>(p);
  const char* e = reinterpret_cast<const char*>(p + n);
  for (const char* q = b; q < e; q += 64) __builtin_prefetch(q);
  __builtin_prefetch(e - 1);
}

// The per-slot fp32 rows of the last GEMM (y in forward, dx in backward) are produced and combined
// per token in passes over groups of H columns, so that buffer stays near kSlotBudget bytes
// instead of growing with T * K * H. Results do not depend on the grouping.
inline constexpr int64_t kSlotBudget = int64_t{64} << 20;

struct ColGroups {
  int64_t blocks;  // 16-column blocks per group (a multiple of the tile width)
  int64_t count;
};

inline ColGroups col_groups(int64_t rows, int64_t n_blocks, int64_t tile_blocks) {
  const int64_t full = rows * n_blocks * kBlockN * static_cast<int64_t>(sizeof(float));
  const int64_t want = std::max<int64_t>(1, ceil_div(full, kSlotBudget));
  const int64_t blocks =
      std::max<int64_t>(tile_blocks, ceil_div(ceil_div(n_blocks, want), tile_blocks) * tile_blocks);
  return {blocks, ceil_div(n_blocks, blocks)};
}

// Token rows in and out of the engine (forward.cpp), shared by forward and backward.
// T rows of `src` (fp32 or bf16, row stride strides[0]) to bf16 rows of KpH, zero padded.
void rows_to_bf16(const View& src, int64_t T, int64_t H, int64_t KpH, bf16* dst, int nt,
                  const kernels::KernelTable& k);

// dst[t, h0 : h0 + width] = sum over token t's slots j, in order, of w[slot] * src[slot row]
// (w = 1 when slot_w is null); written as fp32 or bf16. With parts > 1 (tensor parallel) a slot's
// row is the sum of `parts` partial rows part_stride floats apart, added in slice order before the
// weight. The fixed orders keep results independent of the thread count.
void combine_slots(int64_t T, int64_t K, const int32_t* pos, const float* slot_w, const float* src,
                   int64_t ld, int64_t parts, int64_t part_stride, int64_t h0, int64_t width,
                   const View& dst, int nt, const kernels::KernelTable& k);

}  // namespace detail

// One activation cache entry: what backward needs of one forward, sized for the rows it routed.
// Its buffers come from the process-wide pool and go back there when backward pops it.
struct MoEEngine::Entry {
  int64_t T = 0;
  int64_t S = 0;                  // valid (token, slot) pairs
  bool has_gu = false;            // retained: xb, xa, gu, had hold the forward's values; else
                                  // backward recomputes them from the x it is given
  std::vector<int64_t> offsets;   // E + 1: rows of expert e are [offsets[e], offsets[e+1])
  std::vector<int32_t> slot_tok;  // S: token of each row
  std::vector<float> slot_w;      // S: routing weight of each row
  std::vector<int32_t> pos;       // T * K: row of (t, j), -1 for padding ids
  PooledBuffer xb;                // T x KpH bf16: x rounded to bf16
  PooledBuffer xa;                // S x RA: x A^T
  PooledBuffer gu;                // S x 2Ib fp32: [g | u] per block pair, as the GEMM wrote them
  PooledBuffer had;               // S x r: h Ad^T
  size_t bytes() const {
    return xb.bytes() + xa.bytes() + gu.bytes() + had.bytes() +
           offsets.capacity() * sizeof(int64_t) + slot_tok.capacity() * sizeof(int32_t) +
           slot_w.capacity() * sizeof(float) + pos.capacity() * sizeof(int32_t);
  }
  // Returns every buffer (the pool keeps the blocks for the next forward of any layer).
  void release() {
    xb.release();
    xa.release();
    gu.release();
    had.release();
    std::vector<int64_t>().swap(offsets);
    std::vector<int32_t>().swap(slot_tok);
    std::vector<float>().swap(slot_w);
    std::vector<int32_t>().swap(pos);
    has_gu = false;
  }
};

struct MoEEngine::Ctx {
  View x, ids, w, out;  // forward
  View dout, dx, dw;    // backward
  View x_again;         // backward of a recompute entry: the forward's x
  Entry* entry = nullptr;
  bool lora = false;   // LoRA terms on
  bool grads = false;  // LoRA gradients on (backward)
};

}  // namespace kt::engine
