// Paged KV bookkeeping: which fixed-size blocks each sequence holds. Pure metadata (block ids,
// refcounts, a free queue), no bytes: the storage that owns the K/V rows of block b reads the
// tables and does the copies this pool asks for. The model is vLLM v1's BlockPool /
// KVCacheManager (docs/KV.md, "Paged blocks and the prefix cache").
//
// Layout of the metadata
//   blocks_:  [n_blocks]  per block: refcount, cached flag, free-queue links
//   seqs_:    seq id -> {block table [ceil(n_tokens / block_size)] of block ids, n_tokens}
//   free queue: every block with refcount 0, in the order they will be handed out:
//     head -> [plain free blocks] [cached-free blocks, least recently released first] <- tail
//   Token position p of a sequence lives in block table[p / block_size], row p % block_size.
//
// Prefix reuse: a block whose contents a prefix index (src/prefix/prefix_cache.h) has registered is
// "cached" (mark_cached). When its refcount drops to 0 it stays in the free queue with its
// contents, at the tail, so it is evicted in LRU order and only after every plain free block.
// When the pool hands a cached block out for new contents (or a sequence overwrites one in place)
// it calls the eviction hook first, so the index forgets the block before its bytes change.
//
// Invariants (KVLM_CHECK, on in release builds): n_free + n_used == n_total; a block's refcount
// equals the number of block-table entries naming it (holes, kNoBlock, name none); the free queue holds exactly the blocks
// with refcount 0; a table holds ceil(n_tokens / block_size) blocks. Each operation checks what it
// touches; with Config::audit (default) the whole state is re-verified after every operation too,
// O(n_blocks + table entries): affordable at batch boundaries for the pools this project runs, and
// it can be turned off for very large pools.
//
// Not thread-safe: one scheduler thread owns the pool. Running out of blocks is not an error
// (append returns false and changes nothing, so a scheduler can preempt); bad arguments (unknown
// sequence, lengths out of range) throw kvlm::Error.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <unordered_map>
#include <vector>

namespace kvlm {

// Blocks of block_size tokens that n_tokens fill: ceil(n_tokens / block_size) for n_tokens >= 0,
// block_size > 0, without the overflow of (n + d - 1) / d near INT64_MAX (kv-size takes any --ctx
// and must answer with its one-line error, not undefined behaviour).
inline int64_t kv_blocks_for(int64_t n_tokens, int64_t block_size) {
  return n_tokens / block_size + (n_tokens % block_size != 0);
}

using BlockId = int32_t;  // 0 .. n_blocks - 1
using SeqId = int64_t;    // chosen by the caller (a request id)
inline constexpr BlockId kNoBlock = -1;

// Storage must copy block src's rows to block dst before the next write: a copy-on-write.
struct BlockCopy {
  BlockId src = kNoBlock;
  BlockId dst = kNoBlock;
};

struct BlockPoolStats {
  int32_t n_total = 0;        // blocks in the pool
  int32_t n_free = 0;         // refcount 0, allocatable; includes n_cached_free
  int32_t n_used = 0;         // refcount > 0
  int32_t n_cached = 0;       // contents registered in a prefix index (used or free)
  int32_t n_cached_free = 0;  // cached with refcount 0: reusable by a prefix hit, or evictable
  int64_t n_evicted = 0;      // cached blocks whose contents were dropped, since construction
};

class BlockPool {
 public:
  struct Config {
    int32_t n_blocks = 0;     // > 0
    int32_t block_size = 16;  // tokens per block, > 0 (vLLM's default; see docs/KV.md)
    bool audit = true;        // re-verify every invariant after every operation
  };
  // Called with a cached block's id just before its contents stop being what the index
  // registered (it is handed out for new tokens, or overwritten in place). The index must forget
  // the block; the hook must not call back into the pool.
  using EvictHook = std::function<void(BlockId)>;

  // Throws kvlm::Error for n_blocks <= 0 or block_size <= 0.
  explicit BlockPool(const Config& config);

  int32_t block_size() const { return block_size_; }
  int32_t n_blocks() const { return static_cast<int32_t>(blocks_.size()); }
  BlockPoolStats stats() const;
  void set_evict_hook(EvictHook hook) { evict_hook_ = std::move(hook); }
  // Adds blocks n_blocks() .. n_blocks - 1 as plain free blocks, handed out before any cached-free
  // one, lowest id first (a dynamic cache growing; its storage grows to match). n_blocks >=
  // n_blocks().
  void grow(int32_t n_blocks);

  // ---- sequences --------------------------------------------------------------------------------
  // A new empty sequence. Throws if seq exists.
  void add_seq(SeqId seq);
  bool has_seq(SeqId seq) const { return seqs_.count(seq) != 0; }
  int64_t n_seqs() const { return static_cast<int64_t>(seqs_.size()); }
  int64_t seq_tokens(SeqId seq) const;
  std::span<const BlockId> block_table(SeqId seq) const;  // [ceil(seq_tokens / block_size)]

  // Fresh blocks append(seq, n_tokens) would take (new blocks plus a copy-on-write); lets a
  // scheduler admit by free blocks without trying.
  int32_t blocks_needed(SeqId seq, int64_t n_tokens) const;

  // Makes room for n_tokens more tokens at positions [seq_tokens, seq_tokens + n_tokens) and
  // counts them as held. If the partial last block is shared (refcount > 1) the sequence gets a
  // fresh block in its place and {old, new} is appended to *copies (storage copies the rows
  // before writing); if it is cached but held only by this sequence its cache entry is dropped
  // (eviction hook) and it is written in place. Returns false, changing nothing, when the free
  // queue holds fewer than blocks_needed(seq, n_tokens) blocks. n_tokens >= 0.
  [[nodiscard]] bool append(SeqId seq, int64_t n_tokens, std::vector<BlockCopy>* copies);

