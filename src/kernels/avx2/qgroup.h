// The quantized matmul's group kernels, shared by the AVX2 file (ops_avx2.cpp, which runs the
// matmul) and the AVX-512 VNNI file (vnni_avx2.cpp, which supplies faster kernels of the same
// arithmetic). Plain declarations only: no inline code, so nothing here is compiled with one
// file's instruction set and picked by the linker for another (see ../CMakeLists.txt).
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvlm::kernels::avx2 {

// Quantized activations as the group kernels read them: the blocks (bytes identical to ref's)
// plus per-block numbers widened once, so the inner loop broadcasts a float or an int instead of
// converting a half for every (block, token). Codes of token t, block ib: q + t * q_stride +
// ib * blk + qs_off (32 int8).
struct Acts {
  const uint8_t* q;  // [n_tok, q_stride] bytes: Q8_0 or Q8_1 blocks
  size_t q_stride;
  size_t blk;        // bytes per block: 34 (Q8_0) or 36 (Q8_1)
  size_t qs_off;     // offset of the 32 codes in a block
  const float* d;    // [n_tok, n_blocks] d
  const float* s;    // [n_tok, n_blocks] Q8_1's s = d * sum(codes) (Q4_1 weights)
  const int32_t* c;  // [n_tok, n_blocks] Q4_0 weights: 8 * sum(codes) (the nibbles' "+ 8");
                     // Q8_0 weights: 128 * sum(codes) (the VNNI kernels' codes + 128)
  int64_t n_blocks;
};

// A group kernel: out[t, k] = row k of one packed group (kernels/packed.h) dotted with token
// t0 + t, t < T, in ref's arithmetic.   g: the group's n_blocks packed blocks;  out: [T, 8], 32-byte
// aligned.
using GroupFn = void (*)(const uint8_t* g, const Acts& x, int64_t t0, float* out);
// Two groups at once, g0's 8 rows then g1's in 512-bit vectors (each row still in its own 32-bit
// lane, with the same operations as GroupFn's):   out: [T, 16], 64-byte aligned.
using PairFn = void (*)(const uint8_t* g0, const uint8_t* g1, const Acts& x, int64_t t0,
                        float* out);
constexpr int kGroupToks = 4;  // kernels exist for T = 1 .. kGroupToks

// One variant's kernels, [T - 1] for T tokens. The pair kernels are optional (null: the variant
// runs every group alone).
struct GroupKernels {
  GroupFn q4_0[kGroupToks];
  GroupFn q4_1[kGroupToks];
  GroupFn q8_0[kGroupToks];
  PairFn q4_0x2[kGroupToks] = {};
  PairFn q4_1x2[kGroupToks] = {};
  PairFn q8_0x2[kGroupToks] = {};
};

// The AVX2 kernels (ops_avx2.cpp) and the AVX-512 VNNI ones (vnni_avx2.cpp: vpdpbusd on 256-bit
// vectors for one group, on 512-bit vectors for a pair; call only when vnni_supported()). Both
// give ref's bits.
extern const GroupKernels kAvx2Groups;
extern const GroupKernels kVnniGroups;

}  // namespace kvlm::kernels::avx2
