// The scheduler's planning without a model (step_plan.h over a bookkeeping-only KV manager):
// many requests through a small pool all finish, none starves, the token budget and -np hold at
// every step, preempted requests come back, blocks are conserved, shared prompts are prefix hits
// (a burst waits for the blocks its twin is still prefilling), and evicting sequences never hold
// more than their context.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <vector>

#include "engine/step_plan.h"

namespace kvlm {
namespace {

constexpr int32_t kBs = 16;

KvManager bookkeeping(int32_t n_blocks, bool prefix = true) {
  const KvShape shape{.n_layer = 2, .n_kv_head = 1, .head_dim = 32, .dtype_k = DType::F16,
                      .dtype_v = DType::F16};
  return KvManager({.shape = shape, .block_size = kBs, .n_blocks = n_blocks,
                    .prefix_cache = prefix, .audit = true, .bytes = false});
}

// A request of the simulation: its prompt and how many tokens it generates.
struct Sim {
  StepQueue waiting;
  StepRunning running;
  StepCounters counters;
  std::map<SeqId, int64_t> to_generate;  // tokens still to generate, per request
  std::map<SeqId, int64_t> finished_at;  // step of its last token
  SeqId next_id = 1;

  void submit(std::vector<int32_t> prompt, int64_t n_gen) {
    auto q = std::make_unique<StepSeq>();
    q->id = next_id++;
    q->tokens = std::move(prompt);
    q->n_prompt = static_cast<int64_t>(q->tokens.size());
    to_generate[q->id] = n_gen;
    waiting.push_back(std::move(q));
  }

