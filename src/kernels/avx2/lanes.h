// Small lane helpers shared by the AVX2 variant's files (internal to src/kernels/avx2). Include it
// only from files compiled with -mavx2 -mfma -mf16c: an out-of-line copy of these inline
// functions must never be linked into code that runs on a CPU without AVX2.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace kvlm::kernels::avx2 {
namespace {

// Fixed fold of 8 lanes: (0+4, 1+5, 2+6, 3+7), then pairs, then the last two.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// f16 -> f32 with F16C: exact for every finite, subnormal and infinite input, like fp16_to_fp32.
inline float half(uint16_t h) {
  return _cvtsh_ss(h);
}

// f32 -> f16 bits with F16C, rounding to nearest even: the same bits as fp32_to_fp16 for every
// input but NaN (F16C keeps the payload's top bits, fp32_to_fp16 gives sign | 0x7e00; for the
// default NaN of an invalid operation, 0xffc00000, both give 0xfe00).
inline uint16_t half_bits(float f) {
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}

// Lane mask with the first k (0..8) lanes set, for masked loads of a row's last partial chunk.
inline __m256i first_lanes(int64_t k) {
  alignas(32) static const int32_t kMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                0,  0,  0,  0,  0,  0,  0,  0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask + 8 - k));
}

}  // namespace
}  // namespace kvlm::kernels::avx2
