#include "kv/block_pool.h"

#include <algorithm>

#include "base/error.h"

namespace kvlm {

BlockPool::BlockPool(const Config& config) : block_size_(config.block_size), audit_(config.audit) {
  if (config.n_blocks <= 0) fail("block pool: n_blocks must be positive, got {}", config.n_blocks);
  if (config.block_size <= 0)
    fail("block pool: block_size must be positive (tokens per block), got {}", config.block_size);
  blocks_.resize(static_cast<size_t>(config.n_blocks));
  // Ascending ids from the head: a fresh pool hands out 0, 1, 2, ...
  for (BlockId id = 0; id < config.n_blocks; ++id) queue_push_back(id);
  after_op();
}

void BlockPool::grow(int32_t n_blocks) {
  const int32_t n_old = this->n_blocks();
  if (n_blocks < n_old) fail("block pool: cannot shrink from {} to {} blocks", n_old, n_blocks);
  blocks_.resize(static_cast<size_t>(n_blocks));
  for (BlockId id = n_blocks - 1; id >= n_old; --id) queue_push_front(id);
  after_op();
}

BlockPoolStats BlockPool::stats() const {
  BlockPoolStats s;
  s.n_total = n_blocks();
  s.n_free = n_queued_;
  s.n_used = n_blocks() - n_queued_;
  s.n_cached = n_cached_;
  s.n_cached_free = n_cached_free_;
  s.n_evicted = n_evicted_;
  return s;
}

// ---- lookups ------------------------------------------------------------------------------------

BlockPool::Seq& BlockPool::seq_or_fail(SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) fail("block pool: unknown sequence {}", seq);
  return it->second;
}

const BlockPool::Seq& BlockPool::seq_or_fail(SeqId seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) fail("block pool: unknown sequence {}", seq);
  return it->second;
}

const BlockPool::BlockMeta& BlockPool::block_or_fail(BlockId id) const {
  if (id < 0 || id >= n_blocks())
    fail("block pool: block id {} out of range [0, {})", id, n_blocks());
  return blocks_[static_cast<size_t>(id)];
}

int64_t BlockPool::seq_tokens(SeqId seq) const {
  return seq_or_fail(seq).n_tokens;
}

std::span<const BlockId> BlockPool::block_table(SeqId seq) const {
  return seq_or_fail(seq).table;
}

bool BlockPool::is_cached(BlockId id) const {
  return block_or_fail(id).cached;
}

int32_t BlockPool::ref_count(BlockId id) const {
  return block_or_fail(id).ref_count;
}

// ---- free queue ---------------------------------------------------------------------------------

void BlockPool::queue_push_front(BlockId id) {
  BlockMeta& b = blocks_[static_cast<size_t>(id)];
  KVLM_CHECK(!b.queued && b.ref_count == 0);
  b.queued = true;
  b.prev = kNoBlock;
  b.next = head_;
  if (head_ != kNoBlock) blocks_[static_cast<size_t>(head_)].prev = id;
  head_ = id;
  if (tail_ == kNoBlock) tail_ = id;
  ++n_queued_;
}

void BlockPool::queue_push_back(BlockId id) {
  BlockMeta& b = blocks_[static_cast<size_t>(id)];
  KVLM_CHECK(!b.queued && b.ref_count == 0);
  b.queued = true;
  b.next = kNoBlock;
  b.prev = tail_;
  if (tail_ != kNoBlock) blocks_[static_cast<size_t>(tail_)].next = id;
  tail_ = id;
  if (head_ == kNoBlock) head_ = id;
  ++n_queued_;
}

void BlockPool::queue_remove(BlockId id) {
  BlockMeta& b = blocks_[static_cast<size_t>(id)];
  KVLM_CHECK(b.queued && b.ref_count == 0);
  if (b.prev != kNoBlock)
    blocks_[static_cast<size_t>(b.prev)].next = b.next;
  else
    head_ = b.next;
  if (b.next != kNoBlock)
    blocks_[static_cast<size_t>(b.next)].prev = b.prev;
  else
    tail_ = b.prev;
  b.prev = b.next = kNoBlock;
  b.queued = false;
  --n_queued_;
}

void BlockPool::uncache(BlockId id) {
  BlockMeta& b = blocks_[static_cast<size_t>(id)];
  KVLM_CHECK(b.cached);
  if (evict_hook_) evict_hook_(id);
  b.cached = false;
  --n_cached_;
  ++n_evicted_;
}

