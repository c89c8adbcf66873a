// The KV manager without a model: a sequence's life (admit, reserve, commit, release), prefix
// reuse of full and partial blocks with the rows they hold, refusals that change nothing,
// eviction with copy-on-write of shared blocks, truncation, KIVI's residual slots, and a random
// workload that checks block conservation and the pool/index agreement after every operation.
// Rows are written straight into the manager's store: position p of a sequence holds the values
// of token tokens[p], so a wrong reuse shows up as rows that do not belong to the prompt.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "base/error.h"
#include "kv_manager/kv_manager.h"

namespace kvlm {
namespace {

constexpr int32_t kBs = 4;
constexpr int32_t kDim = 32;  // one layer, one KV head of 32 f32 values

KvShape f32_shape() {
  return KvShape{.n_layer = 1, .n_kv_head = 1, .head_dim = kDim, .dtype_k = DType::F32,
                 .dtype_v = DType::F32};
}

KvManagerConfig config(int32_t n_blocks, bool prefix = true) {
  return KvManagerConfig{.shape = f32_shape(), .block_size = kBs, .n_blocks = n_blocks,
                         .prefix_cache = prefix, .audit = true};
}

std::vector<int32_t> iota_tokens(int n, int32_t first) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) t[static_cast<size_t>(i)] = first + i;
  return t;
}

// The rows a token gets: K = token + d / 64, V = -(token + d / 64).
void token_rows(std::span<const int32_t> toks, std::vector<float>& k, std::vector<float>& v) {
  k.resize(toks.size() * kDim);
  v.resize(toks.size() * kDim);
  for (size_t i = 0; i < toks.size(); ++i)
    for (int d = 0; d < kDim; ++d) {
      k[i * kDim + d] = static_cast<float>(toks[i]) + static_cast<float>(d) / 64.0f;
      v[i * kDim + d] = -k[i * kDim + d];
    }
}

// Runs positions [from, to) of seq "through a model": reserve, write each token's rows, commit.
void compute(KvManager& kv, SeqId seq, std::span<const int32_t> toks, int64_t from, int64_t to) {
  ASSERT_EQ(kv.seq_tokens(seq), from);
  ASSERT_TRUE(kv.reserve(seq, to - from));
  std::vector<float> k, v;
  token_rows(toks.subspan(from, to - from), k, v);
  kv.store().write(0, kv.seq_cache(seq).blocks, from, to - from, k.data(), v.data());
  kv.commit(seq, toks, to);
  kv.check_invariants();
}

// Every position of seq holds its token's rows.
void expect_rows(const KvManager& kv, SeqId seq, std::span<const int32_t> toks) {
  const int64_t n = kv.seq_tokens(seq);
  const KvLayerView view = kv.store().view(0, kv.seq_cache(seq).blocks, n);
  std::vector<float> k, v;
  token_rows(toks.subspan(0, n), k, v);
  for (int64_t p = 0; p < n; ++p) {
    ASSERT_EQ(0, std::memcmp(view.k_head(p, 0), k.data() + p * kDim, kDim * sizeof(float)))
        << "K of position " << p;
    ASSERT_EQ(0, std::memcmp(view.v_head(p, 0), v.data() + p * kDim, kDim * sizeof(float)))
        << "V of position " << p;
  }
}

// Writes the rows of toks[pos, pos + n) into every layer of seq's groups (room reserved before)
// and commits them: one computed chunk of a multi-group cache.
void write_chunk(KvManager& kv, SeqId seq, std::span<const int32_t> toks, int64_t pos, int64_t n) {
  std::vector<float> k, v;
  token_rows(toks.subspan(static_cast<size_t>(pos), static_cast<size_t>(n)), k, v);
  const auto caches = kv.seq_caches(seq);
  for (int32_t il = 0; il < kv.shape().n_layer; ++il)
    kv.store().write(il, caches[static_cast<size_t>(il)].blocks, pos, n, k.data(), v.data());
  kv.commit(seq, toks, pos + n);
}

// Admits seq with whatever the index holds of toks; returns the tokens it got from the cache.
int64_t admit(KvManager& kv, SeqId seq, std::span<const int32_t> toks, std::string_view salt = "") {
  const KvHit hit = kv.lookup(toks, salt);
  EXPECT_TRUE(kv.admit(seq, toks, salt, static_cast<int64_t>(toks.size()), hit));
  kv.check_invariants();
  EXPECT_EQ(kv.seq_tokens(seq), hit.n_tokens());
  return hit.n_tokens();
}

TEST(KvManager, RejectsBadConfig) {
  EXPECT_THROW(KvManager{config(0)}, Error);
  KvManagerConfig c = config(8);
  c.block_size = 0;
  EXPECT_THROW(KvManager{c}, Error);
  c = config(8);
  c.shape.head_dim = 0;
  EXPECT_THROW(KvManager{c}, Error);
  // KIVI: no prefix cache, blocks of whole K groups, a residual slot per sequence.
  KvShape kivi = f32_shape();
  kivi.dtype_k = DType::Q4_0;
  kivi.kivi_residual = 8;
  kivi.kivi_group = 32;
  EXPECT_THROW(KvManager({.shape = kivi, .block_size = 32, .n_blocks = 4, .n_slots = 1}), Error);
  EXPECT_THROW(KvManager({.shape = kivi, .block_size = 16, .n_blocks = 4, .n_slots = 1,
                          .prefix_cache = false}),
               Error);
  EXPECT_THROW(KvManager({.shape = kivi, .block_size = 32, .n_blocks = 4, .n_slots = 0,
                          .prefix_cache = false}),
               Error);
}

TEST(KvManager, LifeOfASequenceConservesBlocks) {
  KvManager kv(config(8));
  const auto toks = iota_tokens(10, 100);
  EXPECT_EQ(admit(kv, 1, toks), 0);
  compute(kv, 1, toks, 0, 7);
  compute(kv, 1, toks, 7, 10);
  expect_rows(kv, 1, toks);
  KvManagerStats s = kv.stats();
  EXPECT_EQ(s.blocks.n_used, 3);          // ceil(10 / 4)
  EXPECT_EQ(s.blocks.n_cached, 2);        // the two full blocks are registered
  EXPECT_EQ(s.bytes_used, 3 * PagedKvStore::block_bytes(f32_shape(), kBs));
  EXPECT_EQ(s.bytes_total, 8 * PagedKvStore::block_bytes(f32_shape(), kBs));
  EXPECT_EQ(s.n_seqs, 1);
  kv.release(1, toks, 10, /*keep_partial=*/false);
  kv.check_invariants();
  s = kv.stats();
  EXPECT_EQ(s.blocks.n_used, 0);
  EXPECT_EQ(s.blocks.n_free, 8);
  EXPECT_EQ(s.blocks.n_cached_free, 2);  // registered blocks stay reusable
  EXPECT_FALSE(kv.has_seq(1));
  EXPECT_THROW((void)kv.reserve(1, 1), Error);
  EXPECT_THROW(kv.commit(1, toks, 1), Error);
}

