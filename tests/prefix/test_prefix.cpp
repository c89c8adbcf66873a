// The prefix index alone (hash chains, longest-prefix match, the last-token rule, salts and cache
// types, collision safety through an injected hash function), then with kv's BlockPool following
// the protocol of docs/KV.md: admit (match + share + allocate), register filled blocks, evict via
// the pool's hook. The randomized tests simulate the storage behind the block ids, so a wrong reuse
// shows up as a prompt whose "cached" rows hold other tokens. Partial blocks (a stopped sequence's
// last, partly filled block kept as a leaf; a prompt reusing the first rows of a block by copy)
// get the same treatment: exact matches, refusals, collisions, and the protocol with the pool.
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

// ---- partial blocks -----------------------------------------------------------------------------

PrefixPartial partial_of(const PrefixCache& cache, const PrefixKey& key,
                         const std::vector<int32_t>& prompt) {
  return cache.match_partial(key, prompt, cache.match(key, prompt));
}

TEST(PrefixPartial, LeafServesAPromptThatContinuesIt) {
  PrefixCache cache = make_cache();
  const PrefixKey key{3, "s"};
  const std::vector<int32_t> history = iota_tokens(11, 0);  // [0..4) [4..8) + 3 in block 9
  insert_chain(cache, key, history, {7, 8});
  ASSERT_TRUE(cache.insert_partial(key, 8, std::span<const int32_t>(history).subspan(8), 9));
  EXPECT_TRUE(cache.is_partial(9));
  EXPECT_FALSE(cache.is_partial(8));
  EXPECT_EQ(cache.block_tokens(9).size(), 3u);
  EXPECT_THROW(cache.block_hash(9), Error);
  EXPECT_EQ(cache.n_cached(), 3);
  // The next turn: the history plus new tokens reuses all 11.
  const std::vector<int32_t> next = concat(history, {50, 51, 52});
  EXPECT_EQ(cache.match(key, next).n_tokens, 8);  // full blocks only, as before
  PrefixPartial p = partial_of(cache, key, next);
  EXPECT_EQ(p.block, 9);
  EXPECT_EQ(p.n_tokens, 3);
  // The last prompt token is still recomputed: history + 1 reuses 11, the history alone 10.
  EXPECT_EQ(partial_of(cache, key, concat(history, {50})).n_tokens, 3);
  EXPECT_EQ(partial_of(cache, key, history).n_tokens, 2);
  EXPECT_EQ(partial_of(cache, key, iota_tokens(9, 0)).n_tokens, 0);  // cap: 9 - 1 - 8
  // A prompt that leaves the leaf after one token reuses that token.
  std::vector<int32_t> diverge = next;
  diverge[9] = -1;
  p = partial_of(cache, key, diverge);
  EXPECT_EQ(p.block, 9);
  EXPECT_EQ(p.n_tokens, 1);
  diverge[8] = -1;
  EXPECT_EQ(partial_of(cache, key, diverge).block, -1);
  // Other tenant, other cache type: nothing. Another parent: the leaf is out of reach, and what
  // is left is the first row of the full block the prompt leaves.
  EXPECT_EQ(partial_of(cache, PrefixKey{3, "t"}, next).n_tokens, 0);
  EXPECT_EQ(partial_of(cache, PrefixKey{4, "s"}, next).n_tokens, 0);
  std::vector<int32_t> other_parent = next;
  other_parent[5] = -1;
  p = partial_of(cache, key, other_parent);
  EXPECT_EQ(p.block, 8);
  EXPECT_EQ(p.n_tokens, 1);
  cache.check_invariants();
}

