// Backward of the most recent pending forward: dx, dw and the LoRA gradients, in tiles that own
// their gradient slices so every reduction runs in a fixed order (see moe_engine.h). A forward that
// kept only its routing is first recomputed by forward.cpp's own phases, bit for bit.
#include <algorithm>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "engine/engine_internal.h"
#include "engine/moe_engine.h"
#include "engine/phase_clock.h"
#include "engine/quant.h"
#include "engine/w8a8.h"
#include "runtime/scratch.h"
#include "runtime/thread_pool.h"

namespace kt::engine {

using namespace detail;
using runtime::parallel_for;
using runtime::Scratch;

void MoEEngine::recompute_inputs(const Entry& en, const View& x, bool lora, Recomputed& out) const {
  const int64_t T = en.T, S = en.S, H = H_, KpH = KpH_, KpI = KpI_, Ib = Ib_, RA = RA_;
  const int nt = threads_;
  const int64_t* off = en.offsets.data();
  const int32_t* slot_tok = en.slot_tok.data();
  // The forward's phases on the forward's x, in the same tiles: the same bits.
  bf16* xb = shared_buf<bf16>(kSlotX, T * KpH);
  rows_to_bf16(x, T, H, KpH, xb, nt, k_);
  const bool w8a8 = wkind_ == quant::Kind::w8a8;  // its GEMMs read codes, not xg
  bf16* xg = w8a8 ? nullptr : shared_buf<bf16>(kSlotRows, S * KpH);
  float* xa = lora ? shared_buf<float>(kSlotXA, S * (RA + r_)) : nullptr;
  gather_phase(off, slot_tok, xb, xg, xa);
  int8_t* xq = nullptr;
  float* sxq = nullptr;
  if (w8a8) {
    const int64_t ldxq = fgu_.Kp;
    int8_t* xq_tok = shared_buf<int8_t>(kSlotQTok, T * ldxq);
    float* sx_tok = shared_buf<float>(kSlotQScales, T + S);
    sxq = sx_tok + T;
    xq = shared_buf<int8_t>(kSlotQRows, S * ldxq);
    w8a8::quantize_rows(k_, *qk_, T, xb, KpH, H, xq_tok, ldxq, sx_tok, nt);
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

  // int8 backward (w8a8.h): codes of the dY rows for down^T, then of the dGU rows for gate_up^T,
  // in the W8A8 code rows' slot (free once a recompute has run); row scales after the forward's.
  const bool q8 = int8_backward_;
  const int64_t ldq_dy = q8 ? w8a8_dy_depth() : 0;
  const DguCodes lay = q8 ? w8a8_dgu_layout() : DguCodes{};
  int8_t* codes = q8 ? shared_buf<int8_t>(kSlotQRows, S * std::max(ldq_dy, lay.ld)) : nullptr;
  float* code_scales = q8 ? shared_buf<float>(kSlotQScales, 2 * S) : nullptr;
  float* sdy = code_scales;
  float* sdgu = q8 ? code_scales + S : nullptr;

  std::vector<Tile> tiles = gather_tiles(off, E);
  bf16* dyg = shared_buf<bf16>(kSlotRows, S * KpH);
  // Streamed as the forward's x rows are (gather_phase), unless read back here at once.
  const bool stream_dy = streamed(S * KpH / 2) && !q8 && !dbias;
  parallel_for(static_cast<int64_t>(tiles.size()), nt, [&](int64_t i, int th) {
    const Tile& tl = tiles[static_cast<size_t>(i)];
    const int64_t M = tl.m1 - tl.m0;
    gather_rows(k, dtok, slot_tok, tl.m0, tl.m1, KpH, dyg, stream_dy);
    if (q8) {
      w8a8_quantize_dy(tl.e, M, dyg + tl.m0 * KpH, KpH, codes + tl.m0 * ldq_dy, sdy + tl.m0,
                       local_buf<float>(th, kL1, H));
    }
    if (dbias) down_bias_dw(tl.e, M, dyg + tl.m0 * KpH, KpH, dwb + tl.m0);
    if (lora) {
      float* yf = local_buf<float>(th, kL0, M * H);
      for (int64_t m = 0; m < M; ++m) {  // the token's row: cached even when dyg was streamed
        k.cvt_bf16_f32(H, dtok + slot_tok[tl.m0 + m] * KpH, yf + m * H);
      }
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
  const int64_t KtH = kernels::packed_k(H);  // depth of down^T (KpH may hold a zero step more)
  run_slices(dt_tiles.counts, [&](int sidx, int64_t ti, int th) {
    const Tile& tl = dt_tiles.at(sidx, ti);
    const int64_t np = tl.n1 - tl.n0, ni = 16 * np, i0 = 16 * tl.n0;
    const int64_t chunk = chunk_of[static_cast<size_t>(tl.n0)];
    const Slice& sl = *sl_[static_cast<size_t>(sidx)];
    const int64_t k0 = i0 - kBlockN * sl.b0;  // the chunk's first column within the slice
    const int64_t rows_max = std::min(kRowsBwd, tl.m1 - tl.m0);
    bf16* wdt = nullptr;
    int8_t* wdt8 = nullptr;
    int32_t* acc8 = nullptr;
    if (q8) {  // the codes of Wd^T's chunk, and int32 sums
      const int64_t bb = kernels::i8_block_bytes(ldq_dy);
      wdt8 = local_buf<int8_t>(th, kL0, np * bb);
      k.pack_transposed_i8(sl.wd.as<int8_t>() + tl.e * nbH_ * quant::block_bytes(sl.fd),
                           kBlockN * nbH_, sl.fd.Kp, k0, np, wdt8, bb);
      acc8 = local_buf<int32_t>(th, kL9, rows_max * ni);
    } else {
      wdt = local_buf<bf16>(th, kL0, wdt_elems);
      d_transposed(sidx, tl.e, k0, np, wdt, th);
    }
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
      if (q8) {
        k.gemm_i8(M, np, ldq_dy, codes + m0 * ldq_dy, ldq_dy, wdt8, acc8, ni, false);
        k_.scale_i32_f32(M, ni, acc8, ni, sdy + m0, nullptr, D, ni);
      } else {
        k.gemm_bf16(M, np, KtH, dyg + m0 * KpH, KpH, wdt, D, ni, false);
      }
      if (lora) {
        k.gemm_f32_nn(M, ni, r, s, dyb + m0 * r, r, ad_ + tl.e * r * Ib + i0, Ib, D, ni, true);
      }
      for (int64_t m = 0; m < M; ++m) {
        // The cached [g | u] rows are 2Ib floats apart, a stride no hardware prefetcher follows.
        if (m + kRowsAhead < M)
          prefetch_span(gu + (m0 + m + kRowsAhead) * 2 * Ib + 32 * tl.n0, 32 * np);
        const float* row = gu + (m0 + m) * 2 * Ib + 32 * tl.n0;
        for (int64_t q = 0; q < np; ++q) {
          std::memcpy(G + m * ni + 16 * q, row + 32 * q, 16 * sizeof(float));
          std::memcpy(U + m * ni + 16 * q, row + 32 * q + 16, 16 * sizeof(float));
        }
      }
      // h exactly as forward fed it to the down projection (rounded to bf16; dGU's buffer holds
      // the bf16 copy until the activation's backward fills it).
      activation::forward(act_, act_kernels_, k, M * ni, G, U, Hh);
      bf16* hb16 = reinterpret_cast<bf16*>(dGU);
      k.cvt_f32_bf16(M * ni, Hh, hb16);
      k.cvt_bf16_f32(M * ni, hb16, Hh);
      // dw partial = <D, h> over this chunk (the kernels' dot order); then dh = w D (into D).
      for (int64_t m = 0; m < M; ++m) {
        const float* d = D + m * ni;
        k.gemm_f32_nt(1, 1, ni, 1.0f, d, ni, Hh + m * ni, ni, dwpart + (m0 + m) * n_ichunks + chunk,
                      1, false);
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
        // (dGU B) partial for this chunk: dGU (M x 2ni) . Bgu^T[:, chunk]^T -> M x RA, row m at
        // slot m0 + m's partial of this chunk (each row's sums do not depend on M: kernels.h).
        k.gemm_f32_nt(M, RA, 2 * ni, 1.0f, dGU, 2 * ni, bgu_t_ + tl.e * RA * 2 * Ib + 32 * tl.n0,
                      2 * Ib, gbpart + (m0 * n_ichunks + chunk) * RA, n_ichunks * RA, false);
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

  if (q8) {  // dGU codes, in the slot the dY codes used
    tiles = gather_tiles(off, E);
    parallel_for(static_cast<int64_t>(tiles.size()), nt, [&](int64_t i, int th) {
      const Tile& tl = tiles[static_cast<size_t>(i)];
      w8a8_quantize_dgu(tl.e, tl.m1 - tl.m0, dgu + tl.m0 * 2 * Ib, lay, codes + tl.m0 * lay.ld,
                        sdgu + tl.m0, local_buf<float>(th, kL0, 2 * Ib));
    });
    clock.mark("quantize_dgu");
  }

  // -- gate_up^T tiles (expert, H chunk): dx per slot; LoRA A and down-B grads. Then the
  // per-token combine of dx. Both per group of H columns (see col_groups). Tensor parallel: tile
  // i of slice s (on group s) writes slice s's partial of dx (the product over its I columns);
  // slice 0's tile adds the LoRA A term and owns the tile's LoRA A / down-B gradients.
  const ColGroups cg = col_groups(Sg * static_cast<int64_t>(tp), nbH_, kBlocksBwdH);
  const int64_t ldx = cg.blocks * kBlockN, xpart = S * ldx;
  float* dxs = shared_buf<float>(kSlotY, static_cast<int64_t>(tp) * xpart);
  // Partials this large leave the caches before the combine reads them: the tiles stream them.
  const bool stream_dx = streamed(static_cast<int64_t>(tp) * xpart);
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
      const int64_t rows_max = std::min(kRowsBwd, tl.m1 - tl.m0);
      bf16* wgt = nullptr;
      int8_t* wgt8 = nullptr;
      int32_t* acc8 = nullptr;
      if (q8) {  // the codes of Wgu^T's chunk over the slice's depth, and int32 sums
        const int64_t bb = kernels::i8_block_bytes(lay.depth[static_cast<size_t>(sidx)]);
        wgt8 = local_buf<int8_t>(th, kL0, nb * bb);
        k.pack_transposed_i8(sl.wgu.as<int8_t>() + tl.e * 2 * sl.nb * quant::block_bytes(fgu_),
                             2 * kBlockN * sl.nb, fgu_.Kp, h0, nb, wgt8, bb);
        acc8 = local_buf<int32_t>(th, kL5, rows_max * nh);
      } else {
        wgt = local_buf<bf16>(th, kL0, nb * kernels::packed_block_elems(depth));
        gu_transposed(sidx, tl.e, h0, nb, wgt, th);
      }
      float* xf = local_buf<float>(th, kL1, rows_max * nh);
      float* yf = local_buf<float>(th, kL2, rows_max * nh);
      float* acc_a = grads0 ? local_buf<float>(th, kL3, RA * nh) : nullptr;
      float* acc_bd = grads0 ? local_buf<float>(th, kL4, r * nh) : nullptr;
      float* cbuf = stream_dx ? local_buf<float>(th, kL7, rows_max * nh) : nullptr;
      if (grads0) {
        std::fill(acc_a, acc_a + RA * nh, 0.0f);
        std::fill(acc_bd, acc_bd + r * nh, 0.0f);
      }
      for (int64_t m0 = tl.m0; m0 < tl.m1; m0 += kRowsBwd) {
        const int64_t M = std::min(kRowsBwd, tl.m1 - m0);
        float* dxt = dxs + sidx * xpart + m0 * ldx + (h0 - kBlockN * blo);
        float* C = stream_dx ? cbuf : dxt;
        const int64_t ldc = stream_dx ? nh : ldx;
        if (q8) {
          const size_t si = static_cast<size_t>(sidx);
          k.gemm_i8(M, nb, lay.depth[si], codes + m0 * lay.ld + lay.seg_off[si], lay.ld, wgt8, acc8,
                    nh, false);
          k_.scale_i32_f32(M, nh, acc8, nh, sdgu + m0, nullptr, C, ldc);
        } else {
          k.gemm_bf16(M, nb, depth, dgu + m0 * Kgu + c0, Kgu, wgt, C, ldc, false);
        }
        if (lora0) {
          k.gemm_f32_nn(M, nh, RA, s, gbsum + m0 * RA, RA, a_all_ + tl.e * RA * Hb + h0, Hb, C, ldc,
                        true);
        }
        if (stream_dx) k.stream_rows_f32(M, nh, C, ldc, dxt, ldx);
        if (grads0) {
          for (int64_t m = 0; m < M; ++m) {
            // Each row's nh columns come from another token's row (and another dY row): fetch
            // them a few rows ahead, as no hardware prefetcher follows that pattern.
            if (m + kRowsAhead < M) {
              prefetch_span(xb + slot_tok[m0 + m + kRowsAhead] * KpH + h0, nh);
              prefetch_span(dyg + (m0 + m + kRowsAhead) * KpH + h0, nh);
            }
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

}  // namespace kt::engine
