// Quantized-activation formats shared by the kernel variants (internal to src/kernels).
//
// For Q4_0, Q4_1, Q5_0, Q8_0 weights and the packed K types (Q4_K, Q5_K, Q6_K, IQ4_XS), matmul
// and dot_row first quantize each f32 activation row to 8 bits in blocks of 32 (Q8_0, or Q8_1
// for Q4_1 weights) and then run integer block dots, as llama.cpp's CPU backend does (for the K
// types with a 32-element activation block where llama.cpp uses 256). Every variant must produce
// the same codes and scales here (the fast ones are tested bit-identical against ref), so both
// variants' dots see the same inputs.
#pragma once

#include <cstddef>
#include <cstdint>

#include "tensor/dtype.h"

namespace kvlm::kernels {

// Activation block for Q4_1 weights: the Q8_0 layout plus s = d * sum(qs), both f16.
struct BlockQ8_1 {
  uint16_t d;
  uint16_t s;
  int8_t qs[32];
};
static_assert(sizeof(BlockQ8_1) == 36);

// Quantized-activation format used with weight type t; F32 (no quantization) for the others.
inline DType act_type(DType t) {
  switch (t) {
    case DType::Q4_0:
    case DType::Q5_0:
    case DType::Q8_0:
    case DType::Q4_K:  // the K types with packed kernels (ref::k_packed_type)
    case DType::Q5_K:
    case DType::Q6_K:
    case DType::IQ4_XS:
      return DType::Q8_0;
    case DType::Q4_1:
      return DType::Q8_1;
    default:
      return DType::F32;
  }
}

// Bytes of one quantized activation row of n elements (n a multiple of 32).
inline size_t act_row_bytes(DType t, int64_t n) {
  return act_type(t) == DType::Q8_1 ? static_cast<size_t>(n / 32) * sizeof(BlockQ8_1)
                                    : row_bytes(act_type(t), n);
}

}  // namespace kvlm::kernels