TEST(PrefixPartial, FirstBlockLeafAndFirstRowsOfAFullBlock) {
  PrefixCache cache = make_cache();
  const PrefixKey key{};
  // A leaf as a sequence's first block (2 tokens, no parent).
  ASSERT_TRUE(cache.insert_partial(key, kNoParent, std::vector<int32_t>{40, 41}, 3));
  EXPECT_EQ(partial_of(cache, key, std::vector<int32_t>{40, 41, 42}).n_tokens, 2);
  EXPECT_EQ(partial_of(cache, PrefixKey{0, "x"}, std::vector<int32_t>{40, 41, 42}).n_tokens, 0);
  // The first rows of a full block: a prompt that leaves a cached block half-way copies the
  // rows it shares.
  insert_chain(cache, key, iota_tokens(8, 0), {0, 1});
  std::vector<int32_t> prompt = iota_tokens(10, 0);
  prompt[6] = -1;  // block 1 agrees on its first 2 tokens
  const PrefixPartial p = partial_of(cache, key, prompt);
  EXPECT_EQ(p.block, 1);
  EXPECT_EQ(p.n_tokens, 2);
  // The whole cached prompt again: 1 full block and 3 of the second's 4 rows.
  EXPECT_EQ(partial_of(cache, key, iota_tokens(8, 0)).block, 1);
  EXPECT_EQ(partial_of(cache, key, iota_tokens(8, 0)).n_tokens, 3);
  // The longest agreement wins among siblings.
  ASSERT_TRUE(cache.insert_partial(key, 0, std::vector<int32_t>{4, 5, -1}, 5));
  prompt = concat(iota_tokens(4, 0), {4, 5, -1, 9, 9});
  EXPECT_EQ(partial_of(cache, key, prompt).block, 5);
  EXPECT_EQ(partial_of(cache, key, prompt).n_tokens, 3);
  cache.check_invariants();
}

TEST(PrefixPartial, InsertRefusesUnverifiableAndRedundantLeaves) {
  PrefixCache cache = make_cache(16);
  const PrefixKey key{};
  insert_chain(cache, key, iota_tokens(8, 0), {0, 1});
  EXPECT_FALSE(cache.insert_partial(key, 6, std::vector<int32_t>{1}, 7));  // parent unregistered
  // A full sibling starting with these tokens, or a longer leaf, already serves them.
  EXPECT_FALSE(cache.insert_partial(key, 0, std::vector<int32_t>{4, 5}, 7));
  ASSERT_TRUE(cache.insert_partial(key, 1, std::vector<int32_t>{8, 9, 10}, 7));
  EXPECT_FALSE(cache.insert_partial(key, 1, std::vector<int32_t>{8, 9}, 8));
  EXPECT_FALSE(cache.insert_partial(key, 1, std::vector<int32_t>{8, 9, 10}, 8));
  EXPECT_TRUE(cache.insert_partial(key, 1, std::vector<int32_t>{8, 7}, 8));  // a different leaf
  EXPECT_FALSE(cache.contains(6));
  EXPECT_EQ(cache.n_cached(), 4);
  // Bad arguments: empty or full-size leaves, a registered block, a leaf as a parent (of a leaf
  // or of a full block), a cache type differing from the parent's.
  EXPECT_THROW(cache.insert_partial(key, 1, std::vector<int32_t>{}, 9), Error);
  EXPECT_THROW(cache.insert_partial(key, 1, iota_tokens(4, 8), 9), Error);
  EXPECT_THROW(cache.insert_partial(key, 1, std::vector<int32_t>{3}, 7), Error);
  EXPECT_THROW(cache.insert_partial(key, 7, std::vector<int32_t>{3}, 9), Error);
  EXPECT_THROW(cache.insert(key, 7, iota_tokens(4, 11), 9), Error);
  EXPECT_THROW(cache.insert_partial(PrefixKey{1, ""}, 1, std::vector<int32_t>{3}, 9), Error);
  EXPECT_THROW(cache.insert_partial(key, 1, std::vector<int32_t>{3}, 16), Error);
  EXPECT_EQ(cache.n_cached(), 4);
  cache.check_invariants();
}