// A second prompt starting like a finished one gets its full blocks shared and its partial last
// block copied, and the rows it reads are the first prompt's.
TEST(KvManager, PrefixHitSharesFullBlocksAndCopiesThePartialOne) {
  KvManager kv(config(16));
  const auto first = iota_tokens(10, 100);  // blocks [100..103] [104..107], leaf [108, 109]
  admit(kv, 1, first);
  compute(kv, 1, first, 0, 10);
  kv.release(1, first, 10, /*keep_partial=*/true);
  kv.check_invariants();
  EXPECT_EQ(kv.stats().blocks.n_cached, 3);

  auto second = first;
  second.push_back(7);
  second.push_back(8);
  EXPECT_EQ(admit(kv, 2, second), 10);  // 8 shared + 2 copied: only the new tokens remain
  expect_rows(kv, 2, second);
  compute(kv, 2, second, 10, 12);
  expect_rows(kv, 2, second);
  // Another tenant sees nothing.
  EXPECT_EQ(kv.lookup(second, "other").n_tokens(), 0);
  // The same prompt again shares what sequence 2 is still holding.
  EXPECT_EQ(admit(kv, 3, second), 11);
  expect_rows(kv, 3, second);
}

TEST(KvManager, RefusalsChangeNothing) {
  KvManager kv(config(4));
  const auto a = iota_tokens(12, 0);
  admit(kv, 1, a);
  compute(kv, 1, a, 0, 12);  // 3 of 4 blocks
  const auto before = kv.stats();
  EXPECT_FALSE(kv.reserve(1, 5));  // needs 2 more blocks
  const auto b = iota_tokens(8, 500);
  EXPECT_FALSE(kv.admit(2, b, "", 8, kv.lookup(b, "")));  // needs 2 blocks, 1 free
  kv.check_invariants();
  const auto after = kv.stats();
  EXPECT_EQ(after.blocks.n_free, before.blocks.n_free);
  EXPECT_EQ(after.blocks.n_used, before.blocks.n_used);
  EXPECT_EQ(kv.seq_tokens(1), 12);
  EXPECT_FALSE(kv.has_seq(2));
  expect_rows(kv, 1, a);
  EXPECT_TRUE(kv.reserve(1, 4));  // the last block
  EXPECT_THROW((void)kv.admit(1, a, "", 12, KvHit{}), Error);  // already admitted
}

// Eviction moves later rows down (f32 rows, no rotation: bytes move unchanged) and copies a block
// shared with another sequence first, so the other one keeps its rows.
TEST(KvManager, EvictCopiesSharedBlocksAndStopsRegistering) {
  KvManager kv(config(16));
  const auto toks = iota_tokens(14, 10);
  admit(kv, 1, toks);
  compute(kv, 1, toks, 0, 14);
  EXPECT_EQ(admit(kv, 2, toks), 12);  // shares the 3 full blocks
  compute(kv, 2, toks, 12, 14);
  const int64_t cached = kv.stats().blocks.n_cached;
  ASSERT_TRUE(kv.evict(2, 2, 5));  // positions [2, 7) go: the 3 shared blocks are copied first
  kv.check_invariants();
  EXPECT_TRUE(kv.evicted(2));
  EXPECT_FALSE(kv.evicted(1));
  EXPECT_EQ(kv.seq_tokens(2), 9);
  EXPECT_EQ(kv.stats().n_evicted_tokens, 5);
  std::vector<int32_t> kept(toks.begin(), toks.begin() + 2);
  kept.insert(kept.end(), toks.begin() + 7, toks.end());
  expect_rows(kv, 2, kept);
  expect_rows(kv, 1, toks);  // untouched
  // An evicted sequence's rows are no function of its tokens: nothing more is registered.
  kept.push_back(99);
  kept.push_back(98);
  kept.push_back(97);
  compute(kv, 2, kept, 9, 12);
  EXPECT_EQ(kv.stats().blocks.n_cached, cached);
  EXPECT_THROW((void)kv.evict(2, 10, 5), Error);  // past the end
  // What was dropped, in the sequence's own positions: [2, 7), then 3 more from position 2 of the
  // rows left, which were positions 7..9: [2, 10) in all.
  EXPECT_EQ(kv.dropped(2).begin, 2);
  EXPECT_EQ(kv.dropped(2).count, 5);
  ASSERT_TRUE(kv.evict(2, 2, 3));
  EXPECT_EQ(kv.dropped(2).begin, 2);
  EXPECT_EQ(kv.dropped(2).count, 8);
  kept.erase(kept.begin() + 2, kept.begin() + 5);
  expect_rows(kv, 2, kept);
  EXPECT_EQ(kv.dropped(1).begin, -1);
  EXPECT_EQ(kv.dropped(1).count, 0);
}

TEST(KvManager, EvictRefusedWhenThePoolCannotCopy) {
  KvManager kv(config(4));
  const auto toks = iota_tokens(8, 10);
  admit(kv, 1, toks);
  compute(kv, 1, toks, 0, 8);
  EXPECT_EQ(admit(kv, 2, toks), 7);  // block 0 shared, 3 rows of block 1 copied (last token left)
  ASSERT_TRUE(kv.reserve(1, 4));     // the last free block
  const auto before = kv.stats();
  EXPECT_EQ(before.blocks.n_free, 0);
  EXPECT_FALSE(kv.evict(2, 0, 2));   // block 0 is shared: a copy needs a free block
  kv.check_invariants();
  EXPECT_EQ(kv.stats().blocks.n_used, before.blocks.n_used);
  EXPECT_EQ(kv.seq_tokens(2), 7);
  expect_rows(kv, 2, toks);
  EXPECT_FALSE(kv.evicted(2));
  EXPECT_EQ(kv.dropped(2).count, 0);  // a refused eviction drops nothing
}

