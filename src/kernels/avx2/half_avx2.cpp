// F16 and BF16 weight matmul for the AVX2 variant: the weights are widened to f32 in registers
// (F16C's vcvtph2ps for f16; a 16-bit shift for bf16, whose bits are an f32's top half) and
// multiplied by f32 activations with FMA, R rows by T tokens per kernel call, so that each
// weight vector is loaded and converted once for up to T tokens and each activation vector once
// for R rows (register tiling; no dequantized copy of a row is written or read back).
//
// Numerics: activations stay f32. llama.cpp instead rounds the activations to the weight type
// (f16: 11 significant bits, bf16: 8) before its dot; kvlm's products are the exact f32 product
// of the exact weight value and the f32 activation, so its results are at least as accurate.
// Per (row, token) the sum keeps ref's order (ref/ops_ref.cpp's dot_f32): 16 lanes (two 8-lane
// accumulators, columns c % 16 < 8 and >= 8), the last n % 16 columns into the first lanes, then
// ref's pairwise fold (hsum of lo + hi is exactly that fold). The one difference from ref is that
// each product-add is fused (one rounding instead of two), so |avx2 - ref| <= 2 (ceil(n / 16) + 5)
// 2^-24 sum |w x| (each is within half that of the exact sum); tests/kernels/test_kernels_avx2.cpp
// checks this bound and reports the worst ratio it saw. Every element's operations are the same
// whatever the tile shape, n_tok, thread count or row split, so matmul is batch-independent and
// equals dot_row bit for bit.
// Compiled with -mavx2 -mfma -mf16c -ffp-contract=off (../CMakeLists.txt); same COMDAT hazard as
// ops_avx2.cpp: this file must emit no weak symbols (check with nm -C after changes).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/avx2/avx2.h"
#include "kernels/avx2/half_rows.h"
#include "kernels/avx2/lanes.h"

namespace kvlm::kernels::avx2 {

namespace {

// 8 weights at p as f32 (exact for every f16 and bf16 value, NaN and Inf included).
template <DType kT>
inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (kT == DType::F16)
    return _mm256_cvtph_ps(h);
  else
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// The first k (1..8) weights at p, zero beyond (both types' bits 0 are +0.0f), without reading
// past the row.
template <DType kT>
inline __m256 load_first(const uint16_t* p, int64_t k) {
  alignas(16) uint16_t buf[8] = {};
  std::memcpy(buf, p, static_cast<size_t>(k) * sizeof(uint16_t));
  return load8<kT>(buf);
}

// acc[r][t] += w rows' 8 columns at c times token t's 8 columns at c (k < 8: the first k only).
template <DType kT, int R, int T>
inline void step(const uint16_t* const* w, const float* x, int64_t n, int64_t c, int64_t k,
                 __m256 (&acc)[R][T]) {
  __m256 wv[R];
  for (int r = 0; r < R; ++r) wv[r] = k == 8 ? load8<kT>(w[r] + c) : load_first<kT>(w[r] + c, k);
  for (int t = 0; t < T; ++t) {
    const float* xt = x + t * n + c;
    const __m256 xv = k == 8 ? _mm256_loadu_ps(xt) : _mm256_maskload_ps(xt, first_lanes(k));
    for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
  }
}

// y[t * y_stride + r] = sum_c W[r, c] x[t, c] for R rows (w[r]: [n]) and T tokens (x: [T, n]).
// next (null: none): R rows of n weights the caller reads next, asked for into L1 a line per 32
// columns as these rows go by. Each row is a short stream (4 KiB for 2048 columns, about one
// page, where the hardware prefetchers stop), so without this every new row starts on a miss.
template <DType kT, int R, int T>
void tile(const uint16_t* const* w, const float* x, int64_t n, float* y, int64_t y_stride,
          const uint16_t* const* next) {
  __m256 lo[R][T], hi[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) lo[r][t] = hi[r][t] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    if (next != nullptr && c % 32 == 0)
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(next[r] + c), _MM_HINT_T0);
    step<kT, R, T>(w, x, n, c, 8, lo);
    step<kT, R, T>(w, x, n, c + 8, 8, hi);
  }
  const int64_t rest = n - c;  // 0..15, into the first lanes as ref's tail
  if (rest > 0) step<kT, R, T>(w, x, n, c, std::min<int64_t>(rest, 8), lo);
  if (rest > 8) step<kT, R, T>(w, x, n, c + 8, rest - 8, hi);
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) y[t * y_stride + r] = hsum(_mm256_add_ps(lo[r][t], hi[r][t]));
}

// Tile shapes: one token takes 4 rows per call (8 accumulators + 4 weight vectors: a
// matrix-vector product waits on memory, more rows keep more loads in flight); more tokens take
// 2 rows x 3 tokens (12 accumulators + 2 weight + 1 activation register of AVX2's 16), 12 FMAs
// per 5 loads. Smaller shapes for the edges.
constexpr int64_t kRows = 2, kToks = 3, kDecodeRows = 4;

template <DType kT>
TileFn tile_fn(int64_t rows, int64_t toks) {
  static constexpr TileFn kFns[kDecodeRows][kToks] = {
      {tile<kT, 1, 1>, tile<kT, 1, 2>, tile<kT, 1, 3>},
      {tile<kT, 2, 1>, tile<kT, 2, 2>, tile<kT, 2, 3>},
      {tile<kT, 3, 1>, nullptr, nullptr},
      {tile<kT, 4, 1>, nullptr, nullptr}};
  return kFns[rows - 1][toks - 1];
}

struct Avx2Tiles {
  static constexpr int64_t kRows = avx2::kRows, kToks = avx2::kToks, kDecodeRows = avx2::kDecodeRows;
  template <DType kT>
  static TileFn fn(int64_t rows, int64_t toks) {
    return tile_fn<kT>(rows, toks);
  }
};

}  // namespace

void matmul_half_rows(const TensorView& w, const float* x, float* y, int64_t n_tok,
                      int64_t r_begin, int64_t r_end) {
  if (w.dtype == DType::F16)
    half_rows<Avx2Tiles, DType::F16>(w, x, y, n_tok, r_begin, r_end);
  else
    half_rows<Avx2Tiles, DType::BF16>(w, x, y, n_tok, r_begin, r_end);
}

float dot_half(DType t, const uint16_t* a, const float* b, int64_t n) {
  float y;
  (t == DType::F16 ? tile<DType::F16, 1, 1> : tile<DType::BF16, 1, 1>)(&a, b, n, &y, 1, nullptr);
  return y;
}

}  // namespace kvlm::kernels::avx2
