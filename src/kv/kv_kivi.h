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

#include "kv/kv_shape.h"

namespace kvlm {

// Quantizes x: [group, kv_dim] f32 into one group (layout above): per channel, d = (max - min) / 15
// and m = min, both stored as f16, codes = round((x - m) / d) in [0, 15] using the stored f16 d, m.
// Precondition: kv_dim even.
void kv_kivi_quantize_k_group(const float* x, int64_t group, int64_t kv_dim, uint8_t* out);

// Dequantizes token t, channels [c0, c0 + n), of one group into out: [n] f32.
// Precondition: 0 <= t < group, c0 even, c0 + n <= kv_dim.
void kv_kivi_dequantize_k_row(const uint8_t* grp, int64_t group, int64_t kv_dim, int64_t t,
                              int64_t c0, int64_t n, float* out);

// ---- one write pass of the KIVI layout, shared by the contiguous cache and the paged store ------
// Where sealed bytes go: position p's V row is row(p), the K group starting at position g0 (a
// multiple of the group) is group_bytes contiguous bytes at row(g0) x k_row_bytes (a group's
// bytes are exactly group x kv_k_row_bytes). row(p) = p contiguous; through a block table
// (block_size a multiple of the group, so a group never straddles blocks) row(p) =
// blocks[p / block_size] x block_size + p % block_size.
struct KiviSealed {
  uint8_t* k = nullptr;            // sealed K groups
  uint8_t* v = nullptr;            // sealed V rows of dtype_v
  size_t k_row_bytes = 0, v_row_bytes = 0;
  const int32_t* blocks = nullptr;  // nullptr: contiguous
  int64_t block_size = 0;
  int64_t row(int64_t p) const { return kv_table_row(blocks, block_size, p); }
  // Whether position p's block is held: a sliding-window group's table has holes (kNoBlock) for
  // the blocks its window no longer reads, and a group there is never sealed (no query reads it).
  bool held(int64_t p) const { return blocks == nullptr || blocks[p / block_size] >= 0; }
};

// Seals the groups [s0, s1) that a pass writing positions [pos, pos + n) completes (s1 =
// kv_kivi_sealed(s0, pos + n, ...)): row j of a group in f32 as the f16 residual holds it, from
// the residual (rk / rv: row j - s0, positions [s0, pos)) or from the pass (k / v: [n, kv_dim]
// f32, row j - pos, rounded to f16 first), so a group seals identically whichever pass completes
// it. x: [group, kv_dim] f32 scratch. The residual is left alone (attention still reads it).
// A group whose block is a hole (out.held) is skipped: its window already released it.
void kv_kivi_seal(const KvShape& s, const KiviSealed& out, const uint16_t* rk, const uint16_t* rv,
                  int64_t s0, int64_t s1, int64_t pos, const float* k, const float* v, float* x);

// Moves one residual (K or V) on after the pass: r holds positions [s0, pos) as rows j - s0
// before and [s1, pos + n) as rows j - s1 after, the pass's rows (in: [n, kv_dim] f32) rounded to
// f16.
void kv_kivi_move_residual(int64_t kv_dim, uint16_t* r, int64_t s0, int64_t s1, int64_t pos,
                           int64_t n, const float* in);

}  // namespace kvlm
