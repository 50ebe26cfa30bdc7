#include "engine/moe_engine.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#include "engine/activation_cache.h"
#include "engine/limits.h"
#include "engine/lora_stage.h"
#include "engine/w8a8.h"
#include "kernels/dispatch.h"
#include "runtime/fork.h"
#include "runtime/numa.h"
#include "runtime/scratch.h"
#include "runtime/thread_pool.h"
#include "runtime/trace.h"

namespace kt::engine {

using kernels::bf16;
using kernels::kBlockN;
using runtime::parallel_for;
using runtime::Scratch;

namespace {

// Tile shapes. Forward tiles may split an expert's rows (rows are independent); backward tiles
// own gradient slices and walk all rows of their expert in order, so gradients are reduced in a
// fixed order whatever the thread count.
constexpr int64_t kRowsGather = 64;  // rows per gather / LoRA-A task
constexpr int64_t kRowsFwd = 128;    // rows per forward GEMM tile
constexpr int64_t kPairsFwd = 3;     // gate/up block pairs per gate_up tile (96 columns)
constexpr int64_t kBlocksDown = 6;   // H blocks per down tile (96 columns)
constexpr int64_t kPairsBwd = 6;     // I blocks per backward down^T tile (96 columns)
constexpr int64_t kBlocksBwdH = 6;   // H blocks per backward gate_up^T tile (96 columns)
constexpr int64_t kRowsBwd = 128;    // rows per step inside a backward tile
constexpr int64_t kTokensCombine = 16;

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
      Scratch::instance().local(thread, slot, static_cast<size_t>(count) * sizeof(T)));
}

template <typename T>
T* shared_buf(int slot, int64_t count) {
  return static_cast<T*>(Scratch::instance().shared(slot, static_cast<size_t>(count) * sizeof(T)));
}

// The lock every engine holds while it runs: layers run one at a time and share the scratch pool.
// fork() waits for the running call and the child starts with the lock free (runtime/fork.h).
std::mutex& engine_mutex() {
  static std::mutex* m = [] {
    auto* mu = new std::mutex();
    runtime::on_fork(
        runtime::kForkOrderEngine, [mu] { mu->lock(); }, [mu] { mu->unlock(); },
        [mu] { mu->unlock(); });
    return mu;
  }();
  return *m;
}

// Times the phases of one engine call with the steady clock. When the profiler is on (checked once
// per call) each phase also becomes a trace event nested in one event for the whole call, and the
// engine's per-phase totals (profile_summary) are updated.
class PhaseClock {
 public:
  // Starts the clock and forgets the previous timings with this prefix.
  PhaseClock(std::map<std::string, double>& out, const char* prefix, int64_t engine, int64_t tokens,
             std::map<std::string, PhaseStat>* stats)
      : out_(out),
        prefix_(prefix),
        last_(std::chrono::steady_clock::now()),
        start_(last_),
        engine_(engine),
        tokens_(tokens),
        tracing_(runtime::trace_enabled()),
        stats_(tracing_ ? stats : nullptr) {
    for (auto it = out_.begin(); it != out_.end();) {
      it = it->first.compare(0, prefix_.size(), prefix_) == 0 ? out_.erase(it) : std::next(it);
    }
    if (tracing_) last_ns_ = start_ns_ = runtime::trace_now_ns();
  }
  // Adds the time since the last mark to `phase` (phases may run several times).
  void mark(const char* phase) {
    const auto now = std::chrono::steady_clock::now();
    const double ms = std::chrono::duration<double, std::milli>(now - last_).count();
    out_[prefix_ + phase] += ms;
    last_ = now;
    if (tracing_) {
      const int64_t ns = runtime::trace_now_ns();
      runtime::trace_record(
          {phase, "phase", engine_, tokens_, runtime::trace_thread_id(), last_ns_, ns - last_ns_});
      last_ns_ = ns;
      if (stats_) {
        PhaseStat& st = (*stats_)[prefix_ + phase];
        st.calls += 1;
        st.total_ms += ms;
      }
    }
  }
  void total() {
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_)
            .count();
    out_[prefix_ + "total"] = ms;
    if (tracing_) {
      const int64_t ns = runtime::trace_now_ns();
      std::string call = prefix_.substr(0, prefix_.size() - 1);  // "forward." -> "forward"
      runtime::trace_record(
          {call, "call", engine_, tokens_, runtime::trace_thread_id(), start_ns_, ns - start_ns_});
      if (stats_) {
        PhaseStat& st = (*stats_)[prefix_ + "total"];
        st.calls += 1;
        st.total_ms += ms;
      }
    }
  }

 private:
  std::map<std::string, double>& out_;
  std::string prefix_;
  std::chrono::steady_clock::time_point last_, start_;
  int64_t engine_, tokens_;
  bool tracing_;
  std::map<std::string, PhaseStat>* stats_;
  int64_t last_ns_ = 0, start_ns_ = 0;
};

struct Tile {
  int64_t e, m0, m1, n0, n1;
};

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

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The per-slot fp32 rows of the last GEMM (y in forward, dx in backward) are produced and combined
// per token in passes over groups of H columns, so that buffer stays near kSlotBudget bytes
// instead of growing with T * K * H. Results do not depend on the grouping.
constexpr int64_t kSlotBudget = int64_t{64} << 20;

struct ColGroups {
  int64_t blocks;  // 16-column blocks per group (a multiple of the tile width)
  int64_t count;
};

ColGroups col_groups(int64_t rows, int64_t n_blocks, int64_t tile_blocks) {
  const int64_t full = rows * n_blocks * kBlockN * static_cast<int64_t>(sizeof(float));
  const int64_t want = std::max<int64_t>(1, ceil_div(full, kSlotBudget));
  const int64_t blocks =
      std::max<int64_t>(tile_blocks, ceil_div(ceil_div(n_blocks, want), tile_blocks) * tile_blocks);
  return {blocks, ceil_div(n_blocks, blocks)};
}

// T rows of `src` (fp32 or bf16, row stride strides[0]) to bf16 rows of KpH, zero padded.
void rows_to_bf16(const View& src, int64_t T, int64_t H, int64_t KpH, bf16* dst, int nt,
                  const kernels::KernelTable& k) {
  parallel_for(ceil_div(T, kTokensCombine), nt, [&](int64_t task, int) {
    for (int64_t t = task * kTokensCombine; t < std::min(T, (task + 1) * kTokensCombine); ++t) {
      bf16* row = dst + t * KpH;
      if (src.dtype == DType::f32) {
        k.cvt_f32_bf16(H, src.ptr<const float>() + t * src.strides[0], row);
      } else {
        std::memcpy(row, src.ptr<const bf16>() + t * src.strides[0],
                    static_cast<size_t>(H) * sizeof(bf16));
      }
      std::memset(row + H, 0, static_cast<size_t>(KpH - H) * sizeof(bf16));
    }
  });
}

// dst[t, h0 : h0 + width] = sum over token t's slots j, in order, of w[slot] * src[slot row]
// (w = 1 when slot_w is null); written as fp32 or bf16. With parts > 1 (tensor parallel) a slot's
// row is the sum of `parts` partial rows part_stride floats apart, added in slice order before the
// weight. The fixed orders keep results independent of the thread count.
void combine_slots(int64_t T, int64_t K, const int32_t* pos, const float* slot_w, const float* src,
                   int64_t ld, int64_t parts, int64_t part_stride, int64_t h0, int64_t width,
                   const View& dst, int nt, const kernels::KernelTable& k) {
  parallel_for(ceil_div(T, kTokensCombine), nt, [&](int64_t task, int th) {
    float* acc = local_buf<float>(th, kL0, width);
    float* sum = parts > 1 ? local_buf<float>(th, kL1, width) : nullptr;
    for (int64_t t = task * kTokensCombine; t < std::min(T, (task + 1) * kTokensCombine); ++t) {
      std::fill(acc, acc + width, 0.0f);
      for (int64_t j = 0; j < K; ++j) {
        const int32_t p = pos[t * K + j];
        if (p < 0) continue;
        const float wj = slot_w ? slot_w[p] : 1.0f;
        const float* row = src + p * ld;
        if (parts > 1) {
          std::memcpy(sum, row, static_cast<size_t>(width) * sizeof(float));
          for (int64_t sp = 1; sp < parts; ++sp) {
            const float* part = row + sp * part_stride;
            for (int64_t h = 0; h < width; ++h) sum[h] += part[h];
          }
          row = sum;
        }
        for (int64_t h = 0; h < width; ++h) acc[h] += wj * row[h];
      }
      if (dst.dtype == DType::f32) {
        std::memcpy(dst.ptr<float>() + t * dst.strides[0] + h0, acc,
                    static_cast<size_t>(width) * sizeof(float));
      } else {
        k.cvt_f32_bf16(width, acc, dst.ptr<bf16>() + t * dst.strides[0] + h0);
      }
    }
  });
}

// KT_KERNELS_FUSED_DEQUANT: which path int8 / int4 weights take into the GEMM (read when an
// engine is created). auto (or unset): the fused kernel up to the ISA's fused_max_rows_q8 / _q4
// rows per tile, dequantize + gemm_bf16 above; 1: always fused; 0: never. Both paths give the
// same bits.
int64_t fused_rows_setting(const kernels::KernelTable& k, quant::Kind kind) {
  const int64_t none = -1;
  const bool have = k.gemm_q8 != nullptr && k.gemm_q4 != nullptr;
  const char* env = std::getenv("KT_KERNELS_FUSED_DEQUANT");
  std::string v = env ? env : "";
  v.erase(0, v.find_first_not_of(" \t"));
  v.erase(v.find_last_not_of(" \t") + 1);
  std::transform(v.begin(), v.end(), v.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  if (v.empty() || v == "auto") {
    return have ? (kind == quant::Kind::int4 ? k.fused_max_rows_q4 : k.fused_max_rows_q8) : none;
  }
  if (v == "1" || v == "on") return have ? std::numeric_limits<int64_t>::max() : none;
  if (v == "0" || v == "off") return none;
  throw ValueError(std::string("KT_KERNELS_FUSED_DEQUANT='") + env +
                   "': expected 'auto' (or unset: fused dequantize + GEMM for small tiles), "
                   "'1' / 'on' (always fused) or '0' / 'off' (never)");
}

}  // namespace

// ---- buffers -----------------------------------------------------------------------------------

MoEEngine::Buf::~Buf() { reset(0, kind); }

void MoEEngine::Buf::reset(size_t n, runtime::MemKind k) {
  if (p != nullptr) runtime::mem_sub(kind, bytes);
  std::free(p);
  p = nullptr;
  bytes = 0;
  kind = k;
  if (n == 0) return;
  const size_t rounded = (n + 63) / 64 * 64;
  p = std::aligned_alloc(64, rounded);
  if (p == nullptr) throw std::bad_alloc();
  bytes = rounded;
  runtime::mem_add(kind, bytes);
}

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

// ---- construction ------------------------------------------------------------------------------

