#include "kv/paged_kv.h"

#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "base/error.h"
#include "kv/kv_quant.h"

namespace kvlm {

size_t PagedKvStore::block_bytes(const KvShape& shape, int32_t block_size) {
  if (block_size <= 0) fail("KV block size must be positive, got {}", block_size);
  return kv_bytes(shape, block_size);
}

int64_t PagedKvStore::blocks_for_budget(const KvShape& shape, int32_t block_size,
                                        uint64_t budget_bytes) {
  validate(shape);
  const uint64_t per = block_bytes(shape, block_size);
  const uint64_t n = budget_bytes / per;
  return n > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())
             ? std::numeric_limits<int32_t>::max()
             : static_cast<int64_t>(n);
}

PagedKvStore::PagedKvStore(const KvShape& shape, int32_t n_blocks, int32_t block_size)
    : shape_(shape), n_blocks_(n_blocks), block_size_(block_size) {
  validate(shape);
  if (shape.kivi()) fail("the paged KV cache does not support the KIVI layout (--kv-residual)");
  if (n_blocks <= 0) fail("a paged KV cache needs at least one block, got {}", n_blocks);
  // kv_bytes checks the multiplication for overflow before anything is allocated.
  const int64_t rows = int64_t{n_blocks} * block_size;
  kv_bytes(shape, rows);
  (void)block_bytes(shape, block_size);
  k_row_bytes_ = kv_k_row_bytes(shape);
  v_row_bytes_ = kv_v_row_bytes(shape);
  k_.reserve(shape.n_layer);
  v_.reserve(shape.n_layer);
  for (int32_t il = 0; il < shape.n_layer; ++il) {
    k_.emplace_back(k_row_bytes_ * static_cast<size_t>(rows));
    v_.emplace_back(v_row_bytes_ * static_cast<size_t>(rows));
  }
}

size_t PagedKvStore::bytes() const {
  size_t n = 0;
  for (int32_t il = 0; il < shape_.n_layer; ++il) n += k_[il].size() + v_[il].size();
  return n;
}

void PagedKvStore::write(int32_t il, std::span<const BlockId> table, int64_t pos, int64_t n,
                         const float* k, const float* v) {
  KVLM_CHECK(il >= 0 && il < shape_.n_layer && pos >= 0 && n >= 0 &&
             pos + n <= static_cast<int64_t>(table.size()) * block_size_);
  const int64_t d = shape_.kv_dim();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = pos + i;
    const BlockId b = table[p / block_size_];
    KVLM_CHECK(b >= 0 && b < n_blocks_);
    kv_quantize_row(shape_.dtype_k, k + i * d, row_k(il, b, p % block_size_), d);
    kv_quantize_row(shape_.dtype_v, v + i * d, row_v(il, b, p % block_size_), d);
  }
}

void PagedKvStore::copy_block(BlockId src, BlockId dst) {
  KVLM_CHECK(src >= 0 && src < n_blocks_ && dst >= 0 && dst < n_blocks_);
  if (src == dst) return;
  for (int32_t il = 0; il < shape_.n_layer; ++il) {
    std::memcpy(row_k(il, dst, 0), row_k(il, src, 0), k_row_bytes_ * block_size_);
    std::memcpy(row_v(il, dst, 0), row_v(il, src, 0), v_row_bytes_ * block_size_);
  }
}

void PagedKvStore::shift_out(std::span<const BlockId> table, int64_t n_tokens, int64_t begin,
                             int64_t count, const KvRope& rope) {
  KVLM_CHECK(begin >= 0 && count >= 0 && begin + count <= n_tokens &&
             n_tokens <= static_cast<int64_t>(table.size()) * block_size_);
  if (count == 0) return;
  for (BlockId b : table) KVLM_CHECK(b >= 0 && b < n_blocks_);
  const int64_t n_after = n_tokens - count;
  std::vector<float> row(static_cast<size_t>(shape_.kv_dim()));  // [kv_dim] per shift, not per row
  auto at = [&](int64_t p) { return std::pair{table[p / block_size_], p % block_size_}; };
  for (int32_t il = 0; il < shape_.n_layer; ++il) {
    // Ascending positions: a row is read (at p + count) before anything writes it (count > 0).
    for (int64_t p = begin; p < n_after; ++p) {
      const auto [bs, rs] = at(p + count);
      const auto [bd, rd] = at(p);
      std::memcpy(row_k(il, bd, rd), row_k(il, bs, rs), k_row_bytes_);
      std::memcpy(row_v(il, bd, rd), row_v(il, bs, rs), v_row_bytes_);
      kv_rerotate_k_row(shape_, rope, -count, row_k(il, bd, rd), row.data());
    }
  }
}

KvLayerView PagedKvStore::view(int32_t il, std::span<const BlockId> table, int64_t n_tokens) const {
  KVLM_CHECK(il >= 0 && il < shape_.n_layer && n_tokens >= 0 &&
             n_tokens <= static_cast<int64_t>(table.size()) * block_size_);
  KvLayerView out = plain_layer_view(shape_, k_[il].data(), v_[il].data(), n_tokens);
  out.blocks = table.data();
  out.block_size = block_size_;
  return out;
}

}  // namespace kvlm
