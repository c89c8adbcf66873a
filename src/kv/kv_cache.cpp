#include "kv/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "base/error.h"
#include "kv/kv_quant.h"

namespace kvlm {

namespace {

// The pair index at which a RoPE frequency turns n_turns times over the n_ctx_orig positions the
// model was trained on: pair i turns n_ctx_orig * base^(-2i / n_rot) / (2 pi) times, solved for i.
double yarn_pair_turning(const KvRope& r, float freq_base, double n_turns) {
  return r.n_rot * std::log(r.n_ctx_orig / (n_turns * 2.0 * M_PI)) /
         (2.0 * std::log(double{freq_base}));
}

}  // namespace

void rope_inv_freq(const KvRope& r, float freq_base, double* inv_freq) {
  kernels::rope_freqs(r.n_rot, freq_base, inv_freq);
  const int64_t n_pairs = r.n_rot / 2;
  for (int64_t i = 0; i < n_pairs; ++i)
    if (!r.freq_factors.empty()) inv_freq[i] /= double{r.freq_factors[i]};
  if (r.ext_factor == 0.0f) {
    if (r.freq_scale != 1.0f)
      for (int64_t i = 0; i < n_pairs; ++i) inv_freq[i] *= double{r.freq_scale};
    return;
  }
  // The ramp's ends are whole pairs, clamped to [0, n_rot - 1] as llama.cpp's corr_dims are.
  const double lo = std::max(0.0, std::floor(yarn_pair_turning(r, freq_base, r.beta_fast)));
  const double hi =
      std::min(double(r.n_rot - 1), std::ceil(yarn_pair_turning(r, freq_base, r.beta_slow)));
  for (int64_t i = 0; i < n_pairs; ++i) {
    const double y = (double(i) - lo) / std::max(0.001, hi - lo);
    const double keep = (1.0 - std::clamp(y, 0.0, 1.0)) * r.ext_factor;  // 1: not interpolated
    inv_freq[i] *= r.freq_scale * (1.0 - keep) + keep;
  }
}

void kv_rerotate_k_row(const KvShape& shape, const KvRope& rope, int64_t delta, std::byte* row,
                       float* row_f32, int32_t il) {
  if (rope.n_rot == 0 || delta == 0) return;
  const int64_t d = shape.kv_dim();
  kernels::dequantize_row(shape.dtype_k, row, row_f32, d);
  // A rotated row is H R(p) k: un-rotate (H is its own inverse), re-RoPE, rotate again.
  if (shape.rotate) kernels::hadamard(row_f32, shape.n_kv_head, shape.head_dim);
  if (rope.freq_scale == 1.0f && rope.freq_factors.empty() && rope.ext_factor == 0.0f) {
    kernels::rope(row_f32, shape.n_kv_head, shape.head_dim, rope.n_rot, delta, rope.base_of(il),
                  rope.mode);
  } else {
    // The forward pass's tables (rope_rotate equals rope() bit for bit), with the model's
    // scaled frequencies; per calling thread, so a shift allocates them once. No magnitude
    // factor (YaRN's mscale, LongRoPE's attn_factor): the stored row carries it once already
    // (llama.cpp's K shift applies it again).
    thread_local std::vector<double> inv_freq, cs;  // [n_rot / 2], [2, n_rot / 2]
    inv_freq.resize(static_cast<size_t>(rope.n_rot / 2));
    cs.resize(static_cast<size_t>(rope.n_rot));
    rope_inv_freq(rope, rope.base_of(il), inv_freq.data());
    kernels::rope_cos_sin(inv_freq.data(), rope.n_rot / 2, delta, cs.data());
    kernels::rope_rotate(row_f32, shape.n_kv_head, shape.head_dim, rope.n_rot, cs.data(),
                         rope.mode);
  }
  if (shape.rotate) kernels::hadamard(row_f32, shape.n_kv_head, shape.head_dim);
  kv_quantize_row(shape.dtype_k, row_f32, row, d);
}

}  // namespace kvlm
