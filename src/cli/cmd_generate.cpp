// kvlm generate: prompt -> streamed text on stdout, statistics on stderr.
#include <cstdio>
#include <memory>
#include <random>

#include "base/error.h"
#include "base/thread_pool.h"
#include "cli/common.h"
#include "engine/session.h"
#include "grammar/json_schema.h"
#include "server/api.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace kvlm::cli {
namespace {

struct GenerateArgs {
  std::string model, prompt, prompt_file;
  std::string chat_template;  // --chat-template FILE ("": the model's)
  CacheFlags cache;
  int32_t n_predict = 128;
  bool chat = false, no_cache = false, trace = false, ignore_eos = false, compare = false;
  std::vector<int32_t> stop_tokens;
  bool json = false;                          // --json: any JSON object
  std::string json_schema, json_schema_file;  // --json-schema TEXT / --json-schema-file FILE
  SamplingParams sampling;
  int threads = 0;
  int64_t n_batch = 512;
  uint64_t seed = 0;
  bool seed_given = false;
};

// The text of a pass's tokens for --trace, newlines shown as \n, long runs cut in the middle.
std::string trace_text(const Tokenizer& tok, std::span<const int32_t> ids) {
  std::string s = tok.decode(std::vector<int32_t>(ids.begin(), ids.end()));
  std::string out;
  for (char ch : s) out += ch == '\n' ? std::string("\\n") : std::string(1, ch);
  constexpr size_t kMax = 60;
  if (out.size() <= kMax) return out;
  // Cut on UTF-8 character boundaries: never before a continuation byte (10xxxxxx).
  auto boundary = [&](size_t i) {
    while (i < out.size() && (static_cast<unsigned char>(out[i]) & 0xC0) == 0x80) ++i;
    return i;
  };
  return out.substr(0, boundary(kMax / 2)) + " ... " + out.substr(boundary(out.size() - kMax / 2));
}

// --trace: the seeds' walk-through made real, one line per forward pass: which tokens at which
// positions were computed, what the cache holds per layer, and what an eviction dropped.
void print_trace(const Tokenizer& tok, const KvShape& shape, const StepTrace& t) {
  std::fprintf(stderr, "[trace] step %lld positions [%lld, %lld) \"%s\"", static_cast<long long>(t.step),
               static_cast<long long>(t.pos0), static_cast<long long>(t.pos0 + t.tokens.size()),
               trace_text(tok, t.tokens).c_str());
  if (t.n_evicted > 0)
    std::fprintf(stderr, " | evicted positions [%lld, %lld) (later ones moved down)",
                 static_cast<long long>(t.evict_begin),
                 static_cast<long long>(t.evict_begin + t.n_evicted));
  std::fprintf(stderr, "\n");
  const size_t k_layer = kv_k_row_bytes(shape) * t.n_cached;
  const size_t v_layer = kv_v_row_bytes(shape) * t.n_cached;
  std::fprintf(stderr,
               "[trace] step %lld %-7s computed %lld token%s | cache %lld tokens | per layer K "
               "[%lld, %d x %d] %s %s, V [%lld, %d x %d] %s %s | x %d layers = %s used, %s "
               "allocated | evicted %lld | %.1f ms\n",
               static_cast<long long>(t.step), t.prefill ? "prefill" : "decode",
               static_cast<long long>(t.n_computed), t.n_computed == 1 ? "" : "s",
               static_cast<long long>(t.n_cached), static_cast<long long>(t.n_cached),
               shape.n_kv_head, shape.head_dim, dtype_name(shape.dtype_k),
               human_bytes(k_layer).c_str(), static_cast<long long>(t.n_cached), shape.n_kv_head,
               shape.head_dim, dtype_name(shape.dtype_v), human_bytes(v_layer).c_str(),
               shape.n_layer, human_bytes(t.kv.bytes_used).c_str(),
               human_bytes(t.kv.bytes_allocated).c_str(), static_cast<long long>(t.n_evicted), t.ms);
}

// One run of --compare-cache: the text, the stats and every pass's computed tokens.
struct CompareRun {
  std::string text;
  GenerateStats st;
  int64_t n_passes = 0, n_computed = 0;
};

CompareRun compare_run(const Model& model, const Tokenizer& tok, const KvOptions& kvo,
                       ThreadPool& pool, int64_t n_batch, std::span<const int32_t> prompt,
                       GenerateOptions opts) {
  CompareRun r;
  Session session(model, kvo, pool, n_batch);
  opts.on_step = [&](const StepTrace& t) {
    ++r.n_passes;
    r.n_computed += t.n_computed;
  };
  StreamDecoder dec(tok);
  r.st = generate(session, tok, prompt, opts, [&](int32_t id) {
    if (opts.ignore_eos || !tok.is_eog(id)) r.text += dec.push(id);
    return true;
  });
  r.text += dec.flush();
  return r;
}

// --compare-cache: the same prompt with the cache and without it (every step recomputing the
// whole history), side by side: what the cache buys, and that it changes no token.
int run_compare(const Model& model, const Tokenizer& tok, const KvOptions& kvo, ThreadPool& pool,
                int64_t n_batch, std::span<const int32_t> prompt, GenerateOptions opts) {
  opts.use_cache = true;
  const CompareRun on = compare_run(model, tok, kvo, pool, n_batch, prompt, opts);
  opts.use_cache = false;
  const CompareRun off = compare_run(model, tok, kvo, pool, n_batch, prompt, opts);
  std::fputs((on.text + "\n\n").c_str(), stdout);
  auto ms = [](const CompareRun& r) { return r.st.prefill_ms + r.st.decode_ms; };
  auto tps = [&](const CompareRun& r) { return ms(r) > 0 ? r.st.n_generated * 1000.0 / ms(r) : 0.0; };
  auto ratio = [](double x, double y) { return y > 0 ? x / y : 0.0; };
  std::printf("%-28s %14s %14s %9s\n", "", "with cache", "without cache", "ratio");
  std::printf("%-28s %14lld %14lld\n", "forward passes", static_cast<long long>(on.n_passes),
              static_cast<long long>(off.n_passes));
  std::printf("%-28s %14lld %14lld %8.1fx\n", "tokens computed",
              static_cast<long long>(on.n_computed), static_cast<long long>(off.n_computed),
              ratio(static_cast<double>(off.n_computed), static_cast<double>(on.n_computed)));
  std::printf("%-28s %14.1f %14.1f %8.1fx\n", "time (ms)", ms(on), ms(off), ratio(ms(off), ms(on)));
  std::printf("%-28s %14.1f %14.1f %8.1fx\n", "generated tokens per second", tps(on), tps(off),
              ratio(tps(on), tps(off)));
  std::printf("texts identical: %s (%lld tokens generated each way)\n",
              on.text == off.text ? "yes" : "NO", static_cast<long long>(on.st.n_generated));
  return 0;
}

// --json / --json-schema / --json-schema-file as a grammar (grammar/json_schema.h's subset);
// null when none is given.
std::shared_ptr<const Grammar> output_grammar(const GenerateArgs& a) {
  if (a.json) return json_object_grammar();
  if (a.json_schema.empty() && a.json_schema_file.empty()) return nullptr;
  const bool from_file = !a.json_schema_file.empty();
  const char* flag = from_file ? "--json-schema-file" : "--json-schema";
  const std::string text = from_file ? read_text_file(a.json_schema_file) : a.json_schema;
  try {  // the server's reading of a request body: an object, nesting and numbers bounded
    return compile_json_schema(server::parse_json_body(text));
  } catch (const server::HttpError& e) {
    fail("{}: {}", flag, e.what());
  } catch (const Error& e) {
    fail("{}: {}", flag, e.what());
  }
}

int run_generate(const GenerateArgs& a) {
  SamplingParams sp = a.sampling;
  sp.seed = a.seed_given ? a.seed : std::random_device{}();
  validate(sp);

  auto model = load_model(resolve_model(a.model), a.cache);
  auto tok = Tokenizer::from_gguf(model->gguf());
  const ModelConfig& c = model->config();
  const KvOptions kvo = to_kv_options(a.cache, c);
  const int64_t n_ctx = kvo.n_ctx;

  const std::string user = a.prompt_file.empty() ? a.prompt : read_text_file(a.prompt_file);
  if (!a.chat_template.empty() && !a.chat) fail("--chat-template needs --chat");
  const std::string text =
      a.chat ? load_chat_template(*tok, a.chat_template).apply({{"user", user}}, true) : user;
  std::vector<int32_t> prompt = tok->encode(text, tok->add_bos_default(), /*parse_special=*/true);
  if (prompt.empty()) fail("the prompt is empty: nothing to generate from");
  if (!kvo.window && kvo.n_keep < 0 && static_cast<int64_t>(prompt.size()) >= n_ctx)
    fail("the prompt has {} tokens, which does not fit the context of {} tokens with room to "
         "generate (raise -c, at most {})",
         prompt.size(), n_ctx, c.n_ctx_train);

  ThreadPool pool(resolve_threads(a.threads));
  const int64_t n_batch = kvo.window ? std::min(a.n_batch, kvo.window_chunk) : a.n_batch;
  GenerateOptions opts;
  opts.n_predict = a.n_predict;
  opts.use_cache = !a.no_cache;
  opts.sampling = sp;
  opts.ignore_eos = a.ignore_eos;
  opts.stop_tokens = a.stop_tokens;
  opts.grammar = output_grammar(a);
  for (int32_t id : a.stop_tokens)
    if (id < 0 || id >= c.n_vocab) fail("--stop-token {} is not in the vocabulary [0, {})", id, c.n_vocab);
  if (a.compare) {
    if (a.no_cache || a.trace)
      fail("--compare-cache runs with and without the cache itself: drop --no-cache / --trace");
    return run_compare(*model, *tok, kvo, pool, n_batch, prompt, opts);
  }
  Session session(*model, kvo, pool, n_batch);
  if (a.trace)
    opts.on_step = [&](const StepTrace& t) { print_trace(*tok, session.kv_shape(), t); };

  StreamDecoder dec(*tok);
  if (!a.chat) {
    std::fputs(text.c_str(), stdout);
    std::fflush(stdout);
  }
  GenerateStats st = generate(session, *tok, prompt, opts, [&](int32_t id) {
    if (a.ignore_eos || !tok->is_eog(id)) {
      std::string piece = dec.push(id);
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
    return true;
  });
  std::string rest = dec.flush();
  std::fwrite(rest.data(), 1, rest.size(), stdout);
  std::fputs("\n", stdout);
  std::fflush(stdout);

  auto rate = [](int64_t n, double ms) { return ms > 0 ? n * 1000.0 / ms : 0.0; };
  std::fprintf(stderr, "\n");
  std::fprintf(stderr, "model:            %s (%s, %d layers, %d/%d heads)\n", c.name.c_str(),
               c.arch->name, c.n_layer, c.n_head, c.n_kv_head);
  std::fprintf(stderr, "threads:          %d, seed %llu\n", pool.size(),
               static_cast<unsigned long long>(sp.seed));
  std::fprintf(stderr, "prompt tokens:    %lld\n", static_cast<long long>(st.n_prompt));
  std::fprintf(stderr, "generated tokens: %lld (stop: %s)\n",
               static_cast<long long>(st.n_generated), stop_reason_name(st.stop));
  std::fprintf(stderr, "prefill:          %.1f ms, %.1f tok/s\n", st.prefill_ms,
               rate(st.n_prompt, st.prefill_ms));
  std::fprintf(stderr, "decode:           %.1f ms, %.1f tok/s (%lld forward passes)\n",
               st.decode_ms, rate(st.n_decode, st.decode_ms), static_cast<long long>(st.n_decode));
  const KvShape shape = session.kv_shape();
  if (opts.use_cache) {
    std::fprintf(stderr, "kv cache:         on, K %s / V %s, %lld of %lld tokens, %s allocation",
                 dtype_name(kvo.dtype_k), dtype_name(kvo.dtype_v),
                 static_cast<long long>(st.kv.n_tokens), static_cast<long long>(st.kv.n_ctx),
                 kvo.alloc == KvAlloc::Static ? "static" : "dynamic");
    if (kvo.window)
      std::fprintf(stderr, ", window %lld + %lld sinks, %lld evicted",
                   static_cast<long long>(kvo.n_ctx - kvo.n_sinks),
                   static_cast<long long>(kvo.n_sinks), static_cast<long long>(st.kv.n_evicted));
    else if (kvo.n_keep >= 0)
      std::fprintf(stderr, ", context shift keeping %lld, %lld evicted",
                   static_cast<long long>(kvo.n_keep), static_cast<long long>(st.kv.n_evicted));
    if (shape.kivi())
      std::fprintf(stderr, ", KIVI: K per channel in groups of %d, %lld sealed, %lld in f16 (residual %d)",
                   shape.kivi_group, static_cast<long long>(session.n_sealed()),
                   static_cast<long long>(st.kv.n_tokens - session.n_sealed()),
                   shape.kivi_residual);
    std::fprintf(stderr, "\n");
  } else {
    std::fprintf(stderr,
                 "kv cache:         off (--no-cache): all %lld positions recomputed at every step; "
                 "the buffer below is only per-step working memory\n",
                 static_cast<long long>(st.kv.n_tokens));
  }
  std::fprintf(stderr, "kv bytes:         %s used, %s allocated (%zu bytes/token%s = %d layers x "
               "(K %zu + V %zu))\n",
               human_bytes(st.kv.bytes_used).c_str(), human_bytes(st.kv.bytes_allocated).c_str(),
               kv_bytes_per_token(shape), shape.kivi() ? " sealed, plus the f16 residual" : "",
               shape.n_layer, kv_k_row_bytes(shape),
               kv_v_row_bytes(shape));
  return 0;
}

}  // namespace

Command add_generate(CLI::App& app) {
  auto g = std::make_shared<GenerateArgs>();
  auto* gen = app.add_subcommand("generate", "generate text from a prompt, streaming to stdout");
  gen->add_option("-m,--model", g->model, "GGUF model (default: SmolLM2-135M-Instruct Q4_1)");
  auto* prompt = gen->add_option("-p,--prompt", g->prompt, "prompt text");
  auto* file = gen->add_option("-f,--file", g->prompt_file, "read the prompt from a file (-: stdin)");
  prompt->excludes(file);
  gen->add_option("-n,--n-predict", g->n_predict, "tokens to generate (-1: until end)")
      ->check(CLI::Range(-1, 1 << 30));
  gen->add_flag("--chat", g->chat, "wrap the prompt in the model's chat template");
  add_chat_template_flag(gen, g->chat_template);
  gen->add_flag("--no-cache", g->no_cache, "recompute the whole prefix at every step (baseline)");
  gen->add_flag("--compare-cache", g->compare,
                "run with and without the cache and print both side by side (same seed)");
  add_sampling_flags(gen, g->sampling);
  gen->add_option("--seed", g->seed, "random seed (default: random, printed)")
      ->each([g](const std::string&) { g->seed_given = true; });
  add_threads_flag(gen, g->threads);
  add_llama_cpp_flags(gen);
  gen->add_option("-b,--batch-size", g->n_batch, "prompt tokens per forward pass")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  gen->add_flag("--trace", g->trace,
                "print each forward pass: phase, tokens computed, cache length, per-layer K/V "
                "shape and bytes, evictions");
  gen->add_flag("--ignore-eos", g->ignore_eos, "keep generating past end-of-generation tokens");
  gen->add_option("--stop-token", g->stop_tokens,
                  "stop after sampling this token id (repeatable; e.g. 198, GPT-2's newline)");
  auto* json = gen->add_flag("--json", g->json,
                             "constrain the output to one JSON object (as response_format "
                             "json_object)");
  auto* schema = gen->add_option("--json-schema", g->json_schema,
                                 "constrain the output to JSON valid under this schema (JSON text; "
                                 "the subset docs/SERVER.md lists for response_format)");
  auto* schema_file = gen->add_option("--json-schema-file", g->json_schema_file,
                                      "as --json-schema, the schema read from a file");
  json->excludes(schema)->excludes(schema_file);
  schema->excludes(schema_file);
  add_cache_flags(gen, g->cache);
  return {gen, [g, prompt, file] {
            if (prompt->count() == 0 && file->count() == 0) {  // a usage error, as CLI11's are
              std::fprintf(stderr,
                           "kvlm: error: give the prompt with -p TEXT or -f FILE (see kvlm --help)\n");
              return 2;
            }
            return run_generate(*g);
          }};
}

}  // namespace kvlm::cli
