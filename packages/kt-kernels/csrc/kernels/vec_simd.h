// SIMD versions of the fp32 helper entries of KernelTable (LoRA-sized products, bf16 conversion,
// the SiLU gate, the transposed repack), written once over a small vector vocabulary that is
// defined for AVX-512 (16 lanes) or AVX2 (8 lanes) from the flags of the including file. Included
// only by kernels/<isa>/vec.cpp; everything here has internal linkage.
//
// Each entry keeps the order of operations of the scalar reference (kernels/scalar/vec.cpp), so
// the products, conversions and repack equal it bit for bit: each multiply-add is one fused,
// once-rounded FMA (the scalar code's std::fma), dot products use 16 interleaved partial sums and
// the same pairwise tree. Tails run the same vector code under a mask, so results never depend
// on where an array starts or how a caller splits it. Only silu_mul(_bwd) differ: they use a
// polynomial exp (within a few ulp of libm's expf) instead of a call per element.
#pragma once

#ifndef KT_CPU_CAPABILITY
#error "vec_simd.h belongs to the per-ISA kernel files only"
#endif

#include "kernels/intrinsics.h"

#include <cstdint>
#include <cstring>

#include "kernels/kernels.h"

namespace kt::kernels {
namespace {
namespace vec {

// ---- vector vocabulary ------------------------------------------------------------------------
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr int W = 16;
using VF = __m512;
using VI = __m512i;
inline __mmask16 lanes(int n) { return n >= W ? __mmask16(0xffff) : __mmask16((1u << n) - 1u); }
inline VF vzero() { return _mm512_setzero_ps(); }
inline VF vset1(float x) { return _mm512_set1_ps(x); }
inline VI iset1(int32_t x) { return _mm512_set1_epi32(x); }
inline VF vadd(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF vsub(VF a, VF b) { return _mm512_sub_ps(a, b); }
inline VF vmul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF vdiv(VF a, VF b) { return _mm512_div_ps(a, b); }
inline VF vfma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
// min(hi, x) / max(lo, x) return x when x is NaN (MINPS returns its second operand then).
inline VF vmin_keep_nan(VF hi, VF x) { return _mm512_min_ps(hi, x); }
inline VF vmax_keep_nan(VF lo, VF x) { return _mm512_max_ps(lo, x); }
inline VF vround(VF x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline VI vcvt_i32(VF x) { return _mm512_cvtps_epi32(x); }
inline VF as_f(VI x) { return _mm512_castsi512_ps(x); }
inline VI as_i(VF x) { return _mm512_castps_si512(x); }
inline VI iadd(VI a, VI b) { return _mm512_add_epi32(a, b); }
inline VI iand(VI a, VI b) { return _mm512_and_si512(a, b); }
inline VI ior(VI a, VI b) { return _mm512_or_si512(a, b); }
template <int S>
inline VI ishl(VI a) {
  return _mm512_slli_epi32(a, S);
}
template <int S>
inline VI ishr(VI a) {
  return _mm512_srli_epi32(a, S);
}
inline VF vselect_gt(VF x, float limit, VF if_gt, VF otherwise) {  // x > limit ? if_gt : otherwise
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(limit), _CMP_GT_OQ), otherwise,
                              if_gt);
}
inline VI iselect_gt(VI a, VI b, VI if_gt, VI otherwise) {  // signed a > b
  return _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(a, b), otherwise, if_gt);
}
inline VF vload(const float* p) { return _mm512_loadu_ps(p); }
inline VF vload_n(const float* p, int n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
// n int32 converted to fp32 (round to nearest even, as static_cast<float>).
inline VF vload_i32_n(const int32_t* p, int n) {
  return _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(lanes(n), p));
}
inline void vstore(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline void vstore_n(float* p, VF v, int n) { _mm512_mask_storeu_ps(p, lanes(n), v); }
inline void vstream(float* p, VF v) { _mm512_stream_ps(p, v); }  // p: W floats aligned
// W bf16 widened to their 32-bit lanes (zero-extended) / low 16 bits of each lane stored as bf16.
inline VI load_u16_n(const bf16* p, int n) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes(n), p));
}
inline void store_u16_n(bf16* p, VI v, int n) {
  _mm256_mask_storeu_epi16(p, lanes(n), _mm512_cvtepi32_epi16(v));
}
// Sum of the 16 lanes of acc[0] by the tree of the scalar reference: l += l + 8, l + 4, l + 2, l
// + 1.
inline float tree_sum(const VF* acc) {
  const __m256 s8 =
      _mm256_add_ps(_mm512_castps512_ps256(acc[0]),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[0]), 1)));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int W = 8;
