// One sequence's cache, as a Session holds it: a KV manager of one sequence sized by
// kv_seq_config. Allocated bytes equal the planner's (static and dynamic, at every length), rows
// round-trip and survive growth, truncation and release, and eviction moves rows and re-rotates K.
// No model needed: the cache only knows a KvShape.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "base/error.h"
#include "kv/kv_plan.h"
#include "kv_manager/kv_manager.h"

namespace kvlm {
namespace {

constexpr SeqId kSeq = 0;

KvShape shape(int n_layer, int n_kv_head, int head_dim, DType k, DType v) {
  return KvShape{.n_layer = n_layer, .n_kv_head = n_kv_head, .head_dim = head_dim, .dtype_k = k,
                 .dtype_v = v};
}

// A manager holding one empty sequence, as Session builds it.
std::unique_ptr<KvManager> seq_cache(const KvShape& s, int64_t n_ctx,
                                     KvAlloc alloc = KvAlloc::Static, KvRope rope = {}) {
  auto kv = std::make_unique<KvManager>(kv_seq_config(s, n_ctx, alloc, rope));
  EXPECT_TRUE(kv->admit(kSeq, {}, "", 0, KvHit{}));
  return kv;
}

// Writes k, v ([n, kv_dim] f32) at positions [pos, pos + n) of every layer and commits them.
void write(KvManager& kv, int64_t pos, int64_t n, const float* k, const float* v) {
  ASSERT_EQ(kv.seq_tokens(kSeq), pos);
  ASSERT_TRUE(kv.reserve(kSeq, n));
  for (int32_t il = 0; il < kv.shape().n_layer; ++il)
    kv.store().write(il, kv.seq_cache(kSeq).blocks, pos, n, k, v);
  kv.commit(kSeq, std::vector<int32_t>(static_cast<size_t>(pos + n), 0), pos + n);
}

// Position p of layer il read back as f32 (K when k, else V).
std::vector<float> read_row(const KvManager& kv, int32_t il, bool k, int64_t p) {
  const KvShape& s = kv.shape();
  std::vector<std::byte> kr(kv_k_row_bytes(s)), vr(kv_v_row_bytes(s));
  kv.store().read_rows(il, kv.seq_cache(kSeq).blocks, p, 1, kr.data(), vr.data());
  std::vector<float> out(static_cast<size_t>(s.kv_dim()));
  kernels::dequantize_row(k ? s.dtype_k : s.dtype_v, k ? kr.data() : vr.data(), out.data(),
                          s.kv_dim());
  return out;
}

TEST(KvSeq, AllocatedBytesEqualThePlanner) {
  for (DType k : {DType::F32, DType::F16})
    for (DType v : {DType::F32, DType::F16})
      for (int64_t n_ctx : {1, 17, 256}) {
        const KvShape s = shape(3, 2, 64, k, v);
        auto kv = seq_cache(s, n_ctx);
        const size_t block = PagedKvStore::block_bytes(s, kKvBlockTokens);
        EXPECT_EQ(kv->stats().bytes_total, kv_seq_bytes(s, n_ctx));
        EXPECT_EQ(kv->stats().bytes_total, (n_ctx + 15) / 16 * block);  // whole blocks
        EXPECT_EQ(kv->stats().bytes_used, 0u);
        ASSERT_TRUE(kv->reserve(kSeq, 1));
        EXPECT_EQ(kv->stats().bytes_used, block);
        EXPECT_EQ(kv->capacity_tokens(), (n_ctx + 15) / 16 * 16);
      }
}

TEST(KvSeq, RejectsBadShapes) {
  const KvRope none{};
  EXPECT_THROW(kv_seq_config(shape(0, 1, 64, DType::F16, DType::F16), 16, KvAlloc::Static, none),
               Error);
  EXPECT_THROW(kv_seq_config(shape(1, 1, 64, DType::F16, DType::F16), 0, KvAlloc::Static, none),
               Error);
  EXPECT_THROW(kv_seq_config(shape(1, 1, 64, DType::Q6_K, DType::F16), 16, KvAlloc::Static, none),
               Error);
  EXPECT_THROW(kv_seq_config(shape(4096, 4096, 4096, DType::F32, DType::F32), int64_t{1} << 40,
                             KvAlloc::Static, none),
               Error);  // overflows
  KvShape rot = shape(1, 1, 96, DType::F16, DType::F16);
  rot.rotate = true;  // Hadamard rotation needs a power-of-two head_dim
  EXPECT_THROW(kv_seq_config(rot, 16, KvAlloc::Static, none), Error);
  rot.head_dim = 64;
  EXPECT_NO_THROW(seq_cache(rot, 16));
  rot.dtype_k = DType::Q4_0;
  rot.kivi_residual = 32;  // not with KIVI
  EXPECT_THROW(kv_seq_config(rot, 16, KvAlloc::Static, none), Error);
}

TEST(KvSeq, WriteThenReadRoundTrips) {
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0, 2);
  for (DType t : {DType::F32, DType::F16}) {
    const KvShape s = shape(2, 3, 32, t, t);
    auto kv = seq_cache(s, 40);
    const int64_t d = s.kv_dim();
    std::vector<float> k(21 * d), v(21 * d);
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    write(*kv, 0, 2, k.data(), v.data());
    write(*kv, 2, 19, k.data() + 2 * d, v.data() + 2 * d);  // across a block boundary
    EXPECT_EQ(kv->seq_tokens(kSeq), 21);
    for (int64_t p = 0; p < 21; ++p) {
      const auto kr = read_row(*kv, 1, true, p), vr = read_row(*kv, 1, false, p);
      for (int64_t i = 0; i < d; ++i) {
        const float ek = k[p * d + i], ev = v[p * d + i];
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

TEST(KvSeq, TruncateAndRelease) {
  auto kv = seq_cache(shape(1, 1, 32, DType::F16, DType::F16), 40);
  ASSERT_TRUE(kv->reserve(kSeq, 35));
  EXPECT_EQ(kv->stats().blocks.n_used, 3);
  kv->truncate(kSeq, 17);
  EXPECT_EQ(kv->seq_tokens(kSeq), 17);
  EXPECT_EQ(kv->stats().blocks.n_used, 2);
  EXPECT_FALSE(kv->reserve(kSeq, 40 - 17 + 32));  // past the blocks of n_ctx: refused
  EXPECT_EQ(kv->seq_tokens(kSeq), 17);
  kv->release(kSeq, {}, 0, false);
  EXPECT_EQ(kv->stats().bytes_used, 0u);
  EXPECT_EQ(kv->stats().blocks.n_free, 3);
}

TEST(KvSeq, DynamicGrowsInChunksAndKeepsRows) {
  const KvShape s = shape(2, 2, 32, DType::F16, DType::F32);
  auto kv = seq_cache(s, 1000, KvAlloc::Dynamic);
  EXPECT_EQ(kv->capacity_tokens(), kKvChunkTokens);
  EXPECT_EQ(kv->stats().bytes_total, kv_alloc_bytes(s, KvAlloc::Dynamic, 1000, 0));
  std::vector<float> k(s.kv_dim()), v(s.kv_dim());
  for (int64_t p = 0; p < 600; ++p) {
    for (int64_t i = 0; i < s.kv_dim(); ++i) k[i] = v[i] = static_cast<float>(p + i % 7);  // exact in f16 (< 2048)
    write(*kv, p, 1, k.data(), v.data());
    // The planner's formula, the allocator's arenas: the same bytes at every length.
    ASSERT_EQ(kv->stats().bytes_total, kv_alloc_bytes(s, KvAlloc::Dynamic, 1000, p + 1)) << p;
  }
  EXPECT_EQ(kv->capacity_tokens(), 3 * kKvChunkTokens);
  for (int64_t p : {0, 1, 255, 256, 511, 512, 599}) {
    EXPECT_EQ(read_row(*kv, 1, true, p)[3], static_cast<float>(p + 3));
    EXPECT_EQ(read_row(*kv, 1, false, p)[5], static_cast<float>(p + 5));
  }
  auto capped = seq_cache(s, 300, KvAlloc::Dynamic);
  ASSERT_TRUE(capped->reserve(kSeq, 300));
  EXPECT_EQ(capped->capacity_tokens(), 304);  // never past n_ctx's blocks
  EXPECT_EQ(capped->stats().bytes_total, kv_seq_bytes(s, 300));
  EXPECT_FALSE(capped->reserve(kSeq, 5));
}

// ---- eviction (sliding window, context shift) ---------------------------------------------------
// Rows after the evicted range move down and their K is re-rotated by -count, so position p holds
// the key rotated for p: the same as rotating the unrotated key for p directly.
TEST(KvSeq, EvictMovesRowsAndReRotatesK) {
  for (DType t : {DType::F32, DType::F16}) {
    const KvShape s = shape(2, 2, 16, t, t);
    const KvRope rope{16, 10000.0f, kernels::RopeMode::Normal};
    auto kv = seq_cache(s, 40, KvAlloc::Static, rope);
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0, 1);
    const int64_t d = s.kv_dim(), n = 30;
    std::vector<float> raw(n * d), k(n * d), v(n * d);
    for (auto& x : raw) x = nd(rng);
    for (int64_t p = 0; p < n; ++p) {
      std::copy_n(raw.data() + p * d, d, k.data() + p * d);
      kernels::rope(k.data() + p * d, 2, 16, 16, p, rope.freq_base, rope.mode);
      for (int64_t i = 0; i < d; ++i) v[p * d + i] = static_cast<float>(p);
    }
    write(*kv, 0, n, k.data(), v.data());
    ASSERT_TRUE(kv->evict(kSeq, 4, 13));  // keep 4 "sinks", evict positions 4..16
    ASSERT_EQ(kv->seq_tokens(kSeq), n - 13);
    EXPECT_EQ(kv->stats().n_evicted_tokens, 13);
    EXPECT_EQ(kv->stats().blocks.n_used, 2);  // ceil(17 / 16)
    for (int64_t p = 0; p < n - 13; ++p) {
      const int64_t src = p < 4 ? p : p + 13;  // which original token position p now holds
      std::vector<float> want(raw.begin() + src * d, raw.begin() + (src + 1) * d);
      kernels::rope(want.data(), 2, 16, 16, p, rope.freq_base, rope.mode);
      const auto got = read_row(*kv, 1, true, p);
      const double tol = t == DType::F32 ? 1e-5 : 4e-3;  // f16 adds one rounding per write
      for (int64_t i = 0; i < d; ++i) EXPECT_NEAR(got[i], want[i], tol) << p << " " << i;
      EXPECT_EQ(read_row(*kv, 1, false, p)[0], static_cast<float>(src));  // V just moves
    }
  }
}

TEST(KvSeq, EvictWithoutRopeOnlyMoves) {
  const KvShape s = shape(1, 1, 32, DType::F32, DType::F32);
  auto kv = seq_cache(s, 24);
  std::vector<float> k(20 * 32), v(20 * 32);
  for (size_t i = 0; i < k.size(); ++i) k[i] = v[i] = static_cast<float>(i / 32);
  write(*kv, 0, 20, k.data(), v.data());
  ASSERT_TRUE(kv->evict(kSeq, 0, 5));
  EXPECT_EQ(kv->seq_tokens(kSeq), 15);
  for (int64_t p = 0; p < 15; ++p) EXPECT_EQ(read_row(*kv, 0, true, p)[0], static_cast<float>(p + 5));
}

}  // namespace
}  // namespace kvlm
