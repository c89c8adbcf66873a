#include "kv/kv_cache.h"

#include "base/error.h"
#include "kernels/ops.h"

namespace kvlm {

KvCache::KvCache(const KvShape& shape, int64_t n_ctx) : shape_(shape), n_ctx_(n_ctx) {
  validate(shape);
  if (n_ctx <= 0) fail("KV cache context must be positive, got {}", n_ctx);
  kv_bytes(shape, n_ctx);  // throws on overflow before we allocate anything
  k_row_bytes_ = kv_k_row_bytes(shape);
  v_row_bytes_ = kv_v_row_bytes(shape);
  k_.reserve(shape.n_layer);
  v_.reserve(shape.n_layer);
  for (int32_t il = 0; il < shape.n_layer; ++il) {
    k_.emplace_back(k_row_bytes_ * static_cast<size_t>(n_ctx));
    v_.emplace_back(v_row_bytes_ * static_cast<size_t>(n_ctx));
  }
}

void KvCache::write(int32_t il, int64_t pos, int64_t n, const float* k, const float* v) {
  KVLM_CHECK(il >= 0 && il < shape_.n_layer && pos >= 0 && n >= 0 && pos + n <= n_ctx_);
  const int64_t d = shape_.kv_dim();
  for (int64_t i = 0; i < n; ++i) {
    kernels::quantize_row(shape_.dtype_k, k + i * d, k_[il].data() + (pos + i) * k_row_bytes_, d);
    kernels::quantize_row(shape_.dtype_v, v + i * d, v_[il].data() + (pos + i) * v_row_bytes_, d);
  }
}

void KvCache::commit(int64_t n_tokens) {
  KVLM_CHECK(n_tokens >= 0 && n_tokens <= n_ctx_);
  n_tokens_ = n_tokens;
}

KvLayerView KvCache::view(int32_t il, int64_t n_visible) const {
  KVLM_CHECK(il >= 0 && il < shape_.n_layer && n_visible >= 0 && n_visible <= n_ctx_);
  KvLayerView out;
  out.dtype_k = shape_.dtype_k;
  out.dtype_v = shape_.dtype_v;
  out.k = reinterpret_cast<const uint8_t*>(k_[il].data());
  out.v = reinterpret_cast<const uint8_t*>(v_[il].data());
  out.k_row_bytes = k_row_bytes_;
  out.v_row_bytes = v_row_bytes_;
  out.n_tokens = n_visible;
  return out;
}

void KvCache::truncate(int64_t n) {
  KVLM_CHECK(n >= 0);
  if (n < n_tokens_) n_tokens_ = n;
}

KvStats KvCache::stats() const {
  KvStats s;
  s.n_tokens = n_tokens_;
  s.n_ctx = n_ctx_;
  s.bytes_used = kv_bytes(shape_, n_tokens_);
  // Summed from the arenas themselves so tests can check them against the planner's kv_bytes().
  for (int32_t il = 0; il < shape_.n_layer; ++il) s.bytes_allocated += k_[il].size() + v_[il].size();
  return s;
}

}  // namespace kvlm
