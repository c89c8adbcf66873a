#include "kv/kv_shape.h"

#include "base/error.h"

namespace kvlm {

size_t kv_k_row_bytes(const KvShape& s) { return row_bytes(s.dtype_k, s.kv_dim()); }
size_t kv_v_row_bytes(const KvShape& s) { return row_bytes(s.dtype_v, s.kv_dim()); }

size_t kv_bytes_per_token_layer(const KvShape& s) { return kv_k_row_bytes(s) + kv_v_row_bytes(s); }

size_t kv_bytes_per_token(const KvShape& s) {
  return kv_bytes_per_token_layer(s) * static_cast<size_t>(s.n_layer);
}

size_t kv_bytes(const KvShape& s, int64_t n_tokens) {
  uint64_t out = 0;
  if (n_tokens < 0 || !checked_mul(kv_bytes_per_token(s), static_cast<uint64_t>(n_tokens), &out))
    fail("KV cache size for {} tokens overflows", n_tokens);
  return out;
}

void validate(const KvShape& s) {
  if (s.n_layer <= 0 || s.n_kv_head <= 0 || s.head_dim <= 0)
    fail("invalid KV shape: n_layer={} n_kv_head={} head_dim={} (all must be positive)", s.n_layer,
         s.n_kv_head, s.head_dim);
  for (DType t : {s.dtype_k, s.dtype_v}) {
    if (t != DType::F32 && t != DType::F16)
      fail("unsupported KV cache type '{}' (supported: f32, f16)", dtype_name(t));
  }
}

}  // namespace kvlm
