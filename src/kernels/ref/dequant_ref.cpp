// Scalar dequantization of the weight types only the reference variant implements: Q5_0, Q5_1,
// the K-quants (Q2_K .. Q6_K) and IQ4_NL / IQ4_XS. Every value is GGML's dequantize_row_* formula
// evaluated operation for operation in f32 (compiled with -ffp-contract=off, see
// ../CMakeLists.txt), so the results equal the `gguf` Python package's bit for bit, NaN and inf
// included (tested against tools/gen_dequant_goldens.py's goldens, hostile blocks among them). The
// matmul over these types dequantizes a row and dots in f32 (ops_ref.cpp); the AVX2 variant has
// bit-identical twins of them all (avx2/ops_avx2.cpp).
//
// Where a block has sub-block scales, the order is always (super scale * sub scale) * code, then
// minus (super min * sub min): the grouping gguf and GGML use. Another grouping would round
// differently, and turn an inf scale times a zero code into a different NaN-or-not.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kernels/ref/ref.h"
#include "tensor/dtype.h"

namespace kvlm::kernels::ref {

namespace {

// The 32 high bits of a Q5 block, bit j for element j.
uint32_t high_bits(const uint8_t (&qh)[4]) {
  uint32_t h;
  std::memcpy(&h, qh, 4);  // little-endian, as GGML stores it
  return h;
}

// Q5_0 (kMin false): value = (code - 16) * d;  Q5_1 (kMin true): value = code * d + m (two
// roundings). The 5-bit code is nibble | high bit << 4, nibbles as Q4_0: byte j holds element j
// (low) and j + 16 (high).
template <bool kMin, class Block>
void dequant_q5(const Block* blocks, float* dst, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const Block& b = blocks[ib];
    const float d = fp16_to_fp32(b.d);
    const uint32_t h = high_bits(b.qh);
    float* y = dst + ib * 32;  // [32]
    for (int j = 0; j < 16; ++j) {
      const int lo = (b.qs[j] & 0x0f) | static_cast<int>((h >> j) & 1) << 4;
      const int hi = (b.qs[j] >> 4) | static_cast<int>((h >> (j + 16)) & 1) << 4;
      if constexpr (kMin) {
        y[j] = static_cast<float>(lo) * d + fp16_to_fp32(b.m);
        y[j + 16] = static_cast<float>(hi) * d + fp16_to_fp32(b.m);
      } else {
        y[j] = static_cast<float>(lo - 16) * d;
        y[j + 16] = static_cast<float>(hi - 16) * d;
      }
    }
  }
}

// Q3_K's 16 six-bit scales (stored + 32): the low 4 bits of scale s are nibble s / 8 of byte
// s % 8, the high 2 bits are bits 2 * (s / 4) of byte 8 + s % 4.
inline int q3_k_scale(const uint8_t* scales, int s) {
  const int lo = (scales[s % 8] >> (4 * (s / 8))) & 0x0f;
  const int hi = (scales[8 + s % 4] >> (2 * (s / 4))) & 3;
  return (lo | hi << 4) - 32;
}

// Q4_K/Q5_K's 8 six-bit scales and mins in 12 bytes: sub-blocks 0-3 keep scale and min in the
// low 6 bits of bytes 0-3 and 4-7; sub-blocks 4-7 take their low 4 bits from the nibbles of
// bytes 8-11 and their high 2 bits from the top bits of bytes 0-3 (scale) and 4-7 (min).
inline void k_scale_min(const uint8_t* q, int s, int* scale, int* min) {
  if (s < 4) {
    *scale = q[s] & 63;
    *min = q[s + 4] & 63;
  } else {
    *scale = (q[s + 4] & 0x0f) | (q[s - 4] >> 6) << 4;
    *min = (q[s + 4] >> 4) | (q[s] >> 6) << 4;
  }
}

// IQ4_XS's 8 six-bit scales (stored + 32): low 4 bits in the nibbles of scales_l, high 2 bits in
// scales_h, 2 bits each.
inline int iq4_xs_scale(const BlockIQ4_XS& b, int s) {
  const int lo = (b.scales_l[s / 2] >> (4 * (s % 2))) & 0x0f;
  const int hi = (b.scales_h >> (2 * s)) & 3;
  return (lo | hi << 4) - 32;
}

// The 2-bit codes of Q2_K and the low 2 bits of Q3_K's: element e of a super-block sits in byte
// 32 * (e / 128) + e % 32, at bit 2 * ((e % 128) / 32).
inline int two_bits(const uint8_t* qs, int e) {
  return (qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
}

// Q2_K: 16 sub-blocks of 16, 2-bit codes. value = dl * q - ml (sub_block_scales).
void dequant_q2_k(const BlockQ2_K* blocks, float* dst, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    float dl[16], ml[16];
    sub_block_scales(DType::Q2_K, &blocks[ib], dl, ml);
    float* y = dst + ib * kQK_K;  // [256]
    for (int e = 0; e < kQK_K; ++e)
      y[e] = dl[e / 16] * static_cast<float>(two_bits(blocks[ib].qs, e)) - ml[e / 16];
  }
}

// Q3_K: 3-bit code = low 2 bits - (high bit clear ? 4 : 0), in [-4, 3]; the high bit of element
// e is bit e / 32 of hmask[e % 32]. value = dl * code, 16 sub-blocks of 16.
void dequant_q3_k(const BlockQ3_K* blocks, float* dst, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const BlockQ3_K& b = blocks[ib];
    float dl[16];
    sub_block_scales(DType::Q3_K, &b, dl, nullptr);
    float* y = dst + ib * kQK_K;  // [256]
    for (int e = 0; e < kQK_K; ++e) {
      const bool high = (b.hmask[e % 32] >> (e / 32)) & 1;
      y[e] = dl[e / 16] * static_cast<float>(two_bits(b.qs, e) - (high ? 0 : 4));
    }
  }
}

