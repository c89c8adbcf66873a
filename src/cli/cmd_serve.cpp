// kvlm serve: an OpenAI-compatible HTTP server (src/server) over the continuous-batching
// Scheduler (src/engine/scheduler.h). One line on stderr when listening; SIGINT/SIGTERM stop it
// cleanly (exit 0), a second signal exits at once.
#include <fmt/format.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cctype>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <memory>
#include <thread>

#include "base/error.h"
#include "base/thread_pool.h"
#include "cli/common.h"
#include "engine/scheduler.h"
#include "kv/kv_plan.h"
#include "kv_manager/kv_manager.h"
#include "kv/kv_shape.h"
#include "model/model.h"
#include "server/server.h"
#include "tokenizer/tokenizer.h"

namespace kvlm::cli {
namespace {

// The default pool when --kv-budget is not given: n_parallel x n_ctx tokens, at most this.
constexpr uint64_t kDefaultBudgetCap = uint64_t{1} << 30;

struct ServeArgs {
  std::string model, host = "127.0.0.1", kv_budget, max_body = "1MiB", api_key;
  std::string chat_template;  // --chat-template FILE ("": the model's, or ChatML)
  std::vector<std::string> aliases;  // --alias: served model names
  int port = 8080;
  SchedulerConfig sched;  // n_parallel, block_size, n_batch, max_queue from the flags
  int threads = 0;
  int http_threads = 2;  // I/O threads and worker threads
  int max_connections = 1024;
  double header_timeout = 10, body_timeout = 30, shutdown_grace = 5;  // seconds
  std::string cors_origin;
  std::string log_format = "text";
  bool no_prefix_cache = false;
  CacheFlags cache;
  SamplingParams sampling;
  // Cache flags the paged cache has no use for: (flag, its option).
  std::vector<std::pair<std::string, const CLI::Option*>> no_serve_flags;
  const CLI::Option* block_size_opt = nullptr;  // given or not (KIVI picks its own default)
};

// The template chat requests are rendered with, checked before anything is allocated: a
// template that cannot render a plain [user] or [system, user] conversation stops kvlm serve with
// one line naming the problem, instead of every chat request failing with a 500.
std::shared_ptr<const ChatTemplate> serve_chat_template(const Tokenizer& tok,
                                                        const std::string& path) {
  const std::string origin = chat_template_origin(path);
  std::shared_ptr<const ChatTemplate> chat;
  std::string note;
  try {
    chat = server::served_chat_template(tok, path.empty() ? "" : read_text_file(path));
    note = chat->check();
  } catch (const Error& e) {
    fail("{} cannot render a plain conversation, so chat requests would fail: {} (give another "
         "with --chat-template FILE)",
         origin, e.what());
  }
  if (!note.empty()) std::fprintf(stderr, "kvlm serve: note: %s\n", note.c_str());
  return chat;
}

// "--kv-budget 512MiB" (parse_bytes' units) or "--kv-budget 32768tok" / "32768 tokens".
void parse_budget(const std::string& text, SchedulerConfig* cfg) {
  std::string s = text;
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (const char* unit : {"tokens", "tok"}) {
    const std::string u = unit;
    if (s.size() > u.size() && s.ends_with(u)) {
      std::string num = s.substr(0, s.size() - u.size());
      while (!num.empty() && num.back() == ' ') num.pop_back();
      char* end = nullptr;
      const long long n = std::strtoll(num.c_str(), &end, 10);
      if (num.empty() || *end != '\0' || n <= 0)
        fail("--kv-budget '{}': expected a positive whole number of tokens, e.g. 32768tok", text);
      cfg->kv_budget_tokens = n;
      return;
    }
  }
  const uint64_t bytes = parse_bytes(text);
  if (bytes == 0 || bytes > uint64_t{1} << 62)
    fail("--kv-budget '{}': expected more than 0 bytes", text);
  cfg->kv_budget_bytes = static_cast<int64_t>(bytes);
}

int64_t file_mtime(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_mtime) : 0;
}

// The scheduler's configuration from the flags: cache types, KIVI's block size, the prefix cache
// (off, with a note, for a model whose every layer is windowed) and the KV budget, checked
// against the machine's memory.
SchedulerConfig scheduler_config(ServeArgs& a, const Model& model, const KvOptions& kvo,
                                 const char** prefix_note) {
  const ModelConfig& c = model.config();
  SchedulerConfig cfg = a.sched;
  cfg.dtype_k = kvo.dtype_k;
  cfg.dtype_v = kvo.dtype_v;
  cfg.rotate = kvo.rotate;
  cfg.n_ctx = kvo.n_ctx;
  cfg.eviction = kvo.eviction();
  cfg.kivi_residual = kvo.kivi_residual;
  if (kvo.kivi_residual >= 0) {
    // KIVI seals K in groups of 64 tokens, which a block must hold whole; its sealed blocks are
    // not what a fresh prompt computes (that keeps its last tokens in f16), so no prefix reuse.
    const int32_t group = KvShape{}.kivi_group;
    if (a.block_size_opt == nullptr || a.block_size_opt->count() == 0) cfg.block_size = group;
    a.no_prefix_cache = true;  // the listening line says "prefix cache off"
  }
  cfg.prefix_cache = !a.no_prefix_cache;
  // A model whose every layer is windowed has no full-attention blocks to index a prefix by
  // (docs/KV.md): said in the listening line rather than refused, since it is on by default.
  const bool all_windowed =
      !c.layer_window.empty() &&
      std::all_of(c.layer_window.begin(), c.layer_window.end(), [](int32_t w) { return w > 0; });
  *prefix_note = cfg.prefix_cache && all_windowed ? " (every layer windowed)" : "";
  if (all_windowed) cfg.prefix_cache = false;
  // What the pool costs: a block of the full-attention layers per 16 tokens of budget, plus the
  // window groups' fixed share (kv_pool_config). The default budget holds -np full contexts.
  const KvPoolSpec spec{.shape = model.kv_shape(cfg.dtype_k, cfg.dtype_v),
                        .block_size = std::max(cfg.block_size, 1),
                        .n_parallel = cfg.n_parallel,
                        .n_batch = std::max<int64_t>(cfg.n_batch, 1),
                        .n_ctx = cfg.n_ctx,
                        .layer_window = c.layer_window};
  const double full_per_token = double(kv_full_block_bytes(spec)) / spec.block_size;
  const double windows = double(kv_window_groups_bytes(spec));
  if (!a.kv_budget.empty()) {
    parse_budget(a.kv_budget, &cfg);
  } else {
    const uint64_t tokens = uint64_t(cfg.n_parallel) * uint64_t(cfg.n_ctx);
    if (double(tokens) * full_per_token + windows <= double(kDefaultBudgetCap))
      cfg.kv_budget_tokens = static_cast<int64_t>(tokens);
    else
      cfg.kv_budget_bytes = static_cast<int64_t>(kDefaultBudgetCap);
  }
  // The pool is mapped at start and fills as blocks are written (base/aligned.h), so a budget
  // beyond the machine's memory would start and be killed later, mid-request, when the pool
  // fills: refuse it here. (Total memory, not what is free now: the budget is a plan.)
  const double pool_bytes = cfg.kv_budget_bytes > 0
                                ? double(cfg.kv_budget_bytes)
                                : double(cfg.kv_budget_tokens) * full_per_token + windows;
  const long pages = ::sysconf(_SC_PHYS_PAGES), page_size = ::sysconf(_SC_PAGESIZE);
  const double ram = double(pages) * double(page_size);
  if (pages > 0 && page_size > 0 && pool_bytes >= ram)
    fail("--kv-budget {}: the KV pool would take {}, more than this machine's {} of memory",
         a.kv_budget, human_bytes(pool_bytes), human_bytes(ram));
  return cfg;
}

// The listening line: where, which model, the pool (the full-attention pool's blocks, then those
// of the window groups, whose blocks span only their layers; bytes: every group's), the cache.
void print_listening(const ServeArgs& a, int port, const std::string& id,
                     const SchedulerConfig& cfg, const KvOptions& kvo, Scheduler& sched,
                     const char* prefix_note, int n_threads) {
  const SchedulerStats st = sched.stats();
  const int64_t cap = sched.capacity_tokens();
  const int64_t full = cap < std::numeric_limits<int64_t>::max() ? cap / cfg.block_size : 0;
  const std::string window_blocks =
      st.blocks_total > full ? fmt::format(" + {} for window layers", st.blocks_total - full) : "";
  std::fprintf(
      stderr,
      "kvlm serve: listening on http://%s:%d (model %s, -np %d, ctx %lld per sequence, %s, "
      "%lld blocks%s x %d tokens = %s, prefix cache %s%s, %d threads%s)\n",
      a.host.c_str(), port, id.c_str(), cfg.n_parallel, static_cast<long long>(cfg.n_ctx),
      describe_cache(kvo).c_str(), static_cast<long long>(full), window_blocks.c_str(),
      cfg.block_size, human_bytes(double(st.kv_bytes_total)).c_str(),
      cfg.prefix_cache ? "on" : "off", prefix_note, n_threads,
      a.api_key.empty() ? "" : ", API key required");
  std::fflush(stderr);
}

std::chrono::milliseconds to_ms(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0));
}

