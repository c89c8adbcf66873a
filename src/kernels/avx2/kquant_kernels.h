// The group kernels of Q5_0, Q5_1, IQ4_NL and the packed K types (Q2_K .. Q6_K, IQ4_XS; layout in
// ../packed.h), the fast twins of ref::dot_k_q8_k and ref's dot_q5_impl / dot_iq4_nl_q8_0_impl
// (ref/ref.h, ref/ops_ref.cpp), bit for bit. Included by kquant_avx2.cpp (AVX2: vpmaddubsw) and
// vnni_avx2.cpp (kVnni: AVX-512 VNNI's vpdpbusd on 256-bit vectors), each compiling its own copy:
// everything here has internal linkage, so no copy built with one file's instruction set can be
// picked by the linker for the other (see ../CMakeLists.txt).
//
// The K types take activation super-blocks (BlockQ8_K: 256 codes, one f32 scale). Per 32-column
// sub-block b of 8 rows (one row per 32-bit lane) and token t: the codes' exact integer dot with
// the activation codes, weighted by the sub-block scales inside the integer sum (vpmaddwd with the
// lane's (scale, scale) int16 pair does the multiply for free; VNNI multiplies the 32-bit sums by
// the scale, vpmulld), added to the super-block's isum; Q4_K / Q5_K add m * (the activation's two
// 16-sums) to msum the same way. Per super-block acc = fma(d * dx, float(isum), acc) (and
// fma(-dmin * dx, float(msum), acc)): ref's operations, each rounded once, in ref's order.
// Bounds on the 16-bit stages (vpmaddubsw pairs, summed before widening): Q4_K codes 0..15,
// pairs <= 3810, 8 summed <= 30480; Q5_K 0..31, pairs <= 7874, 4 summed; Q6_K 0..63, pairs
// <= 16002, 2 summed; Q3_K 0..7 (q + 4), pairs <= 1778, 4 summed; Q2_K 0..3, pairs <= 762, 4
// summed; IQ4_XS |value| <= 127, pairs <= 32258, widened at once. None saturates.
// A super-block's isum stays below 2^28 (ref/ref.h).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels/avx2/qgroup.h"
#include "kernels/avx2/qgroup_kernels.h"
#include "kernels/packed.h"

namespace kvlm::kernels::avx2 {
namespace {  // internal linkage: each including file compiles its own copy

// bcast4 and keep: qgroup_kernels.h

inline __m256i load(const void* p) {
  return _mm256_loadu_si256(static_cast<const __m256i*>(p));
}

inline __m256 halfs(const uint16_t* h) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
}

// A lane's int16 pair (a, b) -> (a, a) and (b, b).
inline __m256i pair_lo(__m256i v) {
  return _mm256_or_si256(_mm256_slli_epi32(v, 16), _mm256_and_si256(v, _mm256_set1_epi32(0xffff)));
}
inline __m256i pair_hi(__m256i v) {
  return _mm256_or_si256(_mm256_srli_epi32(v, 16),
                         _mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// (x >> n) or (x << -n) in 16-bit lanes, then & mask (the masks used keep only bits from x's own
// byte: 0x10 with |n| <= 4, 0x04 with -2 <= n <= 5, 0x03 with n <= 6).
template <int kN>
inline __m256i shift_and(__m256i x, __m256i mask) {
  if constexpr (kN > 0) return _mm256_and_si256(_mm256_srli_epi16(x, kN), mask);
  if constexpr (kN < 0) return _mm256_and_si256(_mm256_slli_epi16(x, -kN), mask);
  return _mm256_and_si256(x, mask);
}

// One sub-block's codes for all 8 rows: c[v] columns 4 v + j, c[4 + v] columns 16 + 4 v + j
// (unsigned codes; IQ4_XS: signed table values), and its scales as int16 pairs per lane.
struct Sub {
  __m256i c[8];
  __m256i s0, s1;  // (scale, scale) of columns 0..15 and 16..31
  __m256i sm;      // Q4_K / Q5_K: (min, min);  Q2_K: (min 0..15, min 16..31);
                   // Q6_K / Q3_K: (scale 0..15, scale 16..31)
};

// The types whose sub-blocks of 32 columns have two scales (one per 16), and the offset their
// codes are stored with (packed.h): Q6_K q + 32, Q3_K q + 4, Q2_K q.
template <class P>
constexpr bool kTwoScales = std::is_same_v<P, PackedQ6_K> || std::is_same_v<P, PackedQ3_K> ||
                            std::is_same_v<P, PackedQ2_K>;
template <class P>
constexpr int kCodeOffset = std::is_same_v<P, PackedQ6_K>   ? 32
                            : std::is_same_v<P, PackedQ3_K> ? 4
                                                            : 0;

template <class P, class S>
inline void nibbles(const S& s, Sub& u) {
  const __m256i m4 = _mm256_set1_epi8(0x0f);
  for (int v = 0; v < 4; ++v) {
    const __m256i raw = load(s.qs[v]);
    u.c[v] = _mm256_and_si256(raw, m4);
    u.c[4 + v] = shift_and<4>(raw, m4);
  }
}

inline void unpack(const PackedQ4_K::Sub& s, Sub& u) {
  nibbles<PackedQ4_K>(s, u);
  const __m256i sm = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s.sm)));
  u.s0 = u.s1 = pair_lo(sm);
  u.sm = pair_hi(sm);
}