// Q4_K and Q5_K (kType): 8 sub-blocks of 32. Element e's nibble is in byte
// 32 * (e / 64) + e % 32 of qs, low for (e / 32) even, high for odd; Q5_K's fifth bit is bit
// e / 32 of qh[e % 32]. value = dl * code - ml.
template <DType kType, class Block>
void dequant_q45_k(const Block* blocks, float* dst, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const Block& b = blocks[ib];
    float dl[8], ml[8];
    sub_block_scales(kType, &b, dl, ml);
    float* y = dst + ib * kQK_K;  // [256]
    for (int e = 0; e < kQK_K; ++e) {
      const int s = e / 32;
      int q = (b.qs[32 * (e / 64) + e % 32] >> (4 * (s % 2))) & 0x0f;
      if constexpr (kType == DType::Q5_K) q |= ((b.qh[e % 32] >> s) & 1) << 4;
      y[e] = dl[s] * static_cast<float>(q) - ml[s];
    }
  }
}

// Q6_K: a 256-element super-block in two halves of 128. In half h, for l in [0, 32):
//   ql[64h + l]      low nibble -> element 128h + l,      high nibble -> 128h + l + 64
//   ql[64h + l + 32] low nibble -> element 128h + l + 32, high nibble -> 128h + l + 96
//   qh[32h + l] bits 0-1, 2-3, 4-5, 6-7 are the high 2 bits of elements +0, +32, +64, +96.
// The 6-bit code q - 32 in [-32, 31] is scaled by dl[e / 16] = d * scales[e / 16].
void dequant_q6_k(const BlockQ6_K* blocks, float* dst, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    const BlockQ6_K& b = blocks[ib];
    float dl[16];
    sub_block_scales(DType::Q6_K, &b, dl, nullptr);
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = b.ql + 64 * h;      // [64]
      const uint8_t* qh = b.qh + 32 * h;      // [32]
      const float* sc = dl + 8 * h;           // [8]: one per 16 elements of this half
      float* y = dst + ib * kQK_K + 128 * h;  // [128]
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q0 = ((ql[l] & 0x0f) | ((qh[l] >> 0) & 3) << 4) - 32;
        const int q1 = ((ql[l + 32] & 0x0f) | ((qh[l] >> 2) & 3) << 4) - 32;
        const int q2 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32;
        const int q3 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32;
        y[l + 0] = sc[is + 0] * static_cast<float>(q0);
        y[l + 32] = sc[is + 2] * static_cast<float>(q1);
        y[l + 64] = sc[is + 4] * static_cast<float>(q2);
        y[l + 96] = sc[is + 6] * static_cast<float>(q3);
      }
    }
  }
}

// 16 nibbles (Q4_0's order: byte j holds elements j and j + 16) through the IQ4 table, times dl.
inline void iq4_nibbles(const uint8_t* qs, float dl, float* y) {
  for (int j = 0; j < 16; ++j) {
    y[j] = dl * static_cast<float>(kIq4nlValues[qs[j] & 0x0f]);
    y[j + 16] = dl * static_cast<float>(kIq4nlValues[qs[j] >> 4]);
  }
}

