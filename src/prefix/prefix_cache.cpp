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
  children_.reserve(static_cast<size_t>(config.n_blocks));
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

bool PrefixCache::is_child(const Entry& e, const PrefixKey& key, uint64_t parent_gen) const {
  if (e.gen == 0 || e.parent_gen != parent_gen || e.cache_type != key.cache_type) return false;
  return parent_gen != 0 || e.salt == key.salt;
}

uint64_t PrefixCache::child_key_of(const PrefixKey& key, uint64_t salt_hash,
                                   uint64_t parent_hash) const {
  // parent_hash already covers cache_type and salt for a later block; a first block (parent 0)
  // needs them to keep tenants in separate buckets. Collisions only share a bucket: is_child
  // verifies every candidate.
  const uint64_t w[3] = {parent_hash, key.cache_type, salt_hash};
  return hash_fn_(w, sizeof(w));
}

PrefixPartial PrefixCache::match_partial(const PrefixKey& key, std::span<const int32_t> prompt,
                                         const PrefixMatch& m) const {
  PrefixPartial out;
  const int64_t n_prompt = static_cast<int64_t>(prompt.size());
  const int64_t cap = std::min<int64_t>(block_size_ - 1, n_prompt - 1 - m.n_tokens);
  if (cap <= 0) return out;
  uint64_t parent_hash = 0, parent_gen = 0;
  if (!m.block_ids.empty()) {
    const Entry& p = entries_[static_cast<size_t>(m.block_ids.back())];
    KVLM_CHECK(p.gen != 0 && p.n_tokens == block_size_);  // m must come from this index
    parent_hash = p.hash;
    parent_gen = p.gen;
  }
  const uint64_t salt_hash = hash_fn_(key.salt.data(), key.salt.size());
  const int32_t* want = prompt.data() + m.n_tokens;
  auto [lo, hi] = children_.equal_range(child_key_of(key, salt_hash, parent_hash));
  for (auto it = lo; it != hi; ++it) {
    const Entry& c = entries_[static_cast<size_t>(it->second)];
    if (!is_child(c, key, parent_gen)) continue;
    const int32_t* stored = tokens_.data() + static_cast<size_t>(it->second) * block_size_;
    const int64_t n = std::min<int64_t>(cap, c.n_tokens);
    int64_t l = 0;
    while (l < n && stored[l] == want[l]) ++l;
    if (l > out.n_tokens) {
      out.block = it->second;
      out.n_tokens = l;
    }
  }
  return out;
}

bool PrefixCache::contains(int32_t block) const {
  check_block_id(block);
  return entries_[static_cast<size_t>(block)].gen != 0;
}

uint64_t PrefixCache::generation(int32_t block) const {
  check_block_id(block);
  return entries_[static_cast<size_t>(block)].gen;
}

bool PrefixCache::is_partial(int32_t block) const {
  if (!contains(block)) fail("prefix cache: block {} is not registered", block);
  return entries_[static_cast<size_t>(block)].n_tokens != block_size_;
}

uint64_t PrefixCache::block_hash(int32_t block) const {
  if (is_partial(block)) fail("prefix cache: block {} is a partial leaf: it has no h[i]", block);
  return entries_[static_cast<size_t>(block)].hash;
}

std::span<const int32_t> PrefixCache::block_tokens(int32_t block) const {
  if (!contains(block)) fail("prefix cache: block {} is not registered", block);
  return {tokens_.data() + static_cast<size_t>(block) * static_cast<size_t>(block_size_),
          static_cast<size_t>(entries_[static_cast<size_t>(block)].n_tokens)};
}

// ---- insert / erase -----------------------------------------------------------------------------

bool PrefixCache::parent_of(const PrefixKey& key, int32_t parent, int32_t block,
                            uint64_t* parent_hash, uint64_t* parent_gen) const {
  if (entries_[static_cast<size_t>(block)].gen != 0)
    fail("prefix cache: block {} is already registered", block);
  *parent_hash = 0;
  *parent_gen = 0;
  if (parent == kNoParent) return true;
  check_block_id(parent);
  if (parent == block) fail("prefix cache: block {} cannot be its own parent", block);
  const Entry& p = entries_[static_cast<size_t>(parent)];
  if (p.gen == 0) return false;  // e.g. the parent was a duplicate: no verifiable chain
  if (p.n_tokens != block_size_)
    fail("prefix cache: block {} cannot follow block {}: it is a partial leaf of {} tokens", block,
         parent, p.n_tokens);
  if (p.cache_type != key.cache_type)
    fail("prefix cache: block {} has cache type {:#x}, its parent {} has {:#x}", block,
         key.cache_type, parent, p.cache_type);
  *parent_hash = p.hash;
  *parent_gen = p.gen;
  return true;
}

void PrefixCache::add_entry(const PrefixKey& key, int32_t block, uint64_t parent_gen,
                            uint64_t hash, uint64_t child_key, std::span<const int32_t> tokens) {
  Entry& e = entries_[static_cast<size_t>(block)];
  e.gen = next_gen_++;
  e.parent_gen = parent_gen;
  e.hash = hash;
  e.child_key = child_key;
  e.cache_type = key.cache_type;
  e.n_tokens = static_cast<int32_t>(tokens.size());
  if (parent_gen == 0) e.salt.assign(key.salt);
  std::copy(tokens.begin(), tokens.end(),
            tokens_.begin() + static_cast<ptrdiff_t>(block) * block_size_);
  if (e.n_tokens == block_size_) index_.emplace(hash, block);
  children_.emplace(child_key, block);
  ++n_cached_;
  if (audit_) check_invariants();
}

