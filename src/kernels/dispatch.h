// Kernel-variant choice, exposed for tests (internal to src/kernels).
#pragma once

namespace kvlm::kernels {

// The variant ("avx2-amx", "avx2-vnni", "avx2" or "scalar") for KVLM_KERNELS = env (nullptr when
// unset) on a CPU that does (avx2_ok) or does not run the AVX2 variant, does (vnni_ok) or does not
// run its VNNI kernels, and does (amx_ok) or does not run the AMX tile kernels. Warns on stderr
// about a value it cannot honour. kernels_backend() is this, evaluated once per process.
const char* choose_backend(const char* env, bool avx2_ok, bool vnni_ok, bool amx_ok);

}  // namespace kvlm::kernels
