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

}  // namespace
}  // namespace kvlm
