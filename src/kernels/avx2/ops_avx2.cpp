// AVX2 + FMA + F16C twins of the reference kernels (ref/ops_ref.cpp). Compiled with
// -mavx2 -mfma -mf16c -ffp-contract=off (see ../CMakeLists.txt); dispatch.cpp calls into this file
// only on CPUs that have all three.
//
// Arithmetic (deviations from ref, all fixed by n alone):
//  * Activation quantization is bit-identical to ref's quant_act_blocks: same amax (max ignoring
//    NaN), same d = amax / 127 and id = 127 / amax in scalar f32, same f32 product x * id, the
//    same round-half-even (vroundps nearest), same NaN -> 0 and clamp to [-127, 127].
//  * Integer block dots (llama.cpp's maddubs/madd scheme) give 8 exact i32 partial sums per block
//    and (row, token) pair; each is converted to f32 (exact: |partial| <= 4 * 128 * 127) and fused
//    into its lane: acc = fma(d_w * d_x, partial, acc), with d_w * d_x exact (two 11-bit
//    mantissas). So each of the 8 lanes rounds once per block, and the lanes are folded by one
//    fixed tree (hsum) at the end; Q4_1's m * s terms are a separate running sum in block order,
//    added last. This is the arithmetic of llama.cpp's AVX2 vec_dot kernels. Ref instead rounds
//    sumi * d once per block into one running sum: same inputs, so the two differ by rounding
//    only (bounds in tests/kernels/test_kernels_avx2.cpp).
//  * f32 and f16 dots: 4 accumulators x 8 lanes over 32-column steps, FMA (one rounding per
//    product-add), leftover 8-column chunks into accumulators 0, 1, 2 and a masked final chunk into
//    accumulator 3; then ((a0 + a1) + (a2 + a3)) and hsum. No alignment peeling: the order depends
//    on n only, never on where the row lies in memory.
//  * matmul computes R weight rows x T tokens per inner loop to reuse every load (a weight block
//    is unpacked once for T tokens, an activation block loaded once for R rows); prefill first
//    unpacks an L1-sized panel of rows that all tokens then stream past, decode reads W in
//    address order (see qmatmul_rows). Every (row, token) element still runs exactly the 1 x 1
//    sequence of operations on its own accumulator, so y[i, r] is bit-identical whatever tile
//    shape, path, n_tok, thread count or row split produced it, and equals dot_row, which is the
//    1 x 1 tile.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/avx2/avx2.h"
#include "kernels/avx2/lanes.h"
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

uint8_t* thread_bytes(size_t n) {
  thread_local std::vector<uint8_t> scratch;
  if (scratch.size() < n) scratch.resize(n);
  return scratch.data();
}

// ---- activation quantization (bit-identical to ref::quant_act_*) -------------------------------

template <class Block>
void quant_act_blocks(const float* x, Block* blocks, int64_t n_blocks) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const float* xb = x + ib * 32;  // [32]
    __m256 v[4];
    for (int k = 0; k < 4; ++k) v[k] = _mm256_loadu_ps(xb + 8 * k);
    // maxps returns its second operand when either is NaN: with the running max second, a NaN
    // element is skipped, as std::fmax skips it in ref. Max is exact, so the order is free.
    __m256 m = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) m = _mm256_max_ps(_mm256_and_ps(v[k], abs_mask), m);
    const float amax = hmax(m);
    const float d = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    const __m256 vid = _mm256_set1_ps(id);
    __m256i q[4];
    for (int k = 0; k < 4; ++k) {
      __m256 r =
          _mm256_round_ps(_mm256_mul_ps(v[k], vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r = _mm256_and_ps(r, _mm256_cmp_ps(r, r, _CMP_ORD_Q));  // NaN -> 0
      r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
      q[k] = _mm256_cvtps_epi32(r);  // exact: r is integral and in range
    }
    // Saturating packs interleave the 128-bit lanes; the permute restores element order.
    const __m256i p16a = _mm256_packs_epi32(q[0], q[1]);
    const __m256i p16b = _mm256_packs_epi32(q[2], q[3]);
    const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(blocks[ib].qs), p8);
    blocks[ib].d = fp32_to_fp16(d);
    if constexpr (std::is_same_v<Block, BlockQ8_1>) {
      const int sum =
          hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
      blocks[ib].s = fp32_to_fp16(static_cast<float>(sum) * d);
    }
  }
}

