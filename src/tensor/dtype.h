// Element types, numbered as GGML/GGUF numbers them so a GGUF tensor's type id maps directly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace kvlm {

enum class DType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  I8 = 24,
  I16 = 25,
  I32 = 26,
  I64 = 27,
  F64 = 28,
  BF16 = 30,
};

struct DTypeInfo {
  DType type;
  const char* name;    // GGML's spelling: "f32", "q4_1", ...
  int64_t block_size;  // elements per block (1 for plain types)
  int64_t type_size;   // bytes per block
  bool compute;        // kvlm has kernels for it (dequantize + dot)
};

// Layout info for a GGML type id, or nullptr when the id is unknown to kvlm. Known-but-not-compute
// types can be parsed (sizes are right) but not used as weights.
const DTypeInfo* dtype_info(uint32_t id);
const DTypeInfo& dtype_info(DType t);
inline const char* dtype_name(DType t) { return dtype_info(t).name; }
// Parses "f32", "f16", "q8_0", ... (case-insensitive).
std::optional<DType> dtype_from_name(std::string_view name);

// Bytes for n elements of type t; n must be a multiple of the block size (checked by callers that
// read untrusted shapes, see gguf).
inline size_t row_bytes(DType t, int64_t n) {
  const DTypeInfo& i = dtype_info(t);
  return static_cast<size_t>(n / i.block_size * i.type_size);
}

// ---- half precision ---------------------------------------------------------------------------
// IEEE binary16 <-> binary32, round-to-nearest-even, handling subnormals, inf and NaN.
float fp16_to_fp32_slow(uint16_t h);
// Inline fast path for normal numbers (the common case: block scales in quantized rows), falling
// back to the general conversion for zero, subnormals, inf and NaN.
inline float fp16_to_fp32(uint16_t h) {
  const uint32_t exp = (h >> 10) & 0x1f;
  if (exp == 0 || exp == 31) return fp16_to_fp32_slow(h);
  const uint32_t bits = static_cast<uint32_t>(h & 0x8000) << 16 | ((h & 0x7fffu) + 0x1c000u) << 13;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
uint16_t fp32_to_fp16(float f);
inline float bf16_to_fp32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t fp32_to_bf16(float f);

// ---- quantized block layouts (bit-exact with GGML) --------------------------------------------
constexpr int kQK4_0 = 32;
struct BlockQ4_0 {
  uint16_t d;              // f16 scale
  uint8_t qs[kQK4_0 / 2];  // nibbles: low = elements 0..15, high = 16..31; value = (q - 8) * d
};
static_assert(sizeof(BlockQ4_0) == 18);

constexpr int kQK4_1 = 32;
struct BlockQ4_1 {
  uint16_t d;              // f16 scale
  uint16_t m;              // f16 min; value = q * d + m
  uint8_t qs[kQK4_1 / 2];  // nibbles as Q4_0
};
static_assert(sizeof(BlockQ4_1) == 20);

constexpr int kQK8_0 = 32;
struct BlockQ8_0 {
  uint16_t d;         // f16 scale
  int8_t qs[kQK8_0];  // value = q * d
};
static_assert(sizeof(BlockQ8_0) == 34);

constexpr int kQK_K = 256;
struct BlockQ6_K {
  uint8_t ql[kQK_K / 2];      // low 4 bits
  uint8_t qh[kQK_K / 4];      // high 2 bits
  int8_t scales[kQK_K / 16];  // 8-bit sub-block scales
  uint16_t d;                 // f16 super-block scale
};
static_assert(sizeof(BlockQ6_K) == 210);

}  // namespace kvlm
