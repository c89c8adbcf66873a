// KIVI's per-channel K quantization (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit
// Quantization for KV Cache"), at 4 bits: the scalar reference kernels the cache seals groups
// with and attention reads them with. The cache's KIVI bookkeeping is in kv_cache.h / kv_kivi.cpp.
//
// One sealed K group of G tokens x kv_dim channels (kv_kivi_group_bytes = kv_dim x (4 + G / 2)):
//   dm:    [kv_dim, 2] f16        per channel: scale d, min m   (x ~ m + d x code)
//   codes: [G, kv_dim / 2] bytes  token-major: row t = token t, channel 2i in the low nibble of
//                                  byte i, 2i + 1 in the high one
// Per-channel scales follow K's outlier channels (a few channels are large for every token), which
// per-token blocks (q4_0) must share with the small ones; the codes are token-major so attention
// reads one token's head as contiguous bytes.
#pragma once

#include <cstdint>

namespace kvlm {

// Quantizes x: [group, kv_dim] f32 into one group (layout above): per channel, d = (max - min) / 15
// and m = min, both stored as f16, codes = round((x - m) / d) in [0, 15] using the stored f16 d, m.
// Precondition: kv_dim even.
void kv_kivi_quantize_k_group(const float* x, int64_t group, int64_t kv_dim, uint8_t* out);

// Dequantizes token t, channels [c0, c0 + n), of one group into out: [n] f32.
// Precondition: 0 <= t < group, c0 even, c0 + n <= kv_dim.
void kv_kivi_dequantize_k_row(const uint8_t* grp, int64_t group, int64_t kv_dim, int64_t t,
                              int64_t c0, int64_t n, float* out);

}  // namespace kvlm