int run_serve(ServeArgs& a) {
  // Before any thread exists, so every thread inherits the mask and only the waiter below sees
  // SIGINT/SIGTERM. SIGPIPE: a client that hung up must fail a write, not kill the server.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  for (const auto& [flag, o] : a.no_serve_flags)
    if (o->count() > 0)
      fail(
          "{} does not apply to kvlm serve: the paged cache's pool is allocated once (--kv-budget); "
          "drop it",
          flag);
  if (a.api_key.empty())
    if (const char* k = std::getenv("KVLM_API_KEY"); k && *k) a.api_key = k;
  const uint64_t max_body = parse_bytes(a.max_body);
  if (max_body == 0) fail("--max-body '{}': expected more than 0 bytes", a.max_body);

  const std::string path = resolve_model(a.model);
  auto model = load_model(path, a.cache);
  auto tok = Tokenizer::from_gguf(model->gguf());
  const auto chat = serve_chat_template(*tok, a.chat_template);
  const KvOptions kvo = to_kv_options(a.cache, model->config());

  const char* prefix_note = "";
  const SchedulerConfig cfg = scheduler_config(a, *model, kvo, &prefix_note);
  SamplingParams defaults = a.sampling;
  validate(defaults);

  ThreadPool pool(resolve_threads(a.threads));
  Scheduler sched(*model, *tok, cfg, pool);

  server::ServedModel served;
  served.id = std::filesystem::path(path).stem().string();
  served.created = file_mtime(path);
  served.n_ctx = cfg.n_ctx;
  served.capacity_tokens = sched.capacity_tokens();
  served.block_size = cfg.block_size;
  // n choices run as n sequences at once and share blocks, which the KIVI cache cannot.
  served.max_choices = cfg.kivi_residual >= 0 ? 1 : std::min(server::kMaxChoices, cfg.n_parallel);
  served.evicts = sched.evicts();
  served.chat_template = chat;
  served.defaults = defaults;
  served.aliases = a.aliases;
  server::ServerOptions so;
  so.host = a.host;
  so.port = a.port;
  so.api_key = a.api_key;
  so.n_http_threads = a.http_threads;
  so.limits.max_body = static_cast<size_t>(max_body);
  so.limits.max_connections = a.max_connections;
  so.limits.header_timeout = to_ms(a.header_timeout);
  so.limits.body_timeout = to_ms(a.body_timeout);
  so.cors_origin = a.cors_origin;
  so.shutdown_grace_s = a.shutdown_grace;
  so.log_format = a.log_format;
  server::Server srv(sched, *tok, served, so);
  const int port = srv.bind();

  print_listening(a, port, served.id, cfg, kvo, sched, prefix_note, pool.size());

  std::atomic<bool> served_out{false};
  std::thread waiter([&] {
    bool stopping = false;
    const timespec tick{0, 100'000'000};  // 100 ms: how soon the waiter notices run() returned
    while (!served_out) {
      if (sigtimedwait(&sigs, nullptr, &tick) < 0) continue;
      if (stopping) std::_Exit(130);  // a second signal: the user does not want to wait
      stopping = true;
      srv.stop();
    }
  });
  auto finish = [&] {
    served_out = true;
    waiter.join();
  };
  try {
    srv.run();
  } catch (...) {
    finish();
    throw;
  }
  finish();
  return 0;
}

}  // namespace

