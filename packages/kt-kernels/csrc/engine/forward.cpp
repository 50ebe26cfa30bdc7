// Forward: route the (token, slot) pairs by expert, then the phases of moe_engine.h in order. The
// gate_up, gather and LoRA-down phases are also backward's recompute of a forward that kept only
// its routing (backward.cpp), so they stay one code path.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "engine/engine_internal.h"
#include "engine/limits.h"
#include "engine/lora_stage.h"
#include "engine/moe_engine.h"
#include "engine/phase_clock.h"
#include "engine/w8a8.h"
#include "runtime/scratch.h"
#include "runtime/thread_pool.h"

namespace kt::engine {

using namespace detail;
using runtime::parallel_for;
using runtime::Scratch;

void detail::rows_to_bf16(const View& src, int64_t T, int64_t H, int64_t KpH, bf16* dst, int nt,
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

void detail::combine_slots(int64_t T, int64_t K, const int32_t* pos, const float* slot_w,
                           const float* src, int64_t ld, int64_t parts, int64_t part_stride,
                           int64_t h0, int64_t width, const View& dst, int nt,
                           const kernels::KernelTable& k) {
  parallel_for(ceil_div(T, kTokensCombine), nt, [&](int64_t task, int th) {
    float* acc = local_buf<float>(th, kL0, width);
    float* sum = parts > 1 ? local_buf<float>(th, kL1, width) : nullptr;
    const int64_t t_end = std::min(T, (task + 1) * kTokensCombine);
    for (int64_t t = task * kTokensCombine; t < t_end; ++t) {
      if (t + 1 < t_end) {  // the next token's slot rows
        for (int64_t j = 0; j < K; ++j) {
          const int32_t p = pos[(t + 1) * K + j];
          if (p >= 0) prefetch_span(src + p * ld, width);
        }
      }
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
    w8a8::quantize_rows(k_, *qk_, T, xb, KpH, H, xq_tok, ldxq, sx_tok, nt);
    w8a8::gather_rows(S, slot_tok, xq_tok, sx_tok, ldxq, xq, sxq, nt);
    clock.mark("quantize_x");
  }

  // -- gather rows into expert order (the bf16 GEMMs' input; W8A8's are the codes above); LoRA
  // x A^T.
  bf16* xg = w8a8 ? nullptr : shared_buf<bf16>(kSlotRows, S * KpH);
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
    w8a8::quantize_rows(k_, *qk_, S, hb, KpI, I_, hq, ldhq, shq, nt);
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
  // A y this large leaves the caches before the combine reads it: the tiles stream it out.
  const bool stream_y = streamed(static_cast<int64_t>(tp) * ypart);
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
      float* yt = y + si * ypart + tl.m0 * ldy + kBlockN * (tl.n0 - blo);
      float* C = stream_y ? local_buf<float>(th, kL3, M * kBlockN * nb) : yt;
      const int64_t ldc = stream_y ? kBlockN * nb : ldy;
      if (w8a8) {
        w8a8_down_tile(si, tl.e, tl.n0, nb, M, hq + tl.m0 * ldhq, ldhq, shq + tl.m0, C, ldc, th,
                       kL0);
      } else {
        gemm_weights(Proj::down, si, tl.e, tl.n0, nb, M, hb + tl.m0 * KpI + kBlockN * sl.b0, KpI, C,
                     ldc, false, th, kL0);
      }
      if (c.lora && si == 0) {  // the LoRA term once, in slice 0's partial
        k.gemm_f32_nn(M, kBlockN * nb, r, s, had + tl.m0 * r, r,
                      bd_t_ + tl.e * r * Hb + kBlockN * tl.n0, Hb, C, ldc, true);
      }
      if (si == 0 && !bias_d_.empty()) {
        add_bias(bias_d_, tl.e, Hb, kBlockN * tl.n0, kBlockN * nb, M, C, ldc);
      }
      if (stream_y) k.stream_rows_f32(M, kBlockN * nb, C, ldc, yt, ldy);
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
  const bool stream_gu = gu != nullptr && streamed(off[E] * 2 * Ib);
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
    // In place in gu when it is small enough to stay in cache until backward reads it; else in a
    // tile of the thread's scratch, streamed to gu with non-temporal stores after the LoRA term
    // and the bias (no read for ownership of lines backward will fetch from memory anyway).
    const bool in_place = gu != nullptr && !stream_gu;
    float* C = in_place ? gu + tl.m0 * 2 * Ib + 32 * tl.n0 : local_buf<float>(th, kL3, M * ncols);
    const int64_t ldc = in_place ? 2 * Ib : ncols;
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
    if (stream_gu) {
      k.stream_rows_f32(M, ncols, C, ldc, gu + tl.m0 * 2 * Ib + 32 * tl.n0, 2 * Ib);
    }
    if (hb == nullptr) return;
    if (act_kernels_) {  // SiLU: h straight from the interleaved rows (the same bits)
      k.silu_mul_interleaved_bf16(M, np, C, ldc, hb + tl.m0 * KpI + 16 * tl.n0, KpI);
    } else {
      float* g = local_buf<float>(th, kL0, M * nh);
      float* u = local_buf<float>(th, kL1, M * nh);
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t q = 0; q < np; ++q) {
          std::memcpy(g + m * nh + 16 * q, C + m * ldc + 32 * q, 16 * sizeof(float));
          std::memcpy(u + m * nh + 16 * q, C + m * ldc + 32 * q + 16, 16 * sizeof(float));
        }
      }
      activation::forward(act_, act_kernels_, k, M * nh, g, u, g);
      for (int64_t m = 0; m < M; ++m) {
        k.cvt_f32_bf16(nh, g + m * nh, hb + (tl.m0 + m) * KpI + 16 * tl.n0);
      }
    }
    if (tl.n1 == n_pairs && KpI > Ib) {  // the last tile of a row zeroes its padding
      for (int64_t m = 0; m < M; ++m) {
        bf16* hrow = hb + (tl.m0 + m) * KpI;
        std::memset(hrow + Ib, 0, static_cast<size_t>(KpI - Ib) * sizeof(bf16));
      }
    }
  });
}