MoEEngine::MoEEngine(const EngineConfig& cfg) : cfg_(cfg) {
  static std::atomic<int64_t> next_id{0};
  id_ = next_id.fetch_add(1);
  auto positive = [](int64_t v, const char* name) {
    if (v < 1)
      throw ValueError(std::string(name) + ": expected a positive integer, got " +
                       std::to_string(v));
  };
  positive(cfg.num_experts, "num_experts");
  positive(cfg.top_k, "top_k");
  positive(cfg.hidden_size, "hidden_size");
  positive(cfg.intermediate_size, "intermediate_size");
  positive(cfg.max_tokens, "max_tokens");
  if (cfg.num_experts > (int64_t{1} << 30) || cfg.hidden_size > (int64_t{1} << 24) ||
      cfg.intermediate_size > (int64_t{1} << 24) || cfg.top_k > 4096) {
    throw ValueError("num_experts / top_k / hidden_size / intermediate_size: too large");
  }
  if (cfg.lora_rank < 0 || cfg.lora_rank > 4096) {
    throw ValueError("lora_rank: expected an integer in [0, 4096] (0 = no LoRA), got " +
                     std::to_string(cfg.lora_rank));
  }
  if (cfg.max_cache_depth < 0 || cfg.max_cache_depth > 1024) {
    throw ValueError("max_cache_depth: expected an integer in [0, 1024], got " +
                     std::to_string(cfg.max_cache_depth));
  }
  if (cfg.weight_dtype == "bf16") {
    wkind_ = quant::Kind::bf16;
  } else if (cfg.weight_dtype == "int8") {
    wkind_ = quant::Kind::int8;
  } else if (cfg.weight_dtype == "int4") {
    wkind_ = quant::Kind::int4;
  } else {
    throw ValueError("weight_dtype: expected 'bf16', 'int8' or 'int4', got '" + cfg.weight_dtype +
                     "'");
  }
  if (cfg.activation_dtype == "int8") {
    if (wkind_ != quant::Kind::int8) {
      throw ValueError(
          "activation_dtype='int8' (W8A8: int8 x int8 GEMMs) needs weight_dtype='int8', got "
          "weight_dtype='" +
          cfg.weight_dtype +
          "'; use weight_dtype='int8' with activation_dtype='int8', or activation_dtype='bf16' "
          "(the default) with any weight_dtype");
    }
    if (cfg.hidden_size > w8a8::kMaxDepth || cfg.intermediate_size > w8a8::kMaxDepth) {
      throw ValueError(
          "activation_dtype='int8': hidden_size and intermediate_size must be at most " +
          std::to_string(w8a8::kMaxDepth) +
          " (int8 products are summed in int32), got hidden_size=" +
          std::to_string(cfg.hidden_size) +
          ", intermediate_size=" + std::to_string(cfg.intermediate_size));
    }
    wkind_ = quant::Kind::w8a8;
  } else if (cfg.activation_dtype != "bf16") {
    throw ValueError("activation_dtype: expected 'bf16' or 'int8', got '" + cfg.activation_dtype +
                     "'");
  }
  if (wkind_ == quant::Kind::int4) {
    const int64_t g = cfg.group_size;
    if (g != 32 && g != 64 && g != 128) {
      throw ValueError("group_size: expected 32, 64 or 128 for weight_dtype='int4', got " +
                       std::to_string(g));
    }
    if (cfg.hidden_size % g != 0 || cfg.intermediate_size % g != 0) {
      throw ValueError("group_size: " + std::to_string(g) +
                       " must divide hidden_size and intermediate_size (int4 groups run along "
                       "the input dim of both projections), got hidden_size=" +
                       std::to_string(cfg.hidden_size) +
                       ", intermediate_size=" + std::to_string(cfg.intermediate_size));
    }
  }
  if (cfg.tp < 0) {
    throw ValueError("tp: expected None or a positive integer, got " + std::to_string(cfg.tp));
  }
  if (cfg.num_threads < 0 || cfg.num_threads > 4096) {
    throw ValueError("num_threads: expected None or an integer in [1, 4096], got " +
                     std::to_string(cfg.num_threads));
  }
  if (cfg.lora_rank > 0) {
    if (std::isnan(cfg.lora_alpha)) {
      scale_ = 1.0f;
    } else if (!std::isfinite(cfg.lora_alpha) || cfg.lora_alpha == 0.0) {
      throw ValueError("lora_alpha: expected None or a finite non-zero number, got " +
                       std::to_string(cfg.lora_alpha));
    } else {
      scale_ = static_cast<float>(cfg.lora_alpha / static_cast<double>(cfg.lora_rank));
    }
  }
  isa_ = kernels::select_isa(cfg.isa);
  k_ = kernels::kernel_table(isa_);
  isa_ = k_.isa;
  const kernels::KernelTable& ref = *kernels::scalar_table();
  if (!k_.gemm_f32_nn) k_.gemm_f32_nn = ref.gemm_f32_nn;
  if (!k_.gemm_f32_nt) k_.gemm_f32_nt = ref.gemm_f32_nt;
  if (!k_.gemm_f32_tn) k_.gemm_f32_tn = ref.gemm_f32_tn;
  if (!k_.cvt_bf16_f32) k_.cvt_bf16_f32 = ref.cvt_bf16_f32;
  if (!k_.cvt_f32_bf16) k_.cvt_f32_bf16 = ref.cvt_f32_bf16;
  if (!k_.silu_mul) k_.silu_mul = ref.silu_mul;
  if (!k_.silu_mul_bwd) k_.silu_mul_bwd = ref.silu_mul_bwd;
  if (!k_.pack_transposed) k_.pack_transposed = ref.pack_transposed;
  act_ = activation::parse(cfg.activation, cfg.activation_alpha, cfg.activation_limit,
                           cfg.activation_up_offset, cfg.activation_gate_softcap,
                           cfg.activation_up_softcap);
  act_kernels_ = act_.is_default();
  qk_ = &kernels::quant_kernels(isa_);
  fused_rows_ = fused_rows_setting(k_, wkind_);
  threads_ = cfg.num_threads > 0 ? cfg.num_threads : runtime::default_thread_count();

  E_ = cfg.num_experts;
  K_ = cfg.top_k;
  H_ = cfg.hidden_size;
  I_ = cfg.intermediate_size;
  r_ = cfg.lora_rank;
  KpH_ = kernels::packed_k(H_);
  KpI_ = kernels::packed_k(I_);
  nbI_ = kernels::packed_blocks(I_);
  nbH_ = kernels::packed_blocks(H_);
  Ib_ = nbI_ * kBlockN;
  Hb_ = nbH_ * kBlockN;
  limits::check_tokens(cfg.max_tokens, K_, std::max({KpH_, KpI_, 2 * Ib_}), "max_tokens");
  RA_ = cfg.lora_fused ? r_ : 2 * r_;
  set_activation_policy(cfg.activation_policy);
  fgu_ = quant::make_format(wkind_, H_, cfg.group_size);
  // Tensor-parallel slices of I, in units of whole 32-column blocks pairs (int4: whole groups),
  // so every slice but the last has a depth that needs no padding.
  {
    const int64_t unit0 = wkind_ == quant::Kind::int4 ? cfg.group_size / kBlockN : 2;
    const int tp = cfg.tp > 0 ? cfg.tp
                              : static_cast<int>(std::min<int64_t>(runtime::numa_node_count(),
                                                                   ceil_div(nbI_, unit0)));
    const int64_t unit = wkind_ == quant::Kind::int4 ? cfg.group_size / kBlockN : 2;
    const int64_t units = ceil_div(nbI_, unit);
    if (cfg.tp > 4096 || tp > units) {
      throw ValueError(
          "tp: " + std::to_string(cfg.tp) + " slices of intermediate_size=" + std::to_string(I_) +
          " are too many: slices hold whole multiples of " + std::to_string(unit * kBlockN) +
          " columns, so at most " + std::to_string(units) + " slices are possible");
    }
    int64_t u0 = 0;
    for (int s = 0; s < tp; ++s) {
      const int64_t nu = units / tp + (s < units % tp ? 1 : 0);
      auto sl = std::make_unique<Slice>();
      sl->b0 = std::min(nbI_, u0 * unit);
      sl->nb = std::min(nbI_, (u0 + nu) * unit) - sl->b0;
      sl->width = std::min(I_, kBlockN * (sl->b0 + sl->nb)) - kBlockN * sl->b0;
      sl->fd = quant::make_format(wkind_, sl->width, cfg.group_size);
      sl->KpI = sl->fd.Kp;
      sl_.push_back(std::move(sl));
      u0 += nu;
    }
    // Group s works on slice s, whose weights live on node s mod nodes: pin it there when every
    // node gets whole slices. One node (or KT_PIN_THREADS=0): logical groups, no pinning.
    const int nodes = runtime::numa_node_count();
    const bool pin = runtime::thread_pinning_enabled();
    pinned_ = pin && nodes > 1 && tp % nodes == 0;
    group_node_.assign(static_cast<size_t>(tp), -1);
    if (pinned_) {
      for (int s = 0; s < tp; ++s) group_node_[static_cast<size_t>(s)] = s % nodes;
    }
  }
}

MoEEngine::~MoEEngine() {
  std::lock_guard<std::mutex> lock(engine_mutex());
  LoraStage::instance().drop(id_);
}

// ---- weights -----------------------------------------------------------------------------------

