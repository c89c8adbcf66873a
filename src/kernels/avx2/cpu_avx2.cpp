// Compiled without -mavx2: the feature test must run on CPUs that lack AVX2.
#include "kernels/avx2/avx2.h"

#include <cpuid.h>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace kvlm::kernels::avx2 {

namespace {
// CPUID.1:ECX bit 29. Read directly: clang 14 (the fuzz build) has no "f16c" feature string.
bool has_f16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & (1u << 29)) != 0;
}
}  // namespace

bool cpu_supported() {
  // GCC's __builtin_cpu_supports checks CPUID and, for AVX, that the OS saves the YMM state.
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
}

bool vnni_supported() {
  // AVX512VL for vpdpbusd on ymm registers, AVX512BW for the byte operations of the 512-bit pair
  // kernels; __builtin_cpu_supports also checks that the OS saves the AVX-512 state.
  __builtin_cpu_init();
  return cpu_supported() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni");
}

namespace {

// CPUID.(7,0):EDX bits 24 (AMX-TILE) and 25 (AMX-INT8), XCR0 bits 17 and 18 (the OS saves
// TILECFG and TILEDATA), and on Linux the process's permission to use TILEDATA, which a process
// must request (arch_prctl ARCH_REQ_XCOMP_PERM) before its first tile instruction.
bool detect_amx() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return false;
  if ((d & (3u << 24)) != (3u << 24)) return false;
  if (__get_cpuid(1, &a, &b, &c, &d) == 0 || (c & (1u << 27)) == 0) return false;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

}  // namespace

bool amx_supported() {
  static const bool ok = vnni_supported() && detect_amx();  // asks for the grant once
  return ok;
}

}  // namespace kvlm::kernels::avx2
