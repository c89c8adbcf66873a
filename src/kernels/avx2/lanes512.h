// 512-bit lane helpers shared by the pair kernels (vnni_avx2.cpp) and the tile kernels
// (amx_avx2.cpp), internal to src/kernels/avx2. Include it only from files compiled with
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

}  // namespace
}  // namespace kvlm::kernels::avx2