void MoEEngine::load_weights(const View& gate_up, const View& gate, const View& up,
                             const View& down) {
  const std::vector<DType> fl = {DType::f32, DType::bf16};
  const bool fused = gate_up.present;
  if (fused && (gate.present || up.present)) {
    throw ValueError("load_weights: pass either gate_up=... or gate=... and up=..., not both");
  }
  if (!fused && !(gate.present && up.present)) {
    throw ValueError(
        "load_weights: expected gate_up=... (E, 2I, H) or both gate=... and up=... "
        "(E, I, H)");
  }
  if (fused) {
    check(gate_up, {"gate_up",
                    fl,
                    {E_, 2 * I_, H_},
                    "(num_experts, 2 * intermediate_size, "
                    "hidden_size)"});
  } else {
    check(gate, {"gate", fl, {E_, I_, H_}, "(num_experts, intermediate_size, hidden_size)"});
    check(up, {"up", fl, {E_, I_, H_}, "(num_experts, intermediate_size, hidden_size)"});
  }
  check(down, {"down", fl, {E_, H_, I_}, "(num_experts, hidden_size, intermediate_size)"});

  std::lock_guard<std::mutex> lock(engine_mutex());
  PhaseClock clock(timings_, "load.", id_, 0, &prof_);
  alloc_weights();
  clock.mark("alloc");
  const kernels::KernelTable& kt = k_;
  const quant::Kind kind = wkind_;
  // bf16: packs block b (rows 16b .. 16b + 15 after row_off; columns c0 .. c0 + K) of matrix e
  // of `src` into `blk`: the 16 rows are first converted to bf16 rows (rows >= N and columns >= K
  // are zero), then each pair of columns of the 16 rows is written as one run of 16 bf16 pairs.
  auto pack_block = [&kt](const View& src, int64_t e, int64_t row_off, int64_t c0, int64_t N,
                          int64_t K, int64_t Kp, int64_t b, bf16* blk, bf16* rows) {
    for (int64_t j = 0; j < kBlockN; ++j) {
      bf16* row = rows + j * Kp;
      const int64_t n = b * kBlockN + j;
      if (n >= N) {
        std::memset(row, 0, static_cast<size_t>(Kp) * sizeof(bf16));
        continue;
      }
      const int64_t sk = src.strides[2];
      const int64_t base = e * src.strides[0] + (row_off + n) * src.strides[1] + c0 * sk;
      if (src.dtype == DType::bf16) {
        const bf16* sp = src.ptr<const bf16>() + base;
        if (sk == 1) {
          std::memcpy(row, sp, static_cast<size_t>(K) * sizeof(bf16));
        } else {
          for (int64_t k = 0; k < K; ++k) row[k] = sp[k * sk];
        }
      } else {
        const float* sp = src.ptr<const float>() + base;
        if (sk == 1) {
          kt.cvt_f32_bf16(K, sp, row);
        } else {
          for (int64_t k = 0; k < K; ++k) row[k] = kernels::f32_to_bf16(sp[k * sk]);
        }
      }
      std::memset(row + K, 0, static_cast<size_t>(Kp - K) * sizeof(bf16));
    }
    for (int64_t kp = 0; kp < Kp / 2; ++kp) {
      bf16* o = blk + kp * 32;
      for (int64_t j = 0; j < kBlockN; ++j) {
        o[2 * j] = rows[j * Kp + 2 * kp];
        o[2 * j + 1] = rows[j * Kp + 2 * kp + 1];
      }
    }
  };
  // int8 / int4: quantizes the same 16 rows into a code block and its scales.
  // Rows are quantized whole (all Kfull columns: an int8 scale belongs to the whole output
  // channel whatever the tensor-parallel split); the slice keeps columns [c0, c0 + K). A row
  // contiguous along K is read as is (float32) or converted whole (bf16); the 16 rows of codes
  // are then placed at once.
  const kernels::QuantKernels& qk = *qk_;
  auto quant_block = [&](const View& src, const quant::Format& f, int64_t e, int64_t row_off,
                         int64_t c0, int64_t N, int64_t K, int64_t b, uint8_t* blk, float* sc,
                         int th) {
    const int64_t Kfull = src.shape[2];
    const quant::Format ff = quant::make_format(kind, Kfull, cfg_.group_size);
    float* row = local_buf<float>(th, kL0, Kfull);
    int8_t* codes = local_buf<int8_t>(th, kL1, kBlockN * Kfull);
    float* fsc = local_buf<float>(th, kL2, ff.ngroups);
    const int64_t sk = src.strides[2];
    for (int j = 0; j < kBlockN; ++j) {
      const int64_t n = b * kBlockN + j;
      float* srow = sc + j * f.ngroups;
      int8_t* cj = codes + j * Kfull;
      std::fill(srow, srow + f.ngroups, 0.0f);
      if (n >= N) {
        std::memset(cj + c0, 0, static_cast<size_t>(K));
        continue;
      }
      const int64_t base = e * src.strides[0] + (row_off + n) * src.strides[1];
      const float* w = row;
      if (sk == 1 && src.dtype == DType::f32) {
        w = src.ptr<const float>() + base;
      } else if (sk == 1) {
        kt.cvt_bf16_f32(Kfull, src.ptr<const bf16>() + base, row);
      } else {
        for (int64_t k = 0; k < Kfull; ++k) row[k] = load_f(src, base + k * sk);
      }
      if (!quant::quantize_row(qk, ff, w, Kfull, cj, fsc)) {
        throw ValueError("load_weights: weight_dtype='" + cfg_.weight_dtype +
                         "' needs finite weights; expert " + std::to_string(e) +
                         " has a NaN or infinite value");
      }
      if (kind != quant::Kind::int4) {  // int8, w8a8: one scale per row
        srow[0] = fsc[0];
      } else {
        for (int64_t g = 0; g < K / ff.group; ++g) srow[g] = fsc[c0 / ff.group + g];
      }
    }
    quant::place_block(f, codes + c0, Kfull, K, blk);
  };
  // One (expert, weight block, slice) at a time: src rows, column offset, sizes, destination.
  auto one = [&](const View& src, int64_t e, int64_t row_off, int64_t c0, int64_t N, int64_t K,
                 int64_t b, const quant::Format& f, Buf& w, Buf& sbuf, int64_t gb, int th) {
    if (kind == quant::Kind::bf16) {
      const int64_t Kp = f.Kp;
      bf16* rows = local_buf<bf16>(th, kL0, kBlockN * Kp);
      pack_block(src, e, row_off, c0, N, K, Kp, b, w.as<bf16>() + gb * kBlockN * Kp, rows);
    } else {
      quant_block(src, f, e, row_off, c0, N, K, b, w.as<uint8_t>() + gb * quant::block_bytes(f),
                  sbuf.as<float>() + gb * kBlockN * f.ngroups, th);
    }
  };
  try {
    for_each_weight_block([&](int64_t e, int64_t b, int s, int th) {
      Slice& sl = *sl_[static_cast<size_t>(s)];
      if (b < 2 * nbI_) {  // gate block q at 2q, up block q at 2q + 1 (q global)
        const int64_t q = b / 2;
        const bool is_up = (b % 2) == 1;
        const int64_t gb = e * 2 * sl.nb + (b - 2 * sl.b0);
        if (fused) {
          one(gate_up, e, is_up ? I_ : 0, 0, I_, H_, q, fgu_, sl.wgu, sl.sgu, gb, th);
        } else {
          one(is_up ? up : gate, e, 0, 0, I_, H_, q, fgu_, sl.wgu, sl.sgu, gb, th);
        }
      } else {
        const int64_t blk = (b - 2 * nbI_) % nbH_;
        one(down, e, 0, kBlockN * sl.b0, H_, sl.width, blk, sl.fd, sl.wd, sl.sd, e * nbH_ + blk,
            th);
      }
    });
  } catch (...) {
    free_weights();  // no half-loaded engine: a failed load leaves no weights
    throw;
  }
  clock.mark(kind == quant::Kind::bf16 ? "pack" : "quantize");
  clock.total();
}

void MoEEngine::for_each_weight_block(const std::function<void(int64_t, int64_t, int, int)>& fn) {
  // Tasks of slice s: per expert, its 2 nb gate/up blocks, then its nbH down blocks. Run by
  // group s, so the first write of each page (first-touch placement) is on the slice's node.
  std::vector<int64_t> counts;
  for (const auto& sl : sl_) counts.push_back(E_ * (2 * sl->nb + nbH_));
  Scratch::instance().prepare_threads(std::max(threads_, 1));
  run_slices(counts, [&](int s, int64_t task, int th) {
    const Slice& sl = *sl_[static_cast<size_t>(s)];
    const int64_t per_expert = 2 * sl.nb + nbH_;
    const int64_t e = task / per_expert, b = task % per_expert;
    fn(e, b < 2 * sl.nb ? 2 * sl.b0 + b : 2 * nbI_ + s * nbH_ + (b - 2 * sl.nb), s, th);
  });
}

void MoEEngine::run_slices(const std::vector<int64_t>& counts,
                           const std::function<void(int, int64_t, int)>& fn) const {
  if (counts.size() == 1) {
    parallel_for(counts[0], threads_, [&](int64_t i, int th) { fn(0, i, th); });
  } else {
    runtime::grouped_for(counts, threads_, fn, &group_node_);
  }
}

int MoEEngine::slice_of(int64_t pair) const {
  int s = 0;
  while (s + 1 < static_cast<int>(sl_.size()) && pair >= sl_[static_cast<size_t>(s) + 1]->b0) ++s;
  return s;
}

void MoEEngine::free_weights() {
  for (auto& sl : sl_) {
    sl->wgu.reset(0);
    sl->wd.reset(0);
    sl->sgu.reset(0);
    sl->sd.reset(0);
  }
}

void MoEEngine::alloc_weights() {
  const int nodes = runtime::numa_node_count();
  for (size_t s = 0; s < sl_.size(); ++s) {
    Slice& sl = *sl_[s];
    if (wkind_ == quant::Kind::bf16) {
      sl.wgu.reset(static_cast<size_t>(E_ * 2 * sl.nb * kBlockN * KpH_) * sizeof(bf16));
      sl.wd.reset(static_cast<size_t>(E_ * nbH_ * kBlockN * sl.KpI) * sizeof(bf16));
      sl.sgu.reset(0);
      sl.sd.reset(0);
    } else {
      sl.wgu.reset(static_cast<size_t>(E_ * 2 * sl.nb * quant::block_bytes(fgu_)));
      sl.wd.reset(static_cast<size_t>(E_ * nbH_ * quant::block_bytes(sl.fd)));
      sl.sgu.reset(static_cast<size_t>(E_ * 2 * sl.nb * kBlockN * fgu_.ngroups) * sizeof(float));
      sl.sd.reset(static_cast<size_t>(E_ * Hb_ * sl.fd.ngroups) * sizeof(float));
    }
    // Slice s lives on NUMA node s mod nodes (a no-op on one node or without libnuma).
    const int node = static_cast<int>(s) % std::max(nodes, 1);
    for (Buf* b : {&sl.wgu, &sl.wd, &sl.sgu, &sl.sd}) runtime::bind_to_node(b->p, b->bytes, node);
  }
}

void MoEEngine::load_quantized(const View& gate_up, const View& gate_up_scale, const View& gate,
                               const View& gate_scale, const View& up, const View& up_scale,
                               const View& down, const View& down_scale) {
  if (wkind_ == quant::Kind::bf16) {
    throw StateError(
        "load_quantized_weights: this engine has weight_dtype='bf16'; create it with "
        "weight_dtype='int8' or 'int4' to load quantized weights, or use load_weights");
  }
  const bool int4 = wkind_ == quant::Kind::int4;
  const bool fused = gate_up.present;
  if (fused && (gate.present || up.present)) {
    throw ValueError(
        "load_quantized_weights: pass either gate_up=... or gate=... and up=..., not both");
  }
  if (!fused && !(gate.present && up.present)) {
    throw ValueError(
        "load_quantized_weights: expected gate_up=... or both gate=... and up=... (with their "
        "scales)");
  }
  const int64_t G = cfg_.group_size;
  const DType code_t = int4 ? DType::u8 : DType::i8;
  const char* wd = int4 ? "int4 (uint8, two codes per byte)" : "int8";
  // Codes: the declared weight_dtype decides the dtype; a mismatch is a TypeError naming both.
  auto check_codes = [&](const View& v, const char* name, int64_t N, int64_t K, const char* nd,
                         const char* kd) {
    if (!v.present) throw ValueError(std::string(name) + ": missing");
    if (v.dtype != code_t) {
      throw TypeError(
          std::string(name) + ": weight_dtype='" + cfg_.weight_dtype + "' expects " + wd +
          " codes, got " +
          (v.dtype == DType::other && v.dtype_desc[0] ? v.dtype_desc : dtype_name(v.dtype)) +
          (v.dtype == DType::i8   ? " (int8 codes belong to weight_dtype='int8')"
           : v.dtype == DType::u8 ? " (packed uint8 codes belong to weight_dtype='int4')"
                                  : ""));
    }
    const std::string desc =
        std::string("(num_experts, ") + nd + ", " + kd + (int4 ? " / 2)" : ")");
    check(v, {name, {code_t}, {E_, N, int4 ? K / 2 : K}, desc.c_str()});
  };
  auto check_scale = [&](const View& v, const char* name, int64_t N, int64_t K, const char* nd,
                         const char* kd) {
    if (!v.present) {
      throw ValueError(std::string(name) + ": the scales are missing (float32 " +
                       (int4 ? "(E, N, K / group_size)" : "(E, N)") + ")");
    }
    const std::string desc = std::string("(num_experts, ") + nd +
                             (int4 ? std::string(", ") + kd + " / group_size)" : std::string(")"));
    if (int4) {
      check(v, {name, {DType::f32}, {E_, N, K / G}, desc.c_str()});
    } else {
      check(v, {name, {DType::f32}, {E_, N}, desc.c_str()});
    }
    const int64_t ng = int4 ? K / G : 1;
    for (int64_t e = 0; e < E_; ++e) {
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t g = 0; g < ng; ++g) {
          const float s = v.ptr<const float>()[e * v.strides[0] + n * v.strides[1] +
                                               (int4 ? g * v.strides[2] : 0)];
          if (!(std::isfinite(s) && s >= 0.0f)) {
            throw ValueError(std::string(name) + ": scales must be finite and >= 0, got " +
                             std::to_string(s) + " at [" + std::to_string(e) + ", " +
                             std::to_string(n) + "]");
          }
        }
      }
    }
  };
  if (fused) {
    check_codes(gate_up, "gate_up", 2 * I_, H_, "2 * intermediate_size", "hidden_size");
    check_scale(gate_up_scale, "gate_up_scale", 2 * I_, H_, "2 * intermediate_size", "hidden_size");
  } else {
    check_codes(gate, "gate", I_, H_, "intermediate_size", "hidden_size");
    check_scale(gate_scale, "gate_scale", I_, H_, "intermediate_size", "hidden_size");
    check_codes(up, "up", I_, H_, "intermediate_size", "hidden_size");
    check_scale(up_scale, "up_scale", I_, H_, "intermediate_size", "hidden_size");
  }
  if (!down.present) throw ValueError("down: missing");
  check_codes(down, "down", H_, I_, "hidden_size", "intermediate_size");
  check_scale(down_scale, "down_scale", H_, I_, "hidden_size", "intermediate_size");

  std::lock_guard<std::mutex> lock(engine_mutex());
  PhaseClock clock(timings_, "load.", id_, 0, &prof_);
  alloc_weights();
  clock.mark("alloc");
  // Codes contiguous along K of a block of 16 source rows are placed straight from the source;
  // otherwise (strided codes, or a last block of fewer rows) the rows are first gathered.
  auto copy_block = [&](const View& src, const View& ssrc, const quant::Format& f, int64_t e,
                        int64_t row_off, int64_t c0, int64_t N, int64_t K, int64_t b, uint8_t* blk,
                        float* sc, int th) {
    const int64_t ng = int4 ? K / G : 1;
    const int64_t rowb = int4 ? K / 2 : K;  // source bytes of a row's codes
    const int64_t base0 = e * src.strides[0] + (row_off + b * kBlockN) * src.strides[1];
    const bool direct = src.strides[2] == 1 && (b + 1) * kBlockN <= N;
    const uint8_t* p = src.ptr<const uint8_t>();
    const uint8_t* rows = p + base0 + (int4 ? c0 / 2 : c0);
    int64_t ld = src.strides[1];
    if (!direct) {
      uint8_t* g = local_buf<uint8_t>(th, kL1, kBlockN * rowb);
      for (int j = 0; j < kBlockN; ++j) {
        uint8_t* o = g + j * rowb;
        if (b * kBlockN + j >= N) {
          std::memset(o, 0, static_cast<size_t>(rowb));
          continue;
        }
        const int64_t base = base0 + j * src.strides[1] + (int4 ? c0 / 2 : c0) * src.strides[2];
        for (int64_t k = 0; k < rowb; ++k) o[k] = p[base + k * src.strides[2]];
      }
      rows = g;
      ld = rowb;
    }
    if (int4) {
      quant::place_block_nibbles(f, rows, ld, K, blk);
    } else {
      quant::place_block(f, reinterpret_cast<const int8_t*>(rows), ld, K, blk);
    }
    for (int j = 0; j < kBlockN; ++j) {
      const int64_t n = b * kBlockN + j;
      float* srow = sc + j * f.ngroups;
      std::fill(srow, srow + f.ngroups, 0.0f);
      if (n >= N) continue;
      const int64_t sbase = e * ssrc.strides[0] + (row_off + n) * ssrc.strides[1];
      for (int64_t g = 0; g < ng; ++g) {
        srow[g] = quant::flush_scale(
            ssrc.ptr<const float>()[sbase + (int4 ? (c0 / G + g) * ssrc.strides[2] : 0)]);
      }
    }
  };
  for_each_weight_block([&](int64_t e, int64_t b, int s, int th) {
    Slice& sl = *sl_[static_cast<size_t>(s)];
    if (b < 2 * nbI_) {
      const int64_t q = b / 2;
      const bool is_up = (b % 2) == 1;
      const int64_t gb = e * 2 * sl.nb + (b - 2 * sl.b0);
      uint8_t* dst = sl.wgu.as<uint8_t>() + gb * quant::block_bytes(fgu_);
      float* sc = sl.sgu.as<float>() + gb * kBlockN * fgu_.ngroups;
      if (fused) {
        copy_block(gate_up, gate_up_scale, fgu_, e, is_up ? I_ : 0, 0, I_, H_, q, dst, sc, th);
      } else {
        copy_block(is_up ? up : gate, is_up ? up_scale : gate_scale, fgu_, e, 0, 0, I_, H_, q, dst,
                   sc, th);
      }
    } else {
      const int64_t blk = (b - 2 * nbI_) % nbH_;
      const int64_t gb = e * nbH_ + blk;
      copy_block(down, down_scale, sl.fd, e, 0, kBlockN * sl.b0, H_, sl.width, blk,
                 sl.wd.as<uint8_t>() + gb * quant::block_bytes(sl.fd),
                 sl.sd.as<float>() + gb * kBlockN * sl.fd.ngroups, th);
    }
  });
  clock.mark("copy_codes");
  clock.total();
}

