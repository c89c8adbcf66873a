// Quantized-activation formats shared by the kernel variants (internal to src/kernels).
//
// For Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL weights and the packed K types (Q2_K .. Q6_K, IQ4_XS),
// matmul and dot_row first quantize each f32 activation row to 8 bits and then run integer block
// dots, as llama.cpp's CPU backend does: in blocks of 32 (Q8_0, or Q8_1 for Q4_1 and Q5_1 weights)
// for the 32-column types, in super-blocks of 256 with one f32 scale (BlockQ8_K) for the K types,
// so the activation rounding is llama.cpp's. Every variant must produce the same codes and scales
// here (the fast ones are tested bit-identical against ref), so both variants' dots see the same
// inputs.
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

// Activation super-block for the K types: 256 codes with one f32 scale d (value = d * code),
// and the sums of each 16 codes, so a weight sub-block's min (Q4_K, Q5_K) or code offset
// (Q6_K's - 32) multiplies one sum instead of re-reading the codes. The GGUF Q8_K layout and size.
struct BlockQ8_K {
  float d;
  int8_t qs[256];     // [256] codes, -127..127
  int16_t sums[16];   // [16] sums of qs[16 j .. 16 j + 16)
};
static_assert(sizeof(BlockQ8_K) == 292);

// Quantized-activation format used with weight type t; F32 (no quantization) for the others.
inline DType act_type(DType t) {
  switch (t) {
    case DType::Q4_0:
    case DType::Q5_0:  // as llama.cpp: Q5_0 rows are 32-column blocks
    case DType::Q8_0:
    case DType::IQ4_NL:
      return DType::Q8_0;
    case DType::Q2_K:  // the K types with packed kernels (ref::k_packed_type)
    case DType::Q3_K:
    case DType::Q4_K:
    case DType::Q5_K:
    case DType::Q6_K:
    case DType::IQ4_XS:
      return DType::Q8_K;
    case DType::Q4_1:
    case DType::Q5_1:  // as llama.cpp: the weights' min needs the activations' sum
      return DType::Q8_1;
    default:
      return DType::F32;
  }
}

// Bytes of one quantized activation row of n elements (n a multiple of 32; of 256 for Q8_K).
inline size_t act_row_bytes(DType t, int64_t n) {
  return act_type(t) == DType::Q8_1 ? static_cast<size_t>(n / 32) * sizeof(BlockQ8_1)
                                    : row_bytes(act_type(t), n);
}

}  // namespace kvlm::kernels
