#include "kv/paged_kv.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "base/error.h"
#include "kv/kv_kivi.h"
#include "kv/kv_quant.h"

namespace kvlm {

int32_t kv_seq_block_size(const KvShape& s) {
  return s.kivi() ? std::max(s.kivi_group, kKvBlockTokens) : kKvBlockTokens;
}


int64_t kv_seq_blocks(const KvShape& s, bool dynamic, int64_t n_ctx, int64_t n_reserved) {
  KVLM_CHECK(n_ctx > 0 && n_reserved >= 0 && n_reserved <= n_ctx);
  const int64_t tokens = kv_alloc_tokens(dynamic, std::max<int64_t>(n_reserved, 1), n_ctx);
  return kv_blocks_for(tokens, kv_seq_block_size(s));
}

int64_t kv_window_blocks(int64_t window, int64_t n_batch, int64_t n_ctx, int32_t block_size) {
  const int64_t bound = kv_blocks_for(window - 1 + n_batch, block_size) + 1;
  return std::min(bound, kv_blocks_for(n_ctx, block_size));
}

int64_t kv_window_pool_blocks(int64_t window, int64_t n_parallel, int64_t n_batch, int64_t n_ctx,
                              int32_t block_size) {
  const int64_t per_seq = kv_window_blocks(window, n_batch, n_ctx, block_size);
  // Each term is at most n_ctx / bs per sequence: no overflow for the int32 contexts accepted.
  const int64_t tight =
      n_parallel * (kv_blocks_for(window - 1, block_size) + 2) + kv_blocks_for(n_batch, block_size);
  return std::min(tight, n_parallel * per_seq);
}

std::vector<int32_t> kv_layer_windows(int32_t n_layer, int32_t window, int32_t pattern) {
  if (pattern < 0 || pattern > n_layer)
    fail("sliding window pattern {} must be in [1, {} layers]", pattern, n_layer);
  std::vector<int32_t> out(static_cast<size_t>(n_layer), 0);
  for (int32_t il = 0; il < n_layer && window > 0; ++il)
    out[static_cast<size_t>(il)] = pattern == 0 || il % pattern < pattern - 1 ? window : 0;
  return out;
}

KvSeqGroups kv_seq_groups(const KvShape& s, int64_t n_ctx, bool dynamic,
                          std::span<const int32_t> layer_window, int64_t n_batch) {
  const int32_t bs = kv_seq_block_size(s);
  const KvSeqGroup full{0, s.n_layer, kv_seq_blocks(s, dynamic, n_ctx, 0),
                        kv_seq_blocks(s, false, n_ctx, n_ctx)};
  KvSeqGroups out;
  if (std::none_of(layer_window.begin(), layer_window.end(), [](int32_t w) { return w > 0; })) {
    out.groups.push_back(full);
    return out;
  }
  KVLM_CHECK(static_cast<int32_t>(layer_window.size()) == s.n_layer);
  std::vector<int32_t> windows(layer_window.begin(), layer_window.end());
  std::sort(windows.begin(), windows.end());
  windows.erase(std::unique(windows.begin(), windows.end()), windows.end());
  for (int32_t w : windows) {
    KvSeqGroup g = full;
    if (w > 0) {
      g.window = w;
      g.n_blocks = g.max_blocks = kv_window_blocks(w, n_batch, n_ctx, bs);
    }
    g.n_layers = static_cast<int32_t>(std::count(layer_window.begin(), layer_window.end(), w));
    out.groups.push_back(g);
  }
  for (int32_t w : layer_window)
    out.layer_group.push_back(
        static_cast<int32_t>(std::find(windows.begin(), windows.end(), w) - windows.begin()));
  return out;
}

size_t PagedKvStore::block_bytes(const KvShape& shape, int32_t block_size) {
  if (block_size <= 0) fail("KV block size must be positive, got {}", block_size);
  if (!shape.kivi()) return kv_bytes(shape, block_size);
  // Sealed density only: the residual lives in the slots.
  uint64_t out = 0;
  if (!checked_mul(kv_bytes_per_token(shape), static_cast<uint64_t>(block_size), &out))
    fail("KV block of {} tokens overflows", block_size);
  return out;
}

namespace {
// Rows of one KIVI residual slot: the most f16 rows a sequence ever holds (kv_kivi_sealed).
int64_t slot_rows(const KvShape& shape) {
  return int64_t{shape.kivi_residual} + shape.kivi_group - 1;
}
}  // namespace

size_t PagedKvStore::residual_slot_bytes(const KvShape& shape) {
  if (!shape.kivi()) return 0;
  // K and V, f16, every layer.
  return static_cast<size_t>(slot_rows(shape)) *
         static_cast<size_t>(shape.kv_dim()) * 2 * sizeof(uint16_t) *
         static_cast<size_t>(shape.n_layer);
}

int64_t PagedKvStore::blocks_for_budget(const KvShape& shape, int32_t block_size,
                                        uint64_t budget_bytes, int32_t n_slots) {
  validate(shape);
  const uint64_t slots = uint64_t(residual_slot_bytes(shape)) * uint64_t(std::max(n_slots, 0));
  if (budget_bytes <= slots) return 0;
  const uint64_t per = block_bytes(shape, block_size);
  const uint64_t n = (budget_bytes - slots) / per;
  return n > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())
             ? std::numeric_limits<int32_t>::max()
             : static_cast<int64_t>(n);
}

