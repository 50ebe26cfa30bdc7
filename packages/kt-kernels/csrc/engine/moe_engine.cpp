// MoEEngine's construction (argument checks, sizes, tensor-parallel slices), the engine lock, the
// owned buffers, the slice scheduler, the activation policy and the memory accounting. The rest of
// its members live by concern in the files named in engine_internal.h.
#include "engine/moe_engine.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <new>
#include <optional>
#include <stdexcept>

#include "engine/activation_cache.h"
#include "engine/engine_internal.h"
#include "engine/limits.h"
#include "engine/lora_stage.h"
#include "engine/w8a8.h"
#include "kernels/dispatch.h"
#include "runtime/big_alloc.h"
#include "runtime/env_switch.h"
#include "runtime/fork.h"
#include "runtime/numa.h"
#include "runtime/scratch.h"
#include "runtime/thread_pool.h"

namespace kt::engine {

using namespace detail;
using runtime::parallel_for;
using runtime::Scratch;

std::mutex& detail::engine_mutex() {
  static std::mutex* m = [] {
    auto* mu = new std::mutex();
    runtime::on_fork(
        runtime::kForkOrderEngine, [mu] { mu->lock(); }, [mu] { mu->unlock(); },
        [mu] { mu->unlock(); });
    return mu;
  }();
  return *m;
}

namespace {

// KT_KERNELS_FUSED_DEQUANT: which path int8 / int4 weights take into the GEMM (read when an
// engine is created). auto (or unset): the fused kernel up to the ISA's fused_max_rows_q8 / _q4
// rows per tile, dequantize + gemm_bf16 above; 1: always fused; 0: never. Both paths give the
// same bits.
int64_t fused_rows_setting(const kernels::KernelTable& k, quant::Kind kind) {
  const int64_t none = -1;
  const bool have = k.gemm_q8 != nullptr && k.gemm_q4 != nullptr;
  std::optional<bool> fused;
  try {
    fused = runtime::env_switch("KT_KERNELS_FUSED_DEQUANT",
                                "'auto' (or unset: fused dequantize + GEMM for small tiles), "
                                "'1' / 'on' (always fused) or '0' / 'off' (never)");
  } catch (const std::invalid_argument& e) {
    throw ValueError(e.what());
  }
  if (!fused) {
    return have ? (kind == quant::Kind::int4 ? k.fused_max_rows_q4 : k.fused_max_rows_q8) : none;
  }
  return *fused && have ? std::numeric_limits<int64_t>::max() : none;
}

}  // namespace

// ---- buffers -----------------------------------------------------------------------------------

MoEEngine::Buf::~Buf() { reset(0, kind); }

void MoEEngine::Buf::reset(size_t n, runtime::MemKind k) {
  if (p != nullptr) runtime::mem_sub(kind, bytes);
  runtime::big_free(p, bytes);
  p = nullptr;
  bytes = 0;
  kind = k;
  if (n == 0) return;
  const size_t rounded = runtime::big_alloc_size(n, 64);
  p = runtime::big_alloc(n, 64);
  bytes = rounded;
  runtime::mem_add(kind, bytes);
}

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
  if (cfg.backward_dtype == "int8") {
    if (wkind_ != quant::Kind::w8a8) {
      throw ValueError(
          "backward_dtype='int8' (int8 x int8 dx products) needs activation_dtype='int8' and "
          "weight_dtype='int8' (W8A8), got weight_dtype='" +
          cfg.weight_dtype + "', activation_dtype='" + cfg.activation_dtype + "'");
    }
    if (2 * cfg.intermediate_size > w8a8::kMaxDepth) {
      throw ValueError("backward_dtype='int8': 2 * intermediate_size must be at most " +
                       std::to_string(w8a8::kMaxDepth) +
                       " (the dx product over gate and up is summed in int32), got "
                       "intermediate_size=" +
                       std::to_string(cfg.intermediate_size));
    }
    int8_backward_ = true;
  } else if (cfg.backward_dtype != "bf16") {
    throw ValueError("backward_dtype: expected 'bf16' or 'int8', got '" + cfg.backward_dtype + "'");
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
  act_ = activation::parse(cfg.activation, cfg.activation_alpha, cfg.activation_limit,
                           cfg.activation_up_offset, cfg.activation_gate_softcap,
                           cfg.activation_up_softcap);
  act_kernels_ = act_.is_default();
  qk_ = &kernels::quant_kernels(isa_);
  fused_rows_ = fused_rows_setting(k_, wkind_);
  try {
    (void)runtime::huge_pages_enabled();  // a bad KT_HUGE_PAGES fails here, not in an allocation
  } catch (const std::invalid_argument& e) {
    throw ValueError(e.what());
  }
  threads_ = cfg.num_threads > 0 ? cfg.num_threads : runtime::default_thread_count();

  E_ = cfg.num_experts;
  K_ = cfg.top_k;
  H_ = cfg.hidden_size;
  I_ = cfg.intermediate_size;
  r_ = cfg.lora_rank;
  KpH_ = kernels::packed_k(H_);
  if (wkind_ == quant::Kind::bf16) KpH_ = quant::unaliased_depth(KpH_);  // x rows share it
  KpI_ = kernels::packed_k(I_);
  nbI_ = kernels::packed_blocks(I_);
  nbH_ = kernels::packed_blocks(H_);
  Ib_ = nbI_ * kBlockN;
  Hb_ = nbH_ * kBlockN;
  limits::check_tokens(cfg.max_tokens, K_, std::max({KpH_, KpI_, 2 * Ib_}), "max_tokens");
  RA_ = cfg.lora_fused ? r_ : 2 * r_;
  set_activation_policy(cfg.activation_policy);
  fgu_ = quant::make_format(wkind_, H_, cfg.group_size);
  if (wkind_ == quant::Kind::bf16) fgu_.Kp = fgu_.group = KpH_;
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
    // One slice: down's blocks and the h rows may take the zero step too (with more, a slice's
    // depth would run into the next slice's h columns).
    if (wkind_ == quant::Kind::bf16 && tp == 1) {
      KpI_ = quant::unaliased_depth(KpI_);
      sl_[0]->fd.Kp = sl_[0]->fd.group = sl_[0]->KpI = KpI_;
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

// ---- tensor-parallel slices --------------------------------------------------------------------

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

// ---- policy and memory -------------------------------------------------------------------------

void MoEEngine::set_activation_policy(const std::string& policy) {
  if (policy != "retain" && policy != "recompute") {
    throw ValueError("activation_policy: expected 'retain' or 'recompute', got '" + policy + "'");
  }
  cfg_.activation_policy = policy;
  recompute_ = policy == "recompute";
}

void MoEEngine::note_cache_bytes() {
  size_t bytes = 0;
  for (size_t i = 0; i < pending_; ++i) bytes += cache_[i]->bytes();
  cache_peak_ = std::max(cache_peak_, bytes);
}

void MoEEngine::trim_memory() {
  std::lock_guard<std::mutex> lock(engine_mutex());
  Scratch::instance().release();
  ActivationPool::instance().trim();
  LoraStage::instance().release();
}

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