TEST(PrefixPartial, EraseParentMakesTheLeafUnreachable) {
  PrefixCache cache = make_cache();
  const PrefixKey key{};
  const std::vector<int32_t> history = iota_tokens(6, 0);
  insert_chain(cache, key, history, {0});
  ASSERT_TRUE(cache.insert_partial(key, 0, std::vector<int32_t>{4, 5}, 1));
  const std::vector<int32_t> next = concat(history, {9});
  EXPECT_EQ(partial_of(cache, key, next).n_tokens, 2);
  EXPECT_TRUE(cache.erase(1));  // the leaf itself
  EXPECT_EQ(partial_of(cache, key, next).n_tokens, 0);
  ASSERT_TRUE(cache.insert_partial(key, 0, std::vector<int32_t>{4, 5}, 1));
  EXPECT_TRUE(cache.erase(0));  // its parent: the same contents come back in block 2
  ASSERT_TRUE(cache.insert(key, kNoParent, iota_tokens(4, 0), 2));
  EXPECT_EQ(cache.match(key, next).block_ids, (std::vector<int32_t>{2}));
  EXPECT_EQ(partial_of(cache, key, next).n_tokens, 0);  // the leaf was under the old entry
  EXPECT_TRUE(cache.contains(1));                       // still registered; it ages out
  cache.check_invariants();
}

// Random prefixes over a tiny vocabulary with constant and 2-bit hashes: every partial match
// equals the one an exact reference of every registered token prefix gives.
void partial_against_reference(PrefixHashFn fn, uint32_t seed) {
  constexpr int32_t kBlocks = 300;
  PrefixCache cache = make_cache(kBlocks, fn);
  // (salt, whole token prefix up to and including the entry's tokens) -> registered
  std::map<std::pair<std::string, std::vector<int32_t>>, int32_t> ref;
  std::mt19937 rng(seed);
  const std::string salts[] = {"", "t1"};
  int32_t next_block = 0;
  int64_t n_partial_hits = 0;
  for (int iter = 0; iter < 500 && next_block < kBlocks; ++iter) {
    const std::string& salt = salts[rng() % 2];
    const PrefixKey key{0, salt};
    std::vector<int32_t> prompt(1 + rng() % 13);
    for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % 2);
    const PrefixMatch m = cache.match(key, prompt);
    const PrefixPartial p = cache.match_partial(key, prompt, m);
    // Reference: the longest j <= cap such that a registered entry right after the matched full
    // blocks starts with the prompt's next j tokens.
    const int64_t cap =
        std::min<int64_t>(kBs - 1, static_cast<int64_t>(prompt.size()) - 1 - m.n_tokens);
    int64_t want = 0;
    for (const auto& [k, b] : ref) {
      const std::vector<int32_t>& toks = k.second;
      if (k.first != salt || static_cast<int64_t>(toks.size()) <= m.n_tokens ||
          static_cast<int64_t>(toks.size()) > m.n_tokens + kBs ||
          !std::equal(prompt.begin(), prompt.begin() + m.n_tokens, toks.begin()))
        continue;
      int64_t l = 0;
      while (l < cap && m.n_tokens + l < static_cast<int64_t>(toks.size()) &&
             toks[static_cast<size_t>(m.n_tokens + l)] ==
                 prompt[static_cast<size_t>(m.n_tokens + l)])
        ++l;
      want = std::max(want, l);
    }
    ASSERT_EQ(p.n_tokens, want) << "iteration " << iter;
    if (p.n_tokens > 0) {
      ++n_partial_hits;
      auto stored = cache.block_tokens(p.block);
      ASSERT_TRUE(std::equal(stored.begin(), stored.begin() + p.n_tokens,
                             prompt.begin() + m.n_tokens));
    }
    // Register what a sequence that computed this prompt would: its new full blocks, then its
    // partial tail as a leaf.
    int32_t parent = m.block_ids.empty() ? kNoParent : m.block_ids.back();
    size_t i = m.block_ids.size();
    bool chained = true;
    for (; (i + 1) * kBs <= prompt.size() && next_block < kBlocks; ++i) {
      const std::vector<int32_t> prefix(prompt.begin(), prompt.begin() + (i + 1) * kBs);
      if (!cache.insert(key, parent, std::span<const int32_t>(prompt).subspan(i * kBs, kBs),
                        next_block)) {
        ASSERT_TRUE(ref.count({salt, prefix}));
        chained = false;
        break;
      }
      ref[{salt, prefix}] = next_block;
      parent = next_block++;
    }
    const size_t tail = prompt.size() - i * kBs;
    if (chained && tail > 0 && tail < static_cast<size_t>(kBs) && next_block < kBlocks) {
      if (cache.insert_partial(key, parent, std::span<const int32_t>(prompt).subspan(i * kBs),
                               next_block))
        ref[{salt, prompt}] = next_block++;
    }
    cache.check_invariants();
  }
  EXPECT_GT(n_partial_hits, 50);
}

