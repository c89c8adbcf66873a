// Non-owning 2-D views over weight and activation memory.
#pragma once

#include <cstddef>
#include <cstdint>

#include "tensor/dtype.h"

namespace kvlm {

// A matrix of n_rows rows, each n_cols elements of `dtype`, rows row_stride bytes apart.
// For a GGUF weight with GGML shape ne = [ne0, ne1]: n_cols = ne0 (the contiguous dimension,
// the input size of a linear layer), n_rows = ne1 (the output size).
struct TensorView {
  DType dtype = DType::F32;
  const void* data = nullptr;
  int64_t n_rows = 0;
  int64_t n_cols = 0;
  size_t row_stride = 0;  // bytes
  // Optional: the same matrix repacked by kernels::pack_weights (interleaved groups of 8 rows,
  // layout in kernels/packed.h), or null. Only the quantized matmul reads it; the values, and
  // matmul's results, are the same with or without. Must describe exactly this view's rows.
  const void* packed = nullptr;

  bool empty() const { return data == nullptr; }
  const uint8_t* row(int64_t r) const {
    return static_cast<const uint8_t*>(data) + static_cast<size_t>(r) * row_stride;
  }
  const float* f32() const { return static_cast<const float*>(data); }
};

}  // namespace kvlm
