// Repacking of Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / IQ4_NL and Q2_K .. Q6_K / IQ4_XS matrices into
// interleaved row groups (layout in packed.h).
// Plain byte moves, compiled for any x86-64 (and any CPU): the same bytes whichever kernel
// variant later reads them.
#include <cstring>
#include <type_traits>
#include <vector>

#include "base/error.h"
#include "kernels/ops.h"
#include "kernels/packed.h"
#include "kernels/ref/ref.h"

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

// Low 4 bits of 32 codes into row k's lanes of the Q4 layout (qs[v][4 k + j]: column 4 v + j low,
// 16 + 4 v + j high).
void put_nibbles(uint8_t (&qs)[4][32], int k, const int* c) {
  for (int v = 0; v < 4; ++v)
    for (int j = 0; j < 4; ++j)
      qs[v][4 * k + j] = static_cast<uint8_t>((c[4 * v + j] & 15) | (c[16 + 4 * v + j] & 15) << 4);
}

// Row k's 32 codes of sub-block b of a K-type super-block, as the packed layout stores them.
void sub_codes(DType t, const ref::KInts& ki, int b, int* c) {
  for (int j = 0; j < 32; ++j) {
    const int q = ki.q[32 * b + j];
    if (t == DType::Q6_K) {
      c[j] = q + 32;  // 0..63
    } else if (t == DType::Q3_K) {
      c[j] = q + 4;  // 0..7
    } else if (t == DType::IQ4_XS) {
      int idx = 0;  // the table index whose value is q (k_block_ints read it from there)
      while (kIq4nlValues[idx] != q) ++idx;
      c[j] = idx;
    } else {
      c[j] = q;
    }
  }
}

// Bit `bit` of 32 codes into row k's lanes (PackedQ5_0 / PackedQ5_K's fifth bits, bit 4;
// PackedQ3_K's third, bit 2): qh[4 k + j] bit i = column 4 i + j, bit 4 + i = 16 + 4 i + j.
void put_bits(uint8_t* qh, int k, const int* c, int bit) {
  for (int j = 0; j < 4; ++j) {
    int h = 0;
    for (int i = 0; i < 4; ++i)
      h |= ((c[4 * i + j] >> bit) & 1) << i | ((c[16 + 4 * i + j] >> bit) & 1) << (4 + i);
    qh[4 * k + j] = static_cast<uint8_t>(h);
  }
}

void put_fifth_bits(uint8_t* qh, int k, const int* c) { put_bits(qh, k, c, 4); }

// Bits shift, shift + 1 of 32 codes into row k's lanes, 2 bits per column (Q6_K's high bits,
// shift 4; Q2_K's codes and Q3_K's low bits, shift 0): q[u][4 k + j] bits 2 i, 2 i + 1 = column
// 16 u + 4 i + j.
void put_two_bits(uint8_t (&q)[2][32], int k, const int* c, int shift) {
  for (int u = 0; u < 2; ++u)
    for (int j = 0; j < 4; ++j) {
      int h = 0;
      for (int i = 0; i < 4; ++i) h |= ((c[16 * u + 4 * i + j] >> shift) & 3) << (2 * i);
      q[u][4 * k + j] = static_cast<uint8_t>(h);
    }
}

// Q5_0 / Q5_1: each row's 5-bit codes (ref's dequant_q5 layout) re-laid as PackedQ5_0 / _1.
template <class Block, class Packed>
void pack_q5(const TensorView& w, int64_t g, Packed* dst) {
  for (int64_t ib = 0; ib < w.n_cols / 32; ++ib) {
    Packed& p = dst[ib];
    for (int k = 0; k < 8; ++k) {
      const int64_t r = g * kGroupRows + k;
      Block b{};
      if (r < w.n_rows) std::memcpy(&b, w.row(r) + ib * sizeof(Block), sizeof(b));
      if constexpr (requires { b.m; }) p.m[k] = b.m;
      uint32_t h;
      std::memcpy(&h, b.qh, 4);
      int c[32];
      for (int j = 0; j < 16; ++j) {
        c[j] = (b.qs[j] & 0x0f) | static_cast<int>((h >> j) & 1) << 4;
        c[j + 16] = (b.qs[j] >> 4) | static_cast<int>((h >> (j + 16)) & 1) << 4;
      }
      p.d[k] = b.d;
      put_nibbles(p.qs, k, c);
      put_fifth_bits(p.qh, k, c);
    }
  }
}

// Sub-block b of row k (codes c) into packed super-block P.
template <class P>
void put_sub(P& p, int k, int b, const ref::KInts& ki, const int* c) {
  auto& s = p.b[b];
  if constexpr (std::is_same_v<P, PackedQ2_K>) {
    for (int h = 0; h < 2; ++h)
      s.sm[k][h] = static_cast<uint8_t>(ki.sc[2 * b + h] | ki.m[2 * b + h] << 4);
    put_two_bits(s.qs, k, c, 0);
  } else if constexpr (std::is_same_v<P, PackedQ3_K>) {
    s.sc[k][0] = ki.sc[2 * b];
    s.sc[k][1] = ki.sc[2 * b + 1];
    put_two_bits(s.qs, k, c, 0);
    put_bits(s.qh, k, c, 2);
  } else if constexpr (std::is_same_v<P, PackedIQ4_XS>) {
    put_nibbles(s.qs, k, c);
    s.sc[k] = ki.sc[2 * b];
  } else if constexpr (std::is_same_v<P, PackedQ6_K>) {
    put_nibbles(s.qs, k, c);
    s.sc[k][0] = ki.sc[2 * b];
    s.sc[k][1] = ki.sc[2 * b + 1];
    put_two_bits(s.qh, k, c, 4);
  } else {
    put_nibbles(s.qs, k, c);
    s.sm[k][0] = static_cast<uint8_t>(ki.sc[2 * b]);
    s.sm[k][1] = ki.m[2 * b];
    if constexpr (std::is_same_v<P, PackedQ5_K>) put_fifth_bits(s.qh, k, c);
  }
}