const bf16* MoEEngine::gu_blocks(int s, int64_t e, int64_t b0, int64_t nblk, int th,
                                 int slot) const {
  const Slice& sl = *sl_[static_cast<size_t>(s)];
  const int64_t gb = e * 2 * sl.nb + b0 - 2 * sl.b0;  // b0: global gate/up block
  if (wkind_ == quant::Kind::bf16) return sl.wgu.as<bf16>() + gb * kBlockN * KpH_;
  bf16* d = local_buf<bf16>(th, slot, nblk * kBlockN * KpH_);
  quant::dequant_blocks(*qk_, fgu_, sl.wgu.as<uint8_t>() + gb * quant::block_bytes(fgu_),
                        sl.sgu.as<float>() + gb * kBlockN * fgu_.ngroups, nblk, d);
  return d;
}

const bf16* MoEEngine::d_blocks(int s, int64_t e, int64_t b0, int64_t nblk, int th,
                                int slot) const {
  const Slice& sl = *sl_[static_cast<size_t>(s)];
  const int64_t gb = e * nbH_ + b0;
  if (wkind_ == quant::Kind::bf16) return sl.wd.as<bf16>() + gb * kBlockN * sl.KpI;
  bf16* d = local_buf<bf16>(th, slot, nblk * kBlockN * sl.KpI);
  quant::dequant_blocks(*qk_, sl.fd, sl.wd.as<uint8_t>() + gb * quant::block_bytes(sl.fd),
                        sl.sd.as<float>() + gb * kBlockN * sl.fd.ngroups, nblk, d);
  return d;
}

void MoEEngine::gemm_weights(Proj w, int s, int64_t e, int64_t b0, int64_t nblk, int64_t M,
                             const bf16* A, int64_t lda, float* C, int64_t ldc, bool accumulate,
                             int th, int slot) const {
  const Slice& sl = *sl_[static_cast<size_t>(s)];
  const bool gu = w == Proj::gate_up;
  const quant::Format& f = gu ? fgu_ : sl.fd;
  const bool coded = wkind_ == quant::Kind::int8 || wkind_ == quant::Kind::int4;
  if (!coded || M > fused_rows_) {  // bf16, or W8A8 blocks (their own layout), or many rows
    const bf16* B = gu ? gu_blocks(s, e, b0, nblk, th, slot) : d_blocks(s, e, b0, nblk, th, slot);
    k_.gemm_bf16(M, nblk, gu ? KpH_ : sl.KpI, A, lda, B, C, ldc, accumulate);
    return;
  }
  const int64_t gb = gu ? e * 2 * sl.nb + b0 - 2 * sl.b0 : e * nbH_ + b0;
  const uint8_t* codes = (gu ? sl.wgu : sl.wd).as<uint8_t>() + gb * quant::block_bytes(f);
  const float* sc = (gu ? sl.sgu : sl.sd).as<float>() + gb * kBlockN * f.ngroups;
  if (wkind_ == quant::Kind::int8) {
    k_.gemm_q8(M, nblk, f.Kp, A, lda, reinterpret_cast<const int8_t*>(codes), sc, C, ldc,
               accumulate);
  } else {
    k_.gemm_q4(M, nblk, f.Kp, f.group, A, lda, codes, sc, C, ldc, accumulate);
  }
}

void MoEEngine::gu_transposed(int s, int64_t e, int64_t k0, int64_t nblk, bf16* dst, int th) const {
  const Slice& sl = *sl_[static_cast<size_t>(s)];
  const int64_t gb = e * 2 * sl.nb;
  const int64_t N = 2 * kBlockN * sl.nb;
  if (wkind_ == quant::Kind::bf16) {
    k_.pack_transposed(sl.wgu.as<bf16>() + gb * kBlockN * KpH_, N, KpH_, k0, nblk, dst);
    return;
  }
  // Dequantize only the depth range the transpose reads, then the ISA's pack_transposed.
  const int64_t Kw = kernels::round_up(kBlockN * nblk, kernels::kPackK);
  const int64_t kp0 = k0 / 2, kp1 = std::min(fgu_.Kp / 2, kp0 + Kw / 2);
  bf16* tmp = local_buf<bf16>(th, kL9, 2 * sl.nb * kBlockN * Kw);
  quant::dequant_range(*qk_, fgu_, sl.wgu.as<uint8_t>() + gb * quant::block_bytes(fgu_),
                       sl.sgu.as<float>() + gb * kBlockN * fgu_.ngroups, 2 * sl.nb, kp0, kp1, tmp,
                       Kw);
  k_.pack_transposed(tmp, N, Kw, 0, nblk, dst);
}

void MoEEngine::d_transposed(int s, int64_t e, int64_t k0, int64_t nblk, bf16* dst, int th) const {
  const Slice& sl = *sl_[static_cast<size_t>(s)];
  const int64_t gb = e * nbH_;
  if (wkind_ == quant::Kind::bf16) {
    k_.pack_transposed(sl.wd.as<bf16>() + gb * kBlockN * sl.KpI, H_, sl.KpI, k0, nblk, dst);
    return;
  }
  const int64_t Kw = kernels::round_up(kBlockN * nblk, kernels::kPackK);
  const int64_t kp0 = k0 / 2, kp1 = std::min(sl.fd.Kp / 2, kp0 + Kw / 2);
  bf16* tmp = local_buf<bf16>(th, kL9, nbH_ * kBlockN * Kw);
  quant::dequant_range(*qk_, sl.fd, sl.wd.as<uint8_t>() + gb * quant::block_bytes(sl.fd),
                       sl.sd.as<float>() + gb * kBlockN * sl.fd.ngroups, nbH_, kp0, kp1, tmp, Kw);
  k_.pack_transposed(tmp, H_, Kw, 0, nblk, dst);
}

// ---- LoRA --------------------------------------------------------------------------------------

void MoEEngine::set_lora(const LoraArrays& a) {
  if (r_ == 0) {
    throw StateError(
        "set_lora: this engine has lora_rank=0 (no LoRA); create it with "
        "lora_rank > 0 to bind LoRA weights");
  }
  const std::vector<DType> fl = {DType::f32, DType::bf16};
  const std::vector<DType> f32 = {DType::f32};
  const bool fused = cfg_.lora_fused;
  auto forbid = [&](const View& v, const char* name) {
    if (v.present) {
      throw ValueError(std::string("set_lora: ") + name + " is for lora_layout='" +
                       (fused ? "split" : "fused") + "', but this engine uses lora_layout='" +
                       (fused ? "fused" : "split") + "'");
    }
  };
  const char* rh = "(num_experts, lora_rank, hidden_size)";
  const char* ri = "(num_experts, lora_rank, intermediate_size)";
  const char* ir = "(num_experts, intermediate_size, lora_rank)";
  const char* i2r = "(num_experts, 2 * intermediate_size, lora_rank)";
  const char* hr = "(num_experts, hidden_size, lora_rank)";
  // Gradients: all or none.
  const View* grads_fused[] = {&a.ga_gu, &a.gb_gu, &a.ga_d, &a.gb_d};
  const View* grads_split[] = {&a.ga_g, &a.ga_u, &a.gb_g, &a.gb_u, &a.ga_d, &a.gb_d};
  int given = 0, total = 0;
  if (fused) {
    for (const View* g : grads_fused) given += g->present, ++total;
  } else {
    for (const View* g : grads_split) given += g->present, ++total;
  }
  if (given != 0 && given != total) {
    throw ValueError(fused ? "set_lora: pass all of grad_a_gate_up, grad_b_gate_up, grad_a_down, "
                             "grad_b_down, or none of them"
                           : "set_lora: pass all of grad_a_gate, grad_a_up, grad_b_gate, "
                             "grad_b_up, grad_a_down, grad_b_down, or none of them");
  }
  const bool grads = given == total;
  if (fused) {
    forbid(a.a_g, "a_gate");
    forbid(a.a_u, "a_up");
    forbid(a.b_g, "b_gate");
    forbid(a.b_u, "b_up");
    forbid(a.ga_g, "grad_a_gate");
    forbid(a.ga_u, "grad_a_up");
    forbid(a.gb_g, "grad_b_gate");
    forbid(a.gb_u, "grad_b_up");
    check(a.a_gu, {"a_gate_up", fl, {E_, r_, H_}, rh});
    check(a.b_gu, {"b_gate_up", fl, {E_, 2 * I_, r_}, i2r});
    if (grads) {
      check(a.ga_gu, {"grad_a_gate_up", f32, {E_, r_, H_}, rh, true});
      check(a.gb_gu, {"grad_b_gate_up", f32, {E_, 2 * I_, r_}, i2r, true});
    }
  } else {
    forbid(a.a_gu, "a_gate_up");
    forbid(a.b_gu, "b_gate_up");
    forbid(a.ga_gu, "grad_a_gate_up");
    forbid(a.gb_gu, "grad_b_gate_up");
    check(a.a_g, {"a_gate", fl, {E_, r_, H_}, rh});
    check(a.a_u, {"a_up", fl, {E_, r_, H_}, rh});
    check(a.b_g, {"b_gate", fl, {E_, I_, r_}, ir});
    check(a.b_u, {"b_up", fl, {E_, I_, r_}, ir});
    if (grads) {
      check(a.ga_g, {"grad_a_gate", f32, {E_, r_, H_}, rh, true});
      check(a.ga_u, {"grad_a_up", f32, {E_, r_, H_}, rh, true});
      check(a.gb_g, {"grad_b_gate", f32, {E_, I_, r_}, ir, true});
      check(a.gb_u, {"grad_b_up", f32, {E_, I_, r_}, ir, true});
    }
  }
  check(a.a_d, {"a_down", fl, {E_, r_, I_}, ri});
  check(a.b_d, {"b_down", fl, {E_, H_, r_}, hr});
  if (grads) {
    check(a.ga_d, {"grad_a_down", f32, {E_, r_, I_}, ri, true});
    check(a.gb_d, {"grad_b_down", f32, {E_, H_, r_}, hr, true});
  }
  lora_ = a;
  lora_grads_ = grads;
  lora_bound_ = true;
  lora_updated();
}

