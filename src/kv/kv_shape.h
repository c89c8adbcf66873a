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
  // KIVI layout (docs/KV.md, "KIVI"): -1 off (plain rows). >= 0: K quantized per channel in groups
  // of kivi_group tokens (4-bit codes, f16 scale and min per channel and group; dtype_k must be
  // q4_0, whose 0.5625 bytes/value it matches at kivi_group 64), V quantized per token in dtype_v
  // rows, and at least kivi_residual (at most kivi_residual + kivi_group - 1) most recent tokens
  // kept in f16.
  int32_t kivi_residual = -1;
  int32_t kivi_group = 64;
  // Hadamard-rotated rows (docs/KV.md, "Hadamard rotation"): each head's K and V are stored
  // multiplied by H / sqrt(head_dim), which spreads outlier channels before quantization. The
  // model rotates q the same way and un-rotates attention's output; bytes per token unchanged.
  // Needs head_dim a power of two; not with KIVI.
  bool rotate = false;

  int64_t kv_dim() const { return int64_t{n_kv_head} * head_dim; }  // values per token per layer
  bool kivi() const { return kivi_residual >= 0; }
};

// ---- memory accounting -------------------------------------------------------------------------
// The one place that says how many bytes the cache takes. The allocator sizes its arenas with
// these functions (and tests assert the allocated bytes equal them), so a planner built on them
// cannot disagree with what is allocated.

// Bytes of one token's K row or V row in one layer. KIVI: the sealed (quantized) density, i.e. a
// K group's bytes / kivi_group, and one dtype_v row.
size_t kv_k_row_bytes(const KvShape& s);
size_t kv_v_row_bytes(const KvShape& s);
// Bytes one token takes in one layer (K + V) and in all layers. KIVI: sealed tokens only, so
// kv_bytes(s, n) >= n x kv_bytes_per_token(s) (the f16 residual costs more per token).
size_t kv_bytes_per_token_layer(const KvShape& s);
size_t kv_bytes_per_token(const KvShape& s);
// Bytes of a cache whose arenas hold n_tokens tokens, in all layers. Plain: n_tokens x bytes per
// token. KIVI: kv_kivi_sealed_cap(s, n) sealed tokens (K groups + V rows) plus
// kv_kivi_residual_cap(s, n) f16 K and V rows. Throws kvlm::Error on overflow.
size_t kv_bytes(const KvShape& s, int64_t n_tokens);

// ---- KIVI bookkeeping (pure arithmetic, shared by the cache, attention and the planner) ---------
// Bytes of one sealed K group in one layer: [kv_dim] x (f16 scale, f16 min) + [group, kv_dim / 2]
// 4-bit codes.
size_t kv_kivi_group_bytes(const KvShape& s);
// Tokens sealed once n_held tokens are held, starting from n_sealed0 sealed (a multiple of the
// group): the oldest complete groups are sealed while more than `residual` tokens stay f16, so
// n_held - result is in [residual, residual + group - 1] whenever n_held - n_sealed0 >= residual.
// From an empty cache this is group x floor((n_held - residual) / group): the same for prefill
// and decode.
inline int64_t kv_kivi_sealed(int64_t n_sealed0, int64_t n_held, int32_t residual, int32_t group) {
  const int64_t over = n_held - n_sealed0 - residual;
  return over <= 0 ? n_sealed0 : n_sealed0 + over / group * group;
}
// Arena sizes of a KIVI cache holding at most n_tokens: sealed tokens, and f16 residual rows.
inline int64_t kv_kivi_sealed_cap(const KvShape& s, int64_t n_tokens) {
  return kv_kivi_sealed(0, n_tokens, s.kivi_residual, s.kivi_group);
}
inline int64_t kv_kivi_residual_cap(const KvShape& s, int64_t n_tokens) {
  const int64_t most = int64_t{s.kivi_residual} + s.kivi_group - 1;
  return n_tokens < most ? n_tokens : most;
}

// The arena row holding position p: p in a contiguous cache (blocks == nullptr), row p % bs of
// block blocks[p / bs] through a block table (paged_kv.h).
inline int64_t kv_table_row(const int32_t* blocks, int64_t block_size, int64_t p) {
  return blocks ? int64_t{blocks[p / block_size]} * block_size + p % block_size : p;
}

// Byte offset of KV head g of position p in a head-major paged arena (paged_kv.h): block
// blocks[p / bs] is bs x row_bytes bytes ordered [n_kv_head, bs, row_bytes / n_kv_head], and the
// head sits at slot p % bs of its run. The one statement of that layout, for the store that
// writes it and the view that reads it.
inline int64_t kv_head_major_offset(const int32_t* blocks, int64_t block_size, int64_t p, int64_t g,
                                    size_t row_bytes, int64_t n_kv_head) {
  const int64_t head_bytes = static_cast<int64_t>(row_bytes) / n_kv_head;
  return int64_t{blocks[p / block_size]} * block_size * static_cast<int64_t>(row_bytes) +
         (g * block_size + p % block_size) * head_bytes;
}

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
// block size divides head_dim; KIVI: dtype_k q4_0, kivi_group 32, 64 or 128).
void validate(const KvShape& s);

}  // namespace kvlm
