// kvlm bench: prefill and decode throughput, like llama.cpp's llama-bench.
//
// Tests (each its own Session, so the KV bytes reported are exactly what the test needs):
//   ppN @ dD     D untimed context tokens, then N prompt tokens in one timed feed() (chunks of -b);
//                tokens/s = N / time.
//   tgN @ dD     D untimed context tokens, then N timed single-token feed() calls;
//                tokens/s = N / time.
//   ppP+tgN      (--pg P,N) P prompt tokens and N single-token steps, timed together;
//                tokens/s = (P + N) / time. This is end-to-end "generate N after a P prompt".
//   tgN xS @ dD  (-np S, S > 1) S sequences decoding together, as a server batches its users:
//                each holds D context tokens (untimed), the first --shared of them the same for
//                all and stored once (the blocks a prefix-cache hit shares), then N timed steps,
//                each one forward pass over one token of every sequence through the paged cache
//                (Model::forward, 16-token blocks; what the scheduler runs, without sampling
//                or HTTP). tokens/s = S x N / time.
// Token ids are uniform random over the vocabulary from a fixed seed (llama-bench also feeds
// random ids); the ids never change the arithmetic, only which embedding rows are read.
// Every test runs once untimed first (pp: the whole prompt; tg: the context and one token, as
// llama-bench does) so page faults on the mapped weights and scratch growth are not timed.
// --no-cache: every step calls Session::recompute, i.e. the whole history (context included) is
// recomputed from position 0; ppN @ d0 is unchanged, everything else pays for the prefix.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <span>
#include <random>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/thread_pool.h"
#include "base/timer.h"
#include "cli/common.h"
#include "engine/session.h"
#include "kernels/ops.h"
#include "kv_manager/kv_manager.h"
#include "model/model.h"

namespace kvlm::cli {
namespace {

constexpr uint32_t kTokenSeed = 1234;  // fixed: every run feeds the same ids

struct BenchArgs {
  std::string model;
  CacheFlags cache;  // types and layout; each test's context is depth + prompt + gen
  std::vector<int64_t> n_prompt = {512}, n_gen = {128}, depth = {0};
  std::vector<std::string> pg;  // "P,N" pairs
  std::vector<int64_t> n_parallel = {1};  // sequences decoding together in tg tests
  int64_t n_shared = 0;  // context tokens common to the sequences of a -np test
  int reps = 5;
  int threads = 0;
  int64_t n_batch = 512;
  bool no_cache = false, json = false;
};

struct BenchTest {
  int64_t n_prompt = 0;  // timed prompt tokens (one feed)
  int64_t n_gen = 0;     // timed single-token steps
  int64_t depth = 0;     // untimed context before the timed part
  int64_t n_seq = 1;     // sequences decoding together (tg only); > 1: the paged batch test
  int64_t shared = 0;    // of depth, the tokens common to all n_seq sequences (stored once)

