// AVX-512 VNNI group kernels for the quantized matmul (qgroup.h): qgroup_kernels.h with every
// 4-code dot done by vpdpbusd (u8 x s8, four products summed into each 32-bit lane, exact) on
// 256-bit vectors (AVX512VL), where AVX2 needs maddubs + add (+ madd), and pair kernels that run
// two groups (16 rows) in 512-bit vectors: the low 256 bits hold the first group's 8 row lanes,
// the high 256 bits the second's, and each lane goes through exactly the operations of the
// one-group kernel (same integers, same float operations in the same order). So all of them give
// the same bits as ref and as the AVX2 kernels; a pair halves the dot, unpack and scale
// instructions per row where the CPU executes 512-bit vectors at full width. Compiled with
// -mavx512f -mavx512bw -mavx512vl -mavx512vnni on top of the AVX2 flags; dispatch.cpp uses it only
// when vnni_supported().
// GCC 12's 512-bit intrinsics (inserti64x4, cvtph_ps, cvtepi32_ps) pass _mm512_undefined_*()
// as the masked builtins' unused source, which its -Wmaybe-uninitialized then reports at every
// inlined use; nothing here reads an uninitialised value.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels/avx2/lanes512.h"
#include "kernels/avx2/qgroup.h"
#include "kernels/avx2/kquant_kernels.h"
#include "kernels/avx2/qgroup_kernels.h"