void MoEEngine::lora_updated() {
  if (!lora_bound_)
    throw StateError("lora_updated: no LoRA weights are bound; call set_lora first");
  std::lock_guard<std::mutex> lock(engine_mutex());
  lora_version_ = LoraStage::new_version();
}

void MoEEngine::stage_lora() {
  const int64_t RA = RA_;
  const int64_t n_a = E_ * RA * Hb_, n_bgu = E_ * RA * 2 * Ib_, n_ad = E_ * r_ * Ib_;
  const int64_t n_bd = E_ * r_ * Hb_;
  LoraStage& stage = LoraStage::instance();
  bool fresh = false;
  float* base =
      stage.acquire(id_, lora_version_, static_cast<size_t>(n_a + n_bgu + n_ad + n_bd), &fresh);
  a_all_ = base;
  bgu_t_ = base + n_a;
  ad_ = base + n_a + n_bgu;
  bd_t_ = base + n_a + n_bgu + n_ad;
  if (!fresh) {
    convert_lora(base, base + n_a, base + n_a + n_bgu, base + n_a + n_bgu + n_ad);
    stage.mark(id_, lora_version_);
  }
}

void MoEEngine::convert_lora(float* a_all, float* bgu_t, float* ad, float* bd_t) const {
  const int64_t r = r_, RA = RA_;
  const bool fused = cfg_.lora_fused;
  const LoraArrays& L = lora_;
  auto at3 = [](const View& v, int64_t i, int64_t j, int64_t k) {
    return load_f(v, i * v.strides[0] + j * v.strides[1] + k * v.strides[2]);
  };
  parallel_for(E_, threads_, [&](int64_t e, int) {
    float* A = a_all + e * RA * Hb_;
    float* Bt = bgu_t + e * RA * 2 * Ib_;
    float* Ad = ad + e * r * Ib_;
    float* Bdt = bd_t + e * r * Hb_;
    std::memset(A, 0, static_cast<size_t>(RA * Hb_) * sizeof(float));
    std::memset(Bt, 0, static_cast<size_t>(RA * 2 * Ib_) * sizeof(float));
    std::memset(Ad, 0, static_cast<size_t>(r * Ib_) * sizeof(float));
    std::memset(Bdt, 0, static_cast<size_t>(r * Hb_) * sizeof(float));
    for (int64_t q = 0; q < r; ++q) {
      for (int64_t h = 0; h < H_; ++h) {
        if (fused) {
          A[q * Hb_ + h] = at3(L.a_gu, e, q, h);
        } else {
          A[q * Hb_ + h] = at3(L.a_g, e, q, h);
          A[(r + q) * Hb_ + h] = at3(L.a_u, e, q, h);
        }
      }
      for (int64_t i = 0; i < I_; ++i) Ad[q * Ib_ + i] = at3(L.a_d, e, q, i);
      for (int64_t h = 0; h < H_; ++h) Bdt[q * Hb_ + h] = at3(L.b_d, e, h, q);
    }
    const int64_t ld = 2 * Ib_;
    for (int64_t o = 0; o < I_; ++o) {
      const int64_t cg = 32 * (o / 16) + o % 16;  // column of gate row o; up row o is at cg + 16
      for (int64_t q = 0; q < r; ++q) {
        if (fused) {
          Bt[q * ld + cg] = at3(L.b_gu, e, o, q);
          Bt[q * ld + cg + 16] = at3(L.b_gu, e, I_ + o, q);
        } else {
          Bt[q * ld + cg] = at3(L.b_g, e, o, q);
          Bt[(r + q) * ld + cg + 16] = at3(L.b_u, e, o, q);
        }
      }
    }
  });
}

void MoEEngine::check_lora_ready(const char* what) const {
  if (r_ > 0 && !lora_bound_) {
    throw StateError(
        std::string(what) + ": LoRA weights are not set (lora_rank=" + std::to_string(r_) +
        "); call set_lora(...) first, or create the engine " + "with lora_rank=0 for no LoRA");
  }
}

// ---- forward -----------------------------------------------------------------------------------

void MoEEngine::check_forward(const View& x, const View& ids, const View& w, const View& out,
                              bool save) const {
  if (!weights_loaded()) throw StateError("forward: no weights loaded; call load_weights first");
  check_lora_ready("forward");
  const std::vector<DType> fl = {DType::f32, DType::bf16};
  check(x, {"x", fl, {-1, H_}, "(T, hidden_size)", false, true});
  const int64_t T = x.shape[0];
  check(ids, {"expert_ids", {DType::i64, DType::i32}, {T, K_}, "(T, top_k)"});
  check(w, {"routing_weights", fl, {T, K_}, "(T, top_k)"});
  check(out, {"out", fl, {T, H_}, "(T, hidden_size)", true, true});
  limits::check_tokens(T, K_, std::max({KpH_, KpI_, 2 * Ib_}), "x: T (tokens)");
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < K_; ++j) {
      const int64_t id = load_i(ids, t * ids.strides[0] + j * ids.strides[1]);
      if (id < -1 || id >= E_) {
        throw ValueError("expert_ids: expected values in [-1, " + std::to_string(E_) +
                         ") (-1 = no expert), got " + std::to_string(id) + " at [" +
                         std::to_string(t) + ", " + std::to_string(j) + "]");
      }
    }
  }
  if (save && pending_ >= static_cast<size_t>(cfg_.max_cache_depth)) {
    throw StateError("forward: the activation cache is full (max_cache_depth=" +
                     std::to_string(cfg_.max_cache_depth) + " forwards pending); run backward " +
                     "first, call clear_cache(), pass save_for_backward=False, or create the " +
                     "engine with a larger max_cache_depth");
  }
}

void MoEEngine::forward(const View& x, const View& ids, const View& w, const View& out, bool save) {
  check_forward(x, ids, w, out, save);
  std::lock_guard<std::mutex> lock(engine_mutex());
  // A forward without save_for_backward borrows a transient entry: its buffers go back to the
  // pool when it returns.
  Entry transient;
  Entry* entry = &transient;
  if (save) {
    if (cache_.size() <= pending_) cache_.push_back(std::make_unique<Entry>());
    entry = cache_[pending_].get();
  }
  entry->has_gu = save && !recompute_;
  Ctx c;
  c.x = x;
  c.ids = ids;
  c.w = w;
  c.out = out;
  c.entry = entry;
  c.lora = r_ > 0;
  try {
    run_forward(c);
  } catch (...) {
    entry->release();
    throw;
  }
  if (save) {
    ++pending_;
    note_cache_bytes();
  }
}

void MoEEngine::note_cache_bytes() {
  size_t bytes = 0;
  for (size_t i = 0; i < pending_; ++i) bytes += cache_[i]->bytes();
  cache_peak_ = std::max(cache_peak_, bytes);
}

void MoEEngine::set_activation_policy(const std::string& policy) {
  if (policy != "retain" && policy != "recompute") {
    throw ValueError("activation_policy: expected 'retain' or 'recompute', got '" + policy + "'");
  }
  cfg_.activation_policy = policy;
  recompute_ = policy == "recompute";
}

void MoEEngine::trim_memory() {
  std::lock_guard<std::mutex> lock(engine_mutex());
  Scratch::instance().release();
  ActivationPool::instance().trim();
  LoraStage::instance().release();
}

