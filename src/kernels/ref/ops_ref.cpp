// Scalar reference kernels: the slow, obviously-right twins every fast kernel is tested against.
// dequantize_row, dot_row, matmul and the element-wise ops (norms, softmax, activations, add,
// the RoPE rotation) are the `ref` variant (ref/ref.h) behind the dispatcher in
// kernels/dispatch.cpp; quantize_row, rope, the RoPE tables and hadamard have no fast twin and are
// the public functions themselves.
//
// Arithmetic choices (the fast twins must document any deviation from these):
//  * (De)quantization follows ggml-quants.c's reference functions operation for operation in f32,
//    so results are bit-exact with GGML and with the `gguf` Python package (tested against goldens
//    from tools/gen_dequant_goldens.py). This file is compiled with -ffp-contract=off (see
//    CMakeLists.txt) so that no a*b+c is fused into an FMA, which would change the last bit.
//  * Dot products (dot_row, matmul) first dequantize the weight row to f32 and then run one
//    fixed-order f32 dot (dot_f32 below): kDotLanes independent f32 partial sums over the columns,
//    folded pairwise at the end. The order depends only on n, never on n_tok, the thread count or
//    the row split, so matmul is bit-identical for any batch size and dot_row(w.row(r), x) equals
//    matmul's y[r] bit for bit. The lanes make the loop vectorizable without -ffast-math and
//    shorten each f32 accumulation chain to n / kDotLanes terms (error ~ (n/16 + 5) * 2^-24 *
//    sum |w*x|, versus n * 2^-24 for one running sum).
//  * Row-wise reductions (rms_norm, layer_norm, softmax sums) accumulate in double, as GGML's
//    ggml_float does, and round once to f32. rope computes angles, sines and the rotation in
//    double and rounds each output once.
#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "base/error.h"
#include "kernels/ops.h"
#include "kernels/ref/ref.h"

namespace kvlm::kernels {

namespace {

// ---- helpers ------------------------------------------------------------------------------------

[[noreturn]] void fail_unsupported(const char* op, DType t, const char* supported) {
  const DTypeInfo* info = dtype_info(static_cast<uint32_t>(t));
  fail(
      "{}: no kernel for tensor type {} (GGML type {}); kvlm supports {} here. Use a model "
      "quantized to one of those types.",
      op, info ? info->name : "unknown", static_cast<uint32_t>(t), supported);
}

constexpr const char* kDequantTypes =
    "f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, iq4_nl and iq4_xs";
constexpr const char* kQuantTypes = "f32, f16, bf16, q4_0, q4_1 and q8_0";

// Element count must fill whole blocks of t (callers validated shapes when loading).
[[maybe_unused]] bool whole_blocks(DType t, int64_t n) {
  const DTypeInfo* info = dtype_info(static_cast<uint32_t>(t));
  return info != nullptr && n >= 0 && n % info->block_size == 0;
}

// Per-thread f32 scratch of at least n floats. Grows once per thread to the widest row seen, so
// steady-state matmul/dot_row calls allocate nothing.
float* thread_scratch(int64_t n) {
  thread_local std::vector<float> scratch;
  if (scratch.size() < static_cast<size_t>(n)) scratch.resize(static_cast<size_t>(n));
  return scratch.data();
}

// ---- dequantization (ggml-quants.c's dequantize_row_*) ------------------------------------------

void dequant_f16(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_fp32(src[i]);
}

void dequant_bf16(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_fp32(src[i]);
}

// Q4_0: value = (nibble - 8) * d; byte j holds element j (low nibble) and j + 16 (high nibble).
void dequant_q4_0(const BlockQ4_0* blocks, float* dst, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const BlockQ4_0& b = blocks[ib];
    const float d = fp16_to_fp32(b.d);
    float* y = dst + ib * kQK4_0;  // [32]
    // Two passes (low, then high nibbles) so each is a contiguous store the compiler vectorizes.
    for (int j = 0; j < kQK4_0 / 2; ++j) y[j] = static_cast<float>((b.qs[j] & 0x0f) - 8) * d;
    for (int j = 0; j < kQK4_0 / 2; ++j)
      y[j + kQK4_0 / 2] = static_cast<float>((b.qs[j] >> 4) - 8) * d;
  }
}

// Q4_1: value = nibble * d + m (two f32 roundings, never fused), nibbles laid out as Q4_0.
void dequant_q4_1(const BlockQ4_1* blocks, float* dst, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const BlockQ4_1& b = blocks[ib];
    const float d = fp16_to_fp32(b.d);
    const float m = fp16_to_fp32(b.m);
    float* y = dst + ib * kQK4_1;  // [32]
    for (int j = 0; j < kQK4_1 / 2; ++j) y[j] = static_cast<float>(b.qs[j] & 0x0f) * d + m;
    for (int j = 0; j < kQK4_1 / 2; ++j)
      y[j + kQK4_1 / 2] = static_cast<float>(b.qs[j] >> 4) * d + m;
  }
}