// Truncating into a registered block and writing again drops the block's index entry first: the
// index never names rows that changed.
TEST(KvManager, TruncateThenRewriteForgetsTheBlock) {
  KvManager kv(config(8));
  const auto toks = iota_tokens(8, 10);
  admit(kv, 1, toks);
  compute(kv, 1, toks, 0, 8);
  EXPECT_EQ(kv.stats().blocks.n_cached, 2);
  kv.truncate(1, 6);
  auto other = toks;
  other[6] = 1000;
  other[7] = 1001;
  compute(kv, 1, other, 6, 8);
  expect_rows(kv, 1, other);
  EXPECT_EQ(kv.stats().blocks.n_cached, 2);  // block 1 dropped, then registered with new tokens
  auto probe = other;
  probe.push_back(5);
  EXPECT_EQ(kv.lookup(probe, "").full.n_tokens, 8);
  probe = toks;
  probe.push_back(5);
  EXPECT_EQ(kv.lookup(probe, "").full.n_tokens, 4);  // the old second block is gone
}

TEST(KvManager, KiviSlotsAndSealing) {
  KvShape kivi = f32_shape();
  kivi.dtype_k = DType::Q4_0;
  kivi.kivi_residual = 8;
  kivi.kivi_group = 32;
  KvManager kv({.shape = kivi, .block_size = 32, .n_blocks = 8, .n_slots = 2,
                .prefix_cache = false, .audit = true});
  const auto toks = iota_tokens(100, 0);
  ASSERT_TRUE(kv.admit(1, toks, "", 100, kv.lookup(toks, "")));
  ASSERT_TRUE(kv.admit(2, toks, "", 100, kv.lookup(toks, "")));
  EXPECT_THROW((void)kv.admit(3, toks, "", 100, KvHit{}), Error);  // both slots held
  EXPECT_NE(kv.seq_cache(1).kivi_slot, kv.seq_cache(2).kivi_slot);
  ASSERT_TRUE(kv.reserve(1, 70));
  kv.commit(1, toks, 70);
  EXPECT_EQ(kv.seq_cache(1).n_sealed, 32);  // 70 - 8 = 62: one whole group leaves the residual
  ASSERT_TRUE(kv.reserve(1, 30));
  kv.commit(1, toks, 100);
  EXPECT_EQ(kv.seq_cache(1).n_sealed, 64);
  EXPECT_THROW(kv.truncate(1, 50), Error);  // sealed tokens cannot be un-sealed
  EXPECT_THROW((void)kv.evict(1, 0, 10), Error);
  kv.check_invariants();
  kv.release(1, toks, 100, true);
  kv.check_invariants();
  ASSERT_TRUE(kv.admit(3, toks, "", 100, KvHit{}));  // the freed slot
  EXPECT_EQ(kv.seq_cache(3).n_sealed, 0);
  kv.check_invariants();
}

// KIVI with a window group: layer 0 attends to everything, layer 1 to the last kW positions. Fed
// the same chunks, the grouped cache holds exactly what a one-group KIVI cache holds for every
// row a query at the next position reads (sealed K groups and V rows, f16 residual rows), byte
// for byte, while its window group releases blocks. A window of 8 (< R + G) reads only f16 rows
// and releases blocks before their group is sealed (never sealed then: no window reads them); a
// window of 80 reads sealed rows too. Both release schedules: before a pass (Session) and on
// commit (a shared pool).
void expect_kivi_window_group_holds_the_flat_rows(int32_t kW, bool release_on_commit) {
  KvShape s = f32_shape();
  s.n_layer = 2;
  s.dtype_k = DType::Q4_0;
  s.dtype_v = DType::Q8_0;
  s.kivi_residual = 8;
  s.kivi_group = 32;
  constexpr int32_t kKbs = 32, kN = 300;
  const auto bound = static_cast<int32_t>(kv_window_blocks(kW, 13, kN, kKbs));
  KvManager flat({.shape = s, .block_size = kKbs, .n_blocks = 10, .n_slots = 1,
                  .prefix_cache = false, .audit = true});
  KvManager grouped({.shape = s, .block_size = kKbs, .n_blocks = 10, .n_slots = 1,
                     .prefix_cache = false, .audit = true, .rope = KvRope{},
                     .layer_group = {0, 1},
                     .groups = {{.window = 0, .n_blocks = 10}, {.window = kW, .n_blocks = bound}},
                     .release_on_commit = release_on_commit});
  const auto toks = iota_tokens(kN, 3);
  for (KvManager* kv : {&flat, &grouped}) ASSERT_TRUE(kv->admit(0, toks, "", kN, KvHit{}));
  const size_t kb = kv_kivi_group_bytes(s), vb = kv_v_row_bytes(s);
  int n_holes_unsealed = 0;  // groups whose block was released before they were sealed
  int64_t n_sealed_read = 0;  // sealed rows a window reads, compared
  for (int64_t pos = 0; pos < kN;) {
    const int64_t n = std::min<int64_t>(pos < 100 ? 13 : 1, kN - pos);
    std::vector<float> k, v;
    token_rows(std::span<const int32_t>(toks).subspan(pos, n), k, v);
    for (KvManager* kv : {&flat, &grouped}) {
      ASSERT_TRUE(kv->reserve(0, n));
      const auto caches = kv->seq_caches(0);
      const KvSeqCache c0 = caches[0];
      for (int32_t il = 0; il < 2; ++il) {
        const KvSeqCache& c = caches[static_cast<size_t>(kv->store().layer_group(il))];
        std::vector<float> kl(k), vl(v);  // layer il's rows: the token's, scaled per layer
        for (float& x : kl) x *= static_cast<float>(il + 1);
        kv->store().kivi_write(il, c.blocks, c.kivi_slot, c.n_sealed, pos, n, kl.data(), vl.data());
        kv->store().kivi_finish_write(il, c.kivi_slot, c.n_sealed, pos, n, kl.data(), vl.data());
      }
      if (kv == &grouped) {
        const int64_t s1 = kv_kivi_sealed(c0.n_sealed, pos + n, s.kivi_residual, s.kivi_group);
        for (int64_t g0 = c0.n_sealed; g0 < s1; g0 += s.kivi_group)
          n_holes_unsealed += caches[1].blocks[static_cast<size_t>(g0 / kKbs)] == kNoBlock;
      }
      kv->commit(0, toks, pos + n);
      kv->check_invariants();
    }
    pos += n;
    ASSERT_LE(grouped.stats().groups[1].blocks.n_used, bound);
    for (int32_t il = 0; il < 2; ++il) {
      const auto view = [&](const KvManager& kv) {
        const KvSeqCache c = kv.seq_caches(0)[static_cast<size_t>(kv.store().layer_group(il))];
        return kv.store().view(il, c.blocks, pos, c.kivi_slot, c.n_sealed);
      };
      const KvLayerView a = view(flat), b = view(grouped);
      ASSERT_EQ(a.n_sealed1, b.n_sealed1);
      for (int64_t j = il == 0 ? 0 : std::max<int64_t>(0, pos - kW + 1); j < pos; ++j) {
        SCOPED_TRACE(testing::Message() << "layer " << il << " position " << j << " of " << pos);
        if (j >= a.n_sealed1) {
          const size_t r = static_cast<size_t>((j - a.n_sealed0) * kDim);
          ASSERT_EQ(0, std::memcmp(a.k_resid + r, b.k_resid + r, kDim * 2));
          ASSERT_EQ(0, std::memcmp(a.v_resid + r, b.v_resid + r, kDim * 2));
          continue;
        }
        ASSERT_NE(b.blocks[j / kKbs], kNoBlock);
        n_sealed_read += il == 1;
        const int64_t g0 = j - j % s.kivi_group;
        ASSERT_EQ(0, std::memcmp(a.k + a.row(g0) * a.k_row_bytes, b.k + b.row(g0) * b.k_row_bytes,
                                 kb));
        ASSERT_EQ(0, std::memcmp(a.v + a.row(j) * vb, b.v + b.row(j) * vb, vb));
      }
    }
  }
  EXPECT_EQ(grouped.seq_caches(0)[1].blocks[0], kNoBlock);
  if (kW < s.kivi_residual + s.kivi_group) {
    EXPECT_GT(n_holes_unsealed, 0);
  } else {
    EXPECT_GT(n_sealed_read, 1000);
  }
  EXPECT_FALSE(grouped.can_truncate(0, 100));  // sealed, and released by the window
  for (KvManager* kv : {&flat, &grouped}) kv->release(0, toks, kN, false);
  grouped.check_invariants();
  EXPECT_EQ(grouped.stats().blocks.n_free, 10 + bound);
}

