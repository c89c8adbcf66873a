// What the KV cache needs to know about a model, and nothing more: the cache never sees the model.
#pragma once

#include <cstddef>
#include <cstdint>

#include "tensor/dtype.h"

namespace kvlm {

struct KvShape {
  int32_t n_layer = 0;
  int32_t n_kv_head = 0;  // KV heads only: with GQA several query heads share one KV head
  int32_t head_dim = 0;
  DType dtype_k = DType::F16;
  DType dtype_v = DType::F16;

  int64_t kv_dim() const { return int64_t{n_kv_head} * head_dim; }  // values per token per layer
};

// ---- memory accounting -------------------------------------------------------------------------
// The one place that says how many bytes the cache takes. The allocator sizes its arenas with
// these functions (and tests assert the allocated bytes equal them), so a planner built on them
// cannot disagree with what is allocated.

// Bytes of one token's K row or V row in one layer.
size_t kv_k_row_bytes(const KvShape& s);
size_t kv_v_row_bytes(const KvShape& s);
// Bytes one token takes in one layer (K + V) and in all layers.
size_t kv_bytes_per_token_layer(const KvShape& s);
size_t kv_bytes_per_token(const KvShape& s);
// Bytes for n_tokens tokens in all layers. Throws kvlm::Error on overflow.
size_t kv_bytes(const KvShape& s, int64_t n_tokens);

// Throws kvlm::Error unless the shape is usable (positive sizes, a supported cache dtype whose
// block size divides head_dim). Supported cache dtypes: f32, f16.
void validate(const KvShape& s);

}  // namespace kvlm
