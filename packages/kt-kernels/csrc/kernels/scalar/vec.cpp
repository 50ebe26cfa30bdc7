// Scalar reference of the fp32 helper entries (kernels.h): LoRA-sized products, bf16 conversion,
// the SiLU gate and the transposed repack of packed weights. Plain loops; the summation order of
// each entry is spelled out here and is what a SIMD version has to keep. Products are summed with
// std::fma (one rounding per multiply-add), as every SIMD ISA's FMA does.
#include <cmath>
#include <cstring>

#include "kernels/kernels.h"

namespace kt::kernels {
namespace {

// Dot products run in kLanes interleaved partial sums (lane l takes k = l, l + kLanes, ...),
// combined by a fixed pairwise tree: the order of a 16-wide SIMD register.
constexpr int kLanes = 16;

float dot(int64_t K, const float* a, const float* b) {
  float acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] = std::fma(a[k + l], b[k + l], acc[l]);
  }
  for (int l = 0; k + l < K; ++l) acc[l] = std::fma(a[k + l], b[k + l], acc[l]);
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0];
}

void zero_rows(int64_t M, int64_t N, float* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = 0.0f;
  }
}

// C[m, :] += (alpha * A[m, k]) * B[k, :] for k = 0, 1, ..., each a fused multiply-add
void gemm_f32_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (!accumulate) zero_rows(M, N, C, ldc);
  for (int64_t m = 0; m < M; ++m) {
    float* c = C + m * ldc;
    for (int64_t k = 0; k < K; ++k) {
      const float a = alpha * A[m * lda + k];
      const float* b = B + k * ldb;
      for (int64_t n = 0; n < N; ++n) c[n] = std::fma(a, b[n], c[n]);
    }
  }
}

// C[m, n] += alpha * dot(A[m, :], B[n, :])
void gemm_f32_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      const float v = alpha * dot(K, A + m * lda, B + n * ldb);
      C[m * ldc + n] = accumulate ? C[m * ldc + n] + v : v;
    }
  }
}

// C[m, :] += (alpha * A[k, m]) * B[k, :] for k = 0, 1, ..., each a fused multiply-add
void gemm_f32_tn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (!accumulate) zero_rows(M, N, C, ldc);
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    for (int64_t m = 0; m < M; ++m) {
      const float a = alpha * A[k * lda + m];
      float* c = C + m * ldc;
      for (int64_t n = 0; n < N; ++n) c[n] = std::fma(a, b[n], c[n]);
    }
  }
}

void cvt_bf16_f32(int64_t n, const bf16* src, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

void cvt_f32_bf16(int64_t n, const float* src, bf16* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

void stream_rows_f32(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst,
                     int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * ldd, src + r * lds, static_cast<size_t>(cols) * sizeof(float));
  }
}

void scale_i32_f32(int64_t M, int64_t N, const int32_t* acc, int64_t ldacc, const float* sa,
                   const float* sw, float* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    const int32_t* a = acc + m * ldacc;
    const float s = sa[m];
    float* c = C + m * ldc;
    if (sw != nullptr) {
      for (int64_t j = 0; j < N; ++j) c[j] = (static_cast<float>(a[j]) * s) * sw[j];
    } else {
      for (int64_t j = 0; j < N; ++j) c[j] = static_cast<float>(a[j]) * s;
    }
  }
}

void silu_mul(int64_t n, const float* g, const float* u, float* h) {
  for (int64_t i = 0; i < n; ++i) {
    const float sig = 1.0f / (1.0f + std::exp(-g[i]));
    h[i] = g[i] * sig * u[i];
  }
}

void silu_mul_interleaved_bf16(int64_t M, int64_t nq, const float* gu, int64_t ldgu, bf16* h,
                               int64_t ldh) {
  float out[16];
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t q = 0; q < nq; ++q) {
      const float* g = gu + m * ldgu + 32 * q;
      silu_mul(16, g, g + 16, out);
      cvt_f32_bf16(16, out, h + m * ldh + 16 * q);
    }
  }
}

void silu_mul_bwd(int64_t n, const float* g, const float* u, const float* dh, float* dg,
                  float* du) {
  for (int64_t i = 0; i < n; ++i) {
    const float sig = 1.0f / (1.0f + std::exp(-g[i]));
    const float silu = g[i] * sig;
    // silu'(g) = sig * (1 + g * (1 - sig))
    dg[i] = dh[i] * u[i] * (sig * (1.0f + g[i] * (1.0f - sig)));
    du[i] = dh[i] * silu;
  }
}