Command add_serve(CLI::App& app) {
  auto a = std::make_shared<ServeArgs>();
  auto* cmd = app.add_subcommand(
      "serve",
      "OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions (streaming too), "
      "/v1/models, /health, /metrics, /tokenize, /detokenize; a chat page with a live KV cache view "
      "at / (GET /kv/state, /kv/events)");
  cmd->add_option("-m,--model", a->model, "GGUF model (default: SmolLM2-135M-Instruct Q4_1)");
  cmd->add_option("--host", a->host, "address to listen on (default 127.0.0.1: this machine only)");
  cmd->add_option("-a,--alias,--served-model-name", a->aliases,
                  "a name the model is served under (repeatable; /v1/models lists them; the first "
                  "names responses; default: the file's stem)")
      ->check([](const std::string& s) -> std::string {
        if (s.empty() || s.size() > 256) return "a model name of 1 to 256 characters";
        for (unsigned char ch : s)
          if (ch < 0x20 || ch == 0x7f) return "a model name without control characters";
        return {};
      });
  cmd->add_option("--port", a->port, "port (default 8080; 0: any free port, printed)")
      ->check(CLI::Range(0, 65535));
  cmd->add_option("--parallel", a->sched.n_parallel,
                  "sequences generated at once (alias -np; default 16); more requests queue")
      ->check(CLI::Range(1, 4096));
  cmd->add_option("--kv-budget", a->kv_budget,
                  "KV pool size: bytes (512MiB, 2GiB, ...) or tokens (32768tok); default: "
                  "-np x -c tokens, at most 1 GiB");
  a->block_size_opt =
      cmd->add_option("--block-size", a->sched.block_size,
                      "tokens per KV block (default 16; 64 with --kv-residual, a multiple of "
                      "KIVI's K group)")
          ->check(CLI::Range(1, 4096));
  cmd->add_option("-b,--batch-size", a->sched.n_batch,
                  "tokens per forward pass: decode tokens plus prefill chunks (default 512)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  add_threads_flag(cmd, a->threads, "compute threads (default: all cores)");
  add_llama_cpp_flags(cmd);
  cmd->add_option("--threads-http", a->http_threads,
                  "HTTP I/O threads, each serving many connections, and as many threads for "
                  "parsing requests (default 2)")
      ->check(CLI::Range(1, 256));
  cmd->add_option("--max-connections", a->max_connections,
                  "open connections at once (default 1024); one more gets 503 and is closed")
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--header-timeout", a->header_timeout,
                  "seconds a request's line and headers may take, and an idle keep-alive "
                  "connection may wait (default 10); then 408 / close")
      ->check(CLI::Range(0.05, 3600.0));
  cmd->add_option("--body-timeout", a->body_timeout,
                  "seconds a request body may take once the headers are in (default 30); then 408")
      ->check(CLI::Range(0.05, 3600.0));
  cmd->add_option("--shutdown-grace", a->shutdown_grace,
                  "on SIGTERM/SIGINT, seconds running requests may still finish (default 5); then "
                  "streams end with finish_reason \"cancelled\" and [DONE]")
      ->check(CLI::Range(0.0, 3600.0));
  cmd->add_option("--log-format", a->log_format,
                  "the access log on stderr, one line per request (id, method, path, status, "
                  "tokens, time to first token, total ms): text (default), json or off")
      ->check(CLI::IsMember({"text", "json", "off"}));
  cmd->add_option("--cors-origin", a->cors_origin,
                  "allow browsers on this origin (e.g. http://localhost:3000, or *) to call the "
                  "API: CORS headers and OPTIONS preflight (default: off)");
  cmd->add_option("--max-queue", a->sched.max_queue,
                  "waiting requests beyond which new ones get 503 (default 256)")
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--max-body", a->max_body,
                  "largest request body (default 1MiB), whatever its transfer coding; larger get "
                  "413");
  add_chat_template_flag(cmd, a->chat_template);
  cmd->add_option("--api-key", a->api_key,
                  "require 'Authorization: Bearer KEY' on every route but /health (default: "
                  "$KVLM_API_KEY, else none)");
  cmd->add_flag("--no-prefix-cache", a->no_prefix_cache,
                "do not reuse the KV blocks of earlier prompts with the same prefix");
  add_sampling_flags(cmd, a->sampling);
  add_cache_flags(cmd, a->cache);
  // Refused (and so hidden from --help): the paged cache has no
  // dynamic arenas: its pool is allocated once.
  for (const char* name : {"--kv-alloc"})
    if (CLI::Option* o = cmd->get_option_no_throw(name))
      a->no_serve_flags.emplace_back(name, o->group(""));
  cmd->footer(
      "The sampling flags set the defaults of requests that do not name them (temperature, top_k, "
      "top_p, min_p, repeat_penalty, repeat_last_n). README.md, \"kvlm serve\", lists the "
      "endpoints.");
  return {cmd, [a] { return run_serve(*a); }};
}

}  // namespace kvlm::cli