void MoEEngine::run_forward(Ctx& c) {
  PhaseClock clock(timings_, "forward.", id_, c.x.shape[0], &prof_);
  if (r_ > 0) stage_lora();  // timed and traced as part of the first phase
  Entry& en = *c.entry;
  const int64_t T = c.x.shape[0];
  const int64_t E = E_, K = K_, H = H_, KpH = KpH_, KpI = KpI_, Ib = Ib_, Hb = Hb_, RA = RA_,
                r = r_;
  const int nt = threads_;
  Scratch& scratch = Scratch::instance();
  scratch.prepare_threads(std::max(nt, 1));
  const kernels::KernelTable& k = k_;
  const float s = scale_;

  // -- route: counting sort by expert, stable by (token, slot).
  en.T = T;
  en.offsets.assign(static_cast<size_t>(E + 1), 0);
  en.pos.resize(static_cast<size_t>(T * K));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < K; ++j) {
      const int64_t id = load_i(c.ids, t * c.ids.strides[0] + j * c.ids.strides[1]);
      if (id >= 0) ++en.offsets[static_cast<size_t>(id + 1)];
    }
  }
  for (int64_t e = 0; e < E; ++e)
    en.offsets[static_cast<size_t>(e + 1)] += en.offsets[static_cast<size_t>(e)];
  const int64_t S = en.offsets[static_cast<size_t>(E)];
  en.S = S;
  en.slot_tok.resize(static_cast<size_t>(S));
  en.slot_w.resize(static_cast<size_t>(S));
  {
    std::vector<int64_t> cursor(en.offsets.begin(), en.offsets.end() - 1);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < K; ++j) {
        const int64_t id = load_i(c.ids, t * c.ids.strides[0] + j * c.ids.strides[1]);
        if (id < 0) {
          en.pos[static_cast<size_t>(t * K + j)] = -1;
          continue;
        }
        const int64_t p = cursor[static_cast<size_t>(id)]++;
        en.pos[static_cast<size_t>(t * K + j)] = static_cast<int32_t>(p);
        en.slot_tok[static_cast<size_t>(p)] = static_cast<int32_t>(t);
        en.slot_w[static_cast<size_t>(p)] = load_f(c.w, t * c.w.strides[0] + j * c.w.strides[1]);
      }
    }
  }
  const int64_t* off = en.offsets.data();
  const int32_t* slot_tok = en.slot_tok.data();
  // Cache and scratch buffers hold the T tokens and S routed rows of this call. Sg (the rows
  // max_tokens would route) only sets the column groups of the down phase, as it always has.
  const int64_t Sg = std::max(S, std::max(T, cfg_.max_tokens) * K);
  clock.mark("route");

  // -- convert: x rows to bf16, zero padded to KpH.
  const bool keep = en.has_gu;  // retain: the entry keeps x, x A^T, [g | u], h Ad^T
  bf16* xb = keep ? en.xb.get<bf16>(T * KpH) : shared_buf<bf16>(kSlotX, T * KpH);
  rows_to_bf16(c.x, T, H, KpH, xb, nt, k);
  clock.mark("convert");

  // -- W8A8: x rows to int8 codes per token, then into expert order (engine/w8a8.h).
  const bool w8a8 = wkind_ == quant::Kind::w8a8;
  const int64_t ldxq = fgu_.Kp, ldhq = w8a8 ? w8a8_h_stride() : 0;
  int8_t* xq = nullptr;
  float *sxq = nullptr, *shq = nullptr;
  if (w8a8) {
    int8_t* xq_tok = shared_buf<int8_t>(kSlotQTok, T * ldxq);
    float* sx_tok = shared_buf<float>(kSlotQScales, T + 2 * S);
    sxq = sx_tok + T;
    shq = sxq + S;
    xq = shared_buf<int8_t>(kSlotQRows, S * std::max(ldxq, ldhq));
    w8a8::quantize_rows(T, xb, KpH, H, xq_tok, ldxq, sx_tok, nt);
    w8a8::gather_rows(S, slot_tok, xq_tok, sx_tok, ldxq, xq, sxq, nt);
    clock.mark("quantize_x");
  }

  // -- gather rows into expert order; LoRA x A^T.
  bf16* xg = shared_buf<bf16>(kSlotRows, S * KpH);
  float* xa_scratch = (c.lora && !keep) ? shared_buf<float>(kSlotXA, S * (RA + r)) : nullptr;
  float* xa = !c.lora ? nullptr : keep ? en.xa.get<float>(S * RA) : xa_scratch;
  gather_phase(off, slot_tok, xb, xg, xa);
  clock.mark("gather");

  // -- gate_up tiles: [g | u] per block pair, activation, h as bf16 (kept in the cache entry, or
  // in scratch when backward will recompute it).
  bf16* hb = shared_buf<bf16>(kSlotH, S * std::max(KpI, 2 * Ib));
  float* gu = en.has_gu ? en.gu.get<float>(S * 2 * Ib) : nullptr;
  gate_up_phase(off, xg, xq, sxq, xa, c.lora, gu, hb);
  clock.mark("gate_up");

  // -- W8A8: h rows to int8 codes, one scale per row over all of I (into x codes' buffer).
  int8_t* hq = xq;
  if (w8a8) {
    w8a8::quantize_rows(S, hb, KpI, I_, hq, ldhq, shq, nt);
    clock.mark("quantize_h");
  }

  // -- LoRA h Ad^T.
  float* had = !c.lora ? nullptr : keep ? en.had.get<float>(S * r) : xa_scratch + S * RA;
  if (c.lora) {
    lora_down_phase(off, hb, had);
    clock.mark("lora_down_a");
  }

  // -- down tiles (y per slot) and the per-token combine, per group of H columns. Tensor
  // parallel: slice s's tiles (on group s) write its partial y_s, tp buffers of S rows (the
  // column groups shrink so that they fit the same budget); the combine sums them.
  const size_t tp = sl_.size();
  const ColGroups cg = col_groups(Sg * static_cast<int64_t>(tp), nbH_, kBlocksDown);
  const int64_t ldy = cg.blocks * kBlockN, ypart = S * ldy;
  float* y = shared_buf<float>(kSlotY, static_cast<int64_t>(tp) * ypart);
  const int32_t* pos = en.pos.data();
  const float* slot_w = en.slot_w.data();
  std::vector<Tile> tiles;
  for (int64_t grp = 0; grp < cg.count; ++grp) {
    const int64_t blo = grp * cg.blocks, bhi = std::min(nbH_, blo + cg.blocks);
    tiles.clear();
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t m0 = off[e]; m0 < off[e + 1]; m0 += kRowsFwd) {
        for (int64_t b0 = blo; b0 < bhi; b0 += kBlocksDown) {
          tiles.push_back(
              {e, m0, std::min(off[e + 1], m0 + kRowsFwd), b0, std::min(bhi, b0 + kBlocksDown)});
        }
      }
    }
    // The same tiles for every slice: tile i of slice s computes slice s's partial.
    const std::vector<int64_t> counts(tp, static_cast<int64_t>(tiles.size()));
    run_slices(counts, [&](int si, int64_t i, int th) {
      const Tile& tl = tiles[static_cast<size_t>(i)];
      const Slice& sl = *sl_[static_cast<size_t>(si)];
      const int64_t M = tl.m1 - tl.m0, nb = tl.n1 - tl.n0;
      float* C = y + si * ypart + tl.m0 * ldy + kBlockN * (tl.n0 - blo);
      if (w8a8) {
        w8a8_down_tile(si, tl.e, tl.n0, nb, M, hq + tl.m0 * ldhq, ldhq, shq + tl.m0, C, ldy, th,
                       kL0);
      } else {
        gemm_weights(Proj::down, si, tl.e, tl.n0, nb, M, hb + tl.m0 * KpI + kBlockN * sl.b0, KpI, C,
                     ldy, false, th, kL0);
      }
      if (c.lora && si == 0) {  // the LoRA term once, in slice 0's partial
        k.gemm_f32_nn(M, kBlockN * nb, r, s, had + tl.m0 * r, r,
                      bd_t_ + tl.e * r * Hb + kBlockN * tl.n0, Hb, C, ldy, true);
      }
      if (si == 0 && !bias_d_.empty()) {
        add_bias(bias_d_, tl.e, Hb, kBlockN * tl.n0, kBlockN * nb, M, C, ldy);
      }
    });
    clock.mark("down");

    // Combine per token: the slices' partials in slice order, then the slots in order.
    const int64_t h0 = kBlockN * blo, width = std::min(H, kBlockN * bhi) - h0;
    combine_slots(T, K, pos, slot_w, y, ldy, static_cast<int64_t>(tp), ypart, h0, width, c.out, nt,
                  k);
    clock.mark("combine");
  }
  clock.total();
}

void MoEEngine::gate_up_phase(const int64_t* off, const bf16* xg, const int8_t* xq,
                              const float* sxq, const float* xa, bool lora, float* gu,
                              bf16* hb) const {
  const int64_t E = E_, KpH = KpH_, KpI = KpI_, Ib = Ib_, RA = RA_;
  const kernels::KernelTable& k = k_;
  const float s = scale_;
  const bool w8a8 = wkind_ == quant::Kind::w8a8;
  const int64_t ldxq = fgu_.Kp;
  // Column chunks never cross a tensor-parallel slice; slice s's tiles run on worker group s.
  const int64_t n_pairs = nbI_;
  const SliceTiles gu_tiles = slice_tiles(sl_, [&](int64_t pb, int64_t pe, std::vector<Tile>& out) {
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t m0 = off[e]; m0 < off[e + 1]; m0 += kRowsFwd) {
        for (int64_t p0 = pb; p0 < pe; p0 += kPairsFwd) {
          out.push_back(
              {e, m0, std::min(off[e + 1], m0 + kRowsFwd), p0, std::min(pe, p0 + kPairsFwd)});
        }
      }
    }
  });
  run_slices(gu_tiles.counts, [&](int si, int64_t i, int th) {
    const Tile& tl = gu_tiles.at(si, i);
    const int64_t M = tl.m1 - tl.m0, np = tl.n1 - tl.n0, ncols = 32 * np, nh = 16 * np;
    // In place in gu, or (no gu wanted) in a tile of the thread's scratch: the same values.
    float* C =
        gu != nullptr ? gu + tl.m0 * 2 * Ib + 32 * tl.n0 : local_buf<float>(th, kL3, M * ncols);
    const int64_t ldc = gu != nullptr ? 2 * Ib : ncols;
    if (w8a8) {
      w8a8_gate_up_tile(tl.e, tl.n0, np, M, xq + tl.m0 * ldxq, ldxq, sxq + tl.m0, C, ldc, th, kL2);
    } else {
      gemm_weights(Proj::gate_up, si, tl.e, 2 * tl.n0, 2 * np, M, xg + tl.m0 * KpH, KpH, C, ldc,
                   false, th, kL2);
    }
    if (lora) {
      k.gemm_f32_nn(M, ncols, RA, s, xa + tl.m0 * RA, RA, bgu_t_ + tl.e * RA * 2 * Ib + 32 * tl.n0,
                    2 * Ib, C, ldc, true);
    }
    if (!bias_gu_.empty()) add_bias(bias_gu_, tl.e, 2 * Ib, 32 * tl.n0, ncols, M, C, ldc);
    if (hb == nullptr) return;
    float* g = local_buf<float>(th, kL0, M * nh);
    float* u = local_buf<float>(th, kL1, M * nh);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t q = 0; q < np; ++q) {
        std::memcpy(g + m * nh + 16 * q, C + m * ldc + 32 * q, 16 * sizeof(float));
        std::memcpy(u + m * nh + 16 * q, C + m * ldc + 32 * q + 16, 16 * sizeof(float));
      }
    }
    activation::forward(act_, act_kernels_, k, M * nh, g, u, g);
    const bool last = tl.n1 == n_pairs;
    for (int64_t m = 0; m < M; ++m) {
      bf16* hrow = hb + (tl.m0 + m) * KpI;
      k.cvt_f32_bf16(nh, g + m * nh, hrow + 16 * tl.n0);
      if (last) std::memset(hrow + Ib, 0, static_cast<size_t>(KpI - Ib) * sizeof(bf16));
    }
  });
}

void MoEEngine::gather_phase(const int64_t* off, const int32_t* slot_tok, const bf16* xb, bf16* xg,
                             float* xa) const {
  const int64_t E = E_, H = H_, KpH = KpH_, Hb = Hb_, RA = RA_;
  const kernels::KernelTable& k = k_;
  std::vector<Tile> tiles;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t m0 = off[e]; m0 < off[e + 1]; m0 += kRowsGather) {
      tiles.push_back({e, m0, std::min(off[e + 1], m0 + kRowsGather), 0, 0});
    }
  }
  parallel_for(static_cast<int64_t>(tiles.size()), threads_, [&](int64_t i, int th) {
    const Tile& tl = tiles[static_cast<size_t>(i)];
    const int64_t M = tl.m1 - tl.m0;
    for (int64_t p = tl.m0; p < tl.m1; ++p) {
      std::memcpy(xg + p * KpH, xb + slot_tok[p] * KpH, static_cast<size_t>(KpH) * sizeof(bf16));
    }
    if (xa != nullptr) {
      float* xf = local_buf<float>(th, kL0, M * H);
      for (int64_t m = 0; m < M; ++m) k.cvt_bf16_f32(H, xg + (tl.m0 + m) * KpH, xf + m * H);
      k.gemm_f32_nt(M, RA, H, 1.0f, xf, H, a_all_ + tl.e * RA * Hb, Hb, xa + tl.m0 * RA, RA, false);
    }
  });
}

void MoEEngine::lora_down_phase(const int64_t* off, const bf16* hb, float* had) const {
  const int64_t E = E_, KpI = KpI_, Ib = Ib_, r = r_;
  const kernels::KernelTable& k = k_;
  std::vector<Tile> tiles;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t m0 = off[e]; m0 < off[e + 1]; m0 += kRowsGather) {
      tiles.push_back({e, m0, std::min(off[e + 1], m0 + kRowsGather), 0, 0});
    }
  }
  parallel_for(static_cast<int64_t>(tiles.size()), threads_, [&](int64_t i, int th) {
    const Tile& tl = tiles[static_cast<size_t>(i)];
    const int64_t M = tl.m1 - tl.m0;
    float* hf = local_buf<float>(th, kL0, M * Ib);
    for (int64_t m = 0; m < M; ++m) k.cvt_bf16_f32(Ib, hb + (tl.m0 + m) * KpI, hf + m * Ib);
    k.gemm_f32_nt(M, r, Ib, 1.0f, hf, Ib, ad_ + tl.e * r * Ib, Ib, had + tl.m0 * r, r, false);
  });
}

