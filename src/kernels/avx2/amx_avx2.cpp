// AMX-INT8 tile kernels for the quantized matmul: two packed groups (16 rows) against whole
// 16-token tiles, with every block's integer dots done by one tile instruction and the float work
// done exactly as the VNNI pair kernels do it (vnni_avx2.cpp), so the bits are ref's.
//
// Per block (32 columns) and token tile: the 16 tokens' codes are tile A (16 rows x 32 int8, from
// Acts::panel, where they lie 512 contiguous bytes per tile and block), the 16 weight rows' codes
// are tile B in the tile unit's "4 bytes of a column per row" order (8 rows x 64 bytes: row r holds
// columns 4r .. 4r + 3 of weight rows 0..15), and one tdpbsud (signed codes x unsigned nibbles) or
// tdpbssd (Q8_0) writes the exact integer dots into tile C (16 tokens x 16 rows, int32). The packed
// layout (kernels/packed.h) is already that order for 8 rows: B's row r is the two groups' qs[r]
// side by side (Q8_0), or for Q4 the low nibbles of qs[r] (columns 4r + j, r < 4) and the high
// ones (columns 16 + 4r + j) in row 4 + r. So B is built with 8 (Q8_0) or 16 (Q4) vector
// instructions per block, once per call for all its token tiles, where the VNNI pair kernels spend
// 64 (Q4) or 32 (Q8_0) vpdpbusd per block on 16 tokens.
// C goes to memory and each token's 16 sums are scaled and added to that token's running sums in
// zmm registers by the VNNI pair kernels' float operations, in the same order (block by block),
// so every result is bit-identical to theirs and to ref. The integers cannot differ: a block dot is
// at most 32 x 15 x 127 (Q4) or 32 x 128 x 127 (Q8_0) in magnitude, exact in int32.
//
// The float work (6 operations per result for Q4_1, which ref's rounding fixes) now dominates: on
// the Xeon of docs/bench-log/2026-12-03-xeon-amx.md a block's tile instructions took ~30 cycles
// and its float work ~65 for 16 tokens, and the two did not overlap. Blocks' dots are issued kLag
// ahead of their float work, on two alternating tile sets.
//
// Each thread that runs a kernel configures its tiles once (thread_local) and keeps them; Linux
// must have granted the process the tile state first (amx_supported() in cpu_avx2.cpp asks).
// Compiled with -mamx-tile -mamx-int8 on top of the VNNI file's flags; dispatch uses it only when
// amx_supported(). Same COMDAT hazard as the other files here (see ../CMakeLists.txt).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's 512-bit intrinsics; see vnni
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/avx2/lanes512.h"
#include "kernels/avx2/qgroup.h"
#include "kernels/packed.h"

namespace kvlm::kernels::avx2 {

namespace {

// The tile configuration (palette 1) as ldtilecfg reads it: 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of tile i
  uint8_t rows[16] = {};    // rows of tile i
};
static_assert(sizeof(TileConfig) == 64);

// Loads this thread's tile configuration the first time the thread runs a kernel.
void configure_tiles() {
  thread_local bool done = false;
  if (done) return;
  TileConfig c;
  for (int i = 0; i < 2; ++i) {
    c.rows[i] = kTileToks;  // C: [16 tokens, 16 rows] int32
    c.colsb[i] = 64;
    c.rows[2 + i] = kTileToks;  // A: [16 tokens, 32 codes] int8
    c.colsb[2 + i] = 32;
    c.rows[4 + i] = 8;  // B: [32 / 4, 16 rows x 4 codes] int8
    c.colsb[4 + i] = 64;
  }
  _tile_loadconfig(&c);
  done = true;
}

enum class Kind { kQ4_0, kQ4_1, kQ8_0 };

template <Kind K>
using Packed = std::conditional_t<K == Kind::kQ4_0, PackedQ4_0,
                                  std::conditional_t<K == Kind::kQ4_1, PackedQ4_1, PackedQ8_0>>;

// Tile B of block pair (a, b) into b_tile: [8][64] bytes (see the file comment).
template <Kind K>
inline void build_b(const Packed<K>& a, const Packed<K>& b, uint8_t (*b_tile)[64]) {
  if constexpr (K == Kind::kQ8_0) {
    for (int r = 0; r < 8; ++r) _mm512_store_si512(b_tile[r], join(a.qs[r], b.qs[r]));
  } else {
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    for (int r = 0; r < 4; ++r) {
      const __m512i raw = join(a.qs[r], b.qs[r]);
      _mm512_store_si512(b_tile[r], _mm512_and_si512(raw, m4));
      _mm512_store_si512(b_tile[4 + r], _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4));
    }
  }
}