BlockId BlockPool::take_fresh() {
  const BlockId id = head_;
  KVLM_CHECK(id != kNoBlock);  // callers count free blocks first
  queue_remove(id);
  BlockMeta& b = blocks_[static_cast<size_t>(id)];
  if (b.cached) {
    --n_cached_free_;
    uncache(id);
  }
  b.ref_count = 1;
  return id;
}

void BlockPool::acquire(BlockId id) {
  BlockMeta& b = blocks_[static_cast<size_t>(id)];
  if (b.ref_count == 0) {
    // Only a cached block may be picked up from the free queue: a plain one holds garbage.
    KVLM_CHECK(b.cached);
    queue_remove(id);
    --n_cached_free_;
  }
  ++b.ref_count;
}

void BlockPool::release(BlockId id) {
  BlockMeta& b = blocks_[static_cast<size_t>(id)];
  KVLM_CHECK(b.ref_count > 0);
  if (--b.ref_count > 0) return;
  if (b.cached) {
    // Most recently released at the tail: eviction (from the head side) takes the least
    // recently used cached block, and only once no plain free block is left.
    queue_push_back(id);
    ++n_cached_free_;
  } else {
    queue_push_front(id);
  }
}

void BlockPool::release_tail(Seq& s, size_t n_keep) {
  // Last block first, so a sequence's deeper blocks sit nearer the head than its earlier ones and
  // are evicted first: a block is useful only while every block before it is still cached.
  while (s.table.size() > n_keep) {
    if (s.table.back() != kNoBlock) release(s.table.back());
    s.table.pop_back();
  }
}

// ---- operations ---------------------------------------------------------------------------------

void BlockPool::add_seq(SeqId seq) {
  if (!seqs_.try_emplace(seq).second) fail("block pool: sequence {} already exists", seq);
  after_op();
}

int32_t BlockPool::blocks_needed(SeqId seq, int64_t n_tokens) const {
  const Seq& s = seq_or_fail(seq);
  if (n_tokens < 0) fail("block pool: cannot append {} tokens to sequence {}", n_tokens, seq);
  if (n_tokens == 0) return 0;
  // More tokens than the whole pool holds can never fit (and would overflow below).
  if (n_tokens > int64_t{n_blocks()} * block_size_) return n_blocks() + 1;
  int64_t n = blocks_for(s.n_tokens + n_tokens) - static_cast<int64_t>(s.table.size());
  if (s.n_tokens % block_size_ != 0) {
    KVLM_CHECK(s.table.back() != kNoBlock);  // release_front keeps the last block
    const BlockMeta& last = blocks_[static_cast<size_t>(s.table.back())];
    if (last.ref_count > 1) ++n;  // copy-on-write of the partial last block
  }
  return static_cast<int32_t>(n);
}

void BlockPool::own(BlockId& id, std::vector<BlockCopy>* copies) {
  BlockMeta& b = blocks_[static_cast<size_t>(id)];
  if (b.ref_count > 1) {
    const BlockId dst = take_fresh();  // callers count the free blocks first
    --b.ref_count;  // still > 0: the other holders keep it
    copies->push_back({id, dst});
    id = dst;
  } else if (b.cached) {
    uncache(id);  // held by us alone: drop the entry rather than copy the rows
  }
}

bool BlockPool::append(SeqId seq, int64_t n_tokens, std::vector<BlockCopy>* copies) {
  if (copies == nullptr) fail("block pool: append needs a copy list");
  const int32_t n_need = blocks_needed(seq, n_tokens);  // validates seq and n_tokens
  if (n_need > n_queued_) return false;                 // nothing changed
  if (n_tokens == 0) return true;
  Seq& s = seq_or_fail(seq);
  if (s.n_tokens % block_size_ != 0) {
    // The write starts inside the last block: it must be this sequence's alone.
    own(s.table.back(), copies);
  }
  const int64_t n_blocks_after = blocks_for(s.n_tokens + n_tokens);
  s.table.reserve(static_cast<size_t>(n_blocks_after));
  while (static_cast<int64_t>(s.table.size()) < n_blocks_after) s.table.push_back(take_fresh());
  s.n_tokens += n_tokens;
  after_op();
  return true;
}