void MoEEngine::recompute_inputs(const Entry& en, const View& x, bool lora, Recomputed& out) const {
  const int64_t T = en.T, S = en.S, H = H_, KpH = KpH_, KpI = KpI_, Ib = Ib_, RA = RA_;
  const int nt = threads_;
  const int64_t* off = en.offsets.data();
  const int32_t* slot_tok = en.slot_tok.data();
  // The forward's phases on the forward's x, in the same tiles: the same bits.
  bf16* xb = shared_buf<bf16>(kSlotX, T * KpH);
  rows_to_bf16(x, T, H, KpH, xb, nt, k_);
  bf16* xg = shared_buf<bf16>(kSlotRows, S * KpH);
  float* xa = lora ? shared_buf<float>(kSlotXA, S * (RA + r_)) : nullptr;
  gather_phase(off, slot_tok, xb, xg, xa);
  int8_t* xq = nullptr;
  float* sxq = nullptr;
  if (wkind_ == quant::Kind::w8a8) {
    const int64_t ldxq = fgu_.Kp;
    int8_t* xq_tok = shared_buf<int8_t>(kSlotQTok, T * ldxq);
    float* sx_tok = shared_buf<float>(kSlotQScales, T + S);
    sxq = sx_tok + T;
    xq = shared_buf<int8_t>(kSlotQRows, S * ldxq);
    w8a8::quantize_rows(T, xb, KpH, H, xq_tok, ldxq, sx_tok, nt);
    w8a8::gather_rows(S, slot_tok, xq_tok, sx_tok, ldxq, xq, sxq, nt);
  }
  float* gu = shared_buf<float>(kSlotGU, S * 2 * Ib);
  bf16* hb = lora ? shared_buf<bf16>(kSlotH, S * std::max(KpI, 2 * Ib)) : nullptr;
  gate_up_phase(off, xg, xq, sxq, xa, lora, gu, hb);
  float* had = nullptr;
  if (lora) {
    had = xa + S * RA;
    lora_down_phase(off, hb, had);
  }
  out = {xb, xa, gu, had};
}

// ---- backward ----------------------------------------------------------------------------------

void MoEEngine::check_backward(const View& dout, const View& dx, const View& dw,
                               const View& x) const {
  if (pending_ == 0) {
    throw StateError(
        "backward: no forward is pending; run forward(..., save_for_backward=True) "
        "first (each backward consumes the most recent pending forward)");
  }
  const int64_t T = cache_[pending_ - 1]->T;
  const std::vector<DType> fl = {DType::f32, DType::bf16};
  check(dout, {"grad_out", fl, {T, H_}, "(T, hidden_size) of the pending forward", false, true});
  check(dx, {"grad_input", fl, {T, H_}, "(T, hidden_size) of the pending forward", true, true});
  check(dw, {"grad_routing_weights", fl, {T, K_}, "(T, top_k) of the pending forward", true});
  if (!cache_[pending_ - 1]->has_gu) {
    if (!x.present) {
      throw ValueError(
          "backward: the pending forward ran with activation_policy='recompute' and kept only "
          "its routing; pass its input again as x= (the same (T, hidden_size) values)");
    }
    check(x, {"x", fl, {T, H_}, "(T, hidden_size): the pending forward's input", false, true});
  }
}

void MoEEngine::backward(const View& dout, const View& dx, const View& dw, const View& x) {
  check_backward(dout, dx, dw, x);
  std::lock_guard<std::mutex> lock(engine_mutex());
  Ctx c;
  c.dout = dout;
  c.dx = dx;
  c.dw = dw;
  c.x_again = x;
  c.entry = cache_[pending_ - 1].get();
  c.lora = r_ > 0;
  c.grads = c.lora && lora_grads_;
  --pending_;  // popped whether or not the run succeeds: a failed backward cannot be retried
  try {
    run_backward(c);
  } catch (...) {
    c.entry->release();
    throw;
  }
  c.entry->release();  // its memory goes back to the pool for the next forward of any layer
}

void MoEEngine::clear_cache() {
  std::lock_guard<std::mutex> lock(engine_mutex());
  for (auto& entry : cache_) entry->release();
  pending_ = 0;
}

