// The prefix index alone (hash chains, longest-prefix match, the last-token rule, salts and cache
// types, collision safety through an injected hash function), then with kv's BlockPool following
// the protocol of docs/KV.md: admit (match + share + allocate), register filled blocks, evict via
// the pool's hook. The randomized tests simulate the storage behind the block ids, so a wrong reuse
// shows up as a prompt whose "cached" rows hold other tokens.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "base/error.h"
#include "kv/block_pool.h"
#include "prefix/prefix_cache.h"

namespace kvlm {
namespace {

constexpr int32_t kBs = 4;  // small blocks keep the prompts short

std::vector<int32_t> iota_tokens(int n, int32_t first) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) t[static_cast<size_t>(i)] = first + i;
  return t;
}

std::vector<int32_t> concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

PrefixCache make_cache(int32_t n_blocks = 32, PrefixHashFn fn = nullptr) {
  PrefixCache::Config c;
  c.n_blocks = n_blocks;
  c.block_size = kBs;
  c.hash_fn = fn;
  return PrefixCache(c);
}

// Registers prompt's full blocks as a chain in blocks ids[0], ids[1], ...
void insert_chain(PrefixCache& cache, const PrefixKey& key, const std::vector<int32_t>& prompt,
                  const std::vector<int32_t>& ids) {
  std::span<const int32_t> p(prompt);
  for (size_t i = 0; i < ids.size(); ++i)
    ASSERT_TRUE(
        cache.insert(key, i == 0 ? kNoParent : ids[i - 1], p.subspan(i * kBs, kBs), ids[i]));
}

uint64_t constant_hash(const void*, size_t) {
  return 42;
}  // every block collides
uint64_t two_bit_hash(const void* data, size_t n) {
  return prefix_hash_xxh3(data, n) & 3;
}

// ---- hashes -------------------------------------------------------------------------------------

TEST(PrefixHash, ChainCoversParentSaltAndCacheType) {
  PrefixCache cache = make_cache();
  const std::vector<int32_t> toks = {1, 2, 3, 4};
  const PrefixKey key{7, ""};
  const uint64_t h = cache.hash_block(key, 0, toks);
  EXPECT_EQ(cache.hash_block(key, 0, toks), h);  // deterministic
  EXPECT_NE(cache.hash_block(key, 1, toks), h);  // same tokens, other parent
  EXPECT_NE(cache.hash_block(key, 0, std::vector<int32_t>{1, 2, 3, 5}), h);
  EXPECT_NE(cache.hash_block(key, 0, std::vector<int32_t>{2, 1, 3, 4}), h);  // order matters
  EXPECT_NE(cache.hash_block(PrefixKey{7, "tenant-a"}, 0, toks), h);  // salt separates tenants
  EXPECT_NE(cache.hash_block(PrefixKey{7, "tenant-a"}, 0, toks),
            cache.hash_block(PrefixKey{7, "tenant-b"}, 0, toks));
  EXPECT_NE(cache.hash_block(PrefixKey{8, ""}, 0, toks), h);  // cache type separates
  EXPECT_THROW(cache.hash_block(key, 0, std::vector<int32_t>{1, 2, 3}), Error);
}

TEST(PrefixHash, ChainIsParentChained) {
  PrefixCache cache = make_cache();
  const PrefixKey key{1, "s"};
  const std::vector<int32_t> t = iota_tokens(11, 100);  // 2 full blocks + 3 tokens
  const std::vector<uint64_t> chain = cache.hash_chain(key, t);
  ASSERT_EQ(chain.size(), 2u);
  const uint64_t h0 = cache.hash_block(key, 0, std::span<const int32_t>(t).subspan(0, 4));
  EXPECT_EQ(chain[0], h0);
  EXPECT_EQ(chain[1], cache.hash_block(key, h0, std::span<const int32_t>(t).subspan(4, 4)));
  // The same second block after a different first block has a different name.
  std::vector<int32_t> u = t;
  u[0] = 999;
  EXPECT_NE(cache.hash_chain(key, u)[1], chain[1]);
}

// ---- match --------------------------------------------------------------------------------------

TEST(PrefixCache, RejectsBadConfig) {
  EXPECT_THROW(make_cache(0), Error);
  PrefixCache::Config c;
  c.n_blocks = 4;
  c.block_size = 0;
  EXPECT_THROW(PrefixCache{c}, Error);
}

