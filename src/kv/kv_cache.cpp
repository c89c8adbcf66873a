#include "kv/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "base/error.h"
#include "kv/kv_quant.h"

namespace kvlm {

void rope_inv_freq(int64_t n_rot, float freq_base, float freq_scale, std::span<const float> factors,
                   double* inv_freq) {
  kernels::rope_freqs(n_rot, freq_base, inv_freq);
  if (freq_scale == 1.0f && factors.empty()) return;
  for (int64_t i = 0; i < n_rot / 2; ++i)
    inv_freq[i] *= double{freq_scale} / (factors.empty() ? 1.0 : double{factors[i]});
}

void kv_rerotate_k_row(const KvShape& shape, const KvRope& rope, int64_t delta, std::byte* row,
                       float* row_f32) {
  if (rope.n_rot == 0 || delta == 0) return;
  const int64_t d = shape.kv_dim();
  kernels::dequantize_row(shape.dtype_k, row, row_f32, d);
  // A rotated row is H R(p) k: un-rotate (H is its own inverse), re-RoPE, rotate again.
  if (shape.rotate) kernels::hadamard(row_f32, shape.n_kv_head, shape.head_dim);
  if (rope.freq_scale == 1.0f && rope.freq_factors.empty()) {
    kernels::rope(row_f32, shape.n_kv_head, shape.head_dim, rope.n_rot, delta, rope.freq_base,
                  rope.mode);
  } else {
    // The forward pass's tables (rope_rotate equals rope() bit for bit), with the model's
    // scaled frequencies; per calling thread, so a shift allocates them once.
    thread_local std::vector<double> inv_freq, cs;  // [n_rot / 2], [2, n_rot / 2]
    inv_freq.resize(static_cast<size_t>(rope.n_rot / 2));
    cs.resize(static_cast<size_t>(rope.n_rot));
    rope_inv_freq(rope.n_rot, rope.freq_base, rope.freq_scale, rope.freq_factors, inv_freq.data());
    kernels::rope_cos_sin(inv_freq.data(), rope.n_rot / 2, delta, cs.data());
    kernels::rope_rotate(row_f32, shape.n_kv_head, shape.head_dim, rope.n_rot, cs.data(),
                         rope.mode);
  }
  if (shape.rotate) kernels::hadamard(row_f32, shape.n_kv_head, shape.head_dim);
  kv_quantize_row(shape.dtype_k, row_f32, row, d);
}

}  // namespace kvlm
