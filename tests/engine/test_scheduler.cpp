// The scheduler: every request finishes, batched == alone (greedy), also after preemptions and
// through prefix-cache hits, cancellation releases blocks, limits are enforced at submit, and the
// pool is whole (every block free) when the scheduler is idle.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "base/error.h"
#include "engine/scheduler.h"
#include "engine/session.h"
#include "kv/paged_kv.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace kvlm {
namespace {

ThreadPool& pool() {
  static ThreadPool p(2);
  return p;
}

struct Fixture {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tok;
  explicit Fixture(const std::string& path)
      : model(Model::load(path)), tok(Tokenizer::from_gguf(model->gguf())) {}
};

Fixture& tiny() {
  static Fixture f(test::data_path("tiny-llama.gguf"));
  return f;
}

SamplingParams greedy() {
  SamplingParams p;
  p.temperature = 0;
  p.repeat_penalty = 1.0f;
  return p;
}

Request greedy_request(std::vector<int32_t> prompt, int32_t max_tokens) {
  Request r;
  r.prompt = std::move(prompt);
  r.max_tokens = max_tokens;
  r.sampling = greedy();
  r.ignore_eos = true;
  return r;
}

// Greedy generation of n tokens after prompt in s.
std::vector<int32_t> generate_greedy(Session& s, const Fixture& f,
                                     const std::vector<int32_t>& prompt, int n) {
  GenerateOptions o;
  o.n_predict = n;
  o.ignore_eos = true;
  o.sampling = greedy();
  std::vector<int32_t> out;
  generate(s, *f.tok, prompt, o, [&](int32_t id) {
    out.push_back(id);
    return true;
  });
  return out;
}

// The reference: the request alone through a contiguous-cache Session.
std::vector<int32_t> alone(const Fixture& f, const std::vector<int32_t>& prompt, int n, DType t) {
  Session s(*f.model, t, t, static_cast<int64_t>(prompt.size()) + n + 1, pool());
  return generate_greedy(s, f, prompt, n);
}

// Collects one request's events.
struct Collector {
  std::mutex mu;
  std::vector<int32_t> tokens;
  bool done = false;
  RequestEvent last;
  EventFn fn() {
    return [this](const RequestEvent& e) {
      std::lock_guard lk(mu);
      if (e.done) {
        done = true;
        last = e;
      } else {
        tokens.push_back(e.token);
      }
    };
  }
};

// n_req requests of different lengths at once; each one's tokens equal its run alone.
void run_batch(const SchedulerConfig& cfg, int n_req, int n_gen, bool expect_preemption,
               Fixture& f = tiny()) {
  Scheduler sch(*f.model, *f.tok, cfg, pool());
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::unique_ptr<Collector>> cols;
  for (int i = 0; i < n_req; ++i) {
    prompts.push_back(test::random_tokens(5 + 11 * i, f.model->config().n_vocab, 40 + i));
    cols.push_back(std::make_unique<Collector>());
    sch.submit(greedy_request(prompts.back(), n_gen), cols.back()->fn());
  }
  sch.wait_idle();
  const SchedulerStats st = sch.stats();
  for (int i = 0; i < n_req; ++i) {
    ASSERT_TRUE(cols[i]->done);
    EXPECT_EQ(cols[i]->last.finish, FinishReason::Length);
    EXPECT_EQ(cols[i]->last.n_generated, n_gen);
    EXPECT_EQ(cols[i]->tokens, alone(f, prompts[i], n_gen, cfg.dtype_k)) << "request " << i;
  }
  EXPECT_EQ(st.blocks_used, 0);
  EXPECT_EQ(st.running, 0);
  EXPECT_EQ(st.waiting, 0);
  EXPECT_EQ(st.generated_tokens, int64_t{n_req} * n_gen);
  // Every prompt token not served by the prefix cache, and every generated token but the last,
  // went through one forward pass (more when a preempted sequence is recomputed).
  int64_t computed = 0;
  for (int i = 0; i < n_req; ++i)
    computed += cols[i]->last.n_prompt - cols[i]->last.n_cached + (n_gen - 1);
  if (expect_preemption) {
    EXPECT_GT(st.n_preemptions, 0);
    EXPECT_GT(st.batch_tokens, computed);
  } else {
    EXPECT_EQ(st.batch_tokens, computed);
  }
  EXPECT_GT(st.forward_seconds, 0.0);
  EXPECT_GT(st.step_host_seconds, 0.0);
  int64_t passes = 0;
  for (int64_t c : st.pass_seconds_counts) passes += c;
  EXPECT_EQ(passes, st.n_steps);
  std::printf("  %d requests: %lld steps, %lld preemptions\n", n_req,
              static_cast<long long>(st.n_steps), static_cast<long long>(st.n_preemptions));
}

TEST(Scheduler, SixteenBatchedEqualAlone) {
  SchedulerConfig cfg;
  cfg.kv_budget_tokens = 16 * 256;
  cfg.n_parallel = 16;
  cfg.n_batch = 64;  // forces chunked prefill of the longer prompts
  cfg.n_ctx = 512;
  run_batch(cfg, 16, 24, false);
}

TEST(Scheduler, PreemptedEqualAlone) {
  SchedulerConfig cfg;
  cfg.kv_budget_tokens = 320;  // 20 blocks for 8 requests of up to ~110 tokens: preemption
  cfg.n_parallel = 8;
  cfg.n_batch = 128;
  cfg.n_ctx = 512;
  run_batch(cfg, 8, 30, true);
}

TEST(Scheduler, F32CacheBatchedEqualsAlone) {
  SchedulerConfig cfg;
  cfg.dtype_k = cfg.dtype_v = DType::F32;
  cfg.kv_budget_tokens = 4096;
  cfg.n_parallel = 4;
  cfg.n_ctx = 512;
  run_batch(cfg, 6, 10, false);
}

// The default model, a quantized cache, 16 requests with a pool too small for all of them.
TEST(Scheduler, SmolLm2SixteenBatchedAndPreemptedEqualAlone) {
  static Fixture f(test::model_path());
  SchedulerConfig cfg;
  cfg.dtype_k = cfg.dtype_v = DType::Q8_0;
  cfg.kv_budget_tokens = 16 * 64;  // 64 blocks; the 16 requests need up to 13 blocks each
  cfg.n_parallel = 16;
  cfg.n_batch = 256;
  cfg.n_ctx = 512;
  run_batch(cfg, 16, 24, true, f);
}

// A second request with the same prompt reuses its full blocks; the output is unchanged.
TEST(Scheduler, PrefixHitGivesSameTokens) {
  Fixture& f = tiny();
  SchedulerConfig cfg;
  cfg.kv_budget_tokens = 2048;
  cfg.n_ctx = 512;
  Scheduler sch(*f.model, *f.tok, cfg, pool());
  const auto prompt = test::random_tokens(70, f.model->config().n_vocab, 3);
  std::vector<std::vector<int32_t>> outs;
  std::vector<int64_t> cached;
  for (int rep = 0; rep < 2; ++rep) {
    Collector c;
    sch.submit(greedy_request(prompt, 12), c.fn());
    sch.wait_idle();
    outs.push_back(c.tokens);
    cached.push_back(c.last.n_cached);
  }
  EXPECT_EQ(cached[0], 0);
  // 4 full blocks of 16, then 5 of the 16 rows of the first request's fifth block (full by then:
  // prompt and generated tokens), copied; the 70th token is always recomputed.
  EXPECT_EQ(cached[1], 69);
  EXPECT_EQ(outs[0], outs[1]);
  EXPECT_EQ(outs[0], alone(f, prompt, 12, DType::F16));
  // The history of the first request is cached too: prompt + 11 generated tokens have K/V (the
  // 12th was sampled, never fed), 5 full blocks and a partial block of 1 token kept at finish.
  // A follow-up turn that extends the history reuses all 81.
  auto turn2 = prompt;
  turn2.insert(turn2.end(), outs[0].begin(), outs[0].end());
  turn2.push_back(5);
  Collector c;
  Request r = greedy_request(turn2, 4);
  sch.submit(r, c.fn());
  sch.wait_idle();
  EXPECT_EQ(c.last.n_cached, 81);
  // A different tenant (salt) does not see those blocks.
  Collector d;
  r.salt = "tenant-b";
  sch.submit(r, d.fn());
  sch.wait_idle();
  EXPECT_EQ(d.last.n_cached, 0);
  EXPECT_EQ(d.tokens, c.tokens);
  const SchedulerStats st = sch.stats();
  EXPECT_EQ(st.blocks_used, 0);
  EXPECT_GT(st.blocks_cached, 0);
  EXPECT_EQ(st.prompt_tokens_cached, 69 + 81);
}

// A chat: every turn's prompt is the previous prompt, its reply and a new message. The previous
// turn's partly filled last block is kept at finish and copied, so cached_tokens is exactly every
// token that had K/V (the previous prompt and all its reply but the last, never fed, token), and
// each reply equals the prompt computed from scratch. A regenerated last turn reuses everything
// but the last prompt token.
TEST(Scheduler, MultiTurnReusesThePartialBlock) {
  Fixture& f = tiny();
  SchedulerConfig cfg;
  cfg.kv_budget_tokens = 2048;
  cfg.n_batch = 32;  // chunked prefill of the first turn
  cfg.n_ctx = 512;
  Scheduler sch(*f.model, *f.tok, cfg, pool());
  const int32_t n_vocab = f.model->config().n_vocab;
  std::vector<int32_t> prompt = test::random_tokens(23, n_vocab, 500);
  int64_t want_cached = 0, sum_cached = 0;
  for (int turn = 0; turn < 6; ++turn) {
    const int32_t n_gen = 7 + 2 * turn;
    Collector c;
    sch.submit(greedy_request(prompt, n_gen), c.fn());
    sch.wait_idle();
    ASSERT_TRUE(c.done);
    EXPECT_EQ(c.last.n_cached, want_cached) << "turn " << turn;
    EXPECT_EQ(c.tokens, alone(f, prompt, n_gen, DType::F16)) << "turn " << turn;
    sum_cached += c.last.n_cached;
    if (turn == 5) {
      Collector again;
      sch.submit(greedy_request(prompt, n_gen), again.fn());
      sch.wait_idle();
      EXPECT_EQ(again.last.n_cached, static_cast<int64_t>(prompt.size()) - 1);
      EXPECT_EQ(again.tokens, c.tokens);
      sum_cached += again.last.n_cached;
    }
    want_cached = static_cast<int64_t>(prompt.size()) + n_gen - 1;
    prompt.insert(prompt.end(), c.tokens.begin(), c.tokens.end());
    const auto user = test::random_tokens(3 + turn, n_vocab, 600 + turn);
    prompt.insert(prompt.end(), user.begin(), user.end());
  }
  const SchedulerStats st = sch.stats();
  EXPECT_EQ(st.blocks_used, 0);
  EXPECT_EQ(st.prompt_tokens_cached, sum_cached);
}

// A burst of requests with a shared 100-token system prompt: the prompt is computed once. With a
// 32-token step budget the first request needs four steps to prefill it; the others wait for its
// blocks instead of computing the same prefix alongside it.
TEST(Scheduler, BurstSharesAPrefixStillBeingComputed) {
  Fixture& f = tiny();
  SchedulerConfig cfg;
  cfg.kv_budget_tokens = 4096;
  cfg.n_parallel = 8;
  cfg.n_batch = 32;
  cfg.n_ctx = 512;
  Scheduler sch(*f.model, *f.tok, cfg, pool());
  const auto system = test::random_tokens(100, f.model->config().n_vocab, 77);
  std::vector<std::unique_ptr<Collector>> cols;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 8; ++i) {
    auto p = system;
    const auto user = test::random_tokens(5 + i, f.model->config().n_vocab, 200 + i);
    p.insert(p.end(), user.begin(), user.end());
    prompts.push_back(p);
    cols.push_back(std::make_unique<Collector>());
    sch.submit(greedy_request(p, 6), cols.back()->fn());
  }
  sch.wait_idle();
  int64_t hits = 0;
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(cols[i]->done);
    // The 6 full blocks of the system prompt (96 tokens), and 4 more from the first request's
    // partial last block when it had already finished (a slow submitting thread).
    hits += cols[i]->last.n_cached == 96 || cols[i]->last.n_cached == 100;
    EXPECT_EQ(cols[i]->tokens, alone(f, prompts[i], 6, DType::F16)) << i;
  }
  EXPECT_GE(hits, 7);  // all but the first (which may itself hit if it ran last)
}

