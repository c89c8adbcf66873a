// Random rows of quantized block types for the kernel tests: random bytes (so every code and every
// sub-block scale encoding occurs) with small f16 scales, as a weight file has them. Used for the
// types kvlm cannot quantize, and for random codes of those it can.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "tensor/dtype.h"

namespace kvlm::test {

// Byte offsets in a block of type t of its f16 scale fields: the scale, then (types with a min or
// a mins' scale) that field. Empty for plain types and types without kernels.
inline std::vector<size_t> f16_scale_offsets(DType t) {
  switch (t) {
    case DType::Q4_0:
    case DType::Q5_0:
    case DType::Q8_0:
    case DType::IQ4_NL:
    case DType::IQ4_XS:
      return {0};
    case DType::Q4_1:
    case DType::Q5_1:
    case DType::Q4_K:
    case DType::Q5_K:
      return {0, 2};
    case DType::Q2_K:
      return {offsetof(BlockQ2_K, d), offsetof(BlockQ2_K, dmin)};
    case DType::Q3_K:
      return {offsetof(BlockQ3_K, d)};
    case DType::Q6_K:
      return {offsetof(BlockQ6_K, d)};
    default:
      return {};
  }
}

// n elements of block type t at dst: random bytes, then per block a scale uniform in
// [-0.02, 0.02] and a second field (min, or mins' scale) 8 times that range.
inline void random_block_row(DType t, int64_t n, std::mt19937& rng, uint8_t* dst) {
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(-0.02f, 0.02f);
  for (size_t i = 0; i < row_bytes(t, n); ++i) dst[i] = static_cast<uint8_t>(byte(rng));
  const DTypeInfo& info = dtype_info(t);
  const std::vector<size_t> fields = f16_scale_offsets(t);
  for (int64_t b = 0; b < n / info.block_size; ++b) {
    uint8_t* blk = dst + b * static_cast<size_t>(info.type_size);
    for (size_t k = 0; k < fields.size(); ++k) {
      const uint16_t h = fp32_to_fp16(scale(rng) * (k == 0 ? 1.0f : 8.0f));
      std::memcpy(blk + fields[k], &h, 2);
    }
  }
}

// Every type kvlm computes with (DTypeInfo::compute), in GGML's numbering.
inline std::vector<DType> compute_types() {
  std::vector<DType> out;
  for (const DTypeInfo& info : dtype_infos())
    if (info.compute) out.push_back(info.type);
  return out;
}

}  // namespace kvlm::test
