// Many sequences at once over one paged KV cache: continuous batching with chunked prefill,
// admission by free blocks, prefix reuse and preemption by recompute (vLLM's scheduler, on CPU).
//
// One scheduler thread owns the KV manager (block pool, prefix index, paged storage; kv_manager.h)
// and every running sequence. Other threads (HTTP handlers) only submit(), cancel() and read
// stats(); those are thread-safe and never wait for a forward pass.
//
// A step (docs/KV.md, "Paged storage and the scheduler"; steps 2-4 are the plan, StepPlanner in
// step_plan.h, tested without a model):
//   1. drop cancelled requests (their blocks go back to the pool at once);
//   2. every running sequence with one pending token (decode) contributes it; a decode that needs a
//      fresh block and finds none preempts the newest running sequence (its blocks are released,
//      it goes back to the front of the queue and is recomputed from its tokens later);
//   3. admit waiting requests, oldest first, while fewer than n_parallel run and the free blocks
//      hold the rest of the prompt (after the prefix-cache match); a request whose prompt starts
//      with blocks another sequence is still prefilling waits until they are registered;
//   4. prefill chunks of admitted sequences fill what is left of the n_batch token budget;
//   5. one Model::forward over all of it; each sequence whose pending tokens are all
//      computed samples its next token (the samples on the pool's threads when any is more
//      than an argmax); finished sequences release their blocks; newly full blocks are
//      registered in the prefix index.
// A sequence's logits depend only on its own tokens (the kernels compute each row alone), so the
// greedy output of a request is the same alone, batched with others, or after a preemption.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "base/thread_pool.h"
#include "engine/kv_view.h"
#include "engine/session.h"
#include "engine/step_plan.h"
#include "grammar/grammar.h"
#include "model/model.h"
#include "sampling/sampler.h"