TEST(Scheduler, CancelReleasesBlocks) {
  Fixture& f = tiny();
  SchedulerConfig cfg;
  cfg.kv_budget_tokens = 4096;
  cfg.n_ctx = 4096;
  Scheduler sch(*f.model, *f.tok, cfg, pool());
  std::atomic<int> n_tokens{0};
  Collector c;
  Request r = greedy_request(test::random_tokens(20, f.model->config().n_vocab, 9), 4000);
  auto inner = c.fn();
  const RequestId id = sch.submit(r, [&](const RequestEvent& e) {
    if (!e.done) ++n_tokens;
    inner(e);
  });
  while (n_tokens < 5) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_GT(sch.stats().blocks_used, 0);
  sch.cancel(id);
  sch.wait_idle();
  EXPECT_TRUE(c.done);
  EXPECT_EQ(c.last.finish, FinishReason::Cancelled);
  EXPECT_LT(c.tokens.size(), 4000u);
  EXPECT_EQ(sch.stats().blocks_used, 0);
  sch.cancel(id);  // finished: ignored
  sch.cancel(12345);
}

TEST(Scheduler, SubmitRejectsBadRequests) {
  Fixture& f = tiny();
  SchedulerConfig cfg;
  cfg.kv_budget_tokens = 256;
  cfg.n_ctx = 128;
  cfg.max_queue = 0;
  Scheduler sch(*f.model, *f.tok, cfg, pool());
  Request r;
  r.max_tokens = 4;
  EXPECT_THROW(sch.submit(r, [](const RequestEvent&) {}), Error);  // empty prompt
  r.prompt = {1, 2, f.model->config().n_vocab};
  EXPECT_THROW(sch.submit(r, [](const RequestEvent&) {}), Error);  // id out of range
  r.prompt = {1, 2, 3};
  r.max_tokens = 126;
  EXPECT_THROW(sch.submit(r, [](const RequestEvent&) {}), Error);  // past the context
  r.max_tokens = 0;
  EXPECT_THROW(sch.submit(r, [](const RequestEvent&) {}), Error);
  r.max_tokens = 4;
  try {
    sch.submit(r, [](const RequestEvent&) {});
    ADD_FAILURE() << "max_queue 0 accepted a request";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("queue full", 0), 0u) << e.what();
  }
  cfg.kv_budget_tokens = 0;
  EXPECT_THROW(Scheduler(*f.model, *f.tok, cfg, pool()), Error);
  cfg.kv_budget_tokens = 64;
  cfg.n_batch = 4;
  cfg.n_parallel = 8;
  EXPECT_THROW(Scheduler(*f.model, *f.tok, cfg, pool()), Error);
}

