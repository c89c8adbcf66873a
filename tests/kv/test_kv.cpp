// KV cache: memory accounting (the planner's numbers equal what is allocated), storage round
// trips, bookkeeping. No model needed: the cache only knows a KvShape.
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

TEST(KvCache, AllocatedBytesEqualThePlanner) {
  for (DType k : {DType::F32, DType::F16})
    for (DType v : {DType::F32, DType::F16})
      for (int64_t n_ctx : {1, 17, 256}) {
        KvShape s = shape(3, 2, 64, k, v);
        KvCache kv(s, n_ctx);
        KvStats st = kv.stats();
        EXPECT_EQ(st.bytes_allocated, kv_bytes(s, n_ctx));
        EXPECT_EQ(st.bytes_used, 0u);
        kv.commit(1);
        EXPECT_EQ(kv.stats().bytes_used, kv_bytes(s, 1));
      }
}

TEST(KvCache, RejectsBadShapes) {
  EXPECT_THROW(KvCache(shape(0, 1, 64, DType::F16, DType::F16), 16), Error);
  EXPECT_THROW(KvCache(shape(1, 1, 64, DType::F16, DType::F16), 0), Error);
  EXPECT_THROW(KvCache(shape(1, 1, 64, DType::Q6_K, DType::F16), 16), Error);
}

// Reads row `pos` of a layer view back as f32.
std::vector<float> read_row(const KvLayerView& view, bool k, int64_t pos, int64_t d) {
  std::vector<float> out(d);
  const uint8_t* row = (k ? view.k : view.v) + pos * (k ? view.k_row_bytes : view.v_row_bytes);
  DType t = k ? view.dtype_k : view.dtype_v;
  for (int64_t i = 0; i < d; ++i) {
    if (t == DType::F32) {
      std::memcpy(&out[i], row + 4 * i, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, row + 2 * i, 2);
      out[i] = fp16_to_fp32(h);
    }
  }
  return out;
}

TEST(KvCache, WriteThenViewRoundTrips) {
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0, 2);
  for (DType t : {DType::F32, DType::F16}) {
    KvShape s = shape(2, 3, 32, t, t);
    KvCache kv(s, 8);
    const int64_t d = s.kv_dim();
    std::vector<float> k(5 * d), v(5 * d);
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    kv.write(1, 0, 2, k.data(), v.data());
    kv.write(1, 2, 3, k.data() + 2 * d, v.data() + 2 * d);
    kv.commit(5);
    EXPECT_EQ(kv.size(), 5);
    KvLayerView view = kv.view(1, 5);
    for (int64_t p = 0; p < 5; ++p) {
      auto kr = read_row(view, true, p, d), vr = read_row(view, false, p, d);
      for (int64_t i = 0; i < d; ++i) {
        float ek = k[p * d + i], ev = v[p * d + i];
        if (t == DType::F32) {
          EXPECT_EQ(kr[i], ek);
          EXPECT_EQ(vr[i], ev);
        } else {  // f16 keeps 11 significant bits: relative error <= 2^-11
          EXPECT_NEAR(kr[i], ek, std::fabs(ek) * 0x1p-11f + 1e-7f);
          EXPECT_NEAR(vr[i], ev, std::fabs(ev) * 0x1p-11f + 1e-7f);
        }
      }
    }
  }
}

TEST(KvCache, TruncateAndClear) {
  KvCache kv(shape(1, 1, 32, DType::F16, DType::F16), 10);
  kv.commit(7);
  EXPECT_EQ(kv.free_tokens(), 3);
  kv.truncate(9);  // truncating past the end keeps what is held
  EXPECT_EQ(kv.size(), 7);
  kv.truncate(4);
  EXPECT_EQ(kv.size(), 4);
  kv.clear();
  EXPECT_EQ(kv.size(), 0);
  EXPECT_EQ(kv.stats().bytes_used, 0u);
}

}  // namespace
}  // namespace kvlm