namespace kvlm::kernels::avx2 {

namespace {

struct DotVnni {
  static __m256i q4_add(__m256i acc, __m256i w, __m256i x) { return _mm256_dpbusd_epi32(acc, w, x); }
  static __m256i q4_sum(__m256i acc) { return acc; }
  static __m256i q8_add(__m256i acc, __m256i w, __m256i x) { return _mm256_dpbusd_epi32(acc, w, x); }
};

// As keep() in qgroup_kernels.h, for a 512-bit register.
inline void keep512(__m512i& v) { asm("" : "+v"(v)); }

// 4 activation codes, broadcast to every 32-bit lane.
inline __m512i bcast4_512(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// group_q4 for groups g0 and g1 at once.   out: [T, 16]
template <bool kMin, int T>
void pair_q4(const uint8_t* g0, const uint8_t* g1, const Acts& x, int64_t t0, float* out) {
  using P = std::conditional_t<kMin, PackedQ4_1, PackedQ4_0>;
  const int64_t n_blocks = x.n_blocks;
  // Token t0 + t, block ib at o0 + aw ib + t (one tile of the per-block numbers).
  const int64_t o0 = act_at(x, t0, 0), aw = act_width(x, t0);
  const __m512i m4 = _mm512_set1_epi8(0x0f);
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const P& a = reinterpret_cast<const P*>(g0)[ib];
    const P& b = reinterpret_cast<const P*>(g1)[ib];
    const int8_t* xq[T];
    __m512i s[T];
    for (int t = 0; t < T; ++t) {
      xq[t] = codes(x, t0 + t, ib);
      s[t] = _mm512_setzero_si512();
    }
    for (int v = 0; v < 4; v += 2) {
      const __m512i raw0 = join(a.qs[v], b.qs[v]);
      const __m512i raw1 = join(a.qs[v + 1], b.qs[v + 1]);
      const __m512i lo0 = _mm512_and_si512(raw0, m4);
      const __m512i hi0 = _mm512_and_si512(_mm512_srli_epi16(raw0, 4), m4);
      const __m512i lo1 = _mm512_and_si512(raw1, m4);
      const __m512i hi1 = _mm512_and_si512(_mm512_srli_epi16(raw1, 4), m4);
      for (int t = 0; t < T; ++t) {
        s[t] = _mm512_dpbusd_epi32(s[t], lo0, bcast4_512(xq[t] + 4 * v));
        keep512(s[t]);
        s[t] = _mm512_dpbusd_epi32(s[t], hi0, bcast4_512(xq[t] + 16 + 4 * v));
        keep512(s[t]);
        s[t] = _mm512_dpbusd_epi32(s[t], lo1, bcast4_512(xq[t] + 4 * v + 4));
        keep512(s[t]);
        s[t] = _mm512_dpbusd_epi32(s[t], hi1, bcast4_512(xq[t] + 16 + 4 * v + 4));
        keep512(s[t]);
      }
    }
    const __m512 dw = join_f16(a.d, b.d);
    for (int t = 0; t < T; ++t) {
      const int64_t o = o0 + ib * aw + t;
      if constexpr (kMin) {
        acc[t] = add_block_min(acc[t], s[t], dw, x.d[o], join_f16(a.m, b.m), x.s[o]);
      } else {
        const __m512i sumi = _mm512_sub_epi32(s[t], _mm512_set1_epi32(x.c[o]));
        acc[t] = add_block(acc[t], sumi, dw, x.d[o]);
      }
    }
  }
  for (int t = 0; t < T; ++t) _mm512_store_ps(out + 16 * t, acc[t]);
}

// group_q8 for groups g0 and g1 at once.   out: [T, 16]
template <int T>
void pair_q8(const uint8_t* g0, const uint8_t* g1, const Acts& x, int64_t t0, float* out) {
  const int64_t n_blocks = x.n_blocks;
  // Token t0 + t, block ib at o0 + aw ib + t (one tile of the per-block numbers).
  const int64_t o0 = act_at(x, t0, 0), aw = act_width(x, t0);
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const PackedQ8_0& a = reinterpret_cast<const PackedQ8_0*>(g0)[ib];
    const PackedQ8_0& b = reinterpret_cast<const PackedQ8_0*>(g1)[ib];
    const int8_t* xq[T];
    __m512i s32[T];
    for (int t = 0; t < T; ++t) {
      xq[t] = codes(x, t0 + t, ib);
      s32[t] = _mm512_setzero_si512();
    }
    for (int v = 0; v < 8; ++v) {
      // w + 128 (0 .. 255, unsigned: w ^ 0x80), so vpdpbusd takes it as it is and the codes
      // unchanged; the block's sum is then the exact sum_j w_j c_j plus 128 sum_j c_j, taken
      // off below (x.c). The same integers as group_q8's |w| . sign(c, w), so the same bits,
      // without its two sign operations per weight vector and one per (token, vector).
      const __m512i w = _mm512_xor_si512(join(a.qs[v], b.qs[v]), bias);
      for (int t = 0; t < T; ++t) {
        s32[t] = _mm512_dpbusd_epi32(s32[t], w, bcast4_512(xq[t] + 4 * v));
        keep512(s32[t]);
      }
    }
    const __m512 dw = join_f16(a.d, b.d);
    for (int t = 0; t < T; ++t) {
      const int64_t o = o0 + ib * aw + t;
      const __m512i sumi = _mm512_sub_epi32(s32[t], _mm512_set1_epi32(x.c[o]));
      acc[t] = add_block(acc[t], sumi, dw, x.d[o]);
    }
  }
  for (int t = 0; t < T; ++t) _mm512_store_ps(out + 16 * t, acc[t]);
}

// 256-bit a (lanes 0..7) and b (lanes 8..15).
inline __m512i join(__m256i a, __m256i b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
}

// group_k<P, true, T> (kquant_kernels.h) for groups g0 and g1 at once: every lane through the
// same integer and float operations, in 512-bit vectors.   out: [T, 16]
template <class P, int T>
void pair_k(const uint8_t* g0, const uint8_t* g1, const Acts& x, int64_t t0, float* out) {
  constexpr bool kMins = requires(P p) { p.dmin; };
  const int64_t o0 = act_at(x, t0, 0), aw = act_width(x, t0);
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < x.n_blocks / 8; ++sb) {
    const P& pa = reinterpret_cast<const P*>(g0)[sb];
    const P& pb = reinterpret_cast<const P*>(g1)[sb];
    __m512i is[T], ms[T];
    for (int t = 0; t < T; ++t) is[t] = ms[t] = _mm512_setzero_si512();
    for (int b = 0; b < 8; ++b) {
      const int64_t ib = sb * 8 + b;
      Sub ua, ub;
      unpack(pa.b[b], ua);
      unpack(pb.b[b], ub);
      const __m512i mm = join(ua.sm, ub.sm);  // Q4_K / Q5_K: (m, m) pairs; Q2_K: (m0, m1)
      for_vnni<P>(ua);
      for_vnni<P>(ub);
      __m512i c[8];
      for (int v = 0; v < 8; ++v) c[v] = join(ua.c[v], ub.c[v]);
      const __m512i s0 = join(ua.s0, ub.s0), s1 = join(ua.s1, ub.s1);
      for (int t = 0; t < T; ++t) {
        const int8_t* xq = k_codes(x, t0 + t, ib);
        const int32_t pair = x.c[o0 + ib * aw + t];
        __m512i isum;
        if constexpr (kTwoScales<P>) {  // as sub_isum_vnni
          __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
          for (int v = 0; v < 4; ++v) {
            lo = _mm512_dpbusd_epi32(lo, c[v], bcast4_512(xq + 4 * v));
            hi = _mm512_dpbusd_epi32(hi, c[4 + v], bcast4_512(xq + 16 + 4 * v));
          }
          if constexpr (kCodeOffset<P> != 0) {
            const int32_t plo = static_cast<int16_t>(pair & 0xffff), phi = pair >> 16;
            lo = _mm512_sub_epi32(lo, _mm512_set1_epi32(kCodeOffset<P> * plo));
            hi = _mm512_sub_epi32(hi, _mm512_set1_epi32(kCodeOffset<P> * phi));
          }
          isum = _mm512_add_epi32(_mm512_mullo_epi32(lo, s0), _mm512_mullo_epi32(hi, s1));
        } else {
          __m512i si = _mm512_setzero_si512();
          for (int v = 0; v < 4; ++v) {
            si = _mm512_dpbusd_epi32(si, c[v], bcast4_512(xq + 4 * v));
            si = _mm512_dpbusd_epi32(si, c[4 + v], bcast4_512(xq + 16 + 4 * v));
          }
          if constexpr (std::is_same_v<P, PackedIQ4_XS>) {
            const int32_t sum = static_cast<int16_t>(pair & 0xffff) + (pair >> 16);
            si = _mm512_sub_epi32(si, _mm512_set1_epi32(128 * sum));
          }
          isum = _mm512_mullo_epi32(si, s0);
        }
        is[t] = _mm512_add_epi32(is[t], isum);
        keep512(is[t]);
        if constexpr (kMins)
          ms[t] = _mm512_add_epi32(ms[t], _mm512_madd_epi16(mm, _mm512_set1_epi32(pair)));
      }
    }
    const __m512 d = join_f16(pa.d, pb.d);
    __m512 ndmin = _mm512_setzero_ps();
    if constexpr (kMins) ndmin = _mm512_sub_ps(ndmin, join_f16(pa.dmin, pb.dmin));  // exact
    for (int t = 0; t < T; ++t) {
      const __m512 dx = _mm512_set1_ps(x.d[o0 + sb * 8 * aw + t]);
      acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(d, dx), _mm512_cvtepi32_ps(is[t]), acc[t]);
      if constexpr (kMins)
        acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(ndmin, dx), _mm512_cvtepi32_ps(ms[t]), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm512_store_ps(out + 16 * t, acc[t]);
}

template <class P, size_t... I>
constexpr std::array<PairFn, kGroupToks> make_pair_k(std::index_sequence<I...>) {
  return {&pair_k<P, static_cast<int>(I) + 1>...};
}

// ---- K-type tile kernels: a pair of groups against whole 16-token tiles ------------------------
//
// pair_k's arithmetic (so ref's bits), arranged for a batch: each super-block of the pair is
// decoded once (decode_sb, into 64-byte vectors on the stack) for all the call's tokens, rather
// than once per 4 tokens, and the tokens go by 8 at a time, so the 8 weight vectors of a
// sub-block feed 8 independent vpdpbusd chains (pair_k's 4 chains wait on vpdpbusd's latency).
// The per-sub-block corrections that do not touch the codes go through one vpdpwssd per token
// into a second integer sum `aux` (pair_k: a vpmaddwd and an add, or two subtracts):
//   Q4_K, Q5_K, Q2_K: aux = msum, the mins' sum (ref's msum);
//   Q6_K, Q3_K: aux = sum of (sc0, sc1) . (activation sums of columns 0..15, 16..31), and
//     isum -= kCodeOffset * aux once per super-block (the codes are stored + kCodeOffset);
//   IQ4_XS: aux = sum of (sc, sc) . (those sums), isum -= 128 * aux (values stored + 128).
// Integer sums wrap in 32 bits, and the true isum and msum fit (ref/ref.h): the same integers in
// another order, then pair_k's float operations in its order.

// One sub-block of a pair decoded: 16 rows (g0's in lanes 0..7, g1's in 8..15).
struct alignas(64) DecSub {
  __m512i c[8];    // codes as sub_isum_vnni reads them (u8)
  __m512i s0, s1;  // one scale per lane: columns 0..15, 16..31 (s1 unused with one scale)
  __m512i mm;      // int16 pair per lane for aux (see above)
};

template <class P>
constexpr int kAuxOffset = std::is_same_v<P, PackedIQ4_XS> ? 128 : kCodeOffset<P>;

template <class P>
inline void decode_sb(const P& pa, const P& pb, DecSub* dec) {
  for (int b = 0; b < 8; ++b) {
    Sub ua, ub;
    unpack(pa.b[b], ua);
    unpack(pb.b[b], ub);
    DecSub& o = dec[b];
    // IQ4_XS: (sc, sc), which unpack leaves in s0 before for_vnni; the others: Sub::sm.
    o.mm = std::is_same_v<P, PackedIQ4_XS> ? join(ua.s0, ub.s0) : join(ua.sm, ub.sm);
    for_vnni<P>(ua);
    for_vnni<P>(ub);
    for (int v = 0; v < 8; ++v) o.c[v] = join(ua.c[v], ub.c[v]);
    o.s0 = join(ua.s0, ub.s0);
    o.s1 = join(ua.s1, ub.s1);
  }
}

constexpr int kStepToks = 8;  // tokens per pass over a decoded super-block

// Integer sums of kStepToks tokens over one decoded super-block. q: token 0's codes of the
// super-block's first sub-block (panel layout: sub-block b at + 512 b, token k at + 32 k);
// c: their Acts::c pairs (sub-block b, token k at c[16 b + k]). Each weight vector goes to every
// token in turn, so consecutive vpdpbusd are independent (one chain per token; with two scales
// one per token and half, 4 tokens at a time to stay in 32 registers).
template <class P>
inline void step_sums(const DecSub* dec, const int8_t* q, const int32_t* c, __m512i* is,
                      __m512i* aux) {
  constexpr int kT = kTwoScales<P> ? kStepToks / 2 : kStepToks;  // tokens per chain set
  for (int k = 0; k < kStepToks; ++k) is[k] = aux[k] = _mm512_setzero_si512();
  for (int b = 0; b < 8; ++b) {
    const DecSub& u = dec[b];
    const int8_t* qb = q + 512 * b;
    for (int k0 = 0; k0 < kStepToks; k0 += kT) {
      __m512i lo[kT], hi[kT];
      for (int k = 0; k < kT; ++k) lo[k] = hi[k] = _mm512_setzero_si512();
      for (int v = 0; v < 4; ++v) {
#pragma GCC unroll 8
        for (int k = 0; k < kT; ++k) {
          const int8_t* p = qb + 32 * (k0 + k);
          lo[k] = _mm512_dpbusd_epi32(lo[k], u.c[v], bcast4_512(p + 4 * v));
          if constexpr (kTwoScales<P>)
            hi[k] = _mm512_dpbusd_epi32(hi[k], u.c[4 + v], bcast4_512(p + 16 + 4 * v));
          else
            lo[k] = _mm512_dpbusd_epi32(lo[k], u.c[4 + v], bcast4_512(p + 16 + 4 * v));
          keep512(lo[k]);
        }
      }
      for (int k = 0; k < kT; ++k) {
        __m512i isum = _mm512_mullo_epi32(lo[k], u.s0);
        if constexpr (kTwoScales<P>) isum = _mm512_add_epi32(isum, _mm512_mullo_epi32(hi[k], u.s1));
        is[k0 + k] = _mm512_add_epi32(is[k0 + k], isum);
      }
    }
  }
  // The corrections apart: they need only the pairs and Acts::c.
  for (int b = 0; b < 8; ++b) {
    const __m512i mm = dec[b].mm;
    for (int k = 0; k < kStepToks; ++k)
      aux[k] = _mm512_dpwssd_epi32(aux[k], mm, _mm512_set1_epi32(c[16 * b + k]));
  }
}

// TileFn for K type P (qgroup.h): groups g0, g1 against tokens t0 .. t0 + n_t (whole 16-token
// tiles), the running sums in dst.partial [n_t, 16].
template <class P>
void tile_k(const uint8_t* g0, const uint8_t* g1, const Acts& x, int64_t t0, int64_t n_t,
            const uint8_t* ahead, int n_ahead, const TileDst& dst) {
  constexpr bool kMins = requires(P p) { p.dmin; };
  const int64_t n_sb = x.n_blocks / 8;
  const size_t group_bytes = static_cast<size_t>(n_sb) * sizeof(P);
  float* acc = dst.partial;  // [n_t, 16]
  std::fill(acc, acc + n_t * 16, 0.0f);
  DecSub dec[8];
  for (int64_t sb = 0; sb < n_sb; ++sb) {
    const P& pa = reinterpret_cast<const P*>(g0)[sb];
    const P& pb = reinterpret_cast<const P*>(g1)[sb];
    decode_sb(pa, pb, dec);
    // The next call's groups, a super-block of each per super-block here (into L2; changes no
    // arithmetic).
    for (int k = 0; k < n_ahead; ++k) {
      const uint8_t* p = ahead + k * group_bytes + static_cast<size_t>(sb) * sizeof(P);
      for (size_t off = 0; off < sizeof(P); off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(p + off), _MM_HINT_T1);
    }
    const __m512 d = join_f16(pa.d, pb.d);
    __m512 ndmin = _mm512_setzero_ps();
    if constexpr (kMins) ndmin = _mm512_sub_ps(ndmin, join_f16(pa.dmin, pb.dmin));  // exact
    for (int64_t t = t0; t < t0 + n_t; t += kStepToks) {
      // Token t's codes of block 8 sb in the panel, and its numbers (a whole tile: width 16).
      const int8_t* q = x.panel + (t / kActTile) * kActTile * 32 * x.n_blocks +
                        8 * sb * kActTile * 32 + (t % kActTile) * 32;
      const int64_t o = act_at(x, t, 8 * sb);
      __m512i is[kStepToks], aux[kStepToks];
      step_sums<P>(dec, q, x.c + o, is, aux);
      for (int k = 0; k < kStepToks; ++k) {
        if constexpr (kAuxOffset<P> != 0)
          is[k] = _mm512_sub_epi32(is[k], _mm512_mullo_epi32(aux[k], _mm512_set1_epi32(kAuxOffset<P>)));
        float* a = acc + (t - t0 + k) * 16;
        const __m512 dx = _mm512_set1_ps(x.d[o + k]);
        __m512 r = _mm512_fmadd_ps(_mm512_mul_ps(d, dx), _mm512_cvtepi32_ps(is[k]), _mm512_load_ps(a));
        if constexpr (kMins)
          r = _mm512_fmadd_ps(_mm512_mul_ps(ndmin, dx), _mm512_cvtepi32_ps(aux[k]), r);
        _mm512_store_ps(a, r);
      }
    }
  }
  for (int64_t t = 0; t < n_t; ++t)
    std::copy(acc + 16 * t, acc + 16 * t + dst.n_r, dst.y + t * dst.y_stride);
}

template <size_t... I>
constexpr GroupKernels with_pairs(GroupKernels k, std::index_sequence<I...>) {
  ((k.q4_0x2[I] = &pair_q4<false, static_cast<int>(I) + 1>), ...);
  ((k.q4_1x2[I] = &pair_q4<true, static_cast<int>(I) + 1>), ...);
  ((k.q8_0x2[I] = &pair_q8<static_cast<int>(I) + 1>), ...);
  k.k_groups = &k_group_kernels_vnni;
  k.k_pairs = &k_pair_kernels_vnni;
  k.k_tile = &k_tile_kernel_vnni;
  return k;
}

}  // namespace

