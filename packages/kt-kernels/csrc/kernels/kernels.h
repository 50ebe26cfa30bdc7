// The one kernel interface of kt-kernels. Callers (the engine) never name an ISA: they get a
// KernelTable for the ISA chosen at run time (kernels/dispatch.h). Each folder kernels/<isa>/
// fills one table and is compiled with that ISA's flags only.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/isa_list.h"

namespace kt::kernels {

using bf16 = uint16_t;

// One spelling per ISA (kernels/isa_list.h): folder name, namespace, CMake option, KT_KERNELS_ISA
// value, pytest id. Lowest first: a larger value can run every smaller one.
#define KT_ISA_ENUMERATOR(name, flags, features) name,
enum class Isa : int { KT_ISA_LIST(KT_ISA_ENUMERATOR) };
#undef KT_ISA_ENUMERATOR
#define KT_ISA_ONE(name, flags, features) +1
constexpr int kIsaCount = 0 KT_ISA_LIST(KT_ISA_ONE);
#undef KT_ISA_ONE

// ---------------------------------------------------------------------------------------------
// Packed bf16 weight layout, shared by every ISA ("VNNI blocks").
// A weight W of shape N x K (nn.Linear layout: out x in) is stored as ceil(N / kBlockN) blocks of
// kBlockN output rows. Block b holds rows n in [16b, 16b + 16) as Kp/2 x 16 x 2 bf16: element
// (n, k) sits at  block_base + (k / 2) * 32 + (n % 16) * 2 + (k % 2),  with Kp = K rounded up to
// kPackK. Padding rows/columns are zero. One block is exactly a column of AMX B tiles, a run of
// zmm registers for vdpbf16ps, and two ymm/zmm fp32 halves (shift/mask) for AVX2 / AVX-512.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kBlockN = 16;
constexpr int64_t kPackK = 32;

// ---------------------------------------------------------------------------------------------
// Packed int8 weight layout for int8 x int8 GEMMs ("VNNI-4 blocks", activation_dtype int8).
// A weight W of shape N x K is stored as ceil(N / 16) blocks of 16 output rows. Block b holds rows
// n in [16b, 16b + 16) as Kp/4 x 16 x 4 int8 codes: element (n, k) sits at byte
//     (k / 4) * 64 + (n % 16) * 4 + (k % 4)
// with Kp = K rounded up to kPackK8 (padding rows/columns are zero). The 16 * Kp code bytes are
// followed by 16 int32: the sum of the codes of each row (sum over k of W[n, k]). 64 bytes of codes
// (one k quad of all 16 rows) are at once one row of an AMX-INT8 B tile (tdpbssd: 4 consecutive k
// per 32-bit lane), one zmm operand of vpdpbusd, and four 16-byte groups that widen to int16 for
// vpmaddwd. The row sums let u8 x s8 products (vpdpbusd) run on activations offset by +128.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kPackK8 = 64;

// The inline helpers below live in an inline namespace named after the ISA of the translation unit
// (KT_CPU_CAPABILITY in kernels/<isa>/, "baseline" elsewhere). Each ISA's copy then has its own
// mangled name, so the linker can never pick an AVX-512 copy of a helper for baseline code (an
// illegal instruction on older CPUs) when the compiler leaves one out of line (-O0, sanitizers).
#ifdef KT_CPU_CAPABILITY
#define KT_ISA_NAMESPACE KT_CPU_CAPABILITY
#else
#define KT_ISA_NAMESPACE baseline
#endif
inline namespace KT_ISA_NAMESPACE {

constexpr int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
constexpr int64_t packed_k(int64_t K) { return round_up(K, kPackK); }
constexpr int64_t packed_blocks(int64_t N) { return (N + kBlockN - 1) / kBlockN; }
constexpr int64_t packed_elems(int64_t N, int64_t K) {
  return packed_blocks(N) * kBlockN * packed_k(K);
}
constexpr int64_t packed_block_elems(int64_t K) { return kBlockN * packed_k(K); }
constexpr int64_t packed_k8(int64_t K) { return round_up(K, kPackK8); }
// Bytes of one int8 block of padded depth Kp (a multiple of kPackK8): codes, then the row sums.
constexpr int64_t i8_block_bytes(int64_t Kp) {
  return kBlockN * Kp + kBlockN * static_cast<int64_t>(sizeof(int32_t));
}
// Byte offset of element (n % 16, k) inside its int8 block.
constexpr int64_t i8_offset(int64_t n, int64_t k) {
  return (k / 4) * 64 + (n % kBlockN) * 4 + k % 4;
}
// Writes the row sums of an int8 block whose codes are in place.
inline void i8_set_row_sums(int8_t* block, int64_t Kp) {
  int32_t sums[kBlockN] = {};
  for (int64_t k = 0; k < Kp; ++k) {
    for (int64_t n = 0; n < kBlockN; ++n) sums[n] += block[i8_offset(n, k)];
  }
  std::memcpy(block + kBlockN * Kp, sums, sizeof sums);
}

// bf16 <-> fp32 (round to nearest even; NaN stays NaN). Scalar definitions, used for tails.
inline float bf16_to_f32(bf16 v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline bf16 f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u)
    return static_cast<bf16>((bits >> 16) | 0x40u);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<bf16>(bits >> 16);
}

}  // namespace KT_ISA_NAMESPACE

