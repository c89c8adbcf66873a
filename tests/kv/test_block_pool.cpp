// Paged KV bookkeeping without tensors: allocation, refcounts, fork, copy-on-write, truncation,
// cached-free blocks and their LRU eviction order, failure without side effects, and a randomized
// property test that simulates the storage the tables point into (so a missed copy-on-write or a
// write into a cached block shows up as wrong tokens, not only as a wrong count).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "base/error.h"
#include "kv/block_pool.h"

namespace kvlm {
namespace {

BlockPool make_pool(int32_t n_blocks, int32_t block_size = 16) {
  BlockPool::Config c;
  c.n_blocks = n_blocks;
  c.block_size = block_size;
  return BlockPool(c);
}

std::vector<BlockId> table(const BlockPool& pool, SeqId seq) {
  auto t = pool.block_table(seq);
  return {t.begin(), t.end()};
}

// Everything observable through the public API, to check that a failed call changed nothing.
struct Snapshot {
  std::map<SeqId, std::vector<BlockId>> tables;
  std::map<SeqId, int64_t> lengths;
  std::vector<int32_t> refs;
  std::vector<bool> cached;
  int32_t n_free = 0, n_cached_free = 0;
  bool operator==(const Snapshot&) const = default;
};

Snapshot snapshot(const BlockPool& pool, const std::vector<SeqId>& seqs) {
  Snapshot s;
  for (SeqId q : seqs) {
    s.tables[q] = table(pool, q);
    s.lengths[q] = pool.seq_tokens(q);
  }
  for (BlockId b = 0; b < pool.n_blocks(); ++b) {
    s.refs.push_back(pool.ref_count(b));
    s.cached.push_back(pool.is_cached(b));
  }
  s.n_free = pool.stats().n_free;
  s.n_cached_free = pool.stats().n_cached_free;
  return s;
}

// ---- allocation ---------------------------------------------------------------------------------

TEST(BlockPool, RejectsBadConfig) {
  EXPECT_THROW(make_pool(0), Error);
  EXPECT_THROW(make_pool(-3), Error);
  EXPECT_THROW(make_pool(8, 0), Error);
}

TEST(BlockPool, FreshPoolIsAllFree) {
  BlockPool pool = make_pool(8);
  const BlockPoolStats s = pool.stats();
  EXPECT_EQ(s.n_total, 8);
  EXPECT_EQ(s.n_free, 8);
  EXPECT_EQ(s.n_used, 0);
  EXPECT_EQ(s.n_cached, 0);
  EXPECT_EQ(pool.block_size(), 16);
}

TEST(BlockPool, AppendTakesCeilBlocks) {
  BlockPool pool = make_pool(8);
  std::vector<BlockCopy> copies;
  pool.add_seq(1);
  ASSERT_TRUE(pool.append(1, 1, &copies));
  EXPECT_EQ(table(pool, 1), (std::vector<BlockId>{0}));
  ASSERT_TRUE(pool.append(1, 15, &copies));  // fills block 0 exactly
  EXPECT_EQ(table(pool, 1).size(), 1u);
  ASSERT_TRUE(pool.append(1, 1, &copies));  // position 16 opens block 1
  EXPECT_EQ(table(pool, 1), (std::vector<BlockId>{0, 1}));
  ASSERT_TRUE(pool.append(1, 40, &copies));  // 57 tokens: 4 blocks
  EXPECT_EQ(pool.seq_tokens(1), 57);
  EXPECT_EQ(table(pool, 1).size(), 4u);
  EXPECT_TRUE(copies.empty());
  EXPECT_EQ(pool.stats().n_used, 4);
  EXPECT_EQ(pool.stats().n_free, 4);
  EXPECT_EQ(pool.ref_count(3), 1);
  EXPECT_TRUE(pool.append(1, 0, &copies));  // nothing to do
  EXPECT_EQ(pool.seq_tokens(1), 57);
}

TEST(BlockPool, ConfigurableBlockSize) {
  BlockPool pool = make_pool(8, 4);
  std::vector<BlockCopy> copies;
  pool.add_seq(0);
  EXPECT_EQ(pool.blocks_needed(0, 9), 3);
  ASSERT_TRUE(pool.append(0, 9, &copies));
  EXPECT_EQ(table(pool, 0).size(), 3u);
}

TEST(BlockPool, FreeReturnsEveryBlock) {
  BlockPool pool = make_pool(8);
  std::vector<BlockCopy> copies;
  pool.add_seq(1);
  pool.add_seq(2);
  ASSERT_TRUE(pool.append(1, 33, &copies));
  ASSERT_TRUE(pool.append(2, 16, &copies));
  EXPECT_EQ(pool.stats().n_used, 4);
  pool.free_seq(1);
  EXPECT_FALSE(pool.has_seq(1));
  EXPECT_EQ(pool.stats().n_used, 1);
  pool.free_seq(2);
  EXPECT_EQ(pool.stats().n_free, 8);
  EXPECT_EQ(pool.n_seqs(), 0);
}

TEST(BlockPool, OutOfBlocksFailsWithoutChangingState) {
  BlockPool pool = make_pool(4);
  std::vector<BlockCopy> copies;
  pool.add_seq(1);
  ASSERT_TRUE(pool.append(1, 40, &copies));  // 3 blocks, last partial
  const Snapshot before = snapshot(pool, {1});
  EXPECT_EQ(pool.blocks_needed(1, 25), 2);
  EXPECT_FALSE(pool.append(1, 25, &copies));  // needs 2, 1 free
  EXPECT_EQ(snapshot(pool, {1}), before);
  EXPECT_TRUE(copies.empty());

  // A copy-on-write counts: after a fork the partial block must be copied, so appending even one
  // token into it needs one block, and the rest of the block then needs a second one.
  pool.fork(1, 2);
  const Snapshot forked = snapshot(pool, {1, 2});
  EXPECT_EQ(pool.blocks_needed(2, 9), 2);  // copy + the block for position 48
  EXPECT_FALSE(pool.append(2, 9, &copies));
  EXPECT_EQ(snapshot(pool, {1, 2}), forked);
  EXPECT_TRUE(copies.empty());
  EXPECT_TRUE(pool.append(2, 8, &copies));  // just the copy
  EXPECT_EQ(copies.size(), 1u);
}

TEST(BlockPool, HugeAppendFailsCleanly) {
  BlockPool pool = make_pool(4);
  std::vector<BlockCopy> copies;
  pool.add_seq(1);
  EXPECT_FALSE(pool.append(1, int64_t{1} << 50, &copies));
  EXPECT_EQ(pool.stats().n_free, 4);
  EXPECT_EQ(pool.seq_tokens(1), 0);
}

// ---- sharing ------------------------------------------------------------------------------------

TEST(BlockPool, ForkSharesBlocks) {
  BlockPool pool = make_pool(8);
  std::vector<BlockCopy> copies;
  pool.add_seq(1);
  ASSERT_TRUE(pool.append(1, 20, &copies));
  pool.fork(1, 2);
  EXPECT_EQ(table(pool, 2), table(pool, 1));
  EXPECT_EQ(pool.seq_tokens(2), 20);
  EXPECT_EQ(pool.ref_count(0), 2);
  EXPECT_EQ(pool.ref_count(1), 2);
  EXPECT_EQ(pool.stats().n_used, 2);  // blocks, not references
  pool.free_seq(1);
  EXPECT_EQ(pool.ref_count(0), 1);
  EXPECT_EQ(pool.stats().n_used, 2);
  pool.free_seq(2);
  EXPECT_EQ(pool.stats().n_free, 8);
}

TEST(BlockPool, CopyOnWriteOfSharedPartialBlock) {
  BlockPool pool = make_pool(8);
  std::vector<BlockCopy> copies;
  pool.add_seq(1);
  ASSERT_TRUE(pool.append(1, 20, &copies));  // blocks 0, 1 (4 tokens in 1)
  pool.fork(1, 2);
  ASSERT_TRUE(pool.append(2, 1, &copies));
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].src, 1);
  EXPECT_EQ(copies[0].dst, 2);
  EXPECT_EQ(table(pool, 2), (std::vector<BlockId>{0, 2}));
  EXPECT_EQ(table(pool, 1), (std::vector<BlockId>{0, 1}));  // the original is untouched
  EXPECT_EQ(pool.ref_count(0), 2);
  EXPECT_EQ(pool.ref_count(1), 1);
  EXPECT_EQ(pool.ref_count(2), 1);
  copies.clear();
  ASSERT_TRUE(pool.append(1, 1, &copies));  // block 1 is now seq 1's alone: written in place
  EXPECT_TRUE(copies.empty());
  EXPECT_EQ(table(pool, 1), (std::vector<BlockId>{0, 1}));
}