PagedKvStore::PagedKvStore(const KvShape& shape, int32_t n_blocks, int32_t block_size,
                           int32_t n_slots)
    : shape_(shape), block_size_(block_size) {
  validate(shape);
  if (n_blocks <= 0) fail("a paged KV cache needs at least one block, got {}", n_blocks);
  check_kivi(n_slots);
  allocate(std::vector<int32_t>(static_cast<size_t>(shape.n_layer), 0), {n_blocks});
  allocate_slots(n_slots);
}

PagedKvStore::PagedKvStore(const KvShape& shape, int32_t block_size,
                           std::vector<int32_t> layer_group, std::vector<int32_t> group_blocks,
                           int32_t n_slots)
    : shape_(shape), block_size_(block_size) {
  validate(shape);
  check_kivi(n_slots);
  KVLM_CHECK(static_cast<int32_t>(layer_group.size()) == shape.n_layer && !group_blocks.empty());
  for (int32_t g : layer_group)
    KVLM_CHECK(g >= 0 && g < static_cast<int32_t>(group_blocks.size()));
  for (int32_t n : group_blocks)
    if (n <= 0) fail("a paged KV cache needs at least one block per layer group, got {}", n);
  allocate(std::move(layer_group), std::move(group_blocks));
  allocate_slots(n_slots);
}

void PagedKvStore::check_kivi(int32_t n_slots) {
  if (block_size_ <= 0) fail("KV block size must be positive, got {}", block_size_);
  if (!shape_.kivi()) return;
  if (block_size_ % shape_.kivi_group != 0)
    fail("the KIVI cache's K groups of {} tokens need a block size that is a multiple of {} "
         "(--block-size), got {}",
         shape_.kivi_group, shape_.kivi_group, block_size_);
  if (n_slots <= 0) fail("a paged KIVI cache needs at least one residual slot, got {}", n_slots);
  n_slots_ = n_slots;
  resid_cap_ = slot_rows(shape_);
}

// KIVI's residual slots: every layer's, whatever its group (the newest tokens of every layer).
void PagedKvStore::allocate_slots(int32_t n_slots) {
  if (!shape_.kivi()) return;
  const size_t slot_bytes = static_cast<size_t>(resid_cap_ * shape_.kv_dim()) * sizeof(uint16_t);
  for (int32_t il = 0; il < shape_.n_layer; ++il) {
    rk_.emplace_back(slot_bytes * static_cast<size_t>(n_slots));
    rv_.emplace_back(slot_bytes * static_cast<size_t>(n_slots));
  }
  group_f32_.resize(static_cast<size_t>(shape_.kivi_group * shape_.kv_dim()));
}