// ---- eviction: sliding window with sinks, context shift -----------------------------------------

// The reference for an evicting cache: the request alone through a contiguous Session with the
// same policy and the same prefill chunk (n_batch).
std::vector<int32_t> alone_evicting(const Fixture& f, const std::vector<int32_t>& prompt, int n,
                                    const KvOptions& kv, int64_t n_batch) {
  Session s(*f.model, kv, pool(), n_batch);
  auto out = generate_greedy(s, f, prompt, n);
  EXPECT_GT(s.kv_stats().n_evicted, 0) << "the reference never evicted";
  return out;
}

KvOptions window_options(int64_t sinks, int64_t window, int64_t chunk) {
  KvOptions kv;
  kv.window = true;
  kv.n_sinks = sinks;
  kv.n_ctx = sinks + window;
  kv.window_chunk = chunk;
  return kv;
}

SchedulerConfig evicting_config(const KvOptions& kv) {
  SchedulerConfig cfg;
  cfg.n_ctx = kv.n_ctx;
  cfg.eviction = kv.eviction();
  return cfg;
}

// n_req requests sharing their first 20 tokens (so the blocks holding the sinks are shared through
// the prefix cache and copied on the first eviction), prompts shorter than the context, each
// generating far past it: every request's tokens equal its run alone in a Session.
void run_evicting_batch(const KvOptions& kv, int n_req, int n_gen, int64_t budget_tokens,
                        Fixture& f = tiny()) {
  SchedulerConfig cfg = evicting_config(kv);
  cfg.kv_budget_tokens = budget_tokens;
  cfg.n_parallel = n_req;
  cfg.n_batch = 64;
  Scheduler sch(*f.model, *f.tok, cfg, pool());
  const int32_t n_vocab = f.model->config().n_vocab;
  const auto common = test::random_tokens(20, n_vocab, 77);
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::unique_ptr<Collector>> cols;
  for (int i = 0; i < n_req; ++i) {
    std::vector<int32_t> p = common;
    const auto tail = test::random_tokens(3 + 2 * i, n_vocab, 300 + i);
    p.insert(p.end(), tail.begin(), tail.end());
    ASSERT_LT(static_cast<int64_t>(p.size()), kv.n_ctx);
    prompts.push_back(p);
    cols.push_back(std::make_unique<Collector>());
    sch.submit(greedy_request(p, n_gen), cols.back()->fn());  // prompt + n_gen > n_ctx: accepted
  }
  sch.wait_idle();
  const SchedulerStats st = sch.stats();
  for (int i = 0; i < n_req; ++i) {
    ASSERT_TRUE(cols[i]->done);
    EXPECT_EQ(cols[i]->last.finish, FinishReason::Length);
    EXPECT_EQ(cols[i]->tokens, alone_evicting(f, prompts[i], n_gen, kv, cfg.n_batch))
        << "request " << i;
  }
  EXPECT_GT(st.evicted_tokens, 0);
  EXPECT_GT(st.prompt_tokens_cached, 0);  // the shared first block was reused
  EXPECT_EQ(st.n_preemptions, 0);
  EXPECT_EQ(st.blocks_used, 0);
}

