#include "kv_manager/kv_manager.h"

#include <algorithm>
#include <limits>

#include "base/error.h"

namespace kvlm {

namespace {

// Checks what the parts would otherwise check later, or not at all (a KIVI block is sealed: a
// fresh prompt of its tokens holds something else, so it is never a prefix hit).
const KvManagerConfig& checked(const KvManagerConfig& c) {
  validate(c.shape);
  if (c.block_size <= 0) fail("the KV block size must be positive, got {}", c.block_size);
  if (c.n_blocks <= 0) fail("the KV pool needs at least one block, got {}", c.n_blocks);
  if (c.max_blocks > c.n_blocks && c.prefix_cache)
    fail("a growing (dynamic) KV pool cannot have a prefix cache");
  if (c.shape.kivi() && c.prefix_cache)
    fail("the prefix cache does not apply to the KIVI cache (--kv-residual): a sealed block is "
         "not what a fresh prompt of its tokens holds (--no-prefix-cache)");
  if (c.shape.kivi() && c.block_size % c.shape.kivi_group != 0)
    fail("the KIVI cache's K groups of {} tokens need a --block-size that is a multiple of {}, "
         "got {}",
         c.shape.kivi_group, c.shape.kivi_group, c.block_size);
  return c;
}

}  // namespace

KvManagerConfig kv_seq_config(const KvShape& shape, int64_t n_ctx, KvAlloc alloc,
                              const KvRope& rope) {
  validate(shape);
  if (n_ctx <= 0) fail("the context must be positive, got {}", n_ctx);
  kv_bytes(shape, n_ctx);  // throws on overflow before anything is sized
  const int64_t max_blocks = kv_seq_blocks(shape, false, n_ctx, n_ctx);
  if (max_blocks > std::numeric_limits<int32_t>::max())
    fail("a context of {} tokens is too large", n_ctx);
  return KvManagerConfig{
      .shape = shape,
      .block_size = kv_seq_block_size(shape),
      .n_blocks = static_cast<int32_t>(kv_seq_blocks(shape, alloc == KvAlloc::Dynamic, n_ctx, 0)),
      .max_blocks = static_cast<int32_t>(max_blocks),
      .n_slots = shape.kivi() ? 1 : 0,
      .prefix_cache = false,
      .rope = rope};
}

KvManager::KvManager(const KvManagerConfig& config)
    : shape_(checked(config).shape),
      block_size_(config.block_size),
      max_blocks_(std::max(config.max_blocks, config.n_blocks)),
      pool_({.n_blocks = config.n_blocks, .block_size = config.block_size, .audit = config.audit}),
      store_(config.shape, config.n_blocks, config.block_size, config.n_slots),
      rope_(config.rope) {
  if (config.prefix_cache) {
    prefix_ = std::make_unique<PrefixCache>(PrefixCache::Config{
        .n_blocks = config.n_blocks, .block_size = config.block_size, .audit = config.audit});
    pool_.set_evict_hook([this](BlockId b) { prefix_->erase(b); });
  }
  for (int32_t i = config.n_slots - 1; i >= 0; --i) free_slots_.push_back(i);
  const KvShape& s = shape_;
  const int32_t key[] = {s.n_layer, s.n_kv_head, s.head_dim, static_cast<int32_t>(s.dtype_k),
                         static_cast<int32_t>(s.dtype_v), block_size_, s.rotate ? 1 : 0,
                         s.kivi_residual};
  cache_type_ = prefix_hash_xxh3(key, sizeof(key));
}

KvManager::~KvManager() = default;

int64_t KvManager::blocks_for_budget(const KvShape& shape, int32_t block_size,
                                     uint64_t budget_bytes, int32_t n_slots) {
  return PagedKvStore::blocks_for_budget(shape, block_size, budget_bytes, n_slots);
}

KvManagerStats KvManager::stats() const {
  KvManagerStats s;
  s.blocks = pool_.stats();
  s.block_size = block_size_;
  s.bytes_total = store_.bytes();
  // Blocks in use, and the KIVI residual slots sequences hold.
  s.bytes_used = uint64_t(s.blocks.n_used) * PagedKvStore::block_bytes(shape_, block_size_) +
                 uint64_t(store_.n_slots() - static_cast<int32_t>(free_slots_.size())) *
                     PagedKvStore::residual_slot_bytes(shape_);
  s.n_seqs = static_cast<int64_t>(seqs_.size());
  s.n_evicted_tokens = n_evicted_tokens_;
  return s;
}

KvManager::SeqState& KvManager::state(SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) fail("KV manager: unknown sequence {}", seq);
  return it->second;
}