void PagedKvStore::allocate(std::vector<int32_t> layer_group, std::vector<int32_t> group_blocks) {
  layer_group_ = std::move(layer_group);
  group_blocks_ = std::move(group_blocks);
  k_row_bytes_ = kv_k_row_bytes(shape_);
  v_row_bytes_ = kv_v_row_bytes(shape_);
  // block_bytes checks the multiplication for overflow before anything is allocated.
  for (int32_t n : group_blocks_) {
    uint64_t total = 0;
    if (!checked_mul(block_bytes(shape_, block_size_), static_cast<uint64_t>(n), &total))
      fail("a paged KV cache of {} blocks overflows", n);
  }
  k_.reserve(shape_.n_layer);
  v_.reserve(shape_.n_layer);
  for (int32_t il = 0; il < shape_.n_layer; ++il) {
    const auto rows = static_cast<size_t>(int64_t{group_blocks_[layer_group_[il]]} * block_size_);
    k_.emplace_back(k_row_bytes_ * rows);
    v_.emplace_back(v_row_bytes_ * rows);
  }
}

size_t PagedKvStore::bytes() const {
  size_t n = 0;
  for (int32_t il = 0; il < shape_.n_layer; ++il) n += k_[il].size() + v_[il].size();
  for (const auto* r : {&rk_, &rv_})
    for (const AlignedBuffer& b : *r) n += b.size();
  return n;
}

void PagedKvStore::write(int32_t il, std::span<const BlockId> table, int64_t pos, int64_t n,
                         const float* k, const float* v) {
  KVLM_CHECK(!shape_.kivi());  // kivi_write
  KVLM_CHECK(il >= 0 && il < shape_.n_layer && pos >= 0 && n >= 0 &&
             pos + n <= static_cast<int64_t>(table.size()) * block_size_);
  const int64_t d = shape_.kv_dim(), hd = shape_.head_dim;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = pos + i;
    const BlockId b = table[p / block_size_];
    KVLM_CHECK(b >= 0 && b < group_blocks_[layer_group_[il]]);
    // Head by head: the cache type's blocks divide head_dim, so each head gets the bytes the
    // whole row's quantization gives it.
    for (int64_t g = 0; g < shape_.n_kv_head; ++g) {
      kv_quantize_row(shape_.dtype_k, k + i * d + g * hd, head_k(il, table, p, g), hd);
      kv_quantize_row(shape_.dtype_v, v + i * d + g * hd, head_v(il, table, p, g), hd);
    }
  }
}

void PagedKvStore::copy_block(BlockId src, BlockId dst, int32_t group) {
  const int32_t n = n_blocks(group);
  KVLM_CHECK(src >= 0 && src < n && dst >= 0 && dst < n);
  if (src == dst) return;
  for (int32_t il = 0; il < shape_.n_layer; ++il) {
    if (layer_group_[il] != group) continue;
    std::memcpy(block_k(il, dst), block_k(il, src), k_row_bytes_ * block_size_);
    std::memcpy(block_v(il, dst), block_v(il, src), v_row_bytes_ * block_size_);
  }
}

void PagedKvStore::grow(int32_t n_blocks, int32_t group) {
  KVLM_CHECK(n_blocks >= group_blocks_[group]);
  uint64_t total = 0;
  if (!checked_mul(block_bytes(shape_, block_size_), static_cast<uint64_t>(n_blocks), &total))
    fail("a paged KV cache of {} blocks overflows", n_blocks);
  const size_t rows = static_cast<size_t>(n_blocks) * static_cast<size_t>(block_size_);
  for (int32_t il = 0; il < shape_.n_layer; ++il) {
    if (layer_group_[il] != group) continue;
    for (auto [arena, row_bytes] : {std::pair{&k_, k_row_bytes_}, std::pair{&v_, v_row_bytes_}}) {
      AlignedBuffer bigger(row_bytes * rows);
      std::memcpy(bigger.data(), (*arena)[il].data(), (*arena)[il].size());
      (*arena)[il] = std::move(bigger);
    }
  }
  group_blocks_[group] = n_blocks;
}