void quantize_act(DType w_type, const float* x, void* dst, int64_t n) {
  if (act_type(w_type) == DType::Q8_1)
    quant_act_blocks(x, static_cast<BlockQ8_1*>(dst), n / 32);
  else
    quant_act_blocks(x, static_cast<BlockQ8_0*>(dst), n / 32);
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

// ---- integer block dots, as R x T tiles ---------------------------------------------------------

// Quantized activations as the tiles read them: the blocks (bytes identical to ref's) plus their
// f16 scales widened once to f32 (exactly), so the inner loop broadcasts a float instead of
// converting a half for every (block, token). Q8_1's s is stored block-major, so the m * s terms
// of up to 4 consecutive tokens are one 4-lane load.
struct ActView {
  const uint8_t* q;  // [n_tok, q_stride] bytes: Q8_0 or Q8_1 blocks
  size_t q_stride;
  const float* d;    // [n_tok, n_blocks] block scales d
  const float* s;    // [n_blocks, s_stride] Q8_1's s = d * sum(q), token-minor; unused for Q8_0
  int64_t s_stride;  // n_tok; s has 4 zero floats of padding past its last block
  int64_t n_blocks;
  ActView token(int64_t t) const {
    return {q + t * q_stride, q_stride, d + t * n_blocks, s + t, s_stride, n_blocks};
  }
};

// Floats prepare_act needs for d and s of n_tok rows of n_blocks blocks.
int64_t act_scale_floats(int64_t n_tok, int64_t n_blocks) {
  return 2 * n_tok * n_blocks + 4;
}

// Quantizes n_tok rows of x (each n wide) for weight type t.
//   q: [n_tok, act_row_bytes(t, n)] bytes;  ds: [act_scale_floats(n_tok, n / 32)] floats
ActView prepare_act(DType t, const float* x, int64_t n_tok, int64_t n, uint8_t* q, float* ds) {
  const int64_t n_blocks = n / 32;
  const size_t q_stride = act_row_bytes(t, n);
  float* d = ds;                     // [n_tok, n_blocks]
  float* s = ds + n_tok * n_blocks;  // [n_blocks, n_tok] + 4 padding
  std::fill(s + n_tok * n_blocks, s + n_tok * n_blocks + 4, 0.0f);
  for (int64_t i = 0; i < n_tok; ++i) {
    uint8_t* qi = q + i * q_stride;
    float* di = d + i * n_blocks;
    quantize_act(t, x + i * n, qi, n);
    if (act_type(t) == DType::Q8_1) {
      const auto* b = reinterpret_cast<const BlockQ8_1*>(qi);
      for (int64_t ib = 0; ib < n_blocks; ++ib) {
        di[ib] = half(b[ib].d);
        s[ib * n_tok + i] = half(b[ib].s);
      }
    } else {
      const auto* b = reinterpret_cast<const BlockQ8_0*>(qi);
      for (int64_t ib = 0; ib < n_blocks; ++ib) di[ib] = half(b[ib].d);
    }
  }
  return {q, q_stride, d, s, n_tok, n_blocks};
}

// A Kind describes one (weight, activation) block pair: how to unpack each side once per block,
// and the exact integer dot of an unpacked pair as 8 i32 partial sums.

struct KindQ4_0 {
  using WBlock = BlockQ4_0;
  using XBlock = BlockQ8_0;
  static constexpr bool kHasMin = false;
  struct W {
    __m256i q;  // nibbles 0..15 (value + 8)
    __m256 d;
  };
  struct X {
    __m256i q;
    __m256i q8;  // pairwise sums 8 * (q[2k] + q[2k+1]): the "+ 8" of the nibbles, removed below
  };
  static __m256i unpack(const WBlock& b) { return unpack_nibbles(b.qs); }
  static W from_unpacked(__m256i q, __m256 d) { return {q, d}; }
  static X load_x(const XBlock& b) {
    const __m256i q = load32(b.qs);
    return {q, _mm256_maddubs_epi16(_mm256_set1_epi8(8), q)};
  }
  // sum (n - 8) y = sum n y - 8 sum y, per pair in i16 (|.| <= 2 * 15 * 127 + 2 * 8 * 127 < 2^15;
  // maddubs cannot saturate: unsigned side <= 15), then pairs of pairs in i32.
  static __m256i dot(const W& w, const X& x) {
    const __m256i p = _mm256_sub_epi16(_mm256_maddubs_epi16(w.q, x.q), x.q8);
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
  }
};

struct KindQ4_1 {
  using WBlock = BlockQ4_1;
  using XBlock = BlockQ8_1;
  static constexpr bool kHasMin = true;
  struct W {
    __m256i q;  // nibbles 0..15
    __m256 d;
  };
  struct X {
    __m256i q;
  };
  static __m256i unpack(const WBlock& b) { return unpack_nibbles(b.qs); }
  static W from_unpacked(__m256i q, __m256 d) { return {q, d}; }
  static float min_w(const WBlock& b) { return half(b.m); }
  static X load_x(const XBlock& b) { return {load32(b.qs)}; }
  // Unsigned nibble x signed code: maddubs pairs <= 2 * 15 * 127, no saturation.
  static __m256i dot(const W& w, const X& x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w.q, x.q), _mm256_set1_epi16(1));
  }
};

