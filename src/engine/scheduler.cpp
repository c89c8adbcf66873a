#include "engine/scheduler.h"

#include <algorithm>
#include <chrono>
#include <exception>

#include "base/error.h"
#include "engine/vocab_trie.h"
#include "grammar/matcher.h"
#include "kv_manager/kv_manager.h"
#include "tokenizer/tokenizer.h"

namespace kvlm {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Cancelled: return "cancelled";
    case FinishReason::Error: return "error";
  }
  return "?";
}

// One request as the scheduler thread sees it: what the planner sees (step_plan.h), and the
// request's own parts.
struct Scheduler::Seq : StepSeq {
  Request req;
  EventFn on_event;
  RequestId request = 0;  // the request's id (choice i runs as sequence request + i)
  int32_t index = 0;      // the choice
  // The request's choices not yet finished (shared by its sequences): the request is done at 0.
  std::shared_ptr<int32_t> n_open;
  int64_t n_generated = 0;
  std::unique_ptr<Sampler> sampler;
  std::unique_ptr<GrammarMatcher> matcher;  // with req.grammar
  std::vector<uint32_t> mask;               // [ceil(n_vocab / 32)]: the matcher's, this step
};

// A token to draw after a pass: the sequence and the row of the pass's logits it draws from.
struct Scheduler::Draw {
  Seq* q = nullptr;
  size_t row = 0;
  int32_t token = -1;
  std::optional<StepLogprobs> logprobs;  // where asked for
  std::exception_ptr error;
};

// Everything the scheduler thread owns. A sequence is in the KV manager (has blocks) from its
// admission until it finishes or is preempted.
struct Scheduler::State {
  KvManager kv;
  StepPlanner planner;
  Scratch scratch;
  StepQueue waiting;    // Seqs, oldest (or preempted) first
  StepRunning running;  // Seqs, admission order
  StepCounters counters;
  uint64_t n_step_calls = 0;
  SchedulerStats totals;  // counters (the gauges are filled at publish time)

  State(const KvManagerConfig& c, const StepLimits& limits) : kv(c), planner(limits, kv) {}
};

namespace {
Scheduler::Seq& as_seq(StepSeq& q) { return static_cast<Scheduler::Seq&>(q); }
}  // namespace

namespace {

// Blocks of the full-attention pool from the budget, after what the window groups and the KIVI
// slots take (kv_pool_config gives each window group exactly what n_parallel sequences hold).
int64_t full_blocks(const KvPoolSpec& spec, const SchedulerConfig& c, int32_t n_slots) {
  if (c.block_size <= 0) fail("--block-size must be positive, got {}", c.block_size);
  const uint64_t windows = kv_window_groups_bytes(spec), per_block = kv_full_block_bytes(spec);
  if (per_block == 0) return 1;  // every layer windowed: the budget only has to hold the windows
  int64_t n = 0;
  if (c.kv_budget_bytes > 0) {
    const auto budget = static_cast<uint64_t>(c.kv_budget_bytes);
    const uint64_t slots = uint64_t(PagedKvStore::residual_slot_bytes(spec.shape)) *
                           uint64_t(n_slots);  // KIVI's slots, every layer's
    if (windows == 0)
      n = KvManager::blocks_for_budget(spec.shape, c.block_size, budget, n_slots);
    else if (budget > windows + slots)
      n = static_cast<int64_t>((budget - windows - slots) / per_block);
    if (n <= 0)
      fail("--kv-budget of {} bytes holds no block of {} tokens ({} bytes each, after {} bytes "
           "of f16 residual slots and {} bytes of sliding-window layers for {} sequences)",
           c.kv_budget_bytes, c.block_size, per_block, slots, windows, spec.n_parallel);
  } else if (c.kv_budget_tokens > 0) {
    n = kv_blocks_for(c.kv_budget_tokens, c.block_size);
  } else {
    fail("the KV budget must be positive (bytes or tokens)");
  }
  if (n > (int64_t{1} << 30)) fail("--kv-budget of {} blocks is too large", n);
  return n;
}

}  // namespace

