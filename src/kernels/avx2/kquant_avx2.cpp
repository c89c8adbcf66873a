// The AVX2 group kernels of Q5_0, Q5_1, IQ4_NL and the packed K types (kquant_kernels.h), used
// by the avx2 variant; avx2-vnni and avx2-amx use vnni_avx2.cpp's copy with vpdpbusd.
#include "kernels/avx2/kquant_kernels.h"

namespace kvlm::kernels::avx2 {

const GroupFn* k_group_kernels(DType t) { return k_groups<false>(t); }

TileFn k_tile_kernel(DType t) {  // the K types (k_index < kKTypes), not Q5_0
  static constexpr std::array<TileFn, kKTypes> kAll = {
      &tile_k_avx2<PackedQ4_K>,   &tile_k_avx2<PackedQ5_K>, &tile_k_avx2<PackedQ6_K>,
      &tile_k_avx2<PackedIQ4_XS>, &tile_k_avx2<PackedQ3_K>, &tile_k_avx2<PackedQ2_K>};
  const int i = k_index(t);
  return i < 0 || i >= kKTypes ? nullptr : kAll[static_cast<size_t>(i)];
}

}  // namespace kvlm::kernels::avx2