// C[M x 16*nblk] (= or +=) A[M x Kp] . W^T for nblk consecutive packed blocks of W.
//   A: bf16, row-major, row stride lda >= Kp; columns [K, Kp) must be zero.
//   B: pointer to the first of nblk packed blocks (each packed_block_elems(K) bf16), contiguous.
//   C: fp32, row stride ldc >= 16 * nblk. accumulate=false overwrites C.
// Every output element is a dot product over k in a fixed order, so results do not depend on how
// the caller tiles M or N across threads.
using gemm_bf16_fn = void (*)(int64_t M, int64_t nblk, int64_t Kp, const bf16* A, int64_t lda,
                              const bf16* B, float* C, int64_t ldc, bool accumulate);

// C[M x 16*nblk] (= or +=) A[M x Kp] . W^T in int32, for nblk consecutive int8 blocks of W.
//   A: int8, row-major, row stride lda >= Kp; columns [K, Kp) must be zero. Kp is a multiple of
//      kPackK8.
//   B: pointer to the first of nblk int8 blocks (each i8_block_bytes(Kp) bytes, row sums
//      included), contiguous.
//   C: int32, row stride ldc >= 16 * nblk. accumulate=false overwrites C.
// Sums are exact integer sums taken modulo 2^32 (two's complement), so every ISA gives the same
// bits whatever its order; callers keep |A . W^T| < 2^31 (engine: codes in [-127, 127],
// K <= 131072).
using gemm_i8_fn = void (*)(int64_t M, int64_t nblk, int64_t Kp, const int8_t* A, int64_t lda,
                            const int8_t* B, int32_t* C, int64_t ldc, bool accumulate);

// Fused dequantize + GEMM for weight codes (weight_dtype int8 / int4; layout in engine/quant.h):
// the product of dequantizing the nblk blocks to packed bf16 (kernels/quant_kernels.h) and calling
// the same table's gemm_bf16, bit for bit, but each weight value is formed in registers as
// bf16(float(code) * scale) (round to nearest even) right before the ISA's FMA / dot step, in the
// ISA's k order, so no bf16 copy of the blocks is written and read back. That copy costs as much
// as the GEMM when few rows share the blocks (decode: a few tokens per expert).
//   codes:  nblk consecutive code blocks, int8 16 * Kp bytes each, int4 8 * Kp bytes each.
//   scales: float32, one row per packed row of the nblk blocks (16 * nblk rows, in order); int8:
//           one scale per row; int4: ceil(Kp / group) per row, group in {32, 64, 128}.
//   Scales are finite and either 0 or normal (>= 2^-126; the engine stores them so): then no
//   product code * scale is a denormal, which vcvtne2ps2bf16 would flush and the bf16 rounding of
//   quant_kernels.h would not.
// A, lda, C, ldc, accumulate as for gemm_bf16.
using gemm_q8_fn = void (*)(int64_t M, int64_t nblk, int64_t Kp, const bf16* A, int64_t lda,
                            const int8_t* codes, const float* scales, float* C, int64_t ldc,
                            bool accumulate);
