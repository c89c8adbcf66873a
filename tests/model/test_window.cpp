// Sliding-window attention (Mistral, Gemma 3): the layer windows read from GGUF metadata, bad
// window metadata refused at load naming the key, and the attention mask itself:
// - a sequence no longer than the window gives exactly the logits of full attention (the window
//   keeps every position, the query's own included: an off-by-one shows here);
// - with every layer windowed to W, the logits at position p depend only on the last L(W - 1) + 1
//   tokens, so running just those (at other absolute positions: RoPE is relative) gives the same
//   logits up to rounding (a window wider than W shows here);
// - cached == recomputed and prefill == decode bit for bit, across the 256-position attention
//   chunks, for any feed size; a batch of windowed sequences == each alone.
// Models: tools/make_synthetic_gguf.py's tiny-llama weights with window metadata added.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "base/error.h"
#include "engine/scheduler.h"
#include "engine/session.h"
#include "kv/kv_shape.h"
#include "kv_manager/kv_manager.h"
#include "model/model.h"
#include "tensor/dtype.h"
#include "load_refusal.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace kvlm {
namespace {

ThreadPool& pool() {
  static ThreadPool p(2);
  return p;
}

// Logits at every position of toks, fed in pieces of `step` tokens through a Session.
std::vector<float> all_logits(const Model& m, const std::vector<int32_t>& toks, int step) {
  KvOptions o;
  o.dtype_k = o.dtype_v = DType::F32;
  o.n_ctx = static_cast<int64_t>(toks.size());
  Session s(m, o, pool(), step);
  const auto l = s.feed_all_logits(toks);
  return {l.begin(), l.end()};
}

TEST(Window, LayerWindowsFromMetadata) {
  EXPECT_EQ(Model::load(test::data_path("tiny-llama-swa.gguf"))->config().layer_window,
            (std::vector<int32_t>{24, 0}));  // pattern 2: every 2nd layer attends to everything
  EXPECT_EQ(Model::load(test::data_path("tiny-llama-swa-all.gguf"))->config().layer_window,
            (std::vector<int32_t>{8, 8}));
  EXPECT_EQ(Model::load(test::data_path("tiny-llama.gguf"))->config().layer_window,
            (std::vector<int32_t>{0, 0}));
}

TEST(Window, InconsistentMetadataIsRefusedNamingTheKey) {
  const std::pair<const char*, const char*> cases[] = {
      {"tiny-swa-bad-window0.gguf", "'llama.attention.sliding_window' = 0"},
      {"tiny-swa-bad-window-past-ctx.gguf", "'llama.attention.sliding_window' = 129"},
      {"tiny-swa-bad-pattern-past-layers.gguf", "'llama.attention.sliding_window_pattern' = 3"},
      {"tiny-swa-bad-pattern-without-window.gguf", "'llama.attention.sliding_window' is missing"},
  };
  test::expect_loads_refused(cases);
}

TEST(Window, WithinTheWindowEqualsFullAttention) {
  auto full = Model::load(test::data_path("tiny-llama.gguf"));
  auto swa = Model::load(test::data_path("tiny-llama-swa.gguf"));  // same weights, window 24
  const auto toks = test::random_tokens(40, full->config().n_vocab, 5);
  const auto a = all_logits(*full, toks, 512), b = all_logits(*swa, toks, 512);
  const size_t V = full->config().n_vocab;
  // Positions 0..23 see at most 24 positions: identical bits. From 24 on the window drops
  // position 0 and the logits move.
  EXPECT_TRUE(std::equal(a.begin(), a.begin() + 24 * V, b.begin()));
  for (size_t p = 24; p < 40; ++p)
    EXPECT_FALSE(std::equal(a.begin() + p * V, a.begin() + (p + 1) * V, b.begin() + p * V)) << p;
}

TEST(Window, LogitsDependOnlyOnTheReceptiveField) {
  auto m = Model::load(test::data_path("tiny-llama-swa-all.gguf"));  // 2 layers, window 8
  const size_t V = m->config().n_vocab, R = 2 * (8 - 1) + 1;           // 15 tokens
  const auto toks = test::random_tokens(300, static_cast<int32_t>(V), 9);
  const auto whole = all_logits(*m, toks, 512);
  double worst = 0;
  for (size_t p : {size_t{20}, size_t{100}, size_t{257}, size_t{299}}) {
    const std::vector<int32_t> tail(toks.begin() + (p + 1 - R), toks.begin() + p + 1);
    const auto alone = all_logits(*m, tail, 512);
    for (size_t v = 0; v < V; ++v)
      worst = std::max(worst, std::fabs(double(whole[p * V + v]) - alone[(R - 1) * V + v]));
    // One token fewer leaves the receptive field short: the logits move by far more.
    const std::vector<int32_t> short_tail(tail.begin() + 1, tail.end());
    const auto cut = all_logits(*m, short_tail, 512);
    double moved = 0;
    for (size_t v = 0; v < V; ++v)
      moved = std::max(moved, std::fabs(double(whole[p * V + v]) - cut[(R - 2) * V + v]));
    EXPECT_GT(moved, 1e-2) << p;
  }
  // The same tokens at other absolute positions: RoPE's angles round differently (measured
  // ~1e-6 on these logits of magnitude ~1).
  std::printf("receptive-field run vs whole sequence: max |dlogit| %.3g\n", worst);
  EXPECT_LT(worst, 1e-4);
}

TEST(Window, PrefillEqualsDecodeAcrossChunks) {
  auto m = Model::load(test::data_path("tiny-llama-swa.gguf"));
  const auto toks = test::random_tokens(300, m->config().n_vocab, 3);
  const auto one_pass = all_logits(*m, toks, 512);
  for (int step : {1, 7, 100})
    EXPECT_EQ(all_logits(*m, toks, step), one_pass) << "fed " << step << " tokens at a time";
  // Recomputation (the no-cache baseline) agrees too.
  KvOptions o;
  o.dtype_k = o.dtype_v = DType::F32;
  o.n_ctx = 300;
  Session s(*m, o, pool());
  s.feed(std::span<const int32_t>(toks.data(), 299));
  const auto l = s.recompute(std::span<const int32_t>(toks.data() + 299, 1));
  EXPECT_TRUE(std::equal(l.begin(), l.end(), one_pass.end() - m->config().n_vocab));
}

// Three windowed sequences at different depths (one prefilling a chunk, two decoding) in one
// forward pass: each gets exactly the logits it gets alone.
TEST(Window, BatchedEqualsAlone) {
  auto m = Model::load(test::data_path("tiny-llama-swa.gguf"));
  const int32_t V = m->config().n_vocab;
  KvManager kv({.shape = m->kv_shape(DType::F16, DType::F16), .block_size = 16, .n_blocks = 64,
                .prefix_cache = false, .rope = m->kv_rope()});
  const int lens[] = {30, 270, 90};
  std::vector<std::vector<int32_t>> toks;
  Scratch scratch;
  for (int i = 0; i < 3; ++i) {
    toks.push_back(test::random_tokens(lens[i] + 20, V, 40 + i));
    ASSERT_TRUE(kv.admit(i, toks[i], "", lens[i] + 20, KvHit{}));
    ASSERT_TRUE(kv.reserve(i, lens[i]));
    const BatchSeq q{{toks[i].data(), static_cast<size_t>(lens[i])}, 0, kv.seq_caches(i)};
    m->forward({&q, 1}, kv.store(), scratch, pool());
  }
  const int64_t fed[] = {1, 1, 20};
  std::vector<BatchSeq> batch;
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(kv.reserve(i, fed[i]));
    batch.push_back({{toks[i].data() + lens[i], static_cast<size_t>(fed[i])}, lens[i],
                     kv.seq_caches(i)});
  }
  const auto got = m->forward(batch, kv.store(), scratch, pool());
  for (int i = 0; i < 3; ++i) {
    const std::vector<int32_t> upto(toks[i].begin(), toks[i].begin() + lens[i] + fed[i]);
    KvOptions o;
    o.n_ctx = lens[i] + fed[i];  // f16, as the batch's cache
    Session s(*m, o, pool());
    const auto want = s.feed(upto);
    EXPECT_TRUE(std::equal(want.begin(), want.end(), got.begin() + i * V)) << "sequence " << i;
  }
}