void dequant_q8_0(const BlockQ8_0* blocks, float* dst, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const BlockQ8_0& b = blocks[ib];
    const float d = fp16_to_fp32(b.d);
    float* y = dst + ib * kQK8_0;  // [32]
    for (int j = 0; j < kQK8_0; ++j) y[j] = static_cast<float>(b.qs[j]) * d;
  }
}

// ---- quantization (ggml-quants.c's quantize_row_*_ref) ------------------------------------------

// GGML converts with a plain (int8_t) cast, which is undefined for NaN or out-of-range values;
// those only arise when the block scale's inverse overflows (|d| < ~3e-39). Clamping first keeps
// the ordinary cases identical to GGML and makes the degenerate ones defined.
uint8_t trunc_nibble(float v) {
  if (!(v >= 0.0f)) return 0;  // also NaN
  if (v >= 15.0f) return 15;
  return static_cast<uint8_t>(v);
}

// Q4_0: d = max / -8 where max is the (first) element of largest magnitude, sign kept, so that
// element maps exactly to code 0; codes are trunc(x / d + 8.5) clamped to 15.
void quant_q4_0(const float* x, BlockQ4_0* blocks, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const float* xb = x + ib * kQK4_0;  // [32]
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < kQK4_0; ++j) {
      if (amax < std::fabs(xb[j])) {
        amax = std::fabs(xb[j]);
        max = xb[j];
      }
    }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    BlockQ4_0& b = blocks[ib];
    b.d = fp32_to_fp16(d);
    for (int j = 0; j < kQK4_0 / 2; ++j) {
      const uint8_t lo = trunc_nibble(xb[j] * id + 8.5f);
      const uint8_t hi = trunc_nibble(xb[j + kQK4_0 / 2] * id + 8.5f);
      b.qs[j] = static_cast<uint8_t>(lo | hi << 4);
    }
  }
}

// Q4_1: d = (max - min) / 15, m = min; codes are trunc((x - min) / d + 0.5) clamped to 15.
void quant_q4_1(const float* x, BlockQ4_1* blocks, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const float* xb = x + ib * kQK4_1;  // [32]
    float min = xb[0], max = xb[0];
    for (int j = 1; j < kQK4_1; ++j) {
      if (xb[j] < min) min = xb[j];
      if (xb[j] > max) max = xb[j];
    }
    const float d = (max - min) / 15.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    BlockQ4_1& b = blocks[ib];
    b.d = fp32_to_fp16(d);
    b.m = fp32_to_fp16(min);
    for (int j = 0; j < kQK4_1 / 2; ++j) {
      const uint8_t lo = trunc_nibble((xb[j] - min) * id + 0.5f);
      const uint8_t hi = trunc_nibble((xb[j + kQK4_1 / 2] - min) * id + 0.5f);
      b.qs[j] = static_cast<uint8_t>(lo | hi << 4);
    }
  }
}

// Q8_0: d = amax / 127; codes are x / d rounded half away from zero (roundf), in [-127, 127].
void quant_q8_0(const float* x, BlockQ8_0* blocks, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const float* xb = x + ib * kQK8_0;  // [32]
    float amax = 0.0f;
    for (int j = 0; j < kQK8_0; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    BlockQ8_0& b = blocks[ib];
    b.d = fp32_to_fp16(d);
    for (int j = 0; j < kQK8_0; ++j) {
      float q = std::round(xb[j] * id);
      if (std::isnan(q)) q = 0.0f;  // clamps matter only for a degenerate id, as trunc_nibble
      if (q < -127.0f) q = -127.0f;
      if (q > 127.0f) q = 127.0f;
      b.qs[j] = static_cast<int8_t>(q);
    }
  }
}

// ---- dot products -------------------------------------------------------------------------------

// Independent partial sums; 16 fills four SSE or two AVX registers, and the fold is a fixed
// binary tree, so the result is the same however the compiler vectorizes the main loop.
constexpr int kDotLanes = 16;

