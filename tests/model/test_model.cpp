// Model-level proofs: cached decoding == full recomputation, prefill == token-by-token decode,
// and logits against llama.cpp goldens (tools/make_synthetic_gguf.py, tools/gen_llama_goldens.py).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "base/error.h"
#include "engine/session.h"
#include "model/model.h"
#include "sampling/sampler.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace kvlm {
namespace {


// max_i |a_i - b_i| / max(1, |b_i|): relative for large logits, absolute near zero.
double max_rel_diff(std::span<const float> a, std::span<const float> b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i)
    m = std::max(m, std::fabs(double{a[i]} - b[i]) / std::max(1.0, std::fabs(double{b[i]})));
  return m;
}

ThreadPool& pool() {
  static ThreadPool p(2);
  return p;
}

// ---- cached decoding == recomputation -----------------------------------------------------
// The seeds' central claim: decoding against cached K/V gives the same logits as re-running the
// whole prefix. Both paths use the same kernels with batch-size-independent arithmetic, so the
// 1e-4 bound (the issue's) is loose; the measured difference is printed.
void check_cache_equivalence(const Model& m, const std::vector<int32_t>& prompt, int n_steps,
                             DType kv_type) {
  const int64_t n_ctx = static_cast<int64_t>(prompt.size()) + n_steps + 1;
  Session cached(m, kv_type, kv_type, n_ctx, pool());
  Session fresh(m, kv_type, kv_type, n_ctx, pool());
  auto la = cached.feed(prompt);
  std::vector<float> a(la.begin(), la.end());  // copied: the span dies at the next feed
  auto lb = fresh.recompute(prompt);
  double worst = 0;
  for (int step = 0; step < n_steps; ++step) {
    double d = max_rel_diff(a, lb);
    worst = std::max(worst, d);
    ASSERT_LE(d, 1e-4) << "step " << step;
    const int32_t ta = argmax(a.data(), m.config().n_vocab);
    const int32_t tb = argmax(lb.data(), m.config().n_vocab);
    ASSERT_EQ(ta, tb) << "greedy tokens differ at step " << step;
    const int32_t one[1] = {ta};
    la = cached.feed(one);
    a.assign(la.begin(), la.end());
    lb = fresh.recompute(one);
  }
  EXPECT_EQ(cached.tokens(), fresh.tokens());
  std::printf("  %zu-token prompt, %d steps: max relative logit difference %.3g\n", prompt.size(),
              n_steps, worst);
}

struct RealModel {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tok;
};
RealModel& real_model() {
  static RealModel rm = [] {
    RealModel r;
    r.model = Model::load(test::model_path());
    r.tok = Tokenizer::from_gguf(r.model->gguf());
    return r;
  }();
  return rm;
}

TEST(CacheEquivalence, SmolLm2CachedEqualsRecomputed) {
  auto& rm = real_model();
  const char* prompts[] = {
      "The capital of France is",
      "def fibonacci(n):\n    if n < 2:\n        return n\n",
      "<|im_start|>user\nWhat is 17 times 23?<|im_end|>\n<|im_start|>assistant\n",
  };
  for (const char* p : prompts) {
    auto ids = rm.tok->encode(p, rm.tok->add_bos_default(), true);
    check_cache_equivalence(*rm.model, ids, 64, DType::F16);
  }
}

TEST(CacheEquivalence, SmolLm2F32Cache) {
  auto& rm = real_model();
  auto ids = rm.tok->encode("Once upon a time, in a small village,", false, true);
  check_cache_equivalence(*rm.model, ids, 24, DType::F32);
}

TEST(CacheEquivalence, TinyModels) {
  for (const char* f : {"tiny-llama.gguf", "tiny-gpt2.gguf"}) {
    auto m = Model::load(test::data_path(f));
    std::vector<int32_t> prompt = {5, 17, 200, 31, 99, 260, 7};
    check_cache_equivalence(*m, prompt, 64, DType::F16);
    check_cache_equivalence(*m, prompt, 16, DType::F32);
  }
}

// Prefill of N tokens in one batch gives the same logits at every position as N decode steps.
TEST(PrefillDecode, BatchEqualsTokenByToken) {
  auto& rm = real_model();
  auto ids = rm.tok->encode("A KV cache stores the keys and values of past tokens.", false, true);
  const int64_t n = static_cast<int64_t>(ids.size());
  const int32_t V = rm.model->config().n_vocab;
  Session batch(*rm.model, DType::F16, DType::F16, 64, pool());
  auto all = batch.feed_all_logits(ids);
  std::vector<float> batched(all.begin(), all.end());
  Session single(*rm.model, DType::F16, DType::F16, 64, pool(), /*n_batch=*/1);
  for (int64_t i = 0; i < n; ++i) {
    auto l = single.feed(std::span<const int32_t>(&ids[i], 1));
    ASSERT_LE(max_rel_diff(l, std::span<const float>(batched).subspan(i * V, V)), 1e-5)
        << "position " << i;
  }
}

TEST(Session, RejectsOverflowingContext) {
  auto& rm = real_model();
  Session s(*rm.model, DType::F16, DType::F16, 4, pool());
  std::vector<int32_t> ids = {1, 2, 3, 4, 5};
  EXPECT_THROW(s.feed(ids), Error);
  EXPECT_EQ(s.kv().size(), 0);
  std::vector<int32_t> bad = {-1};
  EXPECT_THROW(s.feed(bad), Error);
  std::vector<int32_t> big = {rm.model->config().n_vocab};
  EXPECT_THROW(s.feed(big), Error);
}

}  // namespace
}  // namespace kvlm
