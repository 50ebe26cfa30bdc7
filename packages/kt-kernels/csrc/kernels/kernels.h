// The one kernel interface of kt-kernels. Callers (the engine) never name an ISA: they get a
// KernelTable for the ISA chosen at run time (kernels/dispatch.h). Each folder kernels/<isa>/
// fills one table and is compiled with that ISA's flags only.
#pragma once

#include <cstdint>
#include <cstring>

namespace kt::kernels {

using bf16 = uint16_t;

// One spelling per ISA: folder name, namespace, CMake option, KT_KERNELS_ISA value, pytest id.
enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3, amx = 4 };
constexpr int kIsaCount = 5;

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

constexpr int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
constexpr int64_t packed_k(int64_t K) { return round_up(K, kPackK); }
constexpr int64_t packed_blocks(int64_t N) { return (N + kBlockN - 1) / kBlockN; }
constexpr int64_t packed_elems(int64_t N, int64_t K) {
  return packed_blocks(N) * kBlockN * packed_k(K);
}
constexpr int64_t packed_block_elems(int64_t K) { return kBlockN * packed_k(K); }

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
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>((bits >> 16) | 0x40u);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<bf16>(bits >> 16);
}

// C[M x 16*nblk] (= or +=) A[M x Kp] . W^T for nblk consecutive packed blocks of W.
//   A: bf16, row-major, row stride lda >= Kp; columns [K, Kp) must be zero.
//   B: pointer to the first of nblk packed blocks (each packed_block_elems(K) bf16), contiguous.
//   C: fp32, row stride ldc >= 16 * nblk. accumulate=false overwrites C.
// Every output element is a dot product over k in a fixed order, so results do not depend on how
// the caller tiles M or N across threads.
using gemm_bf16_fn = void (*)(int64_t M, int64_t nblk, int64_t Kp, const bf16* A, int64_t lda,
                              const bf16* B, float* C, int64_t ldc, bool accumulate);

struct KernelTable {
  Isa isa;
  gemm_bf16_fn gemm_bf16;
};

// Each compiled ISA folder defines its table getter; dispatch.cpp knows which ones exist.
const KernelTable* scalar_table();
const KernelTable* avx2_table();
const KernelTable* avx512_table();
const KernelTable* avx512_bf16_table();
const KernelTable* amx_table();

}  // namespace kt::kernels