// sum_c a[c] * b[c], in the fixed order described at the top of the file.   a, b: [n]
inline float dot_f32(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[kDotLanes] = {};
  int64_t c = 0;
  for (; c + kDotLanes <= n; c += kDotLanes)
    for (int k = 0; k < kDotLanes; ++k) acc[k] += a[c + k] * b[c + k];
  for (int k = 0; c + k < n; ++k) acc[k] += a[c + k] * b[c + k];
  for (int width = kDotLanes / 2; width > 0; width /= 2)
    for (int k = 0; k < width; ++k) acc[k] += acc[k + width];
  return acc[0];
}

// Row of type t (n elements) as f32: F32 rows are used in place when aligned, everything else is
// dequantized into scratch[n]. Returns the f32 row.
const float* row_as_f32(DType t, const void* row, int64_t n, float* scratch) {
  if (t == DType::F32 && reinterpret_cast<uintptr_t>(row) % alignof(float) == 0)
    return static_cast<const float*>(row);
  ref::dequantize_row(t, row, scratch, n);
  return scratch;
}

// ---- quantized-activation dot products (llama.cpp's vec_dot_type path) -----------------------
// For every quantized weight type the activation row is first quantized to 8 bits, in blocks of 32
// for the 32-column types (Q8_0 for Q4_0, Q5_0, Q8_0, IQ4_NL; Q8_1, which also carries d * sum(q),
// for Q4_1 and Q5_1) and super-blocks of 256 for the K types (Q8_K), then each block's dot is an
// exact integer sum scaled once. This is what llama.cpp computes on the CPU, so kvlm's logits track
// the reference's, and integer dots avoid dequantizing every weight row. Block sums accumulate
// sequentially in f32 in block order: the result depends only on n.

// (BlockQ8_1, act_type and act_row_bytes live in kernels/act_blocks.h, shared with the fast
// variants.)

// Activation quantization as llama.cpp's x86 quantize_row_q8_0/q8_1 compute it (not the _ref
// variants that quantize_row follows): scale id = 127 / amax and round-half-to-even. Codes are
// the same as the reference's except at exact halves and the last bit of id; matching them keeps
// kvlm's logits on llama.cpp's. Q8_1 adds s = d * sum(codes).
template <class Block>
void quant_act_blocks(const float* x, Block* blocks, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const float* xb = x + ib * 32;  // [32]
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
    const float d = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int sum = 0;
    for (int j = 0; j < 32; ++j) {
      float q = std::nearbyint(xb[j] * id);  // default rounding mode: half to even
      if (std::isnan(q)) q = 0.0f;
      q = std::fmin(127.0f, std::fmax(-127.0f, q));
      blocks[ib].qs[j] = static_cast<int8_t>(q);
      sum += blocks[ib].qs[j];
    }
    blocks[ib].d = fp32_to_fp16(d);
    if constexpr (std::is_same_v<Block, BlockQ8_1>)
      blocks[ib].s = fp32_to_fp16(static_cast<float>(sum) * d);
  }
}

