// AVX2 + FMA twins of ref/ops_ref.cpp's element-wise and row-wise ops: rms_norm, layer_norm,
// softmax, swiglu, gelu, add and the RoPE rotation. Compiled with -mavx2 -mfma -mf16c
// -ffp-contract=off (../CMakeLists.txt); dispatch.cpp calls into this file only on CPUs that have
// all three.
//
// Arithmetic (deviations from ref; every element's result depends on its own inputs and, for the
// row ops, on its row and n, never on its place in the array: a row's tail lanes run the same
// vector code under a mask, or, where the scalar expression is the same IEEE operation sequence,
// plain scalar code):
//  * add, rope_rotate: bit-identical to ref (the same IEEE operations; rope_rotate works in double
//    lanes with separate multiplies and adds, exactly as ref's scalar double code).
//  * rms_norm, layer_norm: sums of x^2, x, (x - mean)^2 in double lanes (4 lanes x 2 accumulators,
//    fixed fold; ref sums sequentially), so the f32 scale can differ from ref's by one rounding
//    step when the double sums' last bits straddle an f32 rounding boundary; the per-element
//    products are ref's own, so y differs by at most that.
//  * softmax, swiglu, gelu: exp by exp_ps_full (below: in double, rounded once, so <= 0.5 ulp +
//    2e-14 relative) instead of libm's expf (also ~0.5 ulp, and almost always the same bits);
//    softmax sums in double lanes. gelu uses the identity
//    0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), which needs no tanh and, unlike the tanh form, does
//    not cancel in the negative tail (where 1 + tanh(u) loses all bits of ref's result).
// Bounds: tests/kernels/test_kernels_avx2.cpp.
#include <immintrin.h>

#include <cassert>
#include <cmath>
#include <cstdint>

#include "kernels/avx2/avx2.h"
#include "kernels/avx2/lanes.h"

namespace kvlm::kernels::avx2 {

namespace {

// exp of 4 f32 values (widened to double) in double lanes: x = n ln2 + r with n = nearest(x log2
// e), |r| <= ln2 / 2 (ln2 split in two; the FMAs make r exact to ~1e-17), exp(r) by its Taylor
// polynomial of degree 11 (truncation <= r^12 / 12! e^|r| < 1e-14 relative), times 2^n built in
// the exponent bits (n in [-150, 129] is a normal double). Relative error < 2e-14 before the
// caller rounds to f32.
inline __m256d exp_pd_of_ps(__m128 x) {
  const __m256d xd = _mm256_cvtps_pd(x);
  const __m256d nd = _mm256_round_pd(_mm256_mul_pd(xd, _mm256_set1_pd(1.4426950408889634)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(nd, _mm256_set1_pd(0x1.62e42fefa39efp-1), xd);
  r = _mm256_fnmadd_pd(nd, _mm256_set1_pd(0x1.abc9e3b39803fp-56), r);
  // Horner over 1/k!, k = 11 down to 0.
  __m256d p = _mm256_set1_pd(1.0 / 39916800.0);
  p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 3628800.0));
  p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 362880.0));
  p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 40320.0));
  p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 5040.0));
  p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 720.0));
  p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 120.0));
  p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 24.0));
  p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 6.0));
  p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(0.5));
  p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0));
  p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0));
  const __m256i n = _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(nd));
  const __m256i scale = _mm256_slli_epi64(_mm256_add_epi64(n, _mm256_set1_epi64x(1023)), 52);
  return _mm256_mul_pd(p, _mm256_castsi256_pd(scale));
}

// exp(x) for every f32 x, 8 lanes, computed in double (exp_pd_of_ps) and rounded once to f32:
// the correctly rounded result except where exact exp(x) lies within 2e-14 relative of a rounding
// midpoint (error then <= 0.5 ulp + 2e-14 relative; an exhaustive run over [-104.5, 89] found
// none above 0.50000 ulp). glibc's expf, which ref calls, is within ~0.502 ulp, so the two agree
// bit for bit on 99.992% of the normal results there (tests/kernels/test_kernels_avx2.cpp). The
// single rounding from double also gives +inf past ln(FLT_MAX) = 88.7228 and correctly rounded
// subnormals below -87.34, down to 0. exp(NaN) = NaN, exp(-inf) = 0.
inline __m256 exp_ps_full(__m256 x) {
  // max_ps/min_ps return their second operand when either is NaN: NaN passes through. The clamp
  // keeps n within the double exponent; outside it the f32 result is 0 or +inf anyway.
  x = _mm256_min_ps(_mm256_set1_ps(89.0f), _mm256_max_ps(_mm256_set1_ps(-104.0f), x));
  const __m128 lo = _mm256_cvtpd_ps(exp_pd_of_ps(_mm256_castps256_ps128(x)));
  const __m128 hi = _mm256_cvtpd_ps(exp_pd_of_ps(_mm256_extractf128_ps(x, 1)));
  return _mm256_set_m128(hi, lo);
}