void PagedKvStore::read_rows(int32_t il, std::span<const BlockId> table, int64_t pos, int64_t n,
                             std::byte* k_rows, std::byte* v_rows) const {
  KVLM_CHECK(!shape_.kivi() && il >= 0 && il < shape_.n_layer && pos >= 0 && n >= 0 &&
             pos + n <= static_cast<int64_t>(table.size()) * block_size_);
  const size_t kh = k_row_bytes_ / shape_.n_kv_head, vh = v_row_bytes_ / shape_.n_kv_head;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t g = 0; g < shape_.n_kv_head; ++g) {
      const int64_t ko = kv_head_major_offset(table.data(), block_size_, pos + i, g, k_row_bytes_,
                                              shape_.n_kv_head);
      const int64_t vo = kv_head_major_offset(table.data(), block_size_, pos + i, g, v_row_bytes_,
                                              shape_.n_kv_head);
      std::memcpy(k_rows + i * k_row_bytes_ + g * kh, k_[il].data() + ko, kh);
      std::memcpy(v_rows + i * v_row_bytes_ + g * vh, v_[il].data() + vo, vh);
    }
}

void PagedKvStore::write_rows(int32_t il, std::span<const BlockId> table, int64_t pos, int64_t n,
                              const std::byte* k_rows, const std::byte* v_rows) {
  KVLM_CHECK(!shape_.kivi() && il >= 0 && il < shape_.n_layer && pos >= 0 && n >= 0 &&
             pos + n <= static_cast<int64_t>(table.size()) * block_size_);
  const size_t kh = k_row_bytes_ / shape_.n_kv_head, vh = v_row_bytes_ / shape_.n_kv_head;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t g = 0; g < shape_.n_kv_head; ++g) {
      std::memcpy(head_k(il, table, pos + i, g), k_rows + i * k_row_bytes_ + g * kh, kh);
      std::memcpy(head_v(il, table, pos + i, g), v_rows + i * v_row_bytes_ + g * vh, vh);
    }
}

void PagedKvStore::shift_out(std::span<const BlockId> table, int64_t n_tokens, int64_t begin,
                             int64_t count, const KvRope& rope, int32_t group) {
  KVLM_CHECK(!shape_.kivi());  // KIVI does not evict (Session and Scheduler refuse it)
  KVLM_CHECK(begin >= 0 && count >= 0 && begin + count <= n_tokens &&
             n_tokens <= static_cast<int64_t>(table.size()) * block_size_);
  if (count == 0) return;
  for (BlockId b : table) KVLM_CHECK(b >= 0 && b < n_blocks(group));
  const int64_t n_after = n_tokens - count;
  const int64_t n_kv = shape_.n_kv_head;
  const size_t k_head = k_row_bytes_ / n_kv, v_head = v_row_bytes_ / n_kv;
  // Per shift, not per row: [kv_dim] f32 scratch, and one K row gathered token-major for
  // kv_rerotate_k_row (which rotates all heads of a row).
  std::vector<float> row(static_cast<size_t>(shape_.kv_dim()));
  std::vector<std::byte> k_row(k_row_bytes_);
  for (int32_t il = 0; il < shape_.n_layer; ++il) {
    if (layer_group_[il] != group) continue;
    // Ascending positions: a row is read (at p + count) before anything writes it (count > 0).
    for (int64_t p = begin; p < n_after; ++p) {
      for (int64_t g = 0; g < n_kv; ++g) {
        std::memcpy(k_row.data() + g * k_head, head_k(il, table, p + count, g), k_head);
        std::memcpy(head_v(il, table, p, g), head_v(il, table, p + count, g), v_head);
      }
      kv_rerotate_k_row(shape_, rope, -count, k_row.data(), row.data(), il);
      for (int64_t g = 0; g < n_kv; ++g)
        std::memcpy(head_k(il, table, p, g), k_row.data() + g * k_head, k_head);
    }
  }
}