// Activation super-blocks for the K types (BlockQ8_K), rounded as llama.cpp's quantize_row_q8_K
// rounds them: id = 127 / amax, codes round-half-to-even(x * id), and d = 1 / id (not amax / 127:
// the two differ in the last bit, and d multiplies every dot). llama.cpp takes the sign of id from
// the element of largest magnitude; that flips codes and d together, so every product d * code,
// and with it every dot, is the same as with a positive id. Codes stay in [-127, 127].
void quant_act_q8_k_impl(const float* x, BlockQ8_K* blocks, int64_t n_sb) {
  for (int64_t is = 0; is < n_sb; ++is) {
    const float* xb = x + is * 256;  // [256]
    BlockQ8_K& b = blocks[is];
    float amax = 0.0f;
    for (int j = 0; j < 256; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    for (int j = 0; j < 256; ++j) {
      float q = std::nearbyint(xb[j] * id);  // default rounding mode: half to even
      if (std::isnan(q)) q = 0.0f;
      b.qs[j] = static_cast<int8_t>(std::fmin(127.0f, std::fmax(-127.0f, q)));
    }
    for (int j = 0; j < 16; ++j) {
      int sum = 0;
      for (int e = 0; e < 16; ++e) sum += b.qs[16 * j + e];
      b.sums[j] = static_cast<int16_t>(sum);
    }
    b.d = amax != 0.0f ? 1.0f / id : 0.0f;
  }
}

void quantize_act(DType w_type, const float* x, void* dst, int64_t n) {
  switch (act_type(w_type)) {
    case DType::Q8_1:
      return quant_act_blocks(x, static_cast<BlockQ8_1*>(dst), n / 32);
    case DType::Q8_K:
      return quant_act_q8_k_impl(x, static_cast<BlockQ8_K*>(dst), n / 256);
    default:
      return quant_act_blocks(x, static_cast<BlockQ8_0*>(dst), n / 32);
  }
}

// Q4_0 and IQ4_NL: the integer value(nibble) of each nibble (Q4_0's layout), scaled once per block.
template <class Block, class Value>
float dot_nibbles_q8_0(const Block* w, const BlockQ8_0* x, int64_t n_blocks, Value value) {
  float sum = 0.0f;
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    int sumi = 0;
    for (int j = 0; j < 16; ++j) {
      sumi += value(w[ib].qs[j] & 0x0f) * x[ib].qs[j];
      sumi += value(w[ib].qs[j] >> 4) * x[ib].qs[j + 16];
    }
    sum += static_cast<float>(sumi) * (fp16_to_fp32(w[ib].d) * fp16_to_fp32(x[ib].d));
  }
  return sum;
}

float dot_q4_0_q8_0_impl(const BlockQ4_0* w, const BlockQ8_0* x, int64_t n_blocks) {
  return dot_nibbles_q8_0(w, x, n_blocks, [](int q) { return q - 8; });
}

float dot_iq4_nl_q8_0_impl(const BlockIQ4_NL* w, const BlockQ8_0* x, int64_t n_blocks) {
  return dot_nibbles_q8_0(w, x, n_blocks, [](int q) { return int{kIq4nlValues[q]}; });
}

// sum_j (q_j d_w + m)(p_j d_x) = d_w d_x sum(q p) + m * (d_x sum p), the last factor being s.
float dot_q4_1_q8_1_impl(const BlockQ4_1* w, const BlockQ8_1* x, int64_t n_blocks) {
  float sum = 0.0f;
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    int sumi = 0;
    for (int j = 0; j < 16; ++j) {
      sumi += (w[ib].qs[j] & 0x0f) * x[ib].qs[j];
      sumi += (w[ib].qs[j] >> 4) * x[ib].qs[j + 16];
    }
    sum += (fp16_to_fp32(w[ib].d) * fp16_to_fp32(x[ib].d)) * static_cast<float>(sumi) +
           fp16_to_fp32(w[ib].m) * fp16_to_fp32(x[ib].s);
  }
  return sum;
}

// Q5_0 (Q8_0 activations): the 5-bit codes (nibble | fifth bit << 4) minus 16, as Q4_0's nibbles
// minus 8. Q5_1 (Q8_1 activations): the codes as they are, plus the min as Q4_1's.
template <class Block, class Act>
float dot_q5_impl(const Block* w, const Act* x, int64_t n_blocks) {
  constexpr bool kMin = std::is_same_v<Block, BlockQ5_1>;
  constexpr int kOff = kMin ? 0 : 16;
  float sum = 0.0f;
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    uint32_t h;
    std::memcpy(&h, w[ib].qh, 4);
    int sumi = 0;
    for (int j = 0; j < 16; ++j) {
      const int lo = (w[ib].qs[j] & 0x0f) | static_cast<int>((h >> j) & 1) << 4;
      const int hi = (w[ib].qs[j] >> 4) | static_cast<int>((h >> (j + 16)) & 1) << 4;
      sumi += (lo - kOff) * x[ib].qs[j] + (hi - kOff) * x[ib].qs[j + 16];
    }
    if constexpr (kMin)
      sum += (fp16_to_fp32(w[ib].d) * fp16_to_fp32(x[ib].d)) * static_cast<float>(sumi) +
             fp16_to_fp32(w[ib].m) * fp16_to_fp32(x[ib].s);
    else
      sum += static_cast<float>(sumi) * (fp16_to_fp32(w[ib].d) * fp16_to_fp32(x[ib].d));
  }
  return sum;
}


float dot_q8_0_q8_0_impl(const BlockQ8_0* w, const BlockQ8_0* x, int64_t n_blocks) {
  float sum = 0.0f;
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    int sumi = 0;
    for (int j = 0; j < 32; ++j) sumi += w[ib].qs[j] * x[ib].qs[j];
    sum += static_cast<float>(sumi) * (fp16_to_fp32(w[ib].d) * fp16_to_fp32(x[ib].d));
  }
  return sum;
}