// Bit vectors h (packed.h's qh: bit v of a byte for column vector v) onto bit kBit of the codes
// in u: Q5's fifth bits (kBit 4), Q3_K's third (kBit 2). Shifts within a byte: v - kBit in -4..5.
template <int kBit, size_t... V>
inline void or_bits(__m256i h, Sub& u, std::index_sequence<V...>) {
  const __m256i m = _mm256_set1_epi8(1 << kBit);
  ((u.c[V] = _mm256_or_si256(u.c[V], shift_and<static_cast<int>(V) - kBit>(h, m))), ...);
}
inline void fifth_bits(__m256i h, Sub& u) { or_bits<4>(h, u, std::make_index_sequence<8>()); }

inline void unpack(const PackedQ5_K::Sub& s, Sub& u) {
  nibbles<PackedQ5_K>(s, u);
  fifth_bits(load(s.qh), u);
  const __m256i sm = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s.sm)));
  u.s0 = u.s1 = pair_lo(sm);
  u.sm = pair_hi(sm);
}

inline void unpack(const PackedQ6_K::Sub& s, Sub& u) {
  const __m256i m4 = _mm256_set1_epi8(0x0f), b45 = _mm256_set1_epi8(0x30);
  for (int half = 0; half < 2; ++half) {
    const __m256i h = load(s.qh[half]);
    const __m256i hb[4] = {shift_and<-4>(h, b45), shift_and<-2>(h, b45), shift_and<0>(h, b45),
                           shift_and<2>(h, b45)};
    for (int v = 0; v < 4; ++v) {
      const __m256i raw = load(s.qs[v]);
      const __m256i lo = half == 0 ? _mm256_and_si256(raw, m4) : shift_and<4>(raw, m4);
      u.c[4 * half + v] = _mm256_or_si256(lo, hb[v]);
    }
  }
  u.sm = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s.sc)));
  u.s0 = pair_lo(u.sm);
  u.s1 = pair_hi(u.sm);
}

// 2 bits per column (packed.h's qs[u] of Q2_K / Q3_K) into the low bits of u.c.
inline void two_bits(const uint8_t (&qs)[2][32], Sub& u) {
  const __m256i m3 = _mm256_set1_epi8(0x03);
  for (int half = 0; half < 2; ++half) {
    const __m256i raw = load(qs[half]);
    u.c[4 * half + 0] = shift_and<0>(raw, m3);
    u.c[4 * half + 1] = shift_and<2>(raw, m3);
    u.c[4 * half + 2] = shift_and<4>(raw, m3);
    u.c[4 * half + 3] = shift_and<6>(raw, m3);
  }
}

inline void unpack(const PackedQ2_K::Sub& s, Sub& u) {
  two_bits(s.qs, u);
  // Per lane (scale | min << 4 of columns 0..15, of 16..31) as int16: the two nibbles apart.
  const __m256i sm = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s.sm)));
  const __m256i sc = _mm256_and_si256(sm, _mm256_set1_epi16(0x0f));
  u.s0 = pair_lo(sc);
  u.s1 = pair_hi(sc);
  u.sm = _mm256_srli_epi16(sm, 4);
}

