// AVX-512F dequantization (kernels/quant_kernels.h): 16 codes per step widened to int32, converted,
// multiplied by the row scales and rounded to bf16 with integer arithmetic (bit-exact with the
// scalar reference). int4 pairs are first unpacked to 32 int8 codes with byte shuffles; the W8A8
// transposed repack shuffles a sub-tile of quads into pair rows first (kernels/w8a8_transpose.h).
// Quantization: 16 floats per step, tails under a mask; IEEE division, round half to even
// (roundscale), clamp, and a saturating narrow to int8 (the values are already integers in range).
#include "kernels/intrinsics.h"  // first: before anything includes <immintrin.h>

#include <cstdint>

#include "kernels/quant_kernels.h"
#include "kernels/w8a8_transpose.h"

namespace kt::kernels {
namespace {

// fp32 bits rounded to bf16 (nearest even, integer arithmetic) in the high word of each lane.
inline __m512i round_high(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
}

// The high words of a's lanes, then of b's: 32 bf16 in order, by one word permute (narrowing
// each vector on its own took a shift and a two-uop vpmovdw apiece).
alignas(64) constexpr uint16_t kHighWords[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21,
                                                 23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43,
                                                 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};

// 32 codes (lo: 0..15, hi: 16..31) times their scales (s0: codes 0..15, s1: 16..31) as 32 bf16.
inline __m512i codes32(__m128i lo, __m128i hi, const __m512& s0, const __m512& s1) {
  const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo));
  const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi));
  const __m512i idx = _mm512_load_si512(kHighWords);
  return _mm512_permutex2var_epi16(round_high(_mm512_mul_ps(a, s0)), idx,
                                   round_high(_mm512_mul_ps(b, s1)));
}

inline void pair32(const int8_t* c, const __m512& s0, const __m512& s1, bf16* o) {
  _mm512_storeu_si512(o,
                      codes32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)),
                              _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16)), s0, s1));
}

// 16 bytes of int4 pairs -> 32 int8 codes in order (low nibble first).
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
  const __m512 s0 = _mm512_loadu_ps(sv), s1 = _mm512_loadu_ps(sv + 16);
  for (int64_t p = 0; p < npairs; ++p) pair32(codes + 32 * p, s0, s1, out + 32 * p);
}

void dequant_i4(int64_t npairs, const uint8_t* codes, const float* sv, bf16* out) {
  const __m512 s0 = _mm512_loadu_ps(sv), s1 = _mm512_loadu_ps(sv + 16);
  alignas(64) int8_t tmp[32];
  for (int64_t p = 0; p < npairs; ++p) {
    unpack_i4(codes + 16 * p, tmp);
    pair32(tmp, s0, s1, out + 32 * p);
  }
}

// One VNNI-4 quad (16 rows x 4 k, 64 bytes = 32 words, word 2n + h = row n's depths 2h, 2h + 1)
// -> the codes of depth pairs 2q and 2q + 1 in pair order: the even words, then the odd ones.
inline void unpack_quad(const int8_t* c, int8_t* out) {
  const __m512i idx = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
                                       30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  _mm512_storeu_si512(out, _mm512_permutexvar_epi16(idx, _mm512_loadu_si512(c)));
}

void dequant_i8x4(int64_t nquads, const int8_t* codes, const float* sv, bf16* out) {
  const __m512 s0 = _mm512_loadu_ps(sv), s1 = _mm512_loadu_ps(sv + 16);
  alignas(64) int8_t tmp[64];
  for (int64_t q = 0; q < nquads; ++q) {
    unpack_quad(codes + 64 * q, tmp);
    pair32(tmp, s0, s1, out + 64 * q);
    pair32(tmp + 32, s0, s1, out + 64 * q + 32);
  }
}

inline __mmask16 tail_mask(int64_t r) { return static_cast<__mmask16>((1u << r) - 1u); }

bool absmax(int64_t n, const float* w, float* amax) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  __m512i m = _mm512_setzero_si512();
  __mmask16 bad = 0;
  int64_t k = 0;
  // Magnitudes as bits: for non-negative floats the integer order is the float order, and any
  // pattern >= 0x7f800000 is Inf or NaN.
  for (; k + 16 <= n; k += 16) {
    const __m512i a = _mm512_and_si512(_mm512_loadu_si512(w + k), abs_mask);
    bad |= _mm512_cmpge_epi32_mask(a, inf);
    m = _mm512_max_epi32(m, a);
  }
  if (k < n) {
    const __m512i a = _mm512_and_si512(_mm512_maskz_loadu_epi32(tail_mask(n - k), w + k), abs_mask);
    bad |= _mm512_cmpge_epi32_mask(a, inf);
    m = _mm512_max_epi32(m, a);
  }
  if (bad) return false;
  *amax = _mm512_cvtss_f32(_mm512_castsi512_ps(_mm512_set1_epi32(_mm512_reduce_max_epi32(m))));
  return true;
}

// kMul: x * vs (quantize_mul), else x / vs (quantize).
template <bool kMul>
inline __m512 code16(__m512 x, __m512 vs, __m512 lo, __m512 hi) {
  const __m512 q = _mm512_roundscale_ps(kMul ? _mm512_mul_ps(x, vs) : _mm512_div_ps(x, vs),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_min_ps(hi, _mm512_max_ps(lo, q));
}

template <bool kMul>
void quantize_t(int64_t n, const float* w, float s, float qm, int8_t* codes) {
  const __m512 vs = _mm512_set1_ps(s), hi = _mm512_set1_ps(qm), lo = _mm512_set1_ps(-qm);
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512i c = _mm512_cvtps_epi32(code16<kMul>(_mm512_loadu_ps(w + k), vs, lo, hi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k), _mm512_cvtsepi32_epi8(c));
  }
  if (k < n) {
    const __mmask16 m = tail_mask(n - k);
    const __m512i c = _mm512_cvtps_epi32(code16<kMul>(_mm512_maskz_loadu_ps(m, w + k), vs, lo, hi));
    _mm512_mask_cvtsepi32_storeu_epi8(codes + k, m, c);
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
  for (; k < n; k += 16) {
    const __mmask16 m = n - k >= 16 ? __mmask16(0xffff) : tail_mask(n - k);
    const __m512i bits =
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, g + k)), 16);
    _mm512_mask_storeu_ps(
        v + k, m, _mm512_mul_ps(_mm512_castsi512_ps(bits), _mm512_maskz_loadu_ps(m, sw + k)));
  }
}

void dequant_i8x4_t(int64_t nsrc, const int8_t* blk, const float* scales, int64_t Kp, int64_t k0,
                    int64_t nblk, bf16* dst, int64_t ldd) {
  transpose_dequant_w8a8(nsrc, blk, scales, Kp, k0, nblk, dst, ldd,
                         [](__m128i lo, __m128i hi, __m512 s) { return codes32(lo, hi, s, s); });
}

}  // namespace

constexpr QuantKernels kQuantTable = [] {
  QuantKernels t{};
  t.i8 = &dequant_i8;
  t.i4 = &dequant_i4;
  t.i8x4 = &dequant_i8x4;
  t.i8x4_t = &dequant_i8x4_t;
  t.absmax = &absmax;
  t.quantize = &quantize;
  t.scale_bf16 = &scale_bf16;
  t.quantize_mul = &quantize_mul;
  return t;
}();

const QuantKernels* avx512_quant_table() { return &kQuantTable; }

}  // namespace kt::kernels
