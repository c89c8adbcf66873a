// kvlm command line: argv -> engine calls -> stdout (text) and stderr (stats, errors).
// Exit codes: 0 success, 1 runtime error (bad model file, prompt too long, ...), 2 usage error.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>

#include "base/error.h"
#include "base/thread_pool.h"
#include "engine/session.h"
#include "gguf/gguf.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace kvlm {
namespace {

constexpr const char* kDefaultModelFile = "SmolLM2-135M-Instruct.Q4_1.gguf";

std::string models_dir() {
  if (const char* d = std::getenv("KVLM_MODELS"); d && *d) return d;
  const char* home = std::getenv("HOME");
  return std::string(home ? home : ".") + "/.cache/kvlm/models";
}

std::string resolve_model(const std::string& given) {
  if (!given.empty()) return given;
  std::string p = models_dir() + "/" + kDefaultModelFile;
  if (!std::filesystem::exists(p))
    fail("no model given (-m) and the default model is not at {}; run scripts/fetch-model.sh "
         "(or make demo) to fetch it",
         p);
  return p;
}

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} B", b) : fmt::format("{:.2f} {}", b, units[u]);
}

DType parse_cache_type(const std::string& s, const char* flag) {
  auto t = dtype_from_name(s);
  if (!t || (*t != DType::F32 && *t != DType::F16))
    fail("{}: unknown or unsupported cache type '{}' (supported: f32, f16)", flag, s);
  return *t;
}

// ---- generate ------------------------------------------------------------------------------
struct GenerateArgs {
  std::string model, prompt, ctk = "f16", ctv = "f16";
  int32_t n_predict = 128;
  bool chat = false, no_cache = false;
  SamplingParams sampling;
  int threads = 0;
  int64_t n_ctx = 0;
  int64_t n_batch = 512;
  uint64_t seed = 0;
  bool seed_given = false;
};

