// What the web page's KV view costs a serving run, measured without a model (Google Benchmark):
// the scheduler thread's work (one snapshot per GET /kv/state; the event diff after every step
// while a /kv/events stream is open) and the HTTP worker's (the snapshot and each event as JSON).
// The pool is the one `kvlm serve -np 16` gives SmolLM2-135M: 30 layers, 3 KV heads of 64, f16,
// 16-token blocks; 16 running sequences of ~700 positions (bench/serve_bench.py's 12-turn chats
// near their end), every one sharing a 64-token system prompt. docs/bench-log/ turns the times
// into a share of a serving second.
//   build/bin/kvlm_kv_view_bench [--benchmark_repetitions=5]
#include <benchmark/benchmark.h>

#include <memory>
#include <numeric>
#include <vector>

#include "engine/kv_view.h"
#include "server/kv_api.h"

namespace kvlm {
namespace {

constexpr int32_t kUsers = 16;
constexpr int32_t kPositions = 700;  // per sequence
constexpr int32_t kShared = 64;      // the system prompt every chat starts with

// A pool with kUsers sequences admitted and prefilled to kPositions, plus one waiting request.
struct ServingPool {
  KvManager kv{{.shape = {.n_layer = 30, .n_kv_head = 3, .head_dim = 64, .dtype_k = DType::F16,
                          .dtype_v = DType::F16},
                .block_size = 16,
                .n_blocks = 1024,
                .prefix_cache = true,
                .audit = false,
                .bytes = false}};
  StepPlanner planner{{.n_parallel = kUsers, .n_batch = 4096, .n_ctx = 4096}, kv};
  StepQueue waiting;
  StepRunning running;
  StepCounters counters;
  uint64_t step_no = 0;

  ServingPool() {
    for (int32_t u = 0; u < kUsers + 1; ++u) {
      auto q = std::make_unique<StepSeq>();
      q->id = static_cast<SeqId>(u + 1);
      q->tokens.resize(kPositions);
      std::iota(q->tokens.begin(), q->tokens.end(), 1);
      for (int32_t i = kShared; i < kPositions; ++i) q->tokens[i] = 100'000 * (u + 1) + i;
      q->n_prompt = kPositions;
      waiting.push_back(std::move(q));
    }
    while (running.size() < kUsers) step();
  }
  void step() {
    for (const StepItem& it : planner.plan(++step_no, waiting, running, counters)) {
      it.seq->n_computed += it.n;
      kv.commit(it.seq->id, it.seq->tokens, it.seq->n_computed);
      if (it.seq->pending() == 0) it.seq->tokens.push_back(7);
    }
  }
};

ServingPool& pool() {
  static ServingPool p;
  return p;
}

// The scheduler thread, once per GET /kv/state.
void BM_Snapshot(benchmark::State& state) {
  ServingPool& p = pool();
  for (auto _ : state) benchmark::DoNotOptimize(kv_snapshot(p.kv, p.running, p.waiting));
}
BENCHMARK(BM_Snapshot)->Unit(benchmark::kMicrosecond);

// An HTTP worker, once per GET /kv/state: the snapshot as the response body.
void BM_StateJson(benchmark::State& state) {
  ServingPool& p = pool();
  const KvSnapshot snap = kv_snapshot(p.kv, p.running, p.waiting);
  server::ServedModel model;
  model.id = "SmolLM2-135M-Instruct.Q4_1";
  for (auto _ : state)
    benchmark::DoNotOptimize(server::kv_state_json(snap, SchedulerStats{}, model).dump());
}
BENCHMARK(BM_StateJson)->Unit(benchmark::kMicrosecond);

// The scheduler thread after every step while a /kv/events stream is open: the diff of a decode
// step (every sequence one position on; a sixteenth of them crossing into a new block).
void BM_EventDiff(benchmark::State& state) {
  ServingPool& p = pool();
  KvEventTracker tracker;
  std::vector<KvEvent> events;
  tracker.diff(p.kv, p.running, p.waiting, events);
  for (auto _ : state) {
    events.clear();
    tracker.diff(p.kv, p.running, p.waiting, events);
    benchmark::DoNotOptimize(events.data());
  }
}
BENCHMARK(BM_EventDiff)->Unit(benchmark::kMicrosecond);

// An HTTP worker, per event sent.
void BM_EventJson(benchmark::State& state) {
  const KvEvent e{.kind = KvEventKind::Blocks, .id = 3, .n_prompt = 700, .n_blocks = 1,
                  .n_tokens = 704};
  for (auto _ : state) benchmark::DoNotOptimize(server::kv_event_json(e).dump());
}
BENCHMARK(BM_EventJson)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace kvlm

BENCHMARK_MAIN();
