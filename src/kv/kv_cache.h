// The contiguous KV cache: one sequence, at most n_ctx tokens.
//
// Layout (docs/KV.md): per layer il, two arenas
//   k[il]: [capacity, n_kv_head * head_dim] of dtype_k   (row = one token; K stored after RoPE)
//   v[il]: [capacity, n_kv_head * head_dim] of dtype_v
// Positions are implicit: row p holds the token at cache position p, and the model rotates K for
// position p. Evicting rows (shift_out) moves the later rows down and re-rotates their K so this
// stays true. Bookkeeping (the length) is separate from the bytes, which attention reads through
// KvLayerView.
//
// Allocation: Static reserves n_ctx rows up front (Hugging Face StaticCache); Dynamic grows the
// arenas in chunks of kKvChunkTokens as tokens arrive (DynamicCache), copying the held rows.
//
// KIVI layout (shape.kivi(), docs/KV.md "KIVI"; storage code in kv_kivi.cpp): positions
// [0, n_sealed) are sealed, [n_sealed, size()) stay f16 in a residual area:
//   k[il]:  [n_sealed_cap / G] groups of kv_kivi_group_bytes: K per channel, 4-bit, G tokens each
//   v[il]:  [n_sealed_cap, kv_dim] of dtype_v                  (V per token, row p = position p)
//   rk[il]: [n_resid_cap, kv_dim] f16                          (row r = position n_sealed + r)
//   rv[il]: [n_resid_cap, kv_dim] f16
// A forward pass writes a layer in two steps around its attention: write() seals the groups the
// batch completes (reading the old residual and the new rows) and leaves the residual alone, so
// attention still finds every f16 row a query of the batch needs; finish_write() then moves the
// residual on. Query p sees position j sealed iff j < kv_kivi_sealed(n_sealed, p + 1): exactly
// what a decode step at p sees, so prefill(N) equals N decode steps.
#pragma once

#include <cstdint>
#include <vector>

#include "base/aligned.h"
#include "kernels/ops.h"
#include "kv/kv_kivi.h"
#include "kv/kv_shape.h"

namespace kvlm {

enum class KvAlloc { Static, Dynamic };

// How the model rotated K, so the cache can re-rotate rows it moves. n_rot == 0: K carries no
// position (learned position embeddings), moving rows needs no rotation.
struct KvRope {
  int32_t n_rot = 0;
  float freq_base = 10000.0f;
  kernels::RopeMode mode = kernels::RopeMode::Normal;
};

// Re-rotates one stored K row (kv_dim values in shape.dtype_k, as the cache stores them) by
// `delta` positions: R(p + delta) = R(delta) R(p), so a row moved from position p to p + delta
// holds a key rotated for its new position again. A quantized row is dequantized, rotated and
// re-quantized (one more rounding); a Hadamard-rotated row (shape.rotate) is un-rotated first and
// rotated back after. row_f32: [kv_dim] scratch. No-op when rope.n_rot == 0. Both the contiguous
// cache and the paged store (paged_kv.h) evict through this one function, so the two give the
// same bytes.
void kv_rerotate_k_row(const KvShape& shape, const KvRope& rope, int64_t delta, std::byte* row,
                       float* row_f32);

// What attention needs to read one layer: plain pointers and strides, no virtual calls.
struct KvLayerView {
  DType dtype_k = DType::F32;
  DType dtype_v = DType::F32;
  const uint8_t* k = nullptr;  // [n_tokens, kv_dim] rows of k_row_bytes
  const uint8_t* v = nullptr;  // [n_tokens, kv_dim] rows of v_row_bytes
  size_t k_row_bytes = 0;
  size_t v_row_bytes = 0;
  int64_t n_tokens = 0;  // rows readable: positions [0, n_tokens)
  // Paged (paged_kv.h) when blocks != nullptr: position p is row blocks[p / block_size] *
  // block_size + p % block_size of k and v. Contiguous otherwise: position p is row p.
  const int32_t* blocks = nullptr;  // [ceil(n_tokens / block_size)] block ids
  int64_t block_size = 0;
  int64_t row(int64_t p) const { return kv_table_row(blocks, block_size, p); }  // of k and v
  // Head-major blocks (PagedKvStore's plain layouts): block b's bytes are still rows
  // [b * bs, (b + 1) * bs) of k and v, but ordered [n_kv_head, bs, head bytes], so one head's bs
  // positions are one contiguous run (attention reads a head at a time). Otherwise (contiguous
  // caches, KIVI) rows are token-major: [rows, n_kv_head, head bytes]. A head's bytes are the
  // same either way (a cache type's blocks never straddle heads: validate()).
  bool head_major = false;
  int64_t n_kv_head = 1;
  // Where head g of position p starts in k (v); the head's bytes are k_row_bytes / n_kv_head.
  const uint8_t* k_head(int64_t p, int64_t g) const { return head_at(k, k_row_bytes, p, g); }
  const uint8_t* v_head(int64_t p, int64_t g) const { return head_at(v, v_row_bytes, p, g); }
  // Bytes from one position's head slice to the next position's, inside a block (or anywhere in
  // a contiguous cache).
  size_t k_pos_stride() const { return head_major ? k_row_bytes / n_kv_head : k_row_bytes; }
  size_t v_pos_stride() const { return head_major ? v_row_bytes / n_kv_head : v_row_bytes; }