struct KindQ8_0 {
  using WBlock = BlockQ8_0;
  using XBlock = BlockQ8_0;
  static constexpr bool kHasMin = false;
  struct W {
    __m256i q;    // signed codes, to sign the activations
    __m256i abs;  // |q|, the unsigned side of maddubs
    __m256 d;
  };
  struct X {
    __m256i q;
  };
  static __m256i unpack(const WBlock& b) { return load32(b.qs); }
  static W from_unpacked(__m256i q, __m256 d) { return {q, _mm256_sign_epi8(q, q), d}; }
  static X load_x(const XBlock& b) { return {load32(b.qs)}; }
  // w y = |w| (sign(w) y). Pairs <= 2 * 128 * 127 < 2^15 (activation codes are within +-127).
  static __m256i dot(const W& w, const X& x) {
    const __m256i p = _mm256_maddubs_epi16(w.abs, _mm256_sign_epi8(x.q, w.q));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
  }
};

// ---- weight sources: where a tile's rows come from ------------------------------------------
// Both give the tile the same W values for the same block, so the arithmetic of an element does
// not depend on which source fed it.

// Rows read straight from the GGUF blocks, unpacked in the tile's loop (decode, dot_row).
template <class K>
struct BlockRows {
  const uint8_t* w;  // row 0
  size_t stride;     // bytes between the tile's rows
  int64_t n_blocks;
  float* m;  // [R, n_blocks] Q4_1's mins, widened here as the blocks go by
  typename K::W load(int r, int64_t ib) const {
    const auto& b = reinterpret_cast<const typename K::WBlock*>(w + r * stride)[ib];
    if constexpr (K::kHasMin) m[r * n_blocks + ib] = K::min_w(b);
    return K::from_unpacked(K::unpack(b), _mm256_set1_ps(half(b.d)));
  }
  const float* mins(int r) const { return m + r * n_blocks; }
};

struct alignas(32) Bytes32 {
  uint8_t b[32];
};

