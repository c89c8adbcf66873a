// The AVX2 group kernels of Q5_0, Q5_1, IQ4_NL and the packed K types (kquant_kernels.h), used
// by the avx2 variant; avx2-vnni and avx2-amx use vnni_avx2.cpp's copy with vpdpbusd.
#include "kernels/avx2/kquant_kernels.h"

namespace kvlm::kernels::avx2 {

const GroupFn* k_group_kernels(DType t) { return k_groups<false>(t); }

}  // namespace kvlm::kernels::avx2