using gemm_q4_fn = void (*)(int64_t M, int64_t nblk, int64_t Kp, int64_t group, const bf16* A,
                            int64_t lda, const uint8_t* codes, const float* scales, float* C,
                            int64_t ldc, bool accumulate);

// ---------------------------------------------------------------------------------------------
// fp32 helpers of the engine: the small LoRA products (one of the sizes is the LoRA rank), the
// activation and bf16 conversions. Every entry sums in an order that depends only on its sizes,
// never on pointer alignment or on threads, so results are reproducible bit for bit. The scalar
// reference (kernels/scalar/vec.cpp) defines the order; a SIMD table may leave an entry null and
// the engine then uses the scalar one.
// ---------------------------------------------------------------------------------------------

// C[M x N] = (accumulate ? C : 0) + alpha * (A[M x K] . B[K x N]). Row-major, leading dims in
// elements.
using gemm_f32_nn_fn = void (*)(int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                                int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                                bool accumulate);
// C[M x N] = (accumulate ? C : 0) + alpha * (A[M x K] . B[N x K]^T): dot products over K.
using gemm_f32_nt_fn = gemm_f32_nn_fn;
// C[M x N] = (accumulate ? C : 0) + alpha * (A[K x M]^T . B[K x N]): a sum over k = 0, 1, ...
// of outer products (k is the token axis when the engine reduces LoRA gradients).
using gemm_f32_tn_fn = gemm_f32_nn_fn;

using cvt_bf16_f32_fn = void (*)(int64_t n, const bf16* src, float* dst);
using cvt_f32_bf16_fn = void (*)(int64_t n, const float* src, bf16* dst);  // round to nearest even

// dst rows [0, rows) = src rows (cols floats each; leading dims in elements). SIMD tables store
// with non-temporal stores (no read for ownership, the lines bypass the caches) and fence before
// returning, so other threads that synchronize with the caller afterwards see the values: for
// buffers written once and read much later, e.g. the [g | u] kept for backward.
using stream_rows_f32_fn = void (*)(int64_t rows, int64_t cols, const float* src, int64_t lds,
                                    float* dst, int64_t ldd);

// C[m, j] = (float(acc[m, j]) * sa[m]) * sw[j] for m < M, j < N: two separately rounded products
// (sw null: float(acc[m, j]) * sa[m]). W8A8's int32 sums to fp32 with their row and column scales.
using scale_i32_f32_fn = void (*)(int64_t M, int64_t N, const int32_t* acc, int64_t ldacc,
                                  const float* sa, const float* sw, float* C, int64_t ldc);

// h = silu(g) * u, silu(g) = g / (1 + exp(-g)).
using silu_mul_fn = void (*)(int64_t n, const float* g, const float* u, float* h);
// Given dh: dg = dh * u * silu'(g), du = dh * silu(g).
using silu_mul_bwd_fn = void (*)(int64_t n, const float* g, const float* u, const float* dh,
                                 float* dg, float* du);
// The forward's h rows from its interleaved gate/up output: for m < M, q < nq, j < 16,
// h[m ldh + 16 q + j] = bf16(silu(g) * u) with g = gu[m ldgu + 32 q + j], u = gu[m ldgu + 32 q +
// 16 + j]. One pass for what silu_mul on de-interleaved copies and then cvt_f32_bf16 compute, with
// the same bits as those two entries of the same table.
using silu_mul_interleaved_bf16_fn = void (*)(int64_t M, int64_t nq, const float* gu, int64_t ldgu,
                                              bf16* h, int64_t ldh);

// Repack part of the transpose of a packed weight. W is packed (see above) with N rows and padded
// depth Kp. Writes nblk packed blocks of W^T, i.e. rows k in [k0, k0 + 16 * nblk) of the Kp x N
// matrix W^T, each with padded depth packed_k(N) (columns >= N are zero); k0 is a multiple of 16
// and rows >= Kp are zero. Destination block b starts at dst + b * ldd (ldd >=
// packed_block_elems(N) bf16). Source block j fills pair rows [8j, 8j + 8) of every destination
// block, so a caller may transpose a weight a few source blocks at a time: W advanced by j0 blocks,
// dst by 8 * 32 * j0 elements, N = 16 * g rows and ldd of the whole weight. Groups of an even g
// touch only their own pair rows; a last group of odd g also zeroes the 8 padding pair rows after
// it.
using pack_transposed_fn = void (*)(const bf16* W, int64_t N, int64_t Kp, int64_t k0, int64_t nblk,
                                    bf16* dst, int64_t ldd);