using VF = __m256;
using VI = __m256i;
inline VI lane_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline VF vzero() { return _mm256_setzero_ps(); }
inline VF vset1(float x) { return _mm256_set1_ps(x); }
inline VI iset1(int32_t x) { return _mm256_set1_epi32(x); }
inline VF vadd(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VF vsub(VF a, VF b) { return _mm256_sub_ps(a, b); }
inline VF vmul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF vdiv(VF a, VF b) { return _mm256_div_ps(a, b); }
inline VF vfma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF vmin_keep_nan(VF hi, VF x) { return _mm256_min_ps(hi, x); }
inline VF vmax_keep_nan(VF lo, VF x) { return _mm256_max_ps(lo, x); }
inline VF vround(VF x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VI vcvt_i32(VF x) { return _mm256_cvtps_epi32(x); }
inline VF as_f(VI x) { return _mm256_castsi256_ps(x); }
inline VI as_i(VF x) { return _mm256_castps_si256(x); }
inline VI iadd(VI a, VI b) { return _mm256_add_epi32(a, b); }
inline VI iand(VI a, VI b) { return _mm256_and_si256(a, b); }
inline VI ior(VI a, VI b) { return _mm256_or_si256(a, b); }
template <int S>
inline VI ishl(VI a) {
  return _mm256_slli_epi32(a, S);
}
template <int S>
inline VI ishr(VI a) {
  return _mm256_srli_epi32(a, S);
}
inline VF vselect_gt(VF x, float limit, VF if_gt, VF otherwise) {
  return _mm256_blendv_ps(otherwise, if_gt, _mm256_cmp_ps(x, _mm256_set1_ps(limit), _CMP_GT_OQ));
}
inline VI iselect_gt(VI a, VI b, VI if_gt, VI otherwise) {
  return _mm256_blendv_epi8(otherwise, if_gt, _mm256_cmpgt_epi32(a, b));
}
inline VF vload(const float* p) { return _mm256_loadu_ps(p); }
inline VF vload_n(const float* p, int n) { return _mm256_maskload_ps(p, lane_mask(n)); }
inline VF vload_i32_n(const int32_t* p, int n) {
  return _mm256_cvtepi32_ps(_mm256_maskload_epi32(p, lane_mask(n)));
}
inline void vstore(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline void vstore_n(float* p, VF v, int n) { _mm256_maskstore_ps(p, lane_mask(n), v); }
inline void vstream(float* p, VF v) { _mm256_stream_ps(p, v); }  // p: W floats aligned
inline VI load_u16_n(const bf16* p, int n) {
  __m128i x;
  if (n >= W) {
    x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
    alignas(16) bf16 buf[W] = {};
    std::memcpy(buf, p, sizeof(bf16) * static_cast<size_t>(n));
    x = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
  }
  return _mm256_cvtepu16_epi32(x);
}
inline void store_u16_n(bf16* p, VI v, int n) {
  // Lanes hold values < 2^16: pack to 16 bits, then undo packus's per-128-bit interleave.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), 0x08);
  const __m128i x = _mm256_castsi256_si128(packed);
  if (n >= W) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), x);
  } else {
    alignas(16) bf16 buf[W];
    _mm_store_si128(reinterpret_cast<__m128i*>(buf), x);
    std::memcpy(p, buf, sizeof(bf16) * static_cast<size_t>(n));
  }
}
// acc[0] holds lanes 0..7, acc[1] lanes 8..15 of the reference's 16 partial sums.
inline float tree_sum(const VF* acc) {
  const __m256 s8 = _mm256_add_ps(acc[0], acc[1]);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
#else
#error "vec_simd.h needs AVX-512 (F, BW, VL) or AVX2 + FMA"
#endif

inline int clamp_lanes(int64_t n) { return n >= W ? W : (n <= 0 ? 0 : static_cast<int>(n)); }

// ---- small fp32 products ----------------------------------------------------------------------
// Register tile of the nn / tn products: up to kRows rows x 2 vectors of C, k innermost. With 32
// vector registers (AVX-512) 8 rows: 16 independent FMA chains keep both FMA ports busy and each
// B vector serves 8 rows; AVX2's 16 registers hold 4 rows.
constexpr int kRows = W == 16 ? 8 : 4;
constexpr int kCols = 2 * W;

// Depth per pass of the nn / tn products. A pass forms the scaled values alpha * A(r, k) of its
// row block once, into a buffer in L1 that the column tiles broadcast from (instead of forming
// them again in every column tile); C carries over between passes through fp32 stores and loads,
// which are exact, so the sums are those of one pass.
constexpr int64_t kDepthPass = 256;

// C rows [0, MR) x columns [n0, n0 + ncols) = (accumulate ? C : 0) + sum_k as[k][r] * B[k, :],
// k = 0, 1, ..., where as[k][r] (kRows per k) holds alpha * A(r, k).
template <int MR>
inline void rank1_tile(int64_t K, const float* as, const float* B, int64_t ldb, float* C,
                       int64_t ldc, int64_t ncols, bool accumulate) {
  const int n0 = clamp_lanes(ncols), n1 = clamp_lanes(ncols - W);
  VF c[MR][2];
  for (int r = 0; r < MR; ++r) {
    c[r][0] = accumulate ? vload_n(C + r * ldc, n0) : vzero();
    c[r][1] = accumulate ? vload_n(C + r * ldc + W, n1) : vzero();
  }
  for (int64_t k = 0; k < K; ++k) {
    const VF b0 = vload_n(B + k * ldb, n0), b1 = vload_n(B + k * ldb + W, n1);
    for (int r = 0; r < MR; ++r) {
      const VF a = vset1(as[k * kRows + r]);
      c[r][0] = vfma(a, b0, c[r][0]);
      c[r][1] = vfma(a, b1, c[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    vstore_n(C + r * ldc, c[r][0], n0);
    vstore_n(C + r * ldc + W, c[r][1], n1);
  }
}

// rank1_tile<rows> for rows in [1, MR].
template <int MR>
inline void rank1_rows(int rows, int64_t K, const float* as, const float* B, int64_t ldb, float* C,
                       int64_t ldc, int64_t ncols, bool accumulate) {
  if (rows == MR) {
    rank1_tile<MR>(K, as, B, ldb, C, ldc, ncols, accumulate);
  } else if constexpr (MR > 1) {
    rank1_rows<MR - 1>(rows, K, as, B, ldb, C, ldc, ncols, accumulate);
  }
}

template <bool kTransA>
void gemm_f32_rank1(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  alignas(64) float as[kDepthPass * kRows];
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const int rows = static_cast<int>(M - m0 < kRows ? M - m0 : kRows);
    // K = 0 still runs one (empty) pass: C = accumulate ? C : 0.
    for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kDepthPass) {
      const int64_t kc = K - k0 < kDepthPass ? K - k0 : kDepthPass;
      // A(r, k): row m0 + r, depth k; stored A[m, k] (nn) or A[k, m] (tn).
      for (int64_t k = 0; k < kc; ++k) {
        for (int r = 0; r < rows; ++r) {
          as[k * kRows + r] =
              alpha * (kTransA ? A[(k0 + k) * lda + m0 + r] : A[(m0 + r) * lda + k0 + k]);
        }
      }
      const bool acc = accumulate || k0 > 0;
      for (int64_t n0 = 0; n0 < N; n0 += kCols) {
        const float* b = B + k0 * ldb + n0;
        float* c = C + m0 * ldc + n0;
        const int64_t ncols = N - n0;
        rank1_rows<kRows>(rows, kc, as, b, ldb, c, ldc, ncols, acc);
      }
    }
  }
}

void gemm_f32_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_f32_rank1<false>(M, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
}

void gemm_f32_tn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_f32_rank1<true>(M, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
}

// Dot products of one row of A with G rows of B: 16 partial sums each (16 / W vectors), lane l
// taking k = l, l + 16, ..., then the reference's tree.
constexpr int kDotLanes = 16;
constexpr int kDotVecs = kDotLanes / W;

// R rows of A against G rows of B: R x G dot products at once, B loads shared by the R rows.
template <int R, int G>
inline void dots(int64_t K, const float* const* a, const float* const* b, float (*out)[G]) {
  VF acc[R][G][kDotVecs];
  for (int i = 0; i < R; ++i) {
    for (int g = 0; g < G; ++g) {
      for (int v = 0; v < kDotVecs; ++v) acc[i][g][v] = vzero();
    }
  }
  int64_t k = 0;
  for (; k + kDotLanes <= K; k += kDotLanes) {
    for (int v = 0; v < kDotVecs; ++v) {
      VF x[R];
      for (int i = 0; i < R; ++i) x[i] = vload(a[i] + k + v * W);
      for (int g = 0; g < G; ++g) {
        const VF y = vload(b[g] + k + v * W);
        for (int i = 0; i < R; ++i) acc[i][g][v] = vfma(x[i], y, acc[i][g][v]);
      }
    }
  }
  if (k < K) {  // the tail under a mask: lanes past K add 0 * 0, which leaves a partial sum as is
    for (int v = 0; v < kDotVecs; ++v) {
      const int n = clamp_lanes(K - k - v * W);
      VF x[R];
      for (int i = 0; i < R; ++i) x[i] = vload_n(a[i] + k + v * W, n);
      for (int g = 0; g < G; ++g) {
        const VF y = vload_n(b[g] + k + v * W, n);
        for (int i = 0; i < R; ++i) acc[i][g][v] = vfma(x[i], y, acc[i][g][v]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int g = 0; g < G; ++g) out[i][g] = tree_sum(acc[i][g]);
  }
}

// C[m, n] = (accumulate ? C : 0) + alpha * dot(A[m, :], B[n, :]) for R rows x G columns.
template <int R, int G>
inline void nt_block(int64_t m, int64_t n, int64_t K, float alpha, const float* A, int64_t lda,
                     const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const float* a[R];
  const float* b[G];
  for (int i = 0; i < R; ++i) a[i] = A + (m + i) * lda;
  for (int g = 0; g < G; ++g) b[g] = B + (n + g) * ldb;
  float d[R][G];
  dots<R, G>(K, a, b, d);
  for (int i = 0; i < R; ++i) {
    float* c = C + (m + i) * ldc + n;
    for (int g = 0; g < G; ++g) {
      const float v = alpha * d[i][g];
      c[g] = accumulate ? c[g] + v : v;
    }
  }
}

// R rows x 4 columns of dot products per pass (4R independent partial-sum chains per vector of
// lanes), then column tails.
template <int R>
inline void nt_rows(int64_t m, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int64_t n = 0;
  for (; n + 4 <= N; n += 4) nt_block<R, 4>(m, n, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
  for (; n < N; ++n) nt_block<R, 1>(m, n, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
}

template <int R>
void nt_all_rows(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int64_t m = 0;
  for (; m + R <= M; m += R) nt_rows<R>(m, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
  for (; m < M; ++m) nt_rows<1>(m, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
}

// Each B vector loaded serves R rows. Where B is larger than L1 can hold beside A (x A^T's 16 x
// 2048 floats), 4 rows read it from L2 half as often as 2 and run 1.2-1.6x faster (bench_gemm
// --lora); a B that stays in L1 (dGU Bgu's 16 x 192) runs faster with 2. AVX2 holds 2 vectors per
// sum: 1 row. Every element's sum is the same whatever R: the same bits.
void gemm_f32_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int64_t kBInL1Bytes = 16 << 10;
  if constexpr (kDotVecs == 1) {
    if (N * K * static_cast<int64_t>(sizeof(float)) > kBInL1Bytes) {
      nt_all_rows<4>(M, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
    } else {
      nt_all_rows<2>(M, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
    }
  } else {
    nt_all_rows<1>(M, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
  }
}

// ---- copies -------------------------------------------------------------------------------------
void stream_rows_f32(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst,
                     int64_t ldd) {
  constexpr uintptr_t kAlign = W * sizeof(float);
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * lds;
    float* d = dst + r * ldd;
    // Plain stores up to the first aligned vector, non-temporal stores after, a masked tail.
    int64_t c = 0;
    const uintptr_t mis = reinterpret_cast<uintptr_t>(d) % kAlign;
    if (mis != 0 && mis % sizeof(float) == 0) {
      const int64_t to_aligned = static_cast<int64_t>((kAlign - mis) / sizeof(float));
      const int head = static_cast<int>(cols < to_aligned ? cols : to_aligned);
      vstore_n(d, vload_n(s, head), head);
      c = head;
    } else if (mis != 0) {  // not even float-aligned: no non-temporal stores at all
      for (; c < cols; c += W) {
        const int cnt = clamp_lanes(cols - c);
        vstore_n(d + c, vload_n(s + c, cnt), cnt);
      }
    }
    for (; c + W <= cols; c += W) vstream(d + c, vload(s + c));
    if (c < cols) {
      const int cnt = clamp_lanes(cols - c);
      vstore_n(d + c, vload_n(s + c, cnt), cnt);
    }
  }
  _mm_sfence();
}

// ---- W8A8 scaling -------------------------------------------------------------------------------
void scale_i32_f32(int64_t M, int64_t N, const int32_t* acc, int64_t ldacc, const float* sa,
                   const float* sw, float* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    const VF s = vset1(sa[m]);
    for (int64_t j = 0; j < N; j += W) {
      const int cnt = clamp_lanes(N - j);
      VF v = vmul(vload_i32_n(acc + m * ldacc + j, cnt), s);
      if (sw != nullptr) v = vmul(v, vload_n(sw + j, cnt));
      vstore_n(C + m * ldc + j, v, cnt);
    }
  }
}

// ---- conversions --------------------------------------------------------------------------------
void cvt_bf16_f32(int64_t n, const bf16* src, float* dst) {
  for (int64_t i = 0; i < n; i += W) {
    const int cnt = clamp_lanes(n - i);
    vstore_n(dst + i, as_f(ishl<16>(load_u16_n(src + i, cnt))), cnt);
  }
}

// Round to nearest even; a NaN keeps its sign and top payload bits and is made quiet.
inline VI to_bf16_bits(VF x) {
  const VI bits = as_i(x);
  const VI rounded = ishr<16>(iadd(bits, iadd(iset1(0x7fff), iand(ishr<16>(bits), iset1(1)))));
  const VI quiet_nan = ior(ishr<16>(bits), iset1(0x40));
  return iselect_gt(iand(bits, iset1(0x7fffffff)), iset1(0x7f800000), quiet_nan, rounded);
}

void cvt_f32_bf16(int64_t n, const float* src, bf16* dst) {
  for (int64_t i = 0; i < n; i += W) {
    const int cnt = clamp_lanes(n - i);
    store_u16_n(dst + i, to_bf16_bits(vload_n(src + i, cnt)), cnt);
  }
}

// ---- SiLU gate ----------------------------------------------------------------------------------
// e^x: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-7 polynomial (the Cephes expf coefficients),
// times 2^n built in the exponent bits. Overflow gives +inf, underflow 0, NaN stays NaN.
inline VF vexp(VF x) {
  const VF xc = vmax_keep_nan(vset1(-87.33654f), vmin_keep_nan(vset1(88.37626f), x));
  const VF n = vround(vmul(xc, vset1(1.44269504088896341f)));
  VF r = vfma(n, vset1(-0.693359375f), xc);
  r = vfma(n, vset1(2.12194440e-4f), r);
  VF p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vset1(1.0f)));
  const VF scale = as_f(ishl<23>(iadd(vcvt_i32(n), iset1(127))));
  const VF e = vmul(p, scale);
  return vselect_gt(x, 88.72283f, vset1(__builtin_huge_valf()), e);
}

inline VF sigmoid(VF g) {
  const VF one = vset1(1.0f);
  return vdiv(one, vadd(one, vexp(vsub(vzero(), g))));
}

// silu(g) * u of one vector: the arithmetic of silu_mul and of silu_mul_interleaved_bf16.
inline VF silu_times(VF g, VF u) { return vmul(vmul(g, sigmoid(g)), u); }

void silu_mul(int64_t n, const float* g, const float* u, float* h) {
  for (int64_t i = 0; i < n; i += W) {
    const int cnt = clamp_lanes(n - i);
    vstore_n(h + i, silu_times(vload_n(g + i, cnt), vload_n(u + i, cnt)), cnt);
  }
}

// silu_mul's arithmetic and cvt_f32_bf16's rounding per 16-column gate / up pair, reading the
// interleaved rows in place: no de-interleaved copies, no fp32 h.
void silu_mul_interleaved_bf16(int64_t M, int64_t nq, const float* gu, int64_t ldgu, bf16* h,
                               int64_t ldh) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = gu + m * ldgu;
    bf16* out = h + m * ldh;
    for (int64_t q = 0; q < nq; ++q) {
      for (int j = 0; j < 16; j += W) {
        const VF hv = silu_times(vload(row + 32 * q + j), vload(row + 32 * q + 16 + j));
        store_u16_n(out + 16 * q + j, to_bf16_bits(hv), W);
      }
    }
  }
}

void silu_mul_bwd(int64_t n, const float* g, const float* u, const float* dh, float* dg,
                  float* du) {
  const VF one = vset1(1.0f);
  for (int64_t i = 0; i < n; i += W) {
    const int cnt = clamp_lanes(n - i);
    const VF gv = vload_n(g + i, cnt), uv = vload_n(u + i, cnt), dhv = vload_n(dh + i, cnt);
    const VF sig = sigmoid(gv);
    const VF dsilu = vmul(sig, vadd(one, vmul(gv, vsub(one, sig))));
    vstore_n(dg + i, vmul(vmul(dhv, uv), dsilu), cnt);
    vstore_n(du + i, vmul(dhv, vmul(gv, sig)), cnt);
  }
}

// ---- transposed repack --------------------------------------------------------------------------
// A 16 x 16 sub-tile is 8 source rows of 64 bytes (k pairs x 16 n) and 8 destination rows (n pairs
// x 16 k). Viewed as 8 x 8 qwords (4 bf16 each), destination qword (i, j) is source qword (j, i)
// with its two middle bf16 swapped: a qword transpose plus one byte shuffle.
#if defined(__AVX512F__)
inline __m512i swap_middle_words(__m512i q) {
  const __m512i idx =
      _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15));
  return _mm512_shuffle_epi8(q, idx);
}

inline void transpose_subtile(const bf16* s, bf16* o) {
  __m512i r[8], t[8], u[8];
  for (int j = 0; j < 8; ++j) r[j] = _mm512_loadu_si512(s + j * 32);
  for (int j = 0; j < 8; j += 2) {
    t[j] = _mm512_unpacklo_epi64(r[j], r[j + 1]);      // q0 q2 q4 q6 of rows j, j + 1
    t[j + 1] = _mm512_unpackhi_epi64(r[j], r[j + 1]);  // q1 q3 q5 q7
  }
  for (int h = 0; h < 8; h += 4) {                              // rows h..h+3
    u[h + 0] = _mm512_shuffle_i64x2(t[h], t[h + 2], 0x88);      // q0, q4
    u[h + 1] = _mm512_shuffle_i64x2(t[h], t[h + 2], 0xdd);      // q2, q6
    u[h + 2] = _mm512_shuffle_i64x2(t[h + 1], t[h + 3], 0x88);  // q1, q5
    u[h + 3] = _mm512_shuffle_i64x2(t[h + 1], t[h + 3], 0xdd);  // q3, q7
  }
  // u[x] (rows 0-3) and u[4 + x] (rows 4-7) give destination rows {q, q + 4}.
  const int first[4] = {0, 2, 1, 3};
  for (int x = 0; x < 4; ++x) {
    const __m512i lo = _mm512_shuffle_i64x2(u[x], u[4 + x], 0x88);
    const __m512i hi = _mm512_shuffle_i64x2(u[x], u[4 + x], 0xdd);
    _mm512_storeu_si512(o + first[x] * 32, swap_middle_words(lo));
    _mm512_storeu_si512(o + (first[x] + 4) * 32, swap_middle_words(hi));
  }
}
#else
inline __m256i swap_middle_words(__m256i q) {
  const __m256i idx = _mm256_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15, 0, 1,
                                       4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15);
  return _mm256_shuffle_epi8(q, idx);
}

// 4 x 4 qword transpose of rows r0..r3 (qwords q..q+3 each): out[i] = (r0.qi, r1.qi, r2.qi, r3.qi).
inline void transpose4(const __m256i* r, __m256i* out) {
  const __m256i t0 = _mm256_unpacklo_epi64(r[0], r[1]), t1 = _mm256_unpackhi_epi64(r[0], r[1]);
  const __m256i t2 = _mm256_unpacklo_epi64(r[2], r[3]), t3 = _mm256_unpackhi_epi64(r[2], r[3]);
  out[0] = _mm256_permute2x128_si256(t0, t2, 0x20);
  out[1] = _mm256_permute2x128_si256(t1, t3, 0x20);
  out[2] = _mm256_permute2x128_si256(t0, t2, 0x31);
  out[3] = _mm256_permute2x128_si256(t1, t3, 0x31);
}

inline void transpose_subtile(const bf16* s, bf16* o) {
  for (int jb = 0; jb < 8; jb += 4) {    // source rows jb..jb+3 -> destination qwords jb..jb+3
    for (int ib = 0; ib < 8; ib += 4) {  // source qwords ib..ib+3 -> destination rows ib..ib+3
      __m256i r[4], t[4];
      for (int j = 0; j < 4; ++j) {
        r[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + (jb + j) * 32 + ib * 4));
      }
      transpose4(r, t);
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + (ib + i) * 32 + jb * 4),
                            swap_middle_words(t[i]));
      }
    }
  }
}
#endif