// The K types (ref::dot_k_q8_k's contract in ref.h): each super-block read as integers
// (k_block_ints), one exact integer dot over its 256 columns, scaled once.
float dot_k_q8_k_impl(DType t, const void* w, const BlockQ8_K* x, int64_t n_sb) {
  const bool mins = ref::k_has_mins(t);
  const size_t sb_bytes = row_bytes(t, kQK_K);
  ref::KInts k;
  float acc = 0.0f;
  for (int64_t is = 0; is < n_sb; ++is) {
    ref::k_block_ints(t, static_cast<const uint8_t*>(w) + is * sb_bytes, &k);
    const int8_t* p = x[is].qs;  // [256]
    int32_t isum = 0, msum = 0;
    for (int j = 0; j < 16; ++j) {
      int32_t part = 0;
      for (int e = 16 * j; e < 16 * j + 16; ++e) part += k.q[e] * p[e];
      isum += k.sc[j] * part;
    }
    for (int j = 0; j < 16; ++j) msum += k.m[j] * x[is].sums[j];
    const float dx = x[is].d;
    acc = std::fma(fp16_to_fp32(k.d) * dx, static_cast<float>(isum), acc);
    if (mins) acc = std::fma(-fp16_to_fp32(k.dmin) * dx, static_cast<float>(msum), acc);
  }
  return acc;
}

// Dot of a weight row of type t with an activation row already quantized by quantize_act(t).
float dot_quantized(DType t, const void* w, const void* xq, int64_t n) {
  switch (t) {
    case DType::Q4_0:
      return dot_q4_0_q8_0_impl(static_cast<const BlockQ4_0*>(w), static_cast<const BlockQ8_0*>(xq),
                                n / 32);
    case DType::Q4_1:
      return dot_q4_1_q8_1_impl(static_cast<const BlockQ4_1*>(w), static_cast<const BlockQ8_1*>(xq),
                                n / 32);
    case DType::Q5_0:
      return dot_q5_impl(static_cast<const BlockQ5_0*>(w), static_cast<const BlockQ8_0*>(xq),
                         n / 32);
    case DType::Q5_1:
      return dot_q5_impl(static_cast<const BlockQ5_1*>(w), static_cast<const BlockQ8_1*>(xq),
                         n / 32);
    case DType::IQ4_NL:
      return dot_iq4_nl_q8_0_impl(static_cast<const BlockIQ4_NL*>(w),
                                  static_cast<const BlockQ8_0*>(xq), n / 32);
    case DType::Q8_0:
      return dot_q8_0_q8_0_impl(static_cast<const BlockQ8_0*>(w), static_cast<const BlockQ8_0*>(xq),
                                n / 32);
    default:  // the K types
      return dot_k_q8_k_impl(t, w, static_cast<const BlockQ8_K*>(xq), n / 256);
  }
}

// Per-thread byte scratch, separate from thread_scratch's floats.
uint8_t* thread_bytes(size_t n) {
  thread_local std::vector<uint8_t> scratch;
  if (scratch.size() < n) scratch.resize(n);
  return scratch.data();
}

// matmul dequantizes this many weight rows, then streams each activation row past all of them,
// so x is read n_out / kRowTile times rather than n_out times. kRowTile divides kRowGrain so
// no chunk but the last ends in a partial tile.
constexpr int64_t kRowTile = 4;
// Rows per parallel_for grain: enough work per chunk to amortise the wake-up.
constexpr int64_t kRowGrain = 16;
static_assert(kRowGrain % kRowTile == 0);

}  // namespace

// ---- reference variant of the dispatched entry points (kernels/dispatch.cpp picks a variant) ----