TEST(BlockPool, FullSharedBlocksAreNeverCopied) {
  BlockPool pool = make_pool(8);
  std::vector<BlockCopy> copies;
  pool.add_seq(1);
  ASSERT_TRUE(pool.append(1, 32, &copies));
  pool.fork(1, 2);
  EXPECT_EQ(pool.blocks_needed(2, 1), 1);
  ASSERT_TRUE(pool.append(2, 1, &copies));
  EXPECT_TRUE(copies.empty());
  EXPECT_EQ(table(pool, 2), (std::vector<BlockId>{0, 1, 2}));
}

// ---- truncation ---------------------------------------------------------------------------------

TEST(BlockPool, TruncateReleasesTailBlocks) {
  BlockPool pool = make_pool(8);
  std::vector<BlockCopy> copies;
  pool.add_seq(1);
  ASSERT_TRUE(pool.append(1, 40, &copies));
  pool.truncate(1, 17);
  EXPECT_EQ(pool.seq_tokens(1), 17);
  EXPECT_EQ(table(pool, 1), (std::vector<BlockId>{0, 1}));
  EXPECT_EQ(pool.stats().n_free, 6);
  pool.truncate(1, 16);
  EXPECT_EQ(table(pool, 1), (std::vector<BlockId>{0}));
  pool.truncate(1, 16);  // no-op
  pool.truncate(1, 0);
  EXPECT_TRUE(table(pool, 1).empty());
  EXPECT_EQ(pool.stats().n_free, 8);
  EXPECT_THROW(pool.truncate(1, 1), Error);
  EXPECT_THROW(pool.truncate(1, -1), Error);
}