inline void unpack(const PackedQ3_K::Sub& s, Sub& u) {
  two_bits(s.qs, u);
  or_bits<2>(load(s.qh), u, std::make_index_sequence<8>());
  u.sm = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s.sc)));
  u.s0 = pair_lo(u.sm);
  u.s1 = pair_hi(u.sm);
}

inline void unpack(const PackedIQ4_XS::Sub& s, Sub& u) {
  nibbles<PackedIQ4_XS>(s, u);
  const __m256i table = _mm256_broadcastsi128_si256(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4nlValues)));
  for (int v = 0; v < 8; ++v) u.c[v] = _mm256_shuffle_epi8(table, u.c[v]);
  int64_t sc8;
  std::memcpy(&sc8, s.sc, 8);
  const __m256i sc = _mm256_cvtepi8_epi32(_mm_cvtsi64_si128(sc8));  // one per lane
  u.s0 = u.s1 = _mm256_or_si256(_mm256_slli_epi32(sc, 16),
                                _mm256_and_si256(sc, _mm256_set1_epi32(0xffff)));
}

inline __m256i mub(__m256i w, const int8_t* p) { return _mm256_maddubs_epi16(w, bcast4(p)); }

// The weighted integer sum isum of one token (codes p: 32 int8, pair: Acts::c) over a sub-block.
// VNNI (kVnni): vpdpbusd sums 4 products straight into 32 bits, and the scales multiply in f32
// instead, after the conversion: every partial is an integer below 2^24 there, so float(sumi) *
// float(sc) and the sum of two such products are exact, the same value as float(isum).
template <bool kVnni>
inline __m256i dp(__m256i acc, __m256i w, const int8_t* p) {
  if constexpr (kVnni) return _mm256_dpbusd_epi32(acc, w, bcast4(p));
  return acc;  // not reached: the AVX2 kernels take the vpmaddubsw path
}

template <bool kVnni>
inline __m256i dp8(const __m256i* c, const int8_t* p) {  // columns 0..15: c[0..4), 16..31: c[4..8)
  __m256i s = _mm256_setzero_si256();
  for (int v = 0; v < 4; ++v) s = dp<kVnni>(s, c[v], p + 4 * v);
  for (int v = 0; v < 4; ++v) s = dp<kVnni>(s, c[4 + v], p + 16 + 4 * v);
  return s;
}

// isum of one token over a sub-block with the VNNI dots (codes p: 32 int8, pair: Acts::c): the
// unweighted 32-bit sums times the scales (vpmulld), the same integer as sub_isum's. u.c holds
// IQ4_XS's values + 128 here (vpdpbusd wants unsigned weights), u.s0 / u.s1 one scale per lane.
template <class P>
inline __m256i sub_isum_vnni(const Sub& u, const int8_t* p, int32_t pair) {
  if constexpr (kTwoScales<P>) {
    __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
    for (int v = 0; v < 4; ++v) {
      lo = dp<true>(lo, u.c[v], p + 4 * v);
      hi = dp<true>(hi, u.c[4 + v], p + 16 + 4 * v);
    }
    if constexpr (kCodeOffset<P> != 0) {  // codes stored + kCodeOffset
      const int32_t plo = static_cast<int16_t>(pair & 0xffff), phi = pair >> 16;
      lo = _mm256_sub_epi32(lo, _mm256_set1_epi32(kCodeOffset<P> * plo));
      hi = _mm256_sub_epi32(hi, _mm256_set1_epi32(kCodeOffset<P> * phi));
    }
    return _mm256_add_epi32(_mm256_mullo_epi32(lo, u.s0), _mm256_mullo_epi32(hi, u.s1));
  } else {
    __m256i s = dp8<true>(u.c, p);
    if constexpr (std::is_same_v<P, PackedIQ4_XS>) {
      const int32_t sum = static_cast<int16_t>(pair & 0xffff) + (pair >> 16);
      s = _mm256_sub_epi32(s, _mm256_set1_epi32(128 * sum));
    }
    return _mm256_mullo_epi32(s, u.s0);
  }
}