void pack_transposed(const bf16* W_, int64_t N, int64_t Kp, int64_t k0, int64_t nblk, bf16* dst,
                     int64_t ldd) {
  const int64_t KpT = packed_k(N);
  const int64_t src_block = kBlockN * Kp;
  const int64_t n_rows = packed_blocks(N) * kBlockN;
  constexpr int64_t kAhead = 8;
  for (int64_t ob = 0; ob < nblk; ++ob) {
    bf16* out = dst + ob * ldd;  // one packed block of W^T
    const int64_t kb = k0 + ob * kBlockN;
    for (int64_t n0 = 0; n0 < KpT; n0 += kBlockN) {
      bf16* o = out + (n0 / 2) * 32;
      if (n0 >= n_rows || kb >= Kp) {
        std::memset(o, 0, sizeof(bf16) * 16 * 16);
        continue;
      }
      const bf16* s = W_ + (n0 / kBlockN) * src_block + (kb / 2) * 32;
      // Consecutive subtiles come from blocks 16 Kp apart, a stride no hardware prefetcher
      // follows: fetch the subtile kAhead blocks on now (8 lines of 64 bytes), into L2: an L1
      // prefetch holds one of the core's few L1 miss buffers until the line arrives, and those
      // then cap the lines in flight (measured: backward 1.07x faster with T1 at 8 blocks ahead
      // than T0 at 4 or 8).
      if (n0 + kAhead * kBlockN < n_rows) {
        for (int l = 0; l < 8; ++l)
          _mm_prefetch(reinterpret_cast<const char*>(s + kAhead * src_block) + 64 * l, _MM_HINT_T1);
      }
      transpose_subtile(s, o);
    }
  }
}