TEST(Scheduler, WindowWithSinksBatchedEqualsAlone) {
  // 4 sinks + a 44-token window, evicting 8 at a time: 90 generated tokens evict many times.
  run_evicting_batch(window_options(4, 44, 8), 8, 90, 8 * 64);
}

TEST(Scheduler, WindowWithoutSinksBatchedEqualsAlone) {
  run_evicting_batch(window_options(0, 40, 5), 4, 70, 4 * 64);
}

TEST(Scheduler, ContextShiftBatchedEqualsAlone) {
  KvOptions kv;
  kv.n_ctx = 48;
  kv.n_keep = 10;
  run_evicting_batch(kv, 6, 90, 6 * 64);
}

// A prompt longer than the whole window goes in pieces that evict between them, as Session feeds
// it (the same chunk: one request, n_batch equal).
TEST(Scheduler, WindowPromptLongerThanTheWindowEqualsAlone) {
  Fixture& f = tiny();
  const KvOptions kv = window_options(4, 32, 6);
  SchedulerConfig cfg = evicting_config(kv);
  cfg.kv_budget_tokens = 256;
  cfg.n_parallel = 2;
  cfg.n_batch = 20;
  Scheduler sch(*f.model, *f.tok, cfg, pool());
  const auto prompt = test::random_tokens(100, f.model->config().n_vocab, 12);
  Collector c;
  sch.submit(greedy_request(prompt, 30), c.fn());
  sch.wait_idle();
  ASSERT_TRUE(c.done);
  EXPECT_EQ(c.last.n_generated, 30);
  EXPECT_EQ(c.tokens, alone_evicting(f, prompt, 30, kv, cfg.n_batch));
  EXPECT_EQ(sch.stats().blocks_used, 0);
}

// A pool too small for every windowed sequence at once: preemptions (recomputed from the tokens
// the window kept), every request still generates all its tokens, the pool ends whole.
TEST(Scheduler, WindowUnderPreemptionFinishesEveryRequest) {
  Fixture& f = tiny();
  SchedulerConfig cfg = evicting_config(window_options(4, 44, 8));
  cfg.kv_budget_tokens = 160;  // 10 blocks; 6 sequences want up to 3 each
  cfg.n_parallel = 6;
  cfg.n_batch = 64;
  Scheduler sch(*f.model, *f.tok, cfg, pool());
  std::vector<std::unique_ptr<Collector>> cols;
  for (int i = 0; i < 6; ++i) {
    cols.push_back(std::make_unique<Collector>());
    sch.submit(greedy_request(test::random_tokens(10 + 3 * i, f.model->config().n_vocab, 500 + i),
                              80),
               cols.back()->fn());
  }
  sch.wait_idle();
  for (auto& c : cols) {
    ASSERT_TRUE(c->done);
    EXPECT_EQ(c->last.finish, FinishReason::Length);
    EXPECT_EQ(c->tokens.size(), 80u);
  }
  const SchedulerStats st = sch.stats();
  EXPECT_GT(st.n_preemptions, 0);
  EXPECT_GT(st.evicted_tokens, 0);
  EXPECT_EQ(st.blocks_used, 0);
}

TEST(Scheduler, EvictingConfigIsValidated) {
  Fixture& f = tiny();
  SchedulerConfig cfg = evicting_config(window_options(4, 44, 8));
  cfg.kv_budget_tokens = 256;
  cfg.eviction.n_keep = 2;  // two policies
  EXPECT_THROW(Scheduler(*f.model, *f.tok, cfg, pool()), Error);
  cfg.eviction.n_keep = -1;
  cfg.eviction.n_sinks = 48;  // sinks fill the context
  EXPECT_THROW(Scheduler(*f.model, *f.tok, cfg, pool()), Error);
  cfg.eviction.n_sinks = 4;
  cfg.eviction.window_chunk = 45;
  EXPECT_THROW(Scheduler(*f.model, *f.tok, cfg, pool()), Error);
  cfg = SchedulerConfig{};
  cfg.kv_budget_tokens = 256;
  cfg.n_ctx = 64;
  cfg.eviction.n_keep = 64;
  EXPECT_THROW(Scheduler(*f.model, *f.tok, cfg, pool()), Error);
}

// ---- per-layer cache groups (sliding-window layers) ----------------------------------------------

// Models with sliding-window layers (2 of 1 windowed at 24, Gemma 3's 5 of 6 at 8, every layer at
// 8): their window layers run in groups of n_parallel x kv_window_blocks blocks that give back
// what the window no longer sees; batched, chunked and (with a full group) preempted, every
// request's tokens equal its run alone in a Session.
SchedulerConfig window_groups_config(int64_t budget_tokens) {
  SchedulerConfig cfg;
  cfg.prefix_cache = false;  // not with window layers yet
  cfg.kv_budget_tokens = budget_tokens;
  cfg.n_parallel = 8;
  cfg.n_batch = 16;  // prefill in chunks: the window groups release blocks between them
  cfg.n_ctx = 128;
  return cfg;
}

TEST(Scheduler, WindowGroupsBatchedEqualAlone) {
  for (const char* name : {"tiny-llama-swa.gguf", "tiny-gemma3.gguf", "tiny-llama-swa-all.gguf"}) {
    SCOPED_TRACE(name);
    Fixture f(test::data_path(name));
    run_batch(window_groups_config(8 * 128), 8, 30, false, f);
  }
}

