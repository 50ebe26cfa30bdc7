// The dequantization kernels (kernels/quant_kernels.h) of every runnable ISA: bit-identical to the
// scalar reference, for every int8 code and int4 nibble and scales of varied magnitude.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "engine/quant.h"
#include "kernels/dispatch.h"
#include "kernels/quant_kernels.h"

using namespace kt::kernels;

TEST(dequant_bit_identical_to_scalar) {
  std::mt19937 rng(7);
  const int64_t npairs = 37;
  std::vector<int8_t> c8(static_cast<size_t>(32 * npairs));
  std::vector<uint8_t> c4(static_cast<size_t>(16 * npairs));
  for (size_t i = 0; i < c8.size(); ++i)
    c8[i] = static_cast<int8_t>(static_cast<int>(i % 256) - 128);
  for (size_t i = 0; i < c4.size(); ++i) c4[i] = static_cast<uint8_t>(rng() & 0xff);
  float sv[32];
  std::uniform_real_distribution<float> u(-30.0f, 10.0f);
  for (float& s : sv)
    s = std::ldexp(1.0f + static_cast<float>(rng() % 1000) / 999.0f, static_cast<int>(u(rng)));
  sv[3] = 0.0f;
  const QuantKernels& ref = *scalar_quant_table();
  std::vector<bf16> want(static_cast<size_t>(32 * npairs)), got(want.size());
  for (Isa isa : available_isas()) {
    const QuantKernels& q = quant_kernels(isa);
    ref.i8(npairs, c8.data(), sv, want.data());
    q.i8(npairs, c8.data(), sv, got.data());
    REQUIRE(std::memcmp(want.data(), got.data(), want.size() * sizeof(bf16)) == 0, "%s int8",
            isa_name(isa));
    ref.i4(npairs, c4.data(), sv, want.data());
    q.i4(npairs, c4.data(), sv, got.data());
    REQUIRE(std::memcmp(want.data(), got.data(), want.size() * sizeof(bf16)) == 0, "%s int4",
            isa_name(isa));
  }
  // The reference itself: code 0x9f of an int4 byte is low -1, high -7.
  uint8_t byte = 0x9f;
  float one[32];
  for (float& s : one) s = 1.0f;
  bf16 out[32];
  std::vector<uint8_t> pair(16, byte);
  ref.i4(1, pair.data(), one, out);
  REQUIRE(bf16_to_f32(out[0]) == -1.0f && bf16_to_f32(out[1]) == -7.0f, "int4 nibble order");
}

// W8A8 weight blocks (engine/quant.h, Kind::w8a8): place_row writes the VNNI-4 layout and the row
// sums; dequant_range of any pair range (odd ends included) gives bf16(code * scale) in the pair
// layout, zero beyond the range, on every ISA.
TEST(w8a8_blocks_place_and_dequantize_ranges) {
  namespace q = kt::engine::quant;
  const int64_t K = 150;  // Kp = 192: 48 quads, a ragged tail of zero codes
  const q::Format f = q::make_format(q::Kind::w8a8, K, 128);
  REQUIRE(f.Kp == 192 && f.ngroups == 1 && q::block_bytes(f) == 16 * 192 + 64, "format");
  std::mt19937 rng(11);
  const int64_t nblk = 2;
  std::vector<int8_t> codes(static_cast<size_t>(nblk * 16 * K));
  for (auto& c : codes) c = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
  std::vector<float> scales(static_cast<size_t>(nblk * 16));
  for (auto& s : scales) s = std::ldexp(1.0f + static_cast<float>(rng() % 997) / 997.0f, -7);
  std::vector<uint8_t> blocks(static_cast<size_t>(nblk * q::block_bytes(f)), 0xAB);
  for (int64_t b = 0; b < nblk; ++b) {
    for (int j = 0; j < 16; ++j) {
      q::place_row(f, codes.data() + (b * 16 + j) * K, K, j, blocks.data() + b * q::block_bytes(f));
    }
  }
  for (int64_t b = 0; b < nblk; ++b) {
    const uint8_t* blk = blocks.data() + b * q::block_bytes(f);
    for (int j = 0; j < 16; ++j) {
      int32_t sum = 0, stored;
      for (int64_t k = 0; k < f.Kp; ++k) {
        const int8_t want = k < K ? codes[(b * 16 + j) * K + k] : 0;
        REQUIRE(static_cast<int8_t>(blk[i8_offset(j, k)]) == want, "code (%d, %lld)", j,
                (long long)k);
        sum += want;
      }
      std::memcpy(&stored, blk + 16 * f.Kp + 4 * j, 4);
      REQUIRE(stored == sum, "row sum %d", j);
    }
  }
  const int64_t ranges[][2] = {{0, 96}, {0, 5}, {3, 40}, {7, 8}, {8, 16}, {33, 96}, {95, 96}};
  for (Isa isa : available_isas()) {
    for (const auto& r : ranges) {
      const int64_t kp0 = r[0], kp1 = r[1], dst_Kp = round_up(2 * (kp1 - kp0), 32);
      std::vector<bf16> got(static_cast<size_t>(nblk * 16 * dst_Kp), 0x7777);
      q::dequant_range(quant_kernels(isa), f, blocks.data(), scales.data(), nblk, kp0, kp1,
                       got.data(), dst_Kp);
      for (int64_t b = 0; b < nblk; ++b) {
        for (int64_t kk = 0; kk < dst_Kp; ++kk) {
          for (int j = 0; j < 16; ++j) {
            const int64_t k = 2 * kp0 + kk;
            bf16 want = 0;
            if (kk < 2 * (kp1 - kp0) && k < K) {
              want = bf16_round_finite(static_cast<float>(codes[(b * 16 + j) * K + k]) *
                                       scales[b * 16 + j]);
            }
            const bf16 v = got[b * 16 * dst_Kp + (kk / 2) * 32 + j * 2 + kk % 2];
            REQUIRE(v == want, "%s pairs [%lld, %lld) block %lld (%d, %lld): %04x, want %04x",
                    isa_name(isa), (long long)kp0, (long long)kp1, (long long)b, j, (long long)k, v,
                    want);
          }
        }
      }
    }
  }
}

int main(int argc, char** argv) { return kt::testing::run_all(argc, argv); }