TEST(PrefixPartial, ConstantHashAgreesWithExactReference) {
  partial_against_reference(&constant_hash, 11);
}
TEST(PrefixPartial, TwoBitHashAgreesWithExactReference) {
  partial_against_reference(&two_bit_hash, 12);
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
  // request is not admitted). With `partial` a partial hit is copied into a fresh block first, as
  // the scheduler does.
  int64_t admit(SeqId seq, const PrefixKey& key, const std::vector<int32_t>& prompt,
                bool partial = false) {
    const PrefixMatch m = cache_.match(key, prompt);
    const PrefixPartial p =
        partial ? cache_.match_partial(key, prompt, m) : PrefixPartial{};
    pool_.add_seq(seq);
    pool_.append_shared(seq, m.block_ids);
    // The reused blocks must hold exactly the prompt's tokens.
    for (int64_t pos = 0; pos < m.n_tokens; ++pos)
      KVLM_CHECK(storage_[m.block_ids[pos / kBs]][pos % kBs] == prompt[pos]);
    keys_[seq] = {key.cache_type, std::string(key.salt)};
    int64_t n_reused = m.n_tokens;
    if (p.block >= 0) {
      KVLM_CHECK(m.n_tokens + p.n_tokens <= static_cast<int64_t>(prompt.size()) - 1);
      const std::vector<int32_t> src_rows = storage_[p.block];  // before the pool moves anything
      for (int64_t r = 0; r < p.n_tokens; ++r) KVLM_CHECK(src_rows[r] == prompt[m.n_tokens + r]);
      std::vector<BlockCopy> copies;
      if (!pool_.append(seq, p.n_tokens, &copies)) {
        pool_.free_seq(seq);
        keys_.erase(seq);
        return -1;
      }
      KVLM_CHECK(copies.empty());
      const BlockId dst = pool_.block_table(seq).back();
      // The source stays registered unless the pool handed it out as the fresh block itself.
      KVLM_CHECK(cache_.contains(p.block) == (dst != p.block));
      storage_[dst] = src_rows;
      ++n_partial_hits_;
      n_reused += p.n_tokens;
    }
    tokens_[seq] = std::vector<int32_t>(prompt.begin(), prompt.begin() + n_reused);
    if (!feed(seq, std::span<const int32_t>(prompt).subspan(n_reused))) {
      finish(seq);
      return -1;
    }
    return n_reused;
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
      if (cache_.insert(key_of(seq), parent, std::span<const int32_t>(held).subspan(i * kBs, kBs),
                        table[i]))
        pool_.mark_cached(table[i]);
    }
    return true;
  }

  // With keep_partial the partly filled last block becomes a leaf of the index (the scheduler's
  // release of a stopped sequence).
  void finish(SeqId seq, bool keep_partial = false) {
    const std::vector<int32_t>& held = tokens_[seq];
    const size_t f = held.size() / kBs, k = held.size() % kBs;
    auto table = pool_.block_table(seq);
    if (keep_partial && k > 0 && !pool_.is_cached(table[f]) && pool_.ref_count(table[f]) == 1 &&
        cache_.insert_partial(key_of(seq), f == 0 ? kNoParent : table[f - 1],
                              std::span<const int32_t>(held).subspan(f * kBs), table[f]))
      pool_.mark_cached(table[f]);
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
      if (cache_.contains(b)) {  // a leaf's rows past its tokens are not looked at
        auto t = cache_.block_tokens(b);
        ASSERT_TRUE(std::equal(t.begin(), t.end(), storage_[b].begin())) << "block " << b;
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
  int64_t n_partial_hits() const { return n_partial_hits_; }
  const std::map<SeqId, std::vector<int32_t>>& seqs() const { return tokens_; }
  std::string salt_of(SeqId seq) const { return keys_.at(seq).second; }

 private:
  BlockPool pool_;
  PrefixCache cache_;
  std::vector<std::vector<int32_t>> storage_;  // [n_blocks][block_size] token ids
  std::map<SeqId, std::pair<uint64_t, std::string>> keys_;  // cache_type, salt (owned)
  std::map<SeqId, std::vector<int32_t>> tokens_;
  int64_t n_partial_hits_ = 0;

  PrefixKey key_of(SeqId seq) const {
    const auto& k = keys_.at(seq);
    return PrefixKey{k.first, k.second};
  }
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
// finish; the pool is small, so admission fails and cached blocks are evicted all the time. With
// `partial`, finished sequences keep their last partial block and some requests are the next turn
// of a finished conversation (its whole history plus new tokens).
void random_traffic(PrefixHashFn fn, uint32_t seed, bool partial = false) {
  Harness h(48, fn);
  std::mt19937 rng(seed);
  const std::vector<int32_t> systems[] = {iota_tokens(9, 0), iota_tokens(14, 1000),
                                          iota_tokens(5, 2000)};
  const std::string salts[] = {"", "tenant"};
  std::vector<std::pair<std::string, std::vector<int32_t>>> histories;  // finished conversations
  SeqId next = 0;
  int64_t n_reused = 0, n_refused = 0;
  for (int step = 0; step < 3000; ++step) {
    const uint32_t op = rng() % 10;
    if (op < 4 || h.seqs().empty()) {
      std::vector<int32_t> prompt = systems[rng() % 3];
      const std::string* salt = nullptr;
      if (partial && !histories.empty() && rng() % 2 == 0) {
        const auto& past = histories[rng() % histories.size()];
        salt = &past.first;
        prompt = past.second;
        if (rng() % 4 == 0) prompt.resize(prompt.size() - rng() % 3);  // a trimmed reply
      }
      const size_t n_user = rng() % 10;
      for (size_t i = 0; i < n_user; ++i) prompt.push_back(static_cast<int32_t>(rng() % 4));
      if (salt == nullptr) salt = &salts[rng() % 2];
      const int64_t got = h.admit(next++, PrefixKey{0, *salt}, prompt, partial);
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
      if (partial && !it->second.empty()) {
        if (histories.size() >= 16) histories.erase(histories.begin() + rng() % histories.size());
        histories.push_back({h.salt_of(it->first), it->second});
      }
      h.finish(it->first, partial);
    }
    ASSERT_NO_FATAL_FAILURE(h.check()) << "step " << step;
  }
  std::printf("reused %lld prompt tokens (%lld partial hits), refused %lld requests, evicted %lld "
              "blocks\n",
              static_cast<long long>(n_reused), static_cast<long long>(h.n_partial_hits()),
              static_cast<long long>(n_refused),
              static_cast<long long>(h.pool().stats().n_evicted));
  EXPECT_GT(n_reused, 1000);
  EXPECT_GT(n_refused, 10);
  EXPECT_GT(h.pool().stats().n_evicted, 50);
  if (partial) {
    EXPECT_GT(h.n_partial_hits(), 100);
  }
}

TEST(PrefixWithPool, RandomTrafficXxh3) {
  random_traffic(nullptr, 5);
}
TEST(PrefixWithPool, RandomTrafficColliding) {
  random_traffic(&two_bit_hash, 6);
}
TEST(PrefixWithPool, RandomChatTrafficWithPartialBlocksXxh3) {
  random_traffic(nullptr, 7, true);
}
TEST(PrefixWithPool, RandomChatTrafficWithPartialBlocksColliding) {
  random_traffic(&two_bit_hash, 8, true);
}

// A chat's second turn: the first turn's history (3 full blocks and 1 token) is reused whole, the
// leaf is copied rather than written, and a regenerated second turn reuses it again.
TEST(PrefixWithPool, NextTurnReusesThePartialBlockByCopy) {
  Harness h(16);
  const PrefixKey key{0, "user"};
  const std::vector<int32_t> prompt = iota_tokens(10, 0);
  ASSERT_EQ(h.admit(1, key, prompt, true), 0);
  for (int32_t t : {90, 91, 92}) ASSERT_TRUE(h.feed(1, std::span<const int32_t>(&t, 1)));
  const std::vector<int32_t> history = h.seqs().at(1);  // 13 tokens
  const BlockId leaf = h.pool().block_table(1)[3];
  h.finish(1, true);
  h.check();
  ASSERT_TRUE(h.cache().contains(leaf));
  EXPECT_TRUE(h.cache().is_partial(leaf));
  EXPECT_TRUE(h.pool().is_cached(leaf));
  EXPECT_EQ(h.pool().stats().n_cached_free, 4);
  const std::vector<int32_t> turn2 = concat(history, {60, 61, 62});
  EXPECT_EQ(h.admit(2, key, turn2, true), 13);
  EXPECT_NE(h.pool().block_table(2)[3], leaf);  // a copy: the leaf keeps its one token
  EXPECT_EQ(h.pool().ref_count(leaf), 0);
  EXPECT_TRUE(h.cache().contains(leaf));
  h.check();
  // While turn 2 runs, a regenerated turn 2: turn 2's own block 3 is full and registered by now,
  // so 3 of its rows are copied (the 16th token is recomputed).
  EXPECT_EQ(h.admit(3, key, turn2, true), 15);
  h.check();
  EXPECT_EQ(h.admit(4, PrefixKey{0, "other"}, turn2, true), 0);
  EXPECT_EQ(h.admit(5, key, history, true), 12);  // the history alone: its last token recomputed
  h.check();
  EXPECT_EQ(h.n_partial_hits(), 2);
  for (SeqId s : {2, 3, 4, 5}) h.finish(s, true);
  h.check();
  EXPECT_EQ(h.pool().stats().n_used, 0);
}

// The leaf is the only free block when the next turn arrives: the pool hands it out as the fresh
// block itself, so its rows are already in place and only its index entry goes.
TEST(PrefixWithPool, PartialHitWhenTheSourceIsTheLastFreeBlock) {
  Harness h(4);
  const PrefixKey key{};
  ASSERT_EQ(h.admit(1, key, iota_tokens(14, 0), true), 0);  // 3 full blocks + 2 in block 3
  const BlockId leaf = h.pool().block_table(1)[3];
  h.finish(1, true);
  EXPECT_EQ(h.pool().stats().n_cached_free, 4);
  // Needs exactly one fresh block; admit checks the leaf's entry went when it was handed out, and
  // the 2 new tokens fill the block, which is then registered as a full block.
  EXPECT_EQ(h.admit(2, key, iota_tokens(16, 0), true), 14);
  EXPECT_EQ(h.pool().block_table(2)[3], leaf);
  EXPECT_EQ(h.pool().stats().n_free, 0);
  EXPECT_EQ(h.pool().stats().n_evicted, 1);
  EXPECT_TRUE(h.cache().contains(leaf));
  EXPECT_FALSE(h.cache().is_partial(leaf));
  h.check();
  h.finish(2, true);
  h.check();
}

}  // namespace
}  // namespace kvlm