namespace ref {

void quant_act_q8_0(const float* x, BlockQ8_0* dst, int64_t n_blocks) {
  quant_act_blocks(x, dst, n_blocks);
}
void quant_act_q8_1(const float* x, BlockQ8_1* dst, int64_t n_blocks) {
  quant_act_blocks(x, dst, n_blocks);
}
float dot_q4_0_q8_0(const BlockQ4_0* w, const BlockQ8_0* x, int64_t n_blocks) {
  return dot_q4_0_q8_0_impl(w, x, n_blocks);
}
float dot_q4_1_q8_1(const BlockQ4_1* w, const BlockQ8_1* x, int64_t n_blocks) {
  return dot_q4_1_q8_1_impl(w, x, n_blocks);
}
float dot_q8_0_q8_0(const BlockQ8_0* w, const BlockQ8_0* x, int64_t n_blocks) {
  return dot_q8_0_q8_0_impl(w, x, n_blocks);
}
float dot_f32(const float* a, const float* b, int64_t n) { return kernels::dot_f32(a, b, n); }
void quant_act_q8_k(const float* x, BlockQ8_K* dst, int64_t n_sb) {
  quant_act_q8_k_impl(x, dst, n_sb);
}
float dot_k_q8_k(DType t, const void* w, const BlockQ8_K* x, int64_t n_sb) {
  return dot_k_q8_k_impl(t, w, x, n_sb);
}

void dequantize_row(DType t, const void* src, float* dst, int64_t n) {
  // Precondition: n fills whole blocks of t.
  assert(whole_blocks(t, n));
  switch (t) {
    case DType::F32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::F16:
      return dequant_f16(static_cast<const uint16_t*>(src), dst, n);
    case DType::BF16:
      return dequant_bf16(static_cast<const uint16_t*>(src), dst, n);
    case DType::Q4_0:
      return dequant_q4_0(static_cast<const BlockQ4_0*>(src), dst, n / kQK4_0);
    case DType::Q4_1:
      return dequant_q4_1(static_cast<const BlockQ4_1*>(src), dst, n / kQK4_1);
    case DType::Q8_0:
      return dequant_q8_0(static_cast<const BlockQ8_0*>(src), dst, n / kQK8_0);
    default:
      if (!dequantize_row_blocks(t, src, dst, n))
        fail_unsupported("dequantize_row", t, kDequantTypes);
  }
}

float dot_row(DType t, const void* row, const float* x, int64_t n) {
  // Same arithmetic as matmul, so the two agree bit for bit.
  if (act_type(t) != DType::F32) {
    uint8_t* xq = thread_bytes(act_row_bytes(t, n));
    quantize_act(t, x, xq, n);
    return dot_quantized(t, row, xq, n);
  }
  return dot_f32(row_as_f32(t, row, n, thread_scratch(n)), x, n);
}

void matmul(const TensorView& w, const float* x, float* y, int64_t n_tok, ThreadPool& pool) {
  const int64_t n_out = w.n_rows;
  const int64_t n_in = w.n_cols;
  // Checked here, not per row: a kernel running on pool threads must not throw.
  const DTypeInfo* info = dtype_info(static_cast<uint32_t>(w.dtype));
  if (info == nullptr || !info->compute) fail_unsupported("matmul", w.dtype, kDequantTypes);
  // Preconditions: rows fill whole blocks and are at least row_bytes apart.
  assert(whole_blocks(w.dtype, n_in));
  assert(n_out <= 1 || w.row_stride >= row_bytes(w.dtype, n_in));
  if (n_out == 0 || n_tok == 0) return;

  if (act_type(w.dtype) != DType::F32) {
    // Quantize every activation row once (on the calling thread, whose scratch outlives the
    // parallel section), then each thread runs integer dots over its rows of W.
    const size_t xq_row = act_row_bytes(w.dtype, n_in);
    uint8_t* xq = thread_bytes(xq_row * static_cast<size_t>(n_tok));  // [n_tok, xq_row] bytes
    for (int64_t i = 0; i < n_tok; ++i) quantize_act(w.dtype, x + i * n_in, xq + i * xq_row, n_in);
    pool.parallel_for(
        n_out,
        [&](int64_t r_begin, int64_t r_end, int) {
          for (int64_t r = r_begin; r < r_end; ++r) {
            const uint8_t* wr = w.row(r);
            for (int64_t i = 0; i < n_tok; ++i)
              y[i * n_out + r] = dot_quantized(w.dtype, wr, xq + i * xq_row, n_in);
          }
        },
        kRowGrain);
    return;
  }

  pool.parallel_for(
      n_out,
      [&](int64_t r_begin, int64_t r_end, int) {
        float* scratch = thread_scratch(kRowTile * n_in);  // [kRowTile, n_in]
        const float* w_tile[kRowTile];                     // kRowTile rows of [n_in] f32
        for (int64_t r0 = r_begin; r0 < r_end; r0 += kRowTile) {
          const int64_t n_rows = std::min(kRowTile, r_end - r0);
          for (int64_t k = 0; k < n_rows; ++k)
            w_tile[k] = row_as_f32(w.dtype, w.row(r0 + k), n_in, scratch + k * n_in);
          for (int64_t i = 0; i < n_tok; ++i) {
            const float* xi = x + i * n_in;  // [n_in]
            float* yi = y + i * n_out;       // [n_out]
            for (int64_t k = 0; k < n_rows; ++k) yi[r0 + k] = dot_f32(w_tile[k], xi, n_in);
          }
        }
      },
      kRowGrain);
}

void round_to_f16(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = fp16_to_fp32(fp32_to_fp16(x[i]));
}

void f32_to_f16(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = fp32_to_fp16(x[i]);
}

void dequantize_rows(DType t, const void* src, size_t src_stride, int64_t n_rows, float* dst,
                     int64_t n) {
  for (int64_t r = 0; r < n_rows; ++r)
    dequantize_row(t, static_cast<const uint8_t*>(src) + r * src_stride, dst + r * n, n);
}

// The reference is the definition: one matmul per part.
void matmul_multi(const MatmulPart* parts, int n_parts, const float* x, int64_t n_tok,
                  ThreadPool& pool) {
  for (int k = 0; k < n_parts; ++k) matmul(*parts[k].w, x, parts[k].y, n_tok, pool);
}

}  // namespace ref

