// AVX2 + FMA + F16C twins of the reference kernels (ref/ops_ref.cpp). Compiled with
// -mavx2 -mfma -mf16c -ffp-contract=off (see ../CMakeLists.txt); dispatch.cpp calls into this file
// only on CPUs that have all three.
//
// Arithmetic (deviations from ref, all fixed by n alone):
//  * Activation quantization is bit-identical to ref's quant_act_*: same amax (max ignoring
//    NaN), same d = amax / 127 (Q8_K: 1 / id) and id = 127 / amax in scalar f32, same f32 product x * id, the
//    same round-half-even (vroundps nearest), same NaN -> 0 and clamp to [-127, 127].
//  * Quantized matmul (Q4_0/Q4_1/Q8_0 weights) is bit-identical to ref: per (row, token), block
//    by block in order, the exact integer block dot, converted once, times the rounded scale
//    product d_w * d_x, added to one running sum (Q4_1: plus m * s, rounded as ref rounds it).
//    The speed comes from the layout, not from reordering: weights are packed in groups of 8 rows
//    (kernels/packed.h) so that each vector instruction works on 8 rows' codes at once and every
//    row's sum sits in its own lane; no horizontal sums, one scale product per 8 rows.
//  * F16/BF16 weights in matmul and dot_row: register-tiled FMA kernels in half_avx2.cpp (ref's
//    16-lane order, fused). The dots below are for f32 weights, the dequantized types and
//    dot_f16 (f16 attention rows).
//  * f32 and f16 dots: 4 accumulators x 8 lanes over 32-column steps, FMA (one rounding per
//    product-add), leftover 8-column chunks into accumulators 0, 1, 2 and a masked final chunk into
//    accumulator 3; then ((a0 + a1) + (a2 + a3)) and hsum. No alignment peeling: the order depends
//    on n only, never on where the row lies in memory.
//  * matmul runs one packed group of 8 rows against 1-4 tokens per kernel call, so a weight
//    block is unpacked once for up to 4 tokens (a pair of groups against whole 16-token tiles:
//    avx2-amx's Q4_0/Q4_1/Q8_0, amx_avx2.cpp, and every variant's K types, kquant_kernels.h and
//    vnni_avx2.cpp); prefill walks ~128 KiB chunks of groups with 64 tokens at a time (see
//    qmatmul_groups). The arithmetic of an element never depends on the
//    tiling, so y[i, r] is bit-identical whatever n_tok, thread count, row split or packing.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/avx2/avx2.h"
#include "kernels/avx2/lanes.h"
#include "kernels/avx2/qgroup.h"
#include "kernels/avx2/qgroup_kernels.h"
#include "kernels/packed.h"
#include "kernels/ref/ref.h"

namespace kvlm::kernels::avx2 {

namespace {

// ---- helpers ------------------------------------------------------------------------------------

// 16 bytes of packed nibbles -> 32 bytes 0..15: low nibbles (elements 0..15) in bytes 0..15,
// high nibbles (elements 16..31) in bytes 16..31, the Q8 activation order.
inline __m256i unpack_nibbles(const uint8_t* qs) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

inline __m256i load32(const int8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// Per-thread f32 scratch, grown once to the widest row seen, so steady-state calls allocate
// nothing. Two slots, because matmul's calling thread holds the activation scales (kActSlot)
// while it also runs a chunk of rows that needs tile scratch (kTileSlot).
enum ScratchSlot { kActSlot = 0, kTileSlot = 1 };
float* thread_scratch(ScratchSlot slot, int64_t n) {
  thread_local std::vector<float> scratch[2];
  std::vector<float>& v = scratch[slot];
  if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
  return v.data();
}

// Per-thread byte scratch, as thread_scratch: slot 0 the quantized activations, slot 1 their
// tile panels.
uint8_t* thread_bytes(int slot, size_t n) {
  thread_local std::vector<uint8_t> scratch[2];
  std::vector<uint8_t>& v = scratch[slot];
  if (v.size() < n) v.resize(n);
  return v.data();
}

// ---- activation quantization (bit-identical to ref::quant_act_*) -------------------------------

// max |x[j]| over 32 j, skipping NaN. maxps returns its second operand when either is NaN: with
// the running max second, a NaN element is skipped, as std::fmax skips it in ref. Max is exact,
// so the order is free.
inline __m256 abs_max32(const float* x, __m256 m) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int k = 0; k < 4; ++k)
    m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + 8 * k), abs_mask), m);
  return m;
}

// 32 codes of x * id into dst (round half to even, NaN -> 0, clamped to [-127, 127]); q receives
// them as 4 x 8 int32 in element order.
inline void codes32(const float* x, __m256 vid, int8_t* dst, __m256i q[4]) {
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int k = 0; k < 4; ++k) {
    __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * k), vid),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_and_ps(r, _mm256_cmp_ps(r, r, _CMP_ORD_Q));  // NaN -> 0
    r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
    q[k] = _mm256_cvtps_epi32(r);  // exact: r is integral and in range
  }
  // Saturating packs interleave the 128-bit lanes; the permute restores element order.
  const __m256i p16a = _mm256_packs_epi32(q[0], q[1]);
  const __m256i p16b = _mm256_packs_epi32(q[2], q[3]);
  const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b), order);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), p8);
}

template <class Block>
void quant_act_blocks(const float* x, Block* blocks, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const float* xb = x + ib * 32;  // [32]
    const float amax = hmax(abs_max32(xb, _mm256_setzero_ps()));
    const float d = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    __m256i q[4];
    codes32(xb, _mm256_set1_ps(id), blocks[ib].qs, q);
    // d is never NaN (amax skips NaN); s is NaN only as 0 x inf (every code 0 when amax is
    // inf), the default NaN: half_bits gives fp32_to_fp16's bits for both.
    blocks[ib].d = half_bits(d);
    if constexpr (std::is_same_v<Block, BlockQ8_1>) {
      const int sum =
          hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
      blocks[ib].s = half_bits(static_cast<float>(sum) * d);
    }
  }
}