// One pass of feed at pos through sequence 0 of each of two caches (room reserved first), each
// with its own scratch: got[i] cache i's logits. toks non-empty: commits [0, pos + feed) of them.
void forward_both(const Model& m, KvManager* const (&kv)[2], std::span<const int32_t> feed,
                  int64_t pos, Scratch (&sc)[2], std::vector<float> (&got)[2],
                  std::span<const int32_t> toks = {}) {
  const auto n = static_cast<int64_t>(feed.size());
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(kv[i]->reserve(0, n));
    const BatchSeq q{feed, pos, kv[i]->seq_caches(0), true};
    const auto l = m.forward({&q, 1}, kv[i]->store(), sc[i], pool());
    got[i].assign(l.begin(), l.end());
    if (!toks.empty()) kv[i]->commit(0, toks, pos + n);
  }
}

// Per-layer cache groups: the window layer's group gives back the blocks its window no longer
// sees, and the logits stay those of a cache that keeps every block (the window only masked),
// bit for bit, through prefill chunks and decode steps; a truncation into released blocks is
// refused and the Session recomputes instead.
TEST(Window, GroupsReleaseBlocksAndKeepTheLogits) {
  auto m = Model::load(test::data_path("tiny-llama-swa.gguf"));  // layer 0: window 24
  const auto toks = test::random_tokens(700, m->config().n_vocab, 11);
  const KvShape shape = m->kv_shape(DType::F16, DType::F16);
  KvManager grouped(kv_seq_config(shape, 700, KvAlloc::Static, m->kv_rope(),
                                  m->config().layer_window, 37));
  KvManager flat(kv_seq_config(shape, 700, KvAlloc::Static, m->kv_rope()));
  ASSERT_EQ(grouped.n_groups(), 2);
  ASSERT_EQ(flat.n_groups(), 1);
  Scratch sc[2];
  KvManager* const both[2] = {&grouped, &flat};
  for (KvManager* kv : both) ASSERT_TRUE(kv->admit(0, {}, "", 0, KvHit{}));
  int64_t pos = 0;
  for (int step = 0; pos < 700; ++step) {
    const int64_t n = std::min<int64_t>(step < 10 ? 37 : 1, 700 - pos);  // chunks, then decode
    const std::span<const int32_t> feed(toks.data() + pos, static_cast<size_t>(n));
    std::vector<float> got[2];
    forward_both(*m, both, feed, pos, sc, got, toks);
    ASSERT_EQ(got[0], got[1]) << "positions [" << pos << ", " << pos + n << ")";
    pos += n;
    // The window group (group 1) holds the blocks of the last 24 + 37 positions at most.
    const KvManagerStats st = grouped.stats();
    ASSERT_EQ(st.groups[1].window, 24);
    EXPECT_LE(st.groups[1].blocks.n_used, kv_window_blocks(24, 37, 700, 16));
    EXPECT_EQ(st.groups[0].blocks.n_used, (pos + 15) / 16);  // the full group keeps every block
  }
  EXPECT_LT(grouped.stats().bytes_used, flat.stats().bytes_used * 3 / 4);
  EXPECT_FALSE(grouped.can_truncate(0, 300));  // its window's blocks were released
  EXPECT_TRUE(grouped.can_truncate(0, 695));  // its window (from 672) still held
  EXPECT_THROW(grouped.truncate(0, 300), Error);
}

