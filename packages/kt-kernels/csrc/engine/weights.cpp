// The packed base weights: loading (bf16 repack or int8 / int4 quantization from float arrays,
// or ready codes), placement per tensor-parallel slice, and the reads the GEMM phases make of them
// (blocks, fused dequantize + GEMM, transposed blocks for backward).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "engine/engine_internal.h"
#include "engine/moe_engine.h"
#include "engine/phase_clock.h"
#include "runtime/numa.h"
#include "runtime/scratch.h"
#include "runtime/thread_pool.h"

namespace kt::engine {

using namespace detail;
using runtime::Scratch;

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

namespace {

// Source blocks dequantized per step of transpose_codes: 2 x 16 rows of the depth range stay in L1
// (6 KiB for the gate_up^T tiles) until pack_transposed has moved them into place.
constexpr int64_t kCodeBlocksPerStep = 2;

// pack_transposed of quantized blocks (nsrc of them, N = 16 * nsrc rows): the depth range read is
// dequantized a step of source blocks at a time into thread th's scratch, and each step is
// transposed into its pair rows of dst at once, so the bf16 copy never leaves L1. The same bits as
// dequantizing the whole range and transposing it in one call (kernels.h: a source block fills
// only its own pair rows). W8A8 blocks take the ISA's one-pass kernel where it has one
// (quant_kernels.h i8x4_t: no bf16 copy; backward at T=1024 1.11x faster on AMX).
void transpose_codes(const kernels::KernelTable& k, const kernels::QuantKernels& qk,
                     const quant::Format& f, const uint8_t* blk, const float* scales, int64_t nsrc,
                     int64_t k0, int64_t nblk, bf16* dst, int th) {
  if (f.kind == quant::Kind::w8a8 && qk.i8x4_t != nullptr) {
    qk.i8x4_t(nsrc, reinterpret_cast<const int8_t*>(blk), scales, f.Kp, k0, nblk, dst,
              kernels::packed_block_elems(kBlockN * nsrc));
    return;
  }
  const int64_t Kw = kernels::round_up(kBlockN * nblk, kernels::kPackK);
  const int64_t kp0 = k0 / 2, kp1 = std::min(f.Kp / 2, kp0 + Kw / 2);
  const int64_t ldd = kernels::packed_block_elems(kBlockN * nsrc);
  bf16* tmp = local_buf<bf16>(th, kL9, kCodeBlocksPerStep * kBlockN * Kw);
  for (int64_t j0 = 0; j0 < nsrc; j0 += kCodeBlocksPerStep) {
    const int64_t g = std::min(kCodeBlocksPerStep, nsrc - j0);
    quant::dequant_range(qk, f, blk + j0 * quant::block_bytes(f), scales + j0 * kBlockN * f.ngroups,
                         g, kp0, kp1, tmp, Kw, j0 + g < nsrc);
    k.pack_transposed(tmp, kBlockN * g, Kw, 0, nblk, dst + j0 * (kBlockN / 2) * 32, ldd);
  }
}

}  // namespace

void MoEEngine::gu_transposed(int s, int64_t e, int64_t k0, int64_t nblk, bf16* dst, int th) const {
  const Slice& sl = *sl_[static_cast<size_t>(s)];
  const int64_t gb = e * 2 * sl.nb;
  const int64_t N = 2 * kBlockN * sl.nb;
  if (wkind_ == quant::Kind::bf16) {
    k_.pack_transposed(sl.wgu.as<bf16>() + gb * kBlockN * KpH_, N, KpH_, k0, nblk, dst,
                       kernels::packed_block_elems(N));
    return;
  }
  transpose_codes(k_, *qk_, fgu_, sl.wgu.as<uint8_t>() + gb * quant::block_bytes(fgu_),
                  sl.sgu.as<float>() + gb * kBlockN * fgu_.ngroups, 2 * sl.nb, k0, nblk, dst, th);
}

void MoEEngine::d_transposed(int s, int64_t e, int64_t k0, int64_t nblk, bf16* dst, int th) const {
  const Slice& sl = *sl_[static_cast<size_t>(s)];
  const int64_t gb = e * nbH_;
  if (wkind_ == quant::Kind::bf16) {
    k_.pack_transposed(sl.wd.as<bf16>() + gb * kBlockN * sl.KpI, H_, sl.KpI, k0, nblk, dst,
                       kernels::packed_block_elems(H_));
    return;
  }
  transpose_codes(k_, *qk_, sl.fd, sl.wd.as<uint8_t>() + gb * quant::block_bytes(sl.fd),
                  sl.sd.as<float>() + gb * kBlockN * sl.fd.ngroups, nbH_, k0, nblk, dst, th);
}

}  // namespace kt::engine