TEST(Scheduler, WindowGroupsPreemptedEqualAlone) {
  for (const char* name : {"tiny-llama-swa.gguf", "tiny-gemma3.gguf"}) {
    SCOPED_TRACE(name);
    Fixture f(test::data_path(name));
    run_batch(window_groups_config(160), 8, 30, true, f);  // 10 full blocks for up to 7 each
  }
}

// Eviction on models with window groups: the full group shifts in place, each window group keeps
// the window of the new end (renewed blocks), K re-rotated with each layer's own base (Gemma 3's
// window layers: 10,000); batched with a shared prefix, every request equals its Session alone.
TEST(Scheduler, WindowGroupsEvictingBatchedEqualAlone) {
  for (const char* name : {"tiny-llama-swa.gguf", "tiny-gemma3.gguf"}) {
    SCOPED_TRACE(name);
    Fixture f(test::data_path(name));
    KvOptions shift;
    shift.n_ctx = 48;
    shift.n_keep = 10;
    run_evicting_batch(shift, 6, 90, 6 * 64, f);
    run_evicting_batch(window_options(4, 44, 8), 4, 90, 4 * 64, f);
  }
}

// A policy that would leave fewer than kept + window positions is refused up front: the window of
// the next query would read kept rows its group already released.
TEST(Scheduler, WindowGroupsEvictingNeedsKeptPlusWindow) {
  Fixture f(test::data_path("tiny-llama-swa.gguf"));  // window 24
  SchedulerConfig cfg = evicting_config(window_options(4, 23, 8));
  cfg.kv_budget_tokens = 256;
  EXPECT_THROW(Scheduler(*f.model, *f.tok, cfg, pool()), Error);
  cfg = evicting_config(window_options(4, 24, 8));
  cfg.kv_budget_tokens = 256;
  EXPECT_NO_THROW(Scheduler(*f.model, *f.tok, cfg, pool()));
}

// The window groups' memory is what n_parallel sequences hold at most, whatever the budget; the
// full group gets the rest of a byte budget.
TEST(Scheduler, WindowGroupsAreBoundedAndTheBudgetHoldsThem) {
  Fixture f(test::data_path("tiny-gemma3.gguf"));
  SchedulerConfig cfg = window_groups_config(0);
  const KvShape shape = f.model->kv_shape(cfg.dtype_k, cfg.dtype_v);
  const uint64_t layer_block = PagedKvStore::block_bytes(shape, cfg.block_size) / shape.n_layer;
  const uint64_t windows = uint64_t(cfg.n_parallel) * 5 *
                           uint64_t(kv_window_blocks(8, cfg.n_batch, cfg.n_ctx, cfg.block_size)) *
                           layer_block;
  cfg.kv_budget_bytes = static_cast<int64_t>(windows + 20 * layer_block);  // 20 full blocks
  {
    Scheduler sch(*f.model, *f.tok, cfg, pool());
    EXPECT_EQ(sch.capacity_tokens(), 20 * cfg.block_size);
    EXPECT_EQ(sch.stats().kv_bytes_total, cfg.kv_budget_bytes);
  }
  cfg.kv_budget_bytes = static_cast<int64_t>(windows);  // no room for a full block
  EXPECT_THROW(Scheduler(*f.model, *f.tok, cfg, pool()), Error);
  cfg.kv_budget_bytes = 0;
  cfg.kv_budget_tokens = 256;
  cfg.prefix_cache = true;  // indexed by the full layers' blocks
  EXPECT_NO_THROW(Scheduler(*f.model, *f.tok, cfg, pool()));
  Fixture all(test::data_path("tiny-llama-swa-all.gguf"));  // no full layer to index by
  EXPECT_THROW(Scheduler(*all.model, *all.tok, cfg, pool()), Error);
}

// The prefix cache on windowed models: a second request with the first one's prompt and answer
// and a new turn (a chat's next turn) reuses full blocks (their window groups' twins for the
// last window) and generates what it generates alone.
TEST(Scheduler, WindowGroupsPrefixHitGivesSameTokens) {
  for (const char* name : {"tiny-llama-swa.gguf", "tiny-gemma3.gguf"}) {
    SCOPED_TRACE(name);
    Fixture f(test::data_path(name));
    SchedulerConfig cfg = window_groups_config(8 * 128);
    cfg.prefix_cache = true;
    Scheduler sch(*f.model, *f.tok, cfg, pool());
    const int32_t n_vocab = f.model->config().n_vocab;
    const auto first = test::random_tokens(50, n_vocab, 5);
    Collector a;
    sch.submit(greedy_request(first, 20), a.fn());
    sch.wait_idle();
    std::vector<int32_t> second = first;
    second.insert(second.end(), a.tokens.begin(), a.tokens.end());
    for (int32_t t : test::random_tokens(9, n_vocab, 6)) second.push_back(t);
    Collector b;
    sch.submit(greedy_request(second, 20), b.fn());
    sch.wait_idle();
    ASSERT_TRUE(b.done);
    EXPECT_GE(b.last.n_cached, 64);  // 4 of the first turn's 4 full blocks at least
    EXPECT_EQ(b.tokens, alone(f, second, 20, cfg.dtype_k));
    EXPECT_EQ(sch.stats().blocks_used, 0);
  }
}

// ---- KIVI served paged ---------------------------------------------------------------------------

Fixture& smollm2() {
  static Fixture f(test::model_path());
  return f;
}

SchedulerConfig kivi_config(int64_t budget_tokens) {
  SchedulerConfig cfg;
  cfg.dtype_k = cfg.dtype_v = DType::Q4_0;
  cfg.kivi_residual = 32;
  cfg.block_size = 64;
  cfg.prefix_cache = false;
  cfg.kv_budget_tokens = budget_tokens;
  cfg.n_parallel = 8;
  cfg.n_batch = 96;  // chunked prefill: chunks end inside and across K groups
  cfg.n_ctx = 512;
  return cfg;
}