// A Session of a windowed model generating 10,000 tokens: the window group's memory stays at its
// bound the whole time; truncating back recomputes (the window's blocks were released) and gives
// the same logits as feeding the prefix fresh.
TEST(Window, SessionMemoryStaysBoundedOverALongGeneration) {
  auto m = Model::load(test::data_path("tiny-llama-swa-all.gguf"));  // every layer: window 8
  KvOptions o;
  o.n_ctx = 10000;
  Session s(*m, o, pool(), 64);
  ASSERT_EQ(s.kv().n_groups(), 1);
  const auto toks = test::random_tokens(10000, m->config().n_vocab, 13);
  s.feed(std::span<const int32_t>(toks.data(), 100));
  const int64_t bound = kv_window_blocks(8, 64, 10000, 16);
  for (int64_t p = 100; p < 10000; ++p) {
    s.feed(std::span<const int32_t>(toks.data() + p, 1));
    if (p % 1000 == 0) {
      ASSERT_LE(s.kv().stats().groups[0].blocks.n_used, bound) << p;
    }
  }
  EXPECT_EQ(s.n_cached(), 10000);
  EXPECT_LE(s.kv_stats().bytes_used, static_cast<size_t>(bound) * 16 * 2 * kv_bytes_per_token(
                                                                              s.kv_shape()));
  s.truncate(5000);  // recomputed: the window of position 5000 was released long ago
  const auto after = s.feed(std::span<const int32_t>(toks.data() + 5000, 1));
  std::vector<float> want_vec;
  {
    Session fresh(*m, o, pool(), 64);
    const auto w = fresh.feed(std::span<const int32_t>(toks.data(), 5001));
    want_vec.assign(w.begin(), w.end());
  }
  EXPECT_TRUE(std::equal(want_vec.begin(), want_vec.end(), after.begin()));
}

