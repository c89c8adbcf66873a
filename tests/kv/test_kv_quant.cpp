// The KV cache's quantizer (src/kv/kv_quant.h): GGML's bytes, a better scale, never a worse one.
#include "kv/kv_quant.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels/ops.h"

namespace kvlm {
namespace {

constexpr int kBlock = 32;

// Blocks of several shapes K and V rows take: Gaussian, Gaussian with one outlier channel, uniform,
// all-equal, a single non-zero value, very small and very large magnitudes. [n_blocks * 32].
std::vector<float> test_blocks(int per_kind, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  std::uniform_real_distribution<float> uni(-3.0f, 5.0f);
  std::vector<float> x;
  for (int kind = 0; kind < 7; ++kind)
    for (int b = 0; b < per_kind; ++b)
      for (int j = 0; j < kBlock; ++j) {
        float v = 0;
        switch (kind) {
          case 0: v = gauss(rng); break;
          case 1: v = j == 5 ? 12.0f + gauss(rng) : gauss(rng); break;
          case 2: v = uni(rng); break;
          case 3: v = 0.75f; break;
          case 4: v = j == b % kBlock ? -2.5f : 0.0f; break;
          case 5: v = 1e-4f * gauss(rng); break;
          case 6: v = 300.0f * gauss(rng); break;
        }
        x.push_back(v);
      }
  return x;
}

size_t block_bytes(DType t) { return t == DType::Q4_0 ? sizeof(BlockQ4_0) : sizeof(BlockQ4_1); }

class KvQuant : public ::testing::TestWithParam<DType> {};

TEST_P(KvQuant, NeverWorseThanGgmlPerBlockAndBetterOnGaussianData) {
  const DType t = GetParam();
  const int per_kind = 2000;
  const std::vector<float> x = test_blocks(per_kind, 7);
  const int64_t n_blocks = static_cast<int64_t>(x.size()) / kBlock;
  std::vector<uint8_t> ggml(n_blocks * block_bytes(t)), ours(ggml.size());
  kernels::quantize_row(t, x.data(), ggml.data(), static_cast<int64_t>(x.size()));
  kv_quantize_row(t, x.data(), ours.data(), static_cast<int64_t>(x.size()));
  double gauss_ggml = 0, gauss_ours = 0;
  int64_t n_better = 0;
  for (int64_t i = 0; i < n_blocks; ++i) {
    const float* xb = x.data() + i * kBlock;
    const double eg = kv_block_sq_error(t, xb, ggml.data() + i * block_bytes(t));
    const double eo = kv_block_sq_error(t, xb, ours.data() + i * block_bytes(t));
    ASSERT_LE(eo, eg) << "block " << i << " (kind " << i / per_kind << ")";
    ASSERT_TRUE(std::isfinite(eo)) << "block " << i;
    n_better += eo < eg;
    if (i < per_kind) {
      gauss_ggml += eg;
      gauss_ours += eo;
    }
  }
  // Measured on this data: q4_0 10.6%, q4_1 17.9% less squared error on Gaussian blocks. The bound
  // is about half of that, so it fails if the search stops finding better scales, not on noise.
  const double gain = 1 - gauss_ours / gauss_ggml;
  std::printf("[%s] Gaussian squared error %.1f%% below GGML's, %lld of %lld blocks better\n",
              dtype_name(t), 100 * gain, static_cast<long long>(n_better),
              static_cast<long long>(n_blocks));
  EXPECT_GT(gain, t == DType::Q4_0 ? 0.05 : 0.10) << "Gaussian squared error " << gauss_ours
                                                  << " vs GGML's " << gauss_ggml;
  EXPECT_GT(n_better, n_blocks / 4);
}

TEST_P(KvQuant, Sse2LoopEqualsItsScalarTwin) {
  const DType t = GetParam();
  const std::vector<float> x = test_blocks(500, 11);
  const auto n = static_cast<int64_t>(x.size());
  std::vector<uint8_t> fast(row_bytes(t, n)), twin(row_bytes(t, n));
  kv_quantize_row(t, x.data(), fast.data(), n);
  kv_quantize_row_scalar(t, x.data(), twin.data(), n);
  EXPECT_EQ(fast, twin);
}

TEST_P(KvQuant, ExactBlocksStayExact) {
  // An all-zero block, and (q4_1) an all-equal one, are represented exactly by GGML's encoding;
  // the search must keep them exact.
  const DType t = GetParam();
  std::vector<float> x(2 * kBlock, 0.0f);
  for (int j = kBlock; j < 2 * kBlock; ++j) x[j] = t == DType::Q4_1 ? 0.75f : 0.0f;
  std::vector<uint8_t> q(2 * block_bytes(t));
  kv_quantize_row(t, x.data(), q.data(), 2 * kBlock);
  std::vector<float> y(x.size());
  kernels::dequantize_row(t, q.data(), y.data(), 2 * kBlock);
  for (int j = 0; j < 2 * kBlock; ++j) EXPECT_EQ(y[j], x[j]) << j;
}

TEST_P(KvQuant, NonFiniteInputFallsBackToGgmlBytes) {
  const DType t = GetParam();
  std::vector<float> x(kBlock, 1.0f);
  x[3] = INFINITY;
  x[9] = NAN;
  std::vector<uint8_t> ggml(block_bytes(t)), ours(block_bytes(t));
  kernels::quantize_row(t, x.data(), ggml.data(), kBlock);
  kv_quantize_row(t, x.data(), ours.data(), kBlock);
  EXPECT_EQ(ours, ggml);
}

INSTANTIATE_TEST_SUITE_P(Types, KvQuant, ::testing::Values(DType::Q4_0, DType::Q4_1),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST(KvQuantOther, Q8AndFloatTypesAreGgmlBytes) {
  const std::vector<float> x = test_blocks(50, 3);
  const auto n = static_cast<int64_t>(x.size());
  for (DType t : {DType::Q8_0, DType::F16, DType::F32}) {
    const size_t bytes = row_bytes(t, n);
    std::vector<uint8_t> a(bytes), b(bytes);
    kernels::quantize_row(t, x.data(), a.data(), n);
    kv_quantize_row(t, x.data(), b.data(), n);
    EXPECT_EQ(a, b) << dtype_name(t);
  }
}

}  // namespace
}  // namespace kvlm