int64_t choices_pool_tokens(int64_t n_prompt, int64_t n_held, int32_t n, int32_t block_size) {
  const int64_t bs = block_size, shared = std::min(n_prompt, n_held) / bs;
  return (shared + int64_t{n} * (kv_blocks_for(n_held, bs) - shared)) * bs;
}

Scheduler::Scheduler(const Model& model, const Tokenizer& tok, const SchedulerConfig& config,
                     ThreadPool& pool)
    : model_(model), tok_(tok), config_(config), pool_(pool) {
  const ModelConfig& c = model.config();
  if (config.n_parallel <= 0) fail("-np must be positive, got {}", config.n_parallel);
  if (config.n_batch <= 0) fail("--batch-size must be positive, got {}", config.n_batch);
  if (config.n_batch < config.n_parallel)
    fail("--batch-size ({}) must be at least -np ({}): every running sequence decodes each step",
         config.n_batch, config.n_parallel);
  if (config.n_ctx <= 0) fail("the context must be positive, got {}", config.n_ctx);
  if (c.arch->pos == PosKind::Learned && config.n_ctx > c.n_ctx_train)
    fail("context {} is past the {} positions this model has learned embeddings for",
         config.n_ctx, c.n_ctx_train);
  if (config.max_queue < 0) fail("--max-queue must be >= 0, got {}", config.max_queue);
  config_.eviction.reach = std::max(0, c.max_window() - 1);
  config_.eviction.validate(config.n_ctx, config.kivi_residual >= 0);
  const bool windowed = c.max_window() > 0;
  // A hit is indexed by the full-attention layers' blocks (their window groups keep twins).
  if (config.prefix_cache && std::all_of(c.layer_window.begin(), c.layer_window.end(),
                                         [](int32_t w) { return w > 0; }) && windowed)
    fail("the prefix cache needs full-attention layers; this model windows every layer "
         "(--no-prefix-cache)");
  KvShape shape = model.kv_shape(config.dtype_k, config.dtype_v);
  shape.rotate = config.rotate;
  shape.kivi_residual = config.kivi_residual;
  validate(shape);
  // KIVI: each running sequence owns one f16 residual slot.
  const int32_t n_slots = shape.kivi() ? config.n_parallel : 0;
  const KvPoolSpec spec{.shape = shape,
                        .block_size = config.block_size,
                        .n_parallel = config.n_parallel,
                        .n_batch = config.n_batch,
                        .n_ctx = config.n_ctx,
                        .layer_window = c.layer_window};
  const KvManagerConfig kc = kv_pool_config(spec, full_blocks(spec, config, n_slots), n_slots,
                                            config.prefix_cache, model.kv_rope());
  st_ = std::make_unique<State>(kc, StepLimits{config.n_parallel, config.n_batch, config.n_ctx,
                                                config_.eviction});
  stats_.blocks_total = st_->kv.stats().blocks.n_total;
  stats_.block_size = config.block_size;
  stats_.kv_bytes_total = st_->kv.store().bytes();
  thread_ = std::thread([this] { loop(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  kv_snap_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

const TokenTrie& Scheduler::token_trie() {
  std::call_once(trie_once_, [&] { trie_ = vocab_token_trie(tok_); });
  return *trie_;
}

int64_t Scheduler::capacity_tokens() const { return st_->kv.capacity_tokens(); }

RequestId Scheduler::submit(Request req, EventFn on_event) {
  const ModelConfig& c = model_.config();
  const int64_t n_prompt = static_cast<int64_t>(req.prompt.size());
  if (n_prompt == 0) fail("the prompt is empty");
  for (int32_t t : req.prompt)
    if (t < 0 || t >= c.n_vocab) fail("token id {} is out of range [0, {})", t, c.n_vocab);
  if (req.max_tokens <= 0) fail("max_tokens must be at least 1, got {}", req.max_tokens);
  validate(req.sampling);
  check_choices(req.n);
  const int64_t n_total = n_prompt + req.max_tokens;
  if (!evicts() && n_total > config_.n_ctx)
    fail("the prompt ({} tokens) plus max_tokens ({}) exceeds the context of {} tokens", n_prompt,
         req.max_tokens, config_.n_ctx);
  // An evicting sequence never holds more than n_ctx positions. The choices share the prompt's
  // full blocks; each holds its own blocks from the prompt's partial last one on.
  const int64_t held = std::min(n_total, evicts() ? config_.n_ctx : n_total);
  if (choices_pool_tokens(n_prompt, held, req.n, config_.block_size) > capacity_tokens())
    fail("the prompt ({} tokens) plus max_tokens ({}){} exceeds the KV cache pool of {} tokens",
         n_prompt, req.max_tokens,
         req.n > 1 ? fmt::format(" for each of n = {} choices", req.n) : std::string(),
         capacity_tokens());
  auto seq = std::make_unique<Seq>();
  seq->req = std::move(req);
  seq->on_event = std::move(on_event);
  seq->tokens = seq->req.prompt;
  seq->salt = seq->req.salt;
  seq->n_prompt = n_prompt;
  seq->sampler = std::make_unique<Sampler>(seq->req.sampling);
  seq->n_forks = seq->req.n - 1;
  seq->n_open = std::make_shared<int32_t>(seq->req.n);
  if (seq->req.grammar) {
    seq->matcher = std::make_unique<GrammarMatcher>(seq->req.grammar, token_trie());
    seq->mask.resize((static_cast<size_t>(std::max(c.n_vocab, tok_.n_vocab())) + 31) / 32);
  }
  RequestId id;
  {
    std::lock_guard lk(mu_);
    if (stop_) fail("the scheduler is stopping");
    const int64_t queued = stats_.waiting;
    if (queued >= config_.max_queue)
      fail("queue full: {} requests are waiting (--max-queue {})", queued, config_.max_queue);
    id = next_id_;
    next_id_ += seq->req.n;  // the ids of its choices' sequences
    seq->id = id;
    seq->request = id;
    incoming_.push_back(std::move(seq));
    ++n_active_;
    ++stats_.waiting;
  }
  cv_.notify_all();
  return id;
}

void Scheduler::check_choices(int32_t n) const {
  if (n < 1 || n > config_.n_parallel)
    fail("n must be in [1, {}] (choices run as sequences at once, -np {}), got {}",
         config_.n_parallel, config_.n_parallel, n);
  if (n > 1 && config_.kivi_residual >= 0)
    fail("n > 1 shares the prompt's blocks between choices, which the KIVI cache (--kv-residual) "
         "cannot");
}

void Scheduler::cancel(RequestId id, int32_t choice) {
  {
    std::lock_guard lk(mu_);
    cancels_.emplace_back(id, choice);
  }
  cv_.notify_all();
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard lk(mu_);
  return stats_;
}

void Scheduler::wait_idle() {
  std::unique_lock lk(mu_);
  idle_cv_.wait(lk, [&] { return n_active_ == 0; });
}

// ---- the scheduler thread -----------------------------------------------------------------------

void Scheduler::release(Seq& q, bool keep_partial) {
  if (st_->kv.has_seq(q.id)) st_->kv.release(q.id, q.tokens, q.n_computed, keep_partial);
}

void Scheduler::finish(Seq& q, FinishReason why, const std::string& error) {
  // After an error the rows of the failed step may be half written: keep nothing partial.
  release(q, why != FinishReason::Error);
  RequestEvent ev;
  ev.done = true;
  ev.finish = why;
  ev.error = error;
  ev.n_prompt = q.n_prompt;
  ev.n_cached = std::max<int64_t>(q.n_cached, 0);
  ev.n_generated = q.n_generated;
  // A sequence that has not forked yet ends its choices to come too (they have no tokens).
  for (int32_t i = 0; i <= q.n_forks; ++i) {
    ev.index = q.index + i;
    ev.n_generated = i == 0 ? q.n_generated : 0;
    q.on_event(ev);
  }
  *q.n_open -= 1 + q.n_forks;
  q.n_forks = 0;
  if (*q.n_open > 0) return;
  ++st_->totals.requests_finished;
  std::lock_guard lk(mu_);
  --n_active_;
}

void Scheduler::publish() {
  State& st = *st_;
  const KvManagerStats k = st.kv.stats();
  std::lock_guard lk(mu_);
  SchedulerStats& s = stats_;
  s = st.totals;
  s.blocks_total = k.blocks.n_total;
  s.blocks_used = k.blocks.n_used;
  s.blocks_cached = k.blocks.n_cached;
  s.block_size = k.block_size;
  s.kv_bytes_total = k.bytes_total;
  s.kv_bytes_used = k.bytes_used;
  s.evicted_tokens = k.n_evicted_tokens;
  s.n_preemptions = st.counters.n_preemptions;
  s.prompt_tokens = st.counters.prompt_tokens;
  s.prompt_tokens_cached = st.counters.prompt_tokens_cached;
  s.prompt_tokens_forked = st.counters.prompt_tokens_forked;
  s.running = static_cast<int64_t>(st.running.size());
  s.waiting = static_cast<int64_t>(st.waiting.size() + incoming_.size());
  if (n_active_ == 0) idle_cv_.notify_all();
}

void Scheduler::loop() {
  State& st = *st_;
  for (;;) {
    std::vector<std::pair<RequestId, int32_t>> cancels;
    bool stopping, want_snapshot;
    std::shared_ptr<KvEventFn> watcher;
    {
      std::unique_lock lk(mu_);
      cv_.wait(lk, [&] {
        return stop_ || !incoming_.empty() || !cancels_.empty() || !st.running.empty() ||
               !st.waiting.empty() || kv_snap_wanted_;
      });
      want_snapshot = kv_snap_wanted_;
      watcher = kv_watcher_;
      while (!incoming_.empty()) {
        st.waiting.push_back(std::move(incoming_.front()));
        incoming_.pop_front();
      }
      cancels.swap(cancels_);
      stopping = stop_;
    }
    for (const auto& [cancel_id, cancel_choice] : cancels) {
      // Every sequence of the request (choice < 0), or the one of that choice. Copies, not the
      // bindings, in the lambda: clang 14 (make fuzz) cannot capture structured bindings.
      auto drop = [&, id = cancel_id, choice = cancel_choice](auto& list) {
        for (auto it = list.begin(); it != list.end();) {
          Seq& q = as_seq(**it);
          if (q.request == id && (choice < 0 || q.index == choice)) {
            finish(q, FinishReason::Cancelled, "");
            it = list.erase(it);
          } else {
            ++it;
          }
        }
      };
      drop(st.running);
      drop(st.waiting);
    }
    // Every request, running or waiting, gets its final event.
    auto finish_all = [&](FinishReason why, const std::string& error) {
      for (auto& q : st.running) finish(as_seq(*q), why, error);
      for (auto& q : st.waiting) finish(as_seq(*q), why, error);
      st.running.clear();
      st.waiting.clear();
    };
    if (stopping) {
      finish_all(FinishReason::Cancelled, "");
      publish();
      return;
    }
    if (!st.running.empty() || !st.waiting.empty()) {
      try {
        step();
      } catch (const std::exception& e) {
        // Not expected (inputs are validated at submit): fail every request rather than die.
        finish_all(FinishReason::Error, e.what());
      }
      // Finished sequences were removed inside step(); their final events are sent there.
    }
    publish();
    serve_views(want_snapshot, watcher);
  }
}

std::shared_ptr<const KvSnapshot> Scheduler::kv_snapshot(std::chrono::milliseconds max_wait) {
  std::unique_lock lk(mu_);
  if (stop_) return nullptr;
  const uint64_t want = kv_snap_no_ + 1;
  kv_snap_wanted_ = true;
  cv_.notify_all();
  if (!kv_snap_cv_.wait_for(lk, max_wait, [&] { return stop_ || kv_snap_no_ >= want; }) || stop_)
    return nullptr;
  return kv_snap_;
}

void Scheduler::watch_kv(KvEventFn fn) {
  std::lock_guard lk(mu_);
  kv_watcher_ = fn ? std::make_shared<KvEventFn>(std::move(fn)) : nullptr;
}

void Scheduler::serve_views(bool want_snapshot, const std::shared_ptr<KvEventFn>& watcher) {
  State& st = *st_;
  if (watcher) {
    std::vector<KvEvent> events;
    kv_tracker_.diff(st.kv, st.running, st.waiting, events);
    if (!events.empty()) (*watcher)(events);
  } else {
    kv_tracker_.reset();  // a later watcher is told of every running sequence afresh
  }
  if (!want_snapshot) return;
  auto snap = std::make_shared<KvSnapshot>(kvlm::kv_snapshot(st.kv, st.running, st.waiting));
  snap->n_head = model_.config().n_head;
  snap->layer_window = model_.config().layer_window;
  {
    std::lock_guard lk(mu_);
    kv_snap_ = std::move(snap);
    kv_snap_wanted_ = false;
    ++kv_snap_no_;
  }
  kv_snap_cv_.notify_all();
}

void Scheduler::step() {
  State& st = *st_;
  KvManager& kv = st.kv;
  const uint64_t step_no = ++st.n_step_calls;  // marks the sequences this step schedules
  using Clock = std::chrono::steady_clock;
  const Clock::time_point t_step = Clock::now();

  // ---- 1-3. decode tokens, admissions, prefill chunks (step_plan.h) ----
  const std::vector<StepItem> items =
      st.planner.plan(step_no, st.waiting, st.running, st.counters);
  if (items.empty()) return;

  // ---- 4. one forward pass over every item ----
  std::vector<BatchSeq> batch;
  batch.reserve(items.size());
  for (const StepItem& it : items) {
    const Seq& q = as_seq(*it.seq);
    batch.push_back({{q.tokens.data() + q.n_computed, static_cast<size_t>(it.n)}, q.n_computed,
                     kv.seq_caches(q.id)});
  }
  const Clock::time_point t_pass = Clock::now();
  const std::span<const float> logits = model_.forward(batch, kv.store(), st.scratch, pool_);
  const Clock::time_point t_pass_end = Clock::now();
  ++st.totals.n_steps;
  for (const StepItem& it : items) st.totals.batch_tokens += it.n;

  // ---- 5. register full blocks, fork choices, sample, finish ----
  std::vector<Draw> draws;  // sequences whose pending tokens are all computed
  for (size_t b = 0; b < items.size(); ++b) {
    Seq& q = as_seq(*items[b].seq);
    q.n_computed += items[b].n;
    kv.commit(q.id, q.tokens, q.n_computed);
    if (q.pending() == 0) draws.push_back(Draw{.q = &q, .row = b, .token = -1, .logprobs = {}, .error = {}});  // else prefill not finished
  }
  fork_choices(draws, step_no);
  sample_draws(draws, logits);
  deliver(draws);
  const std::chrono::duration<double> pass = t_pass_end - t_pass, whole = Clock::now() - t_step;
  st.totals.forward_seconds += pass.count();
  const auto bucket = std::lower_bound(kPassSecondsBounds.begin(), kPassSecondsBounds.end(),
                                       pass.count()) - kPassSecondsBounds.begin();
  ++st.totals.pass_seconds_counts[static_cast<size_t>(bucket)];
  st.totals.step_host_seconds += whole.count() - pass.count();
}

// Requests of n > 1 whose prompt this pass finished fork into their other choices here, after
// commit (their full prompt blocks are registered, so the children continue the chain) and
// before sampling: each child draws its first token from the parent's logits row, as a request
// of its seed alone would from its own prefill.
void Scheduler::fork_choices(std::vector<Draw>& draws, uint64_t step_no) {
  State& st = *st_;
  const size_t n_draws = draws.size();
  for (size_t d = 0; d < n_draws; ++d) {
    Seq& q = *draws[d].q;
    if (q.n_forks == 0) continue;
    for (int32_t i = 1; i <= q.n_forks; ++i) {
      auto c = std::make_unique<Seq>();
      c->id = q.id + i;
      c->request = q.request;
      c->index = q.index + i;
      c->req = q.req;  // an explicit copy: the choice's own parameters
      c->req.prompt.clear();  // `tokens` holds it
      c->req.sampling.seed = q.req.sampling.seed + static_cast<uint64_t>(i);  // wraps
      c->on_event = q.on_event;
      c->n_open = q.n_open;
      c->salt = q.salt;
      c->tokens = q.tokens;
      c->n_prompt = q.n_prompt;
      c->n_computed = q.n_computed;
      c->n_cached = q.n_cached;
      c->step = step_no;
      c->admitted_at = ++st.counters.n_admissions;
      c->sampler = std::make_unique<Sampler>(c->req.sampling);
      if (q.matcher) {  // the parent's state before its first token: every choice starts there
        c->matcher = std::make_unique<GrammarMatcher>(*q.matcher);
        c->mask.resize(q.mask.size());
      }
      st.kv.fork(q.id, c->id);
      st.counters.prompt_tokens_forked += q.n_prompt;
      draws.push_back(
          Draw{.q = c.get(), .row = draws[d].row, .token = -1, .logprobs = {}, .error = {}});
      st.running.push_back(std::move(c));
    }
    q.n_forks = 0;
  }
}

// The samples, on the pool's threads when any of them is more than an argmax (a draw at a
// temperature, a repetition penalty; Sampler::argmax_only): each sampler and its sequence's
// tokens belong to one draw only, several draws may read one logits row, and what each draws
// does not depend on the thread (a sampler's random stream is its own). A draw with top-k 40 over
// a 49,152-token vocabulary takes ~150 us, so sixteen are ~2.5 ms of a ~20 ms pass; a greedy
// sample (~10 us) costs about what a hand-off does
// (docs/bench-log/2026-12-03-zen4-session-10.md).
void Scheduler::sample_draws(std::vector<Draw>& draws, std::span<const float> logits) {
  const int32_t n_vocab = model_.config().n_vocab;
  auto sample = [&](int64_t i0, int64_t i1, int) {
    for (int64_t i = i0; i < i1; ++i) {
      Draw& d = draws[static_cast<size_t>(i)];
      try {
        Seq& q = *d.q;
        if (q.req.sampling.n_logprobs >= 0) d.logprobs.emplace();
        if (q.matcher) q.matcher->fill_mask(q.mask);
        d.token = q.sampler->sample(logits.data() + d.row * static_cast<size_t>(n_vocab), n_vocab,
                                    q.tokens, d.logprobs ? &*d.logprobs : nullptr,
                                    q.matcher ? q.mask.data() : nullptr);
      } catch (...) {
        d.error = std::current_exception();  // rethrown by deliver, on the scheduler thread
      }
    }
  };
  const auto n = static_cast<int64_t>(draws.size());
  const bool costly = std::any_of(draws.begin(), draws.end(),
                                  [](const Draw& d) {
                                    return d.q->matcher || !d.q->sampler->argmax_only();
                                  });
  if (n > 1 && costly)
    pool_.parallel_for(n, sample);
  else
    sample(0, n, 0);
}

// Each drawn token to its sequence and its request's callback; sequences that reached an
// end-of-generation token, max_tokens or the context finish.
void Scheduler::deliver(std::vector<Draw>& draws) {
  State& st = *st_;
  std::vector<std::pair<Seq*, FinishReason>> done;
  for (Draw& d : draws) {
    if (d.error) std::rethrow_exception(d.error);
    Seq& q = *d.q;
    q.tokens.push_back(d.token);
    ++q.n_generated;
    ++st.totals.generated_tokens;
    RequestEvent ev;
    ev.index = q.index;
    ev.token = d.token;
    ev.n_prompt = q.n_prompt;
    ev.n_cached = q.n_cached;
    ev.n_generated = q.n_generated;
    ev.logprobs = std::move(d.logprobs);
    q.on_event(ev);
    const bool eog = tok_.is_eog(d.token);
    if (q.matcher && !eog && !q.matcher->accept_token(d.token))  // the mask allowed it: a bug
      done.emplace_back(&q, FinishReason::Error);
    else if ((eog && (!q.req.ignore_eos || q.matcher)) || (q.matcher && q.matcher->finished()))
      done.emplace_back(&q, FinishReason::Stop);
    else if (q.n_generated >= q.req.max_tokens ||
             (!evicts() && static_cast<int64_t>(q.tokens.size()) >= config_.n_ctx))
      done.emplace_back(&q, FinishReason::Length);
  }
  for (const auto& [q, why] : done) {
    auto it = std::find_if(st.running.begin(), st.running.end(),
                           [q = q](auto& r) { return r.get() == q; });  // clang 14: no binding
    finish(as_seq(**it), why,
           why == FinishReason::Error ? "the grammar refused a token its mask allowed" : "");
    st.running.erase(it);
  }
}

}  // namespace kvlm
