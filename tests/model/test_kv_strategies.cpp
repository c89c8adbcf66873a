// Differential test: one model and prompt through every cache strategy, with the contiguous f32
// cache as the reference. f32 layouts must match exactly; reduced-precision caches within the
// stated bounds (measured values are printed so a regression shows its size).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "engine/session.h"
#include "model/model.h"
#include "sampling/sampler.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace kvlm {
namespace {

ThreadPool& pool() {
  static ThreadPool p(2);
  return p;
}

struct Metrics {
  double max_abs = 0;   // max |dlogit| over all positions and tokens
  double mean_kl = 0;   // mean over positions of KL(p_ref || p)
  double max_kl = 0;
  int top1_agree = 0;
  int positions = 0;
};

Metrics compare(std::span<const float> ref, std::span<const float> got, int32_t V) {
  Metrics m;
  m.positions = static_cast<int>(ref.size() / V);
  for (int i = 0; i < m.positions; ++i) {
    auto r = ref.subspan(i * V, V), g = got.subspan(i * V, V);
    double mr = *std::max_element(r.begin(), r.end()), mg = *std::max_element(g.begin(), g.end());
    double zr = 0, zg = 0;
    for (int t = 0; t < V; ++t) {
      zr += std::exp(r[t] - mr);
      zg += std::exp(g[t] - mg);
      m.max_abs = std::max(m.max_abs, std::fabs(double{r[t]} - g[t]));
    }
    double kl = 0;
    for (int t = 0; t < V; ++t) {
      const double lr = r[t] - mr - std::log(zr), lg = g[t] - mg - std::log(zg);
      kl += std::exp(lr) * (lr - lg);
    }
    m.mean_kl += kl / m.positions;
    m.max_kl = std::max(m.max_kl, kl);
    m.top1_agree += argmax(r.data(), V) == argmax(g.data(), V);
  }
  return m;
}

struct Bound {
  DType k, v;
  double max_mean_kl;  // bound on the mean KL(f32 || this), nats
  double min_top1;     // fraction of positions whose argmax matches f32
};

// Bounds, from measurements on SmolLM2-135M (printed by the test; 2026-11-23: f16 5.6e-3, q8_0
// 6.9e-3, q4_1 0.11, q4_0 0.22 mean KL) with ~2-3x headroom. The floor is not f16's rounding
// (2^-11 relative) but the 8-bit activation quantization of the Q4_1 matmuls (as in llama.cpp):
// any perturbation flips some 8-bit codes and 30 layers amplify it to ~5e-3 nats, the same
// order as llama.cpp's own batched-vs-incremental difference (KL up to 0.022, golden file).
// Above that floor q4_x caches show their real loss.
const Bound kBounds[] = {
    {DType::F16, DType::F16, 0.015, 0.90},  {DType::F32, DType::F16, 0.015, 0.90},
    {DType::Q8_0, DType::Q8_0, 0.02, 0.90}, {DType::Q8_0, DType::F16, 0.02, 0.90},
    {DType::Q4_1, DType::Q4_1, 0.30, 0.75}, {DType::Q4_0, DType::Q4_0, 0.50, 0.60},
};

TEST(KvStrategies, EveryCacheTypeAgainstF32) {
  auto model = Model::load(test::model_path());
  auto tok = Tokenizer::from_gguf(model->gguf());
  const int32_t V = model->config().n_vocab;
  const auto ids = tok->encode(
      "The key-value cache stores, for every layer and every past token, the attention keys and "
      "values, so that decoding a new token only computes one row of attention instead of "
      "recomputing the whole prefix. Its size grows linearly with the context length.",
      false, true);
  Session ref(*model, DType::F32, DType::F32, 256, pool());
  auto r = ref.feed_all_logits(ids);
  std::vector<float> ref_logits(r.begin(), r.end());

  // The same f32 layout through a second session is bit-identical.
  Session again(*model, DType::F32, DType::F32, 256, pool());
  auto a = again.feed_all_logits(ids);
  EXPECT_TRUE(std::equal(a.begin(), a.end(), ref_logits.begin()));

  for (const Bound& b : kBounds) {
    Session s(*model, b.k, b.v, 256, pool());
    auto got = s.feed_all_logits(ids);
    Metrics m = compare(ref_logits, got, V);
    std::printf("  K %-4s V %-4s: mean KL %.2e, max KL %.2e, max |dlogit| %.3f, top-1 %d/%d\n",
                dtype_name(b.k), dtype_name(b.v), m.mean_kl, m.max_kl, m.max_abs, m.top1_agree,
                m.positions);
    EXPECT_LE(m.mean_kl, b.max_mean_kl) << dtype_name(b.k) << "/" << dtype_name(b.v);
    EXPECT_GE(m.top1_agree, b.min_top1 * m.positions) << dtype_name(b.k) << "/" << dtype_name(b.v);
  }
}

// Cached decoding equals recomputation for a quantized cache too: both paths store and read the
// same quantized rows.
TEST(KvStrategies, QuantizedCacheDecodeEqualsPrefill) {
  // SmolLM2 (head_dim 64): quantized blocks of 32 must not straddle heads, so the tiny models
  // (head_dim 16) cannot hold these types.
  auto m = Model::load(test::model_path());
  const int32_t V = m->config().n_vocab;
  std::vector<int32_t> ids = {504, 3575, 282, 4649, 314, 7042, 28, 284, 260, 3575, 282, 3521};
  for (DType t : {DType::Q8_0, DType::Q4_0, DType::Q4_1}) {
    Session batch(*m, t, t, 64, pool());
    auto all = batch.feed_all_logits(ids);
    std::vector<float> batched(all.begin(), all.end());
    Session single(*m, t, t, 64, pool(), /*n_batch=*/1);
    for (size_t i = 0; i < ids.size(); ++i) {
      auto l = single.feed(std::span<const int32_t>(&ids[i], 1));
      for (int32_t v = 0; v < V; ++v)
        ASSERT_EQ(l[v], batched[i * V + v]) << dtype_name(t) << " position " << i;
    }
  }
}

// ---- KIVI (docs/KV.md "KIVI") --------------------------------------------------------------------

// Long enough (~400 tokens) that most of it is sealed into 4-bit groups of 64 tokens: on the
// 45-token prompt above a KIVI cache would hold everything in f16.
constexpr const char* kLongText =
    "A language model writes one token at a time. To choose the next token it attends to every "
    "token before it, and for that it needs, in every layer, a key and a value vector for each "
    "earlier position. Computing them again at every step would repeat almost all of the work, so "
    "inference engines keep them in a cache, the key-value cache. Its size is the product of the "
    "number of layers, the number of key-value heads, the head dimension, the context length and "
    "the bytes per value, and for long contexts it grows larger than the weights themselves. "
    "Quantizing the cache is therefore attractive: storing four bits per value instead of sixteen "
    "cuts the memory by almost four times and lets a server hold more users or longer documents. "
    "The difficulty is that keys and values behave differently. Keys have a few channels whose "
    "magnitude is much larger than the rest, and the same channels are large for every token. "
    "Values have no such structure across channels, but they are mixed by the attention weights, "
    "so the error of one token matters in proportion to how much attention it receives. A block "
    "format that shares one scale among thirty-two consecutive channels of a key must stretch its "
    "sixteen levels over the outlier channel, and the small channels in the same block lose most "
    "of their precision. Quantizing keys per channel, over a group of tokens, gives each channel "
    "its own range instead. Recent tokens receive the most attention and are also the ones still "
    "being collected into a group, which is why they are kept in full precision until a group is "
    "complete. With these two choices a four-bit cache can come close to the quality of a "
    "sixteen-bit one, while using the same memory as the simplest block formats. The idea was "
    "published as KIVI, and similar schemes are used by several inference engines today, often "
    "combined with paged memory, prefix sharing between requests, and eviction of old tokens.";

struct KiviCase {
  const char* name;
  DType k, v;
  int32_t residual;  // -1: plain rows
};

// The point of KIVI: at q4_0's bytes per sealed token, a lower KL against f32 than plain q4_0.
// Measured on SmolLM2-135M (printed below; see docs/KV.md for the numbers and the command).
TEST(KvStrategies, KiviBeatsBlockwiseQ4) {
  auto model = Model::load(test::model_path());
  auto tok = Tokenizer::from_gguf(model->gguf());
  const int32_t V = model->config().n_vocab;
  const auto ids = tok->encode(kLongText, false, true);
  ASSERT_GT(ids.size(), 350u);
  Session ref(*model, DType::F32, DType::F32, 512, pool());
  auto r = ref.feed_all_logits(ids);
  const std::vector<float> ref_logits(r.begin(), r.end());
  const int64_t late = 128;  // positions >= 128: those whose context is mostly sealed
  const std::span<const float> ref_late(ref_logits.begin() + late * V, ref_logits.end());
  const KiviCase cases[] = {
      {"f16/f16", DType::F16, DType::F16, -1},      {"q4_1/q4_1", DType::Q4_1, DType::Q4_1, -1},
      {"q4_0/q4_0", DType::Q4_0, DType::Q4_0, -1},  {"kivi r0 V q4_0", DType::Q4_0, DType::Q4_0, 0},
      {"kivi r32 V q4_0", DType::Q4_0, DType::Q4_0, 32}, {"kivi r64 V q4_0", DType::Q4_0, DType::Q4_0, 64},
  };
  std::vector<Metrics> all, tail;
  for (const KiviCase& c : cases) {
    KvOptions o;
    o.dtype_k = c.k;
    o.dtype_v = c.v;
    o.n_ctx = 512;
    o.kivi_residual = c.residual;
    Session s(*model, o, pool());
    auto got = s.feed_all_logits(ids);
    all.push_back(compare(ref_logits, got, V));
    tail.push_back(compare(ref_late, got.subspan(late * V), V));
    std::printf("  %-16s %5zu B/token: mean KL %.2e (positions >= %lld: %.2e), max KL %.2e, "
                "top-1 %d/%d\n",
                c.name, kv_bytes_per_token(s.kv_shape()), all.back().mean_kl,
                static_cast<long long>(late), tail.back().mean_kl, all.back().max_kl,
                all.back().top1_agree, all.back().positions);
  }
  const Metrics &q4_0 = all[2], &r0 = all[3], &r32 = all[4];
  // Measured 2026-11 (SmolLM2-135M Q4_1, 384 positions): f16 3.8e-3, q4_1 0.082, q4_0 0.152,
  // kivi r0 0.0113, r32 0.0084, r64 0.0073. Bounds with ~3x headroom; the comparisons are the claim.
  EXPECT_LE(r32.mean_kl, 0.025);
  EXPECT_LE(r0.mean_kl, 0.035);
  EXPECT_LT(r32.mean_kl, 0.25 * q4_0.mean_kl);
  EXPECT_LT(r0.mean_kl, 0.25 * q4_0.mean_kl);
  EXPECT_LT(tail[4].mean_kl, 0.25 * tail[2].mean_kl);  // also where almost everything is sealed
  EXPECT_LT(r0.mean_kl, all[1].mean_kl);              // and than q4_1, which takes 11% more bytes
}

// Prefill equals decode with KIVI too, bit for bit: a query at position p sees position j sealed
// iff j < kv_kivi_sealed(0, p + 1) whatever the batch, and groups seal from the same f16 rows.
TEST(KvStrategies, KiviDecodeEqualsPrefill) {
  auto m = Model::load(test::model_path());
  auto tok = Tokenizer::from_gguf(m->gguf());
  const int32_t V = m->config().n_vocab;
  auto ids = tok->encode(kLongText, false, true);
  ids.resize(150);  // residual 8, groups of 64: seals at 72 and 136 tokens
  KvOptions o;
  o.dtype_k = o.dtype_v = DType::Q4_0;
  o.n_ctx = 256;
  o.kivi_residual = 8;
  Session batch(*m, o, pool());
  auto all = batch.feed_all_logits(ids);
  const std::vector<float> batched(all.begin(), all.end());
  EXPECT_EQ(batch.n_sealed(), 128);
  for (int64_t n_batch : {1, 37}) {
    Session inc(*m, o, pool(), n_batch);
    auto got = inc.feed_all_logits(ids);
    for (size_t i = 0; i < ids.size(); ++i)
      for (int32_t v = 0; v < V; ++v)
        ASSERT_EQ(got[i * V + v], batched[i * V + v]) << "n_batch " << n_batch << " position " << i;
  }
  // Rewinding into the sealed part recomputes: the state is that of a fresh prefill.
  batch.truncate(100);
  EXPECT_EQ(batch.n_sealed(), 64);
  auto l = batch.feed(std::span<const int32_t>(ids.data() + 100, 1));
  for (int32_t v = 0; v < V; ++v) ASSERT_EQ(l[v], batched[100 * V + v]);
}

// ---- Hadamard rotation (docs/KV.md "Hadamard rotation") -------------------------------------------

// Rotation is exact up to rounding (f32 rotated ~ f32 plain) and makes the 4-bit block formats
// much better at the same bytes; with a window (shift_out un-rotates, re-RoPEs, rotates) the
// rotated cache follows the plain one.
TEST(KvStrategies, HadamardRotationImprovesQ4) {
  auto model = Model::load(test::model_path());
  auto tok = Tokenizer::from_gguf(model->gguf());
  const int32_t V = model->config().n_vocab;
  const auto ids = tok->encode(kLongText, false, true);
  Session ref(*model, DType::F32, DType::F32, 512, pool());
  auto r = ref.feed_all_logits(ids);
  const std::vector<float> ref_logits(r.begin(), r.end());
  struct Case {
    const char* name;
    DType t;
    bool rotate;
  };
  const Case cases[] = {{"f32 rotated", DType::F32, true},  {"q8_0", DType::Q8_0, false},
                        {"q8_0 rotated", DType::Q8_0, true}, {"q4_0", DType::Q4_0, false},
                        {"q4_0 rotated", DType::Q4_0, true}, {"q4_1", DType::Q4_1, false},
                        {"q4_1 rotated", DType::Q4_1, true}};
  std::vector<Metrics> m;
  for (const Case& c : cases) {
    KvOptions o;
    o.dtype_k = o.dtype_v = c.t;
    o.n_ctx = 512;
    o.rotate = c.rotate;
    Session s(*model, o, pool());
    auto got = s.feed_all_logits(ids);
    m.push_back(compare(ref_logits, got, V));
    std::printf("  %-14s mean KL %.2e, max KL %.2e, top-1 %d/%d\n", c.name, m.back().mean_kl,
                m.back().max_kl, m.back().top1_agree, m.back().positions);
  }
  EXPECT_LE(m[0].mean_kl, 0.015);             // rotation alone: rounding only
  EXPECT_LT(m[4].mean_kl, 0.5 * m[3].mean_kl);  // q4_0: the claim
  // q4_1: with GGML's quantizer rotation more than halved the KL (0.086 -> 0.038). The cache's
  // scale search (src/kv/kv_quant.h) helps the unrotated blocks most (0.061 -> 0.034 now, measured
  // 2026-12-01), so rotation now takes ~45% off: the bound is 0.65, not 0.5.
  EXPECT_LT(m[6].mean_kl, 0.65 * m[5].mean_kl);
  EXPECT_LE(m[2].mean_kl, 0.02);

  // Window + sinks over a rotated cache: eviction re-rotates K through H. The rotated f32 cache
  // must track the plain f32 one through the evictions.
  KvOptions w;
  w.dtype_k = w.dtype_v = DType::F32;
  w.window = true;
  w.n_sinks = 4;
  w.n_ctx = 4 + 128;
  w.window_chunk = 16;
  Session plain(*model, w, pool());
  w.rotate = true;
  Session rot(*model, w, pool());
  std::vector<float> a, b;
  for (size_t i = 0; i < ids.size(); i += 50) {
    const std::span<const int32_t> feed(ids.data() + i, std::min<size_t>(50, ids.size() - i));
    auto x = plain.feed_all_logits(feed);
    a.insert(a.end(), x.begin(), x.end());
    auto y = rot.feed_all_logits(feed);
    b.insert(b.end(), y.begin(), y.end());
  }
  EXPECT_GT(rot.kv_stats().n_evicted, 0);
  const Metrics mw = compare(a, b, V);
  std::printf("  window f32 rotated vs plain: mean KL %.2e\n", mw.mean_kl);
  EXPECT_LE(mw.mean_kl, 0.015);
}

}  // namespace
}  // namespace kvlm
