// AVX-512 VNNI group kernels for the quantized matmul (qgroup.h): qgroup_kernels.h with every
// 4-code dot done by vpdpbusd (u8 x s8, four products summed into each 32-bit lane, exact) on
// 256-bit vectors (AVX512VL), where AVX2 needs maddubs + add (+ madd). Same integers, same float
// operations in the same order: the same bits as ref and as the AVX2 kernels. Compiled with
// -mavx512vl -mavx512vnni on top of the AVX2 flags; dispatch.cpp uses it only when
// vnni_supported().
#include <immintrin.h>

#include "kernels/avx2/qgroup.h"
#include "kernels/avx2/qgroup_kernels.h"

namespace kvlm::kernels::avx2 {

namespace {

struct DotVnni {
  static __m256i q4_add(__m256i acc, __m256i w, __m256i x) { return _mm256_dpbusd_epi32(acc, w, x); }
  static __m256i q4_sum(__m256i acc) { return acc; }
  static __m256i q8_add(__m256i acc, __m256i w, __m256i x) { return _mm256_dpbusd_epi32(acc, w, x); }
};

}  // namespace

const GroupKernels kVnniGroups = make_groups<DotVnni>(std::make_index_sequence<kGroupToks>());

}  // namespace kvlm::kernels::avx2