// Rows unpacked once into L1-sized scratch (prefill), then read by every token group: the nibble
// shuffles and f16 conversions are paid once per row instead of once per row and token group.
struct Panel {
  Bytes32* q;  // [n_rows, n_blocks] unpacked codes, as K::unpack gives them
  float* d;    // [n_rows, n_blocks] weight scales
  float* m;    // [n_rows, n_blocks] Q4_1's mins
  int64_t n_blocks;
};

template <class K>
void unpack_panel(const TensorView& w, int64_t r0, int64_t n_rows, const Panel& p) {
  for (int64_t r = 0; r < n_rows; ++r) {
    const auto* b = reinterpret_cast<const typename K::WBlock*>(w.row(r0 + r));
    const int64_t o = r * p.n_blocks;
    for (int64_t ib = 0; ib < p.n_blocks; ++ib) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(p.q + o + ib), K::unpack(b[ib]));
      p.d[o + ib] = half(b[ib].d);
      if constexpr (K::kHasMin) p.m[o + ib] = K::min_w(b[ib]);
    }
  }
}

template <class K>
struct PanelRows {
  const Bytes32* q;  // row 0 of the tile in the panel
  const float* d;
  const float* m;
  int64_t n_blocks;
  typename K::W load(int r, int64_t ib) const {
    const int64_t o = r * n_blocks + ib;
    return K::from_unpacked(_mm256_load_si256(reinterpret_cast<const __m256i*>(q + o)),
                            _mm256_broadcast_ss(d + o));
  }
  const float* mins(int r) const { return m + r * n_blocks; }
};

// ---- the tile -----------------------------------------------------------------------------------