TEST(KvManager, KiviWindowGroupHoldsWhatAFlatKiviCacheHolds) {
  for (const int32_t window : {8, 80})
    for (const bool on_commit : {false, true}) {
      SCOPED_TRACE(testing::Message() << "window " << window << ", release "
                                      << (on_commit ? "on commit" : "before each pass"));
      expect_kivi_window_group_holds_the_flat_rows(window, on_commit);
    }
}

// Two cache groups over two layers: layer 1 attends to the last 8 positions. Its group gives
// back the blocks no later query reads (holes at the front of its table) while group 0 keeps
// every block; rows written before stay readable where the window still reads them; a
// truncation back into released blocks is refused; release returns every block of both groups.
TEST(KvManager, WindowGroupReleasesWhatItsWindowNoLongerSees) {
  KvShape two = f32_shape();
  two.n_layer = 2;
  KvManager kv({.shape = two, .block_size = kBs, .n_blocks = 16, .prefix_cache = false,
                .audit = true, .rope = KvRope{}, .layer_group = {0, 1},
                .groups = {{.window = 0, .n_blocks = 16}, {.window = 8, .n_blocks = 4}}});
  ASSERT_EQ(kv.n_groups(), 2);
  EXPECT_EQ(kv.capacity_tokens(), 64);  // the full group's blocks
  const auto toks = iota_tokens(60, 0);
  ASSERT_TRUE(kv.admit(1, toks, "", 60, KvHit{}));
  for (int64_t pos = 0; pos < 60; pos += 3) {
    ASSERT_TRUE(kv.reserve(1, 3)) << pos;
    write_chunk(kv, 1, toks, pos, 3);
    kv.check_invariants();
    const KvManagerStats st = kv.stats();
    EXPECT_EQ(st.groups[0].blocks.n_used, (pos + 3 + kBs - 1) / kBs);
    EXPECT_LE(st.groups[1].blocks.n_used, 4);  // (8 - 1 + 3) / 4 + 1 blocks at most
  }
  const auto caches = kv.seq_caches(1);
  EXPECT_EQ(caches[1].blocks.size(), caches[0].blocks.size());  // holes keep the table's length
  EXPECT_EQ(caches[1].blocks[0], kNoBlock);
  // Layer 1 still reads positions 50..59 (the window of 57..59 and more): its rows are intact.
  const KvLayerView view = kv.store().view(1, caches[1].blocks, 60);
  std::vector<float> want_k, want_v;
  token_rows(std::span<const int32_t>(toks).subspan(50, 10), want_k, want_v);
  for (int64_t p = 50; p < 60; ++p)
    EXPECT_EQ(0, std::memcmp(view.k_head(p, 0), want_k.data() + (p - 50) * kDim, kDim * 4)) << p;
  EXPECT_FALSE(kv.can_truncate(1, 20));
  EXPECT_THROW(kv.truncate(1, 20), Error);
  EXPECT_TRUE(kv.can_truncate(1, 58));
  kv.truncate(1, 58);
  kv.check_invariants();
  kv.release(1, toks, 58, false);
  kv.check_invariants();
  EXPECT_EQ(kv.stats().blocks.n_free, 20);
}