namespace kvlm {

class Tokenizer;
class TokenTrie;

enum class FinishReason { Stop, Length, Cancelled, Error };
const char* finish_reason_name(FinishReason r);  // "stop", "length", "cancelled", "error"

struct Request {
  std::vector<int32_t> prompt;  // token ids, non-empty
  int32_t max_tokens = 16;      // > 0: tokens to generate at most
  SamplingParams sampling;
  bool ignore_eos = false;      // keep going past end-of-generation tokens
  std::string salt;             // prefix-cache tenant: requests only reuse blocks of equal salt
  // Choices (OpenAI's n), 1..n_parallel: the prompt is computed once, then the sequence forks into
  // n sequences sharing its blocks (KvManager::fork, copy-on-write). Choice i samples with seed
  // sampling.seed + i (wrapping), so it draws what a request with that seed draws alone.
  int32_t n = 1;
  // Constrained sampling (grammar/matcher.h): each step draws only tokens the grammar allows
  // next, end of generation only once it is complete; the request stops (Stop) when nothing
  // can follow. Null: unconstrained.
  std::shared_ptr<const Grammar> grammar;
};

// Delivered on the scheduler thread, in order, for one request. Callbacks must be quick (push into
// a queue): the whole batch waits for them.
struct RequestEvent {
  int32_t index = 0;    // the choice (0 .. Request::n - 1) the event is about
  int32_t token = -1;   // a generated token (>= 0), or -1 in the final event
  bool done = false;    // the choice's final event: no more events follow for it (a request
                        // with n choices gets n final events)
  FinishReason finish = FinishReason::Length;  // when done
  std::string error;    // when finish == Error
  int64_t n_prompt = 0;     // prompt tokens
  int64_t n_cached = 0;     // prompt tokens served from the prefix cache at first admission
  int64_t n_generated = 0;  // generated so far, this token included
  // With the token, when the request asked (sampling.n_logprobs >= 0): logprobs.chosen.id == token.
  std::optional<StepLogprobs> logprobs;
};
using RequestId = int64_t;
using EventFn = std::function<void(const RequestEvent&)>;

struct SchedulerConfig {
  DType dtype_k = DType::F16;   // f32, f16, q8_0, q4_0, q4_1 (KIVI: q4_0)
  DType dtype_v = DType::F16;
  bool rotate = false;          // Hadamard-rotated rows (--kv-rotate, KvShape::rotate)
  // KIVI layout (--kv-residual R, KvShape::kivi_residual): -1 off. Needs a block size that is a
  // multiple of the K group (64) and no prefix cache (a sealed block is not what a fresh prompt
  // of the same tokens holds: that one keeps its last R.. tokens in f16) and no eviction. Each of
  // the n_parallel sequences owns one f16 residual slot, taken from the budget first.
  int32_t kivi_residual = -1;
  int32_t block_size = 16;      // tokens per block
  int64_t kv_budget_bytes = 0;  // > 0: the pool holds as many blocks as fit
  int64_t kv_budget_tokens = 0; // > 0 (and kv_budget_bytes == 0): blocks for this many tokens
  int32_t n_parallel = 16;      // sequences running at once (-np)
  int64_t n_batch = 512;        // tokens per forward pass (decode tokens + prefill chunks)
  int64_t n_ctx = 4096;         // per-sequence context (prompt + generated), <= model's
  // What a sequence whose n_ctx is full does (session.h: the sliding window with sinks or context
  // shift, with the arithmetic Session uses, so a sequence evicts at the same positions whether it
  // runs alone in a Session or here). Either lets prompt + max_tokens exceed n_ctx. A sequence
  // that has evicted registers no more prefix-cache blocks: its rows are no longer a function of
  // its tokens alone.
  Eviction eviction;
  int32_t max_queue = 256;      // waiting requests beyond which submit() refuses
  bool prefix_cache = true;
};

// Upper bounds (seconds) of the forward-pass duration histogram in SchedulerStats: a small
// model's decode pass (a few ms) up to a pass carrying a 512-token prefill chunk (~0.5 s on 2
// cores) and beyond.
inline constexpr std::array<double, 12> kPassSecondsBounds = {
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 10};

struct SchedulerStats {
  int32_t blocks_total = 0, blocks_used = 0, blocks_cached = 0;  // cached: in the prefix index
  int32_t block_size = 0;
  uint64_t kv_bytes_total = 0;   // bytes of the pool's arenas
  uint64_t kv_bytes_used = 0;    // bytes of the blocks in use
  int64_t running = 0, waiting = 0;
  int64_t n_preemptions = 0;
  int64_t prompt_tokens = 0;        // prompt tokens of admitted requests (first admission)
  int64_t prompt_tokens_cached = 0; // of which served by the prefix cache
  // Prompt tokens that choices 1..n-1 of n > 1 requests got by forking choice 0's blocks instead
  // of computing them (prompt_tokens counts such a prompt once).
  int64_t prompt_tokens_forked = 0;
  int64_t generated_tokens = 0;
  int64_t evicted_tokens = 0;       // dropped by the window or context shift
  int64_t n_steps = 0;
  int64_t requests_finished = 0;
  // Where the scheduler thread's time goes, for GET /metrics: Δforward_seconds / Δn_steps is the
  // mean pass time, Δbatch_tokens / Δn_steps the mean tokens per pass.
  int64_t batch_tokens = 0;       // tokens computed by forward passes: decode tokens and prefill
                                  // chunks, recomputation after a preemption included
  double forward_seconds = 0;     // wall seconds inside forward passes
  double step_host_seconds = 0;   // wall seconds of those steps outside the pass: admission,
                                  // block bookkeeping, sampling, handing tokens to the callbacks
  // Passes by duration: [i] counts those with seconds <= kPassSecondsBounds[i] (and above the
  // bound before), the last entry those above every bound. Not cumulative; they sum to n_steps.
  std::array<int64_t, kPassSecondsBounds.size() + 1> pass_seconds_counts{};
};

// Pool tokens the n choices of one prompt of n_prompt tokens hold at most when each holds n_held
// positions: the prompt's full blocks once (shared), each choice's blocks from the prompt's
// partial last block on its own. submit() refuses a request beyond the pool by this.
int64_t choices_pool_tokens(int64_t n_prompt, int64_t n_held, int32_t n, int32_t block_size);

class Scheduler {
 public:
  // Sizes the pool from the budget and starts the scheduler thread. Throws kvlm::Error naming the
  // problem (a budget smaller than one block, an unsupported cache type, n_ctx beyond the learned
  // positions of a model with position embeddings).
  Scheduler(const Model& model, const Tokenizer& tok, const SchedulerConfig& config,
            ThreadPool& pool);
  ~Scheduler();  // stops the thread; pending requests finish with Cancelled
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  const SchedulerConfig& config() const { return config_; }
  const Model& model() const { return model_; }
  // Tokens the pool holds in all (blocks x block_size).
  int64_t capacity_tokens() const;

  // True when a full sequence evicts (window or context shift) instead of stopping.
  bool evicts() const { return config_.eviction.on(); }