// Runs toks through a grouped and a flat (one group, every block kept, the window only masked)
// cache of m, evicting [4, 4 + count) from both whenever n_ctx would overflow: the logits stay
// equal bit for bit, and the window group stays within its bound.
void evict_grouped_like_flat(const Model& m, int64_t n_ctx, int64_t count) {
  const int64_t n_total = 300;
  const auto toks = test::random_tokens(n_total, m.config().n_vocab, 21);
  const KvShape shape = m.kv_shape(DType::F16, DType::F16);
  KvManager grouped(kv_seq_config(shape, n_ctx, KvAlloc::Static, m.kv_rope(),
                                  m.config().layer_window, 16));
  KvManager flat(kv_seq_config(shape, n_ctx, KvAlloc::Static, m.kv_rope()));
  ASSERT_GE(grouped.n_groups(), 1);
  Scratch sc[2];
  KvManager* const both[2] = {&grouped, &flat};
  for (KvManager* kv : both) ASSERT_TRUE(kv->admit(0, {}, "", 0, KvHit{}));
  int n_evictions = 0;
  for (int64_t i = 0, step = 0; i < n_total; ++step) {
    const int64_t n = std::min<int64_t>(step < 4 ? 16 : 1, n_total - i);
    if (grouped.seq_tokens(0) + n > n_ctx) {
      for (KvManager* kv : {&grouped, &flat}) ASSERT_TRUE(kv->evict(0, 4, count));
      ++n_evictions;
    }
    const int64_t pos = grouped.seq_tokens(0);
    const std::span<const int32_t> feed(toks.data() + i, static_cast<size_t>(n));
    std::vector<float> got[2];
    forward_both(m, both, feed, pos, sc, got);
    ASSERT_EQ(got[0], got[1]) << "tokens [" << i << ", " << i + n << ") at " << pos;
    i += n;
    for (size_t gi = 0; gi < static_cast<size_t>(grouped.n_groups()); ++gi) {
      const KvGroupStats st = grouped.stats().groups[gi];  // a copy: stats() is a temporary
      if (st.window > 0) {
        EXPECT_LE(st.blocks.n_used, kv_window_blocks(st.window, 16, n_ctx, 16));
      }
    }
  }
  EXPECT_GE(n_evictions, 3);
  grouped.check_invariants();
}