// Eviction with a window group: the full group shifts in place; the window group keeps only the
// rows the window of the new end reads (its blocks renewed, never more than its bound), each the
// row of the token now at that position (no RoPE here, so moved rows keep their bytes). An
// eviction whose window would read kept rows the group released is refused, changing nothing.
TEST(KvManager, WindowGroupEvictKeepsWhatTheWindowReads) {
  KvShape two = f32_shape();
  two.n_layer = 2;
  KvManager kv({.shape = two, .block_size = kBs, .n_blocks = 16, .prefix_cache = false,
                .audit = true, .rope = KvRope{}, .layer_group = {0, 1},
                .groups = {{.window = 0, .n_blocks = 16}, {.window = 8, .n_blocks = 4}}});
  std::vector<int32_t> toks = iota_tokens(40, 0);
  ASSERT_TRUE(kv.admit(1, toks, "", 40, KvHit{}));
  for (int64_t pos = 0; pos < 40; pos += 3) {
    const int64_t n = std::min<int64_t>(3, 40 - pos);
    ASSERT_TRUE(kv.reserve(1, n)) << pos;
    write_chunk(kv, 1, toks, pos, n);
  }
  // [2, 36) out leaves 6 positions: the window of position 6 reads from 0, released long ago.
  EXPECT_THROW((void)kv.evict(1, 2, 34), Error);
  EXPECT_EQ(kv.seq_tokens(1), 40);
  EXPECT_FALSE(kv.evicted(1));
  kv.check_invariants();
  // [2, 22) out: the window of position 20 reads from 13, all moved rows (tokens 33..39).
  ASSERT_TRUE(kv.evict(1, 2, 20));
  kv.check_invariants();
  toks.erase(toks.begin() + 2, toks.begin() + 22);
  ASSERT_EQ(kv.seq_tokens(1), 20);
  EXPECT_LE(kv.stats().groups[1].blocks.n_used, 4);
  std::vector<float> want_k, want_v;
  token_rows(toks, want_k, want_v);
  const auto caches = kv.seq_caches(1);
  const KvLayerView full = kv.store().view(0, caches[0].blocks, 20);
  for (int64_t p = 0; p < 20; ++p)
    EXPECT_EQ(0, std::memcmp(full.k_head(p, 0), want_k.data() + p * kDim, kDim * 4)) << p;
  EXPECT_EQ(caches[1].blocks[0], kNoBlock);  // before the window: holes
  const KvLayerView win = kv.store().view(1, caches[1].blocks, 20);
  for (int64_t p = 13; p < 20; ++p) {
    EXPECT_EQ(0, std::memcmp(win.k_head(p, 0), want_k.data() + p * kDim, kDim * 4)) << p;
    EXPECT_EQ(0, std::memcmp(win.v_head(p, 0), want_v.data() + p * kDim, kDim * 4)) << p;
  }
  // It goes on growing and evicting within the window's bound, and gives every block back.
  const std::vector<int32_t> more = iota_tokens(30, 100);
  toks.insert(toks.end(), more.begin(), more.end());
  for (int64_t pos = 20; pos < 50; pos += 3) {
    ASSERT_TRUE(kv.reserve(1, 3)) << pos;
    write_chunk(kv, 1, toks, pos, 3);
    EXPECT_LE(kv.stats().groups[1].blocks.n_used, 4);
  }
  ASSERT_TRUE(kv.evict(1, 2, 9));
  kv.check_invariants();
  kv.release(1, toks, kv.seq_tokens(1), false);
  EXPECT_EQ(kv.stats().blocks.n_free, 20);
}

// A window pool shared by n_parallel sequences, sized by kv_window_pool_blocks: with
// release_on_commit no schedule (steps of at most n_batch tokens in all, any split, any order,
// sequences idle for any number of steps) runs it short; holding each pass's blocks until the
// sequence's next pass instead, a round robin of whole-batch chunks does.
int64_t window_pool_schedule(bool release_on_commit, bool round_robin) {
  constexpr int32_t kW = 24, kBlock = 16, kPar = 6, kBatch = 64, kCtx = 2048;
  KvShape two = f32_shape();
  two.n_layer = 2;
  const auto window_blocks =
      static_cast<int32_t>(kv_window_pool_blocks(kW, kPar, kBatch, kCtx, kBlock));
  KvManager kv({.shape = two, .block_size = kBlock, .n_blocks = kPar * kCtx / kBlock,
                .prefix_cache = false, .audit = false, .bytes = false, .rope = KvRope{},
                .layer_group = {0, 1},
                .groups = {{.window = 0, .n_blocks = kPar * kCtx / kBlock},
                           {.window = kW, .n_blocks = window_blocks}},
                .release_on_commit = release_on_commit});
  const std::vector<int32_t> toks(kCtx, 1);
  for (SeqId q = 0; q < kPar; ++q) EXPECT_TRUE(kv.admit(q, {}, "", 0, KvHit{}));
  std::mt19937 rng(7);
  std::vector<SeqId> order(kPar);
  for (int step = 0; step < 3000; ++step) {
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    int64_t budget = kBatch;
    for (SeqId q : order) {
      if (round_robin && q != step % kPar) continue;
      if (budget == 0 || (!round_robin && rng() % 3 == 0)) continue;  // idle this step
      const int64_t c = round_robin ? budget : 1 + int64_t(rng() % uint64_t(budget));
      if (kv.seq_tokens(q) + c > kCtx) {  // a new request in its place
        kv.release(q, toks, kv.seq_tokens(q), false);
        EXPECT_TRUE(kv.admit(q, {}, "", 0, KvHit{}));
      }
      if (!kv.reserve(q, c)) return step;
      kv.commit(q, toks, kv.seq_tokens(q));
      budget -= c;
      EXPECT_LE(kv.stats().groups[1].blocks.n_used, window_blocks);
    }
  }
  kv.check_invariants();
  return -1;
}

TEST(KvManager, SharedWindowPoolBoundHoldsForAnySchedule) {
  EXPECT_LT(kv_window_pool_blocks(24, 6, 64, 2048, 16), 6 * kv_window_blocks(24, 64, 2048, 16));
  EXPECT_EQ(window_pool_schedule(true, false), -1);  // never short
  EXPECT_EQ(window_pool_schedule(true, true), -1);
  EXPECT_GE(window_pool_schedule(false, true), 0);  // short: the bound needs the release
}