// ---- public entry points that are not dispatched (not hot: quantized KV-cache writes, tests) --

void quantize_row(DType t, const float* src, void* dst, int64_t n) {
  // Precondition: n fills whole blocks of t.
  assert(whole_blocks(t, n));
  switch (t) {
    case DType::F32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::F16:  // dispatched: every f16 KV-cache row write comes here
      return f32_to_f16(src, static_cast<uint16_t*>(dst), n);
    case DType::BF16: {
      auto* h = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) h[i] = fp32_to_bf16(src[i]);
      return;
    }
    case DType::Q4_0:
      return quant_q4_0(src, static_cast<BlockQ4_0*>(dst), n / kQK4_0);
    case DType::Q4_1:
      return quant_q4_1(src, static_cast<BlockQ4_1*>(dst), n / kQK4_1);
    case DType::Q8_0:
      return quant_q8_0(src, static_cast<BlockQ8_0*>(dst), n / kQK8_0);
    default:
      fail_unsupported("quantize_row", t, kQuantTypes);
  }
}

// ---- element-wise and row-wise ops (the ref variant) --------------------------------------------

namespace ref {

void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
  // Precondition: n > 0.
  assert(n > 0);
  double sum_sq = 0.0;
  for (int64_t i = 0; i < n; ++i) sum_sq += static_cast<double>(x[i]) * x[i];
  const float scale = static_cast<float>(1.0 / std::sqrt(sum_sq / static_cast<double>(n) + eps));
  // (x * scale) * w, in GGML's order (its rms_norm op scales, then a mul op applies w).
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * scale * w[i];
}