TEST(BlockPool, WriteAfterTruncateIntoSharedBlockCopies) {
  BlockPool pool = make_pool(8);
  std::vector<BlockCopy> copies;
  pool.add_seq(1);
  ASSERT_TRUE(pool.append(1, 32, &copies));
  pool.fork(1, 2);
  pool.truncate(2, 10);  // inside block 0, still shared with seq 1
  EXPECT_EQ(pool.ref_count(1), 1);
  ASSERT_TRUE(pool.append(2, 3, &copies));
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].src, 0);
  EXPECT_EQ(table(pool, 1), (std::vector<BlockId>{0, 1}));
  EXPECT_EQ(table(pool, 2), (std::vector<BlockId>{copies[0].dst}));
}

// ---- bad arguments ------------------------------------------------------------------------------

TEST(BlockPool, BadArgumentsThrow) {
  BlockPool pool = make_pool(4);
  std::vector<BlockCopy> copies;
  EXPECT_THROW((void)pool.append(7, 1, &copies), Error);  // unknown sequence
  EXPECT_THROW(pool.free_seq(7), Error);
  EXPECT_THROW(pool.seq_tokens(7), Error);
  pool.add_seq(1);
  EXPECT_THROW(pool.add_seq(1), Error);
  EXPECT_THROW((void)pool.append(1, -1, &copies), Error);
  EXPECT_THROW((void)pool.append(1, 1, nullptr), Error);
  EXPECT_THROW(pool.fork(7, 8), Error);
  pool.add_seq(2);
  EXPECT_THROW(pool.fork(1, 2), Error);
  const BlockId plain_free[] = {3};
  EXPECT_THROW(pool.append_shared(1, plain_free), Error);  // garbage contents
  const BlockId out_of_range[] = {4};
  EXPECT_THROW(pool.append_shared(1, out_of_range), Error);
  EXPECT_THROW(pool.mark_cached(0), Error);  // free
  ASSERT_TRUE(pool.append(1, 5, &copies));
  pool.mark_cached(0);
  EXPECT_THROW(pool.mark_cached(0), Error);  // twice
  const BlockId held[] = {0};
  EXPECT_THROW(pool.append_shared(1, held), Error);  // seq 1 ends inside a block
  EXPECT_THROW(pool.ref_count(-1), Error);
  EXPECT_EQ(pool.stats().n_used, 1);  // none of it changed the state
  EXPECT_EQ(pool.n_seqs(), 2);
}

// ---- cached blocks and LRU ----------------------------------------------------------------------