// Block ib's integer dots on tiles C = P, A = 2 + P, B = 4 + P, stored to c_out: [16][16] int32.
// (GCC's tile intrinsics paste the tile number into the instruction text, so it must be a literal:
// hence one macro expansion per P.)
#define KVLM_BLOCK_DOTS(P, C, A, B)                                                              \
  template <Kind K>                                                                              \
  inline void block_dots_##P(const int8_t* a_codes, size_t a_stride, const uint8_t(*b_tile)[64], \
                             int32_t(*c_out)[16]) {                                              \
    _tile_zero(C);                                                                               \
    _tile_loadd(A, a_codes, static_cast<long>(a_stride));                                        \
    _tile_loadd(B, b_tile, 64);                                                                  \
    if constexpr (K == Kind::kQ8_0)                                                              \
      _tile_dpbssd(C, A, B);                                                                     \
    else                                                                                         \
      _tile_dpbsud(C, A, B);                                                                     \
    _tile_stored(C, c_out, 64);                                                                  \
  }
KVLM_BLOCK_DOTS(0, 0, 2, 4)
KVLM_BLOCK_DOTS(1, 1, 3, 5)
#undef KVLM_BLOCK_DOTS

// acc[t] += block ib's contribution for tokens t0 + t, in the VNNI pair kernels' float
// operations (add_block*, lanes512.h). d, s, c: the block's numbers of token t0 at act_at (the
// tile's 16 tokens adjacent).
template <Kind K>
__attribute__((always_inline)) inline void scale_add(const Packed<K>& a, const Packed<K>& b,
                                                     const int32_t (*c)[16], const float* d,
                                                     const float* s, const int32_t* ci,
                                                     __m512* acc) {
  const __m512 dw = join_f16(a.d, b.d);
  __m512 mw;
  if constexpr (K == Kind::kQ4_1) mw = join_f16(a.m, b.m);
#pragma GCC unroll 16
  for (int t = 0; t < kTileToks; ++t) {
    const __m512i sumi = _mm512_load_si512(c[t]);
    if constexpr (K == Kind::kQ4_1)
      acc[t] = add_block_min(acc[t], sumi, dw, d[t], mw, s[t]);
    else if constexpr (K == Kind::kQ4_0)
      acc[t] = add_block(acc[t], _mm512_sub_epi32(sumi, _mm512_set1_epi32(ci[t])), dw, d[t]);
    else
      acc[t] = add_block(acc[t], sumi, dw, d[t]);
  }
}

// Blocks per segment: tile B of a segment's blocks is built before any of them is loaded into a
// tile (a tile load right after the vector stores that wrote its bytes waits for them), and a
// segment's B (kSegBlocks x 512 bytes) stays in L1 while every 16-token tile goes by.
constexpr int64_t kSegBlocks = 32;
// A block's sums are read back kLag blocks after its dots were issued, so the vector loads of
// what a tile store wrote do not wait on that store and the dot before it. (1, 2 and 3 measured
// within 1% of each other for pp512 once y was prefetched; 3 was ahead for 16-token decode.)
constexpr int64_t kLag = 3;
constexpr uint64_t kLag1 = kLag + 1;  // sum buffers in the ring