  // Queues a request. Throws kvlm::Error (nothing queued) when the prompt is empty or has an id out
  // of range, when prompt + max_tokens exceeds n_ctx (unless evicts()), when the n choices'
  // blocks (the prompt's shared, each choice's own after it) exceed the whole pool, when n is
  // outside [1, n_parallel] (or above 1 with KIVI), or when the queue is full
  // (message starts with "queue full"; a server answers 503). on_event is then called from the
  // scheduler thread until every choice has had an event with done == true. The request's
  // choices run as sequences id, id + 1, ..., id + n - 1 (the ids GET /kv/state shows).
  RequestId submit(Request req, EventFn on_event);
  // Stops a request (every choice, choice < 0) or one choice of it: it gets a final event with
  // FinishReason::Cancelled (unless already done) and its blocks are released at the start of the
  // next step. Unknown or finished ids are ignored.
  void cancel(RequestId id, int32_t choice = -1);

  SchedulerStats stats() const;
  // Blocks until no request is waiting or running (tests).
  void wait_idle();

  // ---- views of the cache (engine/kv_view.h: `kvlm serve`'s /kv/state and /kv/events) -----------
  // The pool and the sequences as the scheduler thread sees them at the end of its current step
  // (at once when idle); callers asking during one step share one snapshot. Null when none came
  // within max_wait or the scheduler is stopping.
  std::shared_ptr<const KvSnapshot> kv_snapshot(std::chrono::milliseconds max_wait);
  // fn receives each step's events on the scheduler thread (quick: push into a queue) until
  // watch_kv({}); none are tracked while no one watches.
  using KvEventFn = std::function<void(const std::vector<KvEvent>&)>;
  void watch_kv(KvEventFn fn);

 public:
  struct Seq;  // a request on the scheduler thread (scheduler.cpp)

 private:
  struct State;
  void loop();
  void step();
  // Blocks back to the pool (cached ones stay reusable); keep_partial also registers the partly
  // filled last block as a prefix-cache leaf, so a prompt continuing q's tokens reuses it.
  void release(Seq& q, bool keep_partial);
  void check_choices(int32_t n) const;  // Request::n; kvlm::Error naming it
  void finish(Seq& q, FinishReason why, const std::string& error);  // final event + release
  // Step 5's parts: forks the choices of requests whose prompt was just computed (the draws of
  // their first tokens use the parent's logits row), samples every draw, hands tokens out.
  struct Draw;
  void fork_choices(std::vector<Draw>& draws, uint64_t step_no);
  void sample_draws(std::vector<Draw>& draws, std::span<const float> logits);
  void deliver(std::vector<Draw>& draws);
  void publish();        // stats_ from the scheduler thread's state
  // The views asked for since the last call (the loop, after publish()).
  void serve_views(bool want_snapshot, const std::shared_ptr<KvEventFn>& watcher);
  // The vocabulary's byte trie for grammar masks, built by the first request with a grammar.
  const TokenTrie& token_trie();

  const Model& model_;
  const Tokenizer& tok_;
  SchedulerConfig config_;
  ThreadPool& pool_;
  std::unique_ptr<State> st_;  // pool, prefix index, storage, sequences (scheduler thread only)

  mutable std::mutex mu_;  // guards the fields below
  std::condition_variable cv_;       // wakes the loop: new request, cancel, stop
  std::condition_variable idle_cv_;  // wait_idle
  std::deque<std::unique_ptr<Seq>> incoming_;  // submitted, not yet seen by the loop
  std::vector<std::pair<RequestId, int32_t>> cancels_;  // (request, choice or -1: all)
  SchedulerStats stats_;  // snapshot published after every step
  RequestId next_id_ = 1;
  int64_t n_active_ = 0;  // requests submitted and not yet finished (every choice)
  bool stop_ = false;
  bool kv_snap_wanted_ = false;                // a kv_snapshot() caller waits
  uint64_t kv_snap_no_ = 0;                    // snapshots built
  std::shared_ptr<const KvSnapshot> kv_snap_;  // the latest
  std::condition_variable kv_snap_cv_;         // kv_snapshot() callers
  std::shared_ptr<KvEventFn> kv_watcher_;      // null: no one watches
  KvEventTracker kv_tracker_;                  // scheduler thread only
  std::once_flag trie_once_;
  std::unique_ptr<TokenTrie> trie_;
  std::thread thread_;
};

}  // namespace kvlm