// One sequence per block: seq s holds a full cached block.
void fill_cached(BlockPool& pool, SeqId seq) {
  std::vector<BlockCopy> copies;
  pool.add_seq(seq);
  ASSERT_TRUE(pool.append(seq, pool.block_size(), &copies));
  pool.mark_cached(table(pool, seq)[0]);
}

TEST(BlockPool, CachedBlocksStayReusableAfterRelease) {
  BlockPool pool = make_pool(4);
  std::vector<BlockId> evicted;
  pool.set_evict_hook([&](BlockId b) { evicted.push_back(b); });
  fill_cached(pool, 1);
  pool.free_seq(1);
  BlockPoolStats s = pool.stats();
  EXPECT_EQ(s.n_free, 4);  // reusable and allocatable at once
  EXPECT_EQ(s.n_cached, 1);
  EXPECT_EQ(s.n_cached_free, 1);
  EXPECT_TRUE(pool.is_cached(0));

  pool.add_seq(2);
  const BlockId hit[] = {0};
  pool.append_shared(2, hit);  // a prefix hit picks it out of the free queue
  EXPECT_EQ(pool.seq_tokens(2), 16);
  EXPECT_EQ(pool.ref_count(0), 1);
  s = pool.stats();
  EXPECT_EQ(s.n_free, 3);
  EXPECT_EQ(s.n_cached_free, 0);
  EXPECT_TRUE(evicted.empty());
}

TEST(BlockPool, PlainFreeBlocksGoFirstThenLeastRecentlyReleased) {
  BlockPool pool = make_pool(4);
  std::vector<BlockId> evicted;
  pool.set_evict_hook([&](BlockId b) { evicted.push_back(b); });
  fill_cached(pool, 10);  // block 0
  fill_cached(pool, 11);  // block 1
  fill_cached(pool, 12);  // block 2
  pool.free_seq(10);
  pool.free_seq(12);
  pool.free_seq(11);  // LRU order now 0, 2, 1; block 3 was never used
  std::vector<BlockCopy> copies;
  pool.add_seq(1);
  ASSERT_TRUE(pool.append(1, 16, &copies));
  EXPECT_EQ(table(pool, 1), (std::vector<BlockId>{3}));  // no eviction while plain blocks remain
  EXPECT_TRUE(evicted.empty());
  ASSERT_TRUE(pool.append(1, 48, &copies));
  EXPECT_EQ(table(pool, 1), (std::vector<BlockId>{3, 0, 2, 1}));
  EXPECT_EQ(evicted, (std::vector<BlockId>{0, 2, 1}));
  EXPECT_EQ(pool.stats().n_cached, 0);
  EXPECT_EQ(pool.stats().n_evicted, 3);
  EXPECT_FALSE(pool.append(1, 1, &copies));  // and then it is full
}

TEST(BlockPool, HitRefreshesRecency) {
  BlockPool pool = make_pool(2);
  std::vector<BlockId> evicted;
  pool.set_evict_hook([&](BlockId b) { evicted.push_back(b); });
  fill_cached(pool, 10);  // block 0
  fill_cached(pool, 11);  // block 1
  pool.free_seq(10);
  pool.free_seq(11);  // LRU: 0, 1
  pool.add_seq(2);
  const BlockId hit[] = {0};
  pool.append_shared(2, hit);
  pool.free_seq(2);  // 0 used again: LRU 1, 0
  std::vector<BlockCopy> copies;
  pool.add_seq(3);
  ASSERT_TRUE(pool.append(3, 1, &copies));
  EXPECT_EQ(evicted, (std::vector<BlockId>{1}));
}

TEST(BlockPool, DeeperBlocksOfASequenceAreEvictedFirst) {
  BlockPool pool = make_pool(3);
  std::vector<BlockId> evicted;
  pool.set_evict_hook([&](BlockId b) { evicted.push_back(b); });
  std::vector<BlockCopy> copies;
  pool.add_seq(1);
  ASSERT_TRUE(pool.append(1, 48, &copies));
  for (BlockId b : table(pool, 1)) pool.mark_cached(b);
  pool.free_seq(1);
  pool.add_seq(2);
  ASSERT_TRUE(pool.append(2, 17, &copies));
  // The last block goes first: without its parents a block can never be matched anyway.
  EXPECT_EQ(evicted, (std::vector<BlockId>{2, 1}));
}