// ---- int8 transposed repack ----------------------------------------------------------------
// A 16 x 16 sub-tile of codes is four 64-byte k quads of a source block: quad c holds, per row n,
// the dword (n, 4c .. 4c + 3), so its 16-byte lane d holds rows 4d .. 4d + 3. Transposing the 4 x 4
// bytes inside every lane turns lane d of quad c into the dwords (k = 4c + i, n = 4d .. 4d + 3),
// which is lane c of destination quad d: a 4 x 4 transpose of lanes finishes it. The row sums of
// the destination (per k, the sum of its codes) add up each dword's four bytes.
inline constexpr int8_t kQuadT[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
struct RowSumsI8 {
  __m512i v = _mm512_setzero_si512();
  void add(__m512i q) {
    const __m512i pairs = _mm512_maddubs_epi16(_mm512_set1_epi8(1), q);  // |sum| <= 254
    v = _mm512_add_epi32(v, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
  }
  void store(int8_t* dst) const { _mm512_storeu_si512(dst, v); }
};

inline void transpose_subtile_i8(const int8_t* s, int8_t* o, RowSumsI8& sums) {
  const __m512i idx =
      _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kQuadT)));
  __m512i z[4];
  for (int c = 0; c < 4; ++c) {
    z[c] = _mm512_shuffle_epi8(_mm512_loadu_si512(s + 64 * c), idx);
  }
  const __m512i t0 = _mm512_shuffle_i32x4(z[0], z[1], 0x44),
                t1 = _mm512_shuffle_i32x4(z[0], z[1], 0xee);
  const __m512i t2 = _mm512_shuffle_i32x4(z[2], z[3], 0x44),
                t3 = _mm512_shuffle_i32x4(z[2], z[3], 0xee);
  const __m512i q[4] = {_mm512_shuffle_i32x4(t0, t2, 0x88), _mm512_shuffle_i32x4(t0, t2, 0xdd),
                        _mm512_shuffle_i32x4(t1, t3, 0x88), _mm512_shuffle_i32x4(t1, t3, 0xdd)};
  for (int d = 0; d < 4; ++d) {
    _mm512_storeu_si512(o + 64 * d, q[d]);
    sums.add(q[d]);
  }
}
#else
struct RowSumsI8 {
  __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();  // rows 0-7, 8-15
  static __m256i sum4(__m256i q) {
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), q);
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
  }
  void add(__m256i q_lo, __m256i q_hi) {
    lo = _mm256_add_epi32(lo, sum4(q_lo));
    hi = _mm256_add_epi32(hi, sum4(q_hi));
  }
  void store(int8_t* dst) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32), hi);
  }
};