int run_generate(const GenerateArgs& a) {
  const DType ctk = parse_cache_type(a.ctk, "-ctk");
  const DType ctv = parse_cache_type(a.ctv, "-ctv");
  SamplingParams sp = a.sampling;
  sp.seed = a.seed_given ? a.seed : std::random_device{}();
  validate(sp);

  auto model = Model::load(resolve_model(a.model));
  auto tok = Tokenizer::from_gguf(model->gguf());
  const ModelConfig& c = model->config();
  const int64_t n_ctx = a.n_ctx > 0 ? a.n_ctx : std::min<int64_t>(4096, c.n_ctx_train);
  if (n_ctx > c.n_ctx_train && c.arch->pos == PosKind::Learned)
    fail("-c {} is larger than the {} positions this model has learned", n_ctx, c.n_ctx_train);

  std::string text = a.prompt;
  if (a.chat) text = apply_chat_template(tok->chat_template(), {{"user", a.prompt}}, true);
  std::vector<int32_t> prompt = tok->encode(text, tok->add_bos_default(), /*parse_special=*/true);
  if (prompt.empty()) fail("the prompt is empty: nothing to generate from");
  if (static_cast<int64_t>(prompt.size()) >= n_ctx)
    fail("the prompt has {} tokens, which does not fit the context of {} tokens with room to "
         "generate (raise -c, at most {})",
         prompt.size(), n_ctx, c.n_ctx_train);

  ThreadPool pool(a.threads);
  Session session(*model, ctk, ctv, n_ctx, pool, a.n_batch);
  GenerateOptions opts;
  opts.n_predict = a.n_predict;
  opts.use_cache = !a.no_cache;
  opts.sampling = sp;

  StreamDecoder dec(*tok);
  if (!a.chat) {
    std::fputs(text.c_str(), stdout);
    std::fflush(stdout);
  }
  GenerateStats st = generate(session, *tok, prompt, opts, [&](int32_t id) {
    if (!tok->is_eog(id)) {
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
  const KvShape shape = session.kv().shape();
  if (opts.use_cache) {
    std::fprintf(stderr, "kv cache:         on, K %s / V %s, %lld of %lld tokens\n",
                 dtype_name(ctk), dtype_name(ctv), static_cast<long long>(st.kv.n_tokens),
                 static_cast<long long>(st.kv.n_ctx));
  } else {
    std::fprintf(stderr,
                 "kv cache:         off (--no-cache): all %lld positions recomputed at every step; "
                 "the buffer below is only per-step working memory\n",
                 static_cast<long long>(st.kv.n_tokens));
  }
  std::fprintf(stderr, "kv bytes:         %s used, %s allocated (%zu bytes/token = %d layers x "
               "(K %zu + V %zu))\n",
               human_bytes(st.kv.bytes_used).c_str(), human_bytes(st.kv.bytes_allocated).c_str(),
               kv_bytes_per_token(shape), shape.n_layer, kv_k_row_bytes(shape),
               kv_v_row_bytes(shape));
  return 0;
}

// ---- inspect -------------------------------------------------------------------------------
std::string value_str(const GgufValue& v) {
  switch (v.type) {
    case GgufType::STRING: {
      std::string s = v.s.size() > 120 ? v.s.substr(0, 117) + "..." : v.s;
      for (auto& ch : s)
        if (ch == '\n') ch = ' ';
      return fmt::format("\"{}\"", s);
    }
    case GgufType::ARRAY:
      return fmt::format("[{} x {}]", v.array_size(), gguf_type_name(v.elem_type));
    case GgufType::FLOAT32:
    case GgufType::FLOAT64:
      return fmt::format("{}", v.f);
    case GgufType::BOOL:
      return v.i ? "true" : "false";
    default:
      return v.is_int() ? fmt::format("{}", v.as_int()) : "?";
  }
}

int run_inspect(const std::string& model_arg) {
  const std::string path = resolve_model(model_arg);
  auto model = Model::load(path);
  const GgufFile& f = model->gguf();
  const ModelConfig& c = model->config();
  fmt::print("file: {} (GGUF v{}, {} bytes, alignment {})\n\n", path, f.version(), f.file_size(),
             f.alignment());
  fmt::print("metadata ({} keys):\n", f.metadata().size());
  for (const auto& [k, v] : f.metadata()) fmt::print("  {:<42} {}\n", k, value_str(v));
  fmt::print("\ntensors ({}):\n  {:<32} {:<6} {:<16} {:>12}\n", f.tensors().size(), "name", "type",
             "shape", "bytes");
  uint64_t total = 0;
  for (const auto& t : f.tensors()) {
    fmt::print("  {:<32} {:<6} {:<16} {:>12}\n", t.name, dtype_name(t.type),
               fmt::format("[{}]", fmt::join(t.ne, ", ")), t.n_bytes);
    total += t.n_bytes;
  }
  fmt::print("  {:<56} {:>12}\n", "total", total);
  fmt::print("\nconfig:\n");
  fmt::print("  architecture      {}\n  n_vocab           {}\n  n_ctx_train       {}\n", c.arch->name,
             c.n_vocab, c.n_ctx_train);
  fmt::print("  n_embd            {}\n  n_layer           {}\n  n_head            {}\n", c.n_embd,
             c.n_layer, c.n_head);
  fmt::print("  n_kv_head         {} (GQA: {} query heads per KV head)\n", c.n_kv_head, c.n_gqa());
  fmt::print("  head_dim          {}\n  n_ff              {}\n  norm_eps          {}\n", c.head_dim,
             c.n_ff, c.norm_eps);
  if (c.arch->pos == PosKind::Rope)
    fmt::print("  rope              {} dims, freq_base {}\n", c.n_rot, c.rope_freq_base);
  fmt::print("  output            {}\n", c.tied_output ? "tied to token_embd" : "separate");
  fmt::print("\nKV cache (per token = n_layer x n_kv_head x head_dim x 2 (K and V) x bytes):\n");
  for (DType t : {DType::F32, DType::F16}) {
    KvShape s = model->kv_shape(t, t);
    fmt::print("  {:<4} {:>8} bytes/token, {} at n_ctx_train={}\n", dtype_name(t),
               kv_bytes_per_token(s), human_bytes(kv_bytes(s, c.n_ctx_train)), c.n_ctx_train);
  }
  fmt::print("weights read per decoded token: {}\n", human_bytes(model->weight_bytes()));
  return 0;
}

// ---- tokenize ------------------------------------------------------------------------------
int run_tokenize(const std::string& model_arg, const std::string& text, bool no_bos) {
  auto gguf = GgufFile::open(resolve_model(model_arg));
  auto tok = Tokenizer::from_gguf(*gguf);
  auto ids = tok->encode(text, tok->add_bos_default() && !no_bos, /*parse_special=*/true);
  for (int32_t id : ids) {
    std::string piece = tok->token_bytes(id);
    std::string shown;
    for (unsigned char ch : piece) {
      if (ch == '\n') shown += "\\n";
      else if (ch == '\t') shown += "\\t";
      else shown += static_cast<char>(ch);
    }
    fmt::print("{:>7} '{}'\n", id, shown);
  }
  fmt::print(stderr, "{} tokens\n", ids.size());
  return 0;
}

bool has_subcommand(const CLI::App& app, const std::string& name) {
  for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; }))
    if (sub->get_name() == name) return true;
  return false;
}