  // One step: plan, then what a pass would do: the items' tokens are computed (commit), a
  // sequence with nothing pending samples a token (its id as the token), a finished one leaves.
  std::vector<StepItem> step(StepPlanner& planner, KvManager& kv, uint64_t step_no) {
    const std::vector<StepItem> items = planner.plan(step_no, waiting, running, counters);
    for (const StepItem& it : items) {
      StepSeq& q = *it.seq;
      q.n_computed += it.n;
      kv.commit(q.id, q.tokens, q.n_computed);
      if (q.pending() > 0) continue;
      q.tokens.push_back(static_cast<int32_t>(q.id % 50));
      if (--to_generate[q.id] > 0) continue;
      kv.release(q.id, q.tokens, q.n_computed, true);
      finished_at[q.id] = static_cast<int64_t>(step_no);
      running.erase(std::find_if(running.begin(), running.end(),
                                 [&](auto& r) { return r.get() == &q; }));
    }
    kv.check_invariants();
    return items;
  }
};

std::vector<int32_t> tokens(std::mt19937& rng, int n, const std::vector<int32_t>& prefix = {}) {
  std::vector<int32_t> t = prefix;
  while (static_cast<int>(t.size()) < n) t.push_back(static_cast<int32_t>(rng() % 1000));
  return t;
}

TEST(StepPlan, ManyRequestsThroughASmallPoolAllFinish) {
  KvManager kv = bookkeeping(24);  // 384 tokens for 40 requests of up to ~200 each
  const StepLimits lim{.n_parallel = 6, .n_batch = 64, .n_ctx = 256};
  StepPlanner planner(lim, kv);
  Sim sim;
  std::mt19937 rng(3);
  const auto system = tokens(rng, 40);  // a shared system prompt
  for (int i = 0; i < 40; ++i)
    sim.submit(tokens(rng, 20 + static_cast<int>(rng() % 150), i % 2 ? system : std::vector<int32_t>{}),
               1 + static_cast<int64_t>(rng() % 40));
  uint64_t step = 0;
  while (!sim.waiting.empty() || !sim.running.empty()) {
    ASSERT_LT(step, 5000u) << "requests starve";
    const auto items = sim.step(planner, kv, ++step);
    int64_t n = 0;
    for (const StepItem& it : items) n += it.n;
    EXPECT_LE(n, lim.n_batch);
    EXPECT_LE(static_cast<int32_t>(sim.running.size()), lim.n_parallel);
    EXPECT_TRUE(!items.empty() || sim.running.empty()) << "a step with running work did nothing";
  }
  EXPECT_EQ(sim.finished_at.size(), 40u);
  EXPECT_GT(sim.counters.n_preemptions, 0);  // the pool was too small for everyone at once
  EXPECT_GT(sim.counters.prompt_tokens_cached, 0);  // the system prompt's blocks were shared
  EXPECT_EQ(kv.stats().blocks.n_used, 0);
  EXPECT_EQ(kv.stats().n_seqs, 0);
}

// Three requests with one prompt arrive together: the first prefills it, the others wait for its
// blocks to be registered and then take them from the prefix index instead of computing them.
TEST(StepPlan, ABurstWaitsForTheBlocksItsTwinIsPrefilling) {
  KvManager kv = bookkeeping(64);
  StepPlanner planner({.n_parallel = 4, .n_batch = 32, .n_ctx = 512}, kv);
  Sim sim;
  std::mt19937 rng(5);
  const auto prompt = tokens(rng, 100);
  for (int i = 0; i < 3; ++i) sim.submit(prompt, 2);
  const auto first = sim.step(planner, kv, 1);
  ASSERT_EQ(first.size(), 1u);  // only the first is admitted and prefilling
  EXPECT_EQ(first[0].seq->id, 1);
  EXPECT_EQ(sim.waiting.size(), 2u);
  for (uint64_t step = 2; !sim.waiting.empty() || !sim.running.empty(); ++step) {
    ASSERT_LT(step, 100u);
    sim.step(planner, kv, step);
  }
  // 96 of each twin's 100 prompt tokens came from the index (6 full blocks; the last token is
  // always recomputed).
  EXPECT_EQ(sim.counters.prompt_tokens, 300);
  EXPECT_EQ(sim.counters.prompt_tokens_cached, 2 * 96);
}

// Without a prefix cache there is nothing to wait for: the burst is admitted at once.
TEST(StepPlan, WithoutAPrefixCacheABurstDoesNotWait) {
  KvManager kv = bookkeeping(64, /*prefix=*/false);
  StepPlanner planner({.n_parallel = 4, .n_batch = 32, .n_ctx = 512}, kv);
  Sim sim;
  std::mt19937 rng(5);
  const auto prompt = tokens(rng, 100);
  for (int i = 0; i < 3; ++i) sim.submit(prompt, 2);
  sim.step(planner, kv, 1);
  EXPECT_EQ(sim.running.size(), 3u);
  EXPECT_TRUE(sim.waiting.empty());
}

// A sliding window with sinks: sequences generate past their context, never holding more than it.
TEST(StepPlan, EvictingSequencesStayWithinTheirContext) {
  KvManager kv = bookkeeping(40);
  const StepLimits lim{.n_parallel = 3, .n_batch = 48, .n_ctx = 64,
                       .eviction = {.window = true, .n_sinks = 4, .window_chunk = 8}};
  StepPlanner planner(lim, kv);
  Sim sim;
  std::mt19937 rng(7);
  for (int i = 0; i < 5; ++i) sim.submit(tokens(rng, 30 + 25 * i), 150);
  for (uint64_t step = 1; !sim.waiting.empty() || !sim.running.empty(); ++step) {
    ASSERT_LT(step, 3000u);
    sim.step(planner, kv, step);
    for (const auto& q : sim.running) EXPECT_LE(kv.seq_tokens(q->id), lim.n_ctx);
  }
  EXPECT_EQ(sim.finished_at.size(), 5u);
  EXPECT_GT(kv.stats().n_evicted_tokens, 5 * 100);
  EXPECT_EQ(kv.stats().blocks.n_used, 0);
}

}  // namespace
}  // namespace kvlm
