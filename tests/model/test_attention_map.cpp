// Attention maps (AttnProbe, engine/attention_map.h): the weights a forward pass reports for one
// layer's query head are a distribution over exactly the positions the head sees (causal, inside
// a sliding window), and they are attention's own: weights x the cached V rows give the output
// the attention kernel computed for that head (read from the scratch after the last layer), for
// f32 and f16 caches, full and windowed layers. A map of the last tokens after a cached prefix
// equals the same rows of a map computed in one pass.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "base/error.h"
#include "engine/attention_map.h"
#include "kernels/ops.h"
#include "kv/paged_kv.h"
#include "model/model.h"
#include "test_util.h"

namespace kvlm {
namespace {

ThreadPool& pool() {
  static ThreadPool p(2);
  return p;
}

// One forward pass of n random tokens probing the last layer's `head`; checks the weights'
// support and sums, then weights x V against the scratch's attention output of that head.
void expect_weights_give_the_output(const std::string& file, DType dt, int n, int32_t head) {
  auto m = Model::load(file);
  const ModelConfig& c = m->config();
  const int32_t il = c.n_layer - 1;
  const auto toks = test::random_tokens(n, c.n_vocab, 3);
  PagedKvStore store(m->kv_shape(dt, dt), 1, n);  // one block holding every position
  const std::vector<BlockId> table = {0};
  const KvSeqCache kc{table};
  AttnProbe probe{il, head, {}};
  const BatchSeq q{toks, 0, {&kc, 1}, false, &probe};
  Scratch s;
  m->forward({&q, 1}, store, s, pool());
  ASSERT_EQ(probe.weights.size(), static_cast<size_t>(n) * n);

  // V rows of the layer, as f32: [n, kv_dim].
  const KvShape& sh = store.shape();
  std::vector<std::byte> kb(static_cast<size_t>(n) * kv_k_row_bytes(sh));
  std::vector<std::byte> vb(static_cast<size_t>(n) * kv_v_row_bytes(sh));
  store.read_rows(il, table, 0, n, kb.data(), vb.data());
  const int64_t KV = c.kv_dim(), hd = c.head_dim, g = head / c.n_gqa();
  std::vector<float> v(static_cast<size_t>(n * KV));
  for (int j = 0; j < n; ++j)
    kernels::dequantize_row(dt, vb.data() + j * kv_v_row_bytes(sh), v.data() + j * KV, KV);

  const float* att = s.attn.as<float>();  // [n, q_dim] the last layer's attention output
  for (int i = 0; i < n; ++i) {
    const float* w = probe.weights.data() + static_cast<size_t>(i) * n;
    const int lo = c.window(il) > 0 ? std::max(0, i - c.window(il) + 1) : 0;
    double sum = 0;
    for (int j = 0; j < n; ++j) {
      if (j < lo || j > i) EXPECT_EQ(w[j], 0.0f) << "row " << i << " sees position " << j;
      else EXPECT_GT(w[j], 0.0f) << "row " << i << " position " << j;
      sum += w[j];
    }
    EXPECT_NEAR(sum, 1.0, 1e-5) << "row " << i;
    for (int64_t d = 0; d < hd; ++d) {
      double o = 0;
      for (int j = lo; j <= i; ++j) o += w[j] * v[j * KV + g * hd + d];
      EXPECT_NEAR(o, att[i * c.q_dim() + head * hd + d], 2e-5 + 1e-4 * std::fabs(o))
          << "row " << i << " dim " << d;
    }
  }
}

TEST(AttentionMap, WeightsTimesVGiveAttentionsOutput) {
  const std::string tiny = test::data_path("tiny-llama.gguf");
  for (DType t : {DType::F32, DType::F16}) {
    expect_weights_give_the_output(tiny, t, 40, 0);
    expect_weights_give_the_output(tiny, t, 40, 3);  // another K/V head when heads are grouped
  }
}

TEST(AttentionMap, WindowedLayersSeeOnlyTheirWindow) {
  // Every layer windowed to 8: rows past position 7 see their last 8 positions only.
  expect_weights_give_the_output(test::data_path("tiny-llama-swa-all.gguf"), DType::F16, 30, 1);
}

TEST(AttentionMap, LastRowsAfterACachedPrefixEqualOnePass) {
  auto m = Model::load(test::data_path("tiny-llama-swa.gguf"));  // layer 0 windowed, layer 1 full
  const auto toks = test::random_tokens(60, m->config().n_vocab, 8);
  for (int32_t layer : {0, 1}) {
    const AttentionMap all = attention_map(*m, toks, layer, 2, 60, pool());
    const AttentionMap last = attention_map(*m, toks, layer, 2, 10, pool());
    EXPECT_EQ(last.q0, 50);
    EXPECT_EQ(last.n_pos, 60);
    EXPECT_EQ(last.window, m->config().window(layer));
    ASSERT_EQ(last.weights.size(), 10u * 60);
    for (size_t k = 0; k < last.weights.size(); ++k)
      ASSERT_NEAR(last.weights[k], all.weights[50 * 60 + k], 1e-6) << "layer " << layer << " at " << k;
  }
}

TEST(AttentionMap, BadRequestsAreRefused) {
  auto m = Model::load(test::data_path("tiny-llama.gguf"));
  const auto toks = test::random_tokens(20, m->config().n_vocab, 1);
  const std::pair<std::function<void()>, const char*> cases[] = {
      {[&] { attention_map(*m, toks, 2, 0, 4, pool()); }, "layer 2 is out of range"},
      {[&] { attention_map(*m, toks, 0, -1, 4, pool()); }, "head -1 is out of range"},
      {[&] { attention_map(*m, toks, 0, 0, 0, pool()); }, "0 query rows; give 1 to 20"},
      {[&] { attention_map(*m, toks, 0, 0, 21, pool()); }, "21 query rows"},
      {[&] { attention_map(*m, {}, 0, 0, 1, pool()); }, "no tokens"},
  };
  for (const auto& [run, needle] : cases) {
    try {
      run();
      ADD_FAILURE() << needle << ": accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace kvlm
