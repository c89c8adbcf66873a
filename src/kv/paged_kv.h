// Paged KV storage: the bytes of a BlockPool's blocks (vLLM's PagedAttention layout). The pool
// (block_pool.h) says which blocks a sequence holds; this class holds what is in them and knows
// nothing of sequences, refcounts or hashes.
//
// Layout, per layer il (plain layouts: f32, f16, bf16, q8_0, q4_0, q4_1 rows; KIVI below):
//   k[il]: [n_blocks * block_size, kv_dim] of dtype_k   block b holds rows [b * bs, (b + 1) * bs)
//   v[il]: [n_blocks * block_size, kv_dim] of dtype_v
// Position p of a sequence with block table T lives in block T[p / bs], slot p % bs, K after RoPE
// for position p (as in the contiguous cache). Inside a block the bytes are head-major:
//   block b of k[il]: [n_kv_head, bs, head_dim] of dtype_k (head g of slot r at (g * bs + r) x
//                     the head's bytes; the block's bs x k_row_bytes bytes, as token-major rows
//                     would take), the same for v
// so attention, which reads one KV head of a run of positions at a time, reads one contiguous run
// of bs x 128 B per block (SmolLM2 f16) instead of 128 B out of every 384 B row (docs/KV.md,
// "Paged block layout"). A head's bytes are exactly what a token-major row stores for the same
// K/V (a cache type's blocks never straddle heads), so attention over any block table gives the
// same numbers as over one block of every position (a contiguous cache).
//
// KIVI layout (shape.kivi(), block_size a multiple of kivi_group): token-major rows (a K group
// spans all heads of its positions); the arenas hold the sealed bytes at the sealed density
// (kv_k_row_bytes = a K group's bytes / group), so block b holds the K groups of its positions
// at rows [b * bs, (b + 1) * bs) (group of position g0 at row(g0)) and the sealed V rows as above
// (KiviSealed, kv_kivi.h). Each running sequence also owns one of
// n_slots f16 residual slots, outside the blocks:
//   rk[il], rv[il]: [n_slots, kv_kivi_residual_cap(R + G - 1), kv_dim] f16  (row r of slot s =
//                   position n_sealed + r of the sequence holding s)
// A pass writes a layer in two steps around its attention: kivi_write seals the groups the pass
// completes into the blocks, kivi_finish_write moves the residual on.
//
// Accounting: one block takes block_bytes(shape, block_size) in all layers: kv_bytes(shape,
// block_size) for plain rows (kv_shape.h, the one place that says how many bytes a cache takes),
// the sealed density x block_size for KIVI; the arenas total n_blocks times that, plus the
// residual slots (residual_slot_bytes each).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "base/aligned.h"
#include "kv/block_pool.h"
#include "kv/kv_cache.h"
#include "kv/kv_shape.h"

