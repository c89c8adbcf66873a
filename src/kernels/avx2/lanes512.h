// 512-bit lane helpers and the per-block float work shared by the pair kernels (vnni_avx2.cpp)
// and the tile kernels (amx_avx2.cpp), internal to src/kernels/avx2. Include it only from files compiled with
// -mavx512f -mavx512bw -mavx512vl: everything here has internal linkage, so no copy built with
// those flags can be picked by the linker for code that runs on a CPU without them.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace kvlm::kernels::avx2 {
namespace {

// 32 bytes at p (low half) and at q (high half).
inline __m512i join(const void* p, const void* q) {
  return _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_loadu_si256(static_cast<const __m256i*>(p))),
      _mm256_loadu_si256(static_cast<const __m256i*>(q)), 1);
}

// 8 f16 values at p (lanes 0..7) and at q (lanes 8..15), as f32.
inline __m512 join_f16(const uint16_t* p, const uint16_t* q) {
  const __m256i h = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)), 1);
  return _mm512_cvtph_ps(h);
}

// acc + one block's term for 16 rows, in ref's float operations (each rounded once):
// float(sumi) * (dw * d) for Q4_0 and Q8_0 weights, and with the Q4_1 minimum added by
// add_block_min. The pair kernels and the tile kernels call these, so their float work is one
// definition. sumi is exact in float: |sumi| <= 32 x 128 x 127 < 2^24.
inline __m512 add_block(__m512 acc, __m512i sumi, __m512 dw, float d) {
  const __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(d));
  return _mm512_add_ps(acc, _mm512_mul_ps(_mm512_cvtepi32_ps(sumi), scale));
}
// Q4_1: acc + ((dw * d) * float(sumi) + mw * s).
inline __m512 add_block_min(__m512 acc, __m512i sumi, __m512 dw, float d, __m512 mw, float s) {
  const __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(d));
  return _mm512_add_ps(acc, _mm512_add_ps(_mm512_mul_ps(scale, _mm512_cvtepi32_ps(sumi)),
                                          _mm512_mul_ps(mw, _mm512_set1_ps(s))));
}

}  // namespace
}  // namespace kvlm::kernels::avx2
