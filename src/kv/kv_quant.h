// How K/V rows are quantized when they enter a cache (contiguous, paged, KIVI's V rows).
//
// The bytes are GGML's block formats, read by the same kernels as weights (kernels::dequantize_*),
// so a cache row of type q4_0 is a valid GGML q4_0 row. Only the choice of the block's scale (and
// q4_1's min) differs: GGML's reference quantizer takes d = max / -8 (q4_0) or d = (max - min) / 15,
// m = min (q4_1), which maps the extreme value exactly and stretches the step over it. A weight is
// quantized once, offline; a KV row is quantized once per token at run time and read by every later
// token, so it is worth a small search for the scale that minimises the block's squared error:
//
//   candidates: GGML's own encoding, a grid of scales around GGML's (q4_0: 6, q4_1: 9), each
//   rounded to f16 as stored with its codes chosen as the nearest to x / d, then the best of them
//   refined by least squares (the scale, and q4_1's min, that fit its codes best; llama.cpp's
//   make_qx_quants idea), up to 3 times. The final choice is judged on the values the kernels read
//   back; the smallest squared error wins, GGML's encoding on ties.
//
// Invariant (tested): for every block, the squared error of kv_quantize_row's encoding is <= that
// of kernels::quantize_row's (GGML's) encoding; tests/kv/test_kv_quant.cpp prints the gain on
// Gaussian blocks (rotated K/V rows look like that). Cost: ~0.6 us a block of CPU time (SSE2
// candidate loop; GGML's ~0.06 us); a SmolLM2 token writes 2 x 30 x 6 = 360 blocks, so ~0.2 ms a
// token, on the thread that runs the layer (docs/bench-log/2026-12-01-first-vm.md, "KV scale
// search", has the decode and prefill cost).
// q8_0 and the float types go to kernels::quantize_row unchanged (q8_0's error is already ~1e-3
// of the signal; measured, docs/KV.md).
#pragma once

#include <cstdint>

#include "tensor/dtype.h"

namespace kvlm {

// src [n] -> dst, n whole blocks of t (as kernels::quantize_row).
void kv_quantize_row(DType t, const float* src, void* dst, int64_t n);
// The same search with its candidate loop in plain scalar code: the twin kv_quantize_row's SSE2
// loop is tested against (identical bytes).
void kv_quantize_row_scalar(DType t, const float* src, void* dst, int64_t n);

// Squared error sum_i (x_i - dequant(block)_i)^2 of one encoded block of t (q4_0 or q4_1): what the
// search minimises, exposed so tests can compare encodings. x [32].
double kv_block_sq_error(DType t, const float* x, const void* block);

}  // namespace kvlm