// The K types: each row's super-block read as integers (rows past the end: all zero), then laid
// out as packed.h says.
template <class P>
void pack_k_blocks(const TensorView& w, int64_t g, P* dst) {
  const int64_t n_sb = w.n_cols / kQK_K;
  const size_t sb_bytes = row_bytes(w.dtype, kQK_K);
  for (int64_t ib = 0; ib < n_sb; ++ib) {
    P& p = dst[ib];
    std::memset(&p, 0, sizeof(P));
    for (int k = 0; k < 8; ++k) {
      const int64_t r = g * kGroupRows + k;
      ref::KInts ki{};
      if (r < w.n_rows) ref::k_block_ints(w.dtype, w.row(r) + ib * sb_bytes, &ki);
      if (r >= w.n_rows && w.dtype == DType::Q6_K) std::memset(ki.q, -32, sizeof(ki.q));
      if (r >= w.n_rows && w.dtype == DType::Q3_K) std::memset(ki.q, -4, sizeof(ki.q));
      if (r >= w.n_rows && w.dtype == DType::IQ4_XS) std::memset(ki.q, -127, sizeof(ki.q));
      p.d[k] = ki.d;
      if constexpr (requires { p.dmin; }) p.dmin[k] = ki.dmin;
      for (int b = 0; b < 8; ++b) {
        int c[32];
        sub_codes(w.dtype, ki, b, c);
        put_sub(p, k, b, ki, c);
      }
    }
  }
}

}  // namespace

int64_t packed_block_cols(DType t) {
  return ref::k_packed_type(t) ? kQK_K : 32;
}

size_t packed_block_bytes(DType t) {
  switch (t) {
    case DType::Q4_0:
      return sizeof(PackedQ4_0);
    case DType::Q4_1:
      return sizeof(PackedQ4_1);
    case DType::Q8_0:
      return sizeof(PackedQ8_0);
    case DType::Q5_0:
      return sizeof(PackedQ5_0);
    case DType::Q5_1:
      return sizeof(PackedQ5_1);
    case DType::IQ4_NL:
      return sizeof(PackedIQ4_NL);
    case DType::Q2_K:
      return sizeof(PackedQ2_K);
    case DType::Q3_K:
      return sizeof(PackedQ3_K);
    case DType::Q4_K:
      return sizeof(PackedQ4_K);
    case DType::Q5_K:
      return sizeof(PackedQ5_K);
    case DType::Q6_K:
      return sizeof(PackedQ6_K);
    case DType::IQ4_XS:
      return sizeof(PackedIQ4_XS);
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
    case DType::Q5_0:
      return pack_q5<BlockQ5_0>(w, g, reinterpret_cast<PackedQ5_0*>(dst));
    case DType::Q5_1:
      return pack_q5<BlockQ5_1>(w, g, reinterpret_cast<PackedQ5_1*>(dst));
    case DType::IQ4_NL:
      return pack_blocks<BlockIQ4_NL>(w, g, reinterpret_cast<PackedIQ4_NL*>(dst));
    case DType::Q2_K:
      return pack_k_blocks(w, g, reinterpret_cast<PackedQ2_K*>(dst));
    case DType::Q3_K:
      return pack_k_blocks(w, g, reinterpret_cast<PackedQ3_K*>(dst));
    case DType::Q4_K:
      return pack_k_blocks(w, g, reinterpret_cast<PackedQ4_K*>(dst));
    case DType::Q5_K:
      return pack_k_blocks(w, g, reinterpret_cast<PackedQ5_K*>(dst));
    case DType::Q6_K:
      return pack_k_blocks(w, g, reinterpret_cast<PackedQ6_K*>(dst));
    case DType::IQ4_XS:
      return pack_k_blocks(w, g, reinterpret_cast<PackedIQ4_XS*>(dst));
    default:
      fail("pack_group: {} has no packed layout", dtype_name(w.dtype));
  }
}

size_t packed_group_bytes(const TensorView& w) {
  return static_cast<size_t>(w.n_cols / packed_block_cols(w.dtype)) * packed_block_bytes(w.dtype);
}

int64_t packed_groups(const TensorView& w) {
  return (w.n_rows + kGroupRows - 1) / kGroupRows;
}

bool packable(DType t) {
  return packed_block_bytes(t) != 0;
}

size_t packed_bytes(const TensorView& w) {
  if (!packable(w.dtype) || w.n_rows <= 0 || w.n_cols % packed_block_cols(w.dtype) != 0) return 0;
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