TEST(Window, GroupsEvictLikeAFlatCache) {
  for (const char* name : {"tiny-llama-swa.gguf", "tiny-gemma3.gguf", "tiny-llama-swa-all.gguf"}) {
    SCOPED_TRACE(name);
    auto m = Model::load(test::data_path(name));
    evict_grouped_like_flat(*m, 100, 40);  // 100 - 40 = 60 >= 4 + window - 1 for each
    evict_grouped_like_flat(*m, 64, 7);    // not on a block boundary
  }
}

// KIVI with per-layer cache groups: the window groups seal their held blocks like full ones and
// never seal a block they released, so a grouped KIVI cache gives bit for bit the logits of a
// one-group KIVI cache that keeps every block (the window only masked), through prefill chunks
// and several hundred decode steps across blocks of 64 and the windows, for residuals of 0 and 32.
void kivi_grouped_like_flat(const Model& m, int32_t residual) {
  const int64_t n_total = 600;
  const auto toks = test::random_tokens(n_total, m.config().n_vocab, 23);
  KvShape shape = m.kv_shape(DType::Q4_0, DType::F16);
  shape.kivi_residual = residual;
  KvManager grouped(kv_seq_config(shape, n_total, KvAlloc::Static, m.kv_rope(),
                                  m.config().layer_window, 37));
  KvManager flat(kv_seq_config(shape, n_total, KvAlloc::Static, m.kv_rope()));
  ASSERT_GT(grouped.stats().groups.back().window, 0);
  Scratch sc[2];
  KvManager* const both[2] = {&grouped, &flat};
  for (KvManager* kv : both) ASSERT_TRUE(kv->admit(0, {}, "", 0, KvHit{}));
  int64_t pos = 0;
  for (int step = 0; pos < n_total; ++step) {
    const int64_t n = std::min<int64_t>(step < 6 ? 37 : 1, n_total - pos);
    const std::span<const int32_t> feed(toks.data() + pos, static_cast<size_t>(n));
    std::vector<float> got[2];
    forward_both(m, both, feed, pos, sc, got, toks);
    ASSERT_EQ(got[0], got[1]) << "positions [" << pos << ", " << pos + n << ")";
    pos += n;
  }
  const KvManagerStats st = grouped.stats();
  for (const KvGroupStats& gs : st.groups) {
    if (gs.window > 0) {
      EXPECT_LE(gs.blocks.n_used, kv_window_blocks(gs.window, 37, n_total, 64));
    }
  }
  EXPECT_LT(st.bytes_used, flat.stats().bytes_used);
  EXPECT_GT(grouped.seq_cache(0).n_sealed, 500 - residual);
  grouped.check_invariants();
}

TEST(Window, KiviGroupsGiveTheLogitsOfAFlatKiviCache) {
  for (const char* name : {"tiny-llama-swa.gguf", "tiny-gemma3.gguf", "tiny-llama-swa-all.gguf"}) {
    auto m = Model::load(test::data_path(name));
    for (int32_t residual : {0, 32}) {
      SCOPED_TRACE(testing::Message() << name << " residual " << residual);
      kivi_grouped_like_flat(*m, residual);
    }
  }
}