// ref::quant_act_q8_k's super-blocks: the same amax, id, codes and d = 1 / id in scalar f32.
void quant_act_k_blocks(const float* x, BlockQ8_K* blocks, int64_t n_sb) {
  for (int64_t is = 0; is < n_sb; ++is) {
    const float* xb = x + is * 256;  // [256]
    BlockQ8_K& b = blocks[is];
    __m256 m = _mm256_setzero_ps();
    for (int c = 0; c < 8; ++c) m = abs_max32(xb + 32 * c, m);
    const float amax = hmax(m);
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    const __m256 vid = _mm256_set1_ps(id);
    for (int c = 0; c < 8; ++c) {
      __m256i q[4];
      codes32(xb + 32 * c, vid, b.qs + 32 * c, q);
      b.sums[2 * c] = static_cast<int16_t>(hsum_i32(_mm256_add_epi32(q[0], q[1])));
      b.sums[2 * c + 1] = static_cast<int16_t>(hsum_i32(_mm256_add_epi32(q[2], q[3])));
    }
    b.d = amax != 0.0f ? 1.0f / id : 0.0f;
  }
}

void quantize_act(DType w_type, const float* x, void* dst, int64_t n) {
  switch (act_type(w_type)) {
    case DType::Q8_1:
      return quant_act_blocks(x, static_cast<BlockQ8_1*>(dst), n / 32);
    case DType::Q8_K:
      return quant_act_k_blocks(x, static_cast<BlockQ8_K*>(dst), n / 256);
    default:
      return quant_act_blocks(x, static_cast<BlockQ8_0*>(dst), n / 32);
  }
}

// ---- f32 and f16 dots ---------------------------------------------------------------------------

// Both dots share this body; Load(c) yields the 8 a-values at column c, LoadTail(c, k) the first k
// (zero beyond), so dot_f16(row) == dot_f32(dequantized row) bit for bit.
template <class Load, class LoadTail>
inline float dot_body(Load load_a, LoadTail load_a_tail, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    acc0 = _mm256_fmadd_ps(load_a(c), _mm256_loadu_ps(b + c), acc0);
    acc1 = _mm256_fmadd_ps(load_a(c + 8), _mm256_loadu_ps(b + c + 8), acc1);
    acc2 = _mm256_fmadd_ps(load_a(c + 16), _mm256_loadu_ps(b + c + 16), acc2);
    acc3 = _mm256_fmadd_ps(load_a(c + 24), _mm256_loadu_ps(b + c + 24), acc3);
  }
  if (c + 8 <= n) {
    acc0 = _mm256_fmadd_ps(load_a(c), _mm256_loadu_ps(b + c), acc0);
    c += 8;
  }
  if (c + 8 <= n) {
    acc1 = _mm256_fmadd_ps(load_a(c), _mm256_loadu_ps(b + c), acc1);
    c += 8;
  }
  if (c + 8 <= n) {
    acc2 = _mm256_fmadd_ps(load_a(c), _mm256_loadu_ps(b + c), acc2);
    c += 8;
  }
  if (c < n) {
    const __m256 bt = _mm256_maskload_ps(b + c, first_lanes(n - c));
    acc3 = _mm256_fmadd_ps(load_a_tail(c, n - c), bt, acc3);
  }
  return hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
}

float dot_f32_impl(const float* a, const float* b, int64_t n) {
  return dot_body([a](int64_t c) { return _mm256_loadu_ps(a + c); },
                  [a](int64_t c, int64_t k) { return _mm256_maskload_ps(a + c, first_lanes(k)); },
                  b, n);
}

float dot_f16_impl(const uint16_t* a, const float* b, int64_t n) {
  return dot_body(
      [a](int64_t c) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + c)));
      },
      [a](int64_t c, int64_t k) {
        alignas(16) uint16_t buf[8] = {};  // zero halves beyond the row, as maskload gives 0.0f
        std::memcpy(buf, a + c, static_cast<size_t>(k) * sizeof(uint16_t));
        return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
      },
      b, n);
}

// ---- quantized matmul over packed row groups ----------------------------------------------------

// Tokens from which prepare_acts quantizes on the pool's threads: a batch's rows take tens of
// microseconds on one thread, which the other would spend waiting; a decode token's row takes
// less than a hand-off.
constexpr int64_t kParallelActRows = 8;

// Quantizes n_tok rows of x (each n wide) for weight type t into the calling thread's scratch
// (the rows themselves on the pool's threads from kParallelActRows tokens); with panels, also
// lays the codes of whole 16-token tiles out for the tile kernels (Acts::panel).
// Token i's per-block numbers (qgroup.h's Acts::d, s, c at act_at) from its quantized row qi.
//   ds: d at [o], s at [n_num + o];  cs: c at [o]
void block_numbers(DType t, const Acts& a, int64_t i, const uint8_t* qi, int64_t n_num, float* ds,
                   int32_t* cs) {
  // The int16 pair (lo, hi) in one int32, as the K kernels' vpmaddwd reads it.
  auto pair = [](int32_t lo, int32_t hi) {
    return static_cast<int32_t>(static_cast<uint32_t>(lo & 0xffff) | static_cast<uint32_t>(hi) << 16);
  };
  for (int64_t ib = 0; ib < a.n_blocks; ++ib) {
    const int64_t o = act_at(a, i, ib);
    if (act_type(t) == DType::Q8_K) {  // the K types: d of the super-block, the 16-sums
      const auto& b = reinterpret_cast<const BlockQ8_K*>(qi)[ib / 8];
      ds[o] = b.d;
      cs[o] = pair(b.sums[2 * (ib % 8)], b.sums[2 * (ib % 8) + 1]);
    } else if (act_type(t) == DType::Q8_1) {  // Q4_1, Q5_1
      const auto& b = reinterpret_cast<const BlockQ8_1*>(qi)[ib];
      ds[o] = half(b.d);
      ds[n_num + o] = half(b.s);
    } else if (t == DType::Q5_0 || t == DType::IQ4_NL) {  // c: the halves' sums, as the K kernels'
      const auto& b = reinterpret_cast<const BlockQ8_0*>(qi)[ib];
      ds[o] = half(b.d);
      int32_t lo = 0, hi = 0;
      for (int j = 0; j < 16; ++j) {
        lo += b.qs[j];
        hi += b.qs[j + 16];
      }
      cs[o] = pair(lo, hi);
    } else {
      const auto& b = reinterpret_cast<const BlockQ8_0*>(qi)[ib];
      ds[o] = half(b.d);
      int32_t sum = 0;
      for (int8_t v : b.qs) sum += v;
      cs[o] = (t == DType::Q4_0 ? 8 : 128) * sum;
    }
  }
}