// The prefix cache with a window group: group 0's registered blocks index the hit, the window
// group keeps twins of them (cached, same tokens, its layer). A hit takes group 0's blocks and the
// twins of the blocks its window reads (holes before), whose rows are the tokens'; once the window
// pool hands the twins out again the hit shrinks to what it can still serve, and never breaks the
// invariants (audit after every operation).
TEST(KvManager, WindowGroupPrefixHitTakesTwins) {
  KvShape two = f32_shape();
  two.n_layer = 2;
  KvManager kv({.shape = two, .block_size = kBs, .n_blocks = 16, .prefix_cache = true,
                .audit = true, .rope = KvRope{}, .layer_group = {0, 1},
                .groups = {{.window = 0, .n_blocks = 16}, {.window = 8, .n_blocks = 4}}});
  const auto toks = iota_tokens(40, 0);
  ASSERT_TRUE(kv.admit(1, toks, "", 40, KvHit{}));
  for (int64_t pos = 0; pos < 40; pos += 4) {
    ASSERT_TRUE(kv.reserve(1, 4)) << pos;
    write_chunk(kv, 1, toks, pos, 4);
  }
  kv.release(1, toks, 40, true);
  kv.check_invariants();

  // 44 tokens continuing the 40: all 10 blocks hit; the window of position 40 starts in block 8.
  std::vector<int32_t> more = toks;
  for (int32_t t : iota_tokens(4, 100)) more.push_back(t);
  const KvHit hit = kv.lookup(more, "");
  ASSERT_EQ(hit.n_tokens(), 40);
  EXPECT_LT(hit.partial.block, 0);
  ASSERT_TRUE(kv.admit(2, more, "", 44, hit));
  const auto caches = kv.seq_caches(2);
  ASSERT_EQ(caches[1].blocks.size(), 10u);
  EXPECT_EQ(caches[1].blocks[7], kNoBlock);
  ASSERT_NE(caches[1].blocks[8], kNoBlock);
  const KvLayerView view = kv.store().view(1, caches[1].blocks, 40);
  std::vector<float> want_k, want_v;
  token_rows(std::span<const int32_t>(toks).subspan(32, 8), want_k, want_v);
  for (int64_t p = 32; p < 40; ++p)
    EXPECT_EQ(0, std::memcmp(view.k_head(p, 0), want_k.data() + (p - 32) * kDim, kDim * 4)) << p;
  kv.release(2, more, 40, false);
  kv.check_invariants();

  // Blocks 0..6 of group 0 are still registered, but the window pool (4 blocks) handed their
  // twins out again while sequence 1 went on: a prompt sharing 28 tokens gets no more than the
  // window group can serve, and admitting it is fine.
  std::vector<int32_t> part(toks.begin(), toks.begin() + 28);
  for (int32_t t : iota_tokens(8, 200)) part.push_back(t);
  const KvHit short_hit = kv.lookup(part, "");
  EXPECT_LT(short_hit.n_tokens(), 28);
  ASSERT_TRUE(kv.admit(3, part, "", 36, short_hit));
  kv.check_invariants();
  kv.release(3, part, short_hit.n_tokens(), false);
  kv.check_invariants();
}

// The random workload with a window group and the prefix cache: two layers, layer 1 attends to
// the last 6 positions. Admissions with hits (full blocks and their window twins), chunks,
// truncations where the window still holds what they keep, releases; after every operation the
// invariants hold (twins exactly the window pool's cached blocks), layer 0 holds every position's
// rows and layer 1 the rows of the window the next position reads.
TEST(KvManager, RandomWorkloadWithAWindowGroupKeepsRows) {
  constexpr int32_t kWindow = 6;
  KvShape two = f32_shape();
  two.n_layer = 2;
  KvManager kv({.shape = two, .block_size = kBs, .n_blocks = 16, .prefix_cache = true,
                .audit = true, .rope = KvRope{}, .layer_group = {0, 1},
                .groups = {{.window = 0, .n_blocks = 16},
                           {.window = kWindow, .n_blocks = 10, .seq_blocks = 4}}});
  std::mt19937 rng(11);
  const auto system = iota_tokens(13, 1);
  std::map<SeqId, std::vector<int32_t>> toks;  // per live sequence; seq_tokens are computed
  SeqId next = 1;
  int n_hits = 0, n_truncations = 0, n_releases = 0, n_refusals = 0;
  for (int op = 0; op < 500; ++op) {
    const int what = static_cast<int>(rng() % 5);
    if (what == 0 || toks.empty()) {
      std::vector<int32_t> t = system;
      for (int i = 0, n = 1 + static_cast<int>(rng() % 10); i < n; ++i)
        t.push_back(static_cast<int32_t>(rng() % 3));
      const KvHit hit = kv.lookup(t, "");
      if (!kv.admit(next, t, "", static_cast<int64_t>(t.size()), hit)) {
        ++n_refusals;
        continue;
      }
      n_hits += hit.n_tokens() > 0;
      toks[next++] = std::move(t);
      continue;
    }
    auto it = toks.begin();
    std::advance(it, rng() % toks.size());
    const SeqId id = it->first;
    std::vector<int32_t>& t = it->second;
    const int64_t done = kv.seq_tokens(id);
    if (what <= 2) {  // a chunk, or a generated token once the prompt is done
      if (done == static_cast<int64_t>(t.size())) t.push_back(static_cast<int32_t>(rng() % 3));
      const int64_t n = std::min<int64_t>(1 + rng() % 6, static_cast<int64_t>(t.size()) - done);
      if (!kv.reserve(id, n)) {
        ++n_refusals;
        continue;
      }
      write_chunk(kv, id, t, done, n);
    } else if (what == 3 && done > 0) {
      const int64_t n = rng() % done;
      if (!kv.can_truncate(id, n)) continue;
      kv.truncate(id, n);
      t.resize(static_cast<size_t>(n));
      ++n_truncations;
    } else if (what == 4) {
      kv.release(id, t, done, rng() % 2 == 0);
      toks.erase(it);
      ++n_releases;
    }
    kv.check_invariants();
    for (const auto& [sid, st] : toks) {
      const int64_t n = kv.seq_tokens(sid);
      expect_rows(kv, sid, st);  // layer 0: every position
      const auto blocks = kv.seq_caches(sid)[1].blocks;
      const KvLayerView view = kv.store().view(1, blocks, n);
      std::vector<float> k, v;
      token_rows(std::span<const int32_t>(st).first(static_cast<size_t>(n)), k, v);
      for (int64_t p = std::max<int64_t>(0, n - kWindow + 1); p < n; ++p) {
        ASSERT_NE(blocks[static_cast<size_t>(p / kBs)], kNoBlock) << "op " << op << " position " << p;
        ASSERT_EQ(0, std::memcmp(view.k_head(p, 0), k.data() + p * kDim, kDim * 4))
            << "op " << op << " layer 1 position " << p;
      }
    }
  }
  EXPECT_GT(n_hits, 10);
  EXPECT_GT(n_refusals, 5);
  EXPECT_GT(n_truncations, 10);
  EXPECT_GT(n_releases, 10);
  for (auto& [sid, st] : toks) kv.release(sid, st, kv.seq_tokens(sid), true);
  kv.check_invariants();
  EXPECT_EQ(kv.stats().n_seqs, 0);
}

