// The planning half of a scheduler step (docs/KV.md, "Paged storage and the scheduler"): which
// running sequences decode, which waiting requests are admitted (prefix hits, free blocks),
// which prefill chunks fill the token budget, and which sequences are preempted or evict when the
// pool or their context runs short. It asks only the KV manager, never the model, so it is tested
// with a bookkeeping-only manager (KvManagerConfig::bytes = false) and no model
// (tests/engine/test_step_plan.cpp); Scheduler::step runs the plan through the model.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "engine/session.h"
#include "kv_manager/kv_manager.h"

namespace kvlm {

// A sequence as the planner sees it; the scheduler's requests derive from it.
struct StepSeq {
  virtual ~StepSeq() = default;
  SeqId id = 0;
  std::string salt;             // prefix-cache tenant
  std::vector<int32_t> tokens;  // [n_prompt + n_generated] prompt, then generated tokens
  int64_t n_prompt = 0;
  // Tokens whose K/V are in this sequence's blocks (positions [0, n_computed)); the rest of
  // `tokens` is pending: the prompt still to prefill, or the last sampled token to decode.
  int64_t n_computed = 0;
  int64_t n_cached = -1;     // prefix-cache hit at first admission (-1: not admitted yet)
  uint64_t admitted_at = 0;  // admission counter: the largest is the newest (preempted first)
  uint64_t step = 0;         // last step that scheduled it
  // Choices still to fork from this sequence once its prompt is computed (Request::n - 1 until
  // then, 0 after): admission keeps a running slot (-np) for each.
  int32_t n_forks = 0;

  int64_t pending() const { return static_cast<int64_t>(tokens.size()) - n_computed; }
};

// One sequence's part of the pass: its next n pending tokens.
struct StepItem {
  StepSeq* seq = nullptr;
  int64_t n = 0;
};

struct StepLimits {
  int32_t n_parallel = 16;  // sequences running at once
  int64_t n_batch = 512;    // tokens per pass
  int64_t n_ctx = 4096;     // per sequence
  Eviction eviction{};      // what a full sequence does (off: it stops at n_ctx)
};

// What planning changed, for the scheduler's statistics.
struct StepCounters {
  uint64_t n_admissions = 0;  // admissions ever (the admission stamp of the newest)
  int64_t n_preemptions = 0;
  int64_t prompt_tokens = 0;         // prompt tokens of first admissions
  int64_t prompt_tokens_cached = 0;  // of which served by the prefix cache
  int64_t prompt_tokens_forked = 0;  // got by choices 1..n-1 from choice 0 (Scheduler's fork)
};

using StepQueue = std::deque<std::unique_ptr<StepSeq>>;     // waiting, oldest (or preempted) first
using StepRunning = std::vector<std::unique_ptr<StepSeq>>;  // running, admission order

class StepPlanner {
 public:
  StepPlanner(const StepLimits& limits, KvManager& kv) : lim_(limits), kv_(kv) {}

  // Plans step step_no:
  //   1. every running sequence with one pending token decodes it (oldest first); a decode that
  //      needs a block and finds none preempts the newest running sequence;
  //   2. waiting requests are admitted oldest first while fewer than n_parallel run (counting
  //      the choices each running request will still fork) and the free blocks hold the rest of
  //      the prompt after the prefix match; a request whose prompt starts
  //      with blocks another sequence is still prefilling waits until they are registered;
  //   3. prefill chunks of admitted sequences fill what is left of the n_batch token budget.
  // Reserves every item's positions in the manager (evicting first when the policy says so) and
  // moves preempted sequences to the front of `waiting`, admitted ones to `running`. The items
  // are in batch order; their sequences are all running.
  std::vector<StepItem> plan(uint64_t step_no, StepQueue& waiting, StepRunning& running,
                             StepCounters& counters);

 private:
  StepSeq* preempt_newest();
  bool grow(StepSeq& q, int64_t n);
  bool make_room(StepSeq& q, int64_t m);
  void decode_items(uint64_t step_no, std::vector<StepItem>& items, int64_t& budget);
  void admit_waiting();
  int64_t slots_held() const;  // running sequences and the forks they will make
  int64_t inflight_blocks(const StepSeq& q) const;
  void prefill_items(uint64_t step_no, std::vector<StepItem>& items, int64_t& budget);

  StepLimits lim_;
  KvManager& kv_;
  // The queues and counters of the plan being made.
  StepQueue* waiting_ = nullptr;
  StepRunning* running_ = nullptr;
  StepCounters* counters_ = nullptr;
};

}  // namespace kvlm