Acts prepare_acts(DType t, const float* x, int64_t n_tok, int64_t n, bool panels,
                  ThreadPool& pool) {
  const DType at = act_type(t);
  Acts a;
  a.q_stride = act_row_bytes(t, n);
  // K types: blk is a super-block (kquant_kernels.h's k_codes finds a sub-block's codes in it).
  a.blk = at == DType::Q8_1 ? sizeof(BlockQ8_1) : at == DType::Q8_K ? sizeof(BlockQ8_K)
                                                                    : sizeof(BlockQ8_0);
  a.qs_off = at == DType::Q8_1 ? offsetof(BlockQ8_1, qs) : at == DType::Q8_K ? offsetof(BlockQ8_K, qs)
                                                                            : offsetof(BlockQ8_0, qs);
  a.n_blocks = n / 32;
  uint8_t* q = thread_bytes(0, a.q_stride * static_cast<size_t>(n_tok));
  const int64_t n_panel_tok = panels ? n_tok / kActTile * kActTile : 0;
  int8_t* panel =
      n_panel_tok > 0
          ? reinterpret_cast<int8_t*>(thread_bytes(1, static_cast<size_t>(n_panel_tok * n)))
          : nullptr;
  a.n_tok = n_tok;
  const int64_t n_num = n_tok * a.n_blocks;  // d, s and c each, in act_at's order
  float* ds = thread_scratch(kActSlot, 2 * n_num);  // d, then s
  thread_local std::vector<int32_t> c;
  if (at != DType::Q8_1 && c.size() < static_cast<size_t>(n_num))
    c.resize(static_cast<size_t>(n_num));
  int32_t* cs = c.data();
  // Token i writes only its own row of q, ds and c (the buffers of the calling thread, sized
  // above), so the rows may go to any thread: the same bytes either way.
  auto rows = [&](int64_t i0, int64_t i1, int) {
    for (int64_t i = i0; i < i1; ++i) {
      uint8_t* qi = q + i * a.q_stride;
      quantize_act(t, x + i * n, qi, n);
      if (i < n_panel_tok) {
        int8_t* pi = panel + (i / kActTile) * kActTile * n + (i % kActTile) * 32;
        for (int64_t ib = 0; ib < a.n_blocks; ++ib) {
          // Block ib's 32 codes: a block of its own, or sub-block ib % 8 of a Q8_K super-block.
          const size_t at_ib = at == DType::Q8_K
                                   ? static_cast<size_t>(ib / 8) * a.blk + 32 * static_cast<size_t>(ib % 8)
                                   : static_cast<size_t>(ib) * a.blk;
          std::memcpy(pi + ib * kActTile * 32, qi + at_ib + a.qs_off, 32);
        }
      }
      block_numbers(t, a, i, qi, n_num, ds, cs);
    }
  };
  if (n_tok >= kParallelActRows)
    pool.parallel_for(n_tok, rows);
  else
    rows(0, n_tok, 0);
  a.q = q;
  a.panel = panel;
  a.d = ds;
  a.s = ds + n_num;
  a.c = c.data();
  return a;
}