template <class P>
inline __m256i sub_isum(const Sub& u, const int8_t* p, int32_t pair) {
  if constexpr (std::is_same_v<P, PackedQ4_K>) {
    __m256i s = mub(u.c[0], p);
    for (int v = 1; v < 4; ++v) s = _mm256_add_epi16(s, mub(u.c[v], p + 4 * v));
    for (int v = 0; v < 4; ++v) s = _mm256_add_epi16(s, mub(u.c[4 + v], p + 16 + 4 * v));
    return _mm256_madd_epi16(s, u.s0);
  } else if constexpr (std::is_same_v<P, PackedQ5_K> || std::is_same_v<P, PackedQ3_K> ||
                       std::is_same_v<P, PackedQ2_K>) {
    __m256i s = mub(u.c[0], p), t = mub(u.c[4], p + 16);
    for (int v = 1; v < 4; ++v) {
      s = _mm256_add_epi16(s, mub(u.c[v], p + 4 * v));
      t = _mm256_add_epi16(t, mub(u.c[4 + v], p + 16 + 4 * v));
    }
    const __m256i acc = _mm256_add_epi32(_mm256_madd_epi16(s, u.s0), _mm256_madd_epi16(t, u.s1));
    if constexpr (!std::is_same_v<P, PackedQ3_K>) return acc;
    // Q3_K's codes are stored + 4: minus 4 (sc0 sum p[0..16) + sc1 sum p[16..32)).
    const __m256i off = _mm256_madd_epi16(u.sm, _mm256_set1_epi32(pair));
    return _mm256_sub_epi32(acc, _mm256_slli_epi32(off, 2));
  } else if constexpr (std::is_same_v<P, PackedQ6_K>) {
    __m256i acc = _mm256_setzero_si256();
    for (int v = 0; v < 8; v += 2) {
      const int8_t* q = p + (v < 4 ? 4 * v : 16 + 4 * (v - 4));
      const __m256i s = _mm256_add_epi16(mub(u.c[v], q), mub(u.c[v + 1], q + 4));
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(s, v < 4 ? u.s0 : u.s1));
    }
    // Codes are stored + 32: minus 32 (sc0 sum p[0..16) + sc1 sum p[16..32)).
    const __m256i off = _mm256_madd_epi16(u.sm, _mm256_set1_epi32(pair));
    return _mm256_sub_epi32(acc, _mm256_slli_epi32(off, 5));
  } else {  // IQ4_XS: |value| against the codes signed by the value
    __m256i acc = _mm256_setzero_si256();
    for (int v = 0; v < 8; ++v) {
      const __m256i w = u.c[v];
      const __m256i x = _mm256_sign_epi8(bcast4(p + (v < 4 ? 4 * v : 16 + 4 * (v - 4))), w);
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), x),
                                                    u.s0));
    }
    return acc;
  }
}

// u as sub_isum_vnni reads it: one scale per lane in s0 / s1, IQ4_XS's values + 128.
template <class P>
inline void for_vnni(Sub& u) {
  u.s0 = _mm256_srai_epi32(_mm256_slli_epi32(u.s0, 16), 16);
  u.s1 = _mm256_srai_epi32(_mm256_slli_epi32(u.s1, 16), 16);
  if constexpr (std::is_same_v<P, PackedIQ4_XS>)
    for (int v = 0; v < 8; ++v) u.c[v] = _mm256_xor_si256(u.c[v], _mm256_set1_epi8(-128));
}

// The 32 activation codes of token t, sub-block ib (of 32 columns) in a row of BlockQ8_K.
inline const int8_t* k_codes(const Acts& x, int64_t t, int64_t ib) {
  return reinterpret_cast<const int8_t*>(x.q + t * x.q_stride + (ib / 8) * x.blk + x.qs_off) +
         32 * (ib % 8);
}

