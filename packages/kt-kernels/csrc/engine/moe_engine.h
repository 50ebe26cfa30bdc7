// The MoE experts operator of docs/api/kernels.md ("The operator"): packed BF16 (or int8 / int4,
// engine/quant.h) base weights in tp slices of I, LoRA (fused gate_up or split), forward with an
// activation cache, backward producing dx, dw and the LoRA gradients. W8A8 (int8 activations too):
// engine/w8a8.h.
//
// Forward phases (each a parallel loop on the process pool; run() returns = barrier):
//   route      sort (t, j) pairs by expert, stable by token then slot; ids -1 skipped
//   convert    x rows -> bf16 (per token, padded with zeros to packed_k(H))
//   quantize_x W8A8 only: bf16 x rows -> int8 codes + scale per token, gathered into expert order
//   gather     per (expert, row chunk): x rows into expert order; LoRA x A^T
//   gate_up    per (expert, row chunk, column chunk): [g | u] = x Wgu^T + s (x A^T) B^T,
//              h = act(g, u) (engine/activation.h; gate and up blocks are interleaved in the
//              packed weight, so a tile holds both halves of its columns)
//   quantize_h W8A8 only: h rows -> int8 codes + scale per row (over all of I)
//   lora_hd    per (expert, row chunk): h Ad^T
//   down       per (expert, row chunk, column chunk): y = h Wd^T + s (h Ad^T) Bd^T, per slot
//   combine    per token: out_t = sum_j w[t, j] y_(t, j), in slot order
// Backward phases: convert + gather dout; (expert, I chunk) tiles for D = dY Wd + s (dY Bd) Ad,
// dw partials, dg/du and the down/gate_up B gradients; per-token reduction of dw and (dGU B);
// (expert, H chunk) tiles for dx per slot and the A / down-B gradients; per-token combine of dx.
// Each reduction runs in a fixed order, so results do not depend on the thread count.
//
// Tensor parallel (tp > 1): the pool's workers form tp groups (runtime::ThreadPool::run_grouped)
// and group s runs every per-slice task of slice s: loading its weight blocks (so first touch
// places them on its node), the gate_up tiles of its columns, the down tiles of its partial
// product y_s = h[:, slice] Wd[:, slice]^T, the backward (expert, I chunk) tiles of its chunks and
// its partial of dx. The per-token combines sum the partials in slice order, then weight them;
// the LoRA down term (forward) and the LoRA A term of dx (backward) are added to slice 0's partial
// by slice 0's tile, which also owns the LoRA A / down-B gradients of its (expert, H chunk).
// Route, convert, gather, lora_down_a, the reductions and the combines use the whole pool.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/activation.h"
#include "engine/quant.h"
#include "engine/tensor.h"
#include "kernels/kernels.h"
#include "runtime/memory_stats.h"