// AVX2's 4-code dots. Q4: maddubs (nibble 0..15 x code -127..127: pairs |.| <= 3810) summed in
// 16 bits, 8 per block (8 x 3810 < 2^15: never saturates), then madd pairs them into the row's
// 32-bit lane. Q8_0: each maddubs (pairs <= 2 * 128 * 127 < 2^15) madd'ed to 32 bits at once.
struct DotAvx2 {
  static __m256i q4_add(__m256i acc, __m256i w, __m256i x) {
    return _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, x));
  }
  static __m256i q4_sum(__m256i acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
  static __m256i q8_add(__m256i acc, __m256i w, __m256i x) {
    return _mm256_add_epi32(acc,
                            _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
  }
};

// Prefill blocking: each thread walks its groups in chunks of about kChunkBytes of packed weights
// (kept in L2), and streams the tokens past each chunk kChunkToks at a time (their activation
// blocks stay in L1/L2 while every group of the chunk reads them). Views without packed bytes
// pack each chunk into the thread's scratch once, before its tokens go by.
constexpr size_t kChunkBytes = 128 * 1024;
constexpr int64_t kChunkToks = 64;

// Tokens t0 .. t0 + n_t (n_t <= kGroupToks) against the group at gp, or (pair) it and the next
// one, gb bytes on: the pair kernel, or where the variant has none, the group kernel twice.
//   out: [n_t, pair ? 16 : 8]
void call_groups(const GroupFn* fns, const PairFn* pairs, const uint8_t* gp, size_t gb,
                 const Acts& x, int64_t t0, int n_t, bool pair, float* out) {
  if (!pair) return fns[n_t - 1](gp, x, t0, out);
  if (pairs[0] != nullptr) return pairs[n_t - 1](gp, gp + gb, x, t0, out);
  alignas(64) float half[2][kGroupToks * kGroupRows];  // [2][n_t, 8]
  fns[n_t - 1](gp, x, t0, half[0]);
  fns[n_t - 1](gp + gb, x, t0, half[1]);
  for (int t = 0; t < n_t; ++t)
    for (int h = 0; h < 2; ++h)
      std::copy(half[h] + kGroupRows * t, half[h] + kGroupRows * (t + 1),
                out + 2 * kGroupRows * t + kGroupRows * h);
}

// y rows of groups [g_begin, g_end) for all n_tok tokens.   y: [n_tok, w.n_rows]
void qmatmul_groups(const GroupFn* fns, const PairFn* pairs, TileFn tile, const TensorView& w,
                    const Acts& x, int64_t n_tok, float* y, int64_t g_begin, int64_t g_end) {
  const int64_t n_out = w.n_rows;
  const size_t group_bytes = packed_group_bytes(w);
  // Groups per chunk: even where the variant has pair kernels, so no chunk ends in a group alone.
  int64_t chunk = std::max<int64_t>(1, static_cast<int64_t>(kChunkBytes / group_bytes));
  const bool has_pairs = pairs[0] != nullptr || tile != nullptr;
  if (has_pairs && chunk > 1) chunk -= chunk % 2;
  thread_local std::vector<uint8_t> own;  // a chunk packed here (views without packed bytes)
  if (w.packed == nullptr && own.size() < group_bytes * static_cast<size_t>(chunk))
    own.resize(group_bytes * static_cast<size_t>(chunk));
  for (int64_t c0 = g_begin; c0 < g_end; c0 += chunk) {
    const int64_t c1 = std::min(g_end, c0 + chunk);
    const uint8_t* base;
    if (w.packed != nullptr) {
      base = static_cast<const uint8_t*>(w.packed) + static_cast<size_t>(c0) * group_bytes;
    } else {
      for (int64_t g = c0; g < c1; ++g) pack_group(w, g, own.data() + (g - c0) * group_bytes);
      base = own.data();
    }
    for (int64_t k0 = 0; k0 < n_tok; k0 += kChunkToks) {
      const int64_t k1 = std::min(n_tok, k0 + kChunkToks);
      // Two groups at a time where the variant has pair (or tile) kernels, the chunk has two left
      // and more than one token goes by (the same numbers as one group at a time: every row's
      // arithmetic is its own lane's). Not in decode: one token's matrix-vector product waits on memory,
      // and there one group at a time measured faster (docs/bench-log/2026-12-02-zen5-avx512.md).
      for (int64_t g = c0; g < c1;) {
        const uint8_t* gp = base + static_cast<size_t>(g - c0) * group_bytes;
        const int64_t r0 = g * kGroupRows;
        const bool pair = has_pairs && g + 1 < c1 && n_tok > 1;
        const int64_t rows = pair ? 2 * kGroupRows : kGroupRows;  // rows per kernel call
        const int64_t n_r = std::min(rows, n_out - r0);
        // The next call's groups (the `step` after these), asked for into L2 a share before
        // each of these tokens' calls, on the first token block over a chunk only (later blocks
        // find the chunk in L2). A forward pass reads each matrix from memory once, and with the
        // hardware prefetcher alone the pair kernels waited on every new group: +11-25% for 4
        // and 16 tokens over a matrix not in cache (QMatmul/<type>/<n_tok>/1,
        // docs/bench-log/2026-12-03-zen4-session-11.md). Not for one token: a matrix-vector product
        // waits on memory anyway, and there the extra requests measured slower. Prefetching changes
        // no arithmetic.
        const int64_t step = pair ? 2 : 1;
        const uint8_t* next = nullptr;
        size_t ahead_bytes = 0, share = 0;
        // A pair's whole 16-token blocks go to the tile kernel in one call where the variant has
        // one (it prefetches the next groups itself, a block at a time), the rest 4 per call.
        const int64_t n_tiled = pair && tile != nullptr ? (k1 - k0) / kTileToks * kTileToks : 0;
        const bool ahead = k0 == 0 && n_tok > 1 && w.packed != nullptr && g + step < g_end;
        const int n_ahead = ahead ? static_cast<int>(std::min(step, g_end - g - step)) : 0;
        if (ahead) {
          next = gp + static_cast<size_t>(step) * group_bytes;
          ahead_bytes = static_cast<size_t>(n_ahead) * group_bytes;
          const size_t n_calls = static_cast<size_t>((k1 - k0 + kGroupToks - 1) / kGroupToks);
          share = (ahead_bytes / 64 + n_calls - 1) / n_calls * 64;  // bytes, whole lines
        }
        if (n_tiled > 0) {
          alignas(64) float partial[kChunkToks * 2 * kGroupRows];  // [n_tiled, 16]
          const TileDst dst{y + k0 * n_out + r0, n_out, static_cast<int>(n_r), partial};
          tile(gp, gp + group_bytes, x, k0, n_tiled, next, n_ahead, dst);
          next = nullptr;  // prefetched
        }
        for (int64_t t0 = k0 + n_tiled; t0 < k1; t0 += kGroupToks) {
          const int n_t = static_cast<int>(std::min<int64_t>(kGroupToks, k1 - t0));
          if (next != nullptr) {
            const size_t b0 = static_cast<size_t>((t0 - k0) / kGroupToks) * share;
            for (size_t b = b0; b < std::min(ahead_bytes, b0 + share); b += 64)
              _mm_prefetch(reinterpret_cast<const char*>(next + b), _MM_HINT_T1);
          }
          alignas(64) float out[kGroupToks * 2 * kGroupRows];  // [n_t, rows]
          call_groups(fns, pairs, gp, group_bytes, x, t0, n_t, pair, out);
          for (int t = 0; t < n_t; ++t)
            std::copy(out + t * rows, out + t * rows + n_r, y + (t0 + t) * n_out + r0);
        }
        g += step;
      }
    }
  }
}

// Whether the variant's kernels for weight type t read Acts::panel (they have a tile kernel).
bool wants_panels(const GroupKernels& k, DType t) {
  if (k_group_kernels(t) == nullptr) return k.q4_1x16 != nullptr;
  return k.k_tile != nullptr && k.k_tile(t) != nullptr;
}

void qmatmul(const GroupKernels& k, const TensorView& w, const Acts& x, int64_t n_tok, float* y,
             int64_t g_begin, int64_t g_end) {
  if (const GroupFn* kf = k.k_groups(w.dtype)) {  // Q5_0, Q5_1, IQ4_NL, K types
    static constexpr PairFn kNoPairs[kGroupToks] = {};
    const PairFn* kp = k.k_pairs != nullptr ? k.k_pairs(w.dtype) : nullptr;
    const TileFn kt = k.k_tile != nullptr ? k.k_tile(w.dtype) : nullptr;
    return qmatmul_groups(kf, kp != nullptr ? kp : kNoPairs, kt, w, x, n_tok, y, g_begin, g_end);
  }
  const GroupFn* fns = w.dtype == DType::Q4_0 ? k.q4_0 : w.dtype == DType::Q4_1 ? k.q4_1 : k.q8_0;
  const PairFn* pairs =
      w.dtype == DType::Q4_0 ? k.q4_0x2 : w.dtype == DType::Q4_1 ? k.q4_1x2 : k.q8_0x2;
  const TileFn tile =
      w.dtype == DType::Q4_0 ? k.q4_0x16 : w.dtype == DType::Q4_1 ? k.q4_1x16 : k.q8_0x16;
  qmatmul_groups(fns, pairs, tile, w, x, n_tok, y, g_begin, g_end);
}

// ---- dequantization -----------------------------------------------------------------------------

void dequant_f16(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = half(src[i]);
}

// ---- quantized rows, bit-identical to ref: each value is ref's one f32 product (then, for Q4_1,
// Q5_1 one f32 add, for Q4_K, Q5_K one f32 subtract), just 8 lanes at a time (no FMA: ref rounds
// twice), with the K-quants' f32 sub-block scales from ref::sub_block_scales itself.

enum class Offset { kNone, kAdd, kSub };

// 32 signed byte codes q -> dst[32] = code * scale, then + or - off as kOff says; codes 0..15
// take scale0 and off0, codes 16..31 scale1 and off1 (different for sub-blocks of 16).
template <Offset kOff = Offset::kNone>
inline void store_codes(__m256i q, float scale0, float scale1, float off0, float off1,
                        float* dst) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int k = 0; k < 4; ++k) {
    const __m256 m = _mm256_set1_ps(k < 2 ? scale0 : scale1);
    __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[k])), m);
    const __m256 o = _mm256_set1_ps(k < 2 ? off0 : off1);
    if constexpr (kOff == Offset::kAdd) v = _mm256_add_ps(v, o);
    if constexpr (kOff == Offset::kSub) v = _mm256_sub_ps(v, o);
    _mm256_storeu_ps(dst + 8 * k, v);
  }
}

