// Weights packed for the quantized matmul (internal to src/kernels and its tests).
//
// A Q4_0, Q4_1, Q8_0 (Q5_0, Q5_1, IQ4_NL: see below) matrix is repacked once, at load, into
// groups of kGroupRows = 8 rows (row r in group r / 8, lane r % 8; a last group short of rows
// is padded with zero blocks). Each group stores its n_blocks = n_cols / 32 blocks in order; a
// packed block holds the same block (same 32 columns) of all 8 rows, with the rows' codes
// interleaved 4 bytes at a time:
//
//   qs[v][4 k + j] = row k's qs[4 v + j]      (the byte of GGML's block, unchanged)
//
// So one 32-byte vector holds 4 consecutive codes of each of the 8 rows, and a vector dot with the
// activation's 4 codes broadcast to every lane gives 8 rows' partial sums at once, each row in its
// own 32-bit lane: no horizontal sums, and one scale product per block for 8 rows. For Q4 the
// byte holds two codes, as in GGML: low nibble = column 4 v + j, high nibble = column 16 + 4 v + j.
// Packing moves bytes only; the values (and, in every variant, the arithmetic of matmul) are those
// of the unpacked rows, so matmul gives the same bits with or without TensorView::packed.
#pragma once

#include <cstddef>
#include <cstdint>

#include "tensor/dtype.h"
#include "tensor/tensor.h"

