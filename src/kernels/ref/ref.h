// Scalar reference variant of the dispatched kernels (internal to src/kernels and its tests).
// ops.h's dispatched entry points (dequantize_row, dot_row, matmul, attention, the element-wise
// ops) call these when KVLM_KERNELS=scalar or when the CPU has no faster variant; the fast
// variants are tested against them.
#pragma once

#include <cstdint>

#include "base/thread_pool.h"
#include "kernels/act_blocks.h"
#include "kernels/ops.h"
#include "tensor/dtype.h"
#include "tensor/tensor.h"

namespace kvlm::kernels::ref {

// Same contracts as the public functions of the same name in ops.h.
void dequantize_row(DType t, const void* src, float* dst, int64_t n);
void round_to_f16(const float* x, float* y, int64_t n);
void f32_to_f16(const float* x, uint16_t* y, int64_t n);
void dequantize_rows(DType t, const void* src, size_t src_stride, int64_t n_rows, float* dst,
                     int64_t n);
float dot_row(DType t, const void* row, const float* x, int64_t n);
void matmul(const TensorView& w, const float* x, float* y, int64_t n_tok, ThreadPool& pool);
void matmul_multi(const MatmulPart* parts, int n_parts, const float* x, int64_t n_tok,
                  ThreadPool& pool);
void attn_chunk(const float* k, const float* v, int64_t n, int64_t hd, const float* q, int64_t n_q,
                float scale, float* m, float* l, float* o, float* work);
void attn_chunk_f16(const uint16_t* const* k_rows, const uint16_t* const* v_rows, int64_t n,
                    int64_t hd, const float* q, int64_t n_q, float scale, float* m, float* l,
                    float* o, float* work);
void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps);
void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t n, float eps);
void softmax(float* x, int64_t n);
void swiglu(float* gate, const float* up, int64_t n);
void gelu(float* x, int64_t n);
void add(float* y, const float* x, int64_t n);
void rope_rotate(float* x, int64_t n_head, int64_t head_dim, int64_t n_dims, const double* cs,
                 RopeMode mode);

// ---- building blocks, exposed so the fast twins can be tested piece by piece --------------------
// f32 x[32 * n_blocks] -> activation blocks (llama.cpp's x86 rounding: id = 127 / amax, nearest
// even). The fast variants must produce these bytes exactly.
void quant_act_q8_0(const float* x, BlockQ8_0* dst, int64_t n_blocks);
void quant_act_q8_1(const float* x, BlockQ8_1* dst, int64_t n_blocks);
// f32 x[256 * n_sb] -> activation super-blocks for the K types (act_blocks.h's BlockQ8_K):
// id = 127 / amax, codes round-half-to-even(x * id) in [-127, 127], d = 1 / id, and the sums.
void quant_act_q8_k(const float* x, BlockQ8_K* dst, int64_t n_sb);
// Integer block dots of n_blocks weight blocks with n_blocks activation blocks.
float dot_q4_0_q8_0(const BlockQ4_0* w, const BlockQ8_0* x, int64_t n_blocks);
float dot_q4_1_q8_1(const BlockQ4_1* w, const BlockQ8_1* x, int64_t n_blocks);
float dot_q8_0_q8_0(const BlockQ8_0* w, const BlockQ8_0* x, int64_t n_blocks);
// sum_c a[c] * b[c] in 16 lanes with a fixed pairwise fold.   a, b: [n]
float dot_f32(const float* a, const float* b, int64_t n);
// dequantize_row for the types only ref implements (Q5_0, Q5_1, Q2_K .. Q6_K, IQ4_NL, IQ4_XS;
// ref/dequant_ref.cpp), which every variant's dequantize_row calls for them. Returns false, having
// written nothing, for any other type.
bool dequantize_row_blocks(DType t, const void* src, float* dst, int64_t n);
// The f32 multipliers of the sub-blocks of one super-block of type t (Q2_K .. Q6_K, IQ4_XS) at
// `block`: dl[s] = d * scale_s and, for the types with mins (Q2_K, Q4_K, Q5_K), ml[s] = dmin *
// min_s, so that element e of sub-block s is dl[s] * code_e (- ml[s]). Returns the number of
// sub-blocks (16 of 16 elements or 8 of 32; 0 for other types). Every variant's dequantization
// takes its scales from here, so they are rounded alike.   dl, ml: [16]
int sub_block_scales(DType t, const void* block, float* dl, float* ml);


// ---- K-quant super-blocks as integers: the packed K kernels' layout source and arithmetic ------
// One 256-element super-block of Q2_K, Q3_K, Q4_K, Q5_K, Q6_K or IQ4_XS with every factor an
// integer:
//   value of element e = d * sc[e / 16] * q[e] - dmin * m[e / 16]
// (the dequantized value up to f32 rounding: dequantize_row rounds d * sc first).
//   Q2_K: q 0..3, sc 0..15, m 0..15 (one per 16)        Q3_K: q -4..3, sc -32..31, no mins
//   Q4_K: q 0..15, sc 0..63, m 0..63 (each twice per 32) Q5_K: as Q4_K with q 0..31
//   Q6_K: q -32..31, sc -128..127, no mins              IQ4_XS: q the IQ4 table value, sc -32..31
struct KInts {
  uint16_t d;     // f16 super-block scale
  uint16_t dmin;  // f16 super-block scale of the mins (0 for the types without)
  int8_t q[256];  // [256] integer codes
  int8_t sc[16];  // [16] sub-block scales, one per 16 elements
  uint8_t m[16];  // [16] sub-block mins, one per 16 elements (0 for the types without)
};
// Fills *out from the super-block at `block` of type t; false (nothing written) for other types.
bool k_block_ints(DType t, const void* block, KInts* out);
// True for the types k_block_ints reads (the K types with packed kernels).
inline bool k_packed_type(DType t) {
  return t == DType::Q2_K || t == DType::Q3_K || t == DType::Q4_K || t == DType::Q5_K ||
         t == DType::Q6_K || t == DType::IQ4_XS;
}
// True for the k_packed_type types with mins (Q2_K, Q4_K, Q5_K).
inline bool k_has_mins(DType t) {
  return t == DType::Q2_K || t == DType::Q4_K || t == DType::Q5_K;
}
// Dot of n_sb super-blocks of type t (k_packed_type) with n_sb activation super-blocks
// (quant_act_q8_k). Per super-block, with exact integers
//   isum = sum_{j<16} sc[j] * sum_{e in 16 j .. 16 j + 16} q[e] p[e]
//   msum = sum_{j<16} m[j] * sums[j]                                  (types with mins)
// then acc = fma(d * dx, float(isum), acc) and acc = fma(-dmin * dx, float(msum), acc), each
// product and fma rounded once (std::fma here, vfmadd in the twins), in this order: the packed
// twins compute exactly this. |isum| < 2^28 (Q6_K: 256 x 32 x 127 x 128), so int32 holds it.
float dot_k_q8_k(DType t, const void* w, const BlockQ8_K* x, int64_t n_sb);

}  // namespace kvlm::kernels::ref
