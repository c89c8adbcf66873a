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

bool kv_type_supported(DType t) {
  for (DType k : kKvTypes)
    if (k == t) return true;
  return false;
}

std::string kv_supported_types() {
  std::string out;
  for (DType k : kKvTypes) out += std::string(out.empty() ? "" : ", ") + dtype_name(k);
  return out;
}

void validate(const KvShape& s) {
  if (s.n_layer <= 0 || s.n_kv_head <= 0 || s.head_dim <= 0)
    fail("invalid KV shape: n_layer={} n_kv_head={} head_dim={} (all must be positive)", s.n_layer,
         s.n_kv_head, s.head_dim);
  for (DType t : {s.dtype_k, s.dtype_v}) {
    if (!kv_type_supported(t))
      fail("unsupported KV cache type '{}' (supported: {})", dtype_name(t), kv_supported_types());
    // Attention slices rows per head, so a quantization block must not straddle two heads.
    const int64_t block = dtype_info(t).block_size;
    if (s.head_dim % block != 0)
      fail("KV cache type '{}' needs head_dim to be a multiple of {}, got {}", dtype_name(t), block,
           s.head_dim);
  }
}

}  // namespace kvlm