inline void transpose_subtile_i8(const int8_t* s, int8_t* o, RowSumsI8& sums) {
  const __m256i idx =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kQuadT)));
  __m256i y[4][2];  // quad c: lanes 0-1, lanes 2-3
  for (int c = 0; c < 4; ++c) {
    for (int h = 0; h < 2; ++h) {
      y[c][h] = _mm256_shuffle_epi8(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 64 * c + 32 * h)), idx);
    }
  }
  for (int d = 0; d < 4; ++d) {  // destination quad d: lane d of quads 0, 1 | of quads 2, 3
    const int h = d / 2;         // the ymm of quad c that holds lane d
    const __m256i lo = d % 2 == 0 ? _mm256_permute2x128_si256(y[0][h], y[1][h], 0x20)
                                  : _mm256_permute2x128_si256(y[0][h], y[1][h], 0x31);
    const __m256i hi = d % 2 == 0 ? _mm256_permute2x128_si256(y[2][h], y[3][h], 0x20)
                                  : _mm256_permute2x128_si256(y[2][h], y[3][h], 0x31);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 64 * d), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 64 * d + 32), hi);
    sums.add(lo, hi);
  }
}
#endif

void pack_transposed_i8(const int8_t* W, int64_t N, int64_t Kp, int64_t k0, int64_t nblk,
                        int8_t* dst, int64_t ldd) {
  const int64_t KpT = packed_k8(N);
  const int64_t src_block = i8_block_bytes(Kp);
  const int64_t n_rows = packed_blocks(N) * kBlockN;
  constexpr int64_t kAhead = 8;  // as pack_transposed: sub-tiles of blocks src_block apart
  for (int64_t ob = 0; ob < nblk; ++ob) {
    int8_t* out = dst + ob * ldd;
    const int64_t kb = k0 + ob * kBlockN;
    RowSumsI8 sums;
    for (int64_t n0 = 0; n0 < KpT; n0 += kBlockN) {
      int8_t* o = out + (n0 / 4) * 64;
      if (n0 >= n_rows || kb >= Kp) {
        std::memset(o, 0, 16 * 16);
        continue;
      }
      const int8_t* s = W + (n0 / kBlockN) * src_block + (kb / 4) * 64;
      if (n0 + kAhead * kBlockN < n_rows) {
        for (int l = 0; l < 4; ++l)
          _mm_prefetch(reinterpret_cast<const char*>(s + kAhead * src_block) + 64 * l, _MM_HINT_T1);
      }
      transpose_subtile_i8(s, o, sums);
    }
    sums.store(out + kBlockN * KpT);
  }
}

// The entries of the including ISA's table that come from the helpers above; the folder's
// gemm.cpp adds its GEMMs. A constant expression, so the folder's table is constant initialised:
// no code runs to build it, and merely taking its address runs no wide instruction.
constexpr KernelTable helper_entries() {
  KernelTable t{};
  t.gemm_f32_nn = &gemm_f32_nn;
  t.gemm_f32_nt = &gemm_f32_nt;
  t.gemm_f32_tn = &gemm_f32_tn;
  t.cvt_bf16_f32 = &cvt_bf16_f32;
  t.cvt_f32_bf16 = &cvt_f32_bf16;
  t.stream_rows_f32 = &stream_rows_f32;
  t.scale_i32_f32 = &scale_i32_f32;
  t.silu_mul = &silu_mul;
  t.silu_mul_bwd = &silu_mul_bwd;
  t.silu_mul_interleaved_bf16 = &silu_mul_interleaved_bf16;
  t.pack_transposed = &pack_transposed;
  t.pack_transposed_i8 = &pack_transposed_i8;
  return t;
}

}  // namespace vec
}  // namespace
}  // namespace kt::kernels
