// Element types, numbered as GGML/GGUF numbers them so a GGUF tensor's type id maps directly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
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
  IQ2_XXS = 16,
  IQ2_XS = 17,
  IQ3_XXS = 18,
  IQ1_S = 19,
  IQ4_NL = 20,
  IQ3_S = 21,
  IQ2_S = 22,
  IQ4_XS = 23,
  I8 = 24,
  I16 = 25,
  I32 = 26,
  I64 = 27,
  F64 = 28,
  IQ1_M = 29,
  BF16 = 30,
  TQ1_0 = 34,
  TQ2_0 = 35,
  MXFP4 = 39,
  NVFP4 = 40,
  Q1_0 = 41,
};

struct DTypeInfo {
  DType type;
  const char* name;    // GGML's spelling: "f32", "q4_1", ...
  int64_t block_size;  // elements per block (1 for plain types)
  int64_t type_size;   // bytes per block
  bool compute;        // kvlm has kernels for it (dequantize_row, dot_row, matmul)
};

// Layout info for a GGML type id, or nullptr when the id is unknown to kvlm. Known-but-not-compute
// types can be parsed (sizes are right, so any valid GGUF file parses) but not used as weights.
const DTypeInfo* dtype_info(uint32_t id);
const DTypeInfo& dtype_info(DType t);
// Every type kvlm knows, in GGML's numbering.
std::span<const DTypeInfo> dtype_infos();
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

// Q5_0/Q5_1: Q4_0/Q4_1 plus a fifth bit per element, bit j of qh (little-endian u32) for element j.
constexpr int kQK5_0 = 32;
struct BlockQ5_0 {
  uint16_t d;              // f16 scale
  uint8_t qh[4];           // high bits; value = ((nibble | high << 4) - 16) * d
  uint8_t qs[kQK5_0 / 2];  // nibbles as Q4_0
};
static_assert(sizeof(BlockQ5_0) == 22);

constexpr int kQK5_1 = 32;
struct BlockQ5_1 {
  uint16_t d;              // f16 scale
  uint16_t m;              // f16 min; value = (nibble | high << 4) * d + m
  uint8_t qh[4];           // high bits as Q5_0
  uint8_t qs[kQK5_1 / 2];  // nibbles as Q4_0
};
static_assert(sizeof(BlockQ5_1) == 24);

// IQ4_NL: Q4_0's layout, but each nibble indexes a fixed non-uniform table (kIq4nlValues).
constexpr int kQK4_NL = 32;
struct BlockIQ4_NL {
  uint16_t d;               // f16 scale; value = kIq4nlValues[nibble] * d
  uint8_t qs[kQK4_NL / 2];  // nibbles as Q4_0
};
static_assert(sizeof(BlockIQ4_NL) == 18);
// The 16 code points of IQ4_NL and IQ4_XS (GGML's kvalues_iq4nl): denser near zero, where most
// weights are.
inline constexpr int8_t kIq4nlValues[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                            1,    13,   25,  38,  53,  69,  89,  113};

// ---- K-quants: super-blocks of 256 elements in sub-blocks of 16 or 32, each with its own small
// scale (and min) relative to the f16 super-block scale d (and dmin).
constexpr int kQK_K = 256;
// Q4_K/Q5_K pack 8 six-bit scales and 8 six-bit mins into 12 bytes (see dequant_q4_k in ref).
constexpr int kKScaleBytes = 12;

struct BlockQ2_K {
  uint8_t scales[kQK_K / 16];  // per 16 elements: low nibble scale, high nibble min
  uint8_t qs[kQK_K / 4];       // 2-bit codes; value = d * scale * q - dmin * min
  uint16_t d;                  // f16 super-block scale
  uint16_t dmin;               // f16 super-block scale of the mins
};
static_assert(sizeof(BlockQ2_K) == 84);

struct BlockQ3_K {
  uint8_t hmask[kQK_K / 8];  // high bit of each 3-bit code (set: +0, clear: -4)
  uint8_t qs[kQK_K / 4];     // low 2 bits of each code
  uint8_t scales[12];        // 16 six-bit scales, stored + 32
  uint16_t d;                // f16 super-block scale; value = d * (scale - 32) * q
};
static_assert(sizeof(BlockQ3_K) == 110);

struct BlockQ4_K {
  uint16_t d;                    // f16 super-block scale
  uint16_t dmin;                 // f16 super-block scale of the mins
  uint8_t scales[kKScaleBytes];  // 8 six-bit scales and mins, one per 32 elements
  uint8_t qs[kQK_K / 2];         // nibbles; value = d * scale * q - dmin * min
};
static_assert(sizeof(BlockQ4_K) == 144);

struct BlockQ5_K {
  uint16_t d;                    // f16 super-block scale
  uint16_t dmin;                 // f16 super-block scale of the mins
  uint8_t scales[kKScaleBytes];  // as Q4_K
  uint8_t qh[kQK_K / 8];         // fifth bit of each code
  uint8_t qs[kQK_K / 2];         // low nibbles; value = d * scale * q - dmin * min
};
static_assert(sizeof(BlockQ5_K) == 176);

// IQ4_XS: IQ4_NL's code points in a 256-element super-block with a 6-bit scale per 32 elements.
struct BlockIQ4_XS {
  uint16_t d;                   // f16 super-block scale
  uint16_t scales_h;            // high 2 bits of the 8 scales, 2 bits each
  uint8_t scales_l[kQK_K / 64];  // low 4 bits of the 8 scales, a nibble each
  uint8_t qs[kQK_K / 2];        // nibbles indexing kIq4nlValues; value = d * (scale - 32) * v
};
static_assert(sizeof(BlockIQ4_XS) == 136);

struct BlockQ6_K {
  uint8_t ql[kQK_K / 2];      // low 4 bits
  uint8_t qh[kQK_K / 4];      // high 2 bits
  int8_t scales[kQK_K / 16];  // 8-bit sub-block scales
  uint16_t d;                 // f16 super-block scale
};
static_assert(sizeof(BlockQ6_K) == 210);

}  // namespace kvlm
