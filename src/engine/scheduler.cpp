#include "engine/scheduler.h"

#include <algorithm>
#include <chrono>
#include <exception>

#include "base/error.h"
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
  int64_t n_generated = 0;
  std::unique_ptr<Sampler> sampler;
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
    if (windows == 0)  // KIVI's slots come first there (windows refuse KIVI)
      n = KvManager::blocks_for_budget(spec.shape, c.block_size, budget, n_slots);
    else if (budget > windows)
      n = static_cast<int64_t>((budget - windows) / per_block);
    if (n <= 0)
      fail("--kv-budget of {} bytes holds no block of {} tokens ({} bytes each, after {} bytes "
           "of f16 residual slots and {} bytes of sliding-window layers for {} sequences)",
           c.kv_budget_bytes, c.block_size, per_block,
           uint64_t(PagedKvStore::residual_slot_bytes(spec.shape)) * uint64_t(n_slots), windows,
           spec.n_parallel);
  } else if (c.kv_budget_tokens > 0) {
    n = (c.kv_budget_tokens + c.block_size - 1) / c.block_size;
  } else {
    fail("the KV budget must be positive (bytes or tokens)");
  }
  if (n > (int64_t{1} << 30)) fail("--kv-budget of {} blocks is too large", n);
  return n;
}

}  // namespace

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
  config.eviction.validate(config.n_ctx, config.kivi_residual >= 0);
  const bool windowed =
      std::any_of(c.layer_window.begin(), c.layer_window.end(), [](int32_t w) { return w > 0; });
  // Evicting re-rotates K with one RoPE base, and a window's released positions cannot move.
  if (config.eviction.on() && windowed)
    fail("--kv-window / --keep evict tokens, which models with sliding-window layers do not "
         "support yet");
  // A hit is indexed by the full-attention layers' blocks (their window groups keep twins).
  if (config.prefix_cache && std::all_of(c.layer_window.begin(), c.layer_window.end(),
                                         [](int32_t w) { return w > 0; }) && windowed)
    fail("the prefix cache needs full-attention layers; this model windows every layer "
         "(--no-prefix-cache)");
  if (windowed && config.kivi_residual >= 0)
    fail("the KIVI cache (--kv-residual) does not work with sliding-window layers yet");
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
                                                config.eviction});
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

int64_t Scheduler::capacity_tokens() const { return st_->kv.capacity_tokens(); }

RequestId Scheduler::submit(Request req, EventFn on_event) {
  const ModelConfig& c = model_.config();
  const int64_t n_prompt = static_cast<int64_t>(req.prompt.size());
  if (n_prompt == 0) fail("the prompt is empty");
  for (int32_t t : req.prompt)
    if (t < 0 || t >= c.n_vocab) fail("token id {} is out of range [0, {})", t, c.n_vocab);
  if (req.max_tokens <= 0) fail("max_tokens must be at least 1, got {}", req.max_tokens);
  validate(req.sampling);
  const int64_t n_total = n_prompt + req.max_tokens;
  if (!evicts() && n_total > config_.n_ctx)
    fail("the prompt ({} tokens) plus max_tokens ({}) exceeds the context of {} tokens", n_prompt,
         req.max_tokens, config_.n_ctx);
  // An evicting sequence never holds more than n_ctx positions.
  if (std::min(n_total, evicts() ? config_.n_ctx : n_total) > capacity_tokens())
    fail("the prompt ({} tokens) plus max_tokens ({}) exceeds the KV cache pool of {} tokens",
         n_prompt, req.max_tokens, capacity_tokens());
  auto seq = std::make_unique<Seq>();
  seq->req = std::move(req);
  seq->on_event = std::move(on_event);
  seq->tokens = seq->req.prompt;
  seq->salt = seq->req.salt;
  seq->n_prompt = n_prompt;
  seq->sampler = std::make_unique<Sampler>(seq->req.sampling);
  RequestId id;
  {
    std::lock_guard lk(mu_);
    if (stop_) fail("the scheduler is stopping");
    const int64_t queued = n_active_ - stats_.running;
    if (queued >= config_.max_queue)
      fail("queue full: {} requests are waiting (--max-queue {})", queued, config_.max_queue);
    id = next_id_++;
    seq->id = id;
    incoming_.push_back(std::move(seq));
    ++n_active_;
    stats_.waiting = n_active_ - stats_.running;
  }
  cv_.notify_all();
  return id;
}

