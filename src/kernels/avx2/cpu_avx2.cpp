// Compiled without -mavx2: the feature test must run on CPUs that lack AVX2.
#include "kernels/avx2/avx2.h"

namespace kvlm::kernels::avx2 {

bool cpu_supported() {
  // GCC's __builtin_cpu_supports checks CPUID and, for AVX, that the OS saves the YMM state.
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

}  // namespace kvlm::kernels::avx2