// Fixed fold of 4 double lanes: (0 + 2, 1 + 3), then the two.
inline double hsum_pd(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

// 8 f32 lanes widened to two groups of 4 double lanes (exact).
inline __m256d lo_pd(__m256 v) {
  return _mm256_cvtps_pd(_mm256_castps256_ps128(v));
}
inline __m256d hi_pd(__m256 v) {
  return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
}

// silu(g) * u = g / (1 + exp(-g)) * u, ref's operation order. For g < -88.7, exp(-g) = +inf and
// the quotient a correctly signed 0, as in ref.
inline __m256 swiglu_ps(__m256 g, __m256 u) {
  const __m256 e = exp_ps_full(_mm256_xor_ps(g, _mm256_set1_ps(-0.0f)));
  return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

// gelu(v) = v / (1 + exp(-2 t)), t = sqrt(2/pi) v (1 + 0.044715 v^2) rounded as ref rounds it.
// Large |v|: t = +-inf (v^3 overflows) gives v or a signed 0, as ref's tanh form does.
inline __m256 gelu_ps(__m256 v) {
  const __m256 t =
      _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f), v),
                    _mm256_add_ps(_mm256_set1_ps(1.0f),
                                  _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), v)));
  const __m256 e = exp_ps_full(_mm256_mul_ps(t, _mm256_set1_ps(-2.0f)));
  return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

}  // namespace

void exp_f32_full(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, exp_ps_full(_mm256_loadu_ps(x + i)));
  if (i < n) {
    const __m256i mk = first_lanes(n - i);
    _mm256_maskstore_ps(y + i, mk, exp_ps_full(_mm256_maskload_ps(x + i, mk)));
  }
}

void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
  // Precondition: n > 0. The sum finishes before y (which may be x) is written.
  assert(n > 0);
  // Each f32 square is exact in double, so the FMA rounds only the additions.
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256d lo = lo_pd(v), hi = hi_pd(v);
    acc0 = _mm256_fmadd_pd(lo, lo, acc0);
    acc1 = _mm256_fmadd_pd(hi, hi, acc1);
  }
  double sum_sq = hsum_pd(_mm256_add_pd(acc0, acc1));
  for (int64_t j = i; j < n; ++j) sum_sq += static_cast<double>(x[j]) * x[j];
  const float scale = static_cast<float>(1.0 / std::sqrt(sum_sq / static_cast<double>(n) + eps));
  // (x * scale) * w, ref's (and GGML's) order.
  const __m256 vs = _mm256_set1_ps(scale);
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(
        y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs), _mm256_loadu_ps(w + i)));
  for (; i < n; ++i) y[i] = x[i] * scale * w[i];
}

void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t n, float eps) {
  // Precondition: n > 0. Both passes over x finish before y (which may be x) is written.
  assert(n > 0);
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc0 = _mm256_add_pd(acc0, lo_pd(v));
    acc1 = _mm256_add_pd(acc1, hi_pd(v));
  }
  double sum = hsum_pd(_mm256_add_pd(acc0, acc1));
  for (int64_t j = i; j < n; ++j) sum += x[j];
  const double mean = sum / static_cast<double>(n);
  // Two-pass variance, as ref: no cancellation for large means.
  const __m256d vmean = _mm256_set1_pd(mean);
  acc0 = acc1 = _mm256_setzero_pd();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256d d0 = _mm256_sub_pd(lo_pd(v), vmean), d1 = _mm256_sub_pd(hi_pd(v), vmean);
    acc0 = _mm256_fmadd_pd(d0, d0, acc0);
    acc1 = _mm256_fmadd_pd(d1, d1, acc1);
  }
  double sum_sq = hsum_pd(_mm256_add_pd(acc0, acc1));
  for (int64_t j = i; j < n; ++j) sum_sq += (x[j] - mean) * (x[j] - mean);
  const double scale = 1.0 / std::sqrt(sum_sq / static_cast<double>(n) + eps);
  // f32((x - mean) * scale) * w + b: ref's per-element operations.
  const __m256d vscale = _mm256_set1_pd(scale);
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m128 t0 = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_sub_pd(lo_pd(v), vmean), vscale));
    const __m128 t1 = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_sub_pd(hi_pd(v), vmean), vscale));
    const __m256 t = _mm256_set_m128(t1, t0);
    _mm256_storeu_ps(
        y + i, _mm256_add_ps(_mm256_mul_ps(t, _mm256_loadu_ps(w + i)), _mm256_loadu_ps(b + i)));
  }
  for (; i < n; ++i) y[i] = static_cast<float>((x[i] - mean) * scale) * w[i] + b[i];
}