// A sequence that computed a block already registered by another continues its chain from that
// block, which it does not hold: when that block is evicted and registered again with other
// tokens, it is no longer a parent (its registration number changed), so nothing registers under
// it. Without the check, sequence 2's second block would chain to sequence 3's block and a prompt
// of sequence 3's tokens followed by sequence 2's would get a false hit.
TEST(KvManager, ADuplicatesChainEndsWhenItsRegisteredTwinIsReused) {
  KvManager kv(config(6));
  const auto t = iota_tokens(16, 0);
  ASSERT_TRUE(kv.admit(1, std::span(t).first(12), "", 12, KvHit{}));
  ASSERT_TRUE(kv.reserve(1, 12));
  kv.commit(1, t, 12);
  ASSERT_TRUE(kv.admit(2, t, "", 8, KvHit{}));  // no hit taken: it computes block 0 again
  ASSERT_TRUE(kv.reserve(2, 8));
  kv.commit(2, t, 4);  // a duplicate: its chain continues from sequence 1's block 0
  kv.release(1, t, 12, false);
  const auto u = iota_tokens(16, 500);
  ASSERT_TRUE(kv.admit(3, u, "", 16, KvHit{}));
  ASSERT_TRUE(kv.reserve(3, 16));  // every free block: sequence 1's cached ones too
  kv.commit(3, u, 16);
  kv.commit(2, t, 8);
  kv.check_invariants();
  for (int j = 0; j < 4; ++j) {
    std::vector<int32_t> p(u.begin(), u.begin() + 4 * (j + 1));
    p.insert(p.end(), t.begin() + 4, t.begin() + 8);
    p.push_back(999);
    EXPECT_LE(kv.lookup(p, "").n_tokens(), 4 * (j + 1)) << j;
  }
}

// n choices of one prompt: fork shares every block (refcounts raised, no block taken); the first
// write into the shared, partly filled last block copies it, and the parent's rows stay as they
// were; full blocks stay shared; the last writer owns the original and writes in place. The
// audit runs after every operation (compute), and everything comes back at release.
TEST(KvManager, ForkSharesBlocksAndCopiesTheLastOnWrite) {
  KvManager kv(config(12));
  const auto prompt = iota_tokens(10, 100);  // 2 full blocks of 4 and 2 rows in the third
  EXPECT_EQ(admit(kv, 1, prompt), 0);
  compute(kv, 1, prompt, 0, 10);
  const std::vector<BlockId> table(kv.seq_cache(1).blocks.begin(), kv.seq_cache(1).blocks.end());
  ASSERT_EQ(table.size(), 3u);
  kv.fork(1, 2);
  kv.fork(1, 3);
  kv.check_invariants();
  EXPECT_THROW(kv.fork(1, 2), Error);   // exists
  EXPECT_THROW(kv.fork(9, 10), Error);  // unknown
  EXPECT_EQ(kv.stats().blocks.n_used, 3);  // nothing taken
  for (BlockId b : table) EXPECT_EQ(kv.pool(0).ref_count(b), 3);
  for (SeqId s : {2, 3}) {
    EXPECT_EQ(kv.seq_tokens(s), 10);
    expect_rows(kv, s, prompt);
  }
  // Each choice appends its own token; the parent's rows must survive the children's writes.
  std::vector<std::vector<int32_t>> toks(4, prompt);
  for (SeqId s : {2, 1, 3}) toks[static_cast<size_t>(s)].push_back(static_cast<int32_t>(900 + s));
  compute(kv, 2, toks[2], 10, 11);  // shared last block: copied first
  EXPECT_NE(kv.seq_cache(2).blocks[2], table[2]);
  EXPECT_EQ(kv.pool(0).ref_count(table[2]), 2);
  expect_rows(kv, 1, prompt);  // untouched by 2's write
  compute(kv, 1, toks[1], 10, 11);  // still shared with 3: copied too
  EXPECT_NE(kv.seq_cache(1).blocks[2], table[2]);
  compute(kv, 3, toks[3], 10, 11);  // 3 holds the original alone now: written in place
  EXPECT_EQ(kv.seq_cache(3).blocks[2], table[2]);
  EXPECT_EQ(kv.stats().blocks.n_used, 5);  // 2 shared full blocks + 3 last blocks
  for (int b = 0; b < 2; ++b) EXPECT_EQ(kv.pool(0).ref_count(table[static_cast<size_t>(b)]), 3);
  // Grow each past the shared blocks: one more block each, the full ones still shared.
  for (SeqId s : {1, 2, 3}) {
    auto& t = toks[static_cast<size_t>(s)];
    for (int i = 0; i < 5; ++i) t.push_back(static_cast<int32_t>(1000 + 10 * s + i));
    compute(kv, s, t, 11, 16);
  }
  for (SeqId s : {1, 2, 3}) expect_rows(kv, s, toks[static_cast<size_t>(s)]);
  EXPECT_EQ(kv.stats().blocks.n_used, 2 + 3 * 2);
  for (SeqId s : {1, 2, 3}) {
    kv.release(s, toks[static_cast<size_t>(s)], 16, true);
    kv.check_invariants();
  }
  EXPECT_EQ(kv.stats().blocks.n_used, 0);
  EXPECT_EQ(kv.stats().n_seqs, 0);
}

