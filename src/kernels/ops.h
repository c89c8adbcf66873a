// Kernels: pure functions over spans. No model, no cache, no allocation in per-element loops.
// Scalar reference implementations live in ref/, fast twins in avx2/; dispatch.cpp chooses one
// variant once at start-up behind these entry points, and every fast kernel is tested against its
// scalar twin (tests/kernels/test_kernels_avx2.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "base/thread_pool.h"
#include "tensor/dtype.h"
#include "tensor/tensor.h"

namespace kvlm::kernels {

// Kernel variant in use: "avx2-amx" (avx2-vnni plus AMX-INT8 tile kernels for a quantized matmul
// of 16 tokens or more, chosen when the CPU has AMX-TILE + AMX-INT8 and the OS grants their use),
// "avx2-vnni" (AVX2 plus AVX-512 VNNI group kernels for the quantized
// matmul, chosen when the CPU has AVX512VL + AVX512VNNI), "avx2" (AVX2 + FMA + F16C) or "scalar"
// (the reference; forced with the environment variable KVLM_KERNELS=scalar). Chosen once,
// on the first kernel call, for the whole process. dequantize_row, dot_row, matmul, attention and
// the element-wise ops dispatch to it; every variant keeps the bit-identity guarantees stated
// below on its own, but two variants give slightly different dot products (different summation
// order) and activations (vector exp).
const char* kernels_backend();

// ---- (de)quantization --------------------------------------------------------------------------
// n elements (a multiple of t's block size) of type t at src -> f32 dst[n].
// Supported t: every DType whose DTypeInfo::compute is true.
void dequantize_row(DType t, const void* src, float* dst, int64_t n);
// y[i] = x[i] rounded to the nearest f16 (ties to even) and back: what an f16 store would keep.
// x, y: [n]; y may alias x. NaN stays NaN (its payload may differ between variants).
void round_to_f16(const float* x, float* y, int64_t n);
// y[i] = x[i] as f16 bits, rounded to nearest (ties to even), overflow to inf, NaN to the quiet
// NaN sign | 0x7e00: fp32_to_fp16's bits in every variant. x, y: [n]. (What an f16 KV cache
// stores: quantize_row(F16) calls it.)
void f32_to_f16(const float* x, uint16_t* y, int64_t n);
// n_rows rows of n elements each, src_stride bytes apart (e.g. one head of every cached
// position) -> dst [n_rows, n]. The same values as n_rows dequantize_row calls, in one dispatch.
void dequantize_rows(DType t, const void* src, size_t src_stride, int64_t n_rows, float* dst,
                     int64_t n);
// f32 src[n] -> n elements of type t at dst (GGML's reference rounding). Supported t: F32, F16,
// BF16, Q8_0, Q4_0, Q4_1.
void quantize_row(DType t, const float* src, void* dst, int64_t n);

// Dot product of one row of type t (n elements) with f32 x[n]. For Q4_0/Q4_1/Q5_0/Q8_0 rows, x is
// first quantized to 8 bits per 32-element block (Q8_0, or Q8_1 for Q4_1) and the dot is an
// integer sum per block, scaled once; for the packed K types (Q4_K, Q5_K, Q6_K, IQ4_XS) per
// 256-element super-block with an f32 scale (act_blocks.h's BlockQ8_K, ref/ref.h's dot_k_q8_k);
// other types dequantize the row and dot in f32.
float dot_row(DType t, const void* row, const float* x, int64_t n);

// Linear layer: y[i, r] = sum_c W[r, c] * x[i, c]
//   w: [n_out = w.n_rows, n_in = w.n_cols] of any compute dtype
//   x: [n_tok, n_in] f32, row-major;  y: [n_tok, n_out] f32, row-major
// Same per-element arithmetic as dot_row (quantized activations for the packed types; for those
// every variant computes exactly ref's arithmetic, so they agree bit for bit).
// Rows of W are split across the pool. Each y[i, r] is computed with the same arithmetic whatever
// n_tok is, so a batch of N tokens gives bit-identical results to N single-token calls (the
// cached-vs-recomputed equivalence relies on this).
void matmul(const TensorView& w, const float* x, float* y, int64_t n_tok, ThreadPool& pool);

// Packing for matmul: Q4_0, Q4_1, Q5_0 and Q8_0 matrices (n_cols a multiple of 32) and Q4_K,
// Q5_K, Q6_K and IQ4_XS matrices (whole 256-column super-blocks) can be repacked once into
// groups of 8 rows whose blocks are interleaved (kernels/packed.h), so that one vector dot
// computes 8 rows' block sums at once. Set TensorView::packed to the returned bytes' address
// (they must outlive the view). matmul's results are bit-identical with or without packing: the
// fast variant packs small row groups on the fly when a view has none; packing at load only
// saves that work (and is what makes decode fast). Returns no bytes for other types.
bool packable(DType t);
std::vector<uint8_t> pack_weights(const TensorView& w);
// The size of pack_weights(w) (0 when it gives none), and the same bytes written to dst.
size_t packed_bytes(const TensorView& w);
void pack_weights_into(const TensorView& w, uint8_t* dst);

// Several linear layers over the same input as one parallel section: parts[k].y = parts[k].w x,
// each y laid out as matmul's. Bit-identical to separate matmul calls; when every W has the same
// quantized type the activations are quantized once and the rows of all parts are split across
// the pool together (Q/K/V, gate/up: fewer hand-offs per token). Every W has n_cols == n_in.
struct MatmulPart {
  const TensorView* w;  // [n_out_k, n_in]
  float* y;             // [n_tok, n_out_k]
};
void matmul_multi(const MatmulPart* parts, int n_parts, const float* x, int64_t n_tok,
                  ThreadPool& pool);

// ---- attention over one chunk of cached positions ----------------------------------------------
// Online-softmax partial of n_q query heads against the n cached positions of one KV head:
//   s[a, j] = scale * dot(q[a], k[j]),  m[a] = max_j s[a, j],  w[a, j] = exp(s[a, j] - m[a]),
//   l[a] = sum_j w[a, j],  o[a] = sum_j w[a, j] * v[j]           (sums in j order)
//   k, v: [n, hd] f32 (the chunk's rows, dequantized once for every query that reads them)
//   q: [n_q, hd];  m, l: [n_q];  o: [n_q, hd] (overwritten);  work: [n_q, n] scratch
// n >= 1. Each query's results depend only on its q and the rows, never on n_q, so a batch and a
// single token get the same numbers. Attention merges the partials of a context's chunks.
void attn_chunk(const float* k, const float* v, int64_t n, int64_t hd, const float* q, int64_t n_q,
                float scale, float* m, float* l, float* o, float* work);

// Asks for bytes [0, n_bytes) of each of n rows to be brought into L2, without waiting (a hint:
// no arithmetic, no fault on any address). Attention calls it for the rows of its next work item
// while the current one computes, so their memory latency overlaps that work.
void prefetch_rows_l2(const void* const* rows, int64_t n, int64_t n_bytes);

// attn_chunk over f16 rows read in place: row j of K is k_rows[j][0 .. hd), of V v_rows[j]
// (e.g. one head of cached positions, wherever their blocks are). Equals attn_chunk over the same
// rows dequantized to f32 bit for bit (f16 -> f32 is exact), so a decode step that reads the cache
// directly gives the numbers a prefill computes from tiles.
//   work: [n_q * n + 2 * n * hd] scratch (the variants without an in-place path use the tiles)
void attn_chunk_f16(const uint16_t* const* k_rows, const uint16_t* const* v_rows, int64_t n,
                    int64_t hd, const float* q, int64_t n_q, float scale, float* m, float* l,
                    float* o, float* work);

// ---- element-wise and row-wise ops -------------------------------------------------------------
// Dispatched like matmul. Each output element depends only on its own inputs (and, for the norms
// and softmax, on its row and the row length n), never on where it sits in the array, on n for
// the element-wise ops, or on the thread count: a token's numbers are the same in prefill and
// decode. The variants agree to the bounds tested in tests/kernels/test_kernels_avx2.cpp.
// y = x / sqrt(mean(x^2) + eps) * w        x, w, y: [n]; y may alias x
void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps);
// y = (x - mean) / sqrt(var + eps) * w + b  x, w, b, y: [n]; y may alias x
void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t n, float eps);
// In-place numerically stable softmax over x[n].
void softmax(float* x, int64_t n);
// gate[i] = silu(gate[i]) * up[i]          gate, up: [n]
void swiglu(float* gate, const float* up, int64_t n);
// x[i] = gelu(x[i]) with the tanh approximation GGML and GPT-2 use     x: [n]
void gelu(float* x, int64_t n);
// y[i] += x[i]  (exact in every variant)   y, x: [n]
void add(float* y, const float* x, int64_t n);