void softmax(float* x, int64_t n) {
  // Precondition: at least one x[i] is finite or +inf (an all -inf row has no distribution).
  if (n <= 0) return;
  // The max is exact in any order.
  __m256 vmax = _mm256_set1_ps(x[0]);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + i));
  float max = hmax(vmax);
  for (int64_t j = i; j < n; ++j) max = std::fmax(max, x[j]);
  // Every exponent is <= 0, so exp cannot overflow and sum >= 1; summed in double lanes.
  const __m256 vm = _mm256_set1_ps(max);
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = exp_ps_full(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
    _mm256_storeu_ps(x + i, e);
    acc0 = _mm256_add_pd(acc0, lo_pd(e));
    acc1 = _mm256_add_pd(acc1, hi_pd(e));
  }
  const __m256i mk = first_lanes(n - i);  // the last partial chunk (possibly empty)
  if (i < n) {
    const __m256 e = _mm256_and_ps(exp_ps_full(_mm256_sub_ps(_mm256_maskload_ps(x + i, mk), vm)),
                                   _mm256_castsi256_ps(mk));  // unused lanes: 0, not exp(-max)
    _mm256_maskstore_ps(x + i, mk, e);
    acc0 = _mm256_add_pd(acc0, lo_pd(e));
    acc1 = _mm256_add_pd(acc1, hi_pd(e));
  }
  const __m256 inv = _mm256_set1_ps(static_cast<float>(1.0 / hsum_pd(_mm256_add_pd(acc0, acc1))));
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
  if (i < n) _mm256_maskstore_ps(x + i, mk, _mm256_mul_ps(_mm256_maskload_ps(x + i, mk), inv));
}

void swiglu(float* gate, const float* up, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(gate + i, swiglu_ps(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
  if (i < n) {
    const __m256i mk = first_lanes(n - i);
    _mm256_maskstore_ps(
        gate + i, mk, swiglu_ps(_mm256_maskload_ps(gate + i, mk), _mm256_maskload_ps(up + i, mk)));
  }
}

void gelu(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, gelu_ps(_mm256_loadu_ps(x + i)));
  if (i < n) {
    const __m256i mk = first_lanes(n - i);
    _mm256_maskstore_ps(x + i, mk, gelu_ps(_mm256_maskload_ps(x + i, mk)));
  }
}

void add(float* y, const float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)));
  for (; i < n; ++i) y[i] += x[i];
}

void rope_rotate(float* x, int64_t n_head, int64_t head_dim, int64_t n_dims, const double* cs,
                 RopeMode mode) {
  // Preconditions: n_dims even and within the head.
  assert(n_dims % 2 == 0 && n_dims <= head_dim);
  const int64_t half = n_dims / 2;
  const double* cos_t = cs;         // [half]
  const double* sin_t = cs + half;  // [half]
  // Lanes 0, 2, 4, 6 (the pairs' first elements) to the low half, 1, 3, 5, 7 to the high half.
  const __m256i deinterleave = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int64_t h = 0; h < n_head; ++h) {
    float* xh = x + h * head_dim;  // [head_dim]
    int64_t i = 0;
    // 4 pairs per step: a' = a cos - b sin, b' = a sin + b cos in double, rounded once to f32.
    for (; i + 4 <= half; i += 4) {
      __m256d a, b;
      if (mode == RopeMode::Normal) {
        const __m256 p = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xh + 2 * i), deinterleave);
        a = lo_pd(p);
        b = hi_pd(p);
      } else {
        a = _mm256_cvtps_pd(_mm_loadu_ps(xh + i));
        b = _mm256_cvtps_pd(_mm_loadu_ps(xh + half + i));
      }
      const __m256d c = _mm256_loadu_pd(cos_t + i), s = _mm256_loadu_pd(sin_t + i);
      const __m128 r0 = _mm256_cvtpd_ps(_mm256_sub_pd(_mm256_mul_pd(a, c), _mm256_mul_pd(b, s)));
      const __m128 r1 = _mm256_cvtpd_ps(_mm256_add_pd(_mm256_mul_pd(a, s), _mm256_mul_pd(b, c)));
      if (mode == RopeMode::Normal) {
        _mm_storeu_ps(xh + 2 * i, _mm_unpacklo_ps(r0, r1));
        _mm_storeu_ps(xh + 2 * i + 4, _mm_unpackhi_ps(r0, r1));
      } else {
        _mm_storeu_ps(xh + i, r0);
        _mm_storeu_ps(xh + half + i, r1);
      }
    }
    for (; i < half; ++i) {
      const int64_t i0 = mode == RopeMode::Normal ? 2 * i : i;
      const int64_t i1 = mode == RopeMode::Normal ? 2 * i + 1 : i + half;
      const double a = xh[i0];
      const double b = xh[i1];
      xh[i0] = static_cast<float>(a * cos_t[i] - b * sin_t[i]);
      xh[i1] = static_cast<float>(a * sin_t[i] + b * cos_t[i]);
    }
  }
}

}  // namespace kvlm::kernels::avx2