// T tokens from t0 against one packed group of K type P, in ref::dot_k_q8_k's order: per
// super-block isum and msum per token, then d * dx and dmin * dx once.   out: [T, 8]
template <class P, bool kVnni, int T>
void group_k(const uint8_t* g, const Acts& x, int64_t t0, float* out) {
  constexpr bool kMins = requires(P p) { p.dmin; };
  const int64_t n_sb = x.n_blocks / 8;
  const int64_t o0 = act_at(x, t0, 0), aw = act_width(x, t0);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < n_sb; ++sb) {
    const P& p = reinterpret_cast<const P*>(g)[sb];
    __m256i is[T], ms[T];
    for (int t = 0; t < T; ++t) is[t] = ms[t] = _mm256_setzero_si256();
    for (int b = 0; b < 8; ++b) {
      const int64_t ib = sb * 8 + b;
      Sub u;
      unpack(p.b[b], u);
      if constexpr (kVnni) for_vnni<P>(u);
      for (int t = 0; t < T; ++t) {
        const int8_t* xq = k_codes(x, t0 + t, ib);
        const int32_t pair = x.c[o0 + ib * aw + t];
        __m256i isum;
        if constexpr (kVnni)
          isum = sub_isum_vnni<P>(u, xq, pair);
        else
          isum = sub_isum<P>(u, xq, pair);
        is[t] = _mm256_add_epi32(is[t], isum);
        keep(is[t]);
        // (m, m) . (sum of codes 0..15, of 16..31): m times the sub-block's code sum.
        if constexpr (kMins)
          ms[t] = _mm256_add_epi32(ms[t], _mm256_madd_epi16(u.sm, _mm256_set1_epi32(pair)));
      }
    }
    const __m256 d = halfs(p.d);
    __m256 ndmin = _mm256_setzero_ps();
    if constexpr (kMins) ndmin = _mm256_sub_ps(ndmin, halfs(p.dmin));  // -dmin, exact
    for (int t = 0; t < T; ++t) {
      const __m256 dx = _mm256_set1_ps(x.d[o0 + sb * 8 * aw + t]);
      acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(is[t]), acc[t]);
      if constexpr (kMins)
        acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(ndmin, dx), _mm256_cvtepi32_ps(ms[t]), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm256_store_ps(out + 8 * t, acc[t]);
}

// group_k<P, false, T>'s arithmetic (AVX2) for groups g0 and g1 against whole 16-token tiles
// (TileFn, qgroup.h): each super-block of both groups unpacked once for all the call's tokens
// (group_k unpacks it again for every 4), then 4 tokens at a time against one group's 8 rows,
// its sub-blocks read back from the stack. The running sums in dst.partial [n_t, 16] (g0's rows
// in columns 0..7, g1's in 8..15).
template <class P>
void tile_k_avx2(const uint8_t* g0, const uint8_t* g1, const Acts& x, int64_t t0, int64_t n_t,
                 const uint8_t* ahead, int n_ahead, const TileDst& dst) {
  constexpr bool kMins = requires(P p) { p.dmin; };
  constexpr int kT = 4;  // tokens per pass
  const int64_t n_sb = x.n_blocks / 8;
  const size_t group_bytes = static_cast<size_t>(n_sb) * sizeof(P);
  float* acc = dst.partial;
  std::fill(acc, acc + n_t * 16, 0.0f);
  Sub dec[2][8];
  for (int64_t sb = 0; sb < n_sb; ++sb) {
    const P* p[2] = {reinterpret_cast<const P*>(g0) + sb, reinterpret_cast<const P*>(g1) + sb};
    for (int h = 0; h < 2; ++h)
      for (int b = 0; b < 8; ++b) unpack(p[h]->b[b], dec[h][b]);
    // The next call's groups, a super-block of each per super-block here (into L2).
    for (int k = 0; k < n_ahead; ++k) {
      const uint8_t* a = ahead + k * group_bytes + static_cast<size_t>(sb) * sizeof(P);
      for (size_t off = 0; off < sizeof(P); off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(a + off), _MM_HINT_T1);
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 d = halfs(p[h]->d);
      __m256 ndmin = _mm256_setzero_ps();
      if constexpr (kMins) ndmin = _mm256_sub_ps(ndmin, halfs(p[h]->dmin));  // -dmin, exact
      for (int64_t t = t0; t < t0 + n_t; t += kT) {
        // Token t's codes of block 8 sb in the panel (sub-block b at + 512 b, token k at + 32 k),
        // and its numbers (a whole tile: sub-block b, token k at o + 16 b + k).
        const int8_t* q = x.panel + (t / kActTile) * kActTile * 32 * x.n_blocks +
                          8 * sb * kActTile * 32 + (t % kActTile) * 32;
        const int64_t o = act_at(x, t, 8 * sb);
        __m256i is[kT], ms[kT];
        for (int k = 0; k < kT; ++k) is[k] = ms[k] = _mm256_setzero_si256();
        for (int b = 0; b < 8; ++b) {
          for (int k = 0; k < kT; ++k) {
            const int32_t pair = x.c[o + 16 * b + k];
            is[k] = _mm256_add_epi32(is[k], sub_isum<P>(dec[h][b], q + 512 * b + 32 * k, pair));
            keep(is[k]);
            if constexpr (kMins)
              ms[k] = _mm256_add_epi32(ms[k],
                                       _mm256_madd_epi16(dec[h][b].sm, _mm256_set1_epi32(pair)));
          }
        }
        for (int k = 0; k < kT; ++k) {
          float* a = acc + (t - t0 + k) * 16 + 8 * h;
          const __m256 dx = _mm256_set1_ps(x.d[o + k]);
          __m256 r = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(is[k]),
                                     _mm256_load_ps(a));
          if constexpr (kMins)
            r = _mm256_fmadd_ps(_mm256_mul_ps(ndmin, dx), _mm256_cvtepi32_ps(ms[k]), r);
          _mm256_store_ps(a, r);
        }
      }
    }
  }
  for (int64_t t = 0; t < n_t; ++t)
    std::copy(acc + 16 * t, acc + 16 * t + dst.n_r, dst.y + t * dst.y_stride);
}