bool PrefixCache::insert(const PrefixKey& key, int32_t parent, std::span<const int32_t> tokens,
                         int32_t block) {
  check_block_id(block);
  if (tokens.size() != static_cast<size_t>(block_size_))
    fail("prefix cache: block {} must hold {} tokens to be cached, got {}", block, block_size_,
         tokens.size());
  uint64_t parent_hash, parent_gen;
  if (!parent_of(key, parent, block, &parent_hash, &parent_gen)) return false;
  const uint64_t salt_hash = hash_fn_(key.salt.data(), key.salt.size());
  std::vector<uint64_t> buf;
  const uint64_t h = hash_block_into(key, salt_hash, parent_hash, tokens, &buf);
  if (find(key, h, parent_gen, tokens) >= 0) return false;  // already cached in another block
  add_entry(key, block, parent_gen, h, child_key_of(key, salt_hash, parent_hash), tokens);
  return true;
}

int32_t PrefixCache::registered(const PrefixKey& key, int32_t parent,
                                std::span<const int32_t> tokens) const {
  if (tokens.size() != static_cast<size_t>(block_size_)) return -1;
  uint64_t parent_hash = 0, parent_gen = 0;
  if (parent != kNoParent) {
    check_block_id(parent);
    const Entry& p = entries_[static_cast<size_t>(parent)];
    if (p.gen == 0 || p.n_tokens != block_size_ || p.cache_type != key.cache_type) return -1;
    parent_hash = p.hash;
    parent_gen = p.gen;
  }
  const uint64_t salt_hash = hash_fn_(key.salt.data(), key.salt.size());
  std::vector<uint64_t> buf;
  return find(key, hash_block_into(key, salt_hash, parent_hash, tokens, &buf), parent_gen, tokens);
}

bool PrefixCache::insert_partial(const PrefixKey& key, int32_t parent,
                                 std::span<const int32_t> tokens, int32_t block) {
  check_block_id(block);
  if (tokens.empty() || tokens.size() >= static_cast<size_t>(block_size_))
    fail("prefix cache: a partial block {} holds 1 to {} tokens, got {}", block, block_size_ - 1,
         tokens.size());
  uint64_t parent_hash, parent_gen;
  if (!parent_of(key, parent, block, &parent_hash, &parent_gen)) return false;
  const uint64_t salt_hash = hash_fn_(key.salt.data(), key.salt.size());
  const uint64_t ck = child_key_of(key, salt_hash, parent_hash);
  // A sibling starting with these tokens already serves every prompt this leaf would.
  const size_t bs = static_cast<size_t>(block_size_);
  auto [lo, hi] = children_.equal_range(ck);
  for (auto it = lo; it != hi; ++it) {
    const Entry& c = entries_[static_cast<size_t>(it->second)];
    if (!is_child(c, key, parent_gen) || static_cast<size_t>(c.n_tokens) < tokens.size()) continue;
    const int32_t* stored = tokens_.data() + static_cast<size_t>(it->second) * bs;
    if (std::equal(tokens.begin(), tokens.end(), stored)) return false;
  }
  add_entry(key, block, parent_gen, 0, ck, tokens);
  return true;
}

bool PrefixCache::erase(int32_t block) {
  check_block_id(block);
  Entry& e = entries_[static_cast<size_t>(block)];
  if (e.gen == 0) return false;
  auto drop = [block](std::unordered_multimap<uint64_t, int32_t>& map, uint64_t key) {
    auto [lo, hi] = map.equal_range(key);
    auto it = std::find_if(lo, hi, [block](const auto& kv) { return kv.second == block; });
    KVLM_CHECK(it != hi);
    map.erase(it);
  };
  if (e.n_tokens == block_size_) drop(index_, e.hash);
  drop(children_, e.child_key);
  e = Entry{};
  --n_cached_;
  if (audit_) check_invariants();
  return true;
}

// ---- invariants ---------------------------------------------------------------------------------

void PrefixCache::check_invariants() const {
  // index_ holds exactly the registered full blocks, each once, under its own hash; children_
  // holds every registered block (full or partial), each once, under its own child key.
  std::vector<uint8_t> seen(entries_.size(), 0);
  for (const auto& [h, b] : index_) {
    KVLM_CHECK(b >= 0 && static_cast<size_t>(b) < entries_.size());
    const Entry& e = entries_[static_cast<size_t>(b)];
    KVLM_CHECK(e.gen != 0 && e.gen < next_gen_ && e.hash == h && e.n_tokens == block_size_);
    KVLM_CHECK(e.parent_gen < e.gen);  // a parent is registered before its children
    KVLM_CHECK(seen[static_cast<size_t>(b)] == 0);
    seen[static_cast<size_t>(b)] = 1;
  }
  for (const auto& [ck, b] : children_) {
    KVLM_CHECK(b >= 0 && static_cast<size_t>(b) < entries_.size());
    const Entry& e = entries_[static_cast<size_t>(b)];
    KVLM_CHECK(e.gen != 0 && e.child_key == ck && e.parent_gen < e.gen);
    KVLM_CHECK(e.n_tokens > 0 && e.n_tokens <= block_size_);
    KVLM_CHECK(seen[static_cast<size_t>(b)] == (e.n_tokens == block_size_ ? 1 : 0));
    seen[static_cast<size_t>(b)] = 2;
  }
  int32_t n_registered = 0;
  for (size_t b = 0; b < entries_.size(); ++b) {
    const bool registered = entries_[b].gen != 0;
    n_registered += registered ? 1 : 0;
    KVLM_CHECK(seen[b] == (registered ? 2 : 0));
  }
  KVLM_CHECK(n_registered == n_cached_);
  KVLM_CHECK(children_.size() == static_cast<size_t>(n_cached_));
}

}  // namespace kvlm