void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t n, float eps) {
  // Precondition: n > 0. Both passes over x finish before y (which may be x) is written.
  assert(n > 0);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  const double mean = sum / static_cast<double>(n);
  double sum_sq = 0.0;  // two-pass variance: no cancellation for large means
  for (int64_t i = 0; i < n; ++i) sum_sq += (x[i] - mean) * (x[i] - mean);
  const double scale = 1.0 / std::sqrt(sum_sq / static_cast<double>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>((x[i] - mean) * scale) * w[i] + b[i];
}

void softmax(float* x, int64_t n) {
  // Precondition: at least one x[i] is finite or +inf (an all -inf row has no distribution).
  if (n <= 0) return;
  float max = x[0];
  for (int64_t i = 1; i < n; ++i) max = std::fmax(max, x[i]);
  // Every exponent is <= 0 after subtracting the max, so expf cannot overflow; sum >= 1.
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

void swiglu(float* gate, const float* up, int64_t n) {
  // silu(g) = g / (1 + e^-g): for g < -88, e^-g is inf and the quotient a correctly signed 0.
  for (int64_t i = 0; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void gelu(float* x, int64_t n) {
  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in f32, the formula behind GGML's GELU
  // (GGML may read it from an f16 table; this is the exact-formula version).
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  constexpr float kCoefA = 0.044715f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    x[i] = 0.5f * v * (1.0f + std::tanh(kSqrt2OverPi * v * (1.0f + kCoefA * v * v)));
  }
}

void add(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void rope_rotate(float* x, int64_t n_head, int64_t head_dim, int64_t n_dims, const double* cs,
                 RopeMode mode) {
  // Preconditions: n_dims even and within the head.
  assert(n_dims % 2 == 0 && n_dims <= head_dim);
  const int64_t half = n_dims / 2;
  const double* cos_t = cs;         // [half]
  const double* sin_t = cs + half;  // [half]
  for (int64_t h = 0; h < n_head; ++h) {
    float* xh = x + h * head_dim;  // [head_dim]
    for (int64_t i = 0; i < half; ++i) {
      const int64_t i0 = mode == RopeMode::Normal ? 2 * i : i;
      const int64_t i1 = mode == RopeMode::Normal ? 2 * i + 1 : i + half;
      const double a = xh[i0];
      const double b = xh[i1];
      xh[i0] = static_cast<float>(a * cos_t[i] - b * sin_t[i]);
      xh[i1] = static_cast<float>(a * sin_t[i] + b * cos_t[i]);
    }
  }
}

}  // namespace ref

// ---- rotary position embedding: the definition and its tables ----------------------------------

void rope_freqs(int64_t n_dims, float freq_base, double* inv_freq) {
  assert(n_dims % 2 == 0);
  // The same expression rope() evaluates per pair, so pos * inv_freq[i] is its angle bit for bit.
  for (int64_t i = 0; i < n_dims / 2; ++i)
    inv_freq[i] = std::pow(static_cast<double>(freq_base),
                           -2.0 * static_cast<double>(i) / static_cast<double>(n_dims));
}

void rope_cos_sin(const double* inv_freq, int64_t n_pairs, int64_t pos, double* cs) {
  for (int64_t i = 0; i < n_pairs; ++i) {
    const double theta = static_cast<double>(pos) * inv_freq[i];
    cs[i] = std::cos(theta);
    cs[n_pairs + i] = std::sin(theta);
  }
}

// The definition: rope_freqs + rope_cos_sin + rope_rotate (either variant) give these values bit
// for bit (tested), with the forward pass paying one pow per pair per pass and one cos/sin per
// pair per token instead of all three per pair for every layer's Q and K.
void rope(float* x, int64_t n_head, int64_t head_dim, int64_t n_dims, int64_t pos, float freq_base,
          RopeMode mode) {
  // Preconditions: n_dims even and within the head.
  assert(n_dims % 2 == 0 && n_dims <= head_dim);
  const int64_t half = n_dims / 2;
  // Pair i rotates by theta_i = pos * base^(-2i / n_dims) radians. In double: at pos ~ 1e5 an
  // f32 angle would already be off by ~1e-2 rad.
  for (int64_t i = 0; i < half; ++i) {
    const double theta = static_cast<double>(pos) *
                         std::pow(static_cast<double>(freq_base),
                                  -2.0 * static_cast<double>(i) / static_cast<double>(n_dims));
    const double c = std::cos(theta);
    const double s = std::sin(theta);
    const int64_t i0 = mode == RopeMode::Normal ? 2 * i : i;
    const int64_t i1 = mode == RopeMode::Normal ? 2 * i + 1 : i + half;
    for (int64_t h = 0; h < n_head; ++h) {
      float* xh = x + h * head_dim;  // [head_dim]
      const double a = xh[i0];
      const double b = xh[i1];
      xh[i0] = static_cast<float>(a * c - b * s);
      xh[i1] = static_cast<float>(a * s + b * c);
    }
  }
}

void hadamard(float* x, int64_t n_head, int64_t head_dim) {
  assert(head_dim > 0 && (head_dim & (head_dim - 1)) == 0);
  // Fast Walsh-Hadamard transform: log2(head_dim) butterfly stages, then the 1/sqrt(n) scale
  // that makes H orthogonal and its own inverse (H H = I).
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  for (int64_t h = 0; h < n_head; ++h) {
    float* xh = x + h * head_dim;  // [head_dim]
    for (int64_t len = 1; len < head_dim; len <<= 1)
      for (int64_t i = 0; i < head_dim; i += 2 * len)
        for (int64_t j = i; j < i + len; ++j) {
          const float a = xh[j], b = xh[j + len];
          xh[j] = a + b;
          xh[j + len] = a - b;
        }
    for (int64_t j = 0; j < head_dim; ++j) xh[j] *= scale;
  }
}

}  // namespace kvlm::kernels