// One block's codes of the 32-column types with group kernels here: Q5_0 / Q5_1's 5-bit codes
// (0..31), IQ4_NL's table values (-127..113; + 128 for VNNI, which wants unsigned weights).
template <class P, bool kVnni>
inline void unpack32(const P& p, Sub& u) {
  nibbles<P>(p, u);
  if constexpr (std::is_same_v<P, PackedIQ4_NL>) {
    const __m256i table = _mm256_broadcastsi128_si256(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4nlValues)));
    for (int v = 0; v < 8; ++v) {
      u.c[v] = _mm256_shuffle_epi8(table, u.c[v]);
      if constexpr (kVnni) u.c[v] = _mm256_xor_si256(u.c[v], _mm256_set1_epi8(-128));
    }
  } else {
    fifth_bits(load(p.qh), u);
  }
}

// Q5_0, Q5_1 and IQ4_NL (PackedQ5_0, PackedQ5_1, PackedIQ4_NL), per 32-column block, as ref's
// dot_q5_impl / dot_iq4_nl_q8_0_impl: Q5_0 and IQ4_NL float(sumi) * (d * dx), Q5_1
// (d * dx) * float(sumi) + m * s. Q5 codes 0..31: 4 vpmaddubsw pairs (<= 7874 each) per 16-bit
// sum, so each half of the block widens on its own; Q5_0's "- 16" is 16 (sum p[0..16) +
// sum p[16..32)) from Acts::c. IQ4_NL: |value| against the codes signed by the value (pairs
// <= 32258), widened at once; VNNI takes value + 128 and subtracts 128 (sum p) from Acts::c.
template <class P, bool kVnni, int T>
void group_q32(const uint8_t* g, const Acts& x, int64_t t0, float* out) {
  constexpr bool kIq4 = std::is_same_v<P, PackedIQ4_NL>;
  constexpr bool kMin = std::is_same_v<P, PackedQ5_1>;
  const int64_t o0 = act_at(x, t0, 0), aw = act_width(x, t0);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t ib = 0; ib < x.n_blocks; ++ib) {
    const P& p = reinterpret_cast<const P*>(g)[ib];
    Sub u;
    unpack32<P, kVnni>(p, u);
    const __m256 d = halfs(p.d);
    for (int t = 0; t < T; ++t) {
      const int8_t* xq =
          reinterpret_cast<const int8_t*>(x.q + (t0 + t) * x.q_stride + ib * x.blk + x.qs_off);
      const int64_t o = o0 + ib * aw + t;
      __m256i isum;
      if constexpr (kVnni) {
        isum = dp8<true>(u.c, xq);
      } else if constexpr (kIq4) {
        isum = _mm256_setzero_si256();
        for (int v = 0; v < 8; ++v) {
          const __m256i w = u.c[v];
          const __m256i xs = _mm256_sign_epi8(bcast4(xq + (v < 4 ? 4 * v : 16 + 4 * (v - 4))), w);
          isum = _mm256_add_epi32(
              isum, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), xs), ones));
        }
      } else {
        __m256i s = mub(u.c[0], xq), h = mub(u.c[4], xq + 16);
        for (int v = 1; v < 4; ++v) {
          s = _mm256_add_epi16(s, mub(u.c[v], xq + 4 * v));
          h = _mm256_add_epi16(h, mub(u.c[4 + v], xq + 16 + 4 * v));
        }
        isum = _mm256_add_epi32(_mm256_madd_epi16(s, ones), _mm256_madd_epi16(h, ones));
      }
      // The weights' offset times the activations' half sums (Acts::c): Q5_0's codes are its
      // values + 16, VNNI's IQ4_NL codes the values + 128.
      constexpr int kOff = std::is_same_v<P, PackedQ5_0> ? 16 : kIq4 && kVnni ? 128 : 0;
      if constexpr (kOff != 0)
        isum = _mm256_sub_epi32(
            isum, _mm256_madd_epi16(_mm256_set1_epi16(kOff), _mm256_set1_epi32(x.c[o])));
      keep(isum);
      const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(x.d[o]));
      if constexpr (kMin) {
        const __m256 m = halfs(p.m);
        acc[t] = _mm256_add_ps(acc[t], _mm256_add_ps(_mm256_mul_ps(scale, _mm256_cvtepi32_ps(isum)),
                                                     _mm256_mul_ps(m, _mm256_set1_ps(x.s[o]))));
      } else {
        acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(_mm256_cvtepi32_ps(isum), scale));
      }
    }
  }
  for (int t = 0; t < T; ++t) _mm256_store_ps(out + 8 * t, acc[t]);
}

