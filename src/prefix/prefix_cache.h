// The prefix index: which pool block holds the K/V of which full block of tokens, so a new request
// whose prompt starts like an earlier one reuses those blocks instead of recomputing them (vLLM's
// automatic prefix caching). Pure metadata, no tensors: block ids are a kvlm::BlockPool's, but this
// module only sees them as integers, so it links nothing but base and xxhash.
//
// A full block i of a sequence is named by a chained hash
//   h[i] = H(h[i-1] (0 for the first block) | cache_type | H(salt) | tokens[i*bs, (i+1)*bs))
// with H = XXH3-64, so a block's name covers every token before it: equal hashes mean equal
// prefixes (up to collisions). cache_type says what the bytes are (a KvShape with its dtypes), so
// blocks of differently laid-out caches never match; salt separates tenants that must not see each
// other's prompts (a hit is observable through latency).
//
// Collisions never cause a wrong reuse: the index stores each block's tokens, and a candidate is
// accepted only if its tokens are equal and it was registered under exactly the entry matched for
// the previous block (each registration gets a never-reused generation number), and, for a first
// block, under the same cache_type and salt. So a hit's tokens are verified all the way back to
// position 0, and colliding blocks simply coexist in one hash bucket.
//
// Partial blocks: the last, partly filled block of a sequence that stops (finished, cancelled or
// preempted) can be registered too (insert_partial), as a leaf under its full parent block, so the
// next turn of a chat, whose prompt is that whole history plus a new message, reuses all of it and
// not only its full blocks. A partial hit (match_partial) names the registered block, partial leaf
// or full, following the last matched full block whose first tokens agree longest with the prompt;
// the caller copies that block's rows into a fresh block of its own (it writes the rows after
// them, and the registered block must keep what the index says). Every entry, full or partial, is
// also listed under a key of its parent (children_), which is what match_partial scans; its tokens,
// parent entry, cache_type and salt are verified exactly like a full block's.
//
// Working with the pool (docs/KV.md has the whole protocol): the pool owns refcounts and the free
// queue, whose tail holds the cached-free blocks in LRU order; this index owns only the names.
//   admit:   m = match(key, prompt); p = match_partial(key, prompt, m);
//            pool.append_shared(seq, m.block_ids);
//            if p.block >= 0: pool.append(seq, p.n_tokens, ..) and copy p.block's rows into the
//            fresh last block at once; then pool.append(seq, rest, &copies)
//   filled:  for each block that became full: insert(key, parent, tokens, block) &&
//            pool.mark_cached(block)
//   stop:    insert_partial(key, parent, last tokens, last block) && pool.mark_cached(block);
//            pool.free_seq(seq)
//   evict:   pool.set_evict_hook([&](BlockId b) { index.erase(b); })
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace kvlm {

// Hashes n_bytes at data to 64 bits. Injectable so tests can force collisions.
using PrefixHashFn = uint64_t (*)(const void* data, size_t n_bytes);
uint64_t prefix_hash_xxh3(const void* data, size_t n_bytes);  // the default: XXH3-64, seed 0

inline constexpr int32_t kNoParent = -1;  // insert(): the block is a sequence's first

// What the cached bytes are and whose they are; part of every block's hash.
struct PrefixKey {
  uint64_t cache_type = 0;  // e.g. a hash of the KvShape (layers, heads, head_dim, dtypes)
  std::string_view salt;    // per tenant; empty: shared by everyone with the same cache_type
};

struct PrefixMatch {
  std::vector<int32_t> block_ids;  // [n_matched_blocks] pool block ids, in prompt order
  int64_t n_tokens = 0;            // n_matched_blocks * block_size, <= n_prompt - 1
};

// Rows [0, n_tokens) of `block` hold the K/V of the n_tokens prompt tokens after a PrefixMatch.
struct PrefixPartial {
  int32_t block = -1;    // a registered block (partial leaf or full); -1: no partial hit
  int64_t n_tokens = 0;  // 1 .. block_size - 1 on a hit; m.n_tokens + n_tokens <= n_prompt - 1
};

class PrefixCache {
 public:
  struct Config {
    int32_t n_blocks = 0;            // the pool's: block ids are 0 .. n_blocks - 1
    int32_t block_size = 16;         // the pool's, tokens per block
    PrefixHashFn hash_fn = nullptr;  // nullptr: prefix_hash_xxh3
    bool audit = true;               // re-verify the index after every insert / erase
  };

  // Throws kvlm::Error for n_blocks <= 0 or block_size <= 0.
  explicit PrefixCache(const Config& config);

  int32_t block_size() const { return block_size_; }
  int32_t n_cached() const { return n_cached_; }  // registered blocks

  // h[i] of one full block (tokens.size() == block_size) whose parent block has hash parent_hash
  // (0 for a first block).
  uint64_t hash_block(const PrefixKey& key, uint64_t parent_hash,
                      std::span<const int32_t> tokens) const;
  // h[0 .. n_full) for every full block of tokens.
  std::vector<uint64_t> hash_chain(const PrefixKey& key, std::span<const int32_t> tokens) const;

  // Longest run of cached blocks equal to the prompt's first blocks, never covering the whole
  // prompt: at most floor((n_prompt - 1) / block_size) blocks, so at least the last prompt token
  // is recomputed (its logits give the first sampled token; the cache holds K/V, not logits).
  // Full blocks only; match_partial continues from here. Does not change the index: recency is
  // the pool's business.
  PrefixMatch match(const PrefixKey& key, std::span<const int32_t> prompt) const;

  // After the full-block match m of the same prompt and key: the registered block following m's
  // last block (or a first block, when m is empty) whose first tokens equal the most prompt
  // tokens after m, capped at block_size - 1 and at n_prompt - 1 - m.n_tokens (the last prompt
  // token is still recomputed). Ties go to the first candidate found. The caller must copy the
  // block's rows before writing after them: a hit is never shared in place.
  PrefixPartial match_partial(const PrefixKey& key, std::span<const int32_t> prompt,
                              const PrefixMatch& m) const;

  // Registers `block` as holding the full block `tokens` that follows block `parent` (kNoParent
  // for a sequence's first block) of the same sequence. Returns true if registered; then the
  // caller must pool.mark_cached(block). Returns false, changing nothing, when parent is not
  // registered (its chain cannot be verified) or an equal block (same tokens after the same
  // parent entry, same key) is already registered: the duplicate stays a plain block. Throws
  // for a bad id, tokens.size() != block_size, an already registered block, or a cache_type
  // differing from the parent's.
  bool insert(const PrefixKey& key, int32_t parent, std::span<const int32_t> tokens, int32_t block);

  // Registers `block` as holding the 1 .. block_size - 1 tokens `tokens` in its first rows, after
  // the full block `parent` (kNoParent: the sequence's first block): a leaf that match_partial can
  // find and insert can never chain to. Then the caller must pool.mark_cached(block), and nothing
  // may write into the block while it is cached. Returns false, changing nothing, when parent is
  // not registered or a sibling entry (partial or full) already starts with these tokens. Throws
  // like insert, and for a parent that is itself a partial leaf.
  bool insert_partial(const PrefixKey& key, int32_t parent, std::span<const int32_t> tokens,
                      int32_t block);

  // The registered block holding the full block `tokens` after block `parent` (kNoParent: a
  // first block) under key, or -1: where a sequence that computed a duplicate continues its
  // chain (its own copy stays unregistered). -1 too when parent is not a registered full block.
  int32_t registered(const PrefixKey& key, int32_t parent, std::span<const int32_t> tokens) const;

  // Forgets `block` (the pool's eviction hook). Returns false if it was not registered. Blocks
  // registered after it become unreachable (their parent entry is gone); they age out of the
  // pool's LRU like any cached-free block.
  bool erase(int32_t block);

  bool contains(int32_t block) const;
  // The registration number of block's entry, never reused (0: not registered): a holder of a
  // block id it does not own checks it is still the same registration before relying on it.
  uint64_t generation(int32_t block) const;
  bool is_partial(int32_t block) const;      // registered by insert_partial; contains(block)
  uint64_t block_hash(int32_t block) const;  // h[i]; contains(block) and a full block
  // [block_size] for a full block, [n] for a partial leaf of n tokens; contains(block)
  std::span<const int32_t> block_tokens(int32_t block) const;

  // Full verification of the index; aborts on a violation.
  void check_invariants() const;

 private:
  struct Entry {
    uint64_t gen = 0;         // registration number, never reused; 0: block not registered
    uint64_t parent_gen = 0;  // gen of the parent block's entry; 0 for a first block
    uint64_t hash = 0;        // h[i], the key in index_; 0 for a partial leaf (not in index_)
    uint64_t child_key = 0;   // its key in children_: child_key_of(key, parent's hash)
    uint64_t cache_type = 0;
    int32_t n_tokens = 0;     // block_size for a full block, 1 .. block_size - 1 for a leaf
    std::string salt;  // first blocks only: verified on a match, the hash is not trusted
  };

  void check_block_id(int32_t block) const;
  // Registered block in the bucket of `hash` equal to (key, parent_gen, tokens), or -1.
  int32_t find(const PrefixKey& key, uint64_t hash, uint64_t parent_gen,
               std::span<const int32_t> tokens) const;
  // Entry e is a verified child of the entry with generation parent_gen under key.
  bool is_child(const Entry& e, const PrefixKey& key, uint64_t parent_gen) const;
  // The children_ key of every block following a block of hash parent_hash (0: first blocks).
  uint64_t child_key_of(const PrefixKey& key, uint64_t salt_hash, uint64_t parent_hash) const;
  // Checks block (not yet registered: else fails) and its parent for insert / insert_partial;
  // false: the parent is not registered. Sets the parent's hash and gen.
  bool parent_of(const PrefixKey& key, int32_t parent, int32_t block, uint64_t* parent_hash,
                 uint64_t* parent_gen) const;
  void add_entry(const PrefixKey& key, int32_t block, uint64_t parent_gen, uint64_t hash,
                 uint64_t child_key, std::span<const int32_t> tokens);
  uint64_t hash_block_into(const PrefixKey& key, uint64_t salt_hash, uint64_t parent_hash,
                           std::span<const int32_t> tokens, std::vector<uint64_t>* buf) const;

  int32_t block_size_;
  PrefixHashFn hash_fn_;
  bool audit_;
  std::vector<Entry> entries_;                        // [n_blocks]
  std::vector<int32_t> tokens_;                       // [n_blocks, block_size]
  std::unordered_multimap<uint64_t, int32_t> index_;  // h[i] -> full block; colliding blocks share
  // child key -> every registered block, full or partial, after a parent (or first blocks)
  std::unordered_multimap<uint64_t, int32_t> children_;
  int32_t n_cached_ = 0;
  uint64_t next_gen_ = 1;
};

}  // namespace kvlm
