// The KV manager: the one owner of a paged KV cache. It holds the block pool (which blocks each
// sequence has, refcounts, the free queue), the prefix index (which blocks hold which tokens; the
// pool's eviction hook is wired to it here), the block storage (the K/V bytes) and every
// sequence's cache state (how many of its full blocks are registered, whether eviction moved its
// rows, its KIVI residual slot and sealed count). Nothing outside it touches the pool, the index
// and the store together. vLLM v1's KVCacheManager and llama.cpp's llama_memory_i are the models.
//
// A sequence's life (docs/KV.md, "The KV manager"):
//   lookup(tokens, salt)            what the prefix index already holds (read-only)
//   admit(seq, tokens, salt, ...)   takes the hit's blocks, copies a partial hit; or refuses
//   fork(src, dst)                  dst shares src's blocks (n choices of one prompt)
//   reserve(seq, n)                 room for n new positions (copy-on-write applied here)
//   evict(seq, begin, count)        the window / context shift: rows move down, K re-rotated
//   [forward pass: the model writes and reads through store() and seq_kv(seq)]
//   commit(seq, tokens, n)          positions [0, n) are computed: KIVI seals, full blocks are
//                                   registered in the prefix index
//   release(seq, tokens, keep)      blocks back to the pool; keep: a partly filled last block
//                                   stays as a prefix leaf
// Per-layer cache groups (KvManagerConfig::layer_window): layers with the same sliding window
// share a group with its own block pool and one block table per sequence (vLLM's hybrid
// allocator). A window group releases the blocks its window no longer sees as the sequence grows
// (reserve), so its memory stays bounded; a full group keeps every block. The store holds each
// layer's blocks in its group's id space (PagedKvStore's layer groups).
// Running out of blocks is not an error (admit/reserve/evict return false and change nothing, so
// a scheduler can preempt and try again); bad arguments throw kvlm::Error.
//
// Not thread-safe: one thread (the scheduler's, or a benchmark's) owns a manager.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "kv/block_pool.h"
#include "kv/kv_cache.h"
#include "kv/kv_shape.h"
#include "kv/paged_kv.h"
#include "prefix/prefix_cache.h"