  int64_t n_ctx() const { return depth + n_prompt + n_gen; }
  int64_t n_timed() const { return (n_prompt + n_gen) * n_seq; }
  const char* kind() const { return n_gen == 0 ? "pp" : n_prompt == 0 ? "tg" : "pg"; }
  std::string name() const {
    std::string s = n_gen == 0   ? fmt::format("pp{}", n_prompt)
                    : n_prompt == 0 ? fmt::format("tg{}", n_gen)
                                    : fmt::format("pp{}+tg{}", n_prompt, n_gen);
    if (n_seq > 1) s += fmt::format(" x{}", n_seq);
    if (depth > 0) s += fmt::format(" @ d{}", depth);
    if (n_seq > 1 && shared > 0) s += fmt::format(" ({} shared)", shared);
    return s;
  }
};

struct BenchResult {
  BenchTest test;
  std::vector<double> seconds;  // [reps] timed part of each repetition
  std::vector<double> tps;      // [reps] n_timed / seconds
  double mean = 0, sd = 0;      // over tps; sd is the sample (n - 1) deviation, 0 for one rep
  KvStats kv;
};

std::vector<int32_t> random_tokens(std::mt19937& rng, int64_t n, int32_t n_vocab) {
  std::uniform_int_distribution<int32_t> dist(0, n_vocab - 1);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = dist(rng);
  return ids;
}

// One repetition: reset, untimed context, then the timed part. Returns seconds; n_gen_run < n_gen
// is the warm-up's shortened decode.
double run_once(Session& s, const BenchTest& t, int64_t n_gen_run, bool use_cache,
                int32_t n_vocab) {
  std::mt19937 rng(kTokenSeed);
  const std::vector<int32_t> context = random_tokens(rng, t.depth, n_vocab);
  const std::vector<int32_t> prompt = random_tokens(rng, t.n_prompt, n_vocab);
  const std::vector<int32_t> gen = random_tokens(rng, n_gen_run, n_vocab);
  auto step = [&](std::span<const int32_t> ids) {
    if (use_cache)
      s.feed(ids);
    else
      s.recompute(ids);
  };
  s.reset();
  if (!context.empty()) s.feed(context);
  Timer timer;
  if (!prompt.empty()) step(prompt);
  for (int32_t id : gen) step({&id, 1});
  return timer.ms() / 1000.0;
}

// One untimed warm-up, then a.reps timed repetitions: run(n_gen_run) runs the test once with
// n_gen_run timed steps (the warm-up: at most 1) and returns its seconds. Fills r.seconds and
// r.tps.
template <class Run>
void time_reps(BenchResult& r, const BenchTest& t, int reps, Run&& run) {
  run(std::min<int64_t>(t.n_gen, 1));
  for (int i = 0; i < reps; ++i) {
    const double sec = run(t.n_gen);
    r.seconds.push_back(sec);
    r.tps.push_back(sec > 0 ? static_cast<double>(t.n_timed()) / sec : 0.0);
  }
}

// The -np test: t.n_seq sequences over one KV manager, as kvlm serve runs them. Context: sequence 0
// is prefilled with t.depth tokens; each other one starts with its first t.shared / 16 whole
// blocks of tokens (a prefix-cache hit on sequence 0's registered blocks) and prefills the rest of
// its depth with tokens of its own. A repetition is t.n_gen timed steps of one forward over
// one token per sequence (with the manager's reserve and commit around it, as the scheduler's
// step does), after which every sequence is truncated back to its context.
BenchResult run_batched(const Model& model, const BenchTest& t, const BenchArgs& a,
                        const KvOptions& kvo, ThreadPool& pool) {
  constexpr int32_t kBlock = 16;
  const ModelConfig& mc = model.config();
  const int32_t n_vocab = mc.n_vocab;
  KvShape shape = model.kv_shape(kvo.dtype_k, kvo.dtype_v);
  shape.rotate = kvo.rotate;
  const int64_t n_seq = t.n_seq, depth = t.depth;
  // With sliding-window layers nothing is shared: a hit also needs window twins (docs/KV.md),
  // which the block count below does not plan for.
  const bool windowed = std::any_of(mc.layer_window.begin(), mc.layer_window.end(),
                                    [](int32_t w) { return w > 0; });
  const int64_t shared_blocks = windowed ? 0 : std::min(t.shared, depth) / kBlock;
  const int64_t seq_blocks = (t.n_ctx() + kBlock - 1) / kBlock;
  const int64_t n_blocks = seq_blocks + (n_seq - 1) * (seq_blocks - shared_blocks);
  if (n_blocks > (int64_t{1} << 30)) fail("{}: {} KV blocks are too many", t.name(), n_blocks);
  const KvPoolSpec spec{.shape = shape,
                        .block_size = kBlock,
                        .n_parallel = n_seq,
                        .n_batch = std::max<int64_t>(a.n_batch, 1),
                        .n_ctx = t.n_ctx(),
                        .layer_window = mc.layer_window};
  KvManager kv(kv_pool_config(spec, n_blocks, 0, !windowed, model.kv_rope()));
  Scratch scratch;
  std::mt19937 rng(kTokenSeed);
  // Every sequence's tokens: [depth] context, then the [n_gen] tokens its timed steps feed.
  std::vector<std::vector<int32_t>> toks(static_cast<size_t>(n_seq));
  for (SeqId id = 0; id < n_seq; ++id) {
    const int64_t own = id > 0 ? shared_blocks * kBlock : 0;
    toks[id].assign(toks[0].begin(), toks[0].begin() + own);
    const std::vector<int32_t> ctx = random_tokens(rng, depth - own, n_vocab);
    toks[id].insert(toks[id].end(), ctx.begin(), ctx.end());
  }
  const std::vector<int32_t> gen = random_tokens(rng, t.n_gen * n_seq, n_vocab);  // [n_gen, n_seq]
  for (SeqId id = 0; id < n_seq; ++id)
    for (int64_t step = 0; step < t.n_gen; ++step) toks[id].push_back(gen[step * n_seq + id]);
  auto forward = [&](std::span<const BatchSeq> batch) {
    model.forward(batch, kv.store(), scratch, pool);
  };
  // Context, untimed, in feeds of at most -b tokens. The pool is sized for every sequence's
  // blocks (nothing is preempted here), so a refused admission or reservation is a bug.
  auto prefill = [&] {
    for (SeqId id = 0; id < n_seq; ++id) {
      const std::span<const int32_t> ctx(toks[id].data(), static_cast<size_t>(depth));
      const KvHit hit = kv.lookup(ctx, "");
      KVLM_CHECK(kv.admit(id, ctx, "", depth, hit));
      for (int64_t pos = hit.n_tokens(); pos < depth;) {
        const int64_t n = std::min<int64_t>(a.n_batch, depth - pos);
        KVLM_CHECK(kv.reserve(id, n));
        const BatchSeq q{ctx.subspan(pos, n), pos, kv.seq_caches(id)};
        forward({&q, 1});
        pos += n;
        kv.commit(id, ctx, pos);
      }
    }
  };
  // Back to the contexts after a repetition: truncated, or (a window group no longer holding
  // what position depth reads) released and computed again, untimed.
  auto rewind = [&] {
    bool can = true;
    for (SeqId id = 0; id < n_seq; ++id) can = can && kv.can_truncate(id, depth);
    for (SeqId id = 0; id < n_seq; ++id) {
      if (can) kv.truncate(id, depth);
      else kv.release(id, toks[id], depth, /*keep_partial=*/false);
    }
    if (!can) prefill();
  };
  prefill();
  std::vector<BatchSeq> batch(static_cast<size_t>(n_seq));
  auto run_once = [&](int64_t n_steps) {
    Timer timer;
    for (int64_t step = 0; step < n_steps; ++step) {
      const int64_t pos = depth + step;
      for (SeqId id = 0; id < n_seq; ++id) KVLM_CHECK(kv.reserve(id, 1));
      for (SeqId id = 0; id < n_seq; ++id)
        batch[id] = {{toks[id].data() + pos, 1}, pos, kv.seq_caches(id)};
      forward(batch);
      for (SeqId id = 0; id < n_seq; ++id) kv.commit(id, toks[id], pos + 1);
    }
    const double sec = timer.ms() / 1000.0;
    rewind();
    return sec;
  };
  BenchResult r;
  r.test = t;
  time_reps(r, t, a.reps, run_once);
  const KvManagerStats st = kv.stats();
  r.kv.n_tokens = n_seq * depth;
  r.kv.n_ctx = t.n_ctx();
  r.kv.capacity = kv.capacity_tokens();
  r.kv.bytes_allocated = st.bytes_total;
  r.kv.bytes_used = st.bytes_used;
  return r;
}

BenchResult run_test(const Model& model, const BenchTest& t, const BenchArgs& a, KvOptions kvo,
                     ThreadPool& pool) {
  BenchResult r;
  if (t.n_seq > 1) {
    r = run_batched(model, t, a, kvo, pool);
  } else {
    const int32_t n_vocab = model.config().n_vocab;
    if (!kvo.window) kvo.n_ctx = t.n_ctx();  // a window keeps its sinks + window and evicts
    Session session(model, kvo, pool, a.n_batch);
    r.test = t;
    time_reps(r, t, a.reps, [&](int64_t n_gen_run) {
      return run_once(session, t, n_gen_run, !a.no_cache, n_vocab);
    });
    r.kv = session.kv_stats();
  }
  const double n = static_cast<double>(r.tps.size());
  for (double v : r.tps) r.mean += v / n;
  if (r.tps.size() > 1) {
    double ss = 0;
    for (double v : r.tps) ss += (v - r.mean) * (v - r.mean);
    r.sd = std::sqrt(ss / (n - 1));
  }
  return r;
}

// "P,N" with P, N in [1, 2^24]; nullopt otherwise.
std::optional<std::pair<int64_t, int64_t>> parse_pg(const std::string& s) {
  long long p = 0, g = 0;
  int used = 0;
  if (std::sscanf(s.c_str(), "%lld,%lld%n", &p, &g, &used) != 2 ||
      used != static_cast<int>(s.size()) || p < 1 || g < 1 || p > (1 << 24) || g > (1 << 24))
    return std::nullopt;
  return std::pair<int64_t, int64_t>{p, g};
}

// Test order as llama-bench: every pp, then every tg, then every pg; depth varies fastest.
std::vector<BenchTest> plan(const BenchArgs& a) {
  std::vector<BenchTest> tests;
  for (int64_t p : a.n_prompt)
    if (p > 0)
      for (int64_t d : a.depth) tests.push_back({.n_prompt = p, .n_gen = 0, .depth = d});
  for (int64_t np : a.n_parallel)
    for (int64_t g : a.n_gen)
      if (g > 0)
        for (int64_t d : a.depth)
          tests.push_back({.n_prompt = 0, .n_gen = g, .depth = d, .n_seq = np,
                           .shared = np > 1 ? std::min(a.n_shared, d) : 0});
  for (const std::string& s : a.pg) {
    const auto [p, g] = parse_pg(s).value();  // validated by the option's check
    for (int64_t d : a.depth) tests.push_back({.n_prompt = p, .n_gen = g, .depth = d});
  }
  return tests;
}

std::string rate_str(const BenchResult& r) {
  return fmt::format("{:.2f} ± {:.2f}", r.mean, r.sd);
}

int run_bench(const BenchArgs& a) {
  const std::vector<BenchTest> tests = plan(a);
  if (tests.empty()) {
    std::fprintf(stderr, "kvlm: error: nothing to run: -p and -n are all 0 and no --pg given "
                         "(see kvlm bench --help)\n");
    return 2;
  }

  const std::string path = resolve_model(a.model);
  auto model = Model::load(path);
  const ModelConfig& c = model->config();
  const KvOptions kvo = to_kv_options(a.cache, c);
  const DType ctk = kvo.dtype_k, ctv = kvo.dtype_v;
  for (const BenchTest& t : tests)
    if (c.arch->pos == PosKind::Learned && t.n_ctx() > c.n_ctx_train)
      fail("{} needs {} positions but this model has learned only {} (lower -d, -p or -n)",
           t.name(), t.n_ctx(), c.n_ctx_train);
  const bool batched = std::any_of(tests.begin(), tests.end(), [](auto& t) { return t.n_seq > 1; });
  if (batched && (a.no_cache || kvo.window || kvo.n_keep >= 0 || kvo.kivi_residual >= 0))
    fail("-np above 1 runs the paged cache with plain rows: it does not combine with --no-cache, "
         "a window, --keep or --kv-residual");

  ThreadPool pool(resolve_threads(a.threads));
  const KvShape shape = model->kv_shape(ctk, ctv);
  const std::string cache_desc =
      fmt::format("{}, {}", describe_cache(kvo),
                  a.no_cache ? "cache off (--no-cache: whole prefix recomputed every step)"
                             : "cache on");
  // The table's test column fits the longest name (a -np test's is long).
  size_t w = 22;
  for (const BenchTest& t : tests) w = std::max(w, t.name().size());
  if (!a.json) {
    fmt::print("model:   {} ({}, {} layers, {}/{} heads, vocab {}), {}\n", c.name, c.arch->name,
               c.n_layer, c.n_head, c.n_kv_head, c.n_vocab, path);
    fmt::print("weights: {} read per decoded token; file {}\n",
               human_bytes(static_cast<double>(model->weight_bytes())),
               human_bytes(static_cast<double>(model->gguf().file_size())));
    fmt::print("setup:   {} threads, {} kernels, batch {}, {}, {} bytes/token of KV\n",
               pool.size(), kernels::kernels_backend(), a.n_batch, cache_desc,
               kv_bytes_per_token(shape));
    fmt::print("method:  {} rep(s) after 1 untimed warm-up; random token ids (seed {})\n\n",
               a.reps, kTokenSeed);
    fmt::print("| {:<{}} | {:>20} | {:>12} |\n", "test", w, "t/s", "KV allocated");
    fmt::print("| {:-<{}} | {:->20}:| {:->12}:|\n", "", w, "", "");
    std::fflush(stdout);
  }

  std::vector<BenchResult> results;
  for (const BenchTest& t : tests) {
    results.push_back(run_test(*model, t, a, kvo, pool));
    if (!a.json) {
      const BenchResult& r = results.back();
      fmt::print("| {:<{}} | {:>20} | {:>12} |\n", t.name(), w, rate_str(r),
                 human_bytes(static_cast<double>(r.kv.bytes_allocated)));
      std::fflush(stdout);
    }
  }
  if (!a.json) return 0;

  nlohmann::ordered_json j;
  j["model"] = {{"path", path},
                {"name", c.name},
                {"arch", c.arch->name},
                {"n_layer", c.n_layer},
                {"n_embd", c.n_embd},
                {"n_head", c.n_head},
                {"n_kv_head", c.n_kv_head},
                {"n_ff", c.n_ff},
                {"n_vocab", c.n_vocab},
                {"file_bytes", model->gguf().file_size()}};
  j["weight_bytes"] = model->weight_bytes();
  j["threads"] = pool.size();
  j["kernels"] = kernels::kernels_backend();
  j["n_batch"] = a.n_batch;
  j["cache_type_k"] = dtype_name(ctk);
  j["cache_type_v"] = dtype_name(ctv);
  j["use_cache"] = !a.no_cache;
  j["kv_bytes_per_token"] = kv_bytes_per_token(shape);
  j["repetitions"] = a.reps;
  j["warmup_runs"] = 1;
  j["token_ids"] = fmt::format("uniform random over the vocabulary, mt19937 seed {}", kTokenSeed);
  j["tests"] = nlohmann::ordered_json::array();
  for (const BenchResult& r : results) {
    j["tests"].push_back({{"name", r.test.name()},
                          {"kind", r.test.kind()},
                          {"n_prompt", r.test.n_prompt},
                          {"n_gen", r.test.n_gen},
                          {"depth", r.test.depth},
                          {"n_seq", r.test.n_seq},
                          {"shared", r.test.shared},
                          {"n_tokens_timed", r.test.n_timed()},
                          {"seconds", r.seconds},
                          {"tokens_per_s", {{"mean", r.mean}, {"sd", r.sd}, {"samples", r.tps}}},
                          {"kv_bytes", {{"allocated", r.kv.bytes_allocated},
                                        {"used", r.kv.bytes_used},
                                        {"n_ctx", r.kv.n_ctx}}}});
  }
  std::puts(j.dump(2).c_str());
  return 0;
}

}  // namespace

Command add_bench(CLI::App& app) {
  auto b = std::make_shared<BenchArgs>();
  auto* cmd = app.add_subcommand(
      "bench", "prefill (ppN) and decode (tgN) throughput at context depths, like llama-bench");
  const auto count = CLI::Range(int64_t{0}, int64_t{1} << 24);
  cmd->add_option("-m,--model", b->model, "GGUF model (default: SmolLM2-135M-Instruct Q4_1)");
  cmd->add_option("-p,--n-prompt", b->n_prompt, "prompt tokens per pp test, comma list (0: none)")
      ->delimiter(',')
      ->check(count)
      ->capture_default_str();
  cmd->add_option("-n,--n-gen", b->n_gen, "generated tokens per tg test, comma list (0: none)")
      ->delimiter(',')
      ->check(count)
      ->capture_default_str();
  cmd->add_option("-d,--n-depth", b->depth, "context tokens before each test, comma list")
      ->delimiter(',')
      ->check(count)
      ->capture_default_str();
  cmd->add_option("--pg", b->pg, "prompt then generation, timed together: PROMPT,GEN (repeatable)")
      ->check(CLI::Validator(
          [](std::string& s) {
            return parse_pg(s) ? std::string() : "'" + s + "' is not PROMPT,GEN (e.g. --pg 256,256)";
          },
          "PROMPT,GEN"));
  cmd->add_option("--parallel", b->n_parallel,
                  "(-np) sequences decoding together in tg tests, comma list (> 1: one batched step "
                  "per token over a paged cache, as kvlm serve runs its users)")
      ->delimiter(',')
      ->check(CLI::Range(int64_t{1}, int64_t{1024}))
      ->capture_default_str();
  cmd->add_option("--shared", b->n_shared,
                  "with -np: context tokens common to all sequences, stored once (whole "
                  "16-token blocks; a shared system prompt)")
      ->check(count)
      ->capture_default_str();
  cmd->add_option("-r,--repetitions", b->reps, "timed repetitions per test")
      ->check(CLI::Range(1, 10000))
      ->capture_default_str();
  add_threads_flag(cmd, b->threads);
  add_llama_cpp_flags(cmd);
  cmd->add_option("-b,--batch-size", b->n_batch, "prompt tokens per forward pass")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20))
      ->capture_default_str();
  add_cache_flags(cmd, b->cache, false);
  cmd->add_flag("--no-cache", b->no_cache,
                "recompute the whole prefix at every step (the cache-off baseline)");
  cmd->add_flag("--json", b->json, "print one JSON document instead of the table");
  return {cmd, [b] { return run_bench(*b); }};
}

}  // namespace kvlm::cli