KvLayerView PagedKvStore::view(int32_t il, std::span<const BlockId> table, int64_t n_tokens,
                               int32_t slot, int64_t n_sealed) const {
  KVLM_CHECK(il >= 0 && il < shape_.n_layer && n_tokens >= 0 &&
             n_tokens <= static_cast<int64_t>(table.size()) * block_size_);
  KvLayerView out = plain_layer_view(shape_, k_[il].data(), v_[il].data(), n_tokens);
  out.blocks = table.data();
  out.block_size = block_size_;
  out.head_major = !shape_.kivi();
  if (shape_.kivi()) {
    KVLM_CHECK(slot >= 0 && slot < n_slots_ && n_sealed >= 0 && n_sealed % shape_.kivi_group == 0);
    out.kivi_residual = shape_.kivi_residual;
    out.kivi_group = shape_.kivi_group;
    out.kivi_group_bytes = kv_kivi_group_bytes(shape_);
    out.n_sealed0 = n_sealed;
    out.n_sealed1 = kv_kivi_sealed(n_sealed, n_tokens, shape_.kivi_residual, shape_.kivi_group);
    out.k_resid = resid(rk_, il, slot);
    out.v_resid = resid(rv_, il, slot);
  }
  return out;
}

void PagedKvStore::kivi_write(int32_t il, std::span<const BlockId> table, int32_t slot,
                              int64_t n_sealed, int64_t pos, int64_t n, const float* k,
                              const float* v) {
  KVLM_CHECK(shape_.kivi() && il >= 0 && il < shape_.n_layer && slot >= 0 && slot < n_slots_ &&
             n_sealed >= 0 && n_sealed <= pos && pos - n_sealed <= resid_cap_ && n >= 0 &&
             pos + n <= static_cast<int64_t>(table.size()) * block_size_);
  // Holes (kNoBlock): blocks a sliding window released; kv_kivi_seal skips their groups.
  for (BlockId b : table) KVLM_CHECK(b >= kNoBlock && b < group_blocks_[layer_group_[il]]);
  const int64_t s1 = kv_kivi_sealed(n_sealed, pos + n, shape_.kivi_residual, shape_.kivi_group);
  KiviSealed out;
  out.k = reinterpret_cast<uint8_t*>(k_[il].data());
  out.v = reinterpret_cast<uint8_t*>(v_[il].data());
  out.k_row_bytes = k_row_bytes_;
  out.v_row_bytes = v_row_bytes_;
  out.blocks = table.data();
  out.block_size = block_size_;
  kv_kivi_seal(shape_, out, resid(rk_, il, slot), resid(rv_, il, slot), n_sealed, s1, pos, k, v,
               group_f32_.data());
}

void PagedKvStore::kivi_finish_write(int32_t il, int32_t slot, int64_t n_sealed, int64_t pos,
                                     int64_t n, const float* k, const float* v) {
  KVLM_CHECK(shape_.kivi() && il >= 0 && il < shape_.n_layer && slot >= 0 && slot < n_slots_);
  const int64_t s1 = kv_kivi_sealed(n_sealed, pos + n, shape_.kivi_residual, shape_.kivi_group);
  KVLM_CHECK(pos + n - s1 <= resid_cap_);
  kv_kivi_move_residual(shape_.kv_dim(), resid(rk_, il, slot), n_sealed, s1, pos, n, k);
  kv_kivi_move_residual(shape_.kv_dim(), resid(rv_, il, slot), n_sealed, s1, pos, n, v);
}

}  // namespace kvlm
