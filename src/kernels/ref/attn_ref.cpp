// Scalar reference of attn_chunk (ops.h): the arithmetic attention had before the kernel existed,
// kept as the ground truth the AVX2 twin is tested against. Compiled with -ffp-contract=off like
// ops_ref.cpp, so every product and sum rounds on its own.
#include <algorithm>
#include <cmath>

#include "kernels/ref/ref.h"

namespace kvlm::kernels::ref {

void attn_chunk(const float* k, const float* v, int64_t n, int64_t hd, const float* q, int64_t n_q,
                float scale, float* m, float* l, float* o, float* work) {
  for (int64_t a = 0; a < n_q; ++a) {
    const float* qa = q + a * hd;  // [hd]
    float* s = work + a * n;       // [n] scores, then weights
    for (int64_t j = 0; j < n; ++j) s[j] = dot_f32(k + j * hd, qa, hd) * scale;
    float mx = s[0];
    for (int64_t j = 1; j < n; ++j) mx = std::max(mx, s[j]);
    float sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - mx);
      sum += s[j];
    }
    m[a] = mx;
    l[a] = sum;
    float* oa = o + a * hd;  // [hd]
    std::fill(oa, oa + hd, 0.0f);
    for (int64_t j = 0; j < n; ++j) {
      const float* vj = v + j * hd;
      for (int64_t d = 0; d < hd; ++d) oa[d] += s[j] * vj[d];
    }
  }
}

// The f16 rows dequantized into tiles after the scores in work, then attn_chunk: the definition
// the AVX2 twin must equal.
void attn_chunk_f16(const uint16_t* const* k_rows, const uint16_t* const* v_rows, int64_t n,
                    int64_t hd, const float* q, int64_t n_q, float scale, float* m, float* l,
                    float* o, float* work) {
  float* kt = work + n_q * n;
  float* vt = kt + n * hd;
  for (int64_t j = 0; j < n; ++j) {
    dequantize_row(DType::F16, k_rows[j], kt + j * hd, hd);
    dequantize_row(DType::F16, v_rows[j], vt + j * hd, hd);
  }
  attn_chunk(kt, vt, n, hd, q, n_q, scale, m, l, o, work);
}

}  // namespace kvlm::kernels::ref