template <Kind K>
void tile_pair(const uint8_t* g0, const uint8_t* g1, const Acts& x, int64_t t0, int64_t n_t,
               const uint8_t* ahead, int n_ahead, const TileDst& dst) {
  configure_tiles();
  const int64_t n_blocks = x.n_blocks;
  const size_t group_bytes = static_cast<size_t>(n_blocks) * sizeof(Packed<K>);
  const Packed<K>* a = reinterpret_cast<const Packed<K>*>(g0);
  const Packed<K>* b = reinterpret_cast<const Packed<K>*>(g1);
  alignas(64) uint8_t b_tiles[kSegBlocks][8][64];
  alignas(64) int32_t c[kLag1][kTileToks][16];
  for (int64_t s0 = 0; s0 < n_blocks; s0 += kSegBlocks) {
    const int64_t s1 = std::min(n_blocks, s0 + kSegBlocks);
    for (int64_t ib = s0; ib < s1; ++ib) {
      build_b<K>(a[ib], b[ib], b_tiles[ib - s0]);
      // The next call's groups, a block of each per block here (into L2; changes no arithmetic).
      for (int k = 0; k < n_ahead; ++k) {
        const uint8_t* p = ahead + k * group_bytes + static_cast<size_t>(ib) * sizeof(Packed<K>);
        for (size_t off = 0; off < sizeof(Packed<K>); off += 64)
          _mm_prefetch(reinterpret_cast<const char*>(p + off), _MM_HINT_T1);
      }
    }
    for (int64_t tt = t0; tt < t0 + n_t; tt += kTileToks) {
      float* o = dst.partial + (tt - t0) * 16;  // [16 tokens, 16 rows]
      // The rows of y this tile writes at its end, asked for now: a batch's y is larger than L2,
      // and stores that miss fill the store buffer and stall the tile loads and stores behind
      // them (pp512 x1.27 on one thread, docs/bench-log/2026-12-03-xeon-amx.md). Changes no
      // arithmetic.
      if (s1 == n_blocks) {
        for (int t = 0; t < kTileToks; ++t)
          _mm_prefetch(reinterpret_cast<const char*>(dst.y + (tt - t0 + t) * dst.y_stride),
                       _MM_HINT_T0);
      }
      // Tile A of block ib: a_base + 512 ib, 16 rows (tokens) of 32 codes.
      const int8_t* a_base = x.panel + (tt / kTileToks) * kTileToks * 32 * n_blocks;
      __m512 acc[kTileToks];
#pragma GCC unroll 16
      for (int t = 0; t < kTileToks; ++t)
        acc[t] = s0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(o + 16 * t);
      const float* d = x.d + act_at(x, tt, 0);  // block j's at d + 16 j (a whole tile)
      const float* sv = K == Kind::kQ4_1 ? x.s + act_at(x, tt, 0) : nullptr;
      const int32_t* ci = K == Kind::kQ4_0 ? x.c + act_at(x, tt, 0) : nullptr;
      auto sums = [&](int64_t j) { return c[static_cast<uint64_t>(j) % kLag1]; };  // block j's
      auto epilogue = [&](int64_t j) {
        scale_add<K>(a[j], b[j], sums(j), d + kActTile * j,
                     sv == nullptr ? nullptr : sv + kActTile * j,
                     ci == nullptr ? nullptr : ci + kActTile * j, acc);
      };
      // Block ib: its dots on tile set ib % 2 (P) into sums(ib); then the float work of block
      // ib - kLag, whose sums left the tile unit kLag blocks ago.
      auto step = [&](auto p, int64_t ib) {
        constexpr int P = decltype(p)::value;
        const int8_t* codes = a_base + ib * kTileToks * 32;
        if constexpr (P == 0)
          block_dots_0<K>(codes, 32, b_tiles[ib - s0], sums(ib));
        else
          block_dots_1<K>(codes, 32, b_tiles[ib - s0], sums(ib));
        if (ib - kLag >= s0) epilogue(ib - kLag);
      };
      int64_t ib = s0;
      for (; ib + 2 <= s1; ib += 2) {
        step(std::integral_constant<int, 0>{}, ib);
        step(std::integral_constant<int, 1>{}, ib + 1);
      }
      if (ib < s1) step(std::integral_constant<int, 0>{}, ib++);
      for (int64_t j = std::max(s0, s1 - kLag); j < s1; ++j) epilogue(j);
      if (s1 < n_blocks) {
#pragma GCC unroll 16
        for (int t = 0; t < kTileToks; ++t) _mm512_store_ps(o + 16 * t, acc[t]);
      } else {
        float* y = dst.y + (tt - t0) * dst.y_stride;
        const __mmask16 m = static_cast<__mmask16>((1u << dst.n_r) - 1);
#pragma GCC unroll 16
        for (int t = 0; t < kTileToks; ++t) _mm512_mask_storeu_ps(y + t * dst.y_stride, m, acc[t]);
      }
    }
  }
}

}  // namespace

void tile_q4_0(const uint8_t* g0, const uint8_t* g1, const Acts& x, int64_t t0, int64_t n_t,
               const uint8_t* ahead, int n_ahead, const TileDst& dst) {
  tile_pair<Kind::kQ4_0>(g0, g1, x, t0, n_t, ahead, n_ahead, dst);
}
void tile_q4_1(const uint8_t* g0, const uint8_t* g1, const Acts& x, int64_t t0, int64_t n_t,
               const uint8_t* ahead, int n_ahead, const TileDst& dst) {
  tile_pair<Kind::kQ4_1>(g0, g1, x, t0, n_t, ahead, n_ahead, dst);
}
void tile_q8_0(const uint8_t* g0, const uint8_t* g1, const Acts& x, int64_t t0, int64_t n_t,
               const uint8_t* ahead, int n_ahead, const TileDst& dst) {
  tile_pair<Kind::kQ8_0>(g0, g1, x, t0, n_t, ahead, n_ahead, dst);
}

}  // namespace kvlm::kernels::avx2