template <class P, bool kVnni, size_t... I>
constexpr std::array<GroupFn, kGroupToks> make_q32(std::index_sequence<I...>) {
  return {&group_q32<P, kVnni, static_cast<int>(I) + 1>...};
}

template <class P, bool kVnni, size_t... I>
constexpr std::array<GroupFn, kGroupToks> make(std::index_sequence<I...>) {
  return {&group_k<P, kVnni, static_cast<int>(I) + 1>...};
}

// Index of t among the types with these kernels (the kKTypes K types, then Q5_0, Q5_1, IQ4_NL);
// -1 for the others.
constexpr int kKTypes = 6;
inline int k_index(DType t) {
  switch (t) {
    case DType::Q4_K:
      return 0;
    case DType::Q5_K:
      return 1;
    case DType::Q6_K:
      return 2;
    case DType::IQ4_XS:
      return 3;
    case DType::Q3_K:
      return 4;
    case DType::Q2_K:
      return 5;
    case DType::Q5_0:
      return 6;
    case DType::Q5_1:
      return 7;
    case DType::IQ4_NL:
      return 8;
    default:
      return -1;
  }
}

// The kernels of type t (null for the others), AVX2's or VNNI's.
template <bool kVnni>
const GroupFn* k_groups(DType t) {
  constexpr auto kSeq = std::make_index_sequence<kGroupToks>();
  static constexpr std::array<std::array<GroupFn, kGroupToks>, kKTypes + 3> kAll = {
      make<PackedQ4_K, kVnni>(kSeq),      make<PackedQ5_K, kVnni>(kSeq),
      make<PackedQ6_K, kVnni>(kSeq),      make<PackedIQ4_XS, kVnni>(kSeq),
      make<PackedQ3_K, kVnni>(kSeq),      make<PackedQ2_K, kVnni>(kSeq),
      make_q32<PackedQ5_0, kVnni>(kSeq),  make_q32<PackedQ5_1, kVnni>(kSeq),
      make_q32<PackedIQ4_NL, kVnni>(kSeq)};
  const int i = k_index(t);
  return i < 0 ? nullptr : kAll[static_cast<size_t>(i)].data();
}

}  // namespace
}  // namespace kvlm::kernels::avx2
