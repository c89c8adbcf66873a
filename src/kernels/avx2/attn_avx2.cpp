// AVX2 + FMA twin of ref/attn_ref.cpp's attn_chunk, and the vector exp it needs. Compiled with
// -mavx2 -mfma -ffp-contract=off (../CMakeLists.txt); called only when avx2::cpu_supported().
//
// Arithmetic (deviations from ref, all fixed by n and hd alone, never by the caller's batch):
//  * scores: with hd % 8 == 0, positions in whole groups of 8 (from the chunk's start) take
//    scores8 (one 8-lane FMA accumulator per position, hadd-tree fold), the rest dot_hd (8 lanes x
//    2 accumulators, folded (acc0 + acc1) then a lane tree); times scale. Which path a position
//    takes depends only on n, which depends only on the query's position: a query gets the same
//    numbers in prefill and decode. Ref sums 16 lanes without FMA: they differ by rounding.
//  * exp: exp_f32 (Cephes expf, <= 2 ulp) instead of libm's correctly rounded-ish expf.
//  * l: 8 lanes over j, folded at the end (ref: one running sum in j order).
//  * o: one FMA per (j, d) in j order, as ref's multiply-then-add but with one rounding.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/avx2/avx2.h"
#include "kernels/avx2/lanes.h"

namespace kvlm::kernels::avx2 {

namespace {

// Cephes expf: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-5 polynomial, times 2^n
// built in the exponent bits. Inputs below -87.3 (where 2^n would underflow the exponent) give 0.
inline __m256 exp_ps(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.3762626647949f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  // r = x - n ln2, with ln2 split in two so the product is exact.
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, z, x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(underflow, y);
}

// How far ahead (positions) the f16-row path asks for rows.
constexpr int64_t kPrefetchRows = 16;

// How the kernel reads position j's row: from an f32 tile, or straight from f16 rows (the
// cache's own bytes, one pointer per position). f16 -> f32 is exact, so both give the same values
// and the same arithmetic follows: attn_chunk_f16 equals attn_chunk over the dequantized rows bit
// for bit.
struct TileRows {
  const float* base;  // [n, hd]
  int64_t hd;
  __m256 load(int64_t j, int64_t d) const { return _mm256_loadu_ps(base + j * hd + d); }
  __m256 maskload(int64_t j, int64_t d, __m256i mk) const {
    return _mm256_maskload_ps(base + j * hd + d, mk);
  }
  float at(int64_t j, int64_t d) const { return base[j * hd + d]; }
  void prefetch(int64_t, int64_t) const {}  // a tile is in cache already
  void prefetch_l2(int64_t, int64_t) const {}
};
struct F16Rows {  // hd % 8 == 0 (no partial chunks)
  const uint16_t* const* rows;  // [n] pointers to hd f16 values
  __m256 load(int64_t j, int64_t d) const {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[j] + d)));
  }
  __m256 maskload(int64_t, int64_t, __m256i) const { return _mm256_setzero_ps(); }  // unused
  float at(int64_t, int64_t) const { return 0; }                                    // unused
  // Rows are scattered (one pointer each, paged blocks): ask for row j's first hd values early,
  // every 64-byte line of them. Changes no arithmetic.
  void prefetch(int64_t j, int64_t hd) const {
    const char* p = reinterpret_cast<const char*>(rows[j]);
    for (int64_t b = 0; b < hd * 2; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
  }
  // The same into L2 only: V rows asked for during the score pass, a whole pass before the
  // weighted sums read them (a chunk's K and V together overflow a 32 KiB L1).
  void prefetch_l2(int64_t j, int64_t hd) const {
    const char* p = reinterpret_cast<const char*>(rows[j]);
    for (int64_t b = 0; b < hd * 2; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
  }
};

// dot(row j, b) over hd values: 8 lanes x 2 accumulators, masked last chunk.
template <class Rows>
inline float dot_hd(const Rows& a, int64_t j, const float* b, int64_t hd) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= hd; d += 16) {
    acc0 = _mm256_fmadd_ps(a.load(j, d), _mm256_loadu_ps(b + d), acc0);
    acc1 = _mm256_fmadd_ps(a.load(j, d + 8), _mm256_loadu_ps(b + d + 8), acc1);
  }
  if (d + 8 <= hd) {
    acc0 = _mm256_fmadd_ps(a.load(j, d), _mm256_loadu_ps(b + d), acc0);
    d += 8;
  }
  if (d < hd) {
    const __m256i mk = first_lanes(hd - d);
    acc1 = _mm256_fmadd_ps(a.maskload(j, d, mk), _mm256_maskload_ps(b + d, mk), acc1);
  }
  return hsum(_mm256_add_ps(acc0, acc1));
}