namespace kvlm {

// One cache group: the sliding window of its layers (0: full attention) and its pool's blocks.
struct KvGroupSpec {
  int32_t window = 0;
  int32_t n_blocks = 0;    // > 0
  int32_t max_blocks = 0;  // > n_blocks: grows like a dynamic cache (0: n_blocks, fixed)
  // A window group: the most blocks one sequence holds at once (kv_window_blocks), what admit()
  // asks to be free. 0: the pool's size (one sequence's cache).
  int32_t seq_blocks = 0;
};

struct KvManagerConfig {
  KvShape shape;             // validated by the constructor
  int32_t block_size = 16;   // tokens per block (KIVI: a multiple of shape.kivi_group)
  int32_t n_blocks = 0;      // > 0 (blocks_for_budget sizes it from bytes)
  // > n_blocks: a dynamic cache. reserve() grows the pool and the store by kKvChunkTokens of
  // blocks at a time (kv_seq_blocks' arithmetic) up to max_blocks. Not with the prefix cache.
  // 0: n_blocks, fixed.
  int32_t max_blocks = 0;
  int32_t n_slots = 0;       // KIVI: f16 residual slots, one per sequence held at once (> 0)
  bool prefix_cache = true;  // register and reuse blocks (not with KIVI)
  bool audit = false;        // re-verify the pool and the index after every operation (tests)
  // false: bookkeeping only (planning tests without a model): the store behind the blocks is a
  // token one and nothing is copied or moved in it; store() must not be used.
  bool bytes = true;
  KvRope rope{};             // how K was rotated, so evict() can re-rotate moved rows
  // Per-layer cache groups: [n_layer] the group of each layer and [n_groups] the groups. Empty:
  // one full group of every layer with n_blocks / max_blocks above. With KIVI every group seals
  // its held blocks alike and the residual slot holds every layer's newest tokens; a window
  // group's released blocks are never sealed (docs/KV.md, "KIVI with window groups").
  std::vector<int32_t> layer_group{};
  std::vector<KvGroupSpec> groups{};
  // Window groups also give back what their window no longer reads when a pass is committed, not
  // only before the next one: an idle sequence then holds at most its window's blocks, which is
  // what kv_window_pool_blocks sizes a shared pool for. Off for one sequence (Session): its pool
  // holds a whole pass anyway, and keeping the last pass's blocks lets a chat truncate a few
  // tokens back without recomputing.
  bool release_on_commit = false;
};

// What the prefix index holds for a prompt (lookup): full blocks, then maybe a partial block.
struct KvHit {
  PrefixMatch full;
  PrefixPartial partial;
  int64_t n_tokens() const { return full.n_tokens + partial.n_tokens; }
};

// The manager of one sequence's cache (Session: kvlm generate, chat, perplexity): blocks of
// kv_seq_block_size, ceil(n_ctx / block) of them allocated at once (static) or grown in chunks up
// to that (dynamic), the arithmetic the planner uses (kv_plan.h), a KIVI residual slot, no prefix
// index (one sequence has nothing to share). Throws kvlm::Error for a bad shape, n_ctx <= 0 or a
// size that overflows.
// layer_window ([n_layer], empty: all full) gives a window group per distinct window, sized for
// passes of at most n_batch tokens (kv_seq_groups, paged_kv.h: the planner's arithmetic too).
KvManagerConfig kv_seq_config(const KvShape& shape, int64_t n_ctx, KvAlloc alloc,
                              const KvRope& rope, std::span<const int32_t> layer_window = {},
                              int64_t n_batch = 512);

// The manager of many sequences (kvlm serve, bench -np): at most n_parallel sequences of at most
// n_ctx positions each, fed at most n_batch tokens per step (all sequences together).
// Full-attention layers share one pool of full_blocks blocks (the budget); each distinct window
// of layer_window ([n_layer], empty: all full) gets a group of kv_window_pool_blocks blocks
// (release_on_commit on), so a window never runs short before the full pool does and the budget
// decides admission and preemption alone. KIVI: n_slots residual slots of every layer.
struct KvPoolSpec {
  KvShape shape;
  int32_t block_size = 16;
  int64_t n_parallel = 1;
  int64_t n_batch = 512;
  int64_t n_ctx = 4096;
  std::span<const int32_t> layer_window{};
};
// Blocks the window groups of spec take, in bytes (0 without windows), and the bytes of one
// full-group block (the layers of full attention only).
uint64_t kv_window_groups_bytes(const KvPoolSpec& spec);
uint64_t kv_full_block_bytes(const KvPoolSpec& spec);
KvManagerConfig kv_pool_config(const KvPoolSpec& spec, int64_t full_blocks, int32_t n_slots,
                               bool prefix_cache, const KvRope& rope);


struct KvGroupStats {
  int32_t window = 0;        // 0: full attention
  int32_t n_layers = 0;
  BlockPoolStats blocks;
  uint64_t bytes_total = 0;  // its layers' arenas
  uint64_t bytes_used = 0;   // its blocks in use
};

struct KvManagerStats {
  BlockPoolStats blocks;     // every group's blocks together
  int32_t block_size = 0;
  uint64_t bytes_total = 0;  // the store's arenas (blocks and KIVI slots)
  uint64_t bytes_used = 0;   // blocks in use x bytes per block, plus the KIVI slots held
  int64_t n_seqs = 0;
  int64_t n_evicted_tokens = 0;  // positions dropped by evict(), since construction
  std::vector<KvGroupStats> groups;  // [n_groups]
};

class KvManager {
 public:
  // Throws kvlm::Error for an invalid shape, n_blocks or block_size <= 0, KIVI with the prefix
  // cache, a KIVI block size that is not a multiple of its group, or KIVI without slots.
  explicit KvManager(const KvManagerConfig& config);
  ~KvManager();
  KvManager(const KvManager&) = delete;
  KvManager& operator=(const KvManager&) = delete;

  // Blocks of block_size tokens that fit budget_bytes after n_slots KIVI residual slots (0: none).
  static int64_t blocks_for_budget(const KvShape& shape, int32_t block_size, uint64_t budget_bytes,
                                   int32_t n_slots);

  const KvShape& shape() const { return shape_; }
  int32_t block_size() const { return block_size_; }
  int32_t n_groups() const { return static_cast<int32_t>(groups_.size()); }
  int32_t n_blocks(int32_t group = 0) const { return groups_[group].pool->n_blocks(); }
  // Tokens a sequence can hold: the smallest full group's blocks (a window group holds any
  // number of positions); the largest int64 when every group is windowed.
  int64_t capacity_tokens() const;
  bool prefix_cache() const { return prefix_ != nullptr; }
  KvManagerStats stats() const;
  // Group g's pool, read-only: every block's refcount and cached flag and each sequence's table
  // in that group (the KV view of `kvlm serve`, engine/kv_view.h).
  const BlockPool& pool(int32_t g) const { return *groups_[static_cast<size_t>(g)].pool; }