// A fork continues the parent's prefix chain: its next full block registers (a later prompt
// continuing the child's tokens hits it), and a fork of a multi-group cache forks every group's
// table, holes included; KIVI refuses to fork.
TEST(KvManager, ForkContinuesThePrefixChainAndForksEveryGroup) {
  KvManager kv(config(12));
  const auto prompt = iota_tokens(6, 0);
  EXPECT_EQ(admit(kv, 1, prompt), 0);
  compute(kv, 1, prompt, 0, 6);
  kv.fork(1, 2);
  auto t2 = prompt;
  for (int i = 0; i < 4; ++i) t2.push_back(50 + i);
  compute(kv, 2, t2, 6, 10);  // fills block 1: registered under block 0
  auto probe = t2;
  probe.push_back(7);
  EXPECT_EQ(kv.lookup(probe, "").full.n_tokens, 8);
  kv.release(2, t2, 10, false);
  kv.release(1, prompt, 6, false);
  kv.check_invariants();

  KvShape two = f32_shape();
  two.n_layer = 2;
  KvManager kw({.shape = two, .block_size = kBs, .n_blocks = 16, .prefix_cache = false,
                .audit = true, .rope = KvRope{}, .layer_group = {0, 1},
                .groups = {{.window = 0, .n_blocks = 16}, {.window = 8, .n_blocks = 8}}});
  auto toks = iota_tokens(22, 0);
  ASSERT_TRUE(kw.admit(1, toks, "", 22, KvHit{}));
  for (int64_t pos = 0; pos < 18; pos += 6) {
    ASSERT_TRUE(kw.reserve(1, 6));
    write_chunk(kw, 1, toks, pos, 6);
  }
  kw.fork(1, 2);
  kw.check_invariants();
  for (int32_t g = 0; g < 2; ++g) {
    const auto a = kw.seq_caches(1)[static_cast<size_t>(g)].blocks;
    const std::vector<BlockId> pa(a.begin(), a.end());
    const auto b = kw.seq_caches(2)[static_cast<size_t>(g)].blocks;
    EXPECT_EQ(pa, std::vector<BlockId>(b.begin(), b.end())) << "group " << g;
  }
  EXPECT_EQ(kw.seq_caches(2)[1].blocks[0], kNoBlock);  // the window's hole, forked as a hole
  auto t2w = toks;
  t2w[18] = 77;  // the child's own token at position 18, in the shared partial block
  ASSERT_TRUE(kw.reserve(2, 1));
  write_chunk(kw, 2, t2w, 18, 1);
  ASSERT_TRUE(kw.reserve(1, 1));
  write_chunk(kw, 1, toks, 18, 1);
  kw.check_invariants();
  // Layer 1 (the window group) of each reads its own position 18 and the shared 11..17.
  for (SeqId s : {1, 2}) {
    const auto& want = s == 1 ? toks : t2w;
    const KvLayerView view = kw.store().view(1, kw.seq_caches(s)[1].blocks, 19);
    std::vector<float> k, v;
    token_rows(std::span<const int32_t>(want).subspan(11, 8), k, v);
    for (int64_t p = 11; p < 19; ++p)
      EXPECT_EQ(0, std::memcmp(view.k_head(p, 0), k.data() + (p - 11) * kDim, kDim * 4))
          << "seq " << s << " position " << p;
  }
  kw.release(1, toks, 19, false);
  kw.release(2, t2w, 19, false);
  kw.check_invariants();
  EXPECT_EQ(kw.stats().blocks.n_used, 0);

  KvShape kivi = f32_shape();
  kivi.dtype_k = DType::Q4_0;
  kivi.kivi_residual = 8;
  kivi.kivi_group = 32;
  KvManager kk({.shape = kivi, .block_size = 32, .n_blocks = 8, .n_slots = 2,
                .prefix_cache = false, .audit = true});
  ASSERT_TRUE(kk.admit(1, toks, "", 22, KvHit{}));
  EXPECT_THROW(kk.fork(1, 2), Error);
  kk.check_invariants();
}

// Random sequences of admissions, chunked computation, evictions, truncations and releases over a
// small pool, with prompts that share prefixes: after every operation the pool and the index
// agree and every block is free or used exactly once (check_invariants), and every running
// sequence reads its own tokens' rows (expect_rows: a wrong share or a missed copy-on-write would
// show here). At the end, with everything released, every block is free.
TEST(KvManager, RandomWorkloadKeepsRowsAndBlocks) {
  KvManager kv(config(12));
  std::mt19937 rng(7);
  const auto system = iota_tokens(9, 1);  // a shared system prompt
  struct Live {
    std::vector<int32_t> toks;
    int64_t done = 0;
  };
  std::map<SeqId, Live> live;
  SeqId next = 1;
  int n_hits = 0, n_evictions = 0, n_truncations = 0, n_releases = 0, n_refusals = 0;
  for (int op = 0; op < 400; ++op) {
    const int what = static_cast<int>(rng() % 6);
    if (what == 0 || live.empty()) {
      Live l;
      l.toks = system;
      const int n_own = 1 + static_cast<int>(rng() % 10);
      for (int i = 0; i < n_own; ++i) l.toks.push_back(static_cast<int32_t>(rng() % 5));
      const KvHit hit = kv.lookup(l.toks, "");
      if (!kv.admit(next, l.toks, "", static_cast<int64_t>(l.toks.size()), hit)) {
        ++n_refusals;
        continue;
      }
      l.done = hit.n_tokens();
      n_hits += l.done > 0;
      live[next++] = l;
      continue;
    }
    auto it = live.begin();
    std::advance(it, rng() % live.size());
    const SeqId id = it->first;
    Live& l = it->second;
    if (what <= 2) {  // compute a chunk (or append a generated token once the prompt is done)
      if (l.done == static_cast<int64_t>(l.toks.size()))
        l.toks.push_back(static_cast<int32_t>(rng() % 5));
      const int64_t n = std::min<int64_t>(1 + rng() % 6, l.toks.size() - l.done);
      if (!kv.reserve(id, n)) {
        ++n_refusals;
        continue;
      }
      std::vector<float> k, v;
      token_rows(std::span<const int32_t>(l.toks).subspan(l.done, n), k, v);
      kv.store().write(0, kv.seq_cache(id).blocks, l.done, n, k.data(), v.data());
      l.done += n;
      kv.commit(id, l.toks, l.done);
    } else if (what == 3 && l.done > 4) {  // evict a few positions after the first two
      const int64_t count = 1 + rng() % (l.done - 3);
      if (!kv.evict(id, 2, count)) {
        ++n_refusals;
        continue;
      }
      l.toks.erase(l.toks.begin() + 2, l.toks.begin() + 2 + count);
      l.done -= count;
      ++n_evictions;
    } else if (what == 4 && l.done > 0) {
      const int64_t n = rng() % l.done;
      kv.truncate(id, n);
      l.toks.resize(static_cast<size_t>(n));
      l.done = n;
      ++n_truncations;
    } else if (what == 5) {
      kv.release(id, l.toks, l.done, rng() % 2 == 0);
      live.erase(it);
      ++n_releases;
    }
    kv.check_invariants();
    for (const auto& [sid, s] : live) {
      ASSERT_EQ(kv.seq_tokens(sid), s.done) << "op " << op;
      expect_rows(kv, sid, s.toks);
    }
  }
  // The workload did what it is for: hits, refusals of a full pool, every operation.
  EXPECT_GT(n_hits, 10);
  EXPECT_GT(n_refusals, 5);
  EXPECT_GT(n_evictions, 10);
  EXPECT_GT(n_truncations, 10);
  EXPECT_GT(n_releases, 10);
  for (auto& [sid, s] : live) kv.release(sid, s.toks, s.done, true);
  kv.check_invariants();
  EXPECT_EQ(kv.stats().blocks.n_free, 12);
  EXPECT_EQ(kv.stats().n_seqs, 0);
}

}  // namespace
}  // namespace kvlm
