// The KIVI layout of the cache (docs/KV.md "KIVI"): per-channel K quantization error bounds,
// sealing bookkeeping (which tokens are quantized, how many stay f16), independence of the stored
// bytes from how a sequence is split into passes, and the refusals. No model: only a KvShape.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "base/error.h"
#include "kv/kv_cache.h"
#include "kv_manager/kv_manager.h"

namespace kvlm {
namespace {

KvShape kivi_shape(int n_layer, int n_kv_head, int head_dim, int32_t residual, int32_t group,
                   DType v = DType::Q4_0) {
  KvShape s;
  s.n_layer = n_layer;
  s.n_kv_head = n_kv_head;
  s.head_dim = head_dim;
  s.dtype_k = DType::Q4_0;
  s.dtype_v = v;
  s.kivi_residual = residual;
  s.kivi_group = group;
  return s;
}

float f16_round(float x) { return fp16_to_fp32(fp32_to_fp16(x)); }

// K-like data: [n_tok, kv_dim], every channel with its own offset and scale, a few channels 20x
// larger than the rest (the outlier channels per-channel quantization is for).
std::vector<float> k_like(int64_t n_tok, int64_t kv_dim, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> scale(kv_dim), offset(kv_dim);
  for (int64_t c = 0; c < kv_dim; ++c) {
    scale[c] = (c % 16 == 3 ? 20.0f : 1.0f) * (0.5f + (c % 5) * 0.25f);
    offset[c] = nd(rng) * scale[c];
  }
  std::vector<float> x(n_tok * kv_dim);
  for (int64_t t = 0; t < n_tok; ++t)
    for (int64_t c = 0; c < kv_dim; ++c) x[t * kv_dim + c] = f16_round(offset[c] + scale[c] * 0.3f * nd(rng));
  return x;
}

TEST(KvKivi, SealedCountFormula) {
  // residual 5, group 4: from empty, tokens seal 4 at a time once more than 5 + 3 are held.
  const int64_t want[] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 8, 8};
  for (int64_t n = 0; n < 15; ++n) EXPECT_EQ(kv_kivi_sealed(0, n, 5, 4), want[n]) << n;
  // Residual 0: every complete group seals at once.
  EXPECT_EQ(kv_kivi_sealed(0, 63, 0, 64), 0);
  EXPECT_EQ(kv_kivi_sealed(0, 64, 0, 64), 64);
  // From a state with fewer than `residual` f16 tokens (after a truncation) nothing seals early.
  EXPECT_EQ(kv_kivi_sealed(64, 70, 32, 64), 64);
  EXPECT_EQ(kv_kivi_sealed(64, 64 + 32 + 63, 32, 64), 64);
  EXPECT_EQ(kv_kivi_sealed(64, 64 + 32 + 64, 32, 64), 128);
  // f16 tokens after sealing stay in [residual, residual + group - 1].
  for (int64_t n = 32; n < 1000; ++n) {
    const int64_t f16 = n - kv_kivi_sealed(0, n, 32, 64);
    EXPECT_GE(f16, 32);
    EXPECT_LE(f16, 32 + 63);
  }
}

TEST(KvKivi, GroupRoundTripWithinHalfAStep) {
  for (int64_t group : {32, 64, 128}) {
    const int64_t d = 96;
    std::vector<float> x = k_like(group, d, 7);
    std::vector<uint8_t> q(d * (4 + group / 2));
    kv_kivi_quantize_k_group(x.data(), group, d, q.data());
    std::vector<float> row(d);
    for (int64_t c = 0; c < d; ++c) {
      float lo = x[c], hi = x[c];
      for (int64_t t = 0; t < group; ++t) lo = std::min(lo, x[t * d + c]), hi = std::max(hi, x[t * d + c]);
      const float step = (hi - lo) / 15;
      for (int64_t t = 0; t < group; ++t) {
        kv_kivi_dequantize_k_row(q.data(), group, d, t, c / 2 * 2, 2, row.data());
        // Half a step from rounding; the f16 scale (11 bits) moves the top code by <= 15 x 2^-11.
        EXPECT_LE(std::fabs(row[c % 2] - x[t * d + c]), 0.51f * step + 1e-6f)
            << "group " << group << " channel " << c << " token " << t;
      }
    }
    // A row read through a head slice equals the same channels read from the whole row.
    std::vector<float> full(d), part(32);
    kv_kivi_dequantize_k_row(q.data(), group, d, 5, 0, d, full.data());
    kv_kivi_dequantize_k_row(q.data(), group, d, 5, 32, 32, part.data());
    for (int64_t i = 0; i < 32; ++i) EXPECT_EQ(part[i], full[32 + i]);
  }
}

// Why K is quantized per channel: on data with outlier channels, q4_0's per-token blocks waste
// their 16 levels on the outliers; per-channel groups give every channel its own range.
TEST(KvKivi, PerChannelBeatsPerTokenOnOutlierChannels) {
  const int64_t group = 64, d = 192;
  std::vector<float> x = k_like(group, d, 11);
  std::vector<uint8_t> q(d * (4 + group / 2));
  kv_kivi_quantize_k_group(x.data(), group, d, q.data());
  std::vector<uint8_t> blk(row_bytes(DType::Q4_0, d));
  std::vector<float> a(d), b(d);
  double err_channel = 0, err_token = 0;
  for (int64_t t = 0; t < group; ++t) {
    kv_kivi_dequantize_k_row(q.data(), group, d, t, 0, d, a.data());
    kernels::quantize_row(DType::Q4_0, x.data() + t * d, blk.data(), d);
    kernels::dequantize_row(DType::Q4_0, blk.data(), b.data(), d);
    for (int64_t c = 0; c < d; ++c) {
      err_channel += std::pow(a[c] - x[t * d + c], 2);
      err_token += std::pow(b[c] - x[t * d + c], 2);
    }
  }
  std::printf("  K-like data, squared error: per channel (KIVI) %.3f, per token (q4_0) %.3f\n",
              err_channel, err_token);
  EXPECT_LT(err_channel, 0.5 * err_token);
}

constexpr SeqId kSeq = 0;

// A one-sequence cache as Session holds it (kv_seq_config): blocks of one K group, one residual
// slot.
std::unique_ptr<KvManager> seq_cache(const KvShape& s, int64_t n_ctx,
                                     KvAlloc alloc = KvAlloc::Static) {
  auto kv = std::make_unique<KvManager>(kv_seq_config(s, n_ctx, alloc, KvRope{}));
  EXPECT_TRUE(kv->admit(kSeq, {}, "", 0, KvHit{}));
  return kv;
}

KvLayerView view_of(const KvManager& kv, int32_t il, int64_t n) {
  const KvSeqCache c = kv.seq_cache(kSeq);
  return kv.store().view(il, c.blocks, n, c.kivi_slot, c.n_sealed);
}

// Reads position p of layer view v as attention sees it after a commit.
std::vector<float> read(const KvLayerView& v, bool is_k, int64_t p, int64_t d) {
  std::vector<float> out(d);
  if (p >= v.n_sealed0) {
    const uint16_t* r = (is_k ? v.k_resid : v.v_resid) + (p - v.n_sealed0) * d;
    for (int64_t c = 0; c < d; ++c) out[c] = fp16_to_fp32(r[c]);
  } else if (is_k) {
    // The group of position p starts at row(p - p % group) (KiviSealed, kv_kivi.h).
    kv_kivi_dequantize_k_row(v.k + v.row(p - p % v.kivi_group) * v.k_row_bytes, v.kivi_group, d,
                             p % v.kivi_group, 0, d, out.data());
  } else {
    kernels::dequantize_row(v.dtype_v, v.v + v.row(p) * v.v_row_bytes, out.data(), d);
  }
  return out;
}

// Feeds n_total tokens in passes of the given sizes, as Model::forward does (write, attention,
// finish_write per layer, then commit), checking the bookkeeping after every pass.
void feed(KvManager& kv, const std::vector<float>& k, const std::vector<float>& v,
          const std::vector<int64_t>& passes) {
  const KvShape& s = kv.shape();
  const int64_t d = s.kv_dim();
  for (int64_t n : passes) {
    const int64_t pos = kv.seq_tokens(kSeq);
    ASSERT_TRUE(kv.reserve(kSeq, n));
    const KvSeqCache c = kv.seq_cache(kSeq);
    for (int32_t il = 0; il < s.n_layer; ++il) {
      // Layer il's rows differ per layer so a mix-up shows.
      std::vector<float> kl(k.begin() + pos * d, k.begin() + (pos + n) * d),
          vl(v.begin() + pos * d, v.begin() + (pos + n) * d);
      for (auto& x : kl) x += static_cast<float>(il);
      kv.store().kivi_write(il, c.blocks, c.kivi_slot, c.n_sealed, pos, n, kl.data(), vl.data());
      const KvLayerView view = kv.store().view(il, c.blocks, pos + n, c.kivi_slot, c.n_sealed);
      EXPECT_EQ(view.n_sealed0, c.n_sealed);
      EXPECT_EQ(view.n_sealed1, kv_kivi_sealed(c.n_sealed, pos + n, s.kivi_residual, s.kivi_group));
      kv.store().kivi_finish_write(il, c.kivi_slot, c.n_sealed, pos, n, kl.data(), vl.data());
    }
    kv.commit(kSeq, std::vector<int32_t>(static_cast<size_t>(pos + n), 0), pos + n);
    const int64_t held = kv.seq_tokens(kSeq), sealed = kv.seq_cache(kSeq).n_sealed;
    EXPECT_EQ(sealed, kv_kivi_sealed(0, held, s.kivi_residual, s.kivi_group));
    EXPECT_EQ(sealed % s.kivi_group, 0);
    if (held >= s.kivi_residual) {
      EXPECT_GE(held - sealed, s.kivi_residual);
      EXPECT_LE(held - sealed, s.kivi_residual + s.kivi_group - 1);
    }
  }
}

TEST(KvKivi, SealingBookkeepingAndReads) {
  const KvShape s = kivi_shape(2, 2, 32, /*residual=*/5, /*group=*/32);
  const int64_t d = s.kv_dim(), n_total = 150;
  const std::vector<float> k = k_like(n_total, d, 3), v = k_like(n_total, d, 4);
  auto kv = seq_cache(s, 200);
  feed(*kv, k, v, {1, 1, 7, 40, 1, 33, 64, 3});
  ASSERT_EQ(kv->seq_tokens(kSeq), 150);
  EXPECT_EQ(kv->seq_cache(kSeq).n_sealed, 128);  // 150 - 5 = 145 -> 4 groups of 32; 22 in f16
  for (int32_t il = 0; il < 2; ++il) {
    const KvLayerView view = view_of(*kv, il, 150);
    for (int64_t p = 0; p < n_total; ++p) {
      const auto kr = read(view, true, p, d), vr = read(view, false, p, d);
      for (int64_t c = 0; c < d; ++c) {
        const float ek = f16_round(k[p * d + c] + static_cast<float>(il)), ev = v[p * d + c];
        if (p >= 128) {  // the residual: exact f16
          ASSERT_EQ(kr[c], ek) << il << " " << p;
          ASSERT_EQ(vr[c], ev) << il << " " << p;
        } else {  // sealed: within the 4-bit step of the channel (K) or the block (V)
          float lo = 1e30f, hi = -1e30f, amax = 0;
          for (int64_t t = p / 32 * 32; t < p / 32 * 32 + 32; ++t) {
            const float x = f16_round(k[t * d + c] + static_cast<float>(il));
            lo = std::min(lo, x), hi = std::max(hi, x);
          }
          for (int64_t b = c / 32 * 32; b < c / 32 * 32 + 32; ++b) amax = std::max(amax, std::fabs(v[p * d + b]));
          ASSERT_LE(std::fabs(kr[c] - ek), 0.51f * (hi - lo) / 15 + 1e-6f) << il << " " << p;
          ASSERT_LE(std::fabs(vr[c] - ev), 1.01f * amax / 8 + 1e-6f) << il << " " << p;
        }
      }
    }
  }
}

// The bytes a KIVI cache stores depend only on the tokens, not on how they were split into passes
// (prefill in one go, decode one by one, or chunks) or on a dynamic cache's growth: the basis of
// prefill == decode.
TEST(KvKivi, StoredBytesIndependentOfPasses) {
  for (int32_t residual : {0, 3, 40}) {
    const KvShape s = kivi_shape(2, 1, 64, residual, 32, DType::Q8_0);
    const int64_t d = s.kv_dim(), n_total = 300;
    const std::vector<float> k = k_like(n_total, d, 5), v = k_like(n_total, d, 6);
    auto a = seq_cache(s, n_total), b = seq_cache(s, n_total, KvAlloc::Dynamic),
         c = seq_cache(s, n_total);
    feed(*a, k, v, {n_total});
    feed(*b, k, v, std::vector<int64_t>(n_total, 1));
    feed(*c, k, v, {31, 2, 64, 33, 170});
    const int64_t sealed = a->seq_cache(kSeq).n_sealed;
    ASSERT_GE(sealed, 256);  // sealed groups in both of the dynamic cache's chunks (300 > 256)
    for (const KvManager* o : {b.get(), c.get()}) {
      ASSERT_EQ(o->seq_cache(kSeq).n_sealed, sealed);
      for (int32_t il = 0; il < 2; ++il) {
        const KvLayerView va = view_of(*a, il, n_total), vo = view_of(*o, il, n_total);
        for (int64_t g0 = 0; g0 < sealed; g0 += 32)
          ASSERT_EQ(std::memcmp(va.k + va.row(g0) * va.k_row_bytes,
                                vo.k + vo.row(g0) * vo.k_row_bytes, va.kivi_group_bytes), 0)
              << residual << " group " << g0;
        for (int64_t p = 0; p < sealed; ++p)
          ASSERT_EQ(std::memcmp(va.v + va.row(p) * va.v_row_bytes,
                                vo.v + vo.row(p) * vo.v_row_bytes, va.v_row_bytes), 0)
              << residual << " position " << p;
        EXPECT_EQ(std::memcmp(va.k_resid, vo.k_resid, (n_total - sealed) * d * 2), 0) << residual;
        EXPECT_EQ(std::memcmp(va.v_resid, vo.v_resid, (n_total - sealed) * d * 2), 0) << residual;
      }
    }
  }
}

TEST(KvKivi, TruncateWithinTheResidualAndRelease) {
  const KvShape s = kivi_shape(1, 1, 32, 4, 32);
  const int64_t d = s.kv_dim();
  const std::vector<float> k = k_like(100, d, 8), v = k_like(100, d, 9);
  auto kv = seq_cache(s, 100);
  feed(*kv, k, v, {50});
  ASSERT_EQ(kv->seq_cache(kSeq).n_sealed, 32);
  kv->truncate(kSeq, 40);  // 8 f16 tokens remain: fewer than residual + group, nothing more seals
  EXPECT_EQ(kv->seq_tokens(kSeq), 40);
  EXPECT_EQ(kv->seq_cache(kSeq).n_sealed, 32);
  EXPECT_THROW(kv->truncate(kSeq, 31), Error);  // sealed tokens cannot return to f16
  feed(*kv, k, v, {10});  // positions 40..49 again
  EXPECT_EQ(kv->seq_tokens(kSeq), 50);
  const KvLayerView view = view_of(*kv, 0, 50);
  for (int64_t p = 32; p < 50; ++p) EXPECT_EQ(read(view, true, p, d)[0], f16_round(k[p * d]));
  kv->release(kSeq, {}, 0, false);
  ASSERT_TRUE(kv->admit(kSeq, {}, "", 0, KvHit{}));
  EXPECT_EQ(kv->seq_tokens(kSeq), 0);
  EXPECT_EQ(kv->seq_cache(kSeq).n_sealed, 0);
}

TEST(KvKivi, RefusalsAreErrors) {
  KvShape s = kivi_shape(1, 1, 32, 4, 64);
  s.dtype_k = DType::F16;
  EXPECT_THROW(validate(s), Error);  // K must be the 4-bit per-channel format
  s.dtype_k = DType::Q4_0;
  s.kivi_group = 48;
  EXPECT_THROW(validate(s), Error);
  s.kivi_group = 64;
  validate(s);
  // K per channel has no q4_0 blocks: any even head_dim, n_kv_head x head_dim a multiple of 32
  // (a group's bytes divide into its rows); V keeps its type's rule.
  validate(kivi_shape(1, 2, 16, 4, 64, DType::F16));
  EXPECT_THROW(validate(kivi_shape(1, 2, 16, 4, 64, DType::Q4_0)), Error);
  EXPECT_THROW(validate(kivi_shape(1, 1, 16, 4, 64, DType::F16)), Error);
  EXPECT_THROW(validate(kivi_shape(1, 32, 15, 4, 64, DType::F16)), Error);
  auto kv = seq_cache(s, 100);
  const std::vector<float> k = k_like(10, 32, 1);
  feed(*kv, k, k, {10});
  EXPECT_THROW((void)kv->evict(kSeq, 0, 2), Error);  // no eviction with KIVI
}

}  // namespace
}  // namespace kvlm