// y[t * y_tok_stride + r * y_row_stride] = dot(weight row r, activation row t), r < R, t < T.
//   w: R weight rows (a BlockRows or PanelRows);  x: from the tile's token 0
// Per element: 8 lanes, acc = fma(d_w * d_x, partial, acc) per block in block order, hsum, then
// (Q4_1) + the running sum of m * s in block order (product and sum rounded separately). That
// is the arithmetic of llama.cpp's AVX2 ggml_vec_dot_q4_1_q8_1 (its q4_0 and q8_0 dots use the
// same per-block scheme), so kvlm tracks the reference's own rounding where it runs that path.
// Nothing depends on R, T, the source or the neighbours: the m * s lanes of different tokens
// never mix.
template <class K, int R, int T, class Rows>
void tile(const Rows& w, const ActView& x, float* y, int64_t y_row_stride, int64_t y_tok_stride) {
  const int64_t n_blocks = x.n_blocks;
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    typename K::W wb[R];
    for (int r = 0; r < R; ++r) wb[r] = w.load(r, ib);
    for (int t = 0; t < T; ++t) {
      const typename K::X xb =
          K::load_x(reinterpret_cast<const typename K::XBlock*>(x.q + t * x.q_stride)[ib]);
      const __m256 dx = _mm256_broadcast_ss(x.d + t * n_blocks + ib);
      for (int r = 0; r < R; ++r) {
        const __m256 p = _mm256_cvtepi32_ps(K::dot(wb[r], xb));
        acc[r][t] = _mm256_fmadd_ps(_mm256_mul_ps(wb[r].d, dx), p, acc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(16) float sum_m[4] = {};  // Q4_1: sum_b m_b * s_b of tokens 0..T-1 of row r
    if constexpr (K::kHasMin) {
      static_assert(T <= 4);
      const float* m = w.mins(r);
      __m128 sm = _mm_setzero_ps();
      for (int64_t ib = 0; ib < n_blocks; ++ib)
        sm = _mm_add_ps(sm, _mm_mul_ps(_mm_set1_ps(m[ib]), _mm_loadu_ps(x.s + ib * x.s_stride)));
      _mm_store_ps(sum_m, sm);
    }
    for (int t = 0; t < T; ++t) {
      float v = hsum(acc[r][t]);
      if constexpr (K::kHasMin) v += sum_m[t];
      y[t * y_tok_stride + r * y_row_stride] = v;
    }
  }
}

// Prefill tile: kTileRows weight rows x kTileToks tokens. Each (row, token) pair costs 5 vector
// ops per block (maddubs, madd, cvt, mul, fma), and that pair count, not loads, bounds the tile:
// on the dev box (Zen 4, shared) 2x4, 4x2, 3x4 and 4x4 all reach 38-45 GMAC/s per core and 4x4
// was among the best (it spills accumulators, which costs little next to those ops). Decode
// tiles: kDecodeRows rows x the 1..kTileToks tokens.
constexpr int kTileRows = 4;
constexpr int kTileToks = 4;  // at most 4: Q4_1's m * s sums of a tile's tokens share a __m128
constexpr int kDecodeRows = 4;

template <class K, class Rows>
using TileFn = void (*)(const Rows&, const ActView&, float*, int64_t, int64_t);

// kTiles<K, Rows, N_R, N_T>[(rows - 1) * N_T + toks - 1]: the tile for a (rows x toks) piece.
template <class K, class Rows, int NT, size_t... I>
constexpr std::array<TileFn<K, Rows>, sizeof...(I)> make_tiles(std::index_sequence<I...>) {
  return {&tile<K, static_cast<int>(I / NT) + 1, static_cast<int>(I % NT) + 1, Rows>...};
}
template <class K, class Rows, int NR, int NT>
constexpr std::array<TileFn<K, Rows>, NR * NT> kTiles =
    make_tiles<K, Rows, NT>(std::make_index_sequence<NR * NT>());

// Bytes of unpacked panel a thread keeps hot while every token streams past it: half of a 32 KiB
// L1d, leaving room for the activation blocks of a token group.
constexpr size_t kPanelBytes = 16 * 1024;

// y rows [r_begin, r_end) for all n_tok tokens of x.   y: [n_tok, n_out]
template <class K>
void qmatmul_rows(const TensorView& w, const ActView& x, int64_t n_tok, float* y, int64_t r_begin,
                  int64_t r_end) {
  const int64_t n_out = w.n_rows;
  const int64_t n_blocks = x.n_blocks;
  if (n_tok <= kTileToks) {
    // Decode: one pass over W, nothing to reuse across token groups, so no panel. A tile still
    // takes kDecodeRows rows (independent accumulation chains, shared activation loads), but rows
    // a quarter of the chunk apart, so each row is its own sequential stream: on the dev box, 4
    // adjacent rows' interleaved streams read DRAM at ~7.5 GB/s against ~11 GB/s for 1 stream or
    // 4 distant ones, and decode is bound by reading W.
    float* m = thread_scratch(kTileSlot, kDecodeRows * n_blocks);  // [kDecodeRows, n_blocks]
    constexpr auto& tiles = kTiles<K, BlockRows<K>, kDecodeRows, kTileToks>;
    const int64_t span = (r_end - r_begin) / kDecodeRows;
    for (int64_t i = 0; i < span; ++i) {
      const BlockRows<K> rows{w.row(r_begin + i), span * w.row_stride, n_blocks, m};
      tiles[(kDecodeRows - 1) * kTileToks + n_tok - 1](rows, x, y + r_begin + i, span, n_out);
    }
    for (int64_t r = r_begin + kDecodeRows * span; r < r_end; ++r)
      tiles[n_tok - 1](BlockRows<K>{w.row(r), 0, n_blocks, m}, x, y + r, 1, n_out);
    return;
  }
  // Prefill: unpack a panel of rows, then stream every token past it in groups of kTileToks;
  // within a group, kTileRows x kTileToks tiles reuse each weight block kTileToks times and each
  // activation block kTileRows times.
  constexpr auto& tiles = kTiles<K, PanelRows<K>, kTileRows, kTileToks>;
  const size_t panel_row_bytes = static_cast<size_t>(n_blocks) * (sizeof(Bytes32) + 2 * 4);
  const int64_t rows_per_panel = std::max<int64_t>(
      kTileRows, static_cast<int64_t>(kPanelBytes / panel_row_bytes) / kTileRows * kTileRows);
  const int64_t panel_elems = rows_per_panel * n_blocks;
  thread_local std::vector<Bytes32> panel_q;
  if (panel_q.size() < static_cast<size_t>(panel_elems)) panel_q.resize(panel_elems);
  float* panel_dm = thread_scratch(kTileSlot, 2 * panel_elems);  // [2, rows_per_panel, n_blocks]
  const Panel panel{panel_q.data(), panel_dm, panel_dm + panel_elems, n_blocks};
  for (int64_t rb = r_begin; rb < r_end; rb += rows_per_panel) {
    const int64_t n_rows = std::min(rows_per_panel, r_end - rb);
    unpack_panel<K>(w, rb, n_rows, panel);
    for (int64_t t0 = 0; t0 < n_tok; t0 += kTileToks) {
      const int64_t n_t = std::min<int64_t>(kTileToks, n_tok - t0);
      const ActView xt = x.token(t0);
      for (int64_t r = 0; r < n_rows; r += kTileRows) {
        const int64_t n_r = std::min<int64_t>(kTileRows, n_rows - r);
        const int64_t o = r * n_blocks;
        const PanelRows<K> rows{panel.q + o, panel.d + o, panel.m + o, n_blocks};
        tiles[(n_r - 1) * kTileToks + (n_t - 1)](rows, xt, y + t0 * n_out + rb + r, 1, n_out);
      }
    }
  }
}

// One weight row with one activation row already in blocks (the public building blocks and
// dot_row): the 1 x 1 tile, with the activation scales widened as prepare_act does.
template <class K>
float dot_blocks(const typename K::WBlock* w, const typename K::XBlock* x, int64_t n_blocks) {
  float* d = thread_scratch(kActSlot, 3 * n_blocks + 4);  // d [n_blocks], s [n_blocks + 4], m
  float* s = d + n_blocks;
  float* m = s + n_blocks + 4;
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    d[ib] = half(x[ib].d);
    if constexpr (K::kHasMin)
      s[ib] = half(x[ib].s);
    else
      s[ib] = 0.0f;
  }
  std::fill(s + n_blocks, s + n_blocks + 4, 0.0f);
  const ActView xv{reinterpret_cast<const uint8_t*>(x), 0, d, s, 1, n_blocks};
  const BlockRows<K> rows{reinterpret_cast<const uint8_t*>(w), 0, n_blocks, m};
  float y;
  tile<K, 1, 1>(rows, xv, &y, 0, 0);
  return y;
}

// ---- dequantization -----------------------------------------------------------------------------

void dequant_f16(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = half(src[i]);
}

// Quantized rows, bit-identical to ref: each value is one f32 product (and, for Q4_1, one f32
// add), exactly as ref computes it, just 8 lanes at a time (no FMA: ref rounds twice).
void dequant_q8_0(const BlockQ8_0* b, float* dst, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const __m256 d = _mm256_set1_ps(half(b[ib].d));
    const __m256i q = load32(b[ib].qs);
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int k = 0; k < 4; ++k)
      _mm256_storeu_ps(dst + ib * 32 + 8 * k,
                       _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[k])), d));
  }
}

