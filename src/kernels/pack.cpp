// Repacking of Q4_0 / Q4_1 / Q8_0 matrices into interleaved row groups (layout in packed.h).
// Plain byte moves, compiled for any x86-64 (and any CPU): the same bytes whichever kernel
// variant later reads them.
#include <cstring>
#include <vector>

#include "base/error.h"
#include "kernels/ops.h"
#include "kernels/packed.h"

namespace kvlm::kernels {

namespace {

// Packed block ib of group g: each row's block copied out (GGUF blocks are only 2-byte aligned,
// memcpy reads them anywhere), its scales stored by lane and its codes interleaved 4 bytes at a
// time: lane k of code vector v gets the row's bytes 4 v .. 4 v + 3. Rows past the end are zero.
template <class Block, class Packed>
void pack_blocks(const TensorView& w, int64_t g, Packed* dst) {
  const int64_t n_blocks = w.n_cols / 32;
  constexpr size_t kCodeBytes = sizeof(Block::qs);  // 16 (Q4) or 32 (Q8)
  static_assert(sizeof(Packed::qs) == 8 * kCodeBytes);
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    Packed& p = dst[ib];
    for (int k = 0; k < 8; ++k) {
      const int64_t r = g * kGroupRows + k;
      Block b{};
      if (r < w.n_rows) std::memcpy(&b, w.row(r) + ib * sizeof(Block), sizeof(Block));
      p.d[k] = b.d;
      if constexpr (requires { b.m; }) p.m[k] = b.m;
      const auto* src = reinterpret_cast<const uint8_t*>(b.qs);
      auto* qs = reinterpret_cast<uint8_t*>(p.qs);
      for (size_t v = 0; v < kCodeBytes / 4; ++v) std::memcpy(qs + 32 * v + 4 * k, src + 4 * v, 4);
    }
  }
}

}  // namespace

size_t packed_block_bytes(DType t) {
  switch (t) {
    case DType::Q4_0:
      return sizeof(PackedQ4_0);
    case DType::Q4_1:
      return sizeof(PackedQ4_1);
    case DType::Q8_0:
      return sizeof(PackedQ8_0);
    default:
      return 0;
  }
}

void pack_group(const TensorView& w, int64_t g, uint8_t* dst) {
  switch (w.dtype) {
    case DType::Q4_0:
      return pack_blocks<BlockQ4_0>(w, g, reinterpret_cast<PackedQ4_0*>(dst));
    case DType::Q4_1:
      return pack_blocks<BlockQ4_1>(w, g, reinterpret_cast<PackedQ4_1*>(dst));
    case DType::Q8_0:
      return pack_blocks<BlockQ8_0>(w, g, reinterpret_cast<PackedQ8_0*>(dst));
    default:
      fail("pack_group: {} has no packed layout", dtype_name(w.dtype));
  }
}

size_t packed_group_bytes(const TensorView& w) {
  return static_cast<size_t>(w.n_cols / 32) * packed_block_bytes(w.dtype);
}

int64_t packed_groups(const TensorView& w) {
  return (w.n_rows + kGroupRows - 1) / kGroupRows;
}

bool packable(DType t) {
  return packed_block_bytes(t) != 0;
}

size_t packed_bytes(const TensorView& w) {
  if (!packable(w.dtype) || w.n_rows <= 0 || w.n_cols % 32 != 0) return 0;
  return packed_group_bytes(w) * static_cast<size_t>(packed_groups(w));
}

void pack_weights_into(const TensorView& w, uint8_t* dst) {
  if (packed_bytes(w) == 0) return;
  const int64_t n_groups = packed_groups(w);
  const size_t group = packed_group_bytes(w);
  for (int64_t g = 0; g < n_groups; ++g) pack_group(w, g, dst + group * g);
}

std::vector<uint8_t> pack_weights(const TensorView& w) {
  std::vector<uint8_t> out(packed_bytes(w));
  pack_weights_into(w, out.data());
  return out;
}

}  // namespace kvlm::kernels