namespace kt::engine {

struct EngineConfig {
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t lora_rank = 0;
  double lora_alpha = 0.0;  // <= 0 or NaN: alpha = rank (scaling 1)
  bool lora_fused = true;   // "fused" (A shared by gate and up) or "split"
  int64_t max_tokens = 4096;
  int64_t max_cache_depth = 1;
  int num_threads = 0;                // <= 0: KT_NUM_THREADS, else one per physical core
  std::string isa;                    // empty: KT_KERNELS_ISA, else the best runnable
  std::string weight_dtype = "bf16";  // "bf16", "int8" (per output channel), "int4" (per group)
  int64_t group_size = 128;           // int4: group along the input dim (32, 64 or 128)
  int tp = 1;                         // slices of I (tensor parallel); <= 0: one per NUMA node
  // "bf16", or "int8" (W8A8, with weight_dtype "int8" only): int8 x int8 base GEMMs in forward,
  // activations quantized per row (engine/w8a8.h).
  std::string activation_dtype = "bf16";
  // "bf16", or "int8" (activation_dtype "int8" only): backward's two dx products run int8 x int8
  // too, on gradient rows quantized per row after the weights' channel scales (engine/w8a8.h).
  std::string backward_dtype = "bf16";
  // What a forward that saves for backward keeps: "retain" (the gate/up outputs, so backward
  // reads them) or "recompute" (only the inputs; backward recomputes gate/up, bit for bit).
  std::string activation_policy = "retain";
  // The expert activation (engine/activation.h): "silu", "gelu", "gelu_tanh" or "relu2";
  // activation_alpha scales the sigmoid's input (silu only), activation_limit clamps gate (above)
  // and up (both sides; +inf: no clamp), activation_up_offset is added to the clamped up.
  std::string activation = "silu";
  double activation_alpha = 1.0;
  double activation_limit = std::numeric_limits<double>::infinity();
  double activation_up_offset = 0.0;
  // Soft-caps c tanh(x / c) of the gate's linear factor and of up ("silu" only; +inf: none).
  double activation_gate_softcap = std::numeric_limits<double>::infinity();
  double activation_up_softcap = std::numeric_limits<double>::infinity();
};

// LoRA arrays as the caller gives them (any float dtype the engine accepts, any strides).
// Fused: a_gu (E, r, H), b_gu (E, 2I, r); split: a_g, a_u (E, r, H), b_g, b_u (E, I, r);
// both: a_d (E, r, I), b_d (E, H, r). Gradients: the same shapes, float32, written with +=.
struct LoraArrays {
  View a_gu, b_gu, a_g, a_u, b_g, b_u, a_d, b_d;
  View ga_gu, gb_gu, ga_g, ga_u, gb_g, gb_u, ga_d, gb_d;
};

// Per-phase totals of the calls made while the profiler was on (runtime/trace.h).
struct PhaseStat {
  int64_t calls = 0;
  double total_ms = 0.0;
};

// One engine's memory. Cache entries come from the process-wide pool (engine/activation_cache.h)
// and scratch is process-wide (runtime/scratch.h): runtime/memory_stats.h has the process totals.
struct MemoryStats {
  int64_t weight_bytes = 0;      // packed base weights
  int64_t lora_bytes = 0;        // internal fp32 copy of the LoRA weights
  int64_t cache_bytes = 0;       // activation cache entries of this engine's pending forwards
  int64_t cache_peak_bytes = 0;  // the most cache_bytes has been since construction
  int64_t scratch_bytes = 0;     // process-wide scratch pool (shared by all engines)
};

class MoEEngine {
 public:
  explicit MoEEngine(const EngineConfig& cfg);
  ~MoEEngine();

  const EngineConfig& config() const { return cfg_; }
  kernels::Isa isa() const { return isa_; }
  int num_threads() const { return threads_; }
  // Whether the worker group of slice s is pinned to NUMA node s mod nodes (more than one node,
  // tp a multiple of the node count, KT_PIN_THREADS not 0).
  bool pinned_threads() const { return pinned_; }
  float scaling() const { return scale_; }

  // Base weights: fused gate_up (E, 2I, H) gate rows first + down (E, H, I), or split gate/up
  // (E, I, H) + down. float32 or bfloat16, any strides. Packed into the engine's own memory.
  void load_weights(const View& gate_up, const View& gate, const View& up, const View& down);
  bool weights_loaded() const { return !sl_.empty() && !sl_[0]->wgu.empty(); }
  int tp() const { return static_cast<int>(sl_.size()); }
  // Already-quantized weights (weight_dtype int8 / int4) in the documented format: int8 codes
  // (E, N, K) int8 with scales (E, N) float32; int4 codes (E, N, K / 2) uint8, two per byte (even k
  // in the low nibble, two's complement) with scales (E, N, K / group_size) float32. N, K as in
  // load_weights (gate_up: 2I x H, gate/up: I x H, down: H x I).
  void load_quantized(const View& gate_up, const View& gate_up_scale, const View& gate,
                      const View& gate_scale, const View& up, const View& up_scale,
                      const View& down, const View& down_scale);
  quant::Kind weight_kind() const { return wkind_; }
  const activation::Spec& activation() const { return act_; }

  // Frozen biases (engine/bias.cpp), added to the projections' outputs: gate_up (E, 2I) gate
  // first, or gate and up (E, I) each; down (E, H). float32 or bfloat16, any strides; copied
  // now. Any may be absent (no bias there); a call replaces every earlier one.
  void set_biases(const View& gate_up, const View& gate, const View& up, const View& down);
  bool has_gate_up_bias() const { return !bias_gu_.empty(); }
  bool has_down_bias() const { return !bias_d_.empty(); }

  // Binds LoRA weights and gradient arrays (written in backward). The caller keeps the arrays
  // alive while bound. Values are read by the next forward or backward after set_lora() or
  // lora_updated(), into the process-wide LoRA stage (engine/lora_stage.h).
  void set_lora(const LoraArrays& arrays);
  void lora_updated();
  bool lora_set() const { return lora_bound_; }

