// What every user of the KV cache shares: how the model rotated K (so moved rows can be
// re-rotated), the view attention reads one layer through, the statistics a cache reports and
// the allocation strategies. The cache itself is paged: the blocks' bytes are a PagedKvStore
// (paged_kv.h), owned with the block pool and the prefix index by the KV manager
// (src/kv_manager/kv_manager.h); a single sequence is a manager holding one sequence.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "base/aligned.h"
#include "kernels/ops.h"
#include "kv/kv_kivi.h"
#include "kv/kv_shape.h"

namespace kvlm {

// How the model rotated K, so the cache can re-rotate rows it moves, and the forward pass's RoPE
// frequencies (rope_inv_freq). n_rot == 0: K carries no position (learned position embeddings),
// moving rows needs no rotation.
struct KvRope {
  int32_t n_rot = 0;
  float freq_base = 10000.0f;
  kernels::RopeMode mode = kernels::RopeMode::Normal;
  float freq_scale = 1.0f;            // linear or YaRN scaling: 1 / rope.scaling.factor
  std::vector<float> freq_factors{};  // [n_rot / 2] pair i's frequency divided by factor i: Llama
                                      //   3's rope_freqs, or LongRoPE's long or short set; or empty
  // YaRN (rope.scaling.type yarn): pairs that turn fewer than beta_slow times over n_ctx_orig
  // positions are interpolated (freq_scale), pairs that turn more than beta_fast times keep
  // their frequency, a linear ramp in the pair index between (llama.cpp's corr_dims).
  // ext_factor scales the ramp; 0 turns YaRN off.
  float ext_factor = 0.0f;
  int32_t n_ctx_orig = 0;  // rope.scaling.original_context_length (positions trained on)
  float beta_fast = 32.0f;
  float beta_slow = 1.0f;
  // [n_layer] the base each layer rotates with, when they differ (Gemma 3's windowed layers use
  // their own); empty: freq_base for every layer.
  std::vector<float> layer_freq_base{};
  float base_of(int32_t il) const {
    return il >= 0 && static_cast<size_t>(il) < layer_freq_base.size()
               ? layer_freq_base[static_cast<size_t>(il)]
               : freq_base;
  }
};

// RoPE frequencies as llama.cpp computes them (in double here): inv_freq[i] =
// freq_base^(-2i / n_rot) / factors[i] times freq_scale, or with YaRN times
// freq_scale * (1 - m_i) + m_i, m_i = ramp_i * ext_factor (kernels::rope_cos_sin takes them).
// freq_base is an argument because Gemma 3's windowed layers rotate with their own base.
//   inv_freq: [rope.n_rot / 2]
void rope_inv_freq(const KvRope& rope, float freq_base, double* inv_freq);

// Re-rotates one stored K row (kv_dim values in shape.dtype_k, as the cache stores them) by
// `delta` positions: R(p + delta) = R(delta) R(p), so a row moved from position p to p + delta
// holds a key rotated for its new position again. A quantized row is dequantized, rotated and
// re-quantized (one more rounding); a Hadamard-rotated row (shape.rotate) is un-rotated first and
// rotated back after. row_f32: [kv_dim] scratch. No-op when rope.n_rot == 0. il: the row's
// layer, whose base rope.base_of(il) is (-1: rope.freq_base). Both the contiguous cache and the
// paged store (paged_kv.h) evict through this one function, so the two give the same bytes.
void kv_rerotate_k_row(const KvShape& shape, const KvRope& rope, int64_t delta, std::byte* row,
                       float* row_f32, int32_t il = -1);

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

// One sequence's cache as kvlm generate / chat / bench report it.
struct KvStats {
  int64_t n_tokens = 0;         // positions held
  int64_t n_ctx = 0;            // maximum tokens
  int64_t capacity = 0;         // tokens the blocks hold now (n_ctx rounded up to whole blocks
                                // when static)
  size_t bytes_used = 0;        // the blocks (and KIVI residual slot) in use
  size_t bytes_allocated = 0;   // summed from the arenas == kv_alloc_bytes(shape, alloc, ...)
  int64_t n_evicted = 0;        // tokens shifted out since construction or reset
};

// Static: all of a sequence's blocks allocated at once (Hugging Face StaticCache); Dynamic: they
// grow in chunks of kKvChunkTokens as tokens arrive (DynamicCache), copying the held rows.
enum class KvAlloc { Static, Dynamic };

}  // namespace kvlm