bool BlockPool::can_make_writable(SeqId seq, int64_t first, int64_t last) const {
  const Seq& s = seq_or_fail(seq);
  if (first < 0 || first > last || last > static_cast<int64_t>(s.table.size()))
    fail("block pool: blocks [{}, {}) are not in sequence {}'s table of {}", first, last, seq,
         s.table.size());
  int64_t n_shared = 0;
  for (int64_t i = first; i < last; ++i) {
    const BlockId id = s.table[static_cast<size_t>(i)];
    if (id == kNoBlock) fail("block pool: block {} of sequence {} was released", i, seq);
    n_shared += blocks_[static_cast<size_t>(id)].ref_count > 1;
  }
  return n_shared <= n_queued_;
}

bool BlockPool::make_writable(SeqId seq, int64_t first, int64_t last,
                              std::vector<BlockCopy>* copies) {
  if (copies == nullptr) fail("block pool: make_writable needs a copy list");
  if (!can_make_writable(seq, first, last)) return false;  // nothing changed
  Seq& s = seq_or_fail(seq);
  for (int64_t i = first; i < last; ++i) own(s.table[static_cast<size_t>(i)], copies);
  after_op();
  return true;
}

void BlockPool::append_shared(SeqId seq, std::span<const BlockId> ids) {
  Seq& s = seq_or_fail(seq);
  if (s.n_tokens % block_size_ != 0)
    fail(
        "block pool: sequence {} holds {} tokens, not a multiple of the block size {}; shared "
        "blocks can only follow full blocks",
        seq, s.n_tokens, block_size_);
  const bool any_block =
      std::any_of(s.table.begin(), s.table.end(), [](BlockId b) { return b != kNoBlock; });
  bool past_holes = false;
  for (const BlockId& id : ids) {
    if (id == kNoBlock) {
      if (past_holes || any_block || &id == &ids.back())
        fail("block pool: holes can only lead a sequence's table, never end it");
      continue;
    }
    past_holes = true;
    const BlockMeta& b = block_or_fail(id);
    if (b.ref_count == 0 && !b.cached)
      fail("block pool: block {} is free and not cached, so it holds no tokens to share", id);
  }
  s.table.reserve(s.table.size() + ids.size());
  for (BlockId id : ids) {
    if (id != kNoBlock) acquire(id);
    s.table.push_back(id);
  }
  s.n_tokens += static_cast<int64_t>(ids.size()) * block_size_;
  after_op();
}

void BlockPool::fork(SeqId src, SeqId dst) {
  const Seq& s = seq_or_fail(src);
  if (seqs_.count(dst) != 0) fail("block pool: fork target sequence {} already exists", dst);
  Seq copy;
  copy.table = s.table;  // explicit copy of the ids; the blocks themselves are shared
  copy.n_tokens = s.n_tokens;
  for (BlockId id : copy.table)
    if (id != kNoBlock) acquire(id);
  seqs_.emplace(dst, std::move(copy));
  after_op();
}

void BlockPool::release_front(SeqId seq, int64_t n_front) {
  Seq& s = seq_or_fail(seq);
  if (n_front < 0 || n_front >= static_cast<int64_t>(s.table.size()))
    fail("block pool: cannot release the first {} of sequence {}'s {} blocks", n_front, seq,
         s.table.size());
  for (int64_t i = 0; i < n_front; ++i) {
    BlockId& id = s.table[static_cast<size_t>(i)];
    if (id == kNoBlock) continue;
    release(id);
    id = kNoBlock;
  }
  after_op();
}

bool BlockPool::can_renew(SeqId seq, int64_t n_tokens, int64_t first) const {
  const Seq& s = seq_or_fail(seq);
  const int64_t n_table = blocks_for(n_tokens);
  if (n_tokens < 0 || first < 0 || (n_tokens > 0 && first >= n_table))
    fail("block pool: cannot renew sequence {} as {} tokens from block {}", seq, n_tokens, first);
  // A block its table names with refcount 1 comes back to the free queue when released.
  const auto own = std::count_if(s.table.begin(), s.table.end(), [&](BlockId id) {
    return id != kNoBlock && blocks_[static_cast<size_t>(id)].ref_count == 1;
  });
  return std::max<int64_t>(0, n_table - first) <= n_queued_ + own;
}

bool BlockPool::renew(SeqId seq, int64_t n_tokens, int64_t first) {
  if (!can_renew(seq, n_tokens, first)) return false;  // nothing changed
  Seq& s = seq_or_fail(seq);
  const int64_t n_table = blocks_for(n_tokens);
  release_tail(s, 0);
  s.table.assign(static_cast<size_t>(n_table), kNoBlock);
  for (int64_t i = first; i < n_table; ++i) s.table[static_cast<size_t>(i)] = take_fresh();
  s.n_tokens = n_tokens;
  after_op();
  return true;
}

