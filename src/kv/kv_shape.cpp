#include "kv/kv_shape.h"

#include "base/error.h"

namespace kvlm {

size_t kv_kivi_group_bytes(const KvShape& s) {
  return static_cast<size_t>(s.kv_dim()) * (4 + static_cast<size_t>(s.kivi_group) / 2);
}

size_t kv_k_row_bytes(const KvShape& s) {
  // validate() makes a KIVI kv_dim a multiple of 32, so the group's bytes divide by 32, 64 or 128
  // tokens.
  if (s.kivi()) return kv_kivi_group_bytes(s) / static_cast<size_t>(s.kivi_group);
  return row_bytes(s.dtype_k, s.kv_dim());
}
size_t kv_v_row_bytes(const KvShape& s) { return row_bytes(s.dtype_v, s.kv_dim()); }

size_t kv_bytes_per_token_layer(const KvShape& s) { return kv_k_row_bytes(s) + kv_v_row_bytes(s); }

size_t kv_bytes_per_token(const KvShape& s) {
  return kv_bytes_per_token_layer(s) * static_cast<size_t>(s.n_layer);
}

size_t kv_bytes(const KvShape& s, int64_t n_tokens) {
  uint64_t out = 0;
  if (n_tokens < 0) fail("KV cache size for {} tokens overflows", n_tokens);
  if (!s.kivi()) {
    if (!checked_mul(kv_bytes_per_token(s), static_cast<uint64_t>(n_tokens), &out))
      fail("KV cache size for {} tokens overflows", n_tokens);
    return out;
  }
  // Per layer: sealed K groups + sealed V rows + f16 residual K and V rows.
  const uint64_t n_sealed = static_cast<uint64_t>(kv_kivi_sealed_cap(s, n_tokens));
  const uint64_t n_resid = static_cast<uint64_t>(kv_kivi_residual_cap(s, n_tokens));
  const uint64_t n_groups = n_sealed / static_cast<uint64_t>(s.kivi_group);
  uint64_t k = 0, v = 0, r = 0, layer = 0;
  const bool ok = checked_mul(n_groups, kv_kivi_group_bytes(s), &k) &&
                  checked_mul(n_sealed, kv_v_row_bytes(s), &v) &&
                  checked_mul(n_resid, 2 * 2 * static_cast<uint64_t>(s.kv_dim()), &r) &&
                  checked_add(k, v, &layer) && checked_add(layer, r, &layer) &&
                  checked_mul(layer, static_cast<uint64_t>(s.n_layer), &out);
  if (!ok) fail("KV cache size for {} tokens overflows", n_tokens);
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
  if (s.rotate && (s.head_dim & (s.head_dim - 1)) != 0)
    fail("the Hadamard-rotated cache (--kv-rotate) needs head_dim to be a power of two, got {}",
         s.head_dim);
  if (s.rotate && s.kivi())
    fail("--kv-rotate cannot be combined with the KIVI cache (--kv-residual)");
  for (const bool is_k : {true, false}) {
    const DType t = is_k ? s.dtype_k : s.dtype_v;
    if (!kv_type_supported(t))
      fail("unsupported KV cache type '{}' (supported: {})", dtype_name(t), kv_supported_types());
    // Attention slices rows per head, so a quantization block must not straddle two heads.
    // KIVI's K is not in q4_0 blocks but per channel, two 4-bit codes a byte: an even head_dim.
    const int64_t block = is_k && s.kivi() ? 2 : dtype_info(t).block_size;
    if (s.head_dim % block != 0)
      fail("KV cache type '{}' needs head_dim to be a multiple of {}, got {}", dtype_name(t), block,
           s.head_dim);
  }
  if (s.kivi()) {
    if (s.dtype_k != DType::Q4_0)
      fail("the KIVI cache (--kv-residual) stores K per channel in 4 bits at q4_0's 0.5625 "
           "bytes/value: use -ctk q4_0 (got -ctk {})", dtype_name(s.dtype_k));
    if (s.kivi_group != 32 && s.kivi_group != 64 && s.kivi_group != 128)
      fail("KIVI group of {} tokens: use 32, 64 or 128", s.kivi_group);
    // A group's bytes kv_dim x (4 + G / 2) then divide into G rows (kv_k_row_bytes).
    if (s.kv_dim() % 32 != 0)
      fail("the KIVI cache (--kv-residual) needs n_kv_head x head_dim to be a multiple of 32, "
           "got {}", s.kv_dim());
  }
}

}  // namespace kvlm
