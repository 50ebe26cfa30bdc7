// AVX2 dequantization (kernels/quant_kernels.h): 8 codes per step widened to int32, converted,
// multiplied by the row scales and rounded to bf16 with integer arithmetic (bit-exact with the
// scalar reference). int4 pairs are first unpacked to 32 int8 codes with byte shuffles.
// Quantization: 32 floats per step (IEEE division, round half to even, clamp, then saturating packs
// of values already integral and in range), the tail element by element with the same operations.
#include "kernels/intrinsics.h"  // first: before anything includes <immintrin.h>

#include <algorithm>
#include <cmath>

#include "kernels/quant_kernels.h"

namespace kt::kernels {
namespace {

inline __m256i round8(__m256 v) {  // 8 bf16 in the low 16 bits of each 32-bit lane
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb);
  return _mm256_srli_epi32(r, 16);
}

inline __m256 cvt8(const int8_t* c) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))));
}

inline void pair32(const int8_t* c, const float* sv, bf16* o) {
  for (int h = 0; h < 32; h += 16) {
    const __m256i a = round8(_mm256_mul_ps(cvt8(c + h), _mm256_loadu_ps(sv + h)));
    const __m256i b = round8(_mm256_mul_ps(cvt8(c + h + 8), _mm256_loadu_ps(sv + h + 8)));
    // packus works per 128-bit lane: [a0..3 b0..3 | a4..7 b4..7]; restore the order.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + h), packed);
  }
}

inline void unpack_i4(const uint8_t* c, int8_t* out) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c));
  const __m128i m = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
  const __m128i lo = _mm_sub_epi8(_mm_xor_si128(_mm_and_si128(v, m), eight), eight);
  const __m128i hi =
      _mm_sub_epi8(_mm_xor_si128(_mm_and_si128(_mm_srli_epi16(v, 4), m), eight), eight);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_unpacklo_epi8(lo, hi));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm_unpackhi_epi8(lo, hi));
}

void dequant_i8(int64_t npairs, const int8_t* codes, const float* sv, bf16* out) {
  for (int64_t p = 0; p < npairs; ++p) pair32(codes + 32 * p, sv, out + 32 * p);
}

void dequant_i4(int64_t npairs, const uint8_t* codes, const float* sv, bf16* out) {
  alignas(32) int8_t tmp[32];
  for (int64_t p = 0; p < npairs; ++p) {
    unpack_i4(codes + 16 * p, tmp);
    pair32(tmp, sv, out + 32 * p);
  }
}

// One VNNI-4 quad (16 rows x 4 k) -> the codes of depth pairs 2q and 2q + 1 in pair order (32
// each). Per 16-byte group (4 rows x 4 k) a byte shuffle puts the (k0, k1) halves of its rows in
// the low 8 bytes and the (k2, k3) halves in the high 8; 64-bit permutes then collect the low
// halves of all four groups (pair 2q) and the high halves (pair 2q + 1).
inline void unpack_quad(const int8_t* c, int8_t* out) {
  const __m256i idx = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1,
                                       4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  // Rows 0..7 and 8..15; each 128-bit lane: [lo half of 4 rows | hi half of 4 rows].
  const __m256i a = _mm256_permute4x64_epi64(
      _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)), idx), 0xD8);
  const __m256i b = _mm256_permute4x64_epi64(
      _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32)), idx), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute2x128_si256(a, b, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32), _mm256_permute2x128_si256(a, b, 0x31));
}

void dequant_i8x4(int64_t nquads, const int8_t* codes, const float* sv, bf16* out) {
  alignas(32) int8_t tmp[64];
  for (int64_t q = 0; q < nquads; ++q) {
    unpack_quad(codes + 64 * q, tmp);
    pair32(tmp, sv, out + 64 * q);
    pair32(tmp + 32, sv, out + 64 * q + 32);
  }
}

bool absmax(int64_t n, const float* w, float* amax) {
  // Magnitudes as bits: for non-negative floats the integer order is the float order, and any
  // pattern > 0x7f7fffff is Inf or NaN.
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), big = _mm256_set1_epi32(0x7f7fffff);
  __m256i m = _mm256_setzero_si256(), bad = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256i a =
        _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)), abs_mask);
    bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(a, big));
    m = _mm256_max_epi32(m, a);
  }
  if (!_mm256_testz_si256(bad, bad)) return false;
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), m);
  int32_t mb = 0;
  for (int i = 0; i < 8; ++i) mb = std::max(mb, lanes[i]);
  float r;
  std::memcpy(&r, &mb, sizeof r);
  for (; k < n; ++k) {
    if (!std::isfinite(w[k])) return false;
    r = std::max(r, std::fabs(w[k]));
  }
  *amax = r;
  return true;
}

// kMul: w * vs (quantize_mul), else w / vs (quantize).
template <bool kMul>
inline __m256i code8(const float* w, __m256 vs, __m256 lo, __m256 hi) {
  const __m256 x = _mm256_loadu_ps(w);
  const __m256 q = _mm256_round_ps(kMul ? _mm256_mul_ps(x, vs) : _mm256_div_ps(x, vs),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, q)));
}

template <bool kMul>
void quantize_t(int64_t n, const float* w, float s, float qm, int8_t* codes) {
  const __m256 vs = _mm256_set1_ps(s), hi = _mm256_set1_ps(qm), lo = _mm256_set1_ps(-qm);
  // packs work per 128-bit lane: after both, dwords 0 .. 3 hold codes 0-3, 8-11, 16-19, 24-27
  // and dwords 4 .. 7 codes 4-7, 12-15, 20-23, 28-31.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    const __m256i ab =
        _mm256_packs_epi32(code8<kMul>(w + k, vs, lo, hi), code8<kMul>(w + k + 8, vs, lo, hi));
    const __m256i cd = _mm256_packs_epi32(code8<kMul>(w + k + 16, vs, lo, hi),
                                          code8<kMul>(w + k + 24, vs, lo, hi));
    const __m256i p = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + k), p);
  }
  for (; k < n; ++k) {
    const float q = std::nearbyint(kMul ? w[k] * s : w[k] / s);
    codes[k] = static_cast<int8_t>(std::min(qm, std::max(-qm, q)));
  }
}

void quantize(int64_t n, const float* w, float s, float qm, int8_t* codes) {
  quantize_t<false>(n, w, s, qm, codes);
}

void quantize_mul(int64_t n, const float* w, float r, float qm, int8_t* codes) {
  quantize_t<true>(n, w, r, qm, codes);
}

void scale_bf16(int64_t n, const bf16* g, const float* sw, float* v) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256i bits = _mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + k))), 16);
    _mm256_storeu_ps(v + k, _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_loadu_ps(sw + k)));
  }
  for (; k < n; ++k) v[k] = bf16_to_f32(g[k]) * sw[k];
}

}  // namespace

constexpr QuantKernels kQuantTable = [] {
  QuantKernels t{};
  t.i8 = &dequant_i8;
  t.i4 = &dequant_i4;
  t.i8x4 = &dequant_i8x4;
  t.absmax = &absmax;
  t.quantize = &quantize;
  t.scale_bf16 = &scale_bf16;
  t.quantize_mul = &quantize_mul;
  return t;
}();

const QuantKernels* avx2_quant_table() { return &kQuantTable; }

}  // namespace kt::kernels