// s[j] = scale * dot(q, k[j]) for 8 positions j0.. at once, hd % 8 == 0: one accumulator per
// position (8 lanes over the head's dims, FMA in dim order), then a transposing reduction (hadd
// tree) that leaves the 8 sums in one vector, where a per-position fold would cost a shuffle
// chain each. The lanes of each accumulator are folded in a fixed order that depends on nothing
// but hd.
template <class Rows>
inline void scores8(const Rows& k, int64_t j0, const float* q, int64_t hd, float scale, float* s) {
  __m256 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t d = 0; d < hd; d += 8) {
    const __m256 qd = _mm256_loadu_ps(q + d);
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(k.load(j0 + r, d), qd, acc[r]);
  }
  // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]
  const __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]), h23 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]), h67 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
  // h0123 = [p0 p1 p2 p3 | p0' p1' p2' p3'] (low and high 128-bit halves of each position's sum)
  const __m256 lo = _mm256_permute2f128_ps(h0123, h4567, 0x20);
  const __m256 hi = _mm256_permute2f128_ps(h0123, h4567, 0x31);
  _mm256_storeu_ps(s, _mm256_mul_ps(_mm256_add_ps(lo, hi), _mm256_set1_ps(scale)));
}

// o[d0 .. d0 + 8 NV) = sum_j w[j] v[j, d0 ..], accumulators held in registers.
template <int NV, class Rows>
void weighted_sum(const float* w, const Rows& v, int64_t n, int64_t d0, float* o) {
  __m256 acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    if (d0 == 0 && j + kPrefetchRows < n) v.prefetch(j + kPrefetchRows, 8 * NV);
    const __m256 wj = _mm256_broadcast_ss(w + j);
    for (int i = 0; i < NV; ++i) acc[i] = _mm256_fmadd_ps(wj, v.load(j, d0 + 8 * i), acc[i]);
  }
  for (int i = 0; i < NV; ++i) _mm256_storeu_ps(o + d0 + 8 * i, acc[i]);
}