  // ---- a sequence's life ------------------------------------------------------------------------
  // What the prefix index holds of tokens under salt: never all of them (the last token is always
  // recomputed: its logits give the next token). Empty when the prefix cache is off.
  KvHit lookup(std::span<const int32_t> tokens, std::string_view salt) const;
  // Adds sequence seq holding the hit's tokens (hit from lookup() of the same tokens and salt, with
  // nothing admitted or released since): the full blocks are shared, a partial hit is copied into
  // a fresh block of its own. Room for n_held tokens in all must be free, else returns false and
  // changes nothing. Throws if seq exists.
  [[nodiscard]] bool admit(SeqId seq, std::span<const int32_t> tokens, std::string_view salt,
                           int64_t n_held, const KvHit& hit);
  bool has_seq(SeqId seq) const { return seqs_.count(seq) != 0; }
  // New sequence dst holding what src holds (n > 1 choices of one prompt: the prompt is computed
  // once): every group's block table is shared (refcounts raised, holes kept), so a full block
  // stays shared while neither writes into it, and the first write into the shared, partly filled
  // last block copies it (reserve: copy-on-write). dst continues src's prefix chain (its
  // registered blocks and salt) and eviction state. Needs no free block, so it never fails for
  // lack of them. Throws if src is unknown, dst exists, or the cache is KIVI (its f16 residual
  // is not in blocks, and a sealed block would be written by both).
  void fork(SeqId src, SeqId dst);
  int64_t seq_tokens(SeqId seq) const { return pool0().seq_tokens(seq); }  // positions held
  // True once evict() moved its rows: they are no longer a fresh computation of its tokens, so
  // none of its blocks are registered any more.
  bool evicted(SeqId seq) const;
  // The positions evict() dropped from seq, counted in the sequence's own positions (as it had
  // them before any eviction): [begin, begin + count), one range when every eviction starts at
  // the same position (the window's sinks, --keep), as the eviction policies do. {-1, 0}: none.
  struct Dropped {
    int64_t begin = -1;
    int64_t count = 0;
  };
  Dropped dropped(SeqId seq) const;

  // Room for n more positions at the end (copy-on-write of a shared last block applied; a dynamic
  // cache grows first if it must). False, changing nothing, when a pool is short (window groups
  // have then still given back the blocks no query from the current position on reads).
  [[nodiscard]] bool reserve(SeqId seq, int64_t n);
  // Drops positions [begin, begin + count) of the seq_tokens(seq) held: later rows move down by
  // count, K re-rotated with each layer's base (PagedKvStore::shift_out); the blocks written are
  // made seq's own first. A window group keeps only what its window reads after the shift (its
  // blocks renewed: BlockPool::renew). False, changing nothing, when a pool is short of blocks
  // for that. Throws, changing nothing, when a window would read kept positions (< begin) its
  // group already released (Eviction::reach keeps the policies clear of that). Not with KIVI.
  [[nodiscard]] bool evict(SeqId seq, int64_t begin, int64_t count);
  // Positions [0, n_computed) of seq hold the K/V of tokens[0, n_computed) (after a forward pass):
  // KIVI seals the groups that left the residual; full blocks not yet known to the prefix index
  // are registered (unless evicted).
  void commit(SeqId seq, std::span<const int32_t> tokens, int64_t n_computed);
  // Whether truncate(seq, n) can keep going from n: KIVI keeps sealed tokens sealed, and a window
  // group must still hold the blocks position n's window reads.
  bool can_truncate(SeqId seq, int64_t n) const;
  // Forgets positions [n, seq_tokens(seq)); the blocks past ceil(n / block_size) go back to the
  // pool (registered ones stay cached). Throws unless can_truncate(seq, n).
  void truncate(SeqId seq, int64_t n);
  // Returns seq's blocks to the pool and forgets it. keep_partial: the partly filled last block of
  // the n_computed tokens[0, n_computed) becomes a prefix leaf, so a prompt continuing them (a
  // chat's next turn) reuses it.
  void release(SeqId seq, std::span<const int32_t> tokens, int64_t n_computed, bool keep_partial);

  // ---- a forward pass ---------------------------------------------------------------------------
  PagedKvStore& store() { return store_; }
  const PagedKvStore& store() const { return store_; }
  // Group 0's cache of seq; seq_caches: every group's, [n_groups], valid until the next call of
  // either for seq or the next operation on seq (what BatchSeq::kv takes).
  KvSeqCache seq_cache(SeqId seq) const;
  std::span<const KvSeqCache> seq_caches(SeqId seq) const;

  // Full verification of the pool's and the index's invariants; aborts on a violation.
  void check_invariants() const;