// Q4_0 (kMin false): (nibble - 8) * d;  Q4_1 (kMin true): nibble * d + m.
template <bool kMin, class Block>
void dequant_q4(const Block* b, float* dst, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const __m256 d = _mm256_set1_ps(half(b[ib].d));
    __m256i q = unpack_nibbles(b[ib].qs);  // bytes 0..15: low nibbles, 16..31: high
    if constexpr (!kMin) q = _mm256_sub_epi8(q, _mm256_set1_epi8(8));
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int k = 0; k < 4; ++k) {
      __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[k])), d);
      if constexpr (kMin) {
        v = _mm256_add_ps(v, _mm256_set1_ps(half(b[ib].m)));
      }
      _mm256_storeu_ps(dst + ib * 32 + 8 * k, v);
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
// with them (as ref; the weight types here are not the hot ones for quantized models).
constexpr int64_t kRowTile = 4;
// Rows per parallel_for grain: enough work per chunk to amortise the wake-up; a multiple of both
// tile heights so that only a chunk's last tile is partial.
constexpr int64_t kRowGrain = 16;
static_assert(kRowGrain % kRowTile == 0 && kRowGrain % kTileRows == 0 &&
              kRowGrain % kDecodeRows == 0);

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

}  // namespace

// ---- entry points -------------------------------------------------------------------------------