// 8 requests whose prompts (20 .. 181 tokens) and generations cross sealing points, batched: each
// one's tokens equal its run alone through a KIVI Session; with a pool too small for all of them,
// also after preemptions (a recompute prefills what was decoded, and KIVI's prefill equals its
// decode steps).
void run_kivi_batch(Fixture& f, const SchedulerConfig& cfg, bool expect_preemption) {
  Scheduler sch(*f.model, *f.tok, cfg, pool());
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::unique_ptr<Collector>> cols;
  const int n_gen = 40;
  for (int i = 0; i < 8; ++i) {
    prompts.push_back(test::random_tokens(20 + 23 * i, f.model->config().n_vocab, 600 + i));
    cols.push_back(std::make_unique<Collector>());
    sch.submit(greedy_request(prompts.back(), n_gen), cols.back()->fn());
  }
  sch.wait_idle();
  const SchedulerStats st = sch.stats();
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(cols[i]->done);
    EXPECT_EQ(cols[i]->last.finish, FinishReason::Length);
    KvOptions kv;
    kv.dtype_k = cfg.dtype_k;
    kv.dtype_v = cfg.dtype_v;
    kv.kivi_residual = cfg.kivi_residual;
    kv.n_ctx = static_cast<int64_t>(prompts[i].size()) + n_gen + 1;
    Session s(*f.model, kv, pool());
    EXPECT_EQ(cols[i]->tokens, generate_greedy(s, f, prompts[i], n_gen)) << "request " << i;
  }
  EXPECT_EQ(st.blocks_used, 0);
  if (expect_preemption) {
    EXPECT_GT(st.n_preemptions, 0);
  } else {
    EXPECT_EQ(st.n_preemptions, 0);
  }
}

TEST(Scheduler, KiviBatchedEqualsAlone) { run_kivi_batch(smollm2(), kivi_config(8 * 256), false); }

TEST(Scheduler, KiviPreemptedEqualsAlone) { run_kivi_batch(smollm2(), kivi_config(12 * 64), true); }

// KIVI on models with sliding-window layers (2:1 at 24, Gemma 3's 5:1 at 8, all at 8; V f16, as
// head_dim 16 has no q4_0 rows): the window groups seal what they hold and release the rest, and
// batched, chunked and (with a full group) preempted requests equal their KIVI Session alone.
TEST(Scheduler, KiviWindowGroupsBatchedAndPreemptedEqualAlone) {
  for (const char* name : {"tiny-llama-swa.gguf", "tiny-gemma3.gguf", "tiny-llama-swa-all.gguf"}) {
    SCOPED_TRACE(name);
    Fixture f(test::data_path(name));
    SchedulerConfig cfg = kivi_config(8 * 256);
    cfg.dtype_v = DType::F16;
    cfg.n_ctx = 256;
    cfg.n_batch = 40;
    run_kivi_batch(f, cfg, false);
    const auto& lw = f.model->config().layer_window;
    if (std::count(lw.begin(), lw.end(), 0) > 0) {  // a full group: its budget can run short
      cfg.kv_budget_tokens = 12 * 64;
      run_kivi_batch(f, cfg, true);
    }
  }
}

TEST(Scheduler, KiviConfigIsValidated) {
  Fixture& f = smollm2();
  SchedulerConfig cfg = kivi_config(1024);
  cfg.prefix_cache = true;
  EXPECT_THROW(Scheduler(*f.model, *f.tok, cfg, pool()), Error);
  cfg = kivi_config(1024);
  cfg.block_size = 16;  // smaller than a K group
  EXPECT_THROW(Scheduler(*f.model, *f.tok, cfg, pool()), Error);
  cfg = kivi_config(1024);
  cfg.eviction = {.window = true, .n_sinks = 4, .window_chunk = 8};
  EXPECT_THROW(Scheduler(*f.model, *f.tok, cfg, pool()), Error);
  cfg = kivi_config(1024);
  cfg.dtype_k = DType::F16;  // KIVI's K is q4_0
  EXPECT_THROW(Scheduler(*f.model, *f.tok, cfg, pool()), Error);
  cfg = kivi_config(0);
  cfg.kv_budget_bytes = 8 * static_cast<int64_t>(PagedKvStore::residual_slot_bytes(
                                [&] {
                                  KvShape sh = f.model->kv_shape(DType::Q4_0, DType::Q4_0);
                                  sh.kivi_residual = 32;
                                  return sh;
                                }()));  // the 8 slots alone: no room for a block
  EXPECT_THROW(Scheduler(*f.model, *f.tok, cfg, pool()), Error);
}

// ---- n choices of one prompt (Request::n) -------------------------------------------------------

// One request's events by choice.
struct ChoiceCollector {
  std::mutex mu;
  std::vector<std::vector<int32_t>> tokens;  // [n] per choice
  std::vector<int> n_done;                   // [n] final events per choice (must end at 1)
  std::vector<RequestEvent> last;            // [n]
  explicit ChoiceCollector(int n) : tokens(n), n_done(n, 0), last(n) {}
  EventFn fn() {
    return [this](const RequestEvent& e) {
      std::lock_guard lk(mu);
      const auto i = static_cast<size_t>(e.index);
      ASSERT_LT(i, tokens.size());
      ASSERT_EQ(n_done[i], 0) << "an event after choice " << i << "'s final one";
      if (e.done) {
        ++n_done[i];
        last[i] = e;
      } else {
        tokens[i].push_back(e.token);
      }
    };
  }
};

SamplingParams seeded(uint64_t seed) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.min_p = 0.0f;
  p.seed = seed;
  return p;
}

// The tokens of every choice of one request (n choices, seed or greedy) through sch.
std::vector<std::vector<int32_t>> run_choices(Scheduler& sch, const std::vector<int32_t>& prompt,
                                              int n, int n_gen, const SamplingParams& sp) {
  ChoiceCollector c(n);
  Request r = greedy_request(prompt, n_gen);
  r.sampling = sp;
  r.n = n;
  sch.submit(r, c.fn());
  sch.wait_idle();
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(c.n_done[i], 1) << "choice " << i;
    EXPECT_EQ(c.last[i].finish, FinishReason::Length) << "choice " << i;
    EXPECT_EQ(c.last[i].n_generated, n_gen) << "choice " << i;
    EXPECT_EQ(c.last[i].n_prompt, static_cast<int64_t>(prompt.size()));
  }
  return c.tokens;
}