 private:
  struct SeqState {
    std::string salt;          // prefix-cache tenant
    int64_t n_registered = 0;  // leading full blocks known to the prefix index
    // [n_registered] the registered block holding each of them: its own, the hit's, or the
    // block an equal one computed earlier was registered in (its chain continues from there).
    // -1: none (the chain ended, nothing after it registers). canon_gen: its registration
    // (PrefixCache::generation): a block of another sequence may be evicted and registered again
    // with other tokens, and is then no parent of this sequence's next block.
    std::vector<BlockId> canon;
    std::vector<uint64_t> canon_gen;
    bool evicted = false;
    Dropped dropped;  // what evict() dropped (dropped())
    int32_t kivi_slot = -1;
    int64_t n_sealed = 0;
    mutable std::vector<KvSeqCache> caches;  // [n_groups] handed out by seq_caches
  };
  struct Group {
    int32_t window = 0;
    int32_t max_blocks = 0;
    int32_t seq_blocks = 0;  // a window group: the most one sequence holds (admit)
    // With the prefix cache, a window group's cached blocks are twins of group 0's registered
    // ones (same tokens, this group's layers): of_full[group-0 block] = its block, full_of the
    // other way. A hit uses them for the blocks its window reads.
    std::unordered_map<BlockId, BlockId> of_full, full_of;
    int32_t n_layers = 0;
    std::unique_ptr<BlockPool> pool;
  };
  BlockPool& pool0() { return *groups_[0].pool; }
  const BlockPool& pool0() const { return *groups_[0].pool; }
  // Blocks of a window group that no query from position pos on reads.
  int64_t unseen_blocks(const Group& g, int64_t pos) const;
  int64_t blocks_for(int64_t n) const { return kv_blocks_for(n, block_size_); }
  // evict()'s steps: the first row a group keeps, and each kind of group's shift.
  int64_t evict_low(const Group& g, int64_t n_after) const;
  void shift_full(SeqId seq, int32_t gi, int64_t begin, int64_t count);
  void shift_window(SeqId seq, int32_t gi, int64_t begin, int64_t count);
  // Whether every group can take n more positions of seq (growing dynamic groups); then append.
  bool fits(SeqId seq, int64_t n);
  SeqState& state(SeqId seq);
  const SeqState& state(SeqId seq) const;
  PrefixKey key(const SeqState& s) const { return PrefixKey{cache_type_, s.salt}; }
  void copy_blocks(const std::vector<BlockCopy>& copies, int32_t group);
  void register_partial(SeqId seq, const SeqState& s, std::span<const int32_t> tokens,
                        int64_t n_computed);
  // commit()'s steps: full blocks into the prefix index, window blocks no query from pos on reads
  // back to their pools (the last block of each table stays).
  void register_blocks(SeqId seq, SeqState& s, std::span<const int32_t> tokens,
                       int64_t n_computed);
  void release_unseen(SeqId seq, int64_t pos);
  // ---- window groups with the prefix cache ----
  bool windowed_prefix() const { return prefix_ && groups_.size() > 1; }
  // Group g's blocks for a hit of group-0 blocks full_ids: holes before the block position
  // full_ids.size() * block_size's window starts in, then twins; false when a twin is missing.
  bool window_hit(const Group& g, std::span<const BlockId> full_ids,
                  std::vector<BlockId>* ids) const;
  // Makes seq's blocks at table index bi of every window group the twins of the registered
  // group-0 block full (when they are seq's, not holes, and neither side has a twin yet).
  void pair_twins(SeqId seq, int64_t bi, BlockId full);
  void unpair_full(BlockId full);             // group 0's block is evicted from the index
  void unpair_window(Group& g, BlockId blk);  // group g's cached block is handed out again

  KvShape shape_;
  int32_t block_size_;
  bool bytes_;
  std::vector<Group> groups_;            // [n_groups]; group 0 carries the prefix index
  std::unique_ptr<PrefixCache> prefix_;  // null: prefix cache off
  PagedKvStore store_;
  KvRope rope_;
  std::vector<int32_t> layer_group_;  // [n_layer] each layer's group
  bool release_on_commit_ = false;    // KvManagerConfig::release_on_commit
  uint64_t cache_type_ = 0;  // prefix key: hash of the shape, types and block size
  std::unordered_map<SeqId, SeqState> seqs_;
  std::vector<int32_t> free_slots_;  // KIVI residual slots no sequence holds
  int64_t n_evicted_tokens_ = 0;
  std::vector<BlockCopy> copies_;    // reused by reserve / evict
};

}  // namespace kvlm