const KvManager::SeqState& KvManager::state(SeqId seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) fail("KV manager: unknown sequence {}", seq);
  return it->second;
}

bool KvManager::evicted(SeqId seq) const { return state(seq).evicted; }

void KvManager::copy_blocks(const std::vector<BlockCopy>& copies) {
  for (const BlockCopy& cp : copies) store_.copy_block(cp.src, cp.dst);
}

// ---- a sequence's life ---------------------------------------------------------------------------

KvHit KvManager::lookup(std::span<const int32_t> tokens, std::string_view salt) const {
  KvHit hit;
  if (!prefix_) return hit;
  const PrefixKey k{cache_type_, salt};
  hit.full = prefix_->match(k, tokens);
  hit.partial = prefix_->match_partial(k, tokens, hit.full);
  return hit;
}

bool KvManager::admit(SeqId seq, std::span<const int32_t> tokens, std::string_view salt,
                      int64_t n_held, const KvHit& hit) {
  if (seqs_.count(seq) != 0) fail("KV manager: sequence {} is already admitted", seq);
  if ((hit.n_tokens() > 0 && hit.n_tokens() >= static_cast<int64_t>(tokens.size())) ||
      n_held < hit.n_tokens())
    fail("KV manager: a prefix hit of {} tokens for {} tokens, {} held", hit.n_tokens(),
         tokens.size(), n_held);
  if (shape_.kivi() && free_slots_.empty())
    fail("KV manager: all {} KIVI residual slots are held", store_.n_slots());
  // Matched blocks with no holder leave the free queue when shared: they do not count as free.
  int64_t matched_free = 0;
  for (BlockId b : hit.full.block_ids) matched_free += pool_.ref_count(b) == 0;
  const int64_t n_blocks_all = (n_held + block_size_ - 1) / block_size_;
  const int64_t need =
      std::max<int64_t>(0, n_blocks_all - static_cast<int64_t>(hit.full.block_ids.size()));
  if (pool_.stats().n_free - matched_free < need) return false;

  pool_.add_seq(seq);
  SeqState& s = seqs_[seq];
  s.salt = salt;
  if (shape_.kivi()) {
    s.kivi_slot = free_slots_.back();
    free_slots_.pop_back();
  }
  pool_.append_shared(seq, hit.full.block_ids);
  s.n_registered = static_cast<int64_t>(hit.full.block_ids.size());
  if (hit.partial.block >= 0) {
    // The partial hit goes into a fresh block of seq's own (one of the `need` counted above, so
    // append cannot fail), copied now: the source is cached-free or shared and stays as the index
    // registered it, but later admissions may evict it and a forward pass overwrite it. When the
    // pool hands out the source itself as the fresh block (it was the only free one), its rows
    // are already in place and only its index entry goes.
    copies_.clear();
    const bool got = pool_.append(seq, hit.partial.n_tokens, &copies_);
    KVLM_CHECK(got && copies_.empty());
    store_.copy_block(hit.partial.block, pool_.block_table(seq).back());
  }
  return true;
}

bool KvManager::reserve(SeqId seq, int64_t n) {
  copies_.clear();
  while (!pool_.append(seq, n, &copies_)) {
    if (n_blocks() >= max_blocks_) return false;
    // A dynamic cache's next chunk (kv_seq_blocks' arithmetic: kKvChunkTokens at a time).
    const int64_t chunk = std::max<int64_t>(1, kKvChunkTokens / block_size_);
    const auto to = static_cast<int32_t>(std::min<int64_t>(max_blocks_, n_blocks() + chunk));
    store_.grow(to);
    pool_.grow(to);
  }
  copy_blocks(copies_);
  return true;
}

bool KvManager::evict(SeqId seq, int64_t begin, int64_t count) {
  SeqState& s = state(seq);
  if (shape_.kivi()) fail("KV manager: the KIVI cache cannot evict");
  const int64_t n_tokens = pool_.seq_tokens(seq), n_after = n_tokens - count;
  if (begin < 0 || count < 0 || begin + count > n_tokens)
    fail("KV manager: cannot evict [{}, {}) of {} positions", begin, begin + count, n_tokens);
  if (count == 0) return true;
  copies_.clear();
  if (!pool_.make_writable(seq, begin / block_size_, (n_after + block_size_ - 1) / block_size_,
                           &copies_))
    return false;
  copy_blocks(copies_);
  store_.shift_out(pool_.block_table(seq), n_tokens, begin, count, rope_);
  pool_.truncate(seq, n_after);
  s.n_registered = std::min(s.n_registered, begin / block_size_);
  s.evicted = true;
  n_evicted_tokens_ += count;
  return true;
}

