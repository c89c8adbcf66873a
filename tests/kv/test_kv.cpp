// KV cache accounting: bytes per token and their overflow checks. No model needed: the cache only
// knows a KvShape. A sequence's cache (allocation, round trips, eviction) is tested through the
// KV manager in tests/kv_manager/test_kv_seq.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "base/error.h"
#include "kv/kv_cache.h"

namespace kvlm {
namespace {

KvShape shape(int n_layer, int n_kv_head, int head_dim, DType k, DType v) {
  KvShape s;
  s.n_layer = n_layer;
  s.n_kv_head = n_kv_head;
  s.head_dim = head_dim;
  s.dtype_k = k;
  s.dtype_v = v;
  return s;
}

// The seeds' worked example: LLaMA-7B (32 layers, 32 heads of 128, no GQA) in fp16 takes
// 2 (K and V) x 32 x 32 x 128 x 2 bytes = 524,288 bytes per token.
TEST(KvAccounting, Llama7bWorkedExample) {
  KvShape s = shape(32, 32, 128, DType::F16, DType::F16);
  EXPECT_EQ(kv_bytes_per_token(s), 524288u);
  EXPECT_EQ(kv_bytes(s, 1024), 512ull << 20);  // 512 MiB at 1,024 tokens
  EXPECT_EQ(kv_bytes(s, 4096), 2ull << 30);    // 2 GiB at 4,096 tokens
}

TEST(KvAccounting, SmolLm2PerToken) {
  // 30 layers x 3 KV heads x 64 dims x 2 (K, V): f16 = 23,040 B/token, f32 = 46,080.
  EXPECT_EQ(kv_bytes_per_token(shape(30, 3, 64, DType::F16, DType::F16)), 23040u);
  EXPECT_EQ(kv_bytes_per_token(shape(30, 3, 64, DType::F32, DType::F32)), 46080u);
  EXPECT_EQ(kv_bytes_per_token(shape(30, 3, 64, DType::F32, DType::F16)), 34560u);
}

TEST(KvAccounting, OverflowIsAnError) {
  KvShape s = shape(4096, 4096, 4096, DType::F32, DType::F32);
  EXPECT_THROW(kv_bytes(s, int64_t{1} << 40), Error);
  EXPECT_THROW(kv_bytes(s, -1), Error);
}

// Eviction re-rotates K with the model's RoPE scaling: frequencies halved by Llama-3-style factors
// of 2 (or a linear scale of 0.5) turn a shift of 2d positions into the plain rotation by d, bit
// for bit (halving is exact in double); without them the shift would be 2d.
TEST(KvRerotate, CarriesFrequencyFactorsAndLinearScale) {
  const KvShape shape{.n_layer = 1, .n_kv_head = 2, .head_dim = 16, .dtype_k = DType::F32,
                      .dtype_v = DType::F32};
  std::mt19937 rng(7);
  std::normal_distribution<float> dist;
  std::vector<float> k(32), scratch(32);
  for (float& x : k) x = dist(rng);
  const KvRope plain{.n_rot = 16, .freq_base = 10000.0f};
  KvRope factors = plain;
  factors.freq_factors.assign(8, 2.0f);
  KvRope linear = plain;
  linear.freq_scale = 0.5f;
  std::vector<float> want = k;
  kv_rerotate_k_row(shape, plain, -5, reinterpret_cast<std::byte*>(want.data()), scratch.data());
  for (const KvRope* r : {&factors, &linear}) {
    std::vector<float> got = k;
    kv_rerotate_k_row(shape, *r, -10, reinterpret_cast<std::byte*>(got.data()), scratch.data());
    EXPECT_EQ(got, want);
    std::vector<float> unscaled = k;
    kv_rerotate_k_row(shape, plain, -10, reinterpret_cast<std::byte*>(unscaled.data()),
                      scratch.data());
    EXPECT_NE(got, unscaled);
  }
}

}  // namespace
}  // namespace kvlm