void MoEEngine::run_backward(Ctx& c) {
  PhaseClock clock(timings_, "backward.", id_, c.entry->T, &prof_);
  if (r_ > 0) stage_lora();  // timed and traced as part of the first phase
  Entry& en = *c.entry;
  const int64_t T = en.T, S = en.S;
  const int64_t E = E_, K = K_, H = H_, I = I_, KpH = KpH_, Ib = Ib_, Hb = Hb_, RA = RA_, r = r_;
  const int nt = threads_;
  Scratch& scratch = Scratch::instance();
  scratch.prepare_threads(std::max(nt, 1));
  const kernels::KernelTable& k = k_;
  const float s = scale_;
  const int64_t* off = en.offsets.data();
  const int32_t* slot_tok = en.slot_tok.data();
  const float* slot_w = en.slot_w.data();
  const int32_t* pos = en.pos.data();
  const bool lora = c.lora, grads = c.grads;
  // Column groups of the dx phase as max_tokens has always set them (Sg); buffers hold S rows.
  const int64_t Sg = std::max(S, std::max(T, cfg_.max_tokens) * K);

  // -- recompute: [g | u] of a forward that did not keep it, into scratch.
  Recomputed in;
  if (en.has_gu) {
    in = {en.xb.data<bf16>(), lora ? en.xa.data<float>() : nullptr, en.gu.data<float>(),
          lora ? en.had.data<float>() : nullptr};
  } else {
    recompute_inputs(en, c.x_again, lora, in);
    clock.mark("recompute");
  }
  const float* gu = in.gu;

  // -- convert dout to bf16 per token, then gather into expert order; LoRA dY Bd.
  bf16* dtok = shared_buf<bf16>(kSlotTok, T * KpH);
  rows_to_bf16(c.dout, T, H, KpH, dtok, nt, k);
  clock.mark("convert");

  // I chunks of the down^T tiles: kPairsBwd blocks, never crossing a tensor-parallel slice.
  std::vector<std::pair<int64_t, int64_t>> ichunks;
  std::vector<int64_t> chunk_of(static_cast<size_t>(nbI_), 0);
  for (const auto& sl : sl_) {
    for (int64_t p0 = sl->b0; p0 < sl->b0 + sl->nb; p0 += kPairsBwd) {
      chunk_of[static_cast<size_t>(p0)] = static_cast<int64_t>(ichunks.size());
      ichunks.emplace_back(p0, std::min(sl->b0 + sl->nb, p0 + kPairsBwd));
    }
  }
  const int64_t n_ichunks = static_cast<int64_t>(ichunks.size());
  // Small per-slot buffers in one scratch slot.
  const int64_t n_dyb = lora ? S * r : 0;
  const int64_t n_dwp = S * n_ichunks;
  const int64_t n_gbp = lora ? S * n_ichunks * RA : 0;
  const int64_t n_gb = lora ? S * RA : 0;
  const bool dbias = !bias_d_.empty();
  const int64_t n_dwb = dbias ? S : 0;
  float* small = shared_buf<float>(kSlotSmall, n_dyb + n_dwp + n_gbp + n_gb + n_dwb + 16);
  float* dyb = small;              // S x r: dY Bd
  float* dwpart = dyb + n_dyb;     // S x n_ichunks
  float* gbpart = dwpart + n_dwp;  // S x n_ichunks x RA
  float* gbsum = gbpart + n_gbp;   // S x RA: dGU B
  float* dwb = gbsum + n_gb;       // S: dY . b_down[e] (down bias share of dw)

  std::vector<Tile> tiles;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t m0 = off[e]; m0 < off[e + 1]; m0 += kRowsGather) {
      tiles.push_back({e, m0, std::min(off[e + 1], m0 + kRowsGather), 0, 0});
    }
  }
  bf16* dyg = shared_buf<bf16>(kSlotRows, S * KpH);
  parallel_for(static_cast<int64_t>(tiles.size()), nt, [&](int64_t i, int th) {
    const Tile& tl = tiles[static_cast<size_t>(i)];
    const int64_t M = tl.m1 - tl.m0;
    for (int64_t p = tl.m0; p < tl.m1; ++p) {
      std::memcpy(dyg + p * KpH, dtok + slot_tok[p] * KpH, static_cast<size_t>(KpH) * sizeof(bf16));
    }
    if (dbias) down_bias_dw(tl.e, M, dyg + tl.m0 * KpH, KpH, dwb + tl.m0);
    if (lora) {
      float* yf = local_buf<float>(th, kL0, M * H);
      for (int64_t m = 0; m < M; ++m) k.cvt_bf16_f32(H, dyg + (tl.m0 + m) * KpH, yf + m * H);
      k.gemm_f32_nt(M, r, H, 1.0f, yf, H, bd_t_ + tl.e * r * Hb, Hb, dyb + tl.m0 * r, r, false);
    }
  });
  clock.mark("gather");

  // -- down^T tiles (expert, I chunk): D, dw partials, dg/du, LoRA down-A and gate_up-B grads.
  // A chunk belongs to one slice: slice s's tiles run on worker group s.
  const size_t tp = sl_.size();
  const SliceTiles dt_tiles = slice_tiles(sl_, [&](int64_t pb, int64_t pe, std::vector<Tile>& out) {
    for (int64_t e = 0; e < E; ++e) {
      if (off[e + 1] == off[e]) continue;
      for (const auto& ch : ichunks) {
        if (ch.first >= pb && ch.first < pe) {
          out.push_back({e, off[e], off[e + 1], ch.first, ch.second});
        }
      }
    }
  });
  bf16* dgu = shared_buf<bf16>(kSlotH, S * std::max(KpI_, 2 * Ib));
  const float* xa = in.xa;
  const int64_t wdt_elems = kPairsBwd * kernels::packed_block_elems(H);
  run_slices(dt_tiles.counts, [&](int sidx, int64_t ti, int th) {
    const Tile& tl = dt_tiles.at(sidx, ti);
    const int64_t np = tl.n1 - tl.n0, ni = 16 * np, i0 = 16 * tl.n0;
    const int64_t chunk = chunk_of[static_cast<size_t>(tl.n0)];
    bf16* wdt = local_buf<bf16>(th, kL0, wdt_elems);
    d_transposed(sidx, tl.e, i0 - kBlockN * sl_[static_cast<size_t>(sidx)]->b0, np, wdt, th);
    const int64_t rows_max = std::min(kRowsBwd, tl.m1 - tl.m0);
    float* D = local_buf<float>(th, kL1, rows_max * ni);
    float* G = local_buf<float>(th, kL2, rows_max * ni);
    float* U = local_buf<float>(th, kL3, rows_max * ni);
    float* Hh = local_buf<float>(th, kL4, rows_max * ni);
    float* dGU = local_buf<float>(th, kL5, rows_max * 2 * ni);  // interleaved like the cache
    float* wdy = local_buf<float>(th, kL6, rows_max * std::max<int64_t>(r, 1));
    float* acc_ad = grads ? local_buf<float>(th, kL7, r * ni) : nullptr;
    float* acc_bgu = grads ? local_buf<float>(th, kL8, RA * 2 * ni) : nullptr;
    if (grads) {
      std::fill(acc_ad, acc_ad + r * ni, 0.0f);
      std::fill(acc_bgu, acc_bgu + RA * 2 * ni, 0.0f);
    }
    for (int64_t m0 = tl.m0; m0 < tl.m1; m0 += kRowsBwd) {
      const int64_t M = std::min(kRowsBwd, tl.m1 - m0);
      k.gemm_bf16(M, np, KpH, dyg + m0 * KpH, KpH, wdt, D, ni, false);
      if (lora) {
        k.gemm_f32_nn(M, ni, r, s, dyb + m0 * r, r, ad_ + tl.e * r * Ib + i0, Ib, D, ni, true);
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* row = gu + (m0 + m) * 2 * Ib + 32 * tl.n0;
        for (int64_t q = 0; q < np; ++q) {
          std::memcpy(G + m * ni + 16 * q, row + 32 * q, 16 * sizeof(float));
          std::memcpy(U + m * ni + 16 * q, row + 32 * q + 16, 16 * sizeof(float));
        }
      }
      // h exactly as forward fed it to the down projection (rounded to bf16).
      activation::forward(act_, act_kernels_, k, M * ni, G, U, Hh);
      for (int64_t m = 0; m < M; ++m) {
        float* hr = Hh + m * ni;
        for (int64_t c2 = 0; c2 < ni; ++c2)
          hr[c2] = kernels::bf16_to_f32(kernels::f32_to_bf16(hr[c2]));
      }
      // dw partial = <D, h> over this chunk; then dh = w D (into D).
      for (int64_t m = 0; m < M; ++m) {
        const float* d = D + m * ni;
        const float* hr = Hh + m * ni;
        float acc = 0.0f;
        for (int64_t c2 = 0; c2 < ni; ++c2) acc += d[c2] * hr[c2];
        dwpart[(m0 + m) * n_ichunks + chunk] = acc;
        const float wv = slot_w[m0 + m];
        float* dm = D + m * ni;
        for (int64_t c2 = 0; c2 < ni; ++c2) dm[c2] *= wv;
      }
      for (int64_t m = 0; m < M; ++m) {
        float* dg = dGU + m * 2 * ni;
        for (int64_t q = 0; q < np; ++q) {
          // Per 16 columns: gate into [32q, 32q + 16), up into [32q + 16, 32q + 32).
          activation::backward(act_, act_kernels_, k, 16, G + m * ni + 16 * q, U + m * ni + 16 * q,
                               D + m * ni + 16 * q, dg + 32 * q, dg + 32 * q + 16);
        }
        bf16* out = dgu + (m0 + m) * 2 * Ib + 32 * tl.n0;
        k.cvt_f32_bf16(2 * ni, dg, out);
      }
      if (lora) {
        // (dGU B) partial for this chunk: dGU (M x 2ni) . Bgu^T[:, chunk]^T -> M x RA.
        for (int64_t m = 0; m < M; ++m) {
          k.gemm_f32_nt(1, RA, 2 * ni, 1.0f, dGU + m * 2 * ni, 2 * ni,
                        bgu_t_ + tl.e * RA * 2 * Ib + 32 * tl.n0, 2 * Ib,
                        gbpart + ((m0 + m) * n_ichunks + chunk) * RA, RA, false);
        }
      }
      if (grads) {
        // dAd[:, chunk] += s * (w dYB)^T h ; dBgu^T[:, chunk] += s * xa^T dGU.
        for (int64_t m = 0; m < M; ++m) {
          const float wv = slot_w[m0 + m];
          for (int64_t q = 0; q < r; ++q) wdy[m * r + q] = wv * dyb[(m0 + m) * r + q];
        }
        k.gemm_f32_tn(r, ni, M, s, wdy, r, Hh, ni, acc_ad, ni, true);
        k.gemm_f32_tn(RA, 2 * ni, M, s, xa + m0 * RA, RA, dGU, 2 * ni, acc_bgu, 2 * ni, true);
      }
    }
    if (grads) {
      const LoraArrays& L = lora_;
      const int64_t e = tl.e;
      const int64_t ilim = std::min(ni, I - i0);
      for (int64_t q = 0; q < r; ++q) {
        for (int64_t c2 = 0; c2 < ilim; ++c2) {
          L.ga_d.ptr<float>()[e * L.ga_d.strides[0] + q * L.ga_d.strides[1] +
                              (i0 + c2) * L.ga_d.strides[2]] += acc_ad[q * ni + c2];
        }
      }
      for (int64_t q = 0; q < np; ++q) {
        for (int64_t l = 0; l < 16; ++l) {
          const int64_t o = i0 + 16 * q + l;
          if (o >= I) break;
          const int64_t cg = 32 * q + l, cu = cg + 16;
          for (int64_t rr = 0; rr < r; ++rr) {
            if (cfg_.lora_fused) {
              const View& g = L.gb_gu;
              g.ptr<float>()[e * g.strides[0] + o * g.strides[1] + rr * g.strides[2]] +=
                  acc_bgu[rr * 2 * ni + cg];
              g.ptr<float>()[e * g.strides[0] + (I + o) * g.strides[1] + rr * g.strides[2]] +=
                  acc_bgu[rr * 2 * ni + cu];
            } else {
              const View& gg = L.gb_g;
              const View& gv = L.gb_u;
              gg.ptr<float>()[e * gg.strides[0] + o * gg.strides[1] + rr * gg.strides[2]] +=
                  acc_bgu[rr * 2 * ni + cg];
              gv.ptr<float>()[e * gv.strides[0] + o * gv.strides[1] + rr * gv.strides[2]] +=
                  acc_bgu[(r + rr) * 2 * ni + cu];
            }
          }
        }
      }
    }
  });
  clock.mark("down_t");

  // -- per token: dw = sum of partials in chunk order; (dGU B) summed in chunk order.
  parallel_for(ceil_div(T, kTokensCombine), nt, [&](int64_t task, int) {
    for (int64_t t = task * kTokensCombine; t < std::min(T, (task + 1) * kTokensCombine); ++t) {
      for (int64_t j = 0; j < K; ++j) {
        const int32_t p = pos[t * K + j];
        float v = 0.0f;
        if (p >= 0) {
          for (int64_t ch = 0; ch < n_ichunks; ++ch) v += dwpart[p * n_ichunks + ch];
          if (dbias) v += dwb[p];
          if (lora) {
            float* dst = gbsum + p * RA;
            std::fill(dst, dst + RA, 0.0f);
            for (int64_t ch = 0; ch < n_ichunks; ++ch) {
              const float* src = gbpart + (p * n_ichunks + ch) * RA;
              for (int64_t q = 0; q < RA; ++q) dst[q] += src[q];
            }
          }
        }
        store_f(c.dw, t * c.dw.strides[0] + j * c.dw.strides[1], v);
      }
    }
  });
  clock.mark("reduce");

  // -- gate_up^T tiles (expert, H chunk): dx per slot; LoRA A and down-B grads. Then the
  // per-token combine of dx. Both per group of H columns (see col_groups). Tensor parallel: tile
  // i of slice s (on group s) writes slice s's partial of dx (the product over its I columns);
  // slice 0's tile adds the LoRA A term and owns the tile's LoRA A / down-B gradients.
  const ColGroups cg = col_groups(Sg * static_cast<int64_t>(tp), nbH_, kBlocksBwdH);
  const int64_t ldx = cg.blocks * kBlockN, xpart = S * ldx;
  float* dxs = shared_buf<float>(kSlotY, static_cast<int64_t>(tp) * xpart);
  const bf16* xb = in.xb;
  const float* had = in.had;
  const int64_t Kgu = 2 * Ib;  // depth of the transposed gate_up (a multiple of 32)
  for (int64_t grp = 0; grp < cg.count; ++grp) {
    const int64_t blo = grp * cg.blocks, bhi = std::min(nbH_, blo + cg.blocks);
    tiles.clear();
    for (int64_t e = 0; e < E; ++e) {
      if (off[e + 1] == off[e]) continue;
      for (int64_t b0 = blo; b0 < bhi; b0 += kBlocksBwdH) {
        tiles.push_back({e, off[e], off[e + 1], b0, std::min(bhi, b0 + kBlocksBwdH)});
      }
    }
    const std::vector<int64_t> counts(tp, static_cast<int64_t>(tiles.size()));
    run_slices(counts, [&](int sidx, int64_t ti, int th) {
      const Tile& tl = tiles[static_cast<size_t>(ti)];
      const Slice& sl = *sl_[static_cast<size_t>(sidx)];
      const bool lora0 = lora && sidx == 0, grads0 = grads && sidx == 0;
      const int64_t nb = tl.n1 - tl.n0, nh = 16 * nb, h0 = 16 * tl.n0;
      const int64_t c0 = 2 * kBlockN * sl.b0, depth = 2 * kBlockN * sl.nb;  // slice's dGU columns
      bf16* wgt = local_buf<bf16>(th, kL0, nb * kernels::packed_block_elems(depth));
      gu_transposed(sidx, tl.e, h0, nb, wgt, th);
      const int64_t rows_max = std::min(kRowsBwd, tl.m1 - tl.m0);
      float* xf = local_buf<float>(th, kL1, rows_max * nh);
      float* yf = local_buf<float>(th, kL2, rows_max * nh);
      float* acc_a = grads0 ? local_buf<float>(th, kL3, RA * nh) : nullptr;
      float* acc_bd = grads0 ? local_buf<float>(th, kL4, r * nh) : nullptr;
      if (grads0) {
        std::fill(acc_a, acc_a + RA * nh, 0.0f);
        std::fill(acc_bd, acc_bd + r * nh, 0.0f);
      }
      for (int64_t m0 = tl.m0; m0 < tl.m1; m0 += kRowsBwd) {
        const int64_t M = std::min(kRowsBwd, tl.m1 - m0);
        float* C = dxs + sidx * xpart + m0 * ldx + (h0 - kBlockN * blo);
        k.gemm_bf16(M, nb, depth, dgu + m0 * Kgu + c0, Kgu, wgt, C, ldx, false);
        if (lora0) {
          k.gemm_f32_nn(M, nh, RA, s, gbsum + m0 * RA, RA, a_all_ + tl.e * RA * Hb + h0, Hb, C, ldx,
                        true);
        }
        if (grads0) {
          for (int64_t m = 0; m < M; ++m) {
            k.cvt_bf16_f32(nh, xb + slot_tok[m0 + m] * KpH + h0, xf + m * nh);
            k.cvt_bf16_f32(nh, dyg + (m0 + m) * KpH + h0, yf + m * nh);
            const float wv = slot_w[m0 + m];
            for (int64_t c2 = 0; c2 < nh; ++c2) yf[m * nh + c2] *= wv;
          }
          k.gemm_f32_tn(RA, nh, M, s, gbsum + m0 * RA, RA, xf, nh, acc_a, nh, true);
          k.gemm_f32_tn(r, nh, M, s, had + m0 * r, r, yf, nh, acc_bd, nh, true);
        }
      }
      if (grads0) {
        const LoraArrays& L = lora_;
        const int64_t e = tl.e;
        const int64_t hlim = std::min(nh, H - h0);
        for (int64_t q = 0; q < RA; ++q) {
          const View& g = cfg_.lora_fused ? L.ga_gu : (q < r ? L.ga_g : L.ga_u);
          const int64_t qq = cfg_.lora_fused ? q : (q < r ? q : q - r);
          for (int64_t c2 = 0; c2 < hlim; ++c2) {
            g.ptr<float>()[e * g.strides[0] + qq * g.strides[1] + (h0 + c2) * g.strides[2]] +=
                acc_a[q * nh + c2];
          }
        }
        const View& gd = L.gb_d;
        for (int64_t c2 = 0; c2 < hlim; ++c2) {
          for (int64_t q = 0; q < r; ++q) {
            gd.ptr<float>()[e * gd.strides[0] + (h0 + c2) * gd.strides[1] + q * gd.strides[2]] +=
                acc_bd[q * nh + c2];
          }
        }
      }
    });
    clock.mark("gate_up_t");

    // Combine dx per token: the slices' partials in slice order, then the slots in order.
    const int64_t h0 = kBlockN * blo, width = std::min(H, kBlockN * bhi) - h0;
    combine_slots(T, K, pos, nullptr, dxs, ldx, static_cast<int64_t>(tp), xpart, h0, width, c.dx,
                  nt, k);
    clock.mark("combine");
  }
  clock.total();
}

// ---- stats -------------------------------------------------------------------------------------

MemoryStats MoEEngine::memory_stats() const {
  MemoryStats m;
  for (const auto& sl : sl_) {
    m.weight_bytes +=
        static_cast<int64_t>(sl->wgu.bytes + sl->wd.bytes + sl->sgu.bytes + sl->sd.bytes);
  }
  m.lora_bytes = static_cast<int64_t>(LoraStage::instance().bytes());
  size_t cache = 0;
  for (const auto& e : cache_) cache += e->bytes();
  m.cache_bytes = static_cast<int64_t>(cache);
  m.cache_peak_bytes = static_cast<int64_t>(std::max(cache_peak_, cache));
  m.scratch_bytes = static_cast<int64_t>(Scratch::instance().bytes());
  return m;
}

}  // namespace kt::engine