  // Argument checks only (no work): run before a forward is queued.
  void check_forward(const View& x, const View& ids, const View& w, const View& out,
                     bool save) const;
  void forward(const View& x, const View& ids, const View& w, const View& out, bool save);
  // x: the pending forward's input again, required when that forward ran with
  // activation_policy "recompute" (its entry keeps only the routing), ignored otherwise.
  void check_backward(const View& dout, const View& dx, const View& dw,
                      const View& x = View()) const;
  void backward(const View& dout, const View& dx, const View& dw, const View& x = View());

  int64_t cache_depth() const { return static_cast<int64_t>(pending_); }
  // Drops every pending forward; their cache memory returns to the pool.
  void clear_cache();
  // "retain" or "recompute" (EngineConfig::activation_policy), for the forwards that follow.
  void set_activation_policy(const std::string& policy);
  const std::string& activation_policy() const { return cfg_.activation_policy; }
  // Returns the scratch buffers and the cache blocks kept for reuse to the system (every engine
  // of the process; pending forwards keep their entries).
  static void trim_memory();
  MemoryStats memory_stats() const;
  // Milliseconds per phase of the last forward and the last backward.
  std::map<std::string, double> last_timings() const { return timings_; }
  // Calls and milliseconds per phase ("forward.gate_up", ..., "backward.total") of the calls this
  // engine ran while the profiler was on; reset_profile() forgets them.
  std::map<std::string, PhaseStat> profile_stats() const { return prof_; }
  void reset_profile() { prof_.clear(); }
  // A process-unique id (0, 1, ... in order of creation): the "engine" of trace events.
  int64_t id() const { return id_; }

  struct Entry;  // one activation cache entry (defined in engine_internal.h)

 private:
  // ---- configuration and kernels (moe_engine.cpp) ----
  EngineConfig cfg_;
  kernels::Isa isa_;
  kernels::KernelTable k_;                     // isa_'s complete table (kernels/dispatch.cpp)
  const kernels::QuantKernels* qk_ = nullptr;  // dequantization for isa_
  int threads_ = 1;
  float scale_ = 1.0f;

  // Sizes.
  int64_t E_, K_, H_, I_, r_;
  int64_t KpH_, KpI_;  // padded depths of the two GEMMs (bf16: quant::unaliased_depth)
  int64_t nbI_, nbH_;  // 16-row blocks of I and of H
  int64_t Ib_, Hb_;    // I and H rounded up to 16
  int64_t RA_;         // rows of the internal A: r (fused) or 2r (split)