namespace kvlm::kernels {

constexpr int64_t kGroupRows = 8;

struct PackedQ4_0 {
  uint16_t d[8];       // f16 scales of rows 0..7
  uint8_t qs[4][32];   // [v][4 k + j] = row k's qs[4 v + j]
};
static_assert(sizeof(PackedQ4_0) == 8 * sizeof(BlockQ4_0));

struct PackedQ4_1 {
  uint16_t d[8];       // f16 scales
  uint16_t m[8];       // f16 mins
  uint8_t qs[4][32];   // as PackedQ4_0
};
static_assert(sizeof(PackedQ4_1) == 8 * sizeof(BlockQ4_1));

struct PackedQ8_0 {
  uint16_t d[8];      // f16 scales
  int8_t qs[8][32];   // [v][4 k + j] = row k's qs[4 v + j]
};
static_assert(sizeof(PackedQ8_0) == 8 * sizeof(BlockQ8_0));

// Q5_0: Q4_0's layout for the low 4 bits of the 5-bit codes (0..31, value (code - 16) * d), and
// the fifth bits as PackedQ5_K's qh below: qh[4 k + j] bit i = column 4 i + j, bit 4 + i =
// column 16 + 4 i + j.
struct PackedQ5_0 {
  uint16_t d[8];      // f16 scales of rows 0..7
  uint8_t qh[32];     // fifth bits
  uint8_t qs[4][32];  // as PackedQ4_0
};
static_assert(sizeof(PackedQ5_0) == 8 * sizeof(BlockQ5_0));

// Q5_1: PackedQ5_0 with the f16 mins (codes 0..31, value code * d + m).
struct PackedQ5_1 {
  uint16_t d[8];      // f16 scales
  uint16_t m[8];      // f16 mins
  uint8_t qh[32];     // fifth bits, as PackedQ5_0
  uint8_t qs[4][32];  // as PackedQ4_0
};
static_assert(sizeof(PackedQ5_1) == 8 * sizeof(BlockQ5_1));

// IQ4_NL: PackedQ4_0's layout, the nibbles being indices into kIq4nlValues.
struct PackedIQ4_NL {
  uint16_t d[8];
  uint8_t qs[4][32];
};
static_assert(sizeof(PackedIQ4_NL) == 8 * sizeof(BlockIQ4_NL));

// The K types (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS) pack one 256-column super-block of the 8
// rows per packed block, read as integers (ref::k_block_ints: value = d * sc[e / 16] * q[e] -
// dmin * m[e / 16]).
// Each 32-column sub-block b keeps the Q4 layout above for the low 4 bits of its codes (Q6_K's
// codes stored as q + 32, 0..63; IQ4_XS's as their table index) and, per row k, its two 16-column
// scales (or scale and min) as a pair of bytes [k][2], so one 16-byte load widens to 8 lanes of
// int16 pairs. Q6_K's 2 high bits: qh[u][4 k + j] bits 2 i, 2 i + 1 = high bits of column
// 16 u + 4 i + j. Q5_K's fifth bits: qh[4 k + j] bit i = column 4 i + j, bit 4 + i = 16 + 4 i + j.
// Q2_K's 2-bit codes and Q3_K's low 2 bits (Q3_K's codes stored as q + 4, 0..7) take Q6_K's qh
// layout (qs[u][4 k + j] bits 2 i, 2 i + 1 = column 16 u + 4 i + j); Q3_K's third bits Q5_K's.
struct PackedQ4_K {
  uint16_t d[8];     // f16 super-block scales of rows 0..7
  uint16_t dmin[8];  // f16 scales of the mins
  struct Sub {
    uint8_t sm[8][2];  // [row][scale, min], 0..63
    uint8_t qs[4][32];
  } b[8];
};
// The 6-bit scales and mins unpacked to bytes: 32 bytes more than the 8 GGUF blocks (+2.8%).
static_assert(sizeof(PackedQ4_K) == 8 * sizeof(BlockQ4_K) + 32);

struct PackedQ5_K {
  uint16_t d[8];
  uint16_t dmin[8];
  struct Sub {
    uint8_t sm[8][2];
    uint8_t qs[4][32];
    uint8_t qh[32];  // fifth bits, as above
  } b[8];
};
static_assert(sizeof(PackedQ5_K) == 8 * sizeof(BlockQ5_K) + 32);  // as Q4_K

struct PackedQ6_K {
  uint16_t d[8];
  struct Sub {
    int8_t sc[8][2];  // [row][scale of columns 0..15, of 16..31]
    uint8_t qs[4][32];  // low 4 bits
    uint8_t qh[2][32];  // high 2 bits, as above
  } b[8];
};
static_assert(sizeof(PackedQ6_K) == 8 * sizeof(BlockQ6_K));

// Q2_K: the GGUF block's bytes re-laid, no larger: per row a byte per 16 columns holding
// scale | min << 4 (both 0..15), as in the file.
struct PackedQ2_K {
  uint16_t d[8];
  uint16_t dmin[8];
  struct Sub {
    uint8_t sm[8][2];   // [row][scale | min << 4 of columns 0..15, of 16..31]
    uint8_t qs[2][32];  // 2-bit codes, as above
  } b[8];
};
static_assert(sizeof(PackedQ2_K) == 8 * sizeof(BlockQ2_K));

struct PackedQ3_K {
  uint16_t d[8];
  struct Sub {
    int8_t sc[8][2];    // [row][scale of columns 0..15, of 16..31], -32..31
    uint8_t qs[2][32];  // low 2 bits, as above
    uint8_t qh[32];     // third bits, as Q5_K's fifth
  } b[8];
};
static_assert(sizeof(PackedQ3_K) == 8 * sizeof(BlockQ3_K) + 32);  // scales unpacked

struct PackedIQ4_XS {
  uint16_t d[8];
  struct Sub {
    int8_t sc[8];  // [row] scale, -32..31 (one per 32 columns: no pair)
    uint8_t qs[4][32];
  } b[8];
};
static_assert(sizeof(PackedIQ4_XS) == 8 * sizeof(BlockIQ4_XS) + 16);  // scales unpacked

// Bytes of one packed block (8 rows x packed_block_cols(t) columns) of type t; 0 when t has no
// packed layout.
size_t packed_block_bytes(DType t);
// Columns per packed block: 256 for the K types, 32 for the others.
int64_t packed_block_cols(DType t);

// Bytes of one packed group of w (n_cols / packed_block_cols packed blocks).
size_t packed_group_bytes(const TensorView& w);
// Row groups of w: ceil(n_rows / 8).
int64_t packed_groups(const TensorView& w);
// (Defined out of line in pack.cpp, not inline here: this header is also read by the AVX2 files,
// and an inline copy they emitted could be the one the linker keeps; see ../CMakeLists.txt.)

// Packs rows [8 g, 8 g + 8) of w (zero blocks past the last row) into dst[packed_group_bytes(w)].
// w.dtype must be packable; w.n_cols a multiple of packed_block_cols.
void pack_group(const TensorView& w, int64_t g, uint8_t* dst);

}  // namespace kvlm::kernels
