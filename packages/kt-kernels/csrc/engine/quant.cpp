#include "engine/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace kt::engine::quant {

using kernels::bf16;
using kernels::kBlockN;

Format make_format(Kind kind, int64_t K, int64_t group) {
  Format f;
  f.kind = kind;
  f.Kp = kind == Kind::w8a8 ? kernels::packed_k8(K) : kernels::packed_k(K);
  if (kind == Kind::int4) {
    f.group = group;
    f.ngroups = (f.Kp + group - 1) / group;
  } else {
    f.group = f.Kp;
    f.ngroups = 1;
  }
  return f;
}

int64_t unaliased_depth(int64_t Kp) {
  return Kp >= 1024 && Kp % 512 == 0 ? Kp + kernels::kPackK : Kp;
}

int64_t block_bytes(const Format& f) {
  if (f.kind == Kind::w8a8) return kernels::i8_block_bytes(f.Kp);
  return f.kind == Kind::int4 ? kBlockN * f.Kp / 2 : kBlockN * f.Kp;
}

bool quantize_row(const kernels::QuantKernels& qk, const Format& f, const float* w, int64_t K,
                  int8_t* codes, float* scales) {
  const float qm = static_cast<float>(qmax(f.kind));
  for (int64_t g = 0; g < f.ngroups; ++g) {
    const int64_t k0 = std::min(K, g * f.group), k1 = std::min(K, k0 + f.group);
    float amax = 0.0f;
    if (!qk.absmax(k1 - k0, w + k0, &amax)) return false;
    const float s = flush_scale(amax / qm);
    scales[g] = s;
    if (s > 0.0f) {
      qk.quantize(k1 - k0, w + k0, s, qm, codes + k0);
    } else {
      std::memset(codes + k0, 0, static_cast<size_t>(k1 - k0));
    }
  }
  return true;
}

void place_row(const Format& f, const int8_t* codes, int64_t K, int j, uint8_t* blk) {
  if (f.kind == Kind::w8a8) {
    int32_t sum = 0;
    for (int64_t k = 0; k < f.Kp; ++k) {
      const int8_t c = k < K ? codes[k] : 0;
      blk[kernels::i8_offset(j, k)] = static_cast<uint8_t>(c);
      sum += c;
    }
    std::memcpy(blk + kBlockN * f.Kp + j * static_cast<int64_t>(sizeof(int32_t)), &sum, sizeof sum);
    return;
  }
  for (int64_t k = 0; k < f.Kp; ++k) {
    const int8_t c = k < K ? codes[k] : 0;
    const int64_t i = (k / 2) * 32 + j * 2 + (k % 2);
    if (f.kind == Kind::int8) {
      blk[i] = static_cast<uint8_t>(c);
    } else {
      uint8_t& byte = blk[i >> 1];
      const uint8_t nib = static_cast<uint8_t>(c) & 0x0f;
      byte = (i & 1) ? static_cast<uint8_t>((byte & 0x0f) | (nib << 4))
                     : static_cast<uint8_t>((byte & 0xf0) | nib);
    }
  }
}

namespace {

// out[m * 16 + j] = element m of row j (rows of T at src + j * ld bytes), m in [0, n): the block
// layouts are transposes of 16 rows of code pairs (int8), nibble bytes (int4) or quads (w8a8).
template <class T>
void transpose16(const uint8_t* src, int64_t ld, int64_t n, uint8_t* out) {
  constexpr int64_t kChunk = 64;  // elements per row and step: 16 source lines stay in L1
  for (int64_t m0 = 0; m0 < n; m0 += kChunk) {
    const int64_t m1 = std::min(n, m0 + kChunk);
    for (int j = 0; j < kBlockN; ++j) {
      const uint8_t* row = src + j * ld;
      for (int64_t m = m0; m < m1; ++m) {
        T v;
        std::memcpy(&v, row + m * static_cast<int64_t>(sizeof(T)), sizeof(T));
        std::memcpy(out + (m * kBlockN + j) * static_cast<int64_t>(sizeof(T)), &v, sizeof(T));
      }
    }
  }
}

// The codes of row j from k0 on, zero from K on, as `width` int8 values into tail (width >= 1).
void padded_tail(const int8_t* row, int64_t k0, int64_t K, int64_t width, int8_t* tail) {
  for (int64_t i = 0; i < width; ++i) tail[i] = k0 + i < K ? row[k0 + i] : 0;
}

// The next block's run of a depth range (the transposed repack of backward reads a part of each
// block's depth, a block-sized stride apart, which the hardware prefetchers do not follow), fetched
// a lead of lines ahead of the bytes of the current run dequantized. A whole run at once (24 lines
// for int8 at the engine's tile width) waits on the line fill buffers with no work to overlap; a
// lead of 12 lines measured best of 4, 8 and 12 (docs/performance.md).
class RunFetch {
 public:
  static constexpr int64_t kLead = 12;  // lines

