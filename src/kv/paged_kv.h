// Paged KV storage: the bytes of a BlockPool's blocks (vLLM's PagedAttention layout). The pool
// (block_pool.h) says which blocks a sequence holds; this class holds what is in them and knows
// nothing of sequences, refcounts or hashes.
//
// Layout, per layer il (plain layouts only: f32, f16, bf16, q8_0, q4_0, q4_1 rows; no KIVI):
//   k[il]: [n_blocks * block_size, kv_dim] of dtype_k   block b holds rows [b * bs, (b + 1) * bs)
//   v[il]: [n_blocks * block_size, kv_dim] of dtype_v
// Position p of a sequence with block table T lives in row T[p / bs] * bs + p % bs, K after RoPE
// for position p (as in the contiguous cache). A row's bytes are exactly what KvCache stores for
// the same K/V, so attention over a block table gives the same numbers as over a contiguous cache.
//
// Accounting: one block takes kv_bytes(shape, block_size) in all layers (kv_shape.h, the one
// place that says how many bytes a cache takes); the arenas total n_blocks times that.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "base/aligned.h"
#include "kv/block_pool.h"
#include "kv/kv_cache.h"
#include "kv/kv_shape.h"

namespace kvlm {

class PagedKvStore {
 public:
  // Throws kvlm::Error for an invalid shape, a KIVI shape, n_blocks <= 0, block_size <= 0, or a
  // size that overflows.
  PagedKvStore(const KvShape& shape, int32_t n_blocks, int32_t block_size);

  // Blocks of block_size tokens that fit in budget_bytes (0 if not even one).
  static int64_t blocks_for_budget(const KvShape& shape, int32_t block_size, uint64_t budget_bytes);
  // kv_bytes(shape, block_size): one block in all layers, K and V.
  static size_t block_bytes(const KvShape& shape, int32_t block_size);

  const KvShape& shape() const { return shape_; }
  int32_t n_blocks() const { return n_blocks_; }
  int32_t block_size() const { return block_size_; }
  size_t bytes() const;  // summed from the arenas: n_blocks x block_bytes

  // Stores K and V rows of positions [pos, pos + n) of a sequence with block table `table`
  // (covering at least pos + n positions), converting from f32.    k, v: [n, kv_dim] f32
  void write(int32_t il, std::span<const BlockId> table, int64_t pos, int64_t n, const float* k,
             const float* v);
  // Evicts positions [begin, begin + count) of a sequence holding n_tokens positions through
  // `table` (the sliding window with sinks, context shift; KvCache::shift_out's paged twin):
  // the rows of positions [begin + count, n_tokens) move to [begin, n_tokens - count), K
  // re-rotated by -count positions (kv_rerotate_k_row), in every layer. Positions past
  // n_tokens - count keep stale rows; the caller then truncates the table. The blocks written,
  // [begin / bs, ceil((n_tokens - count) / bs)), must be this sequence's alone
  // (BlockPool::make_writable). The rows get exactly the bytes KvCache::shift_out gives them.
  void shift_out(std::span<const BlockId> table, int64_t n_tokens, int64_t begin, int64_t count,
                 const KvRope& rope);
  // Copies block src's rows to dst in every layer (the pool's copy-on-write).
  void copy_block(BlockId src, BlockId dst);
  // What attention reads for layer il of a sequence: positions [0, n_tokens) through `table`.
  // The view points at `table`, which must outlive it.
  KvLayerView view(int32_t il, std::span<const BlockId> table, int64_t n_tokens) const;

 private:
  std::byte* row_k(int32_t il, BlockId b, int64_t r) {
    return k_[il].data() + (int64_t{b} * block_size_ + r) * k_row_bytes_;
  }
  std::byte* row_v(int32_t il, BlockId b, int64_t r) {
    return v_[il].data() + (int64_t{b} * block_size_ + r) * v_row_bytes_;
  }

  KvShape shape_;
  int32_t n_blocks_ = 0, block_size_ = 0;
  size_t k_row_bytes_ = 0, v_row_bytes_ = 0;
  std::vector<AlignedBuffer> k_;  // [n_layer] arenas of [n_blocks * block_size, kv_dim] dtype_k
  std::vector<AlignedBuffer> v_;  // [n_layer] arenas of [n_blocks * block_size, kv_dim] dtype_v
};

}  // namespace kvlm