// Softmax of one query's scores s[n] in place: m = max, s[j] = exp(s[j] - m), l = sum of them
// (8 lanes over j, folded at the end; the masked tail's dead lanes read as -inf / add 0).
inline void softmax_partial(float* s, int64_t n, float* m, float* l) {
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
  float mx = hmax(vmax);
  for (; j < n; ++j) mx = std::max(mx, s[j]);
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
    _mm256_storeu_ps(s + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  if (j < n) {
    const __m256i mk = first_lanes(n - j);
    const __m256 e = _mm256_and_ps(
        exp_ps(_mm256_sub_ps(_mm256_maskload_ps(s + j, mk), vm)), _mm256_castsi256_ps(mk));
    _mm256_maskstore_ps(s + j, mk, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  *m = mx;
  *l = hsum(vsum);
}

// One query at a time: scores8 / dot_hd, softmax, weighted_sum over all of hd.
template <class Rows>
void attn_one(const Rows& k, const Rows& v, int64_t n, int64_t hd, const float* qa, float scale,
              float* m, float* l, float* oa, float* s, bool prefetch_k) {
  int64_t j8 = 0;
  if (hd % 8 == 0)
    for (; j8 + 8 <= n; j8 += 8) {
      if (prefetch_k)
        for (int64_t r = j8 + kPrefetchRows; r < std::min(n, j8 + kPrefetchRows + 8); ++r)
          k.prefetch(r, hd);
      scores8(k, j8, qa, hd, scale, s + j8);
    }
  for (int64_t j = j8; j < n; ++j) s[j] = dot_hd(k, j, qa, hd) * scale;
  softmax_partial(s, n, m, l);
  int64_t d0 = 0;
  for (; d0 + 64 <= hd; d0 += 64) weighted_sum<8>(s, v, n, d0, oa);
  switch ((hd - d0) / 8) {
    case 7: weighted_sum<7>(s, v, n, d0, oa); break;
    case 6: weighted_sum<6>(s, v, n, d0, oa); break;
    case 5: weighted_sum<5>(s, v, n, d0, oa); break;
    case 4: weighted_sum<4>(s, v, n, d0, oa); break;
    case 3: weighted_sum<3>(s, v, n, d0, oa); break;
    case 2: weighted_sum<2>(s, v, n, d0, oa); break;
    case 1: weighted_sum<1>(s, v, n, d0, oa); break;
    default: break;
  }
  d0 += (hd - d0) / 8 * 8;
  for (int64_t d = d0; d < hd; ++d) {  // hd % 8 leftover dims, scalar FMA in j order
    float acc = 0;
    for (int64_t jj = 0; jj < n; ++jj) acc = std::fma(s[jj], v.at(jj, d), acc);
    oa[d] = acc;
  }
}

// s_a[j0 .. j0 + 4) = scale * dot(q_a, k[j]) for G queries at once, hd % 8 == 0: each row's 8
// values are loaded (and converted, for f16 rows) once for all G queries. Per (query, position)
// the arithmetic is scores8's exactly: one 8-lane accumulator, FMA in dim order, and the same
// fold ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) (a hadd tree over 4 positions gives
// each position the tree scores8 gives it over 8), then times scale.
template <int G, class Rows>
inline void scores4_group(const Rows& k, int64_t j0, const float* q, int64_t hd, float scale,
                          float* s, int64_t n) {
  __m256 acc[G][4];
  for (int a = 0; a < G; ++a)
    for (int r = 0; r < 4; ++r) acc[a][r] = _mm256_setzero_ps();
  for (int64_t d = 0; d < hd; d += 8)
    for (int r = 0; r < 4; ++r) {
      const __m256 kr = k.load(j0 + r, d);
      for (int a = 0; a < G; ++a)
        acc[a][r] = _mm256_fmadd_ps(kr, _mm256_loadu_ps(q + a * hd + d), acc[a][r]);
    }
  for (int a = 0; a < G; ++a) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[a][0], acc[a][1]),
                                    _mm256_hadd_ps(acc[a][2], acc[a][3]));
    // h = [lo(p0) lo(p1) lo(p2) lo(p3) | hi(p0) hi(p1) hi(p2) hi(p3)]
    const __m128 sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(s + a * n + j0, _mm_mul_ps(sum, _mm_set1_ps(scale)));
  }
}

// o_a[d0 .. d0 + 8 NV) = sum_j w_a[j] v[j, d0 ..] for G queries at once (w_a = w + a * n, o_a =
// o + a * hd): each row's values are loaded (and converted) once for all G queries; per output
// the arithmetic is weighted_sum's (one FMA per position, in j order).
template <int G, int NV, class Rows>
void weighted_sum_group(const float* w, const Rows& v, int64_t n, int64_t hd, int64_t d0,
                        float* o) {
  __m256 acc[G][NV];
  for (int a = 0; a < G; ++a)
    for (int i = 0; i < NV; ++i) acc[a][i] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    if (d0 == 0 && j + kPrefetchRows < n) v.prefetch(j + kPrefetchRows, hd);
    __m256 wj[G];
    for (int a = 0; a < G; ++a) wj[a] = _mm256_broadcast_ss(w + a * n + j);
    for (int i = 0; i < NV; ++i) {
      const __m256 vv = v.load(j, d0 + 8 * i);
      for (int a = 0; a < G; ++a) acc[a][i] = _mm256_fmadd_ps(wj[a], vv, acc[a][i]);
    }
  }
  for (int a = 0; a < G; ++a)
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(o + a * hd + d0 + 8 * i, acc[a][i]);
}

