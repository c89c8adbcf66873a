// What the KV cache needs to know about a model, and nothing more: the cache never sees the model.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

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

// Dynamic caches grow their arenas in chunks of this many tokens (amortises the copy on growth).
inline constexpr int64_t kKvChunkTokens = 256;
// Tokens of arena a cache holding n_tokens reserves: all of n_ctx when static, else n_tokens
// rounded up to a chunk (capped at n_ctx). The allocator and the planner both use this.
inline int64_t kv_alloc_tokens(bool dynamic, int64_t n_tokens, int64_t n_ctx) {
  if (!dynamic) return n_ctx;
  const int64_t chunks = (n_tokens + kKvChunkTokens - 1) / kKvChunkTokens;
  return n_tokens <= 0 ? 0 : (chunks * kKvChunkTokens < n_ctx ? chunks * kKvChunkTokens : n_ctx);
}

// Storage types a cache can hold, as llama.cpp names them (-ctk/-ctv): f32, f16, and the blockwise
// 8- and 4-bit types q8_0 (32 values + f16 scale), q4_0 (32 values + f16 scale), q4_1 (32 values +
// f16 scale and min). Rows are written with kernels::quantize_row and read with the kernels'
// dequantize/dot, so quantized caches cost no extra code in attention.
inline constexpr DType kKvTypes[] = {DType::F32, DType::F16, DType::Q8_0, DType::Q4_1, DType::Q4_0};
bool kv_type_supported(DType t);
std::string kv_supported_types();  // "f32, f16, q8_0, q4_1, q4_0"

// Throws kvlm::Error unless the shape is usable (positive sizes, a supported cache dtype whose
// block size divides head_dim).
void validate(const KvShape& s);

}  // namespace kvlm