// ---- rotary position embedding ----------------------------------------------------------------
enum class RopeMode {
  Normal,  // rotate adjacent pairs (x[2i], x[2i+1]): GGUF llama stores Q/K permuted for this
  Neox,    // rotate halves (x[i], x[i + n_dims/2])
};
// Rotates the first n_dims dims of each of n_head heads of x: [n_head, head_dim] in place, for
// position pos, with theta_i = pos * freq_base^(-2i/n_dims). Angles, cos/sin and the rotation in
// double, each output rounded once. Not dispatched; the forward pass uses the tables below.
void rope(float* x, int64_t n_head, int64_t head_dim, int64_t n_dims, int64_t pos,
          float freq_base, RopeMode mode);
// The same rotation from precomputed tables, bit-identical to rope() in every variant:
//   rope_freqs:   inv_freq: [n_dims / 2] = freq_base^(-2i/n_dims) (depends on the config only)
//   rope_cos_sin: cs: [2, n_pairs] = cos, then sin, of pos * inv_freq[i], once per position
//   rope_rotate:  x: [n_head, head_dim] rotated by cs (dispatched), for every Q and K head
void rope_freqs(int64_t n_dims, float freq_base, double* inv_freq);
void rope_cos_sin(const double* inv_freq, int64_t n_pairs, int64_t pos, double* cs);
void rope_rotate(float* x, int64_t n_head, int64_t head_dim, int64_t n_dims, const double* cs,
                 RopeMode mode);

// Multiplies each of n_head heads of x: [n_head, head_dim] in place by the normalised
// Walsh-Hadamard matrix H / sqrt(head_dim) (head_dim a power of two). Orthogonal and its own
// inverse, so dot(H q, H k) == dot(q, k) up to rounding: the rotated KV cache (docs/KV.md,
// "Hadamard rotation") quantizes H k and H v, whose outliers are spread over the whole head.
// One scalar implementation: it costs ~head_dim * log2(head_dim) adds per head.
void hadamard(float* x, int64_t n_head, int64_t head_dim);

}  // namespace kvlm::kernels