const GroupFn* k_group_kernels_vnni(DType t) { return k_groups<true>(t); }

const PairFn* k_pair_kernels_vnni(DType t) {  // the K types (k_index < kKTypes), not Q5_0
  constexpr auto kSeq = std::make_index_sequence<kGroupToks>();
  static constexpr std::array<std::array<PairFn, kGroupToks>, kKTypes> kAll = {
      make_pair_k<PackedQ4_K>(kSeq), make_pair_k<PackedQ5_K>(kSeq), make_pair_k<PackedQ6_K>(kSeq),
      make_pair_k<PackedIQ4_XS>(kSeq), make_pair_k<PackedQ3_K>(kSeq),
      make_pair_k<PackedQ2_K>(kSeq)};
  const int i = k_index(t);
  return i < 0 || i >= kKTypes ? nullptr : kAll[static_cast<size_t>(i)].data();
}

TileFn k_tile_kernel_vnni(DType t) {  // the K types (k_index < kKTypes), not Q5_0
  static constexpr std::array<TileFn, kKTypes> kAll = {
      &tile_k<PackedQ4_K>,   &tile_k<PackedQ5_K>, &tile_k<PackedQ6_K>,
      &tile_k<PackedIQ4_XS>, &tile_k<PackedQ3_K>, &tile_k<PackedQ2_K>};
  const int i = k_index(t);
  return i < 0 || i >= kKTypes ? nullptr : kAll[static_cast<size_t>(i)];
}

const GroupKernels kVnniGroups =
    with_pairs(make_groups<DotVnni>(std::make_index_sequence<kGroupToks>()),
               std::make_index_sequence<kGroupToks>());

// Built here, not from kVnniGroups in amx_avx2.cpp: a copy of another file's global could run
// before that global is initialised.
namespace {
constexpr GroupKernels with_tiles(GroupKernels k) {
  k.q4_0x16 = &tile_q4_0;
  k.q4_1x16 = &tile_q4_1;
  k.q8_0x16 = &tile_q8_0;
  return k;
}
}  // namespace
const GroupKernels kAmxGroups =
    with_tiles(with_pairs(make_groups<DotVnni>(std::make_index_sequence<kGroupToks>()),
                          std::make_index_sequence<kGroupToks>()));

}  // namespace kvlm::kernels::avx2