  RunFetch(const void* next, int64_t bytes, bool on)
      : next_(static_cast<const char*>(next)), lines_(on ? (bytes + 63) / 64 : 0) {
    to(kLead);
  }
  // Units of unit_bytes to dequantize between fetches: a lead's worth while lines remain to be
  // fetched, else all of them (no reason to split the work).
  int64_t piece(int64_t unit_bytes, int64_t all) const {
    return issued_ < lines_ ? kLead * 64 / unit_bytes : all;
  }
  // bytes of the current run are dequantized
  void after(int64_t bytes) { to(kLead + bytes / 64); }
  void rest() { to(lines_); }

 private:
  void to(int64_t line) {
    for (const int64_t end = std::min(line, lines_); issued_ < end; ++issued_)
      __builtin_prefetch(next_ + issued_ * 64);
  }
  const char* next_;
  int64_t lines_;
  int64_t issued_ = 0;
};

// dequant_range for w8a8 blocks: whole k quads through the ISA's kernel; a pair at an odd end is
// taken from its quad dequantized into a small buffer (same bits: each value is one product).
void dequant_range_w8a8(const kernels::QuantKernels& qk, const Format& f, const uint8_t* blk,
                        const float* scales, int64_t nblk, int64_t kp0, int64_t kp1, bf16* dst,
                        int64_t dst_Kp, bool fetch_after) {
  const int64_t bb = block_bytes(f);
  alignas(64) float sv[32];
  alignas(64) bf16 quad[64];
  // The quads read in each block.
  const int64_t q0 = kp0 / 2, q1 = (kp1 + 1) / 2;
  const int64_t run_bytes = (q1 - q0) * 64;
  for (int64_t b = 0; b < nblk; ++b) {
    const int8_t* src = reinterpret_cast<const int8_t*>(blk + b * bb);
    RunFetch fetch(src + bb + q0 * 64, run_bytes, run_bytes < bb && (b + 1 < nblk || fetch_after));
    for (int i = 0; i < 32; ++i) sv[i] = scales[b * kBlockN + i / 2];
    bf16* out = dst + b * kBlockN * dst_Kp - kp0 * 32;  // pair kp lands at (kp - kp0) * 32
    int64_t kp = kp0;
    if (kp < kp1 && kp % 2 == 1) {  // second pair of a quad
      qk.i8x4(1, src + (kp / 2) * 64, sv, quad);
      std::memcpy(out + kp * 32, quad + 32, 32 * sizeof(bf16));
      ++kp;
    }
    const int64_t piece = fetch.piece(64, (kp1 - kp) / 2);  // quads
    for (int64_t whole = (kp1 - kp) / 2; whole > 0;) {
      const int64_t n = std::min(whole, piece);
      qk.i8x4(n, src + (kp / 2) * 64, sv, out + kp * 32);
      kp += 2 * n;
      whole -= n;
      fetch.after((kp - kp0) * 32);
    }
    fetch.rest();
    if (kp < kp1) {  // first pair of the last quad
      qk.i8x4(1, src + (kp / 2) * 64, sv, quad);
      std::memcpy(out + kp * 32, quad, 32 * sizeof(bf16));
    }
    const int64_t done = kp1 - kp0;
    if (done < dst_Kp / 2) {
      std::memset(dst + b * kBlockN * dst_Kp + done * 32, 0,
                  static_cast<size_t>(dst_Kp / 2 - done) * 32 * sizeof(bf16));
    }
  }
}

}  // namespace

void place_block_nibbles(const Format& f, const uint8_t* nib, int64_t ld, int64_t K, uint8_t* blk) {
  const int64_t n = (K + 1) / 2;
  transpose16<uint8_t>(nib, ld, n, blk);
  std::memset(blk + n * kBlockN, 0, static_cast<size_t>((f.Kp / 2 - n) * kBlockN));
}

