#include "kv/kv_quant.h"

#include <cmath>
#include <cstring>

#include "kernels/ops.h"

namespace kvlm {

namespace {

constexpr int kQK = 32;  // values per block, q4_0 and q4_1 alike
static_assert(kQK4_0 == kQK && kQK4_1 == kQK);

float f16_round(float v) { return fp16_to_fp32(fp32_to_fp16(v)); }

// Nearest code of v in [lo, hi] (ties away from zero do not matter: the error is equal).
int nearest_code(float v, int lo, int hi) {
  if (!(v > static_cast<float>(lo))) return lo;  // also NaN
  if (v >= static_cast<float>(hi)) return hi;
  return static_cast<int>(std::floor(v + 0.5f));
}

// One candidate encoding of a block: the stored (f16-rounded) scale and min, the codes in
// 0..15, and its squared error against x.
struct Candidate {
  float d = 0, m = 0;  // value = (code - offset) * d + m; q4_0: offset 8, m 0; q4_1: offset 0
  int codes[kQK] = {};
  double err = INFINITY;
};

// Codes nearest to x for the f16-rounded d (and m), and their squared error. offset 8: q4_0
// (value (c - 8) d), offset 0: q4_1 (value c d + m).
void encode(const float* x, float d, float m, int offset, Candidate& c) {
  c.d = d;
  c.m = m;
  c.err = 0;
  const float id = 1.0f / d;
  for (int j = 0; j < kQK; ++j) {
    const int q = nearest_code((x[j] - m) * id + static_cast<float>(offset), 0, 15);
    c.codes[j] = q;
    const double e = double{x[j]} - (static_cast<float>(q - offset) * d + m);
    c.err += e * e;
  }
}

void pack(const Candidate& c, uint8_t* qs) {
  for (int j = 0; j < kQK / 2; ++j)
    qs[j] = static_cast<uint8_t>(c.codes[j] | c.codes[j + kQK / 2] << 4);
}

bool all_finite(const float* x) {
  for (int j = 0; j < kQK; ++j)
    if (!std::isfinite(x[j])) return false;
  return true;
}

// Least-squares refit of a candidate's scale (and q4_1's min) for its codes, rounded to f16 and
// re-encoded: the codes of a grid scale are often good while the scale itself is not optimal.
// Repeated (codes -> scale -> codes, Lloyd's iteration) while it lowers the error, at most 3 times.
void refit(const float* x, int offset, bool with_min, const Candidate& from, Candidate& out) {
  double sc = 0, scc = 0, sx = 0, scx = 0;
  for (int j = 0; j < kQK; ++j) {
    const double q = from.codes[j] - offset;
    sc += q;
    scc += q * q;
    sx += x[j];
    scx += q * x[j];
  }
  double d, m = 0;
  if (with_min) {
    const double det = kQK * scc - sc * sc;  // n var(c) * n: 0 when all codes are equal
    if (det <= 0) return;
    d = (kQK * scx - sc * sx) / det;
    m = (sx - d * sc) / kQK;
  } else {
    if (scc <= 0) return;
    d = scx / scc;
  }
  const float dr = f16_round(static_cast<float>(d));
  const float mr = f16_round(static_cast<float>(m));
  if (dr == 0 || !std::isfinite(dr) || !std::isfinite(mr)) return;
  encode(x, dr, mr, offset, out);
}

// q4_0: value (c - 8) d. GGML maps the element of largest magnitude, max, to code 0 (d = max / -8);
// the grid also tries smaller steps that clip it, and mapping it to code 15 (d = max / 7) instead.
void quant_q4_0_search(const float* x, BlockQ4_0& b) {
  kernels::quantize_row(DType::Q4_0, x, &b, kQK);  // GGML's encoding: the candidate to beat
  float amax = 0, max = 0;
  for (int j = 0; j < kQK; ++j)
    if (std::fabs(x[j]) > amax) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  if (amax == 0 || !all_finite(x)) return;
  const double best_err = kv_block_sq_error(DType::Q4_0, x, &b);
  Candidate best, c;
  // Divisor offsets: positive = a finer step that clips max, negative = a coarser one. A wider or
  // finer grid measured no better on Gaussian blocks (tests/kv/test_kv_quant.cpp prints the gain).
  static constexpr float kSteps[] = {-1.0f, -0.5f, -0.25f, 0.0f, 0.25f, 0.5f,
                                     0.75f, 1.0f,  1.5f,   2.0f, 3.0f};
  for (float div : {-8.0f, 7.0f})
    for (float s : kSteps) {
      const float d = f16_round(max / (div + (div < 0 ? -s : s)));
      if (d == 0 || !std::isfinite(d)) continue;
      encode(x, d, 0, 8, c);
      if (c.err < best.err) best = c;
    }
  for (int it = 0; it < 3; ++it) {
    refit(x, 8, /*with_min=*/false, best, c);
    if (!(c.err < best.err)) break;
    best = c;
  }
  BlockQ4_0 nb;
  nb.d = fp32_to_fp16(best.d);
  pack(best, nb.qs);
  // Judged on what the kernels read back, as GGML's encoding was, so the invariant is exact.
  if (best.err < INFINITY && kv_block_sq_error(DType::Q4_0, x, &nb) < best_err) b = nb;
}

// q4_1: value c d + m. GGML spans [min, max] exactly (d = (max - min) / 15, m = min); the grid also
// shrinks the span from either end by up to 10%, clipping the extremes for a finer step.
void quant_q4_1_search(const float* x, BlockQ4_1& b) {
  kernels::quantize_row(DType::Q4_1, x, &b, kQK);
  float min = x[0], max = x[0];
  for (int j = 1; j < kQK; ++j) {
    min = std::fmin(min, x[j]);
    max = std::fmax(max, x[j]);
  }
  const float range = max - min;
  if (!(range > 0) || !all_finite(x) || !std::isfinite(range)) return;
  const double best_err = kv_block_sq_error(DType::Q4_1, x, &b);
  Candidate best, c;
  static constexpr float kShrink[] = {0.0f, 0.03f, 0.06f, 0.1f};
  for (float a : kShrink)
    for (float z : kShrink) {
      const float lo = min + a * range, hi = max - z * range;
      const float d = f16_round((hi - lo) / 15.0f), m = f16_round(lo);
      if (d == 0 || !std::isfinite(d) || !std::isfinite(m)) continue;
      encode(x, d, m, 0, c);
      if (c.err < best.err) best = c;
    }
  for (int it = 0; it < 3; ++it) {
    refit(x, 0, /*with_min=*/true, best, c);
    if (!(c.err < best.err)) break;
    best = c;
  }
  BlockQ4_1 nb;
  nb.d = fp32_to_fp16(best.d);
  nb.m = fp32_to_fp16(best.m);
  pack(best, nb.qs);
  if (best.err < INFINITY && kv_block_sq_error(DType::Q4_1, x, &nb) < best_err) b = nb;
}

}  // namespace

double kv_block_sq_error(DType t, const float* x, const void* block) {
  float y[kQK];  // [32] the values the kernels read back
  kernels::dequantize_row(t, block, y, kQK);
  double err = 0;
  for (int j = 0; j < kQK; ++j) {
    const double e = double{x[j]} - y[j];
    err += e * e;
  }
  return err;
}

void kv_quantize_row(DType t, const float* src, void* dst, int64_t n) {
  // Precondition (as kernels::quantize_row): n fills whole blocks of t.
  switch (t) {
    case DType::Q4_0: {
      auto* b = static_cast<BlockQ4_0*>(dst);
      for (int64_t i = 0; i < n / kQK; ++i) quant_q4_0_search(src + i * kQK, b[i]);
      return;
    }
    case DType::Q4_1: {
      auto* b = static_cast<BlockQ4_1*>(dst);
      for (int64_t i = 0; i < n / kQK; ++i) quant_q4_1_search(src + i * kQK, b[i]);
      return;
    }
    default:
      kernels::quantize_row(t, src, dst, n);
  }
}

}  // namespace kvlm
