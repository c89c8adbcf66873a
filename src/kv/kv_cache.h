// The contiguous KV cache: one sequence, capacity fixed at construction, storage allocated once.
//
// Layout (docs/KV.md): per layer il, two arenas
//   k[il]: [n_ctx, n_kv_head * head_dim] of dtype_k      (row = one token; K stored after RoPE)
//   v[il]: [n_ctx, n_kv_head * head_dim] of dtype_v
// Positions are implicit: row p holds the token at position p. Bookkeeping (the length) is
// separate from the bytes, which attention reads through KvLayerView.
#pragma once

#include <cstdint>
#include <vector>

#include "base/aligned.h"
#include "kv/kv_shape.h"

namespace kvlm {

// What attention needs to read one layer: plain pointers and strides, no virtual calls.
struct KvLayerView {
  DType dtype_k = DType::F32;
  DType dtype_v = DType::F32;
  const uint8_t* k = nullptr;  // [n_tokens, kv_dim] rows of k_row_bytes
  const uint8_t* v = nullptr;  // [n_tokens, kv_dim] rows of v_row_bytes
  size_t k_row_bytes = 0;
  size_t v_row_bytes = 0;
  int64_t n_tokens = 0;  // rows readable: positions [0, n_tokens)
};

struct KvStats {
  int64_t n_tokens = 0;         // positions held
  int64_t n_ctx = 0;            // capacity, tokens
  size_t bytes_used = 0;        // kv_bytes(shape, n_tokens)
  size_t bytes_allocated = 0;   // kv_bytes(shape, n_ctx)
};

class KvCache {
 public:
  // Allocates kv_bytes(shape, n_ctx) bytes once. Throws kvlm::Error on a bad shape or n_ctx <= 0.
  KvCache(const KvShape& shape, int64_t n_ctx);

  const KvShape& shape() const { return shape_; }
  int64_t n_ctx() const { return n_ctx_; }
  int64_t size() const { return n_tokens_; }
  int64_t free_tokens() const { return n_ctx_ - n_tokens_; }

  // Stores K and V rows for positions [pos, pos + n) of layer il, converting from f32.
  //   k, v: [n, kv_dim] f32
  // Precondition: 0 <= pos, pos + n <= n_ctx. Rows past size() may be written before commit().
  void write(int32_t il, int64_t pos, int64_t n, const float* k, const float* v);
  // Marks positions [0, n_tokens) as held, once every layer's rows are written.
  void commit(int64_t n_tokens);
  // View of layer il covering positions [0, n_visible) (n_visible <= n_ctx; rows past size()
  // must already be written in this forward pass).
  KvLayerView view(int32_t il, int64_t n_visible) const;

  // Forgets positions >= n (no bytes move).
  void truncate(int64_t n);
  void clear() { truncate(0); }

  KvStats stats() const;

 private:
  KvShape shape_;
  int64_t n_ctx_ = 0;
  int64_t n_tokens_ = 0;
  size_t k_row_bytes_ = 0, v_row_bytes_ = 0;
  std::vector<AlignedBuffer> k_;  // [n_layer] arenas of [n_ctx, kv_dim] dtype_k
  std::vector<AlignedBuffer> v_;  // [n_layer] arenas of [n_ctx, kv_dim] dtype_v
};

}  // namespace kvlm