void place_block(const Format& f, const int8_t* codes, int64_t ld, int64_t K, uint8_t* blk) {
  const uint8_t* src = reinterpret_cast<const uint8_t*>(codes);
  if (f.kind == Kind::int8) {  // pairs: 16 rows of uint16
    const int64_t n = K / 2;
    transpose16<uint16_t>(src, ld, n, blk);
    int64_t done = n;
    if (K % 2 == 1) {
      for (int j = 0; j < kBlockN; ++j) {
        padded_tail(codes + j * ld, 2 * n, K, 2,
                    reinterpret_cast<int8_t*>(blk + n * 2 * kBlockN + 2 * j));
      }
      ++done;
    }
    std::memset(blk + done * 2 * kBlockN, 0, static_cast<size_t>((f.Kp / 2 - done) * 2 * kBlockN));
    return;
  }
  if (f.kind == Kind::w8a8) {  // quads: 16 rows of uint32, then the row sums
    const int64_t n = K / 4;
    transpose16<uint32_t>(src, ld, n, blk);
    int64_t done = n;
    if (K % 4 != 0) {
      for (int j = 0; j < kBlockN; ++j) {
        padded_tail(codes + j * ld, 4 * n, K, 4,
                    reinterpret_cast<int8_t*>(blk + n * 4 * kBlockN + 4 * j));
      }
      ++done;
    }
    std::memset(blk + done * 4 * kBlockN, 0, static_cast<size_t>((f.Kp / 4 - done) * 4 * kBlockN));
    for (int j = 0; j < kBlockN; ++j) {
      int32_t sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += codes[j * ld + k];
      std::memcpy(blk + kBlockN * f.Kp + j * static_cast<int64_t>(sizeof(int32_t)), &sum,
                  sizeof sum);
    }
    return;
  }
  // int4: pack 16 rows x kChunk bytes of nibbles at a time, then place them.
  constexpr int64_t kChunk = 64;
  alignas(64) uint8_t nib[kBlockN * kChunk];
  const int64_t nbytes = (K + 1) / 2, whole = K / 2;
  for (int64_t m0 = 0; m0 < nbytes; m0 += kChunk) {
    const int64_t m1 = std::min(nbytes, m0 + kChunk), mw = std::min(m1, whole);
    for (int j = 0; j < kBlockN; ++j) {
      const int8_t* row = codes + j * ld;
      uint8_t* o = nib + j * kChunk - m0;
      for (int64_t m = m0; m < mw; ++m) {
        o[m] = static_cast<uint8_t>((static_cast<uint8_t>(row[2 * m]) & 0x0f) |
                                    (static_cast<uint8_t>(row[2 * m + 1]) << 4));
      }
      if (mw < m1) o[mw] = static_cast<uint8_t>(row[2 * mw]) & 0x0f;  // odd K: last code alone
    }
    transpose16<uint8_t>(nib, kChunk, m1 - m0, blk + m0 * kBlockN);
  }
  std::memset(blk + nbytes * kBlockN, 0, static_cast<size_t>((f.Kp / 2 - nbytes) * kBlockN));
}

void dequant_range(const kernels::QuantKernels& qk, const Format& f, const uint8_t* blk,
                   const float* scales, int64_t nblk, int64_t kp0, int64_t kp1, bf16* dst,
                   int64_t dst_Kp, bool fetch_after) {
  if (f.kind == Kind::w8a8) {
    dequant_range_w8a8(qk, f, blk, scales, nblk, kp0, kp1, dst, dst_Kp, fetch_after);
    return;
  }
  const int64_t bb = block_bytes(f);
  const int64_t kp_per_group = f.group / 2;  // pairs of k per group (group is even)
  alignas(64) float sv[32];
  // Bytes of codes per pair row, and of the range read in each block.
  const int64_t pair_bytes = f.kind == Kind::int8 ? 32 : 16;
  const int64_t run_bytes = (kp1 - kp0) * pair_bytes;
  for (int64_t b = 0; b < nblk; ++b) {
    const uint8_t* src = blk + b * bb;
    const float* sc = scales + b * kBlockN * f.ngroups;
    bf16* out = dst + b * kBlockN * dst_Kp - kp0 * 32;  // pair kp lands at (kp - kp0) * 32
    RunFetch fetch(src + bb + kp0 * pair_bytes, run_bytes,
                   run_bytes < bb && (b + 1 < nblk || fetch_after));
    const int64_t piece = fetch.piece(pair_bytes, kp1 - kp0);  // pairs
    for (int64_t g = kp0 / kp_per_group; g * kp_per_group < kp1; ++g) {
      for (int i = 0; i < 32; ++i) sv[i] = sc[(i / 2) * f.ngroups + g];
      const int64_t gb = std::min(kp1, (g + 1) * kp_per_group);
      for (int64_t ga = std::max(kp0, g * kp_per_group); ga < gb; ga += piece) {
        const int64_t n = std::min(piece, gb - ga);
        if (f.kind == Kind::int8) {
          qk.i8(n, reinterpret_cast<const int8_t*>(src) + ga * 32, sv, out + ga * 32);
        } else {
          qk.i4(n, src + ga * 16, sv, out + ga * 32);
        }
        fetch.after((ga + n - kp0) * pair_bytes);
      }
    }
    fetch.rest();
    const int64_t done = kp1 - kp0;
    if (done < dst_Kp / 2) {
      std::memset(dst + b * kBlockN * dst_Kp + done * 32, 0,
                  static_cast<size_t>(dst_Kp / 2 - done) * 32 * sizeof(bf16));
    }
  }
}

void dequant_blocks(const kernels::QuantKernels& qk, const Format& f, const uint8_t* blk,
                    const float* scales, int64_t nblk, bf16* dst) {
  dequant_range(qk, f, blk, scales, nblk, 0, f.Kp / 2, dst, f.Kp);
}

}  // namespace kt::engine::quant
