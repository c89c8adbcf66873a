// The KV view (engine/kv_view.h) over a bookkeeping-only KV manager and the planner: the
// snapshot's block states and tables agree with the pool, and the event tracker reports
// admissions with their prefix hits, block growth, preemptions and releases.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "engine/kv_view.h"

namespace kvlm {
namespace {

constexpr int32_t kBs = 16;

KvManager bookkeeping(int32_t n_blocks) {
  const KvShape shape{.n_layer = 2, .n_kv_head = 1, .head_dim = 32, .dtype_k = DType::F16,
                      .dtype_v = DType::F16};
  return KvManager({.shape = shape, .block_size = kBs, .n_blocks = n_blocks, .prefix_cache = true,
                    .audit = true, .bytes = false});
}

struct Pass {
  KvManager kv;
  StepPlanner planner;
  StepQueue waiting;
  StepRunning running;
  StepCounters counters;
  uint64_t step_no = 0;
  KvEventTracker tracker;
  std::vector<KvEvent> events;

  Pass(int32_t n_blocks, int32_t n_parallel)
      : kv(bookkeeping(n_blocks)), planner({.n_parallel = n_parallel, .n_batch = 256,
                                            .n_ctx = 1024}, kv) {}

  void submit(SeqId id, std::vector<int32_t> prompt) {
    auto q = std::make_unique<StepSeq>();
    q->id = id;
    q->tokens = std::move(prompt);
    q->n_prompt = static_cast<int64_t>(q->tokens.size());
    waiting.push_back(std::move(q));
  }
  // A step as a pass would do it: every item computed, a sequence with nothing pending samples.
  void step() {
    for (const StepItem& it : planner.plan(++step_no, waiting, running, counters)) {
      it.seq->n_computed += it.n;
      kv.commit(it.seq->id, it.seq->tokens, it.seq->n_computed);
      if (it.seq->pending() == 0) it.seq->tokens.push_back(7);
    }
    tracker.diff(kv, running, waiting, events);
  }
  void finish(SeqId id) {
    auto it = std::find_if(running.begin(), running.end(), [&](auto& q) { return q->id == id; });
    kv.release(id, (*it)->tokens, (*it)->n_computed, true);
    running.erase(it);
    tracker.diff(kv, running, waiting, events);
  }
  std::vector<KvEvent> take(KvEventKind k, SeqId id) const {
    std::vector<KvEvent> out;
    for (const KvEvent& e : events)
      if (e.kind == k && e.id == id) out.push_back(e);
    return out;
  }
};

std::vector<int32_t> prompt(int n, int32_t tail) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  std::iota(t.begin(), t.end(), 1);
  t.back() = tail;
  return t;
}

TEST(KvView, SnapshotShowsSharedPrefixBlocksAndTables) {
  Pass r(16, 4);
  r.submit(1, prompt(40, 1000));
  r.step();
  r.submit(2, prompt(40, 2000));  // the same first 39 tokens: 2 full blocks are a hit
  r.step();
  const KvSnapshot s = kv_snapshot(r.kv, r.running, r.waiting);
  ASSERT_EQ(s.running.size(), 2u);
  ASSERT_EQ(s.groups.size(), 1u);
  const KvViewGroup& g = s.groups[0];
  EXPECT_EQ(g.refs.size(), 16u);
  EXPECT_EQ(s.running[1].n_cached, 32);
  for (const KvViewSeq& q : s.running) {
    ASSERT_EQ(q.tables.size(), 1u);
    EXPECT_EQ(static_cast<int64_t>(q.tables[0].size()), (q.n_held + kBs - 1) / kBs);
  }
  // The first two blocks are the same in both tables, held twice and registered.
  for (int i = 0; i < 2; ++i) {
    const BlockId b = s.running[0].tables[0][i];
    EXPECT_EQ(b, s.running[1].tables[0][i]);
    EXPECT_EQ(g.refs[b], 2);
    EXPECT_EQ(g.cached[b], 1);
  }
  const int32_t used = static_cast<int32_t>(
      std::count_if(g.refs.begin(), g.refs.end(), [](int32_t n) { return n > 0; }));
  EXPECT_EQ(used, g.blocks.n_used);
  EXPECT_EQ(s.bytes_per_token, 2u * 2u * 32u * 2u);  // layers x (K, V) x dim x f16
}

TEST(KvView, EventsFollowASequencesLife) {
  Pass r(16, 4);
  r.submit(1, prompt(40, 1000));
  r.step();
  ASSERT_EQ(r.take(KvEventKind::Admit, 1).size(), 1u);
  EXPECT_EQ(r.take(KvEventKind::Admit, 1)[0].n_cached, 0);
  EXPECT_EQ(r.take(KvEventKind::Admit, 1)[0].n_blocks, 3);
  for (int i = 0; i < 10; ++i) r.step();  // 40 -> 50 positions: a fourth block
  const auto grew = r.take(KvEventKind::Blocks, 1);
  ASSERT_EQ(grew.size(), 1u);
  EXPECT_EQ(grew[0].n_blocks, 1);
  r.submit(2, prompt(40, 2000));
  r.step();
  ASSERT_EQ(r.take(KvEventKind::Admit, 2).size(), 1u);
  // Seq 1's third block is full by now (50 positions) and registered: 39 tokens hit, the last
  // prompt token is recomputed.
  EXPECT_EQ(r.take(KvEventKind::Admit, 2)[0].n_cached, 39);
  r.finish(1);
  ASSERT_EQ(r.take(KvEventKind::Release, 1).size(), 1u);
  EXPECT_EQ(r.take(KvEventKind::Release, 1)[0].n_blocks, 4);
  EXPECT_TRUE(r.take(KvEventKind::Preempt, 1).empty());
}

TEST(KvView, PreemptionIsReported) {
  Pass r(6, 2);  // 96 tokens: two 40-token prompts, then the decodes run out of blocks
  r.submit(1, prompt(40, 1000));
  r.submit(2, prompt(40, 2000) /* a 2-block hit */);
  r.submit(3, std::vector<int32_t>(40, 5));
  for (int i = 0; i < 80 && r.take(KvEventKind::Preempt, 2).empty() &&
                  r.take(KvEventKind::Preempt, 3).empty();
       ++i)
    r.step();
  std::vector<KvEvent> pre = r.take(KvEventKind::Preempt, 2);
  const auto pre3 = r.take(KvEventKind::Preempt, 3);
  pre.insert(pre.end(), pre3.begin(), pre3.end());
  ASSERT_FALSE(pre.empty());
  EXPECT_GT(pre[0].n_blocks, 0);
  const KvSnapshot s = kv_snapshot(r.kv, r.running, r.waiting);
  EXPECT_TRUE(std::any_of(s.waiting.begin(), s.waiting.end(),
                          [](const KvViewWaiting& w) { return w.preempted; }));
}

}  // namespace
}  // namespace kvlm
