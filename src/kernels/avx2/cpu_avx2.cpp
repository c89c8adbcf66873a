// Compiled without -mavx2: the feature test must run on CPUs that lack AVX2.
#include "kernels/avx2/avx2.h"

namespace kvlm::kernels::avx2 {

bool cpu_supported() {
  // GCC's __builtin_cpu_supports checks CPUID and, for AVX, that the OS saves the YMM state.
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

bool vnni_supported() {
  // AVX512VL for vpdpbusd on ymm registers, AVX512BW for the byte operations of the 512-bit pair
  // kernels; __builtin_cpu_supports also checks that the OS saves the AVX-512 state.
  __builtin_cpu_init();
  return cpu_supported() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni");
}

}  // namespace kvlm::kernels::avx2