  // Makes blocks [first, last) of seq's table writable in place, for an eviction that moves rows
  // within the sequence (the sliding window, context shift): each block held by others too
  // (refcount > 1) is replaced by a fresh one and {old, new} appended to *copies (storage copies
  // the rows before anything is written); a cached block held by seq alone loses its cache entry
  // (eviction hook). Returns false, changing nothing, when the free queue holds fewer blocks than
  // the shared ones in the range. 0 <= first <= last <= table size.
  [[nodiscard]] bool make_writable(SeqId seq, int64_t first, int64_t last,
                                   std::vector<BlockCopy>* copies);
  bool can_make_writable(SeqId seq, int64_t first, int64_t last) const;  // would it succeed

  // Appends already-filled blocks (a prefix-cache hit) to a sequence whose length is a multiple
  // of block_size: refcount++ each (a cached-free block leaves the free queue), length +=
  // ids.size() * block_size. Each block must be cached or in use (a plain free block holds
  // garbage). Leading kNoBlock entries are holes (a window group's hit starts at its window), on
  // a table that has no block yet, and never last. Never fails for lack of blocks.
  void append_shared(SeqId seq, std::span<const BlockId> ids);

  // New sequence dst sharing every block of src (refcount++); the first write into a shared
  // block copies it (append). Throws if src is unknown or dst exists.
  void fork(SeqId src, SeqId dst);

  // Releases the first n_front blocks of seq's table, which a sliding window no longer reads:
  // their entries become kNoBlock (holes, always at the front; the table keeps its length, so
  // position p is still entry p / block_size). Holes stay holes; 0 <= n_front <= table size - 1
  // (the last block is never released: the next token is written there or after it).
  void release_front(SeqId seq, int64_t n_front);

  // Gives seq a new table for n_tokens positions: holes before entry `first`, fresh blocks from
  // there to ceil(n_tokens / block_size) (their rows are garbage: the caller writes the ones it
  // reads). Its old blocks are released first, so what it held counts as free (a window group's
  // eviction: its kept rows are gathered, the sequence renewed, the rows written back). Returns
  // false, changing nothing, when fewer blocks would be free than it needs. 0 <= first, and
  // first < ceil(n_tokens / block_size) unless n_tokens is 0 (the last block is never a hole).
  [[nodiscard]] bool renew(SeqId seq, int64_t n_tokens, int64_t first);
  bool can_renew(SeqId seq, int64_t n_tokens, int64_t first) const;  // would it succeed

  // Keeps positions [0, n_tokens) and releases the blocks past ceil(n_tokens / block_size).
  // 0 <= n_tokens <= seq_tokens(seq).
  void truncate(SeqId seq, int64_t n_tokens);

  // Releases every block of seq (refcount--) and forgets the sequence.
  void free_seq(SeqId seq);

  // ---- prefix-cache support ---------------------------------------------------------------------
  // The index registered block id's contents; it keeps them while its refcount is 0. The block
  // must be in use and not already cached.
  void mark_cached(BlockId id);
  // Clears the flag of a cached block whose index entry went away elsewhere (no eviction hook);
  // a cached-free block becomes a plain free one.
  void forget_cached(BlockId id);
  bool is_cached(BlockId id) const;
  int32_t ref_count(BlockId id) const;

  // Full O(n_blocks + table entries) verification of every invariant; aborts on a violation.
  void check_invariants() const;

 private:
  struct BlockMeta {
    int32_t ref_count = 0;    // block-table entries naming this block
    bool cached = false;      // contents registered in a prefix index (immutable while cached)
    bool queued = false;      // in the free queue (== ref_count == 0)
    BlockId prev = kNoBlock;  // free-queue links
    BlockId next = kNoBlock;
  };
  struct Seq {
    std::vector<BlockId> table;  // [ceil(n_tokens / block_size)]
    int64_t n_tokens = 0;
  };

  Seq& seq_or_fail(SeqId seq);
  const Seq& seq_or_fail(SeqId seq) const;
  const BlockMeta& block_or_fail(BlockId id) const;
  int64_t blocks_for(int64_t n_tokens) const { return kv_blocks_for(n_tokens, block_size_); }

  // Free queue: intrusive doubly linked list over blocks_, O(1) everywhere.
  void queue_push_front(BlockId id);
  void queue_push_back(BlockId id);
  void queue_remove(BlockId id);
  BlockId take_fresh();      // pops the head; evicts its cached contents; refcount = 1
  void acquire(BlockId id);  // refcount++, leaving the free queue if it was 0
  void release(BlockId id);  // refcount--, entering the free queue at 0
  void release_tail(Seq& s, size_t n_keep);  // releases table[n_keep..] last first
  void uncache(BlockId id);                  // eviction hook + clear the flag
  // Makes the table entry `id` writable by its sequence: a shared block is replaced by a fresh
  // one ({old, new} into *copies), a cached one held alone is uncached.
  void own(BlockId& id, std::vector<BlockCopy>* copies);
  void after_op() const;

  int32_t block_size_;
  bool audit_;
  std::vector<BlockMeta> blocks_;  // [n_blocks]
  BlockId head_ = kNoBlock, tail_ = kNoBlock;
  int32_t n_queued_ = 0;  // == n_free
  int32_t n_cached_ = 0;
  int32_t n_cached_free_ = 0;
  int64_t n_evicted_ = 0;
  std::unordered_map<SeqId, Seq> seqs_;
  EvictHook evict_hook_;
};

}  // namespace kvlm