// G queries (q: [G, hd], s: [G, n] at stride n, o: [G, hd]) over the same rows, hd % 8 == 0.
// Each query's numbers equal attn_one's bit for bit; what is shared is the loads and f16
// conversions of the rows, which otherwise cost as much as the FMAs (a 256-bit vcvtph2ps issues
// on the FMA pipes of some cores, e.g. Zen 4).
template <int G, class Rows>
void attn_group(const Rows& k, const Rows& v, int64_t n, int64_t hd, const float* q, float scale,
                float* m, float* l, float* o, float* s) {
  const int64_t n8 = n / 8 * 8;  // scores8's positions: whole groups of 8 from the start
  for (int64_t j0 = 0; j0 < n8; j0 += 4) {
    for (int64_t r = j0 + kPrefetchRows; r < std::min(n, j0 + kPrefetchRows + 4); ++r) {
      k.prefetch(r, hd);
      v.prefetch_l2(r, hd);
    }
    scores4_group<G>(k, j0, q, hd, scale, s, n);
  }
  for (int a = 0; a < G; ++a) {
    for (int64_t j = n8; j < n; ++j) s[a * n + j] = dot_hd(k, j, q + a * hd, hd) * scale;
    softmax_partial(s + a * n, n, m + a, l + a);
  }
  int64_t d0 = 0;
  for (; d0 + 32 <= hd; d0 += 32) weighted_sum_group<G, 4>(s, v, n, hd, d0, o);
  switch ((hd - d0) / 8) {
    case 3: weighted_sum_group<G, 3>(s, v, n, hd, d0, o); break;
    case 2: weighted_sum_group<G, 2>(s, v, n, hd, d0, o); break;
    case 1: weighted_sum_group<G, 1>(s, v, n, hd, d0, o); break;
    default: break;
  }
}

// Queries in groups of 3 (a GQA group of SmolLM2; 3 + 3 + 2 for 8), a last single one alone.
template <class Rows>
void attn_chunk_impl(const Rows& k, const Rows& v, int64_t n, int64_t hd, const float* q,
                     int64_t n_q, float scale, float* m, float* l, float* o, float* work) {
  int64_t a = 0;
  if (hd % 8 == 0)
    for (; n_q - a >= 2; a += std::min<int64_t>(3, n_q - a)) {
      if (n_q - a >= 3)
        attn_group<3>(k, v, n, hd, q + a * hd, scale, m + a, l + a, o + a * hd, work + a * n);
      else
        attn_group<2>(k, v, n, hd, q + a * hd, scale, m + a, l + a, o + a * hd, work + a * n);
    }
  for (; a < n_q; ++a)
    attn_one(k, v, n, hd, q + a * hd, scale, m + a, l + a, o + a * hd, work + a * n, a == 0);
}

}  // namespace

void exp_f32(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, exp_ps(_mm256_loadu_ps(x + i)));
  if (i < n) {
    const __m256i mk = first_lanes(n - i);
    _mm256_maskstore_ps(y + i, mk, exp_ps(_mm256_maskload_ps(x + i, mk)));
  }
}

void attn_chunk(const float* k, const float* v, int64_t n, int64_t hd, const float* q, int64_t n_q,
                float scale, float* m, float* l, float* o, float* work) {
  attn_chunk_impl(TileRows{k, hd}, TileRows{v, hd}, n, hd, q, n_q, scale, m, l, o, work);
}

void attn_chunk_f16(const uint16_t* const* k_rows, const uint16_t* const* v_rows, int64_t n,
                    int64_t hd, const float* q, int64_t n_q, float scale, float* m, float* l,
                    float* o, float* work) {
  if (hd % 8 != 0) {  // partial chunks: through f32 tiles (the same values, so the same result)
    float* kt = work + n_q * n;
    float* vt = kt + n * hd;
    for (int64_t j = 0; j < n; ++j) {
      dequantize_row(DType::F16, k_rows[j], kt + j * hd, hd);
      dequantize_row(DType::F16, v_rows[j], vt + j * hd, hd);
    }
    return attn_chunk(kt, vt, n, hd, q, n_q, scale, m, l, o, work);
  }
  attn_chunk_impl(F16Rows{k_rows}, F16Rows{v_rows}, n, hd, q, n_q, scale, m, l, o, work);
}

}  // namespace kvlm::kernels::avx2
