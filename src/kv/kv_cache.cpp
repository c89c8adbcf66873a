#include "kv/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "base/error.h"
#include "kv/kv_quant.h"

namespace kvlm {

void kv_rerotate_k_row(const KvShape& shape, const KvRope& rope, int64_t delta, std::byte* row,
                       float* row_f32) {
  if (rope.n_rot == 0 || delta == 0) return;
  const int64_t d = shape.kv_dim();
  kernels::dequantize_row(shape.dtype_k, row, row_f32, d);
  // A rotated row is H R(p) k: un-rotate (H is its own inverse), re-RoPE, rotate again.
  if (shape.rotate) kernels::hadamard(row_f32, shape.n_kv_head, shape.head_dim);
  kernels::rope(row_f32, shape.n_kv_head, shape.head_dim, rope.n_rot, delta, rope.freq_base,
                rope.mode);
  if (shape.rotate) kernels::hadamard(row_f32, shape.n_kv_head, shape.head_dim);
  kv_quantize_row(shape.dtype_k, row_f32, row, d);
}

KvCache::KvCache(const KvShape& shape, int64_t n_ctx, KvAlloc alloc, KvRope rope)
    : shape_(shape), alloc_(alloc), rope_(rope), n_ctx_(n_ctx) {
  validate(shape);
  if (n_ctx <= 0) fail("KV cache context must be positive, got {}", n_ctx);
  kv_bytes(shape, n_ctx);  // throws on overflow before we allocate anything
  k_row_bytes_ = kv_k_row_bytes(shape);
  v_row_bytes_ = kv_v_row_bytes(shape);
  k_.resize(shape.n_layer);
  v_.resize(shape.n_layer);
  if (shape.kivi()) {
    rk_.resize(shape.n_layer);
    rv_.resize(shape.n_layer);
    group_f32_.resize(static_cast<size_t>(shape.kivi_group * shape.kv_dim()));
  }
  reserve(alloc == KvAlloc::Static ? n_ctx : std::min<int64_t>(n_ctx, 1));
}

void KvCache::reserve(int64_t n_tokens) {
  KVLM_CHECK(n_tokens >= 0 && n_tokens <= n_ctx_);
  if (n_tokens <= capacity_) return;
  const int64_t cap = kv_alloc_tokens(alloc_ == KvAlloc::Dynamic, n_tokens, n_ctx_);
  if (shape_.kivi()) return kivi_reserve(cap);
  for (int32_t il = 0; il < shape_.n_layer; ++il) {
    AlignedBuffer k(k_row_bytes_ * static_cast<size_t>(cap));
    AlignedBuffer v(v_row_bytes_ * static_cast<size_t>(cap));
    if (n_tokens_ > 0) {
      std::memcpy(k.data(), k_[il].data(), k_row_bytes_ * n_tokens_);
      std::memcpy(v.data(), v_[il].data(), v_row_bytes_ * n_tokens_);
    }
    k_[il] = std::move(k);
    v_[il] = std::move(v);
  }
  capacity_ = cap;
}

void KvCache::write(int32_t il, int64_t pos, int64_t n, const float* k, const float* v) {
  KVLM_CHECK(il >= 0 && il < shape_.n_layer && pos >= 0 && n >= 0 && pos + n <= capacity_);
  if (shape_.kivi()) return kivi_write(il, pos, n, k, v);
  const int64_t d = shape_.kv_dim();
  for (int64_t i = 0; i < n; ++i) {
    kv_quantize_row(shape_.dtype_k, k + i * d, k_[il].data() + (pos + i) * k_row_bytes_, d);
    kv_quantize_row(shape_.dtype_v, v + i * d, v_[il].data() + (pos + i) * v_row_bytes_, d);
  }
}

void KvCache::finish_write(int32_t il, int64_t pos, int64_t n, const float* k, const float* v) {
  KVLM_CHECK(il >= 0 && il < shape_.n_layer && pos >= 0 && n >= 0 && pos + n <= capacity_);
  if (shape_.kivi()) kivi_finish_write(il, pos, n, k, v);
}

void KvCache::commit(int64_t n_tokens) {
  KVLM_CHECK(n_tokens >= 0 && n_tokens <= capacity_);
  if (shape_.kivi()) {
    // Every layer's residual must have moved on to the same pass before the length does.
    KVLM_CHECK(n_tokens == n_tokens_ ? n_layers_done_ == 0 : n_layers_done_ == shape_.n_layer);
    n_sealed_ = n_sealed_next_;
    n_layers_done_ = 0;
  }
  n_tokens_ = n_tokens;
}

KvLayerView KvCache::view(int32_t il, int64_t n_visible) const {
  KVLM_CHECK(il >= 0 && il < shape_.n_layer && n_visible >= 0 && n_visible <= capacity_);
  KvLayerView out = plain_layer_view(shape_, k_[il].data(), v_[il].data(), n_visible);
  if (shape_.kivi()) {
    out.kivi_residual = shape_.kivi_residual;
    out.kivi_group = shape_.kivi_group;
    out.kivi_group_bytes = kv_kivi_group_bytes(shape_);
    out.n_sealed0 = n_sealed_;
    out.n_sealed1 = n_sealed_next_;
    out.k_resid = rk_[il].as<uint16_t>();
    out.v_resid = rv_[il].as<uint16_t>();
  }
  return out;
}

void KvCache::shift_out(int64_t begin, int64_t count) {
  KVLM_CHECK(begin >= 0 && count >= 0 && begin + count <= n_tokens_);
  if (shape_.kivi())
    fail("the KIVI cache (--kv-residual) cannot evict tokens (no --kv-window, --keep or context "
         "shift)");
  if (count == 0) return;
  const int64_t n_move = n_tokens_ - begin - count;
  const int64_t d = shape_.kv_dim();
  std::vector<float> row(static_cast<size_t>(d));  // [kv_dim] one K row in f32 (per shift, not per token)
  for (int32_t il = 0; il < shape_.n_layer; ++il) {
    std::byte* k = k_[il].data();
    std::byte* v = v_[il].data();
    std::memmove(k + begin * k_row_bytes_, k + (begin + count) * k_row_bytes_, n_move * k_row_bytes_);
    std::memmove(v + begin * v_row_bytes_, v + (begin + count) * v_row_bytes_, n_move * v_row_bytes_);
    if (rope_.n_rot == 0) continue;
    // R(p - count) = R(-count) R(p): one rotation by -count fixes every moved row.
    for (int64_t r = begin; r < begin + n_move; ++r)
      kv_rerotate_k_row(shape_, rope_, -count, k + r * k_row_bytes_, row.data());
  }
  n_tokens_ -= count;
  n_evicted_ += count;
}

void KvCache::import_rows(int32_t il, int64_t n_tokens, const uint8_t* k, const uint8_t* v) {
  KVLM_CHECK(il >= 0 && il < shape_.n_layer && n_tokens >= 0 && n_tokens <= n_ctx_);
  if (shape_.kivi()) fail("session files do not support the KIVI cache (--kv-residual)");
  reserve(n_tokens);
  std::memcpy(k_[il].data(), k, k_row_bytes_ * n_tokens);
  std::memcpy(v_[il].data(), v, v_row_bytes_ * n_tokens);
}

void KvCache::truncate(int64_t n) {
  KVLM_CHECK(n >= 0);
  if (n >= n_tokens_) return;
  // The residual's rows stay where they are (row r = position n_sealed + r), only fewer are held.
  KVLM_CHECK(n >= n_sealed_);
  n_tokens_ = n;
  n_sealed_next_ = n_sealed_;
}

void KvCache::clear() {
  n_tokens_ = 0;
  n_evicted_ = 0;
  n_sealed_ = n_sealed_next_ = 0;
  n_layers_done_ = 0;
}

KvStats KvCache::stats() const {
  KvStats s;
  s.n_tokens = n_tokens_;
  s.n_ctx = n_ctx_;
  s.capacity = capacity_;
  s.n_evicted = n_evicted_;
  s.bytes_used = kv_bytes(shape_, n_tokens_);
  // Summed from the arenas themselves so tests can check them against the planner's kv_bytes().
  for (int32_t il = 0; il < shape_.n_layer; ++il) s.bytes_allocated += k_[il].size() + v_[il].size();
  for (int32_t il = 0; il < static_cast<int32_t>(rk_.size()); ++il)
    s.bytes_allocated += rk_[il].size() + rv_[il].size();
  return s;
}

}  // namespace kvlm