// n = 4 at temperature 0: the prompt is computed once (prompt_tokens counts it once, the three
// forks got it from the first choice, the passes computed it once), and every choice is the
// request's greedy text alone. With a seed, choice i is the request with seed + i alone, and the
// choices differ.
TEST(Scheduler, ChoicesShareThePromptAndEqualTheirSeedAlone) {
  Fixture& f = tiny();
  SchedulerConfig cfg;
  cfg.kv_budget_tokens = 2048;
  cfg.n_parallel = 8;
  cfg.n_ctx = 256;
  cfg.prefix_cache = false;  // the sharing seen here is the fork's alone
  const auto prompt = test::random_tokens(37, f.model->config().n_vocab, 5);
  const int n_gen = 12;
  {
    Scheduler sch(*f.model, *f.tok, cfg, pool());
    const auto out = run_choices(sch, prompt, 4, n_gen, greedy());
    const auto ref = alone(f, prompt, n_gen, cfg.dtype_k);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(out[i], ref) << "choice " << i;
    const SchedulerStats st = sch.stats();
    EXPECT_EQ(st.prompt_tokens, 37);
    EXPECT_EQ(st.prompt_tokens_forked, 3 * 37);
    EXPECT_EQ(st.batch_tokens, 37 + 4 * (n_gen - 1));  // the prompt once, then 4 decodes a step
    EXPECT_EQ(st.generated_tokens, 4 * n_gen);
    EXPECT_EQ(st.requests_finished, 1);
    EXPECT_EQ(st.blocks_used, 0);
    EXPECT_EQ(st.running, 0);
    EXPECT_EQ(st.waiting, 0);
  }
  Scheduler sch(*f.model, *f.tok, cfg, pool());
  const uint64_t seed = 1234;
  const auto out = run_choices(sch, prompt, 3, n_gen, seeded(seed));
  for (int i = 0; i < 3; ++i)
    EXPECT_EQ(out[i], run_choices(sch, prompt, 1, n_gen, seeded(seed + i))[0]) << "choice " << i;
  EXPECT_NE(out[0], out[1]);
  EXPECT_NE(out[1], out[2]);
  EXPECT_EQ(run_choices(sch, prompt, 3, n_gen, seeded(seed)), out);  // reproducible
  EXPECT_EQ(sch.stats().blocks_used, 0);
}

// n choices forced through preemption (a pool that cannot hold every choice's growth, other
// requests beside them, the prefix cache on so a preempted choice comes back by a hit or not):
// every choice gives the tokens it gives with a pool large enough never to preempt.
TEST(Scheduler, PreemptedChoicesEqualNotPreempted) {
  Fixture& f = tiny();
  const int32_t n_vocab = f.model->config().n_vocab;
  auto run = [&](int64_t budget_tokens, int64_t* n_preempt) {
    SchedulerConfig cfg;
    cfg.kv_budget_tokens = budget_tokens;
    cfg.n_parallel = 9;  // all 9 sequences at once
    cfg.n_batch = 64;
    cfg.n_ctx = 256;
    Scheduler sch(*f.model, *f.tok, cfg, pool());
    std::vector<std::unique_ptr<ChoiceCollector>> cols;
    for (int r = 0; r < 3; ++r) {
      const int n = r == 1 ? 1 : 4;
      cols.push_back(std::make_unique<ChoiceCollector>(n));
      Request q = greedy_request(test::random_tokens(30 + 17 * r, n_vocab, 70 + r), 40);
      if (r != 0) q.sampling = seeded(99 + r);
      q.n = n;
      sch.submit(q, cols.back()->fn());
    }
    sch.wait_idle();
    *n_preempt = sch.stats().n_preemptions;
    EXPECT_EQ(sch.stats().blocks_used, 0);
    std::vector<std::vector<int32_t>> all;
    for (auto& c : cols)
      for (size_t i = 0; i < c->tokens.size(); ++i) {
        EXPECT_EQ(c->n_done[i], 1);
        all.push_back(c->tokens[i]);
      }
    return all;
  };
  int64_t p_big = 0, p_small = 0;
  const auto ref = run(4096, &p_big);
  // 20 blocks of 16: each request fits alone (17, 6 and 16 blocks), not all three together.
  const auto got = run(20 * 16, &p_small);
  EXPECT_EQ(p_big, 0);
  EXPECT_GT(p_small, 0);
  ASSERT_EQ(ref.size(), got.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    EXPECT_EQ(ref[i].size(), 40u);
    EXPECT_EQ(got[i], ref[i]) << "sequence " << i;
  }
}

// Choices of models with sliding-window layers: the fork shares every group's table (holes
// included) and each window group releases the shared blocks on its own as its choice moves on;
// at temperature 0 every choice is the request's text alone, with a seed choice i is the request
// with seed + i. Generation runs well past the windows.
TEST(Scheduler, WindowGroupChoicesEqualAlone) {
  for (const char* name : {"tiny-llama-swa.gguf", "tiny-gemma3.gguf", "tiny-llama-swa-all.gguf"}) {
    SCOPED_TRACE(name);
    Fixture f(test::data_path(name));
    Scheduler sch(*f.model, *f.tok, window_groups_config(8 * 128), pool());
    const auto prompt = test::random_tokens(37, f.model->config().n_vocab, 11);
    const auto ref = alone(f, prompt, 60, DType::F16);
    for (const auto& out : run_choices(sch, prompt, 4, 60, greedy())) EXPECT_EQ(out, ref);
    const auto seeded_out = run_choices(sch, prompt, 3, 60, seeded(7));
    for (int i = 0; i < 3; ++i)
      EXPECT_EQ(seeded_out[i], run_choices(sch, prompt, 1, 60, seeded(7 + i))[0]) << i;
    EXPECT_EQ(sch.stats().blocks_used, 0);
  }
}

