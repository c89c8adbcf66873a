// AVX2 + FMA + F16C variant of the dispatched kernels (internal to src/kernels and its tests).
// Only the avx2/*_avx2.cpp files are compiled with those instruction sets; call anything here
// only after avx2::cpu_supported() returned true (dispatch.cpp does; the tests skip otherwise).
//
// Each function has the same contract as its twin in ref/ref.h. Activation quantization, the
// quantized (Q4_0/Q4_1/Q8_0) matmul and dot_row, and the dequantization of every type are
// bit-identical to ref; the f32 dots (f32/f16/bf16 weights, and the other quantized types, whose
// rows are dequantized first) sum in a different (but fixed, n-only) order or fuse ref's
// product-adds (f16/bf16 matmul), so they agree with ref to rounding, not bitwise.
// Within this variant, matmul's y[i, r] is bit-identical whatever n_tok, the thread count, the
// row split or the packing, and equals dot_row bit for bit.
#pragma once

#include <cstdint>

#include "base/thread_pool.h"
#include "kernels/act_blocks.h"
#include "kernels/ops.h"
#include "tensor/dtype.h"
#include "tensor/tensor.h"

namespace kvlm::kernels::avx2 {

// True when the CPU (and OS) support AVX2, FMA and F16C. Compiled without those flags, so it is
// safe to call anywhere.
bool cpu_supported();
// True when the CPU also has AVX512F, AVX512VL and AVX512VNNI (the VNNI group kernels).
bool vnni_supported();
// True when vnni_supported() and the CPU has AMX-TILE and AMX-INT8, the OS saves the tile state
// and (Linux) granted this process its use; the first call asks for that grant.
bool amx_supported();

void dequantize_row(DType t, const void* src, float* dst, int64_t n);
void round_to_f16(const float* x, float* y, int64_t n);
void f32_to_f16(const float* x, uint16_t* y, int64_t n);
void dequantize_rows(DType t, const void* src, size_t src_stride, int64_t n_rows, float* dst,
                     int64_t n);
float dot_row(DType t, const void* row, const float* x, int64_t n);
void matmul(const TensorView& w, const float* x, float* y, int64_t n_tok, ThreadPool& pool);
void matmul_multi(const MatmulPart* parts, int n_parts, const float* x, int64_t n_tok,
                  ThreadPool& pool);
// The same with the VNNI group kernels for Q4_0/Q4_1/Q8_0 weights (call only when
// vnni_supported()): the same bits, fewer instructions.
void matmul_vnni(const TensorView& w, const float* x, float* y, int64_t n_tok, ThreadPool& pool);
void matmul_multi_vnni(const MatmulPart* parts, int n_parts, const float* x, int64_t n_tok,
                       ThreadPool& pool);
// The same plus the AMX-INT8 tile kernels for whole 16-token blocks (call only when
// amx_supported()): the same bits again.
void matmul_amx(const TensorView& w, const float* x, float* y, int64_t n_tok, ThreadPool& pool);
void matmul_multi_amx(const MatmulPart* parts, int n_parts, const float* x, int64_t n_tok,
                      ThreadPool& pool);
// Scores by 8-lane FMA dots, exp by exp_ps below, o by FMA: agrees with ref to rounding.
void attn_chunk(const float* k, const float* v, int64_t n, int64_t hd, const float* q, int64_t n_q,
                float scale, float* m, float* l, float* o, float* work);
// Reads f16 rows in place (F16C in registers): bit-identical to attn_chunk over the same rows
// dequantized into tiles.
void attn_chunk_f16(const uint16_t* const* k_rows, const uint16_t* const* v_rows, int64_t n,
                    int64_t hd, const float* q, int64_t n_q, float scale, float* m, float* l,
                    float* o, float* work);
// exp(x[i]) for 8 lanes at a time (Cephes' expf: range reduction by ln 2, degree-5 polynomial);
// within 2 ulp of std::exp on [-87, 88]; below -87.3 gives 0 (attention feeds it s - max <= 0).
// x, y: [n]; y may alias x.
void exp_f32(const float* x, float* y, int64_t n);

// Element-wise and row-wise ops (elementwise_avx2.cpp). add and rope_rotate are bit-identical to
// ref; the norms agree with ref to one rounding of their f32 scale; softmax, swiglu and gelu use
// exp_f32_full below instead of libm (gelu through x / (1 + exp(-2u)) instead of tanh).
void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps);
void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t n, float eps);
void softmax(float* x, int64_t n);
void swiglu(float* gate, const float* up, int64_t n);
void gelu(float* x, int64_t n);
void add(float* y, const float* x, int64_t n);
void rope_rotate(float* x, int64_t n_head, int64_t head_dim, int64_t n_dims, const double* cs,
                 RopeMode mode);
// exp(x[i]) over the whole f32 range, computed in double and rounded once: within 0.5 ulp +
// 2e-14 relative of exact (so almost always glibc expf's bits), +inf past 88.72, correctly
// rounded subnormals and 0 below, NaN -> NaN.
// x, y: [n]; y may alias x.
void exp_f32_full(const float* x, float* y, int64_t n);

// ---- building blocks (see ref/ref.h) ------------------------------------------------------------
void quant_act_q8_0(const float* x, BlockQ8_0* dst, int64_t n_blocks);
void quant_act_q8_1(const float* x, BlockQ8_1* dst, int64_t n_blocks);
void quant_act_q8_k(const float* x, BlockQ8_K* dst, int64_t n_sb);
// sum_c a[c] * b[c]   a, b: [n], any n >= 0, any alignment
float dot_f32(const float* a, const float* b, int64_t n);
// sum_c f16 a[c] * b[c] without a dequantized copy; equals dot_f32 of the dequantized row bit for
// bit (same lanes and order; f16 -> f32 is exact).   a: [n] f16, b: [n]
float dot_f16(const uint16_t* a, const float* b, int64_t n);
// F16 and BF16 weights (half_avx2.cpp): rows [r_begin, r_end) of y = W x for n_tok tokens, f32
// activations, ref's 16-lane summation order with fused product-adds (bound in that file).
//   w: [n_out, n_in] F16 or BF16;  x: [n_tok, n_in];  y: [n_tok, n_out]
void matmul_half_rows(const TensorView& w, const float* x, float* y, int64_t n_tok,
                      int64_t r_begin, int64_t r_end);
// One row of it (t: F16 or BF16): matmul_half_rows's y element bit for bit.   a: [n], b: [n]
float dot_half(DType t, const uint16_t* a, const float* b, int64_t n);

}  // namespace kvlm::kernels::avx2