void KvManager::commit(SeqId seq, std::span<const int32_t> tokens, int64_t n_computed) {
  SeqState& s = state(seq);
  KVLM_CHECK(n_computed <= pool_.seq_tokens(seq) &&
             n_computed <= static_cast<int64_t>(tokens.size()));
  if (shape_.kivi())
    s.n_sealed = kv_kivi_sealed(s.n_sealed, n_computed, shape_.kivi_residual, shape_.kivi_group);
  if (!prefix_ || s.evicted) return;
  const auto table = pool_.block_table(seq);
  const PrefixKey k = key(s);
  for (const int64_t full = n_computed / block_size_; s.n_registered < full; ++s.n_registered) {
    const int64_t bi = s.n_registered;
    const BlockId blk = table[static_cast<size_t>(bi)];
    if (pool_.is_cached(blk)) continue;  // shared from the index already
    const int32_t parent = bi == 0 ? kNoParent : table[static_cast<size_t>(bi - 1)];
    if (prefix_->insert(k, parent, tokens.subspan(static_cast<size_t>(bi * block_size_),
                                                  static_cast<size_t>(block_size_)),
                        blk))
      pool_.mark_cached(blk);
  }
}

void KvManager::truncate(SeqId seq, int64_t n) {
  SeqState& s = state(seq);
  if (n < s.n_sealed)
    fail("KV manager: cannot truncate to {} positions: {} are sealed (KIVI)", n, s.n_sealed);
  pool_.truncate(seq, n);
  // A registered block cut in the middle is re-registered once full again (the pool drops its
  // index entry before anything is written into it).
  s.n_registered = std::min(s.n_registered, n / block_size_);
}

void KvManager::register_partial(SeqId seq, const SeqState& s, std::span<const int32_t> tokens,
                                 int64_t n_computed) {
  // The partly filled last block holds the K/V of tokens [f * bs, n_computed): the end of the
  // history a chat's next turn sends again. Registered as a leaf it stays in the pool's LRU after
  // free_seq, and the next prompt copies it instead of recomputing up to bs - 1 tokens. Only a
  // block this sequence holds alone, not already cached; insert_partial refuses it when the full
  // block before it is not registered (its chain could not be verified).
  const int64_t f = n_computed / block_size_, k = n_computed % block_size_;
  const auto table = pool_.block_table(seq);
  KVLM_CHECK(static_cast<int64_t>(table.size()) > f);
  const BlockId blk = table[static_cast<size_t>(f)];
  if (pool_.is_cached(blk) || pool_.ref_count(blk) != 1) return;
  const int32_t parent = f == 0 ? kNoParent : table[static_cast<size_t>(f - 1)];
  if (prefix_->insert_partial(key(s), parent,
                              tokens.subspan(static_cast<size_t>(f * block_size_),
                                             static_cast<size_t>(k)),
                              blk))
    pool_.mark_cached(blk);
}

void KvManager::release(SeqId seq, std::span<const int32_t> tokens, int64_t n_computed,
                        bool keep_partial) {
  const SeqState& s = state(seq);
  KVLM_CHECK(n_computed <= pool_.seq_tokens(seq) &&
             n_computed <= static_cast<int64_t>(tokens.size()));
  if (keep_partial && prefix_ && !s.evicted && n_computed % block_size_ > 0)
    register_partial(seq, s, tokens, n_computed);
  pool_.free_seq(seq);
  if (s.kivi_slot >= 0) free_slots_.push_back(s.kivi_slot);
  seqs_.erase(seq);
}

KvSeqCache KvManager::seq_cache(SeqId seq) const {
  const SeqState& s = state(seq);
  return KvSeqCache{pool_.block_table(seq), s.kivi_slot, s.n_sealed};
}

void KvManager::check_invariants() const {
  pool_.check_invariants();
  if (prefix_) prefix_->check_invariants();
  // Every cached block is registered in the index and the other way round.
  int32_t n_cached = 0;
  for (BlockId b = 0; b < pool_.n_blocks(); ++b) {
    const bool in_index = prefix_ && prefix_->contains(b);
    KVLM_CHECK(pool_.is_cached(b) == in_index);
    n_cached += in_index;
  }
  KVLM_CHECK(!prefix_ || n_cached == prefix_->n_cached());
  KVLM_CHECK(static_cast<int64_t>(free_slots_.size()) + (shape_.kivi() ? pool_.n_seqs() : 0) ==
             store_.n_slots());
}

}  // namespace kvlm