void dequant_q8_0(const BlockQ8_0* b, float* dst, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const float d = half(b[ib].d);
    store_codes(load32(b[ib].qs), d, d, 0.0f, 0.0f, dst + ib * 32);
  }
}

// Byte j = 16 where bit j of the little-endian u32 at qh is set, else 0: Q5's fifth bits.
inline __m256i q5_high_bits(const uint8_t* qh) {
  uint32_t h;
  std::memcpy(&h, qh, 4);
  // Byte j takes byte j / 8 of h (bytes 0..3 of each 128-bit lane are h), then its bit j % 8.
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(h)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                       3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

// Q4_0: (nibble - 8) * d;  Q4_1: nibble * d + m;  Q5_0: (code - 16) * d;  Q5_1: code * d + m,
// a Q5 code being nibble | fifth bit << 4.
template <DType kType, class Block>
void dequant_q45(const Block* b, float* dst, int64_t n_blocks) {
  constexpr bool kQ5 = kType == DType::Q5_0 || kType == DType::Q5_1;
  constexpr bool kMin = kType == DType::Q4_1 || kType == DType::Q5_1;
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const float d = half(b[ib].d);
    __m256i q = unpack_nibbles(b[ib].qs);  // bytes 0..15: low nibbles, 16..31: high
    if constexpr (kQ5) q = _mm256_or_si256(q, q5_high_bits(b[ib].qh));
    if constexpr (kMin) {
      const float m = half(b[ib].m);
      store_codes<Offset::kAdd>(q, d, d, m, m, dst + ib * 32);
    } else {
      q = _mm256_sub_epi8(q, _mm256_set1_epi8(kQ5 ? 16 : 8));
      store_codes(q, d, d, 0.0f, 0.0f, dst + ib * 32);
    }
  }
}

// 16 bytes of IQ4 nibbles (Q4_0's order) -> their 32 table values as signed bytes.
inline __m256i iq4_codes(const uint8_t* qs) {
  const __m256i table = _mm256_broadcastsi128_si256(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4nlValues)));
  return _mm256_shuffle_epi8(table, unpack_nibbles(qs));
}

void dequant_iq4_nl(const BlockIQ4_NL* b, float* dst, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const float d = half(b[ib].d);
    store_codes(iq4_codes(b[ib].qs), d, d, 0.0f, 0.0f, dst + ib * 32);
  }
}

void dequant_iq4_xs(const BlockIQ4_XS* b, float* dst, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    float dl[16], ml[16];
    ref::sub_block_scales(DType::IQ4_XS, &b[ib], dl, ml);
    for (int s = 0; s < 8; ++s)
      store_codes(iq4_codes(b[ib].qs + 16 * s), dl[s], dl[s], 0.0f, 0.0f,
                  dst + ib * kQK_K + 32 * s);
  }
}

// (x >> n) & mask in every byte of x, for a mask that keeps only bits that were in that byte.
inline __m256i byte_bits(__m256i x, int n, __m256i mask) {
  return _mm256_and_si256(_mm256_srl_epi16(x, _mm_cvtsi32_si128(n)), mask);
}