TEST(BlockPool, WriteIntoCachedBlockHeldAloneDropsTheEntry) {
  BlockPool pool = make_pool(4);
  std::vector<BlockId> evicted;
  pool.set_evict_hook([&](BlockId b) { evicted.push_back(b); });
  std::vector<BlockCopy> copies;
  pool.add_seq(1);
  ASSERT_TRUE(pool.append(1, 32, &copies));
  pool.mark_cached(0);
  pool.mark_cached(1);
  pool.truncate(1, 20);
  ASSERT_TRUE(pool.append(1, 1, &copies));  // overwrites rows 4.. of block 1
  EXPECT_TRUE(copies.empty());
  EXPECT_EQ(evicted, (std::vector<BlockId>{1}));
  EXPECT_FALSE(pool.is_cached(1));
  EXPECT_TRUE(pool.is_cached(0));
}

TEST(BlockPool, WriteIntoSharedCachedBlockCopiesAndKeepsTheEntry) {
  BlockPool pool = make_pool(4);
  std::vector<BlockId> evicted;
  pool.set_evict_hook([&](BlockId b) { evicted.push_back(b); });
  std::vector<BlockCopy> copies;
  pool.add_seq(1);
  ASSERT_TRUE(pool.append(1, 32, &copies));
  pool.mark_cached(1);
  pool.fork(1, 2);
  pool.truncate(2, 20);
  ASSERT_TRUE(pool.append(2, 1, &copies));
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].src, 1);
  EXPECT_TRUE(evicted.empty());
  EXPECT_TRUE(pool.is_cached(1));
  EXPECT_FALSE(pool.is_cached(copies[0].dst));
}

// make_writable (the window's and context shift's in-place row moves): shared blocks in the range
// are replaced by fresh ones with a copy each, the other holders keep theirs; a cached block held
// alone loses its entry; blocks outside the range are untouched.
TEST(BlockPool, MakeWritableCopiesSharedAndUncachesHeldAlone) {
  BlockPool pool = make_pool(8);
  std::vector<BlockId> evicted;
  pool.set_evict_hook([&](BlockId b) { evicted.push_back(b); });
  std::vector<BlockCopy> copies;
  pool.add_seq(1);
  ASSERT_TRUE(pool.append(1, 48, &copies));  // blocks 0, 1, 2
  pool.mark_cached(0);
  pool.mark_cached(1);
  pool.add_seq(2);
  pool.append_shared(2, std::vector<BlockId>{0});  // block 0 shared by 1 and 2
  ASSERT_TRUE(pool.make_writable(1, 0, 3, &copies));
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].src, 0);
  const auto t1 = table(pool, 1);
  EXPECT_EQ(t1[0], copies[0].dst);
  EXPECT_EQ(t1[1], 1);
  EXPECT_EQ(t1[2], 2);
  EXPECT_EQ(table(pool, 2), (std::vector<BlockId>{0}));
  EXPECT_EQ(pool.ref_count(0), 1);
  EXPECT_TRUE(pool.is_cached(0));  // still seq 2's, still registered
  EXPECT_FALSE(pool.is_cached(1));  // held by seq 1 alone: written in place, entry dropped
  EXPECT_EQ(evicted, (std::vector<BlockId>{1}));
  // An empty range, and a range whose blocks are already private, change nothing.
  const Snapshot before = snapshot(pool, {1, 2});
  copies.clear();
  ASSERT_TRUE(pool.make_writable(1, 1, 1, &copies));
  ASSERT_TRUE(pool.make_writable(1, 0, 3, &copies));
  EXPECT_TRUE(copies.empty());
  EXPECT_TRUE(snapshot(pool, {1, 2}) == before);
  EXPECT_THROW((void)pool.make_writable(1, 2, 4, &copies), Error);
  EXPECT_THROW((void)pool.make_writable(1, 0, 1, nullptr), Error);
  pool.check_invariants();
}

TEST(BlockPool, MakeWritableWithoutFreeBlocksChangesNothing) {
  BlockPool pool = make_pool(2);
  std::vector<BlockCopy> copies;
  pool.add_seq(1);
  ASSERT_TRUE(pool.append(1, 32, &copies));
  pool.fork(1, 2);  // both blocks shared, none free
  const Snapshot before = snapshot(pool, {1, 2});
  EXPECT_FALSE(pool.make_writable(1, 0, 2, &copies));
  EXPECT_TRUE(copies.empty());
  EXPECT_TRUE(snapshot(pool, {1, 2}) == before);
  pool.free_seq(2);
  ASSERT_TRUE(pool.make_writable(1, 0, 2, &copies));  // now held alone: no copy needed
  EXPECT_TRUE(copies.empty());
  pool.check_invariants();
}