TEST(PrefixCache, EmptyCacheMatchesNothing) {
  PrefixCache cache = make_cache();
  const PrefixMatch m = cache.match({}, iota_tokens(20, 0));
  EXPECT_TRUE(m.block_ids.empty());
  EXPECT_EQ(m.n_tokens, 0);
  EXPECT_EQ(cache.match({}, std::vector<int32_t>{}).n_tokens, 0);
}

TEST(PrefixCache, LongestPrefixMatch) {
  PrefixCache cache = make_cache();
  const PrefixKey key{};
  const std::vector<int32_t> prompt = iota_tokens(15, 0);  // blocks [0..4) [4..8) [8..12) + 3
  insert_chain(cache, key, prompt, {7, 3, 5});
  EXPECT_EQ(cache.n_cached(), 3);

  PrefixMatch m = cache.match(key, prompt);
  EXPECT_EQ(m.block_ids, (std::vector<int32_t>{7, 3, 5}));
  EXPECT_EQ(m.n_tokens, 12);

  std::vector<int32_t> diverge = prompt;
  diverge[9] = -5;  // inside the third block
  m = cache.match(key, diverge);
  EXPECT_EQ(m.block_ids, (std::vector<int32_t>{7, 3}));
  EXPECT_EQ(m.n_tokens, 8);
  diverge[0] = -5;  // the first block: nothing after it can match
  EXPECT_EQ(cache.match(key, diverge).n_tokens, 0);

  // A longer prompt with the same start matches the cached part.
  EXPECT_EQ(cache.match(key, concat(prompt, iota_tokens(30, 500))).n_tokens, 12);
}

TEST(PrefixCache, PartialBlocksNeverMatch) {
  PrefixCache cache = make_cache();
  const PrefixKey key{};
  const std::vector<int32_t> prompt = iota_tokens(8, 0);
  insert_chain(cache, key, prompt, {0, 1});
  // 7 tokens: the second block is only partly in the prompt.
  EXPECT_EQ(cache.match(key, iota_tokens(7, 0)).n_tokens, 4);
  EXPECT_EQ(cache.match(key, iota_tokens(3, 0)).n_tokens, 0);
}