void quant_act_q8_0(const float* x, BlockQ8_0* dst, int64_t n_blocks) {
  quant_act_blocks(x, dst, n_blocks);
}
void quant_act_q8_1(const float* x, BlockQ8_1* dst, int64_t n_blocks) {
  quant_act_blocks(x, dst, n_blocks);
}

float dot_q4_0_q8_0(const BlockQ4_0* w, const BlockQ8_0* x, int64_t n_blocks) {
  return dot_blocks<KindQ4_0>(w, x, n_blocks);
}
float dot_q4_1_q8_1(const BlockQ4_1* w, const BlockQ8_1* x, int64_t n_blocks) {
  return dot_blocks<KindQ4_1>(w, x, n_blocks);
}
float dot_q8_0_q8_0(const BlockQ8_0* w, const BlockQ8_0* x, int64_t n_blocks) {
  return dot_blocks<KindQ8_0>(w, x, n_blocks);
}
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
      return dequant_q4<false>(static_cast<const BlockQ4_0*>(src), dst, n / 32);
    case DType::Q4_1:
      return dequant_q4<true>(static_cast<const BlockQ4_1*>(src), dst, n / 32);
    default:
      // Other types are not hot (embedding lookups, one row per token): ref's loops are
      // bit-exact with GGML, and it reports unsupported types.
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

void dequantize_rows(DType t, const void* src, size_t src_stride, int64_t n_rows, float* dst,
                     int64_t n) {
  for (int64_t r = 0; r < n_rows; ++r)
    dequantize_row(t, static_cast<const uint8_t*>(src) + r * src_stride, dst + r * n, n);
}

float dot_row(DType t, const void* row, const float* x, int64_t n) {
  // Same arithmetic as matmul's 1 x 1 tile, so the two agree bit for bit.
  switch (t) {
    case DType::Q4_0:
    case DType::Q4_1:
    case DType::Q8_0: {
      uint8_t* xq = thread_bytes(act_row_bytes(t, n));
      quantize_act(t, x, xq, n);
      if (t == DType::Q4_0)
        return dot_q4_0_q8_0(static_cast<const BlockQ4_0*>(row),
                             reinterpret_cast<const BlockQ8_0*>(xq), n / 32);
      if (t == DType::Q4_1)
        return dot_q4_1_q8_1(static_cast<const BlockQ4_1*>(row),
                             reinterpret_cast<const BlockQ8_1*>(xq), n / 32);
      return dot_q8_0_q8_0(static_cast<const BlockQ8_0*>(row),
                           reinterpret_cast<const BlockQ8_0*>(xq), n / 32);
    }
    case DType::F16:
      // The attention's K . q over an f16 cache: no dequantized copy of the row.
      return dot_f16_impl(static_cast<const uint16_t*>(row), x, n);
    case DType::F32:
      if (reinterpret_cast<uintptr_t>(row) % alignof(float) == 0)
        return dot_f32_impl(static_cast<const float*>(row), x, n);
      [[fallthrough]];
    default:
      return dot_f32_impl(row_as_f32(t, row, n, thread_scratch(kTileSlot, n)), x, n);
  }
}