namespace kvlm {

// One sequence's cache in a store, as a forward pass reads and writes it (the KV manager hands it
// out: KvManager::seq_cache).
struct KvSeqCache {
  std::span<const BlockId> blocks;  // [ceil(n_tokens / block_size)] the sequence's block table
  int32_t kivi_slot = -1;           // KIVI: the sequence's residual slot
  int64_t n_sealed = 0;             // KIVI: positions [0, n_sealed) sealed before this pass
};

// ---- one sequence's cache (Session) ------------------------------------------------------------
// A single sequence (kvlm generate, chat, perplexity) holds its cache in blocks too: the allocator
// (KvManager, sized by Session) and the planner (kv_plan.h) both size it with these, so they agree.
inline constexpr int32_t kKvBlockTokens = 16;  // tokens per block (vLLM's default; docs/KV.md)
// Tokens per block of a one-sequence cache: kKvBlockTokens, or one K group for KIVI (a group
// never straddles blocks; every KIVI group is at least 32 tokens).
int32_t kv_seq_block_size(const KvShape& s);
// Blocks a one-sequence cache of n_ctx tokens holds once asked for n_reserved tokens: all of
// ceil(n_ctx / bs) when static; dynamic: kv_alloc_tokens' chunks of kKvChunkTokens, in blocks,
// at least one chunk (a new cache counts as having reserved one token), at most ceil(n_ctx / bs).
int64_t kv_seq_blocks(const KvShape& s, bool dynamic, int64_t n_ctx, int64_t n_reserved);

// Blocks a sequence's sliding-window group holds at most: a pass writing m <= n_batch tokens at p
// reads positions [p - window + 1, p + m), which span at most ceil((window - 1 + n_batch) / bs) + 1
// blocks; never more than a full cache of n_ctx.
int64_t kv_window_blocks(int64_t window, int64_t n_batch, int64_t n_ctx, int32_t block_size);
// Blocks a window group shared by n_parallel sequences holds at most when each gives back what
// its window no longer reads after every pass (KvManagerConfig::release_on_commit) and one step
// feeds at most n_batch tokens in all: an idle sequence at length n holds blocks
// [floor((n - W + 1) / bs), ceil(n / bs)), at most ceil((W - 1) / bs) + 1; one fed c tokens in
// this step at most ceil((W - 1) / bs) + 1 + ceil(c / bs) < ceil((W - 1) / bs) + 2 + c / bs; the
// c sum to n_batch. So n_parallel x (ceil((W - 1) / bs) + 2) + ceil(n_batch / bs), never more
// than n_parallel x kv_window_blocks (what holding every pass's blocks until the next would need).
int64_t kv_window_pool_blocks(int64_t window, int64_t n_parallel, int64_t n_batch, int64_t n_ctx,
                              int32_t block_size);

// Layer windows from a model's metadata: every layer windowed (pattern 0), or every layer but
// each pattern-th (layer il windowed iff il % pattern < pattern - 1, llama.cpp's reading;
// Gemma 3: 6). window 0: every layer full. [n_layer]. Throws for pattern < 0 or > n_layer.
std::vector<int32_t> kv_layer_windows(int32_t n_layer, int32_t window, int32_t pattern);

// One sequence's cache groups (per-layer cache groups, the allocator's and the planner's
// arithmetic): full attention first (kv_seq_blocks, growing when dynamic), then one group per
// distinct window, static at kv_window_blocks. layer_window empty or all 0: one full group.
struct KvSeqGroup {
  int32_t window = 0;      // 0: full attention
  int32_t n_layers = 0;
  int64_t n_blocks = 0;    // at start
  int64_t max_blocks = 0;  // when full
};
struct KvSeqGroups {
  std::vector<KvSeqGroup> groups;   // [n_groups]
  std::vector<int32_t> layer_group;  // [n_layer]; empty with one group
};
KvSeqGroups kv_seq_groups(const KvShape& s, int64_t n_ctx, bool dynamic,
                          std::span<const int32_t> layer_window, int64_t n_batch);

class PagedKvStore {
 public:
  // Throws kvlm::Error for an invalid shape, n_blocks <= 0, block_size <= 0, a size that
  // overflows; KIVI: a block size that is not a multiple of the group, or n_slots <= 0.
  PagedKvStore(const KvShape& shape, int32_t n_blocks, int32_t block_size, int32_t n_slots = 0);
  // Layer groups (per-layer cache groups: a sliding-window group's blocks are released while a
  // full group keeps them): layer il's blocks are ids of group layer_group[il]'s own pool, which
  // has group_blocks[g] blocks; a sequence has one block table per group. KIVI: n_slots residual
  // slots of every layer, as above (a window group's sealed groups live in its own blocks).
  //   layer_group: [n_layer] in [0, n_groups)    group_blocks: [n_groups] > 0
  PagedKvStore(const KvShape& shape, int32_t block_size, std::vector<int32_t> layer_group,
               std::vector<int32_t> group_blocks, int32_t n_slots = 0);

  // Blocks of block_size tokens that fit in budget_bytes after n_slots residual slots (KIVI)
  // (0 if not even one).
  static int64_t blocks_for_budget(const KvShape& shape, int32_t block_size, uint64_t budget_bytes,
                                   int32_t n_slots = 0);
  // One block in all layers, K and V (see Accounting).
  static size_t block_bytes(const KvShape& shape, int32_t block_size);
  // One sequence's f16 residual in all layers, K and V (KIVI; 0 for plain rows).
  static size_t residual_slot_bytes(const KvShape& shape);

  const KvShape& shape() const { return shape_; }
  int32_t n_blocks(int32_t group = 0) const { return group_blocks_[group]; }
  int32_t n_groups() const { return static_cast<int32_t>(group_blocks_.size()); }
  int32_t layer_group(int32_t il) const { return layer_group_[il]; }
  int32_t block_size() const { return block_size_; }
  int32_t n_slots() const { return n_slots_; }
  size_t bytes() const;  // summed from the arenas: n_blocks x block_bytes + the residual slots