TEST(PrefixCache, FullHitKeepsTheLastToken) {
  PrefixCache cache = make_cache();
  const PrefixKey key{};
  const std::vector<int32_t> prompt = iota_tokens(12, 0);
  insert_chain(cache, key, prompt, {0, 1, 2});
  // The whole 12-token prompt is cached, but its last token must be recomputed for its logits,
  // and blocks are all-or-nothing: the last block is not reused.
  PrefixMatch m = cache.match(key, prompt);
  EXPECT_EQ(m.block_ids, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(m.n_tokens, 8);
  EXPECT_EQ(cache.match(key, iota_tokens(13, 0)).n_tokens, 12);  // one more token: all 3 blocks
  EXPECT_EQ(cache.match(key, iota_tokens(5, 0)).n_tokens, 4);
  EXPECT_EQ(cache.match(key, iota_tokens(4, 0)).n_tokens, 0);
  EXPECT_EQ(cache.match(key, iota_tokens(1, 0)).n_tokens, 0);
  for (int n = 1; n <= 13; ++n) EXPECT_LE(cache.match(key, iota_tokens(n, 0)).n_tokens, n - 1);
}

TEST(PrefixCache, SaltSeparatesTenants) {
  PrefixCache cache = make_cache();
  const std::vector<int32_t> prompt = iota_tokens(9, 0);
  insert_chain(cache, PrefixKey{0, "alice"}, prompt, {0, 1});
  EXPECT_EQ(cache.match(PrefixKey{0, "alice"}, prompt).n_tokens, 8);
  EXPECT_EQ(cache.match(PrefixKey{0, "bob"}, prompt).n_tokens, 0);
  EXPECT_EQ(cache.match(PrefixKey{0, ""}, prompt).n_tokens, 0);
  // Bob caches the same tokens in his own blocks: not a duplicate, a separate chain.
  insert_chain(cache, PrefixKey{0, "bob"}, prompt, {2, 3});
  EXPECT_EQ(cache.match(PrefixKey{0, "bob"}, prompt).block_ids, (std::vector<int32_t>{2, 3}));
  EXPECT_EQ(cache.match(PrefixKey{0, "alice"}, prompt).block_ids, (std::vector<int32_t>{0, 1}));
}

TEST(PrefixCache, CacheTypeSeparates) {
  PrefixCache cache = make_cache();
  const std::vector<int32_t> prompt = iota_tokens(9, 0);
  insert_chain(cache, PrefixKey{0xf16, ""}, prompt, {0, 1});
  EXPECT_EQ(cache.match(PrefixKey{0xf16, ""}, prompt).n_tokens, 8);
  EXPECT_EQ(cache.match(PrefixKey{0x80, ""}, prompt).n_tokens, 0);
  // A chain cannot switch types half-way.
  EXPECT_THROW(cache.insert(PrefixKey{0x80, ""}, 1, iota_tokens(4, 8), 2), Error);
}

TEST(PrefixCache, InsertRefusesUnverifiableAndDuplicateBlocks) {
  PrefixCache cache = make_cache();
  const PrefixKey key{};
  const std::vector<int32_t> b0 = iota_tokens(4, 0), b1 = iota_tokens(4, 4);
  EXPECT_FALSE(cache.insert(key, 5, b1, 6));  // parent 5 is not registered
  EXPECT_FALSE(cache.contains(6));
  ASSERT_TRUE(cache.insert(key, kNoParent, b0, 0));
  EXPECT_FALSE(cache.insert(key, kNoParent, b0, 1));  // same contents already cached in block 0
  EXPECT_FALSE(cache.contains(1));
  ASSERT_TRUE(cache.insert(key, 0, b1, 1));
  EXPECT_FALSE(cache.insert(key, 0, b1, 2));
  EXPECT_TRUE(cache.insert(key, 0, iota_tokens(4, 40), 2));  // a sibling with other tokens
  EXPECT_EQ(cache.n_cached(), 3);
  EXPECT_EQ(cache.block_hash(1), cache.hash_block(key, cache.block_hash(0), b1));
  EXPECT_EQ(std::vector<int32_t>(cache.block_tokens(1).begin(), cache.block_tokens(1).end()), b1);
}

TEST(PrefixCache, BadArgumentsThrow) {
  PrefixCache cache = make_cache(8);
  const PrefixKey key{};
  EXPECT_THROW(cache.insert(key, kNoParent, iota_tokens(3, 0), 0), Error);  // not a full block
  EXPECT_THROW(cache.insert(key, kNoParent, iota_tokens(4, 0), 8), Error);  // id out of range
  EXPECT_THROW(cache.insert(key, 9, iota_tokens(4, 0), 1), Error);
  ASSERT_TRUE(cache.insert(key, kNoParent, iota_tokens(4, 0), 0));
  EXPECT_THROW(cache.insert(key, kNoParent, iota_tokens(4, 9), 0), Error);  // already registered
  EXPECT_THROW(cache.insert(key, 0, iota_tokens(4, 4), 0), Error);          // own parent
  EXPECT_THROW(cache.block_hash(3), Error);
  EXPECT_THROW(cache.erase(-1), Error);
  EXPECT_EQ(cache.n_cached(), 1);
}

TEST(PrefixCache, EraseMakesLaterBlocksUnreachable) {
  PrefixCache cache = make_cache();
  const PrefixKey key{};
  const std::vector<int32_t> prompt = iota_tokens(13, 0);
  insert_chain(cache, key, prompt, {0, 1, 2});
  EXPECT_TRUE(cache.erase(1));
  EXPECT_FALSE(cache.erase(1));
  EXPECT_EQ(cache.match(key, prompt).block_ids, (std::vector<int32_t>{0}));
  // The middle block is computed again into block 5: block 2 was registered under the old entry
  // and is not trusted below the new one (its parent's bytes are not known to be block 5's).
  ASSERT_TRUE(cache.insert(key, 0, std::span<const int32_t>(prompt).subspan(4, 4), 5));
  EXPECT_EQ(cache.match(key, prompt).block_ids, (std::vector<int32_t>{0, 5}));
  EXPECT_TRUE(cache.erase(0));
  EXPECT_EQ(cache.match(key, prompt).n_tokens, 0);
  cache.check_invariants();
}

// ---- collision safety ---------------------------------------------------------------------------

TEST(PrefixCollision, ConstantHashNeverReusesWrongBlocks) {
  PrefixCache cache = make_cache(32, &constant_hash);
  const PrefixKey key{};
  const std::vector<int32_t> x = iota_tokens(4, 0), y = iota_tokens(4, 100),
                             z = iota_tokens(4, 200);
  // a = [x y], b = [z y]: b's second block has a's second block's hash (everything has) AND its
  // tokens; only the parent link tells them apart.
  const std::vector<int32_t> a = concat(concat(x, y), {1}), b = concat(concat(z, y), {1});
  insert_chain(cache, key, a, {0, 1});
  EXPECT_EQ(cache.match(key, a).block_ids, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(cache.match(key, b).n_tokens, 0);  // z is not cached, so y after z is not either
  insert_chain(cache, key, b, {2, 3});         // equal hashes, different contents: both are kept
  EXPECT_EQ(cache.match(key, b).block_ids, (std::vector<int32_t>{2, 3}));
  EXPECT_EQ(cache.match(key, a).block_ids, (std::vector<int32_t>{0, 1}));
  // Same tokens, same (colliding) hash, other tenant or type: no reuse.
  EXPECT_EQ(cache.match(PrefixKey{0, "other"}, a).n_tokens, 0);
  EXPECT_EQ(cache.match(PrefixKey{1, ""}, a).n_tokens, 0);
  // One token differs: the hash does not notice, the comparison does.
  std::vector<int32_t> a2 = a;
  a2[6] = 7;
  EXPECT_EQ(cache.match(key, a2).block_ids, (std::vector<int32_t>{0}));
  EXPECT_TRUE(cache.erase(0));
  EXPECT_EQ(cache.match(key, a).n_tokens, 0);
  EXPECT_EQ(cache.match(key, b).n_tokens, 8);
  cache.check_invariants();
}

// Random prompts over a tiny vocabulary with a 2-bit hash (four buckets for everything): every
// match must equal the one a reference index keyed by the whole token prefix gives.
TEST(PrefixCollision, WeakHashAgreesWithExactReference) {
  constexpr int32_t kBlocks = 200;
  PrefixCache cache = make_cache(kBlocks, &two_bit_hash);
  std::map<std::pair<std::string, std::vector<int32_t>>, int32_t> ref;  // (salt, prefix) -> block
  std::mt19937 rng(99);
  const std::string salts[] = {"", "t1"};
  int32_t next_block = 0;
  int64_t n_hit_tokens = 0;
  for (int iter = 0; iter < 400; ++iter) {
    const std::string& salt = salts[rng() % 2];
    const PrefixKey key{0, salt};
    std::vector<int32_t> prompt(1 + rng() % 14);
    for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % 3);
    // Reference: the longest run of full blocks within n - 1 tokens whose whole prefix is cached.
    std::vector<int32_t> expect;
    for (size_t i = 0; (i + 1) * kBs <= prompt.size() - 1; ++i) {
      auto it =
          ref.find({salt, std::vector<int32_t>(prompt.begin(), prompt.begin() + (i + 1) * kBs)});
      if (it == ref.end()) break;
      expect.push_back(it->second);
    }
    const PrefixMatch m = cache.match(key, prompt);
    ASSERT_EQ(m.block_ids, expect) << "iteration " << iter;
    n_hit_tokens += m.n_tokens;
    // Cache the rest of the prompt's full blocks, as a sequence that just computed them would.
    for (size_t i = m.block_ids.size(); (i + 1) * kBs <= prompt.size() && next_block < kBlocks;
         ++i) {
      const int32_t parent =
          i == 0 ? kNoParent : (i <= m.block_ids.size() ? m.block_ids[i - 1] : next_block - 1);
      std::span<const int32_t> toks = std::span<const int32_t>(prompt).subspan(i * kBs, kBs);
      const std::vector<int32_t> prefix(prompt.begin(), prompt.begin() + (i + 1) * kBs);
      if (!cache.insert(key, parent, toks, next_block)) {
        // Only a duplicate of a cached block may be refused (its parent is always registered).
        ASSERT_TRUE(ref.count({salt, prefix}));
        break;
      }
      ASSERT_FALSE(ref.count({salt, prefix}));
      ref[{salt, prefix}] = next_block++;
    }
  }
  EXPECT_GT(n_hit_tokens, 100);
}

// ---- with the block pool ------------------------------------------------------------------------

// The admission / registration / eviction protocol of docs/KV.md over a simulated storage:
// storage[b] holds the token ids whose K/V block b would hold.
class Harness {
 public:
  Harness(int32_t n_blocks, PrefixHashFn fn = nullptr)
      : pool_(BlockPool::Config{n_blocks, kBs, true}),
        cache_(PrefixCache::Config{n_blocks, kBs, fn, true}),
        storage_(static_cast<size_t>(n_blocks), std::vector<int32_t>(kBs, -1)) {
    pool_.set_evict_hook([this](BlockId b) { KVLM_CHECK(cache_.erase(b)); });
  }
  Harness(const Harness&) = delete;  // the hook holds `this`

  // Returns the prompt tokens reused from the cache, or -1 when the pool is out of blocks (the
  // request is not admitted).
  int64_t admit(SeqId seq, const PrefixKey& key, const std::vector<int32_t>& prompt) {
    const PrefixMatch m = cache_.match(key, prompt);
    pool_.add_seq(seq);
    pool_.append_shared(seq, m.block_ids);
    // The reused blocks must hold exactly the prompt's tokens.
    for (int64_t pos = 0; pos < m.n_tokens; ++pos)
      KVLM_CHECK(storage_[m.block_ids[pos / kBs]][pos % kBs] == prompt[pos]);
    keys_[seq] = key;
    tokens_[seq] = std::vector<int32_t>(prompt.begin(), prompt.begin() + m.n_tokens);
    if (!feed(seq, std::span<const int32_t>(prompt).subspan(m.n_tokens))) {
      finish(seq);
      return -1;
    }
    return m.n_tokens;
  }

  // A forward pass over `toks` (prefill rest or one decoded token): allocate, copy, write, then
  // register the blocks that became full.
  bool feed(SeqId seq, std::span<const int32_t> toks) {
    std::vector<BlockCopy> copies;
    if (!pool_.append(seq, static_cast<int64_t>(toks.size()), &copies)) return false;
    for (const BlockCopy& c : copies) storage_[c.dst] = storage_[c.src];
    std::vector<int32_t>& held = tokens_[seq];
    auto table = pool_.block_table(seq);
    const size_t n_full_before = held.size() / kBs;
    for (int32_t t : toks) {
      storage_[table[held.size() / kBs]][held.size() % kBs] = t;
      held.push_back(t);
    }
    for (size_t i = n_full_before; i < held.size() / kBs; ++i) {
      const int32_t parent = i == 0 ? kNoParent : table[i - 1];
      if (cache_.insert(keys_[seq], parent, std::span<const int32_t>(held).subspan(i * kBs, kBs),
                        table[i]))
        pool_.mark_cached(table[i]);
    }
    return true;
  }

  void finish(SeqId seq) {
    pool_.free_seq(seq);
    tokens_.erase(seq);
    keys_.erase(seq);
  }

  // Pool and index agree, and cached blocks still hold what the index says.
  void check() const {
    pool_.check_invariants();
    cache_.check_invariants();
    const BlockPoolStats s = pool_.stats();
    ASSERT_EQ(s.n_free + s.n_used, s.n_total);
    ASSERT_EQ(s.n_cached, cache_.n_cached());
    for (BlockId b = 0; b < pool_.n_blocks(); ++b) {
      ASSERT_EQ(pool_.is_cached(b), cache_.contains(b)) << "block " << b;
      if (cache_.contains(b)) {
        auto t = cache_.block_tokens(b);
        ASSERT_EQ(std::vector<int32_t>(t.begin(), t.end()), storage_[b]) << "block " << b;
      }
    }
    for (const auto& [seq, held] : tokens_) {
      auto table = pool_.block_table(seq);
      for (size_t pos = 0; pos < held.size(); ++pos)
        ASSERT_EQ(storage_[table[pos / kBs]][pos % kBs], held[pos]);
    }
  }

  BlockPool& pool() { return pool_; }
  PrefixCache& cache() { return cache_; }
  const std::map<SeqId, std::vector<int32_t>>& seqs() const { return tokens_; }

 private:
  BlockPool pool_;
  PrefixCache cache_;
  std::vector<std::vector<int32_t>> storage_;  // [n_blocks][block_size] token ids
  std::map<SeqId, PrefixKey> keys_;
  std::map<SeqId, std::vector<int32_t>> tokens_;
};

TEST(PrefixWithPool, SecondRequestReusesTheFirstOnesBlocks) {
  Harness h(16);
  const PrefixKey key{};
  const std::vector<int32_t> system = iota_tokens(10, 0);  // 2 full blocks + 2
  EXPECT_EQ(h.admit(1, key, concat(system, {50, 51, 52})), 0);
  const std::vector<BlockId> first(h.pool().block_table(1).begin(), h.pool().block_table(1).end());
  EXPECT_EQ(h.cache().n_cached(), 3);  // 13 tokens: 3 full blocks
  h.check();
  // While the first runs: the second shares its first two blocks (refcount 2).
  EXPECT_EQ(h.admit(2, key, concat(system, {60})), 8);
  EXPECT_EQ(h.pool().block_table(2)[0], first[0]);
  EXPECT_EQ(h.pool().block_table(2)[1], first[1]);
  EXPECT_EQ(h.pool().ref_count(first[0]), 2);
  h.check();
  h.finish(1);
  h.finish(2);
  EXPECT_EQ(h.pool().stats().n_used, 0);
  EXPECT_EQ(h.pool().stats().n_cached_free, h.cache().n_cached());
  // After both finished the blocks are still reusable.
  EXPECT_EQ(h.admit(3, key, concat(system, {50, 51, 52, 53})), 12);
  h.check();
}

TEST(PrefixWithPool, EvictionForgetsBlocksInLruOrder) {
  Harness h(6);
  const PrefixKey key{};
  const std::vector<int32_t> a = iota_tokens(9, 0), b = iota_tokens(9, 100);
  ASSERT_EQ(h.admit(1, key, a), 0);  // 3 blocks, 2 full and cached
  h.finish(1);
  ASSERT_EQ(h.admit(2, key, b), 0);
  h.finish(2);  // LRU: a's blocks, then b's; plain free: a's and b's partial blocks
  EXPECT_EQ(h.pool().stats().n_cached_free, 4);
  // 8 tokens need 2 blocks: the plain ones go first, nothing is evicted.
  ASSERT_EQ(h.admit(3, key, iota_tokens(8, 200)), 0);
  EXPECT_EQ(h.pool().stats().n_evicted, 0);
  // 8 more force two evictions: a's blocks (least recently used), deepest first.
  ASSERT_EQ(h.admit(4, key, iota_tokens(8, 300)), 0);
  EXPECT_EQ(h.pool().stats().n_evicted, 2);
  EXPECT_EQ(h.cache().match(key, a).n_tokens, 0);
  EXPECT_EQ(h.cache().match(key, b).n_tokens, 8);
  h.check();
  EXPECT_EQ(h.admit(5, key, iota_tokens(20, 400)), -1);  // does not fit: refused, nothing held
  EXPECT_FALSE(h.pool().has_seq(5));
  h.check();
}

// Random traffic: requests share a few system prompts (two tenants), decode a few tokens and
// finish; the pool is small, so admission fails and cached blocks are evicted all the time.
void random_traffic(PrefixHashFn fn, uint32_t seed) {
  Harness h(48, fn);
  std::mt19937 rng(seed);
  const std::vector<int32_t> systems[] = {iota_tokens(9, 0), iota_tokens(14, 1000),
                                          iota_tokens(5, 2000)};
  const std::string salts[] = {"", "tenant"};
  SeqId next = 0;
  int64_t n_reused = 0, n_refused = 0;
  for (int step = 0; step < 3000; ++step) {
    const uint32_t op = rng() % 10;
    if (op < 4 || h.seqs().empty()) {
      std::vector<int32_t> prompt = systems[rng() % 3];
      const size_t n_user = rng() % 10;
      for (size_t i = 0; i < n_user; ++i) prompt.push_back(static_cast<int32_t>(rng() % 4));
      const int64_t got = h.admit(next++, PrefixKey{0, salts[rng() % 2]}, prompt);
      if (got < 0)
        ++n_refused;
      else
        n_reused += got;
    } else if (op < 7) {
      auto it = h.seqs().begin();
      std::advance(it, rng() % h.seqs().size());
      const int32_t tok = static_cast<int32_t>(rng() % 4);
      (void)h.feed(it->first, std::span<const int32_t>(&tok, 1));  // may be out of blocks
    } else {
      auto it = h.seqs().begin();
      std::advance(it, rng() % h.seqs().size());
      h.finish(it->first);
    }
    ASSERT_NO_FATAL_FAILURE(h.check()) << "step " << step;
  }
  std::printf("reused %lld prompt tokens, refused %lld requests, evicted %lld blocks\n",
              static_cast<long long>(n_reused), static_cast<long long>(n_refused),
              static_cast<long long>(h.pool().stats().n_evicted));
  EXPECT_GT(n_reused, 1000);
  EXPECT_GT(n_refused, 10);
  EXPECT_GT(h.pool().stats().n_evicted, 50);
}

TEST(PrefixWithPool, RandomTrafficXxh3) {
  random_traffic(nullptr, 5);
}
TEST(PrefixWithPool, RandomTrafficColliding) {
  random_traffic(&two_bit_hash, 6);
}

}  // namespace
}  // namespace kvlm