// Choices that evict (the window with sinks, context shift) far past the context: the shifts
// write into blocks the choices share, so each copies them first; every choice equals the request
// alone in a Session.
TEST(Scheduler, EvictingChoicesEqualAlone) {
  Fixture& f = tiny();
  for (const KvOptions& kv : {window_options(4, 44, 8), [] {
                                KvOptions o;
                                o.n_ctx = 48;
                                o.n_keep = 10;
                                return o;
                              }()}) {
    SchedulerConfig cfg = evicting_config(kv);
    cfg.kv_budget_tokens = 4 * 64;
    cfg.n_parallel = 4;
    cfg.n_batch = 64;
    Scheduler sch(*f.model, *f.tok, cfg, pool());
    const auto prompt = test::random_tokens(30, f.model->config().n_vocab, 21);
    const auto ref = alone_evicting(f, prompt, 90, kv, cfg.n_batch);
    for (const auto& out : run_choices(sch, prompt, 4, 90, greedy())) EXPECT_EQ(out, ref);
    EXPECT_GT(sch.stats().evicted_tokens, 0);
    EXPECT_EQ(sch.stats().blocks_used, 0);
  }
}

// Cancelling the request ends every choice (one final event each) and frees every block;
// cancelling one choice ends that one only. Bad n is refused at submit.
TEST(Scheduler, CancelEndsEveryChoiceAndNIsBounded) {
  Fixture& f = tiny();
  SchedulerConfig cfg;
  cfg.kv_budget_tokens = 4096;
  cfg.n_parallel = 4;
  cfg.n_ctx = 2048;
  Scheduler sch(*f.model, *f.tok, cfg, pool());
  const auto prompt = test::random_tokens(20, f.model->config().n_vocab, 9);
  for (int mode = 0; mode < 2; ++mode) {  // 0: the whole request, 1: choice 2 alone
    ChoiceCollector c(4);
    std::atomic<int> n_tokens{0};
    Request r = greedy_request(prompt, mode == 0 ? 900 : 30);
    r.n = 4;
    auto inner = c.fn();
    std::atomic<RequestId> id{0};
    std::atomic<bool> sent{false};
    // Cancelled from the callback (the scheduler thread), so it lands before the next step. The
    // callback waits for submit() to have returned the id: on a loaded machine the tiny model can
    // run every choice to max_tokens before the submitting thread is scheduled again. Waiting is
    // safe: submit() does not need the scheduler thread to return, and no lock is held here.
    id = sch.submit(r, [&](const RequestEvent& e) {
      while (id == 0) std::this_thread::yield();
      if (!e.done && ++n_tokens >= 12 && !sent.exchange(true))
        sch.cancel(id, mode == 0 ? -1 : 2);
      inner(e);
    });
    sch.wait_idle();
    for (int i = 0; i < 4; ++i) {
      EXPECT_EQ(c.n_done[i], 1);
      const bool cancelled = mode == 0 || i == 2;
      EXPECT_EQ(c.last[i].finish, cancelled ? FinishReason::Cancelled : FinishReason::Length)
          << "mode " << mode << " choice " << i;
      if (!cancelled) {
        EXPECT_EQ(c.tokens[i].size(), 30u);
      }
    }
    EXPECT_EQ(sch.stats().blocks_used, 0);
    EXPECT_EQ(sch.stats().running, 0);
  }
  // Cancelled while still queued behind a request that holds every slot: each choice ends.
  {
    ChoiceCollector busy(4), queued(3);
    Request r = greedy_request(prompt, 900);
    r.n = 4;
    const RequestId a = sch.submit(r, busy.fn());
    r.n = 3;
    const RequestId b = sch.submit(r, queued.fn());
    for (int i = 0; i < 5000 && sch.stats().running < 4; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    EXPECT_EQ(sch.stats().running, 4);  // a's choices hold every slot
    EXPECT_EQ(sch.stats().waiting, 1);
    sch.cancel(b);
    sch.cancel(a);
    sch.wait_idle();
    for (int i = 0; i < 3; ++i) EXPECT_EQ(queued.n_done[i], 1);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(busy.n_done[i], 1);
  }
  Request r = greedy_request(prompt, 8);
  for (int n : {0, -1, 5}) {  // 5 > -np
    r.n = n;
    EXPECT_THROW(sch.submit(r, [](const RequestEvent&) {}), Error) << n;
  }
  // The choices' own blocks must fit the pool together: 4 x 1024 tokens do not fit 4096 with a
  // 20-token prompt's blocks.
  r.n = 4;
  r.max_tokens = 1020;
  EXPECT_THROW(sch.submit(r, [](const RequestEvent&) {}), Error);
  r.n = 3;
  EXPECT_NO_THROW(sch.submit(r, [](const RequestEvent&) {}));
  sch.wait_idle();
}

// Requests submitted from many threads while others run: all finish, the pool ends whole.
TEST(Scheduler, ManyThreadsSubmitting) {
  Fixture& f = tiny();
  SchedulerConfig cfg;
  cfg.kv_budget_tokens = 1024;
  cfg.n_parallel = 8;
  cfg.n_ctx = 256;
  Scheduler sch(*f.model, *f.tok, cfg, pool());
  std::atomic<int> finished{0};
  std::vector<std::thread> th;
  for (int t = 0; t < 8; ++t)
    th.emplace_back([&, t] {
      for (int i = 0; i < 8; ++i) {
        Request r;
        r.prompt = test::random_tokens(10 + i, f.model->config().n_vocab, t * 100 + i);
        r.max_tokens = 8;
        r.sampling.seed = t;
        sch.submit(r, [&](const RequestEvent& e) {
          if (e.done) ++finished;
        });
      }
    });
  for (auto& x : th) x.join();
  sch.wait_idle();
  EXPECT_EQ(finished, 64);
  const SchedulerStats st = sch.stats();
  EXPECT_EQ(st.blocks_used, 0);
  EXPECT_EQ(st.requests_finished, 64);
}

}  // namespace
}  // namespace kvlm