  // ---- packed base weights (weights.cpp) ----
  // An owned 64-byte aligned allocation (moe_engine.cpp), also holding the biases.
  struct Buf {
    void* p = nullptr;
    size_t bytes = 0;
    Buf() = default;
    Buf(const Buf&) = delete;
    Buf& operator=(const Buf&) = delete;
    ~Buf();
    // Frees, then allocates n bytes (none for 0) counted as memory of `kind`.
    void reset(size_t n, runtime::MemKind kind = runtime::MemKind::weights);
    runtime::MemKind kind = runtime::MemKind::weights;
    bool empty() const { return p == nullptr; }
    template <typename T>
    T* as() const {
      return static_cast<T*>(p);
    }
  };
  // Tensor parallel slices of I: slice s owns I blocks [b0, b0 + nb) of every expert (columns
  // [16 b0, 16 b0 + width) of I), its weights allocated on NUMA node s mod nodes. tp = 1: one
  // slice.
  //   wgu: E x 2nb blocks (gate block q then up block q), depth KpH; bf16 or codes
  //   wd:  E x nbH blocks of the slice's columns of down, depth KpI = packed_k(width)
  //   sgu, sd: int8/int4 scales (engine/quant.h), rows in packed order
  struct Slice {
    Buf wgu, wd, sgu, sd;
    int64_t b0 = 0, nb = 0, width = 0, KpI = 0;
    quant::Format fd;  // code format of wd (depth: the slice's width)
  };
  std::vector<std::unique_ptr<Slice>> sl_;
  quant::Kind wkind_ = quant::Kind::bf16;
  quant::Format fgu_;  // code format of every slice's wgu (depth H)
  void alloc_weights();
  void free_weights();
  // fn(expert, block, slice, thread) over every packed weight block, in parallel, the blocks of
  // slice s on worker group s: blocks [0, 2 nbI) are gate/up (global order), then nbH down blocks
  // per slice.
  void for_each_weight_block(const std::function<void(int64_t, int64_t, int, int)>& fn);
  // Packed bf16 blocks of slice s, expert e (gate/up: global block b0 .. b0 + nblk; down: H
  // blocks): the stored blocks (bf16) or a dequantized copy in the thread's scratch slot.
  const kernels::bf16* gu_blocks(int s, int64_t e, int64_t b0, int64_t nblk, int th,
                                 int slot) const;
  const kernels::bf16* d_blocks(int s, int64_t e, int64_t b0, int64_t nblk, int th, int slot) const;
  // C (= or +=) A . W^T for M rows and blocks [b0, b0 + nblk) (indexed as gu_blocks / d_blocks) of
  // slice s, expert e's gate/up or down weight: bf16 weights straight into gemm_bf16; codes into
  // the fused dequantize + GEMM kernel up to fused_rows_ rows, else dequantized into thread th's
  // scratch slot first (one copy then serves every row). Both give the same bits.
  enum class Proj { gate_up, down };
  void gemm_weights(Proj w, int s, int64_t e, int64_t b0, int64_t nblk, int64_t M,
                    const kernels::bf16* A, int64_t lda, float* C, int64_t ldc, bool accumulate,
                    int th, int slot) const;
  // Largest tile row count that takes the fused path: the ISA's fused_max_rows_q8 / _q4, or forced
  // by KT_KERNELS_FUSED_DEQUANT (-1: never; INT64_MAX: always).
  int64_t fused_rows_ = -1;
  // pack_transposed of slice s of expert e's gate_up / down weight (k0 local to the slice).
  // Quantized storage: only the depth range read is dequantized, in thread th's scratch.
  void gu_transposed(int s, int64_t e, int64_t k0, int64_t nblk, kernels::bf16* dst, int th) const;
  void d_transposed(int s, int64_t e, int64_t k0, int64_t nblk, kernels::bf16* dst, int th) const;

  // ---- tensor-parallel scheduling (moe_engine.cpp) ----
  int slice_of(int64_t pair) const;  // the slice owning I block `pair`
  // fn(slice, index, thread) for index in [0, counts[slice]): tp = 1 on the whole pool (as an
  // ungrouped phase), else slice s's tasks on worker group s.
  void run_slices(const std::vector<int64_t>& counts,
                  const std::function<void(int, int64_t, int)>& fn) const;
  std::vector<int> group_node_;  // per slice: the node its group is pinned to, or -1
  bool pinned_ = false;

  // ---- W8A8 (activation_dtype int8; w8a8.cpp) ----
  // Row stride of the int8 codes of h.
  int64_t w8a8_h_stride() const;
  bool int8_backward_ = false;  // backward_dtype "int8"
  // int8 backward: the depth of the down^T product (H padded to kPackK8) and the dGU codes' row
  // layout: slice s's columns at seg_off[s] (slice depth padded to kPackK8), rows of ld bytes.
  int64_t w8a8_dy_depth() const;
  struct DguCodes {
    std::vector<int64_t> seg_off, depth;
    int64_t ld = 0;
  };
  DguCodes w8a8_dgu_layout() const;
  // dq row p = codes of (dY row p * the down scales of expert e) for the M rows of one expert
  // (stride ldy), with their row scales; tmp: H floats of thread scratch.
  void w8a8_quantize_dy(int64_t e, int64_t M, const kernels::bf16* dy, int64_t ldy, int8_t* dq,
                        float* sdq, float* tmp) const;
  // The same for dGU rows (stride 2Ib) against the gate_up scales, one scale per row over every
  // slice's columns; tmp: 2Ib floats.
  void w8a8_quantize_dgu(int64_t e, int64_t M, const kernels::bf16* dgu, const DguCodes& lay,
                         int8_t* gq, float* sgq, float* tmp) const;
  // gate_up tile: C[M x 32 np] (fp32, written) of the block pairs [p0, p0 + np) of expert e from
  // the x codes (stride ldq) and their row scales; int32 scratch in thread th's local slot.
  void w8a8_gate_up_tile(int64_t e, int64_t p0, int64_t np, int64_t M, const int8_t* xq,
                         int64_t ldq, const float* sx, float* C, int64_t ldc, int th,
                         int slot) const;
  // down tile: C[M x 16 nb] (fp32, written) of H blocks [b0, b0 + nb): slice s's partial product
  // over its columns of I, from the h codes (stride ldq) and their row scales.
  void w8a8_down_tile(int s, int64_t e, int64_t b0, int64_t nb, int64_t M, const int8_t* hq,
                      int64_t ldq, const float* sh, float* C, int64_t ldc, int th, int slot) const;