  // Stores K and V rows of positions [pos, pos + n) of a sequence with block table `table`
  // (covering at least pos + n positions), converting from f32.    k, v: [n, kv_dim] f32
  void write(int32_t il, std::span<const BlockId> table, int64_t pos, int64_t n, const float* k,
             const float* v);
  // Evicts positions [begin, begin + count) of a sequence holding n_tokens positions through
  // `table` (the sliding window with sinks, context shift; KvManager::evict):
  // the rows of positions [begin + count, n_tokens) move to [begin, n_tokens - count), K
  // re-rotated by -count positions (kv_rerotate_k_row), in every layer. Positions past
  // n_tokens - count keep stale rows; the caller then truncates the table. The blocks written,
  // [begin / bs, ceil((n_tokens - count) / bs)), must be this sequence's alone
  // (BlockPool::make_writable).
  void shift_out(std::span<const BlockId> table, int64_t n_tokens, int64_t begin, int64_t count,
                 const KvRope& rope, int32_t group = 0);
  // Copies block src's rows to dst in every layer of the group (the pool's copy-on-write).
  void copy_block(BlockId src, BlockId dst, int32_t group = 0);
  // Grows the group's arenas to n_blocks (>= n_blocks(group)), keeping every block's bytes: a
  // dynamic cache (KvManagerConfig::max_blocks).
  void grow(int32_t n_blocks, int32_t group = 0);
  // Plain layouts: the stored bytes of positions [pos, pos + n) of layer il as token-major rows
  // (k_rows: [n, kv_k_row_bytes], v_rows: [n, kv_v_row_bytes]; a row is its heads in order), and
  // back. Session files save and load these: the bytes the cache holds, no conversion.
  void read_rows(int32_t il, std::span<const BlockId> table, int64_t pos, int64_t n,
                 std::byte* k_rows, std::byte* v_rows) const;
  void write_rows(int32_t il, std::span<const BlockId> table, int64_t pos, int64_t n,
                  const std::byte* k_rows, const std::byte* v_rows);
  // What attention reads for layer il of a sequence: positions [0, n_tokens) through `table`.
  // The view points at `table`, which must outlive it. KIVI: also the sequence's residual slot and
  // n_sealed, the positions sealed before this pass (those after are kv_kivi_sealed's).
  KvLayerView view(int32_t il, std::span<const BlockId> table, int64_t n_tokens, int32_t slot = -1,
                   int64_t n_sealed = 0) const;

  // KIVI's write pass (see the layout above) for a sequence holding positions [0, pos) with
  // n_sealed of them sealed, residual in `slot`, writing [pos, pos + n):
  //   k, v: [n, kv_dim] f32 (kept unchanged until kivi_finish_write)
  void kivi_write(int32_t il, std::span<const BlockId> table, int32_t slot, int64_t n_sealed,
                  int64_t pos, int64_t n, const float* k, const float* v);
  void kivi_finish_write(int32_t il, int32_t slot, int64_t n_sealed, int64_t pos, int64_t n,
                         const float* k, const float* v);

 private:
  // The constructors' KIVI part: checks the block size and slots, then sizes the slots' arenas.
  void check_kivi(int32_t n_slots);
  void allocate_slots(int32_t n_slots);
  // Sizes the arenas: layer il holds group_blocks[layer_group[il]] blocks.
  void allocate(std::vector<int32_t> layer_group, std::vector<int32_t> group_blocks);
  // Block b's first byte (any layout; KIVI's sealing addresses its rows through KiviSealed).
  std::byte* block_k(int32_t il, BlockId b) {
    return k_[il].data() + int64_t{b} * block_size_ * k_row_bytes_;
  }
  std::byte* block_v(int32_t il, BlockId b) {
    return v_[il].data() + int64_t{b} * block_size_ * v_row_bytes_;
  }
  // Head g of position p of a sequence with block table `table` (plain layouts: head-major).
  std::byte* head_k(int32_t il, std::span<const BlockId> table, int64_t p, int64_t g) {
    return k_[il].data() + kv_head_major_offset(table.data(), block_size_, p, g, k_row_bytes_,
                                                shape_.n_kv_head);
  }
  std::byte* head_v(int32_t il, std::span<const BlockId> table, int64_t p, int64_t g) {
    return v_[il].data() + kv_head_major_offset(table.data(), block_size_, p, g, v_row_bytes_,
                                                shape_.n_kv_head);
  }

  uint16_t* resid(const std::vector<AlignedBuffer>& r, int32_t il, int32_t slot) const {
    return const_cast<uint16_t*>(r[il].as<uint16_t>()) + int64_t{slot} * resid_cap_ * shape_.kv_dim();
  }

  KvShape shape_;
  int32_t block_size_ = 0, n_slots_ = 0;
  std::vector<int32_t> layer_group_;   // [n_layer] the group whose block ids layer il's arenas use
  std::vector<int32_t> group_blocks_;  // [n_groups] blocks of each group's arenas
  int64_t resid_cap_ = 0;  // KIVI: rows per residual slot, kivi_residual + kivi_group - 1
  size_t k_row_bytes_ = 0, v_row_bytes_ = 0;
  std::vector<AlignedBuffer> k_;  // [n_layer] arenas of [n_blocks(group) * block_size, kv_dim]
  std::vector<AlignedBuffer> v_;  // [n_layer] ... dtype_k, dtype_v
  std::vector<AlignedBuffer> rk_;  // KIVI: [n_layer] arenas of [n_slots, resid_cap, kv_dim] f16
  std::vector<AlignedBuffer> rv_;
  std::vector<float> group_f32_;   // KIVI: [group, kv_dim] one group gathered for sealing
};

}  // namespace kvlm
