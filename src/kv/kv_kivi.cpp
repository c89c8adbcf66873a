// The KIVI layout (kv_kivi.h): sealing complete K groups per channel and V rows per token, and
// moving the f16 residual on; PagedKvStore's KIVI writes call these.
#include "kv/kv_kivi.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "base/error.h"
#include "kv/kv_quant.h"
#include "kv/kv_cache.h"
#include "tensor/dtype.h"

namespace kvlm {

// ---- kernels -----------------------------------------------------------------------------------

void kv_kivi_quantize_k_group(const float* x, int64_t group, int64_t kv_dim, uint8_t* out) {
  uint16_t* dm = reinterpret_cast<uint16_t*>(out);  // [kv_dim, 2] f16
  uint8_t* codes = out + 4 * kv_dim;                 // [group, kv_dim / 2]
  std::memset(codes, 0, static_cast<size_t>(group * kv_dim / 2));
  for (int64_t c = 0; c < kv_dim; ++c) {
    float lo = x[c], hi = x[c];
    for (int64_t t = 1; t < group; ++t) {
      lo = std::min(lo, x[t * kv_dim + c]);
      hi = std::max(hi, x[t * kv_dim + c]);
    }
    const uint16_t d16 = fp32_to_fp16((hi - lo) / 15.0f), m16 = fp32_to_fp16(lo);
    dm[2 * c] = d16;
    dm[2 * c + 1] = m16;
    // Codes from the stored (rounded) scale and min, so dequantization sees what was fitted.
    const float d = fp16_to_fp32(d16), m = fp16_to_fp32(m16);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int64_t t = 0; t < group; ++t) {
      const int q = std::clamp(static_cast<int>(std::floor((x[t * kv_dim + c] - m) * id + 0.5f)), 0, 15);
      codes[t * kv_dim / 2 + c / 2] |= static_cast<uint8_t>(c % 2 == 0 ? q : q << 4);
    }
  }
}

void kv_kivi_dequantize_k_row(const uint8_t* grp, int64_t group, int64_t kv_dim, int64_t t,
                              int64_t c0, int64_t n, float* out) {
  (void)group;
  const uint16_t* dm = reinterpret_cast<const uint16_t*>(grp) + 2 * c0;
  const uint8_t* codes = grp + 4 * kv_dim + t * kv_dim / 2 + c0 / 2;
  for (int64_t i = 0; i < n; i += 2) {
    const uint8_t b = codes[i / 2];
    out[i] = fp16_to_fp32(dm[2 * i + 1]) + fp16_to_fp32(dm[2 * i]) * static_cast<float>(b & 15);
    out[i + 1] = fp16_to_fp32(dm[2 * i + 3]) + fp16_to_fp32(dm[2 * i + 2]) * static_cast<float>(b >> 4);
  }
}

// ---- the cache's KIVI layout -------------------------------------------------------------------

void kv_kivi_seal(const KvShape& s, const KiviSealed& out, const uint16_t* rk, const uint16_t* rv,
                  int64_t s0, int64_t s1, int64_t pos, const float* k, const float* v, float* x) {
  const int64_t d = s.kv_dim(), G = s.kivi_group;
  auto gather = [&](const uint16_t* resid, const float* in, int64_t j, float* row) {
    if (j < pos) {
      const uint16_t* r = resid + (j - s0) * d;
      for (int64_t c = 0; c < d; ++c) row[c] = fp16_to_fp32(r[c]);
    } else {
      const float* r = in + (j - pos) * d;
      for (int64_t c = 0; c < d; ++c) row[c] = fp16_to_fp32(fp32_to_fp16(r[c]));
    }
  };
  for (int64_t g0 = s0; g0 < s1; g0 += G) {
    if (!out.held(g0)) continue;
    for (int64_t t = 0; t < G; ++t) gather(rk, k, g0 + t, x + t * d);
    kv_kivi_quantize_k_group(x, G, d, out.k + out.row(g0) * out.k_row_bytes);
    for (int64_t t = 0; t < G; ++t) {
      gather(rv, v, g0 + t, x);
      kv_quantize_row(s.dtype_v, x, out.v + out.row(g0 + t) * out.v_row_bytes, d);
    }
  }
}

void kv_kivi_move_residual(int64_t d, uint16_t* r, int64_t s0, int64_t s1, int64_t pos,
                           int64_t n, const float* in) {
  if (s1 > s0 && s1 < pos) std::memmove(r, r + (s1 - s0) * d, (pos - s1) * d * sizeof(uint16_t));
  for (int64_t j = std::max(s1, pos); j < pos + n; ++j)
    for (int64_t c = 0; c < d; ++c) r[(j - s1) * d + c] = fp32_to_fp16(in[(j - pos) * d + c]);
}

}  // namespace kvlm
