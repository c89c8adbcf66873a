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
  KvShape rot = shape(1, 1, 96, DType::F16, DType::F16);
  rot.rotate = true;  // Hadamard rotation needs a power-of-two head_dim
  EXPECT_THROW(KvCache(rot, 16), Error);
  rot.head_dim = 64;
  EXPECT_NO_THROW(KvCache(rot, 16));
  rot.dtype_k = DType::Q4_0;
  rot.kivi_residual = 32;  // not with KIVI
  EXPECT_THROW(KvCache(rot, 16), Error);
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

// ---- dynamic allocation -------------------------------------------------------------------------
TEST(KvCache, DynamicGrowsInChunksAndKeepsRows) {
  KvShape s = shape(2, 2, 32, DType::F16, DType::F32);
  KvCache kv(s, 1000, KvAlloc::Dynamic);
  EXPECT_EQ(kv.stats().capacity, kKvChunkTokens);
  EXPECT_EQ(kv.stats().bytes_allocated, kv_bytes(s, kKvChunkTokens));
  std::vector<float> k(s.kv_dim()), v(s.kv_dim());
  for (int64_t p = 0; p < 300; ++p) {
    for (int64_t i = 0; i < s.kv_dim(); ++i) k[i] = v[i] = static_cast<float>(p + i % 7);  // exact in f16 (< 2048)
    kv.reserve(p + 1);
    for (int32_t il = 0; il < 2; ++il) kv.write(il, p, 1, k.data(), v.data());
    kv.commit(p + 1);
    // The planner's formula, the allocator's arenas: the same bytes at every length.
    EXPECT_EQ(kv.stats().bytes_allocated, kv_bytes(s, kv_alloc_tokens(true, p + 1, 1000)));
  }
  EXPECT_EQ(kv.stats().capacity, 2 * kKvChunkTokens);
  KvLayerView view = kv.view(1, 300);
  for (int64_t p : {0, 1, 255, 256, 299}) {
    EXPECT_EQ(read_row(view, true, p, s.kv_dim())[3], static_cast<float>(p + 3));
    EXPECT_EQ(read_row(view, false, p, s.kv_dim())[5], static_cast<float>(p + 5));
  }
  KvCache capped(s, 300, KvAlloc::Dynamic);
  capped.reserve(300);
  EXPECT_EQ(capped.stats().capacity, 300);  // never past n_ctx
  EXPECT_EQ(capped.stats().bytes_allocated, kv_bytes(s, 300));
}

// ---- eviction (sliding window, context shift) ---------------------------------------------------
// Rows after the evicted range move down and their K is re-rotated by -count, so row p holds the
// key rotated for position p: the same as rotating the unrotated key for p directly.
TEST(KvCache, ShiftOutMovesRowsAndReRotatesK) {
  for (DType t : {DType::F32, DType::F16}) {
    KvShape s = shape(2, 2, 16, t, t);
    KvRope rope{16, 10000.0f, kernels::RopeMode::Normal};
    KvCache kv(s, 16, KvAlloc::Static, rope);
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0, 1);
    const int64_t d = s.kv_dim(), n = 12;
    std::vector<float> raw(n * d), k(n * d), v(n * d);
    for (auto& x : raw) x = nd(rng);
    for (int64_t p = 0; p < n; ++p) {
      std::copy_n(raw.data() + p * d, d, k.data() + p * d);
      kernels::rope(k.data() + p * d, 2, 16, 16, p, rope.freq_base, rope.mode);
      for (int64_t i = 0; i < d; ++i) v[p * d + i] = static_cast<float>(p);
    }
    for (int32_t il = 0; il < 2; ++il) kv.write(il, 0, n, k.data(), v.data());
    kv.commit(n);
    kv.shift_out(4, 3);  // keep 4 "sinks", evict positions 4..6
    ASSERT_EQ(kv.size(), n - 3);
    EXPECT_EQ(kv.stats().n_evicted, 3);
    KvLayerView view = kv.view(1, kv.size());
    for (int64_t p = 0; p < kv.size(); ++p) {
      const int64_t src = p < 4 ? p : p + 3;  // which original token row p now holds
      std::vector<float> want(raw.begin() + src * d, raw.begin() + (src + 1) * d);
      kernels::rope(want.data(), 2, 16, 16, p, rope.freq_base, rope.mode);
      auto got = read_row(view, true, p, d);
      const double tol = t == DType::F32 ? 1e-5 : 4e-3;  // f16 adds one rounding per write
      for (int64_t i = 0; i < d; ++i) EXPECT_NEAR(got[i], want[i], tol) << p << " " << i;
      EXPECT_EQ(read_row(view, false, p, d)[0], static_cast<float>(src));  // V just moves
    }
  }
}

TEST(KvCache, ShiftOutWithoutRopeOnlyMoves) {
  KvShape s = shape(1, 1, 32, DType::F32, DType::F32);
  KvCache kv(s, 8);
  std::vector<float> k(8 * 32), v(8 * 32);
  for (size_t i = 0; i < k.size(); ++i) k[i] = v[i] = static_cast<float>(i / 32);
  kv.write(0, 0, 8, k.data(), v.data());
  kv.commit(8);
  kv.shift_out(0, 5);
  EXPECT_EQ(kv.size(), 3);
  KvLayerView view = kv.view(0, 3);
  for (int64_t p = 0; p < 3; ++p) EXPECT_EQ(read_row(view, true, p, 32)[0], static_cast<float>(p + 5));
}

}  // namespace
}  // namespace kvlm