// Q4_K / Q5_K: sub-block s's 32 codes are the low (s even) or high (s odd) nibbles of
// qs[32 * (s / 2) ..], Q5_K's fifth bits bit s of qh[0 .. 32); value = dl * code - ml.
template <DType kType, class Block>
void dequant_q45_k(const Block* b, float* dst, int64_t n_blocks) {
  const __m256i low4 = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    float dl[16], ml[16];
    ref::sub_block_scales(kType, &b[ib], dl, ml);
    for (int s = 0; s < 8; ++s) {
      const __m256i raw = load32(reinterpret_cast<const int8_t*>(b[ib].qs + 32 * (s / 2)));
      __m256i q = byte_bits(raw, 4 * (s % 2), low4);
      if constexpr (kType == DType::Q5_K) {
        const __m256i bit = byte_bits(load32(reinterpret_cast<const int8_t*>(b[ib].qh)), s, one);
        q = _mm256_or_si256(q, _mm256_slli_epi16(bit, 4));  // bit <= 1: stays in its byte
      }
      store_codes<Offset::kSub>(q, dl[s], dl[s], ml[s], ml[s], dst + ib * kQK_K + 32 * s);
    }
  }
}

// Q2_K / Q3_K (layouts in ref): in half h, codes 32j .. 32j + 31 are bits 2j, 2j + 1 of
// qs[32h ..]; Q3_K subtracts 4 where bit 4h + j of hmask[0 .. 32) is clear. Sub-blocks of 16:
// value = dl * code (Q2_K: - ml).
template <DType kType, class Block>
void dequant_q23_k(const Block* b, float* dst, int64_t n_blocks) {
  const __m256i three = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    float dl[16], ml[16];
    ref::sub_block_scales(kType, &b[ib], dl, ml);
    for (int h = 0; h < 2; ++h) {
      const __m256i qs = load32(reinterpret_cast<const int8_t*>(b[ib].qs + 32 * h));
      for (int j = 0; j < 4; ++j) {
        const int s = 8 * h + 2 * j;
        float* y = dst + ib * kQK_K + 128 * h + 32 * j;
        __m256i q = byte_bits(qs, 2 * j, three);
        if constexpr (kType == DType::Q2_K) {
          store_codes<Offset::kSub>(q, dl[s], dl[s + 1], ml[s], ml[s + 1], y);
        } else {
          const __m256i hm = load32(reinterpret_cast<const int8_t*>(b[ib].hmask));
          const __m256i high4 = _mm256_slli_epi16(byte_bits(hm, 4 * h + j, one), 2);
          q = _mm256_add_epi8(_mm256_sub_epi8(q, _mm256_set1_epi8(4)), high4);  // -4 .. 3
          store_codes(q, dl[s], dl[s + 1], 0.0f, 0.0f, y);
        }
      }
    }
  }
}

// Q6_K (layout in ref): in half h, codes 32k .. 32k + 31 are nibble k / 2 of ql[64h + 32 (k % 2)
// ..] with bits 2k, 2k + 1 of qh[32h ..] above them, minus 32; sub-blocks of 16.
void dequant_q6_k(const BlockQ6_K* b, float* dst, int64_t n_blocks) {
  const __m256i low4 = _mm256_set1_epi8(0x0f), three = _mm256_set1_epi8(3);
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    float dl[16];
    ref::sub_block_scales(DType::Q6_K, &b[ib], dl, nullptr);
    for (int h = 0; h < 2; ++h) {
      const auto* base = reinterpret_cast<const __m256i*>(b[ib].ql + 64 * h);
      const __m256i ql[2] = {_mm256_loadu_si256(base), _mm256_loadu_si256(base + 1)};
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[ib].qh + 32 * h));
      for (int k = 0; k < 4; ++k) {
        const __m256i lo = byte_bits(ql[k % 2], 4 * (k / 2), low4);
        const __m256i hi = byte_bits(qh, 2 * k, three);
        const __m256i q =
            _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32));
        store_codes(q, dl[8 * h + 2 * k], dl[8 * h + 2 * k + 1], 0.0f, 0.0f,
                    dst + ib * kQK_K + 128 * h + 32 * k);
      }
    }
  }
}

void dequant_bf16(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i h =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
  }
  for (; i < n; ++i) dst[i] = bf16_to_fp32(src[i]);
}

// Row of type t (n elements) as f32: F32 rows are used in place when aligned, everything else is
// dequantized into scratch[n].
const float* row_as_f32(DType t, const void* row, int64_t n, float* scratch) {
  if (t == DType::F32 && reinterpret_cast<uintptr_t>(row) % alignof(float) == 0)
    return static_cast<const float*>(row);
  dequantize_row(t, row, scratch, n);
  return scratch;
}

// f32-path matmul: kRowTile weight rows dequantized into per-thread scratch, every token dotted
// with them (as ref): F32 weights (every quantized type kvlm computes with has packed kernels).
constexpr int64_t kRowTile = 4;
// Rows per parallel_for grain: enough work per chunk to amortise the wake-up; a multiple of both
// tile heights so that only a chunk's last tile is partial.
constexpr int64_t kRowGrain = 16;
static_assert(kRowGrain % kRowTile == 0 && kRowGrain % kGroupRows == 0);

// Multiply-adds below which a matmul runs on the calling thread alone. A ThreadPool round trip
// (wake the workers, wait for the last) measured ~55 us on the dev box, about 1M multiply-adds
// of these kernels; splitting less work than that across 2 threads made decode slower (49-56
// tok/s with every matmul split, ~96 with this threshold, 2 threads, SmolLM2-135M Q4_1). The
// split never changes results, so this is purely a speed knob; lower it with a cheaper pool.
constexpr double kMinParallelMacs = 1 << 16;

// parallel_for grain for a matmul of n_out rows and `macs` multiply-adds: the whole range (so
// ThreadPool runs it inline) when the work is too small to share.
int64_t row_grain(int64_t n_out, double macs) {
  return macs < kMinParallelMacs ? std::max<int64_t>(n_out, 1) : kRowGrain;
}

// The same in row groups (quantized matmul): kRowGrain rows = 2 groups per grain.
int64_t group_grain(int64_t n_groups, double macs) {
  return macs < kMinParallelMacs ? std::max<int64_t>(n_groups, 1) : kRowGrain / kGroupRows;
}

}  // namespace