// The same for an int8 weight in VNNI-4 blocks (the layout of gemm_i8, row sums included): W has
// N rows in packed_blocks(N) blocks of i8_block_bytes(Kp) bytes (Kp a multiple of kPackK8).
// Writes nblk int8 blocks of W^T, rows k in [k0, k0 + 16 * nblk) of the Kp x N matrix W^T, each
// of padded depth packed_k8(N) (depths >= 16 * packed_blocks(N) are zero) followed by its 16 row
// sums; k0 is a multiple of 16 and rows >= Kp are zero. Destination block b starts at byte
// dst + b * ldd (ldd >= i8_block_bytes(packed_k8(N))). Only moves codes: every ISA gives the same
// bytes.
using pack_transposed_i8_fn = void (*)(const int8_t* W, int64_t N, int64_t Kp, int64_t k0,
                                       int64_t nblk, int8_t* dst, int64_t ldd);

// Built by each ISA folder with one assignment per entry it provides. An entry left null (and a
// table getter returning null) falls back to the table of the next ISA down (isa_list.h), down to
// scalar (kernels/dispatch.cpp, complete_tables); the scalar table sets every entry.
struct KernelTable {
  Isa isa = Isa::scalar;  // set by the dispatcher: the ISA of the completed table
  // bf16 GEMM with its fused dequantize + GEMM entries: one group, taken together from the ISA
  // below when gemm_bf16 is null, because the fused entries must match this table's own
  // gemm_bf16 bit for bit, whose rounding differs from other ISAs'. With gemm_bf16 set, a null
  // gemm_q8 / gemm_q4 stays null: the ISA has none, and callers dequantize and call gemm_bf16.
  gemm_bf16_fn gemm_bf16 = nullptr;
  gemm_q8_fn gemm_q8 = nullptr;
  gemm_q4_fn gemm_q4 = nullptr;
  // Up to this many rows of A the fused kernels beat dequantization + gemm_bf16 (measured per ISA
  // and code width with bench_gemm --fused; beyond it one dequantized copy serves enough rows to
  // pay for itself): gemm_q8, gemm_q4.
  int64_t fused_max_rows_q8 = 0;
  int64_t fused_max_rows_q4 = 0;
  // The rest fall back one by one.
  gemm_i8_fn gemm_i8 = nullptr;  // int8 x int8 -> int32
  gemm_f32_nn_fn gemm_f32_nn = nullptr;
  gemm_f32_nt_fn gemm_f32_nt = nullptr;
  gemm_f32_tn_fn gemm_f32_tn = nullptr;
  cvt_bf16_f32_fn cvt_bf16_f32 = nullptr;
  cvt_f32_bf16_fn cvt_f32_bf16 = nullptr;
  stream_rows_f32_fn stream_rows_f32 = nullptr;
  scale_i32_f32_fn scale_i32_f32 = nullptr;
  silu_mul_fn silu_mul = nullptr;
  silu_mul_bwd_fn silu_mul_bwd = nullptr;
  // Set together with silu_mul and cvt_f32_bf16 (its bits are theirs): every SIMD table takes all
  // three from its own helpers.
  silu_mul_interleaved_bf16_fn silu_mul_interleaved_bf16 = nullptr;
  pack_transposed_fn pack_transposed = nullptr;
  pack_transposed_i8_fn pack_transposed_i8 = nullptr;
};

// Sets the fp32 helper entries of a table to the scalar reference (kernels/scalar/vec.cpp).
void fill_scalar_helpers(KernelTable* table);

// Each ISA folder kernels/<isa>/ defines <isa>_table(); dispatch.cpp calls those of the ISAs this
// build compiled, and only where the ISA runs.
#define KT_ISA_TABLE_GETTER(name, flags, features) const KernelTable* name##_table();
KT_ISA_LIST(KT_ISA_TABLE_GETTER)
#undef KT_ISA_TABLE_GETTER

}  // namespace kt::kernels