void matmul(const TensorView& w, const float* x, float* y, int64_t n_tok, ThreadPool& pool) {
  const int64_t n_out = w.n_rows;
  const int64_t n_in = w.n_cols;
  const DTypeInfo* info = dtype_info(static_cast<uint32_t>(w.dtype));
  // Unsupported types: ref throws the error (here, on the calling thread, before any pool work).
  if (info == nullptr || !info->compute) return ref::matmul(w, x, y, n_tok, pool);
  // Preconditions: rows fill whole blocks and are at least row_bytes apart.
  assert(n_in % info->block_size == 0);
  assert(n_out <= 1 || w.row_stride >= row_bytes(w.dtype, n_in));
  if (n_out == 0 || n_tok == 0) return;

  if (act_type(w.dtype) != DType::F32) {
    // Quantize every activation row once (on the calling thread, whose scratch outlives the
    // parallel section); each thread then runs tiles over its rows of W for all tokens.
    const int64_t n_blocks = n_in / 32;
    uint8_t* q = thread_bytes(act_row_bytes(w.dtype, n_in) * static_cast<size_t>(n_tok));
    float* ds = thread_scratch(kActSlot, act_scale_floats(n_tok, n_blocks));
    const ActView xv = prepare_act(w.dtype, x, n_tok, n_in, q, ds);
    const DType t = w.dtype;
    pool.parallel_for(
        n_out,
        [&](int64_t r_begin, int64_t r_end, int) {
          if (t == DType::Q4_0)
            qmatmul_rows<KindQ4_0>(w, xv, n_tok, y, r_begin, r_end);
          else if (t == DType::Q4_1)
            qmatmul_rows<KindQ4_1>(w, xv, n_tok, y, r_begin, r_end);
          else
            qmatmul_rows<KindQ8_0>(w, xv, n_tok, y, r_begin, r_end);
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

void matmul_multi(const MatmulPart* parts, int n_parts, const float* x, int64_t n_tok,
                  ThreadPool& pool) {
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
    for (int k = 0; k < n_parts; ++k) matmul(*parts[k].w, x, parts[k].y, n_tok, pool);
    return;
  }
  const int64_t n_in = parts[0].w->n_cols;
  assert(n_in % 32 == 0);
  const int64_t n_blocks = n_in / 32;
  uint8_t* q = thread_bytes(act_row_bytes(t, n_in) * static_cast<size_t>(n_tok));
  float* ds = thread_scratch(kActSlot, act_scale_floats(n_tok, n_blocks));
  const ActView xv = prepare_act(t, x, n_tok, n_in, q, ds);
  // Rows [r_begin, r_end) of the parts laid end to end; each piece runs as matmul would run it.
  pool.parallel_for(
      n_rows,
      [&](int64_t r_begin, int64_t r_end, int) {
        int64_t off = 0;
        for (int k = 0; k < n_parts && off < r_end; off += parts[k].w->n_rows, ++k) {
          const TensorView& w = *parts[k].w;
          const int64_t b = std::max(r_begin, off) - off, e = std::min(r_end, off + w.n_rows) - off;
          if (b >= e) continue;
          if (t == DType::Q4_0)
            qmatmul_rows<KindQ4_0>(w, xv, n_tok, parts[k].y, b, e);
          else if (t == DType::Q4_1)
            qmatmul_rows<KindQ4_1>(w, xv, n_tok, parts[k].y, b, e);
          else
            qmatmul_rows<KindQ8_0>(w, xv, n_tok, parts[k].y, b, e);
        }
      },
      row_grain(n_rows, double(n_rows) * n_in * n_tok));
}

}  // namespace kvlm::kernels::avx2
