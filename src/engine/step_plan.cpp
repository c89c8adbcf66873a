#include "engine/step_plan.h"

#include <algorithm>

#include "base/error.h"

namespace kvlm {

// Preempts the newest running sequence: its blocks go back (the registered ones stay cached, so
// its recompute is often a prefix hit) and it waits at the front of the queue.
StepSeq* StepPlanner::preempt_newest() {
  StepRunning& running = *running_;
  auto it = std::max_element(running.begin(), running.end(),
                             [](auto& a, auto& b) { return a->admitted_at < b->admitted_at; });
  StepSeq* q = it->get();
  // Its recompute starts with a partial hit, from its (kept) tokens: fresh rows again, which the
  // prefix index may register even if it had evicted before.
  if (kv_.has_seq(q->id)) kv_.release(q->id, q->tokens, q->n_computed, /*keep_partial=*/true);
  q->n_computed = 0;
  waiting_->push_front(std::move(*it));
  running.erase(it);
  ++counters_->n_preemptions;
  return q;
}

// Gives q blocks for n more tokens, preempting the newest sequences while the pool is short.
// False if q itself was preempted.
bool StepPlanner::grow(StepSeq& q, int64_t n) {
  while (!kv_.reserve(q.id, n))
    if (preempt_newest() == &q) return false;
  return true;
}

// Room for m more positions within q's n_ctx by the eviction policy (Eviction::count, which
// Session::make_room uses too: a sequence evicts at the same positions alone or batched here).
// The blocks the shift writes are made q's own first (copy-on-write of shared ones, preempting the
// newest sequences while the pool is short). False if q itself was preempted.
bool StepPlanner::make_room(StepSeq& q, int64_t m) {
  const int64_t kept = lim_.eviction.kept();
  const int64_t count = lim_.eviction.count(q.n_computed, m, lim_.n_ctx);
  KVLM_CHECK(count >= 0);  // callers keep m <= room(n_ctx)
  if (count == 0) return true;
  while (!kv_.evict(q.id, kept, count))
    if (preempt_newest() == &q) return false;
  q.tokens.erase(q.tokens.begin() + kept, q.tokens.begin() + kept + count);
  q.n_computed -= count;
  return true;
}

// Step 1: the decode tokens of running sequences, oldest first. A decode's grow() preempts only
// sequences newer than itself, not yet visited: every item taken still runs.
void StepPlanner::decode_items(uint64_t step_no, std::vector<StepItem>& items, int64_t& budget) {
  StepRunning& running = *running_;
  std::sort(running.begin(), running.end(),
            [](auto& a, auto& b) { return a->admitted_at < b->admitted_at; });
  for (size_t i = 0; i < running.size(); ++i) {
    StepSeq* q = running[i].get();
    if (q->pending() != 1 || q->n_computed == 0) continue;  // prefilling: step 3
    if (lim_.eviction.on() && !make_room(*q, 1)) break;       // q was the newest (as for grow)
    if (!grow(*q, 1)) break;  // q was the newest: everything older is already in items
    q->step = step_no;
    items.push_back({q, 1});
    --budget;
  }
}

// Full blocks of q's prompt that a running sequence of the same tenant shares but has not yet
// computed (a shared system prompt arriving in a burst): q waits for them to be registered and
// reuses them instead of computing the same prefix in parallel.
int64_t StepPlanner::inflight_blocks(const StepSeq& q) const {
  const int64_t bs = kv_.block_size();
  int64_t best = 0;
  for (const auto& r : *running_) {
    if (r->salt != q.salt || kv_.evicted(r->id)) continue;  // evicted: registers nothing more
    const size_t n = std::min(q.tokens.size() - 1, r->tokens.size());
    size_t l = 0;
    while (l < n && q.tokens[l] == r->tokens[l]) ++l;
    const int64_t blocks = static_cast<int64_t>(l) / bs;
    if (r->n_computed < blocks * bs) best = std::max(best, blocks);  // not all computed yet
  }
  return best;
}

int64_t StepPlanner::slots_held() const {
  int64_t n = 0;
  for (const auto& r : *running_) n += 1 + r->n_forks;
  return n;
}

// Step 2: admission, oldest waiting first, while the pool holds the rest of its tokens and the
// running slots its choices (a request of n > 1 that does not fit blocks those behind it).
void StepPlanner::admit_waiting() {
  StepQueue& waiting = *waiting_;
  for (size_t wi = 0; wi < waiting.size();) {
    StepSeq& q = *waiting[wi];
    if (slots_held() + 1 + q.n_forks > lim_.n_parallel) break;
    const KvHit hit = kv_.lookup(q.tokens, q.salt);
    if (kv_.prefix_cache() &&
        inflight_blocks(q) > static_cast<int64_t>(hit.full.block_ids.size())) {
      ++wi;  // try the next one; this one is admitted once the blocks are registered
      continue;
    }
    // An evicting sequence holds at most n_ctx positions at any time.
    const auto n_tokens = static_cast<int64_t>(q.tokens.size());
    const int64_t n_held = lim_.eviction.on() ? std::min(n_tokens, lim_.n_ctx) : n_tokens;
    if (!kv_.admit(q.id, q.tokens, q.salt, n_held, hit)) break;  // wait for blocks
    q.n_computed = hit.n_tokens();
    if (q.n_cached < 0) {
      q.n_cached = q.n_computed;
      counters_->prompt_tokens += q.n_prompt;
      counters_->prompt_tokens_cached += q.n_computed;
    }
    q.admitted_at = ++counters_->n_admissions;
    running_->push_back(std::move(waiting[wi]));
    waiting.erase(waiting.begin() + static_cast<std::ptrdiff_t>(wi));
  }
}

// Step 3: prefill chunks within the rest of the token budget. An evicting sequence frees room for
// at most what lies past its kept prefix at once (as Session::run feeds a long prompt).
void StepPlanner::prefill_items(uint64_t step_no, std::vector<StepItem>& items, int64_t& budget) {
  StepRunning& running = *running_;
  for (size_t i = 0; i < running.size() && budget > 0; ++i) {
    StepSeq* q = running[i].get();
    if (q->step == step_no) continue;  // decoding: step 1
    int64_t n = std::min(q->pending(), budget);
    if (lim_.eviction.on()) n = std::min(n, lim_.eviction.room(lim_.n_ctx));
    if (n <= 0) continue;
    if (lim_.eviction.on() && !make_room(*q, n)) break;
    if (!grow(*q, n)) break;
    q->step = step_no;
    items.push_back({q, n});
    budget -= n;
  }
}

std::vector<StepItem> StepPlanner::plan(uint64_t step_no, StepQueue& waiting,
                                        StepRunning& running, StepCounters& counters) {
  waiting_ = &waiting;
  running_ = &running;
  counters_ = &counters;
  std::vector<StepItem> items;
  int64_t budget = lim_.n_batch;
  decode_items(step_no, items, budget);
  admit_waiting();
  prefill_items(step_no, items, budget);
  // A prefill's grow() may have preempted a newer sequence that step 1 gave a decode token: its
  // blocks are gone, so it leaves this step.
  items.erase(std::remove_if(items.begin(), items.end(),
                             [&](const StepItem& it) { return !kv_.has_seq(it.seq->id); }),
              items.end());
  return items;
}

}  // namespace kvlm