// renew: a new table of holes then fresh blocks, its own blocks counted as free (a window
// group's eviction); short of blocks it changes nothing; shared blocks stay with their other
// holder.
TEST(BlockPool, RenewGivesHolesThenFreshBlocks) {
  BlockPool pool = make_pool(6, 4);
  std::vector<BlockCopy> copies;
  pool.add_seq(1);
  ASSERT_TRUE(pool.append(1, 20, &copies));  // 5 blocks
  pool.release_front(1, 2);                   // holes, holes, b, b, b: 3 free
  ASSERT_TRUE(pool.renew(1, 14, 1));          // 4 entries: a hole, then 3 fresh
  const auto t = pool.block_table(1);
  ASSERT_EQ(t.size(), 4u);
  EXPECT_EQ(t[0], kNoBlock);
  for (size_t i = 1; i < 4; ++i) EXPECT_NE(t[i], kNoBlock);
  EXPECT_EQ(pool.seq_tokens(1), 14);
  EXPECT_EQ(pool.stats().n_used, 3);
  pool.fork(1, 2);  // every block shared: renewing 1 frees none of them
  const Snapshot before = snapshot(pool, {1, 2});
  EXPECT_FALSE(pool.can_renew(1, 16, 0));
  EXPECT_FALSE(pool.renew(1, 16, 0));  // 4 needed, 3 free
  EXPECT_TRUE(snapshot(pool, {1, 2}) == before);
  ASSERT_TRUE(pool.renew(1, 12, 0));
  EXPECT_EQ(pool.stats().n_used, 6);  // seq 2 keeps its 3
  EXPECT_THROW((void)pool.renew(1, 8, 2), Error);  // the last entry would be a hole
  ASSERT_TRUE(pool.renew(1, 0, 0));
  EXPECT_TRUE(pool.block_table(1).empty());
  pool.free_seq(1);
  pool.free_seq(2);
  EXPECT_EQ(pool.stats().n_free, 6);
  pool.check_invariants();
}

// ---- randomized property test -------------------------------------------------------------------

