// The dequantization kernels (kernels/quant_kernels.h) of every runnable ISA: bit-identical to the
// scalar reference, for every int8 code and int4 nibble and scales of varied magnitude.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
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

int main(int argc, char** argv) { return kt::testing::run_all(argc, argv); }
