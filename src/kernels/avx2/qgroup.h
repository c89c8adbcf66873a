// The quantized matmul's group kernels, shared by the AVX2 file (ops_avx2.cpp, which runs the
// matmul), the AVX-512 VNNI file (vnni_avx2.cpp) and the AMX file (amx_avx2.cpp), which supply
// faster kernels of the same arithmetic. Plain declarations only, and act_at with internal linkage: no inline code that one
// file's instruction set could compile and the linker pick for another (see ../CMakeLists.txt).
#pragma once

#include <cstddef>
#include <cstdint>

#include "tensor/dtype.h"

namespace kvlm::kernels::avx2 {

// Quantized activations as the group kernels read them: the blocks (bytes identical to ref's)
// plus per-block numbers widened once, so the inner loop broadcasts a float or an int instead of
// converting a half for every (block, token). Codes of token t, block ib: q + t * q_stride +
// ib * blk + qs_off (32 int8).
struct Acts {
  const uint8_t* q;  // [n_tok, q_stride] bytes: Q8_0, Q8_1 or Q8_K blocks
  size_t q_stride;
  size_t blk;        // bytes per block: 34 (Q8_0) or 36 (Q8_1)
  size_t qs_off;     // offset of the 32 codes in a block
  // Per-block numbers, token t and block ib at [act_at(*this, t, ib)] (tokens in tiles of 16;
  // n_tok * n_blocks of each):
  const float* d;    // d
  const float* s;    // Q8_1's s = d * sum(codes) (Q4_1 weights)
  const int32_t* c;  // Q4_0 weights: 8 * sum(codes) (the nibbles' "+ 8");
                     // Q8_0 weights: 128 * sum(codes) (the VNNI kernels' codes + 128)
  int64_t n_blocks;
  int64_t n_tok;
  // For the tile kernels (null when the variant has none or n_tok < 16): the codes again, block by
  // block for each 16-token tile, so a tile's block is 512 contiguous bytes:
  // [n_tok / 16, n_blocks, 16 tokens, 32] int8 (whole tiles only).
  const int8_t* panel = nullptr;
};

// Tokens per tile of the per-block numbers: a block's numbers of up to 16 consecutive tokens (from
// a multiple of 16) are adjacent, so a kernel reads them at constant offsets from one address. A
// last tile of fewer tokens is as narrow as they are, so one token's numbers stay dense.
constexpr int64_t kActTile = 16;
namespace {  // internal linkage: each file's copy is its own (see ../CMakeLists.txt)
// Tokens in token t's tile: 16, or the rest of n_tok in a last, partial tile.
inline int64_t act_width(const Acts& x, int64_t t) {
  const int64_t rest = x.n_tok - t / kActTile * kActTile;
  return rest < kActTile ? rest : kActTile;
}
// Index of token t, block ib in Acts::d, s and c: tile t / 16 at (t / 16) x 16 x n_blocks, in it
// [n_blocks, act_width] numbers.
inline int64_t act_at(const Acts& x, int64_t t, int64_t ib) {
  return (t / kActTile) * (x.n_blocks * kActTile) + ib * act_width(x, t) + t % kActTile;
}
}  // namespace

// A group kernel: out[t, k] = row k of one packed group (kernels/packed.h) dotted with token
// t0 + t, t < T, in ref's arithmetic. t0 is a multiple of kGroupToks, so the call's tokens lie in
// one tile of the per-block numbers (act_at).
//   g: the group's n_blocks packed blocks;  out: [T, 8], 32-byte aligned.
using GroupFn = void (*)(const uint8_t* g, const Acts& x, int64_t t0, float* out);
// Two groups at once, g0's 8 rows then g1's in 512-bit vectors (each row still in its own 32-bit
// lane, with the same operations as GroupFn's):   out: [T, 16], 64-byte aligned.
using PairFn = void (*)(const uint8_t* g0, const uint8_t* g1, const Acts& x, int64_t t0,
                        float* out);
constexpr int kGroupToks = 4;  // kernels exist for T = 1 .. kGroupToks
// Where a tile kernel writes: token t0 + t's n_r (<= 16) results at y + t * y_stride, as each
// 16-token tile finishes (spread over the call: a burst of stores to rows not in cache stalls).
// partial: [n_t, 16] floats, 64-byte aligned, for running sums between segments of blocks.
struct TileDst {
  float* y;
  int64_t y_stride;
  int n_r;
  float* partial;
};
// Two groups against n_t tokens t0 .. t0 + n_t - 1 (n_t a multiple of kTileToks) with AMX tiles
// (amx_avx2.cpp), the same arithmetic again (the tile unit computes the same exact integer block
// dots). ahead: the next call's first group, n_ahead (0..2) of its groups are prefetched into L2
// as the blocks go by.
using TileFn = void (*)(const uint8_t* g0, const uint8_t* g1, const Acts& x, int64_t t0,
                        int64_t n_t, const uint8_t* ahead, int n_ahead, const TileDst& dst);
constexpr int kTileToks = 16;
static_assert(kActTile % kGroupToks == 0 && kActTile == kTileToks);  // a call stays in one tile

// The group kernels of Q5_0, Q5_1, IQ4_NL and the packed K types (kquant_kernels.h: Q2_K .. Q6_K,
// IQ4_XS), [T - 1] for T tokens; null for other types: AVX2's (kquant_avx2.cpp) and VNNI's
// (vnni_avx2.cpp; call only when vnni_supported()). Their Acts: c = the int16 pair (sum of codes
// 0..15, sum of codes 16..31) of each 32-column block; Q5_0, IQ4_NL: Q8_0 blocks; Q5_1: Q8_1 blocks
// (d, s; no c); the K types: BlockQ8_K super-blocks (blk = 292 bytes per 256 columns), d = the
// super-block's scale at each of its 8 blocks; s unused.
const GroupFn* k_group_kernels(DType t);
const GroupFn* k_group_kernels_vnni(DType t);
// Two groups at once in 512-bit vectors (vnni_avx2.cpp, the K types only; null for the others).
const PairFn* k_pair_kernels_vnni(DType t);
// Two groups against whole 16-token tiles (the K types only; null for the others), each super-block
// unpacked once for all the tokens: AVX2's (kquant_avx2.cpp) and VNNI's (vnni_avx2.cpp). Their
// Acts::panel holds the codes.
TileFn k_tile_kernel(DType t);
TileFn k_tile_kernel_vnni(DType t);

// One variant's kernels, [T - 1] for T tokens. The pair kernels are optional (null: the variant
// runs every group alone).
struct GroupKernels {
  GroupFn q4_0[kGroupToks];
  GroupFn q4_1[kGroupToks];
  GroupFn q8_0[kGroupToks];
  PairFn q4_0x2[kGroupToks] = {};
  PairFn q4_1x2[kGroupToks] = {};
  PairFn q8_0x2[kGroupToks] = {};
  // Optional (null: none) pair kernels for whole 16-token blocks.
  TileFn q4_0x16 = nullptr;
  TileFn q4_1x16 = nullptr;
  TileFn q8_0x16 = nullptr;
  // Q5_0, Q5_1, IQ4_NL and the K types: k_group_kernels or k_group_kernels_vnni.
  const GroupFn* (*k_groups)(DType) = &k_group_kernels;
  const PairFn* (*k_pairs)(DType) = nullptr;  // their pair kernels (null: none)
  TileFn (*k_tile)(DType) = &k_tile_kernel;   // their tile kernels (null: none)
};

// The AVX2 kernels (ops_avx2.cpp) and the AVX-512 VNNI ones (vnni_avx2.cpp: vpdpbusd on 256-bit
// vectors for one group, on 512-bit vectors for a pair; call only when vnni_supported()). Both
// give ref's bits.
extern const GroupKernels kAvx2Groups;
extern const GroupKernels kVnniGroups;
// kVnniGroups plus the AMX tile kernels below (call only when amx_supported()).
extern const GroupKernels kAmxGroups;

// The AMX-INT8 tile kernels (amx_avx2.cpp): TileFn for Q4_0, Q4_1 and Q8_0 pairs.
void tile_q4_0(const uint8_t* g0, const uint8_t* g1, const Acts& x, int64_t t0, int64_t n_t,
               const uint8_t* ahead, int n_ahead, const TileDst& dst);
void tile_q4_1(const uint8_t* g0, const uint8_t* g1, const Acts& x, int64_t t0, int64_t n_t,
               const uint8_t* ahead, int n_ahead, const TileDst& dst);
void tile_q8_0(const uint8_t* g0, const uint8_t* g1, const Acts& x, int64_t t0, int64_t n_t,
               const uint8_t* ahead, int n_ahead, const TileDst& dst);

}  // namespace kvlm::kernels::avx2