void MoEEngine::gather_phase(const int64_t* off, const int32_t* slot_tok, const bf16* xb, bf16* xg,
                             float* xa) const {
  const int64_t E = E_, H = H_, KpH = KpH_, Hb = Hb_, RA = RA_;
  const kernels::KernelTable& k = k_;
  if (xg == nullptr && xa == nullptr) return;
  const std::vector<Tile> tiles = gather_tiles(off, E);
  // Rows in expert order too large to stay cached until the gate_up tiles read them: streamed.
  const bool stream = xg != nullptr && streamed(off[E] * KpH / 2);
  parallel_for(static_cast<int64_t>(tiles.size()), threads_, [&](int64_t i, int th) {
    const Tile& tl = tiles[static_cast<size_t>(i)];
    const int64_t M = tl.m1 - tl.m0;
    if (xg != nullptr) gather_rows(k, xb, slot_tok, tl.m0, tl.m1, KpH, xg, stream);
    if (xa != nullptr) {
      float* xf = local_buf<float>(th, kL0, M * H);
      for (int64_t m = 0; m < M; ++m) {
        k.cvt_bf16_f32(H, xb + slot_tok[tl.m0 + m] * KpH, xf + m * H);
      }
      k.gemm_f32_nt(M, RA, H, 1.0f, xf, H, a_all_ + tl.e * RA * Hb, Hb, xa + tl.m0 * RA, RA, false);
    }
  });
}

void MoEEngine::lora_down_phase(const int64_t* off, const bf16* hb, float* had) const {
  const int64_t E = E_, KpI = KpI_, Ib = Ib_, r = r_;
  const kernels::KernelTable& k = k_;
  const std::vector<Tile> tiles = gather_tiles(off, E);
  parallel_for(static_cast<int64_t>(tiles.size()), threads_, [&](int64_t i, int th) {
    const Tile& tl = tiles[static_cast<size_t>(i)];
    const int64_t M = tl.m1 - tl.m0;
    float* hf = local_buf<float>(th, kL0, M * Ib);
    for (int64_t m = 0; m < M; ++m) k.cvt_bf16_f32(Ib, hb + (tl.m0 + m) * KpI, hf + m * Ib);
    k.gemm_f32_nt(M, r, Ib, 1.0f, hf, Ib, ad_ + tl.e * r * Ib, Ib, had + tl.m0 * r, r, false);
  });
}

}  // namespace kt::engine