void BlockPool::truncate(SeqId seq, int64_t n_tokens) {
  Seq& s = seq_or_fail(seq);
  if (n_tokens < 0 || n_tokens > s.n_tokens)
    fail("block pool: cannot truncate sequence {} of {} tokens to {}", seq, s.n_tokens, n_tokens);
  release_tail(s, static_cast<size_t>(blocks_for(n_tokens)));
  s.n_tokens = n_tokens;
  after_op();
}

void BlockPool::free_seq(SeqId seq) {
  Seq& s = seq_or_fail(seq);
  release_tail(s, 0);
  seqs_.erase(seq);
  after_op();
}

void BlockPool::mark_cached(BlockId id) {
  block_or_fail(id);
  BlockMeta& b = blocks_[static_cast<size_t>(id)];
  if (b.ref_count == 0) fail("block pool: cannot cache block {}: it is free", id);
  if (b.cached) fail("block pool: block {} is already cached", id);
  b.cached = true;
  ++n_cached_;
  after_op();
}

void BlockPool::forget_cached(BlockId id) {
  block_or_fail(id);
  BlockMeta& b = blocks_[static_cast<size_t>(id)];
  if (!b.cached) fail("block pool: block {} is not cached", id);
  b.cached = false;
  --n_cached_;
  if (b.ref_count == 0) {  // plain free blocks come before cached ones: it is handed out next
    --n_cached_free_;
    queue_remove(id);
    queue_push_front(id);
  }
  after_op();
}

// ---- invariants ---------------------------------------------------------------------------------

void BlockPool::after_op() const {
  KVLM_CHECK(n_queued_ >= 0 && n_queued_ <= n_blocks());
  KVLM_CHECK(n_cached_free_ >= 0 && n_cached_free_ <= n_cached_ && n_cached_ <= n_blocks());
  if (audit_) check_invariants();
}

void BlockPool::check_invariants() const {
  const size_t n = blocks_.size();
  // Refcounts recomputed from the tables.
  std::vector<int32_t> refs(n, 0);
  for (const auto& [id, s] : seqs_) {
    KVLM_CHECK(s.n_tokens >= 0);
    KVLM_CHECK(static_cast<int64_t>(s.table.size()) == blocks_for(s.n_tokens));
    bool past_holes = false;
    for (BlockId b : s.table) {
      if (b == kNoBlock) {  // released by a window: only at the front, never the last entry
        KVLM_CHECK(!past_holes && &b != &s.table.back());
        continue;
      }
      past_holes = true;
      KVLM_CHECK(b >= 0 && static_cast<size_t>(b) < n);
      ++refs[static_cast<size_t>(b)];
    }
  }
  int32_t n_used = 0, n_zero = 0, n_cached = 0, n_cached_free = 0;
  for (size_t i = 0; i < n; ++i) {
    const BlockMeta& b = blocks_[i];
    KVLM_CHECK(b.ref_count == refs[i]);
    KVLM_CHECK(b.ref_count >= 0);
    KVLM_CHECK(b.queued == (b.ref_count == 0));
    if (b.ref_count > 0)
      ++n_used;
    else
      ++n_zero;
    if (b.cached) ++n_cached;
    if (b.cached && b.ref_count == 0) ++n_cached_free;
  }
  // Walk the free queue: every entry free, plain ones before cached ones, links consistent.
  int32_t n_walked = 0;
  bool seen_cached = false;
  BlockId prev = kNoBlock;
  for (BlockId id = head_; id != kNoBlock; id = blocks_[static_cast<size_t>(id)].next) {
    KVLM_CHECK(id >= 0 && static_cast<size_t>(id) < n);
    const BlockMeta& b = blocks_[static_cast<size_t>(id)];
    KVLM_CHECK(b.queued && b.ref_count == 0);
    KVLM_CHECK(b.prev == prev);
    KVLM_CHECK(!(seen_cached && !b.cached));
    seen_cached = seen_cached || b.cached;
    prev = id;
    ++n_walked;
    KVLM_CHECK(n_walked <= n_queued_);  // no cycle
  }
  KVLM_CHECK(prev == tail_);
  KVLM_CHECK(n_walked == n_queued_ && n_zero == n_queued_);
  KVLM_CHECK(n_queued_ + n_used == n_blocks());  // conservation: free + used == total
  KVLM_CHECK(n_cached == n_cached_ && n_cached_free == n_cached_free_);
}

}  // namespace kvlm
