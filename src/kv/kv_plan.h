// The exact KV memory planner: how many bytes a cache takes, and the inverse questions (the longest
// context, or the most sequences, that fit a memory budget).
//
// Every number comes from kv_shape.h's per-token bytes and paged_kv.h's block arithmetic
// (kv_seq_block_size, kv_seq_blocks, PagedKvStore::block_bytes), which are also what a Session's
// KV manager sizes its blocks with, so a plan cannot disagree with what is allocated
// (tests/kv/test_kv_plan.cpp checks it for every allocation strategy and storage type). Like the
// cache, the planner knows only a KvShape, never the model.
//
// A sequence holds whole blocks: n_seqs sequences of n_ctx tokens take n_seqs x
// kv_seq_bytes(shape, n_ctx) = ceil(n_ctx / block) blocks (+ KIVI's f16 residual slot) each.
// Static caches allocate that up front; dynamic caches grow to it in chunks (kv_alloc_bytes
// below), so a full cache takes the same bytes with either strategy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "kv/kv_cache.h"
#include "kv/kv_shape.h"
#include "kv/paged_kv.h"

namespace kvlm {

// One cache group of a sequence (per-layer cache groups: kv_seq_groups, the allocator's
// arithmetic): its layers' window and the blocks it holds when full.
struct KvGroupPlan {
  int32_t window = 0;          // 0: full attention
  int32_t n_layers = 0;
  int64_t tokens_per_seq = 0;  // blocks x block size a sequence holds at most
  size_t bytes_per_seq = 0;    // those blocks in the group's layers, K and V
};

// The default tokens per forward pass a Session feeds (-b), which bounds a window group.
inline constexpr int64_t kKvPlanBatch = 512;

struct KvPlan {
  KvShape shape;
  int64_t n_ctx = 0;   // tokens per sequence
  int64_t n_seqs = 0;  // sequences, each its own cache of n_ctx tokens

  // Bytes of one token, in one layer and in all layers (shape.n_layer identical layers: KvShape
  // describes one layer group), K and V separately and together.
  size_t k_bytes_per_token_layer = 0, v_bytes_per_token_layer = 0, bytes_per_token_layer = 0;
  size_t k_bytes_per_token = 0, v_bytes_per_token = 0, bytes_per_token = 0;

  size_t bytes_per_seq = 0;  // kv_seq_bytes(shape, n_ctx): one full cache
  size_t bytes_total = 0;    // n_seqs x bytes_per_seq
  std::vector<KvGroupPlan> groups;  // [n_groups] summing to bytes_per_seq (without KIVI's slot)
};

// Throws kvlm::Error for an invalid shape (validate()), n_ctx <= 0, n_seqs <= 0, or a total that
// overflows size_t.
// layer_window: [n_layer] each layer's sliding window (0: full attention), empty: every layer full.
KvPlan plan_kv(const KvShape& shape, int64_t n_ctx, int64_t n_seqs = 1,
               std::span<const int32_t> layer_window = {});

// Bytes a cache of n_ctx tokens with allocation strategy `alloc` has allocated once it has been
// asked to hold n_reserved tokens (its high-water mark: caches never shrink). A new cache counts as
// having reserved one token. Precondition: 0 <= n_reserved <= n_ctx. Throws on overflow.
size_t kv_alloc_bytes(const KvShape& shape, KvAlloc alloc, int64_t n_ctx, int64_t n_reserved);
// One full sequence of n_ctx tokens: ceil(n_ctx / kv_seq_block_size) blocks, plus KIVI's slot.
size_t kv_seq_bytes(const KvShape& shape, int64_t n_ctx, std::span<const int32_t> layer_window = {});

// What llama.cpp's interleaved sliding-window cache (llama_kv_cache_iswa, recent versions)
// allocates for one sequence of n_ctx tokens, for comparison: every full layer n_ctx cells, every
// window layer min(n_ctx, window + n_ubatch) cells padded to 256 (n_ubatch 512). Cells x bytes
// per token and layer.
size_t llama_cpp_iswa_bytes(const KvShape& shape, int64_t n_ctx,
                            std::span<const int32_t> layer_window);

// ---- inverse questions ---------------------------------------------------------------------------
// Both answer for full caches (n_seqs x kv_bytes(shape, n_ctx) <= budget_bytes) and are exact: one
// more token or sequence would not fit. 0 when not even one token / one sequence fits.
// Throw kvlm::Error for an invalid shape or a non-positive n_seqs / n_ctx.

// Longest context n_ctx such that n_seqs caches of n_ctx tokens fit in budget_bytes.
int64_t max_ctx_for_budget(const KvShape& shape, int64_t n_seqs, uint64_t budget_bytes,
                           std::span<const int32_t> layer_window = {});
// Most sequences of n_ctx tokens that fit in budget_bytes.
int64_t max_seqs_for_budget(const KvShape& shape, int64_t n_ctx, uint64_t budget_bytes,
                            std::span<const int32_t> layer_window = {});

// ---- storage types -------------------------------------------------------------------------------
// Types a cache of this shape can store (K and V both of that type), from the largest per token to
// the smallest: every type kvlm knows is tried and those validate() accepts are kept, so a type
// added to kv_shape.cpp appears here (and in `kvlm kv-size`) with no change to the planner.
// shape.dtype_k / dtype_v are ignored.
std::vector<DType> kv_plan_types(const KvShape& shape);

// ---- byte sizes ----------------------------------------------------------------------------------
// "1000000", "512MiB", "2 GiB", "1.5GB", "64k": a number (decimal point allowed) and an optional
// case-insensitive unit: B; KiB, MiB, GiB, TiB (powers of 1024); KB, MB, GB, TB (powers of 1000);
// K, M, G, T alone mean the binary units (as in `docker --memory 2g`). Fractions of a byte are
// rounded down. Throws kvlm::Error naming the string for empty input, a sign, an unknown unit, or a
// value over 2^64 - 1.
uint64_t parse_bytes(std::string_view s);

}  // namespace kvlm