  // KIVI layout only (kivi_residual >= 0): k then holds sealed K groups, v sealed V rows.
  int32_t kivi_residual = -1;
  int32_t kivi_group = 0;
  size_t kivi_group_bytes = 0;     // kv_kivi_group_bytes
  int64_t n_sealed0 = 0;           // sealed before this pass = first position of the residual
  int64_t n_sealed1 = 0;           // sealed after this pass's write(): groups readable in k and v
  const uint16_t* k_resid = nullptr;  // [size() - n_sealed0, kv_dim] f16, row r = position n_sealed0 + r
  const uint16_t* v_resid = nullptr;  // same for V

 private:
  const uint8_t* head_at(const uint8_t* base, size_t row_bytes, int64_t p, int64_t g) const {
    if (head_major)
      return base + kv_head_major_offset(blocks, block_size, p, g, row_bytes, n_kv_head);
    return base + row(p) * row_bytes + g * (row_bytes / static_cast<size_t>(n_kv_head));
  }
};

// A view of rows of `shape`'s types at k and v (plain layout; positions [0, n_tokens)).
inline KvLayerView plain_layer_view(const KvShape& shape, const std::byte* k, const std::byte* v,
                                    int64_t n_tokens) {
  KvLayerView out;
  out.dtype_k = shape.dtype_k;
  out.dtype_v = shape.dtype_v;
  out.k = reinterpret_cast<const uint8_t*>(k);
  out.v = reinterpret_cast<const uint8_t*>(v);
  out.k_row_bytes = kv_k_row_bytes(shape);
  out.v_row_bytes = kv_v_row_bytes(shape);
  out.n_tokens = n_tokens;
  out.n_kv_head = shape.n_kv_head;
  return out;
}

struct KvStats {
  int64_t n_tokens = 0;         // positions held
  int64_t n_ctx = 0;            // maximum tokens
  int64_t capacity = 0;         // tokens the arenas hold now (== n_ctx when static)
  size_t bytes_used = 0;        // kv_bytes(shape, n_tokens)
  size_t bytes_allocated = 0;   // summed from the arenas == kv_alloc_bytes(shape, alloc, ...)
  int64_t n_evicted = 0;        // tokens shifted out since construction or clear()
};

class KvCache {
 public:
  // Static: allocates kv_bytes(shape, n_ctx) once. Dynamic: starts with one chunk. Throws
  // kvlm::Error on a bad shape or n_ctx <= 0.
  KvCache(const KvShape& shape, int64_t n_ctx, KvAlloc alloc = KvAlloc::Static,
          KvRope rope = {});

  const KvShape& shape() const { return shape_; }
  KvAlloc alloc() const { return alloc_; }
  int64_t n_ctx() const { return n_ctx_; }
  int64_t size() const { return n_tokens_; }
  int64_t free_tokens() const { return n_ctx_ - n_tokens_; }