void dequant_iq4_nl(const BlockIQ4_NL* blocks, float* dst, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib)
    iq4_nibbles(blocks[ib].qs, fp16_to_fp32(blocks[ib].d), dst + ib * kQK4_NL);
}

// IQ4_XS: 8 sub-blocks of 32, each IQ4_NL's nibble layout over its 16 bytes of qs, times dl.
void dequant_iq4_xs(const BlockIQ4_XS* blocks, float* dst, int64_t n_blocks) {
  for (int64_t ib = 0; ib < n_blocks; ++ib) {
    float dl[8];
    sub_block_scales(DType::IQ4_XS, &blocks[ib], dl, nullptr);
    for (int s = 0; s < kQK_K / 32; ++s)
      iq4_nibbles(blocks[ib].qs + 16 * s, dl[s], dst + ib * kQK_K + 32 * s);
  }
}

}  // namespace

namespace {

// f over the blocks at src, as a case of dequantize_row_blocks.
template <class Block>
bool run(void (*f)(const Block*, float*, int64_t), const void* src, float* dst, int64_t n_blocks) {
  f(static_cast<const Block*>(src), dst, n_blocks);
  return true;
}

}  // namespace

int sub_block_scales(DType t, const void* block, float* dl, float* ml) {
  // One f32 product per scale, as GGML and gguf round it: d * scale, dmin * min.
  switch (t) {
    case DType::Q2_K: {
      const auto& b = *static_cast<const BlockQ2_K*>(block);
      const float d = fp16_to_fp32(b.d), dmin = fp16_to_fp32(b.dmin);
      for (int s = 0; s < 16; ++s) {
        dl[s] = d * static_cast<float>(b.scales[s] & 0x0f);
        ml[s] = dmin * static_cast<float>(b.scales[s] >> 4);
      }
      return 16;
    }
    case DType::Q3_K: {
      const auto& b = *static_cast<const BlockQ3_K*>(block);
      const float d = fp16_to_fp32(b.d);
      for (int s = 0; s < 16; ++s) dl[s] = d * static_cast<float>(q3_k_scale(b.scales, s));
      return 16;
    }
    case DType::Q4_K:
    case DType::Q5_K: {
      // d, dmin and scales sit at the same offsets in both blocks.
      static_assert(offsetof(BlockQ4_K, scales) == offsetof(BlockQ5_K, scales));
      const auto& b = *static_cast<const BlockQ4_K*>(block);
      const float d = fp16_to_fp32(b.d), dmin = fp16_to_fp32(b.dmin);
      for (int s = 0; s < 8; ++s) {
        int scale, min;
        k_scale_min(b.scales, s, &scale, &min);
        dl[s] = d * static_cast<float>(scale);
        ml[s] = dmin * static_cast<float>(min);
      }
      return 8;
    }
    case DType::Q6_K: {
      const auto& b = *static_cast<const BlockQ6_K*>(block);
      const float d = fp16_to_fp32(b.d);
      for (int s = 0; s < 16; ++s) dl[s] = d * static_cast<float>(b.scales[s]);
      return 16;
    }
    case DType::IQ4_XS: {
      const auto& b = *static_cast<const BlockIQ4_XS*>(block);
      const float d = fp16_to_fp32(b.d);
      for (int s = 0; s < 8; ++s) dl[s] = d * static_cast<float>(iq4_xs_scale(b, s));
      return 8;
    }
    default:
      return 0;
  }
}