// Works on 16 x 16 sub-tiles: 16 rows n of one source block times 16 depths k (8 k-pairs) become
// 16 rows k of one destination block times 16 depths n (8 n-pairs).
void pack_transposed(const bf16* W, int64_t N, int64_t Kp, int64_t k0, int64_t nblk, bf16* dst,
                     int64_t ldd) {
  const int64_t KpT = packed_k(N);                    // depth of W^T
  const int64_t src_block = kBlockN * Kp;             // one packed block of W
  const int64_t n_rows = packed_blocks(N) * kBlockN;  // rows of W that exist (padded to 16)
  for (int64_t ob = 0; ob < nblk; ++ob) {
    bf16* out = dst + ob * ldd;            // one packed block of W^T
    const int64_t kb = k0 + ob * kBlockN;  // first source depth of this destination block
    for (int64_t n0 = 0; n0 < KpT; n0 += kBlockN) {
      // Destination: rows (kb + r), depths n0 .. n0 + 15, at (n / 2) * 32 + r * 2 + n % 2.
      bf16* o = out + (n0 / 2) * 32;
      if (n0 >= n_rows || kb >= Kp) {
        for (int i = 0; i < 16 * 16; ++i) o[i] = 0;
        continue;
      }
      // Source: rows n0 .. n0 + 15 form block n0 / 16; depth k at (k / 2) * 32 + (n % 16) * 2 + k
      // % 2.
      const bf16* s = W + (n0 / kBlockN) * src_block + (kb / 2) * 32;
      for (int n = 0; n < 16; ++n) {
        for (int r = 0; r < 16; ++r) {
          o[(n / 2) * 32 + r * 2 + (n % 2)] = s[(r / 2) * 32 + n * 2 + (r % 2)];
        }
      }
    }
  }
}

// Works on 16 x 16 sub-tiles as above: four k quads of one source block (256 bytes: element
// (n, k) at (k / 4) * 64 + n * 4 + k % 4) become four n quads of one destination block.
void pack_transposed_i8(const int8_t* W, int64_t N, int64_t Kp, int64_t k0, int64_t nblk,
                        int8_t* dst, int64_t ldd) {
  const int64_t KpT = packed_k8(N);
  const int64_t src_block = i8_block_bytes(Kp);
  const int64_t n_rows = packed_blocks(N) * kBlockN;
  for (int64_t ob = 0; ob < nblk; ++ob) {
    int8_t* out = dst + ob * ldd;
    const int64_t kb = k0 + ob * kBlockN;
    for (int64_t n0 = 0; n0 < KpT; n0 += kBlockN) {
      int8_t* o = out + (n0 / 4) * 64;
      if (n0 >= n_rows || kb >= Kp) {
        for (int i = 0; i < 16 * 16; ++i) o[i] = 0;
        continue;
      }
      const int8_t* s = W + (n0 / kBlockN) * src_block + (kb / 4) * 64;
      for (int n = 0; n < 16; ++n) {
        for (int r = 0; r < 16; ++r)
          o[(n / 4) * 64 + r * 4 + n % 4] = s[(r / 4) * 64 + n * 4 + r % 4];
      }
    }
    i8_set_row_sums(out, KpT);
  }
}

}  // namespace

void fill_scalar_helpers(KernelTable* t) {
  t->gemm_f32_nn = &gemm_f32_nn;
  t->gemm_f32_nt = &gemm_f32_nt;
  t->gemm_f32_tn = &gemm_f32_tn;
  t->cvt_bf16_f32 = &cvt_bf16_f32;
  t->cvt_f32_bf16 = &cvt_f32_bf16;
  t->stream_rows_f32 = &stream_rows_f32;
  t->scale_i32_f32 = &scale_i32_f32;
  t->silu_mul = &silu_mul;
  t->silu_mul_bwd = &silu_mul_bwd;
  t->silu_mul_interleaved_bf16 = &silu_mul_interleaved_bf16;
  t->pack_transposed = &pack_transposed;
  t->pack_transposed_i8 = &pack_transposed_i8;
}

}  // namespace kt::kernels
