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

}  // namespace kvlm
