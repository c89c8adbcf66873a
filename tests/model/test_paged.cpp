// Paged forward == contiguous forward: attention through a block table (scattered, out-of-order
// block ids, block sizes that do and do not divide the attention chunk) gives bit-identical logits
// to a contiguous cache (one block holding every position, so positions are rows of one run), for
// every cache type; and a batch of many sequences in one forward gives each sequence exactly the
// logits it gets alone.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "base/error.h"
#include "kv/block_pool.h"
#include "kv/paged_kv.h"
#include "model/model.h"
#include "test_util.h"

namespace kvlm {
namespace {

ThreadPool& pool() {
  static ThreadPool p(2);
  return p;
}

// The contiguous reference: one block that holds every position (rows of one run, as a contiguous
// cache lays them out), a sequence alone in a forward pass.
struct Contiguous {
  PagedKvStore store;
  const std::vector<BlockId> table = {0};
  Scratch scratch;
  int64_t n_sealed = 0;  // KIVI: positions sealed so far

  // n_tokens: the most positions it will hold (KIVI: rounded up to whole K groups).
  Contiguous(const KvShape& s, int64_t n_tokens)
      : store(s, 1, static_cast<int32_t>(s.kivi() ? (n_tokens + s.kivi_group - 1) / s.kivi_group *
                                                         s.kivi_group
                                                   : n_tokens),
              s.kivi() ? 1 : 0) {}
  // Runs toks at positions [pos, pos + n): the last token's logits.
  std::vector<float> run(const Model& m, std::span<const int32_t> toks, int64_t pos) {
    const KvShape& s = store.shape();
    const KvSeqCache c{table, s.kivi() ? 0 : -1, n_sealed};
    const BatchSeq q{toks, pos, {&c, 1}};
    const auto l = m.forward({&q, 1}, store, scratch, pool());
    if (s.kivi())
      n_sealed = kv_kivi_sealed(n_sealed, pos + static_cast<int64_t>(toks.size()), s.kivi_residual,
                                s.kivi_group);
    return {l.begin(), l.end()};
  }
};

// Block ids handed out in a scrambled order, so consecutive positions never sit in consecutive
// blocks.
std::vector<BlockId> scrambled_blocks(int32_t n_blocks, uint32_t seed) {
  std::vector<BlockId> ids(n_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937(seed));
  return ids;
}

// Prefill of `prefill` tokens then single-token decode steps, contiguous and paged; every step's
// last-token logits must be equal bit for bit.
void expect_paged_equals_contiguous(const std::string& model_file, DType dk, DType dv, int32_t bs,
                                    int n_prefill, int n_decode, bool rotate = false) {
  auto m = Model::load(model_file);
  const ModelConfig& c = m->config();
  const int n_total = n_prefill + n_decode;
  const auto toks = test::random_tokens(n_total, c.n_vocab, 7);

  KvShape shape = m->kv_shape(dk, dv);
  shape.rotate = rotate;
  Contiguous ref(shape, n_total);
  Scratch s2;
  const int32_t n_blocks = (n_total + bs - 1) / bs + 3;
  PagedKvStore store(shape, n_blocks, bs);
  const auto table = scrambled_blocks(n_blocks, 11);

  int pos = 0;
  for (int step = 0; step <= n_decode; ++step) {
    const int n = step == 0 ? n_prefill : 1;
    std::span<const int32_t> feed(toks.data() + pos, n);
    const std::vector<float> want = ref.run(*m, feed, pos);
    const KvSeqCache c{table};
    BatchSeq q{feed, pos, {&c, 1}};
    auto got = m->forward(std::span<const BatchSeq>(&q, 1), store, s2, pool());
    ASSERT_EQ(got.size(), want.size());
    ASSERT_TRUE(std::equal(want.begin(), want.end(), got.begin()))
        << "step " << step << " at position " << pos << ", block size " << bs;
    pos += n;
  }
}

TEST(Paged, EqualsContiguousEveryType) {
  // The blockwise types need head_dim % 32 == 0: SmolLM2 (64); the tiny model (16) for f32/f16.
  for (DType t : {DType::F32, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1})
    expect_paged_equals_contiguous(test::model_path(), t, t, 16, 40, 6);
  expect_paged_equals_contiguous(test::model_path(), DType::Q4_0, DType::Q4_0, 16, 40, 6, true);
  expect_paged_equals_contiguous(test::data_path("tiny-llama.gguf"), DType::F32, DType::F16, 16,
                                 40, 12);
}

TEST(Paged, EqualsContiguousOddBlockSizes) {
  // 7 does not divide the attention chunk (256); 300 tokens cross a chunk boundary.
  for (int32_t bs : {1, 7, 16, 64})
    expect_paged_equals_contiguous(test::data_path("tiny-llama.gguf"), DType::F16, DType::F16, bs,
                                   290, 20);
}

TEST(Paged, EqualsContiguousGpt2) {
  expect_paged_equals_contiguous(test::data_path("tiny-gpt2.gguf"), DType::F16, DType::F32, 16,
                                 33, 8);
}

// Eviction (the window's and context shift's shift_out) through a block table gives the rows the
// contiguous cache gives: after prefill, shift, then decode steps, the logits are equal bit for
// bit, so a window or context shift served paged continues exactly as in a Session.
void expect_paged_shift_equals_contiguous(const std::string& model_file, DType dk, DType dv,
                                          int32_t bs, int n_prefill, int begin, int count,
                                          int n_decode, bool rotate = false) {
  auto m = Model::load(model_file);
  const ModelConfig& c = m->config();
  const auto toks = test::random_tokens(n_prefill + n_decode, c.n_vocab, 9);
  KvShape shape = m->kv_shape(dk, dv);
  shape.rotate = rotate;
  Contiguous ref(shape, n_prefill + n_decode);
  Scratch s2;
  const int32_t n_blocks = (n_prefill + n_decode + bs - 1) / bs + 3;
  PagedKvStore store(shape, n_blocks, bs);
  const auto table = scrambled_blocks(n_blocks, 5);
  ref.run(*m, {toks.data(), static_cast<size_t>(n_prefill)}, 0);
  const KvSeqCache c0{table};
  BatchSeq q0{{toks.data(), static_cast<size_t>(n_prefill)}, 0, {&c0, 1}};
  m->forward(std::span<const BatchSeq>(&q0, 1), store, s2, pool());
  ref.store.shift_out(ref.table, n_prefill, begin, count, m->kv_rope());
  store.shift_out(table, n_prefill, begin, count, m->kv_rope());
  int pos = n_prefill - count;
  for (int i = 0; i < n_decode; ++i, ++pos) {
    std::span<const int32_t> feed(toks.data() + n_prefill + i, 1);
    const std::vector<float> want = ref.run(*m, feed, pos);
    const KvSeqCache c{table};
    BatchSeq q{feed, pos, {&c, 1}};
    auto got = m->forward(std::span<const BatchSeq>(&q, 1), store, s2, pool());
    ASSERT_TRUE(std::equal(want.begin(), want.end(), got.begin()))
        << "decode " << i << " after evicting [" << begin << ", " << begin + count
        << "), block size " << bs << ", K " << dtype_name(dk);
  }
}

TEST(Paged, ShiftOutEqualsContiguous) {
  // Every plain type (K re-quantized after the re-rotation), rotated rows, a shift that starts
  // inside a block and one on a block boundary, block sizes that do and do not divide the counts.
  for (DType t : {DType::F32, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1})
    expect_paged_shift_equals_contiguous(test::model_path(), t, t, 16, 70, 4, 21, 4);
  expect_paged_shift_equals_contiguous(test::model_path(), DType::Q4_0, DType::Q4_0, 16, 70, 4,
                                       21, 4, true);
  for (int32_t bs : {1, 7, 16})
    expect_paged_shift_equals_contiguous(test::data_path("tiny-llama.gguf"), DType::F16,
                                         DType::F16, bs, 90, 16, 32, 6);
  expect_paged_shift_equals_contiguous(test::data_path("tiny-gpt2.gguf"), DType::F16, DType::F32,
                                       16, 50, 0, 17, 4);  // learned positions: no re-rotation
}

// The KIVI layout paged (sealed groups and V rows in blocks, the f16 residual in a slot) gives
// the contiguous KIVI cache's logits bit for bit: prefill, then decode steps across several
// sealing points, scrambled block ids, block sizes of one and two groups.
void expect_paged_kivi_equals_contiguous(int32_t bs, int n_prefill, int n_decode, int32_t resid,
                                         DType dv) {
  auto m = Model::load(test::model_path());
  const ModelConfig& c = m->config();
  const int n_total = n_prefill + n_decode;
  const auto toks = test::random_tokens(n_total, c.n_vocab, 21);
  KvShape shape = m->kv_shape(DType::Q4_0, dv);
  shape.kivi_residual = resid;
  Contiguous ref(shape, n_total);
  Scratch s2;
  const int32_t n_blocks = (n_total + bs - 1) / bs + 2;
  PagedKvStore store(shape, n_blocks, bs, /*n_slots=*/3);
  const auto table = scrambled_blocks(n_blocks, 13);
  int pos = 0;
  int64_t n_sealed = 0;
  for (int step = 0; step <= n_decode; ++step) {
    const int n = step == 0 ? n_prefill : 1;
    std::span<const int32_t> feed(toks.data() + pos, n);
    const std::vector<float> want = ref.run(*m, feed, pos);
    const KvSeqCache c{table, /*kivi_slot=*/2, n_sealed};
    BatchSeq q{feed, pos, {&c, 1}};
    auto got = m->forward(std::span<const BatchSeq>(&q, 1), store, s2, pool());
    ASSERT_TRUE(std::equal(want.begin(), want.end(), got.begin()))
        << "step " << step << " at position " << pos << ", block size " << bs;
    pos += n;
    n_sealed = kv_kivi_sealed(n_sealed, pos, resid, shape.kivi_group);
    ASSERT_EQ(n_sealed, ref.n_sealed);
  }
  EXPECT_GE(n_sealed, 2 * shape.kivi_group);  // sealed by the prefill and by decode steps
}

TEST(Paged, KiviEqualsContiguous) {
  expect_paged_kivi_equals_contiguous(64, 100, 90, 32, DType::Q4_0);
  expect_paged_kivi_equals_contiguous(128, 40, 150, 0, DType::Q8_0);
}

// 16 sequences of different lengths, some prefilling (in chunks) and some decoding in the same
// pass, through a real BlockPool: each sequence's logits equal a run of that sequence alone.
TEST(Paged, BatchedEqualsAlone) {
  auto m = Model::load(test::data_path("tiny-llama.gguf"));
  const ModelConfig& c = m->config();
  const int32_t bs = 16, n_seqs = 16;
  const KvShape shape = m->kv_shape(DType::F16, DType::F16);
  BlockPool bp({.n_blocks = 256, .block_size = bs});
  PagedKvStore store(shape, 256, bs);
  std::vector<std::vector<int32_t>> toks(n_seqs);
  for (int i = 0; i < n_seqs; ++i) {
    toks[i] = test::random_tokens(20 + 13 * i, c.n_vocab, 100 + i);
    bp.add_seq(i);
  }
  // Reference: each sequence alone, contiguous; the logits after every fed prefix length.
  auto alone = [&](int i, int n_done, int n) {
    Contiguous kv(shape, n_done + n);
    if (n_done > 0) kv.run(*m, {toks[i].data(), static_cast<size_t>(n_done)}, 0);
    return kv.run(*m, {toks[i].data() + n_done, static_cast<size_t>(n)}, n_done);
  };
  std::vector<int> done(n_seqs, 0);
  std::vector<KvSeqCache> caches(n_seqs);  // [n_seqs] what each BatchSeq's span names
  Scratch sb;
  for (int step = 0; step < 6; ++step) {
    std::vector<BatchSeq> batch;
    std::vector<int> which, fed;
    for (int i = 0; i < n_seqs; ++i) {
      const int left = static_cast<int>(toks[i].size()) - done[i];
      if (left <= 0) continue;
      // Chunked prefill of up to 37 tokens, then one token per step.
      const int n = std::min(left, (i + step) % 3 == 0 ? 1 : 37);
      std::vector<BlockCopy> copies;
      ASSERT_TRUE(bp.append(i, n, &copies));
      ASSERT_TRUE(copies.empty());
      caches[i] = {bp.block_table(i)};
      batch.push_back(
          {{toks[i].data() + done[i], static_cast<size_t>(n)}, done[i], {&caches[i], 1}});
      which.push_back(i);
      fed.push_back(n);
    }
    ASSERT_FALSE(batch.empty());
    auto got = m->forward(batch, store, sb, pool());
    std::vector<float> logits(got.begin(), got.end());
    for (size_t b = 0; b < which.size(); ++b) {
      const int i = which[b];
      const auto want = alone(i, done[i], fed[b]);
      ASSERT_TRUE(std::equal(want.begin(), want.end(), logits.begin() + b * c.n_vocab))
          << "sequence " << i << " step " << step;
      done[i] += fed[b];
    }
  }
}

// Sequences sharing a prefix's blocks (forked tables, as for a system prompt) read the same rows
// through their own tables. Batched, each still gets exactly its logits alone: attention runs
// their shared chunk's work items back to back and reuses the rows (forward.cpp, same_rows), in
// the in-place f16 path and in the tile path of a quantized cache.
TEST(Paged, SharedPrefixBatchedEqualsAlone) {
  auto m = Model::load(test::data_path("tiny-llama.gguf"));
  const ModelConfig& c = m->config();
  for (DType t : {DType::F16, DType::F32}) {  // in place; through tiles (tiny-llama: head_dim 16)
    SCOPED_TRACE(dtype_name(t));
    const int32_t bs = 16, n_seqs = 5, n_prefix = 304;  // 19 full blocks: chunk 0 shared whole
    const KvShape shape = m->kv_shape(t, t);
    BlockPool bp({.n_blocks = 64, .block_size = bs});
    PagedKvStore store(shape, 64, bs);
    const auto prefix = test::random_tokens(n_prefix, c.n_vocab, 1);
    Scratch sb;
    bp.add_seq(0);
    std::vector<BlockCopy> copies;
    ASSERT_TRUE(bp.append(0, n_prefix, &copies));
    const KvSeqCache c0{bp.block_table(0)};
    BatchSeq first{prefix, 0, {&c0, 1}};
    m->forward(std::span<const BatchSeq>(&first, 1), store, sb, pool());
    std::vector<std::vector<int32_t>> toks(n_seqs);
    for (int i = 0; i < n_seqs; ++i) {
      if (i > 0) bp.fork(0, i);
      toks[i] = prefix;
      const auto own = test::random_tokens(6 + 4 * i, c.n_vocab, 50 + i);
      toks[i].insert(toks[i].end(), own.begin(), own.end());
    }
    std::vector<int> done(n_seqs, n_prefix);
    std::vector<KvSeqCache> caches(n_seqs);  // [n_seqs] what each BatchSeq's span names
    for (int step = 0; step < 4; ++step) {  // every suffix but 3 tokens, then 3 decode steps
      std::vector<BatchSeq> batch;
      std::vector<int> fed;
      for (int i = 0; i < n_seqs; ++i) {
        const int n = step == 0 ? static_cast<int>(toks[i].size()) - n_prefix - 3 : 1;
        ASSERT_TRUE(bp.append(i, n, &copies));
        ASSERT_TRUE(copies.empty());
        caches[i] = {bp.block_table(i)};
        batch.push_back(
            {{toks[i].data() + done[i], static_cast<size_t>(n)}, done[i], {&caches[i], 1}});
        fed.push_back(n);
      }
      auto got = m->forward(batch, store, sb, pool());
      std::vector<float> logits(got.begin(), got.end());
      for (int i = 0; i < n_seqs; ++i) {
        Contiguous kv(shape, done[i] + fed[i]);
        kv.run(*m, {toks[i].data(), static_cast<size_t>(done[i])}, 0);
        const auto l = kv.run(*m, {toks[i].data() + done[i], static_cast<size_t>(fed[i])}, done[i]);
        ASSERT_TRUE(std::equal(l.begin(), l.end(), logits.begin() + i * c.n_vocab))
            << "sequence " << i << " step " << step;
        done[i] += fed[i];
      }
    }
  }
}

TEST(Paged, RejectsUncoveredPositions) {
  auto m = Model::load(test::data_path("tiny-llama.gguf"));
  PagedKvStore store(m->kv_shape(DType::F16, DType::F16), 4, 16);
  const std::vector<BlockId> table = {2};
  const std::vector<int32_t> toks(17, 1);
  Scratch s;
  const KvSeqCache c{table};
  BatchSeq q{toks, 0, {&c, 1}};
  EXPECT_THROW(m->forward(std::span<const BatchSeq>(&q, 1), store, s, pool()), Error);
}

TEST(PagedStore, AccountingAndCopy) {
  KvShape shape{.n_layer = 2, .n_kv_head = 2, .head_dim = 32, .dtype_k = DType::Q8_0, .dtype_v = DType::F16};
  PagedKvStore store(shape, 5, 16);
  EXPECT_EQ(store.bytes(), 5 * PagedKvStore::block_bytes(shape, 16));
  EXPECT_EQ(PagedKvStore::block_bytes(shape, 16), kv_bytes(shape, 16));
  EXPECT_EQ(PagedKvStore::blocks_for_budget(shape, 16, 5 * kv_bytes(shape, 16) + 1), 5);
  EXPECT_EQ(PagedKvStore::blocks_for_budget(shape, 16, kv_bytes(shape, 16) - 1), 0);
  shape.kivi_residual = 32;
  shape.dtype_k = DType::Q4_0;
  EXPECT_THROW(PagedKvStore(shape, 5, 16, 2), Error);  // a block smaller than a K group
  EXPECT_THROW(PagedKvStore(shape, 5, 64, 0), Error);  // no residual slot
  {
    // Blocks at the sealed density (a K group's bytes per 64 tokens + V rows), plus the slots:
    // K and V, R + G - 1 = 95 f16 rows each, per layer.
    PagedKvStore kivi(shape, 5, 64, 2);
    EXPECT_EQ(PagedKvStore::block_bytes(shape, 64), 64 * kv_bytes_per_token(shape));
    EXPECT_EQ(PagedKvStore::residual_slot_bytes(shape), size_t{95} * 64 * 2 * 2 * 2);
    EXPECT_EQ(kivi.bytes(), 5 * PagedKvStore::block_bytes(shape, 64) +
                                2 * PagedKvStore::residual_slot_bytes(shape));
    const uint64_t budget = 5 * PagedKvStore::block_bytes(shape, 64) +
                            2 * PagedKvStore::residual_slot_bytes(shape);
    EXPECT_EQ(PagedKvStore::blocks_for_budget(shape, 64, budget, 2), 5);
    EXPECT_EQ(PagedKvStore::blocks_for_budget(shape, 64, budget - 1, 2), 4);
    EXPECT_EQ(PagedKvStore::blocks_for_budget(shape, 64, 100, 2), 0);
  }

  // copy_block: rows written into block 1 read back identically from block 3.
  KvShape sh{.n_layer = 1, .n_kv_head = 1, .head_dim = 32, .dtype_k = DType::F32, .dtype_v = DType::F32};
  PagedKvStore st(sh, 4, 2);
  std::vector<float> k(64), v(64);
  std::iota(k.begin(), k.end(), 0.0f);
  std::iota(v.begin(), v.end(), 100.0f);
  const std::vector<BlockId> t1 = {1}, t3 = {3};
  st.write(0, t1, 0, 2, k.data(), v.data());
  st.copy_block(1, 3);
  const KvLayerView a = st.view(0, t1, 2), b = st.view(0, t3, 2);
  EXPECT_EQ(0, std::memcmp(a.k + 1 * 2 * a.k_row_bytes, b.k + 3 * 2 * b.k_row_bytes, 2 * a.k_row_bytes));
  EXPECT_EQ(0, std::memcmp(a.v + 1 * 2 * a.v_row_bytes, b.v + 3 * 2 * b.v_row_bytes, 2 * a.v_row_bytes));
}

// The store alone (no model): through scrambled 16-token blocks every head of every position holds
// the bytes a contiguous cache (one block of every position) holds for it, for each cache type,
// before and after an eviction (shift_out re-rotates K); and a block keeps each head's positions
// as one run (head-major).
TEST(PagedStore, HeadsHoldTheContiguousCacheBytes) {
  for (DType t : kKvTypes) {
    SCOPED_TRACE(dtype_name(t));
    const KvShape shape{.n_layer = 2, .n_kv_head = 3, .head_dim = 64, .dtype_k = t, .dtype_v = t};
    const KvRope rope{.n_rot = 64, .freq_base = 10000.0f};
    const int32_t bs = 16, n_blocks = 6;
    const int64_t n = 70, d = shape.kv_dim();
    PagedKvStore one(shape, 1, static_cast<int32_t>(n));
    const std::vector<BlockId> t0 = {0};
    PagedKvStore store(shape, n_blocks, bs);
    const auto table = scrambled_blocks(n_blocks, 5);
    std::mt19937 rng(3);
    std::normal_distribution<float> dist;
    std::vector<float> k(n * d), v(n * d);
    for (float& x : k) x = dist(rng);
    for (float& x : v) x = dist(rng);
    for (int32_t il = 0; il < shape.n_layer; ++il)
      for (int64_t p0 : {int64_t{0}, int64_t{29}}) {  // two writes, the second mid-block
        const int64_t m = p0 == 0 ? 29 : n - 29;
        one.write(il, t0, p0, m, k.data() + p0 * d, v.data() + p0 * d);
        store.write(il, table, p0, m, k.data() + p0 * d, v.data() + p0 * d);
      }
    auto expect_same = [&](int64_t n_tokens) {
      for (int32_t il = 0; il < shape.n_layer; ++il) {
        const KvLayerView a = one.view(il, t0, n_tokens), b = store.view(il, table, n_tokens);
        ASSERT_TRUE(b.head_major);
        const size_t kh = a.k_row_bytes / 3, vh = a.v_row_bytes / 3;
        for (int64_t p = 0; p < n_tokens; ++p)
          for (int64_t g = 0; g < 3; ++g) {
            ASSERT_EQ(0, std::memcmp(a.k_head(p, g), b.k_head(p, g), kh)) << p << " " << g;
            ASSERT_EQ(0, std::memcmp(a.v_head(p, g), b.v_head(p, g), vh)) << p << " " << g;
            if ((p + 1) % bs != 0) {
              EXPECT_EQ(b.k_head(p + 1, g), b.k_head(p, g) + kh);
              EXPECT_EQ(b.v_head(p + 1, g), b.v_head(p, g) + vh);
            }
          }
      }
    };
    expect_same(n);
    one.shift_out(t0, n, 5, 23, rope);
    store.shift_out(table, n, 5, 23, rope);
    expect_same(n - 23);
  }
}

}  // namespace
}  // namespace kvlm
