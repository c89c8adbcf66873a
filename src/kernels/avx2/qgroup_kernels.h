// The group kernels of the quantized matmul (qgroup.h), written once over a Dot policy that says
// how 4-code dot products accumulate into a row's 32-bit lane: AVX2's maddubs chains
// (ops_avx2.cpp) or AVX-512 VNNI's vpdpbusd (vnni_avx2.cpp). Included only by those two files,
// each compiling its own copy: everything here has internal linkage (anonymous namespace), so no
// copy built with one file's instruction set can be picked by the linker for the other.
//
// Arithmetic, per (row, token), block by block in order, exactly ref's (ref/ops_ref.cpp):
//   sumi = the block's exact integer dot (weight integers x activation codes);
//   Q4_0 / Q8_0: acc += float(sumi) * (d_w * d_x);
//   Q4_1:        acc += (d_w * d_x) * float(sumi) + m * s          (each operation rounded once)
// so every element equals ref::matmul's bit for bit, whatever T, the group or the thread.
#pragma once

#include <immintrin.h>

#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels/avx2/qgroup.h"
#include "kernels/packed.h"

namespace kvlm::kernels::avx2 {
namespace {

inline const int8_t* codes(const Acts& x, int64_t t, int64_t ib) {
  return reinterpret_cast<const int8_t*>(x.q + t * x.q_stride + ib * x.blk + x.qs_off);
}

// An empty asm that claims to change v: the compiler must hold v in a register here and cannot
// merge the adds before it with those after (no instruction is emitted).
inline void keep(__m256i& v) { asm("" : "+x"(v)); }

// 4 activation codes, broadcast to every 32-bit lane.
inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Q4 (nibbles 0..15 in lane k = row k, 4 columns per lane): Dot::q4_add(acc, nibbles, codes)
// accumulates and Dot::q4_sum(acc) gives the 8 rows' integer sums; Q4_0 then subtracts
// 8 * sum(codes) for the nibbles' + 8.
template <class Dot, bool kMin, int T>
void group_q4(const uint8_t* g, const Acts& x, int64_t t0, float* out) {
  using P = std::conditional_t<kMin, PackedQ4_1, PackedQ4_0>;
  const int64_t n_blocks = x.n_blocks;
  // Token t0 + t, block ib at o0 + aw ib + t (one tile of the per-block numbers).
  const int64_t o0 = act_at(x, t0, 0), aw = act_width(x, t0);
  const __m256i m4 = _mm256_set1_epi8(0x0f);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const P& b = reinterpret_cast<const P*>(g)[ib];
    const int8_t* xq[T];
    __m256i s[T];
    for (int t = 0; t < T; ++t) {
      xq[t] = codes(x, t0 + t, ib);
      s[t] = _mm256_setzero_si256();
    }
    // Two of the four code vectors at a time, each unpacked once for all T tokens. The barrier
    // keeps each token's sum one running register: left alone, GCC regroups the (associative)
    // integer adds of all T tokens into trees whose 8 T live products spill to the stack.
    for (int v = 0; v < 4; v += 2) {
      const __m256i raw0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs[v]));
      const __m256i raw1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs[v + 1]));
      const __m256i lo0 = _mm256_and_si256(raw0, m4);                        // columns 4v ..
      const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(raw0, 4), m4);  // columns 16 + 4v ..
      const __m256i lo1 = _mm256_and_si256(raw1, m4);
      const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(raw1, 4), m4);
      for (int t = 0; t < T; ++t) {
        s[t] = Dot::q4_add(s[t], lo0, bcast4(xq[t] + 4 * v));
        keep(s[t]);
        s[t] = Dot::q4_add(s[t], hi0, bcast4(xq[t] + 16 + 4 * v));
        keep(s[t]);
        s[t] = Dot::q4_add(s[t], lo1, bcast4(xq[t] + 4 * v + 4));
        keep(s[t]);
        s[t] = Dot::q4_add(s[t], hi1, bcast4(xq[t] + 16 + 4 * v + 4));
        keep(s[t]);
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b.d)));
    for (int t = 0; t < T; ++t) {
      const int64_t o = o0 + ib * aw + t;
      __m256i s32 = Dot::q4_sum(s[t]);
      if constexpr (!kMin) s32 = _mm256_sub_epi32(s32, _mm256_set1_epi32(x.c[o]));
      const __m256 f = _mm256_cvtepi32_ps(s32);  // exact: |sumi| <= 32 * 15 * 127
      const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(x.d[o]));
      if constexpr (kMin) {
        const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b.m)));
        acc[t] = _mm256_add_ps(acc[t], _mm256_add_ps(_mm256_mul_ps(scale, f),
                                                     _mm256_mul_ps(mw, _mm256_set1_ps(x.s[o]))));
      } else {
        acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(f, scale));
      }
    }
  }
  for (int t = 0; t < T; ++t) _mm256_store_ps(out + 8 * t, acc[t]);
}

// Q8_0: |w| (unsigned; a code of -128 in a file becomes 128, still exact) against the codes signed
// by w; Dot::q8_add(acc, |w|, signed codes) accumulates 32-bit sums.
template <class Dot, int T>
void group_q8(const uint8_t* g, const Acts& x, int64_t t0, float* out) {
  const int64_t n_blocks = x.n_blocks;
  // Token t0 + t, block ib at o0 + aw ib + t (one tile of the per-block numbers).
  const int64_t o0 = act_at(x, t0, 0), aw = act_width(x, t0);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const PackedQ8_0& b = reinterpret_cast<const PackedQ8_0*>(g)[ib];
    const int8_t* xq[T];
    __m256i s32[T];
    for (int t = 0; t < T; ++t) {
      xq[t] = codes(x, t0 + t, ib);
      s32[t] = _mm256_setzero_si256();
    }
    for (int v = 0; v < 8; ++v) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs[v]));
      const __m256i a = _mm256_sign_epi8(w, w);
      for (int t = 0; t < T; ++t) {
        s32[t] = Dot::q8_add(s32[t], a, _mm256_sign_epi8(bcast4(xq[t] + 4 * v), w));
        keep(s32[t]);  // as in group_q4: one running register per token, no spilled trees
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b.d)));
    for (int t = 0; t < T; ++t) {
      const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(x.d[o0 + ib * aw + t]));
      acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(_mm256_cvtepi32_ps(s32[t]), scale));
    }
  }
  for (int t = 0; t < T; ++t) _mm256_store_ps(out + 8 * t, acc[t]);
}

template <class Dot, size_t... I>
constexpr GroupKernels make_groups(std::index_sequence<I...>) {
  return {{&group_q4<Dot, false, static_cast<int>(I) + 1>...},
          {&group_q4<Dot, true, static_cast<int>(I) + 1>...},
          {&group_q8<Dot, static_cast<int>(I) + 1>...}};
}

}  // namespace
}  // namespace kvlm::kernels::avx2