  // Makes room for n_tokens rows (Dynamic: grows to the next chunk multiple, copying held rows).
  // Precondition: n_tokens <= n_ctx. Called at batch boundaries, never per element.
  void reserve(int64_t n_tokens);

  // Stores K and V rows for positions [pos, pos + n) of layer il, converting from f32.
  //   k, v: [n, kv_dim] f32
  // Precondition: 0 <= pos, pos + n <= capacity (reserve first); KIVI: pos == size().
  void write(int32_t il, int64_t pos, int64_t n, const float* k, const float* v);
  // Second half of write(), called with the same arguments once attention has read layer il:
  // KIVI moves the f16 residual on to the rows that stay unsealed; a no-op for plain layouts.
  // k, v must still hold the rows given to write() (attention reads the new rows from them).
  void finish_write(int32_t il, int64_t pos, int64_t n, const float* k, const float* v);
  // Marks positions [0, n_tokens) as held, once every layer's rows are written.
  void commit(int64_t n_tokens);
  // View of layer il covering positions [0, n_visible) (rows past size() must already be written
  // in this forward pass).
  KvLayerView view(int32_t il, int64_t n_visible) const;

  // Evicts positions [begin, begin + count): later rows move down by count and their K is rotated
  // by -count positions (RoPE rotations compose), so row p again holds a key rotated for p. With
  // a quantized K type the re-rotated rows are re-quantized (one more rounding).
  // This is both the sliding window's eviction (begin = number of sink tokens) and chat's context
  // shift (begin = tokens kept at the start).
  void shift_out(int64_t begin, int64_t count);

  // Replaces the content with n_tokens rows per layer copied from k, v ([n_tokens] rows of the
  // cache's own row bytes, as view() exposes them), e.g. from a saved session.
  // Precondition: n_tokens <= n_ctx; call once per layer, then commit(n_tokens).
  void import_rows(int32_t il, int64_t n_tokens, const uint8_t* k, const uint8_t* v);

  // Forgets positions >= n (no bytes move). KIVI: precondition n >= n_sealed() (sealed tokens
  // cannot be un-sealed; Session recomputes instead).
  void truncate(int64_t n);
  void clear();

  // KIVI: positions [0, n_sealed()) are quantized, the rest f16. Plain layouts: 0.
  int64_t n_sealed() const { return n_sealed_; }

  KvStats stats() const;

 private:
  KvShape shape_;
  KvAlloc alloc_;
  KvRope rope_;
  int64_t n_ctx_ = 0;
  int64_t capacity_ = 0;
  int64_t n_tokens_ = 0;
  int64_t n_evicted_ = 0;
  size_t k_row_bytes_ = 0, v_row_bytes_ = 0;
  std::vector<AlignedBuffer> k_;  // [n_layer] arenas of [capacity, kv_dim] dtype_k (KIVI: groups)
  std::vector<AlignedBuffer> v_;  // [n_layer] arenas of [capacity, kv_dim] dtype_v (KIVI: sealed)

  // ---- KIVI (kv_kivi.cpp) ----
  void kivi_reserve(int64_t cap);
  void kivi_write(int32_t il, int64_t pos, int64_t n, const float* k, const float* v);
  void kivi_finish_write(int32_t il, int64_t pos, int64_t n, const float* k, const float* v);
  int64_t n_sealed_ = 0;       // committed sealed tokens (a multiple of the group)
  int64_t n_sealed_next_ = 0;  // sealed once the pass being written commits
  int32_t n_layers_done_ = 0;  // layers finish_write()-ten in this pass (checked at commit)
  std::vector<AlignedBuffer> rk_;  // [n_layer] arenas of [n_resid_cap, kv_dim] f16
  std::vector<AlignedBuffer> rv_;  // [n_layer] arenas of [n_resid_cap, kv_dim] f16
  std::vector<float> group_f32_;   // [group, kv_dim] one K group gathered for sealing
};

}  // namespace kvlm