bool k_block_ints(DType t, const void* block, KInts* out) {
  KInts& k = *out;
  k.dmin = 0;
  std::memset(k.m, 0, sizeof(k.m));
  switch (t) {
    case DType::Q2_K: {  // the layout of dequant_q2_k
      const auto& b = *static_cast<const BlockQ2_K*>(block);
      k.d = b.d;
      k.dmin = b.dmin;
      for (int s = 0; s < 16; ++s) {
        k.sc[s] = static_cast<int8_t>(b.scales[s] & 0x0f);
        k.m[s] = static_cast<uint8_t>(b.scales[s] >> 4);
      }
      for (int e = 0; e < kQK_K; ++e) k.q[e] = static_cast<int8_t>(two_bits(b.qs, e));
      return true;
    }
    case DType::Q3_K: {  // the layout of dequant_q3_k
      const auto& b = *static_cast<const BlockQ3_K*>(block);
      k.d = b.d;
      for (int s = 0; s < 16; ++s) k.sc[s] = static_cast<int8_t>(q3_k_scale(b.scales, s));
      for (int e = 0; e < kQK_K; ++e) {
        const bool high = (b.hmask[e % 32] >> (e / 32)) & 1;
        k.q[e] = static_cast<int8_t>(two_bits(b.qs, e) - (high ? 0 : 4));
      }
      return true;
    }
    case DType::Q4_K:
    case DType::Q5_K: {
      // Same offsets of d, dmin and scales in both blocks (sub_block_scales relies on it too).
      const auto& b4 = *static_cast<const BlockQ4_K*>(block);
      const auto& b5 = *static_cast<const BlockQ5_K*>(block);
      k.d = b4.d;
      k.dmin = b4.dmin;
      for (int s = 0; s < 8; ++s) {
        int scale, min;
        k_scale_min(b4.scales, s, &scale, &min);
        k.sc[2 * s] = k.sc[2 * s + 1] = static_cast<int8_t>(scale);  // 0..63
        k.m[2 * s] = k.m[2 * s + 1] = static_cast<uint8_t>(min);
      }
      const uint8_t* qs = t == DType::Q4_K ? b4.qs : b5.qs;
      for (int e = 0; e < kQK_K; ++e) {
        const int s = e / 32;
        int q = (qs[32 * (e / 64) + e % 32] >> (4 * (s % 2))) & 0x0f;
        if (t == DType::Q5_K) q |= ((b5.qh[e % 32] >> s) & 1) << 4;
        k.q[e] = static_cast<int8_t>(q);
      }
      return true;
    }
    case DType::Q6_K: {
      const auto& b = *static_cast<const BlockQ6_K*>(block);
      k.d = b.d;
      std::memcpy(k.sc, b.scales, 16);
      for (int h = 0; h < 2; ++h)  // the layout of dequant_q6_k
        for (int l = 0; l < 32; ++l) {
          const uint8_t* ql = b.ql + 64 * h;
          const uint8_t qh = b.qh[32 * h + l];
          int8_t* q = k.q + 128 * h + l;
          q[0] = static_cast<int8_t>(((ql[l] & 0x0f) | (qh & 3) << 4) - 32);
          q[32] = static_cast<int8_t>(((ql[l + 32] & 0x0f) | ((qh >> 2) & 3) << 4) - 32);
          q[64] = static_cast<int8_t>(((ql[l] >> 4) | ((qh >> 4) & 3) << 4) - 32);
          q[96] = static_cast<int8_t>(((ql[l + 32] >> 4) | ((qh >> 6) & 3) << 4) - 32);
        }
      return true;
    }
    case DType::IQ4_XS: {
      const auto& b = *static_cast<const BlockIQ4_XS*>(block);
      k.d = b.d;
      for (int s = 0; s < 8; ++s) {
        k.sc[2 * s] = k.sc[2 * s + 1] = static_cast<int8_t>(iq4_xs_scale(b, s));  // -32..31
        for (int j = 0; j < 16; ++j) {
          k.q[32 * s + j] = kIq4nlValues[b.qs[16 * s + j] & 0x0f];
          k.q[32 * s + j + 16] = kIq4nlValues[b.qs[16 * s + j] >> 4];
        }
      }
      return true;
    }
    default:
      return false;
  }
}

bool dequantize_row_blocks(DType t, const void* src, float* dst, int64_t n) {
  const int64_t nb = n / dtype_info(t).block_size;
  switch (t) {
    case DType::Q5_0:
      return run(dequant_q5<false, BlockQ5_0>, src, dst, nb);
    case DType::Q5_1:
      return run(dequant_q5<true, BlockQ5_1>, src, dst, nb);
    case DType::Q2_K:
      return run(dequant_q2_k, src, dst, nb);
    case DType::Q3_K:
      return run(dequant_q3_k, src, dst, nb);
    case DType::Q4_K:
      return run(dequant_q45_k<DType::Q4_K, BlockQ4_K>, src, dst, nb);
    case DType::Q5_K:
      return run(dequant_q45_k<DType::Q5_K, BlockQ5_K>, src, dst, nb);
    case DType::Q6_K:
      return run(dequant_q6_k, src, dst, nb);
    case DType::IQ4_NL:
      return run(dequant_iq4_nl, src, dst, nb);
    case DType::IQ4_XS:
      return run(dequant_iq4_xs, src, dst, nb);
    default:
      return false;
  }
}

}  // namespace kvlm::kernels::ref