  // ---- activation and biases (bias.cpp) ----
  // Activation variant, resolved at construction; act_kernels_: the ISA's silu_mul pair computes
  // it.
  activation::Spec act_;
  bool act_kernels_ = true;
  // Biases (float32): E x 2Ib in the gu column order (per 16 columns gate, then up); E x Hb.
  Buf bias_gu_, bias_d_;
  // C[m, c] += bias[e * ld_bias + c0 + c] for M rows of n columns.
  static void add_bias(const Buf& bias, int64_t e, int64_t ld_bias, int64_t c0, int64_t n,
                       int64_t M, float* C, int64_t ldc);
  // dw[m] = dY[m] . b_down[e] for M bf16 rows of dY (stride ld).
  void down_bias_dw(int64_t e, int64_t M, const kernels::bf16* dy, int64_t ld, float* dw) const;

  // ---- LoRA (lora.cpp) ----
  // The caller's arrays, and where their fp32 kernel-layout copy lies in the LoRA stage while
  // this engine runs (set by stage_lora(); valid only under the engine lock).
  LoraArrays lora_;
  bool lora_bound_ = false;
  bool lora_grads_ = false;
  uint64_t lora_version_ = 0;  // LoraStage version of the bound values
  // Converts the bound LoRA weights into the stage unless it already holds them.
  void stage_lora();
  void convert_lora(float* a_all, float* bgu_t, float* ad, float* bd_t) const;
  void check_lora_ready(const char* what) const;
  const float* a_all_ = nullptr;  // E x RA x Hb     (fused: A_gu; split: [A_g; A_u])
  const float* bgu_t_ = nullptr;  // E x RA x 2Ib    B_gu^T, interleaved columns; split: block diag.
  const float* ad_ = nullptr;     // E x r x Ib
  const float* bd_t_ = nullptr;   // E x r x Hb

  // ---- forward and backward phases (forward.cpp, backward.cpp) ----
  struct Ctx;  // one call's arrays and switches (engine_internal.h)
  void run_forward(Ctx& c);
  void run_backward(Ctx& c);
  // The gate_up tiles over the routed rows (offsets off): [g | u] = x Wgu^T + s (x A^T) Bgu^T into
  // gu (S x 2Ib fp32; null: only per tile, in thread scratch), from the bf16 rows xg (or, W8A8,
  // the codes xq with row scales sxq); with hb, also h = act(g, u) as bf16 rows of KpI. The
  // same tiles whoever calls, so the same bits.
  void gate_up_phase(const int64_t* off, const kernels::bf16* xg, const int8_t* xq,
                     const float* sxq, const float* xa, bool lora, float* gu,
                     kernels::bf16* hb) const;
  // x rows into expert order (xg; null: not wanted) from the bf16 token rows xb; with xa, LoRA
  // x A^T too (from xb's rows).
  void gather_phase(const int64_t* off, const int32_t* slot_tok, const kernels::bf16* xb,
                    kernels::bf16* xg, float* xa) const;
  // LoRA h Ad^T (S x r) from the bf16 h rows.
  void lora_down_phase(const int64_t* off, const kernels::bf16* hb, float* had) const;
  // What backward reads of its forward: the entry's buffers (retain) or, for a recompute entry,
  // scratch refilled from the forward's x by the forward's own phases.
  struct Recomputed {
    const kernels::bf16* xb = nullptr;
    const float* xa = nullptr;
    const float* gu = nullptr;
    const float* had = nullptr;
  };
  void recompute_inputs(const Entry& en, const View& x, bool lora, Recomputed& out) const;

  // ---- activation cache (moe_engine.cpp) ----
  std::vector<std::unique_ptr<Entry>> cache_;  // entries [0, pending_) are pending
  size_t pending_ = 0;
  size_t cache_peak_ = 0;   // the most bytes this engine's pending entries have held
  bool recompute_ = false;  // activation_policy == "recompute"
  void note_cache_bytes();

  // ---- timings and profile ----
  std::map<std::string, double> timings_;
  std::map<std::string, PhaseStat> prof_;
  int64_t id_ = 0;
};

}  // namespace kt::engine
