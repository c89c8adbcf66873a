#include "prefix/prefix_cache.h"

#include <xxhash.h>

#include <algorithm>
#include <cstring>

#include "base/error.h"

namespace kvlm {

uint64_t prefix_hash_xxh3(const void* data, size_t n_bytes) {
  return XXH3_64bits(data, n_bytes);
}

PrefixCache::PrefixCache(const Config& config)
    : block_size_(config.block_size),
      hash_fn_(config.hash_fn != nullptr ? config.hash_fn : &prefix_hash_xxh3),
      audit_(config.audit) {
  if (config.n_blocks <= 0)
    fail("prefix cache: n_blocks must be positive, got {}", config.n_blocks);
  if (config.block_size <= 0)
    fail("prefix cache: block_size must be positive (tokens per block), got {}", config.block_size);
  entries_.resize(static_cast<size_t>(config.n_blocks));
  tokens_.resize(static_cast<size_t>(config.n_blocks) * static_cast<size_t>(config.block_size));
  index_.reserve(static_cast<size_t>(config.n_blocks));
}

void PrefixCache::check_block_id(int32_t block) const {
  if (block < 0 || static_cast<size_t>(block) >= entries_.size())
    fail("prefix cache: block id {} out of range [0, {})", block, entries_.size());
}

// ---- hashing ------------------------------------------------------------------------------------

// Hash input, one contiguous buffer so any PrefixHashFn can hash it:
//   u64 parent_hash | u64 cache_type | u64 H(salt) | i32 tokens[block_size]
// The salt enters as its hash so the buffer has a fixed size; the salt itself is verified.
uint64_t PrefixCache::hash_block_into(const PrefixKey& key, uint64_t salt_hash,
                                      uint64_t parent_hash, std::span<const int32_t> tokens,
                                      std::vector<uint64_t>* buf) const {
  const size_t n_token_bytes = tokens.size() * sizeof(int32_t);
  buf->resize(3 + (n_token_bytes + 7) / 8);  // no allocation after the first block of a call
  uint64_t* w = buf->data();
  w[0] = parent_hash;
  w[1] = key.cache_type;
  w[2] = salt_hash;
  std::memcpy(w + 3, tokens.data(), n_token_bytes);
  return hash_fn_(w, 3 * sizeof(uint64_t) + n_token_bytes);
}

uint64_t PrefixCache::hash_block(const PrefixKey& key, uint64_t parent_hash,
                                 std::span<const int32_t> tokens) const {
  if (tokens.size() != static_cast<size_t>(block_size_))
    fail("prefix cache: a block holds {} tokens, got {}", block_size_, tokens.size());
  std::vector<uint64_t> buf;
  return hash_block_into(key, hash_fn_(key.salt.data(), key.salt.size()), parent_hash, tokens,
                         &buf);
}

std::vector<uint64_t> PrefixCache::hash_chain(const PrefixKey& key,
                                              std::span<const int32_t> tokens) const {
  const size_t bs = static_cast<size_t>(block_size_);
  const uint64_t salt_hash = hash_fn_(key.salt.data(), key.salt.size());
  std::vector<uint64_t> out, buf;
  out.reserve(tokens.size() / bs);
  uint64_t parent = 0;
  for (size_t i = 0; i + bs <= tokens.size(); i += bs) {
    parent = hash_block_into(key, salt_hash, parent, tokens.subspan(i, bs), &buf);
    out.push_back(parent);
  }
  return out;
}

// ---- lookup -------------------------------------------------------------------------------------

int32_t PrefixCache::find(const PrefixKey& key, uint64_t hash, uint64_t parent_gen,
                          std::span<const int32_t> tokens) const {
  const size_t bs = static_cast<size_t>(block_size_);
  auto [lo, hi] = index_.equal_range(hash);
  for (auto it = lo; it != hi; ++it) {
    const int32_t b = it->second;
    const Entry& e = entries_[static_cast<size_t>(b)];
    if (e.parent_gen != parent_gen || e.cache_type != key.cache_type) continue;
    if (parent_gen == 0 && e.salt != key.salt) continue;
    const int32_t* stored = tokens_.data() + static_cast<size_t>(b) * bs;
    if (std::equal(tokens.begin(), tokens.end(), stored)) return b;
  }
  return -1;
}

PrefixMatch PrefixCache::match(const PrefixKey& key, std::span<const int32_t> prompt) const {
  PrefixMatch m;
  if (prompt.empty()) return m;
  const size_t bs = static_cast<size_t>(block_size_);
  // Blocks entirely within the first n_prompt - 1 tokens: the last token is always recomputed.
  const size_t n_max = (prompt.size() - 1) / bs;
  const uint64_t salt_hash = hash_fn_(key.salt.data(), key.salt.size());
  std::vector<uint64_t> buf;
  uint64_t parent_hash = 0, parent_gen = 0;
  for (size_t i = 0; i < n_max; ++i) {
    std::span<const int32_t> toks = prompt.subspan(i * bs, bs);
    const uint64_t h = hash_block_into(key, salt_hash, parent_hash, toks, &buf);
    const int32_t b = find(key, h, parent_gen, toks);
    if (b < 0) break;
    if (m.block_ids.empty()) m.block_ids.reserve(n_max);
    m.block_ids.push_back(b);
    parent_hash = h;
    parent_gen = entries_[static_cast<size_t>(b)].gen;
  }
  m.n_tokens = static_cast<int64_t>(m.block_ids.size()) * block_size_;
  return m;
}

bool PrefixCache::contains(int32_t block) const {
  check_block_id(block);
  return entries_[static_cast<size_t>(block)].gen != 0;
}

uint64_t PrefixCache::block_hash(int32_t block) const {
  if (!contains(block)) fail("prefix cache: block {} is not registered", block);
  return entries_[static_cast<size_t>(block)].hash;
}

std::span<const int32_t> PrefixCache::block_tokens(int32_t block) const {
  if (!contains(block)) fail("prefix cache: block {} is not registered", block);
  return {tokens_.data() + static_cast<size_t>(block) * static_cast<size_t>(block_size_),
          static_cast<size_t>(block_size_)};
}

// ---- insert / erase -----------------------------------------------------------------------------

bool PrefixCache::insert(const PrefixKey& key, int32_t parent, std::span<const int32_t> tokens,
                         int32_t block) {
  check_block_id(block);
  if (tokens.size() != static_cast<size_t>(block_size_))
    fail("prefix cache: block {} must hold {} tokens to be cached, got {}", block, block_size_,
         tokens.size());
  Entry& e = entries_[static_cast<size_t>(block)];
  if (e.gen != 0) fail("prefix cache: block {} is already registered", block);
  uint64_t parent_hash = 0, parent_gen = 0;
  if (parent != kNoParent) {
    check_block_id(parent);
    if (parent == block) fail("prefix cache: block {} cannot be its own parent", block);
    const Entry& p = entries_[static_cast<size_t>(parent)];
    if (p.gen == 0) return false;  // e.g. the parent was a duplicate: no verifiable chain
    if (p.cache_type != key.cache_type)
      fail("prefix cache: block {} has cache type {:#x}, its parent {} has {:#x}", block,
           key.cache_type, parent, p.cache_type);
    parent_hash = p.hash;
    parent_gen = p.gen;
  }
  const uint64_t salt_hash = hash_fn_(key.salt.data(), key.salt.size());
  std::vector<uint64_t> buf;
  const uint64_t h = hash_block_into(key, salt_hash, parent_hash, tokens, &buf);
  if (find(key, h, parent_gen, tokens) >= 0) return false;  // already cached in another block

  e.gen = next_gen_++;
  e.parent_gen = parent_gen;
  e.hash = h;
  e.cache_type = key.cache_type;
  if (parent_gen == 0) e.salt.assign(key.salt);
  std::copy(tokens.begin(), tokens.end(),
            tokens_.begin() + static_cast<ptrdiff_t>(block) * block_size_);
  index_.emplace(h, block);
  ++n_cached_;
  if (audit_) check_invariants();
  return true;
}

bool PrefixCache::erase(int32_t block) {
  check_block_id(block);
  Entry& e = entries_[static_cast<size_t>(block)];
  if (e.gen == 0) return false;
  auto [lo, hi] = index_.equal_range(e.hash);
  auto it = std::find_if(lo, hi, [block](const auto& kv) { return kv.second == block; });
  KVLM_CHECK(it != hi);
  index_.erase(it);
  e = Entry{};
  --n_cached_;
  if (audit_) check_invariants();
  return true;
}

// ---- invariants ---------------------------------------------------------------------------------

void PrefixCache::check_invariants() const {
  // index_ holds exactly the registered blocks, each once, under its own hash.
  KVLM_CHECK(index_.size() == static_cast<size_t>(n_cached_));
  std::vector<uint8_t> seen(entries_.size(), 0);
  for (const auto& [h, b] : index_) {
    KVLM_CHECK(b >= 0 && static_cast<size_t>(b) < entries_.size());
    const Entry& e = entries_[static_cast<size_t>(b)];
    KVLM_CHECK(e.gen != 0 && e.gen < next_gen_ && e.hash == h);
    KVLM_CHECK(e.parent_gen < e.gen);  // a parent is registered before its children
    KVLM_CHECK(seen[static_cast<size_t>(b)] == 0);
    seen[static_cast<size_t>(b)] = 1;
  }
  int32_t n_registered = 0;
  for (const Entry& e : entries_) n_registered += e.gen != 0 ? 1 : 0;
  KVLM_CHECK(n_registered == n_cached_);
}

}  // namespace kvlm