int main_impl(int argc, char** argv) {
  CLI::App app{"kvlm: a KV-cache-centred LLM inference engine"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "kvlm 0.1.0");

  GenerateArgs g;
  auto* gen = app.add_subcommand("generate", "generate text from a prompt, streaming to stdout");
  gen->add_option("-m,--model", g.model, "GGUF model (default: SmolLM2-135M-Instruct Q4_1)");
  gen->add_option("-p,--prompt", g.prompt, "prompt text")->required();
  gen->add_option("-n,--n-predict", g.n_predict, "tokens to generate (-1: until end)")
      ->check(CLI::Range(-1, 1 << 30));
  gen->add_flag("--chat", g.chat, "wrap the prompt in the model's chat template");
  gen->add_flag("--no-cache", g.no_cache, "recompute the whole prefix at every step (baseline)");
  gen->add_option("--temp", g.sampling.temperature, "temperature (0: greedy)")
      ->check(CLI::Range(0.0, 100.0));
  gen->add_option("--top-k", g.sampling.top_k, "top-k (0: off)")->check(CLI::Range(0, 1 << 30));
  gen->add_option("--top-p", g.sampling.top_p, "top-p (1: off)")->check(CLI::Range(0.0, 1.0));
  gen->add_option("--min-p", g.sampling.min_p, "min-p (0: off)")->check(CLI::Range(0.0, 1.0));
  gen->add_option("--repeat-penalty", g.sampling.repeat_penalty, "repetition penalty (1: off)")
      ->check(CLI::Range(0.01, 100.0));
  gen->add_option("--repeat-last-n", g.sampling.repeat_last_n, "tokens the penalty looks back")
      ->check(CLI::Range(0, 1 << 30));
  gen->add_option("--seed", g.seed, "random seed (default: random, printed)")
      ->each([&](const std::string&) { g.seed_given = true; });
  gen->add_option("-t,--threads", g.threads, "threads (default: all cores)")
      ->check(CLI::Range(1, 1024));
  gen->add_option("-c,--ctx-size", g.n_ctx, "context size in tokens (default: min(4096, model))")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 24));
  gen->add_option("-b,--batch-size", g.n_batch, "prompt tokens per forward pass")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  gen->add_option("--cache-type-k", g.ctk, "K cache type: f32, f16 (alias -ctk)");
  gen->add_option("--cache-type-v", g.ctv, "V cache type: f32, f16 (alias -ctv)");

  std::string inspect_model;
  auto* ins = app.add_subcommand("inspect", "print metadata, tensors and the derived config");
  ins->add_option("-m,--model", inspect_model, "GGUF model");

  std::string tok_model, tok_text;
  bool tok_no_bos = false;
  auto* tk = app.add_subcommand("tokenize", "print token ids and pieces of a text");
  tk->add_option("-m,--model", tok_model, "GGUF model");
  tk->add_option("-p,--prompt", tok_text, "text")->required();
  tk->add_flag("--no-bos", tok_no_bos, "never add BOS");

  if (argc > 1 && argv[1][0] != '-' && !has_subcommand(app, argv[1])) {
    std::fprintf(stderr, "kvlm: error: unknown command '%s' (commands: generate, inspect, tokenize)\n",
                 argv[1]);
    return 2;
  }
  // llama.cpp's multi-letter single-dash flags, which CLI11 would read as "-c tk".
  std::vector<std::string> args;
  for (int i = argc - 1; i >= 1; --i) {
    std::string s = argv[i];
    if (s == "-ctk") s = "--cache-type-k";
    if (s == "-ctv") s = "--cache-type-v";
    args.push_back(s);
  }
  try {
    app.parse(args);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::string msg = e.what();
    for (auto& ch : msg)
      if (ch == '\n') ch = ' ';
    std::fprintf(stderr, "kvlm: error: %s (see kvlm --help)\n", msg.c_str());
    return 2;
  }

  try {
    if (*gen) return run_generate(g);
    if (*ins) return run_inspect(inspect_model);
    if (*tk) return run_tokenize(tok_model, tok_text, tok_no_bos);
  } catch (const Error& e) {
    std::fprintf(stderr, "kvlm: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "kvlm: error: out of memory\n");
    return 1;
  }
  return 2;
}

}  // namespace
}  // namespace kvlm

int main(int argc, char** argv) { return kvlm::main_impl(argc, argv); }