void Scheduler::cancel(RequestId id) {
  {
    std::lock_guard lk(mu_);
    cancels_.push_back(id);
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
  q.on_event(ev);
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
  s.running = static_cast<int64_t>(st.running.size());
  s.waiting = n_active_ - s.running;
  if (n_active_ == 0) idle_cv_.notify_all();
}

void Scheduler::loop() {
  State& st = *st_;
  for (;;) {
    std::vector<RequestId> cancels;
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
    for (RequestId id : cancels) {
      auto drop = [&](auto& list) {
        for (auto it = list.begin(); it != list.end(); ++it)
          if ((*it)->id == id) {
            finish(as_seq(**it), FinishReason::Cancelled, "");
            list.erase(it);
            return true;
          }
        return false;
      };
      if (!drop(st.running)) drop(st.waiting);
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
  const ModelConfig& mc = model_.config();
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

  // ---- 5. register full blocks, sample, finish ----
  std::vector<Seq*> done;
  std::vector<FinishReason> why;
  std::vector<size_t> ready;  // items whose sequence has computed all its pending tokens
  for (size_t b = 0; b < items.size(); ++b) {
    Seq& q = as_seq(*items[b].seq);
    q.n_computed += items[b].n;
    kv.commit(q.id, q.tokens, q.n_computed);
    if (q.pending() == 0) ready.push_back(b);  // else prefill not finished: no token yet
  }
  // The samples, on the pool's threads when any of them is more than an argmax (a draw at a
  // temperature, a repetition penalty; Sampler::argmax_only): each sampler,
  // its logits row and its sequence's tokens belong to one item only, and what each draws does
  // not depend on the thread (a sampler's random stream is its own). A draw with top-k 40 over a
  // 49,152-token vocabulary takes ~150 us, so sixteen are ~2.5 ms of a ~20 ms pass; a greedy
  // sample (~10 us) costs about what a hand-off does
  // (docs/bench-log/2026-12-03-zen4-session-10.md).
  std::vector<int32_t> sampled(items.size(), -1);
  std::vector<std::optional<StepLogprobs>> logprobs(items.size());  // where asked for
  std::vector<std::exception_ptr> errors(items.size());
  auto sample = [&](int64_t i0, int64_t i1, int) {
    for (int64_t i = i0; i < i1; ++i) {
      const size_t b = ready[static_cast<size_t>(i)];
      Seq& q = as_seq(*items[b].seq);
      try {
        if (q.req.sampling.n_logprobs >= 0) logprobs[b].emplace();
        sampled[b] = q.sampler->sample(logits.data() + b * mc.n_vocab, mc.n_vocab, q.tokens,
                                       logprobs[b] ? &*logprobs[b] : nullptr);
      } catch (...) {
        errors[b] = std::current_exception();  // rethrown below, on the scheduler thread
      }
    }
  };
  const int64_t n_ready = static_cast<int64_t>(ready.size());
  const bool costly = std::any_of(ready.begin(), ready.end(),
                                  [&](size_t b) { return !as_seq(*items[b].seq).sampler->argmax_only(); });
  if (n_ready > 1 && costly)
    pool_.parallel_for(n_ready, sample);
  else
    sample(0, n_ready, 0);
  for (const size_t b : ready) {
    if (errors[b]) std::rethrow_exception(errors[b]);
    Seq& q = as_seq(*items[b].seq);
    const int32_t t = sampled[b];
    q.tokens.push_back(t);
    ++q.n_generated;
    ++st.totals.generated_tokens;
    RequestEvent ev;
    ev.token = t;
    ev.n_prompt = q.n_prompt;
    ev.n_cached = q.n_cached;
    ev.n_generated = q.n_generated;
    ev.logprobs = std::move(logprobs[b]);
    q.on_event(ev);
    if (!q.req.ignore_eos && tok_.is_eog(t)) {
      done.push_back(&q);
      why.push_back(FinishReason::Stop);
    } else if (q.n_generated >= q.req.max_tokens ||
               (!evicts() && static_cast<int64_t>(q.tokens.size()) >= config_.n_ctx)) {
      done.push_back(&q);
      why.push_back(FinishReason::Length);
    }
  }
  for (size_t i = 0; i < done.size(); ++i) {
    auto it = std::find_if(st.running.begin(), st.running.end(),
                           [&](auto& r) { return r.get() == done[i]; });
    finish(as_seq(**it), why[i], "");
    st.running.erase(it);
  }
  const std::chrono::duration<double> pass = t_pass_end - t_pass, whole = Clock::now() - t_step;
  st.totals.forward_seconds += pass.count();
  const auto bucket = std::lower_bound(kPassSecondsBounds.begin(), kPassSecondsBounds.end(),
                                       pass.count()) - kPassSecondsBounds.begin();
  ++st.totals.pass_seconds_counts[static_cast<size_t>(bucket)];
  st.totals.step_host_seconds += whole.count() - pass.count();
}

}  // namespace kvlm