// ---- entry points -------------------------------------------------------------------------------

void quant_act_q8_0(const float* x, BlockQ8_0* dst, int64_t n_blocks) {
  quant_act_blocks(x, dst, n_blocks);
}
void quant_act_q8_1(const float* x, BlockQ8_1* dst, int64_t n_blocks) {
  quant_act_blocks(x, dst, n_blocks);
}
void quant_act_q8_k(const float* x, BlockQ8_K* dst, int64_t n_sb) { quant_act_k_blocks(x, dst, n_sb); }

float dot_f32(const float* a, const float* b, int64_t n) {
  return dot_f32_impl(a, b, n);
}
float dot_f16(const uint16_t* a, const float* b, int64_t n) {
  return dot_f16_impl(a, b, n);
}

void dequantize_row(DType t, const void* src, float* dst, int64_t n) {
  switch (t) {
    case DType::F16:
      return dequant_f16(static_cast<const uint16_t*>(src), dst, n);
    case DType::BF16:
      return dequant_bf16(static_cast<const uint16_t*>(src), dst, n);
    // Hot for quantized KV caches: attention dequantizes every cached row it reads.
    case DType::Q8_0:
      return dequant_q8_0(static_cast<const BlockQ8_0*>(src), dst, n / 32);
    case DType::Q4_0:
      return dequant_q45<DType::Q4_0>(static_cast<const BlockQ4_0*>(src), dst, n / 32);
    case DType::Q4_1:
      return dequant_q45<DType::Q4_1>(static_cast<const BlockQ4_1*>(src), dst, n / 32);
    // The weight types (embedding rows, tests: matmul multiplies them packed, as integers).
    case DType::Q5_0:
      return dequant_q45<DType::Q5_0>(static_cast<const BlockQ5_0*>(src), dst, n / 32);
    case DType::Q5_1:
      return dequant_q45<DType::Q5_1>(static_cast<const BlockQ5_1*>(src), dst, n / 32);
    case DType::IQ4_NL:
      return dequant_iq4_nl(static_cast<const BlockIQ4_NL*>(src), dst, n / 32);
    case DType::IQ4_XS:
      return dequant_iq4_xs(static_cast<const BlockIQ4_XS*>(src), dst, n / kQK_K);
    case DType::Q4_K:
      return dequant_q45_k<DType::Q4_K>(static_cast<const BlockQ4_K*>(src), dst, n / kQK_K);
    case DType::Q5_K:
      return dequant_q45_k<DType::Q5_K>(static_cast<const BlockQ5_K*>(src), dst, n / kQK_K);
    case DType::Q6_K:
      return dequant_q6_k(static_cast<const BlockQ6_K*>(src), dst, n / kQK_K);
    case DType::Q2_K:
      return dequant_q23_k<DType::Q2_K>(static_cast<const BlockQ2_K*>(src), dst, n / kQK_K);
    case DType::Q3_K:
      return dequant_q23_k<DType::Q3_K>(static_cast<const BlockQ3_K*>(src), dst, n / kQK_K);
    default:
      // F32 (copied): ref reports unsupported types.
      return ref::dequantize_row(t, src, dst, n);
  }
}

void round_to_f16(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + i),
                                                           _MM_FROUND_TO_NEAREST_INT)));
  for (; i < n; ++i) y[i] = half(_cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT));
}

void f32_to_f16(const float* x, uint16_t* y, int64_t n) {
  // vcvtps2ph rounds as fp32_to_fp16 does (ties to even, subnormals, overflow to inf) but keeps a
  // NaN's payload; fp32_to_fp16 gives every NaN sign | 0x7e00, so NaN lanes are replaced.
  const __m128i quiet = _mm_set1_epi16(0x7e00), sign = _mm_set1_epi16(static_cast<short>(0x8000));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    const __m256i nan32 = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m128i nan16 =
        _mm_packs_epi32(_mm256_castsi256_si128(nan32), _mm256_extracti128_si256(nan32, 1));
    const __m128i canon = _mm_or_si128(_mm_and_si128(h, sign), quiet);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm_blendv_epi8(h, canon, nan16));
  }
  for (; i < n; ++i) y[i] = fp32_to_fp16(x[i]);
}

void dequantize_rows(DType t, const void* src, size_t src_stride, int64_t n_rows, float* dst,
                     int64_t n) {
  for (int64_t r = 0; r < n_rows; ++r)
    dequantize_row(t, static_cast<const uint8_t*>(src) + r * src_stride, dst + r * n, n);
}

float dot_row(DType t, const void* row, const float* x, int64_t n) {
  // Same arithmetic as matmul's, so the two agree bit for bit.
  switch (t) {
    case DType::Q4_0:
    case DType::Q4_1:
    case DType::Q8_0:
    case DType::Q5_0:
    case DType::Q5_1:
    case DType::IQ4_NL:
    case DType::Q2_K:
    case DType::Q3_K:
    case DType::Q4_K:
    case DType::Q5_K:
    case DType::Q6_K:
    case DType::IQ4_XS:
      // matmul's arithmetic is ref's here (one row: the scalar loop is as good as any).
      return ref::dot_row(t, row, x, n);
    case DType::F16:
    case DType::BF16:
      return dot_half(t, static_cast<const uint16_t*>(row), x, n);
    case DType::F32:
      if (reinterpret_cast<uintptr_t>(row) % alignof(float) == 0)
        return dot_f32_impl(static_cast<const float*>(row), x, n);
      [[fallthrough]];
    default:
      return dot_f32_impl(row_as_f32(t, row, n, thread_scratch(kTileSlot, n)), x, n);
  }
}