// Layer 0's K depends on its token and position alone, so after an eviction its moved rows must
// equal a fresh computation of the tokens that remain, up to f16 rounding: Gemma 3's layer 0 is a
// window layer rotating with base 10,000, the file's base is 1,000,000. Re-rotating with the
// file's base (one base for every layer) misses by far more.
TEST(Window, EvictionReRotatesEachLayerWithItsOwnBase) {
  auto m = Model::load(test::data_path("tiny-gemma3.gguf"));
  ASSERT_GT(m->config().window(0), 0);
  ASSERT_NE(m->config().rope_base(0), m->config().rope_freq_base);
  const KvShape shape = m->kv_shape(DType::F16, DType::F16);
  auto toks = test::random_tokens(100, m->config().n_vocab, 5);
  // Layer 0's K rows of positions [lo, n) after evicting [4, 64) from 100, with rope `r`.
  const int64_t n = 40, lo = n - m->config().window(0) + 1;
  auto moved_rows = [&](const KvRope& r) {
    KvManager kv(kv_seq_config(shape, 128, KvAlloc::Static, r, m->config().layer_window, 100));
    Scratch sc;
    EXPECT_TRUE(kv.admit(0, {}, "", 0, KvHit{}));
    EXPECT_TRUE(kv.reserve(0, 100));
    const BatchSeq q{toks, 0, kv.seq_caches(0), true};
    m->forward({&q, 1}, kv.store(), sc, pool());
    EXPECT_TRUE(kv.evict(0, 4, 60));
    std::vector<std::byte> k(size_t(n - lo) * kv_k_row_bytes(shape)), v(k.size());
    kv.store().read_rows(0, kv.seq_caches(0)[1].blocks, lo, n - lo, k.data(), v.data());
    return k;
  };
  std::vector<int32_t> kept(toks.begin(), toks.begin() + 4);
  kept.insert(kept.end(), toks.begin() + 64, toks.end());
  KvManager fresh(kv_seq_config(shape, 128, KvAlloc::Static, m->kv_rope()));
  Scratch sc;
  ASSERT_TRUE(fresh.admit(0, {}, "", 0, KvHit{}));
  ASSERT_TRUE(fresh.reserve(0, n));
  const BatchSeq q{kept, 0, fresh.seq_caches(0), true};
  m->forward({&q, 1}, fresh.store(), sc, pool());
  std::vector<std::byte> want(size_t(n - lo) * kv_k_row_bytes(shape)), v(want.size());
  fresh.store().read_rows(0, fresh.seq_caches(0)[0].blocks, lo, n - lo, want.data(), v.data());
  auto max_diff = [&](const std::vector<std::byte>& got) {
    const auto* a = reinterpret_cast<const uint16_t*>(got.data());
    const auto* b = reinterpret_cast<const uint16_t*>(want.data());
    float d = 0, top = 0;
    for (size_t i = 0; i < got.size() / 2; ++i) {
      d = std::max(d, std::fabs(fp16_to_fp32(a[i]) - fp16_to_fp32(b[i])));
      top = std::max(top, std::fabs(fp16_to_fp32(b[i])));
    }
    return d / top;
  };
  KvRope one_base = m->kv_rope();
  one_base.layer_freq_base.clear();
  const float own = max_diff(moved_rows(m->kv_rope())), wrong = max_diff(moved_rows(one_base));
  // Measured: 6.8e-4 with each layer's base (two f16 roundings), 1.39 with one base for all.
  EXPECT_LT(own, 2e-3f) << "relative to the largest |K|";
  EXPECT_GT(wrong, 0.1f);
}

// Session: --keep and the window policy run on windowed models as long as an eviction leaves
// kept + window positions (Eviction::reach); a context too small for that is refused up front.
TEST(Window, SessionEvictsOnWindowedModelsWithRoomForTheWindow) {
  auto m = Model::load(test::data_path("tiny-llama-swa-all.gguf"));  // every layer: window 8
  KvOptions o;
  o.n_ctx = 10;
  o.n_keep = 4;  // 4 + 8 > 10
  EXPECT_THROW(Session(*m, o, pool()), Error);
  o.n_ctx = 12;
  Session s(*m, o, pool(), 16);
  const auto toks = test::random_tokens(200, m->config().n_vocab, 3);
  for (int64_t i = 0; i < 200; i += 5)
    s.feed(std::span<const int32_t>(toks.data() + i, 5));
  EXPECT_LE(s.n_cached(), 12);
  EXPECT_GT(s.kv_stats().n_evicted, 150);
}

}  // namespace
}  // namespace kvlm
