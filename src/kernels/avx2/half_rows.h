// The row and token loops of the F16/BF16 matmul over a set of register tiles (half_avx2.cpp's;
// internal to src/kernels/avx2). Internal linkage only, so a copy is built with the flags of the
// file that includes it and none can be picked by the linker for code built with other flags.
#pragma once

#include <algorithm>
#include <cstdint>

#include "tensor/dtype.h"
#include "tensor/tensor.h"

namespace kvlm::kernels::avx2 {
namespace {

// y[t * y_stride + r] for rows w[0 .. R) and T tokens of x; next: the rows to prefetch or null.
using TileFn = void (*)(const uint16_t* const* w, const float* x, int64_t n, float* y,
                        int64_t y_stride, const uint16_t* const* next);

// Rows whose weights stay in L2 while every token passes them: each tile of tokens (in L1)
// is multiplied with a block of this many rows before the next tokens.
constexpr int64_t kBlockRows = 16;

// Tiles: kRows x kToks tiles for several tokens, kDecodeRows x 1 for one; fn<kT>(rows, toks).
template <class Tiles, DType kT>
void half_rows(const TensorView& w, const float* x, float* y, int64_t n_tok, int64_t r_begin,
               int64_t r_end) {
  const int64_t n = w.n_cols, n_out = w.n_rows;
  const int64_t step_rows = n_tok == 1 ? Tiles::kDecodeRows : Tiles::kRows;
  for (int64_t b0 = r_begin; b0 < r_end; b0 += kBlockRows) {
    const int64_t b1 = std::min(r_end, b0 + kBlockRows);
    for (int64_t t0 = 0; t0 < n_tok; t0 += Tiles::kToks) {
      const int64_t nt = std::min(Tiles::kToks, n_tok - t0);
      for (int64_t r0 = b0; r0 < b1; r0 += step_rows) {
        const int64_t nr = std::min(step_rows, b1 - r0);
        // The next tile's rows (the next block's on the last tile) on the first token tile,
        // which is the one that brings a block in; rows past r_end only as far as the matrix
        // goes (a hint never faults, but stays inside the mapping anyway).
        const uint16_t* rows[Tiles::kDecodeRows];
        const uint16_t* ahead[Tiles::kDecodeRows];
        for (int64_t r = 0; r < nr; ++r) {
          rows[r] = reinterpret_cast<const uint16_t*>(w.row(r0 + r));
          ahead[r] = reinterpret_cast<const uint16_t*>(w.row(std::min(r0 + nr + r, n_out - 1)));
        }
        const bool fetch = t0 == 0 && r0 + nr < r_end;
        Tiles::template fn<kT>(nr, nt)(rows, x + t0 * n, n, y + t0 * n_out + r0, n_out,
                            fetch ? ahead : nullptr);
      }
    }
  }
}

}  // namespace
}  // namespace kvlm::kernels::avx2