// A few thousand random operations against a simulated storage: every block holds block_size
// token values; appends apply the pool's copies and then write the new tokens through the block
// table. After every operation: conservation, refcounts == table references (recounted here from
// the public API), every sequence reads back its own tokens, and every cached block still holds
// what it held when it was marked.
TEST(BlockPool, RandomOperationsKeepInvariants) {
  constexpr int32_t kBlocks = 40, kBs = 4;
  BlockPool::Config cfg;
  cfg.n_blocks = kBlocks;
  cfg.block_size = kBs;
  BlockPool pool(cfg);
  std::vector<std::vector<int32_t>> storage(kBlocks, std::vector<int32_t>(kBs, -1));
  std::map<BlockId, std::vector<int32_t>> cached;  // block -> contents when marked
  pool.set_evict_hook([&](BlockId b) { ASSERT_EQ(cached.erase(b), 1u); });
  std::map<SeqId, std::vector<int32_t>> seqs;  // the tokens each sequence should read back
  std::mt19937 rng(1234);
  auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<uint32_t>(n)); };
  auto pick_seq = [&]() {
    auto it = seqs.begin();
    std::advance(it, pick(static_cast<int>(seqs.size())));
    return it->first;
  };
  SeqId next_seq = 0;
  int32_t next_token = 0;
  int n_fail = 0, n_cow = 0, n_shared = 0, n_evict_seen = 0;

  for (int step = 0; step < 5000; ++step) {
    const int op = pick(100);
    if (seqs.empty() || op < 6) {
      pool.add_seq(next_seq);
      seqs[next_seq++] = {};
    } else if (op < 46) {  // append
      const SeqId q = pick_seq();
      const int64_t n = pick(10);
      std::vector<BlockCopy> copies;
      const Snapshot before = snapshot(pool, {q});
      const int32_t need = pool.blocks_needed(q, n);
      if (!pool.append(q, n, &copies)) {
        ++n_fail;
        ASSERT_GT(need, before.n_free);
        ASSERT_EQ(snapshot(pool, {q}), before);
        ASSERT_TRUE(copies.empty());
      } else {
        ASSERT_LE(need, before.n_free);
        for (const BlockCopy& c : copies) storage[c.dst] = storage[c.src];
        n_cow += static_cast<int>(copies.size());
        std::vector<int32_t>& toks = seqs[q];
        auto t = pool.block_table(q);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t pos = static_cast<int64_t>(toks.size());
          toks.push_back(next_token);
          storage[t[pos / kBs]][pos % kBs] = next_token++;
        }
      }
    } else if (op < 56) {  // prefix hit: share a chain of cached blocks into an aligned sequence
      const SeqId q = pick_seq();
      if (seqs[q].size() % kBs != 0 || cached.empty()) continue;
      std::vector<BlockId> ids;
      const int n = 1 + pick(3);
      for (int i = 0; i < n; ++i) {
        auto it = cached.begin();
        std::advance(it, pick(static_cast<int>(cached.size())));
        ids.push_back(it->first);
      }
      pool.append_shared(q, ids);
      for (BlockId b : ids) seqs[q].insert(seqs[q].end(), cached[b].begin(), cached[b].end());
      ++n_shared;
    } else if (op < 63) {  // fork
      const SeqId q = pick_seq();
      pool.fork(q, next_seq);
      seqs[next_seq++] = seqs[q];
    } else if (op < 73) {  // truncate
      const SeqId q = pick_seq();
      const int64_t n = pick(static_cast<int>(seqs[q].size()) + 1);
      pool.truncate(q, n);
      seqs[q].resize(static_cast<size_t>(n));
    } else if (op < 86) {  // mark a full, uncached block of some sequence as cached
      const SeqId q = pick_seq();
      const size_t n_full = seqs[q].size() / kBs;
      if (n_full == 0) continue;
      const BlockId b = pool.block_table(q)[static_cast<size_t>(pick(static_cast<int>(n_full)))];
      if (pool.is_cached(b)) continue;
      pool.mark_cached(b);
      cached[b] = storage[b];
    } else {  // free
      const SeqId q = pick_seq();
      pool.free_seq(q);
      seqs.erase(q);
    }

    // Conservation and refcounts, recounted from the public API.
    const BlockPoolStats s = pool.stats();
    ASSERT_EQ(s.n_free + s.n_used, s.n_total);
    std::vector<int32_t> refs(kBlocks, 0);
    for (const auto& [q, toks] : seqs) {
      auto t = pool.block_table(q);
      ASSERT_EQ(pool.seq_tokens(q), static_cast<int64_t>(toks.size()));
      ASSERT_EQ(t.size(), (toks.size() + kBs - 1) / kBs);
      for (BlockId b : t) ++refs[b];
      for (size_t pos = 0; pos < toks.size(); ++pos)
        ASSERT_EQ(storage[t[pos / kBs]][pos % kBs], toks[pos]) << "seq " << q << " pos " << pos;
    }
    int32_t n_used = 0, n_cached_free = 0;
    for (BlockId b = 0; b < kBlocks; ++b) {
      ASSERT_EQ(pool.ref_count(b), refs[b]) << "block " << b;
      n_used += refs[b] > 0;
      ASSERT_EQ(pool.is_cached(b), cached.count(b) == 1);
      if (pool.is_cached(b)) {
        ASSERT_EQ(storage[b], cached[b]) << "cached block " << b << " was overwritten";
        n_cached_free += refs[b] == 0;
      }
    }
    ASSERT_EQ(s.n_used, n_used);
    ASSERT_EQ(s.n_cached, static_cast<int32_t>(cached.size()));
    ASSERT_EQ(s.n_cached_free, n_cached_free);
    n_evict_seen = static_cast<int>(s.n_evicted);
    pool.check_invariants();
  }
  std::printf("failed appends %d, copies %d, shared %d, evicted %d\n", n_fail, n_cow, n_shared,
              n_evict_seen);
  // The mix must actually exercise the interesting paths.
  EXPECT_GT(n_fail, 20);
  EXPECT_GT(n_cow, 20);
  EXPECT_GT(n_shared, 20);
  EXPECT_GT(n_evict_seen, 20);
}

}  // namespace
}  // namespace kvlm