namespace {

void matmul_with(const GroupKernels& gk, const TensorView& w, const float* x, float* y,
                 int64_t n_tok, ThreadPool& pool) {
  const int64_t n_out = w.n_rows;
  const int64_t n_in = w.n_cols;
  const DTypeInfo* info = dtype_info(static_cast<uint32_t>(w.dtype));
  // Unsupported types: ref throws the error (here, on the calling thread, before any pool work).
  if (info == nullptr || !info->compute) return ref::matmul(w, x, y, n_tok, pool);
  // Preconditions: rows fill whole blocks and are at least row_bytes apart.
  assert(n_in % info->block_size == 0);
  assert(n_out <= 1 || w.row_stride >= row_bytes(w.dtype, n_in));
  if (n_out == 0 || n_tok == 0) return;

  if (packable(w.dtype)) {
    // Quantize every activation row once (into the calling thread's scratch, which outlives the
    // parallel section; a batch's rows on the pool's threads); each thread then runs its row
    // groups of W for all tokens.
    const Acts xv = prepare_acts(w.dtype, x, n_tok, n_in, wants_panels(gk, w.dtype), pool);
    const int64_t ng = packed_groups(w);
    pool.parallel_for(
        ng,
        [&](int64_t g_begin, int64_t g_end, int) { qmatmul(gk, w, xv, n_tok, y, g_begin, g_end); },
        group_grain(ng, double(n_out) * n_in * n_tok));
    return;
  }
  if (w.dtype == DType::F16 || w.dtype == DType::BF16) {
    pool.parallel_for(
        n_out,
        [&](int64_t r_begin, int64_t r_end, int) {
          matmul_half_rows(w, x, y, n_tok, r_begin, r_end);
        },
        row_grain(n_out, double(n_out) * n_in * n_tok));
    return;
  }

  pool.parallel_for(
      n_out,
      [&](int64_t r_begin, int64_t r_end, int) {
        float* scratch = thread_scratch(kTileSlot, kRowTile * n_in);  // [kRowTile, n_in]
        const float* w_tile[kRowTile];                                // kRowTile rows of [n_in] f32
        for (int64_t r0 = r_begin; r0 < r_end; r0 += kRowTile) {
          const int64_t n_rows = std::min(kRowTile, r_end - r0);
          for (int64_t k = 0; k < n_rows; ++k)
            w_tile[k] = row_as_f32(w.dtype, w.row(r0 + k), n_in, scratch + k * n_in);
          for (int64_t i = 0; i < n_tok; ++i) {
            const float* xi = x + i * n_in;  // [n_in]
            float* yi = y + i * n_out;       // [n_out]
            for (int64_t k = 0; k < n_rows; ++k) yi[r0 + k] = dot_f32_impl(w_tile[k], xi, n_in);
          }
        }
      },
      row_grain(n_out, double(n_out) * n_in * n_tok));
}

void matmul_multi_with(const GroupKernels& gk, const MatmulPart* parts, int n_parts,
                       const float* x, int64_t n_tok, ThreadPool& pool) {
  // One section only when every part takes the same quantized activations over the same n_in;
  // otherwise (f32/f16 weights, mixed types) separate calls, which give the same numbers.
  const DType t = n_parts > 0 ? parts[0].w->dtype : DType::F32;
  bool shared = n_parts > 1 && act_type(t) != DType::F32 && n_tok > 0;
  int64_t n_rows = 0;
  for (int k = 0; k < n_parts && shared; ++k) {
    shared = parts[k].w->dtype == t && parts[k].w->n_cols == parts[0].w->n_cols;
    n_rows += parts[k].w->n_rows;
  }
  if (!shared) {
    for (int k = 0; k < n_parts; ++k) matmul_with(gk, *parts[k].w, x, parts[k].y, n_tok, pool);
    return;
  }
  const int64_t n_in = parts[0].w->n_cols;
  assert(n_in % 32 == 0);
  const Acts xv = prepare_acts(t, x, n_tok, n_in, wants_panels(gk, t), pool);
  // Row groups of the parts laid end to end; each part's groups run as matmul would run them.
  int64_t total = 0;
  for (int k = 0; k < n_parts; ++k) total += packed_groups(*parts[k].w);
  pool.parallel_for(
      total,
      [&](int64_t g_begin, int64_t g_end, int) {
        int64_t off = 0;
        for (int k = 0; k < n_parts && off < g_end; ++k) {
          const TensorView& w = *parts[k].w;
          const int64_t ng = packed_groups(w);
          const int64_t b = std::max(g_begin, off) - off, e = std::min(g_end, off + ng) - off;
          if (b < e) qmatmul(gk, w, xv, n_tok, parts[k].y, b, e);
          off += ng;
        }
      },
      group_grain(total, double(n_rows) * n_in * n_tok));
}

}  // namespace

const GroupKernels kAvx2Groups = make_groups<DotAvx2>(std::make_index_sequence<kGroupToks>());

void matmul(const TensorView& w, const float* x, float* y, int64_t n_tok, ThreadPool& pool) {
  matmul_with(kAvx2Groups, w, x, y, n_tok, pool);
}
void matmul_multi(const MatmulPart* parts, int n_parts, const float* x, int64_t n_tok,
                  ThreadPool& pool) {
  matmul_multi_with(kAvx2Groups, parts, n_parts, x, n_tok, pool);
}
void matmul_vnni(const TensorView& w, const float* x, float* y, int64_t n_tok, ThreadPool& pool) {
  matmul_with(kVnniGroups, w, x, y, n_tok, pool);
}
void matmul_multi_vnni(const MatmulPart* parts, int n_parts, const float* x, int64_t n_tok,
                       ThreadPool& pool) {
  matmul_multi_with(kVnniGroups, parts, n_parts, x, n_tok, pool);
}
void matmul_amx(const TensorView& w, const float* x, float* y, int64_t n_tok, ThreadPool& pool) {
  matmul_with(kAmxGroups, w, x, y, n_tok, pool);
}
void matmul_multi_amx(const MatmulPart* parts, int n_parts, const float* x, int64_t n_tok,
                      ThreadPool& pool) {
  matmul_multi_with(kAmxGroups, parts, n_parts, x, n_tok, pool);
}

}  // namespace kvlm::kernels::avx2
