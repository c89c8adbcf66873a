// kvlm generate: prompt -> streamed text on stdout, statistics on stderr.
#include <cstdio>
#include <memory>
#include <random>

#include "base/error.h"
#include "base/thread_pool.h"
#include "cli/common.h"
#include "engine/session.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace kvlm::cli {
namespace {

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

}  // namespace

Command add_generate(CLI::App& app) {
  auto g = std::make_shared<GenerateArgs>();
  auto* gen = app.add_subcommand("generate", "generate text from a prompt, streaming to stdout");
  gen->add_option("-m,--model", g->model, "GGUF model (default: SmolLM2-135M-Instruct Q4_1)");
  gen->add_option("-p,--prompt", g->prompt, "prompt text")->required();
  gen->add_option("-n,--n-predict", g->n_predict, "tokens to generate (-1: until end)")
      ->check(CLI::Range(-1, 1 << 30));
  gen->add_flag("--chat", g->chat, "wrap the prompt in the model's chat template");
  gen->add_flag("--no-cache", g->no_cache, "recompute the whole prefix at every step (baseline)");
  gen->add_option("--temp", g->sampling.temperature, "temperature (0: greedy)")
      ->check(CLI::Range(0.0, 100.0));
  gen->add_option("--top-k", g->sampling.top_k, "top-k (0: off)")->check(CLI::Range(0, 1 << 30));
  gen->add_option("--top-p", g->sampling.top_p, "top-p (1: off)")->check(CLI::Range(0.0, 1.0));
  gen->add_option("--min-p", g->sampling.min_p, "min-p (0: off)")->check(CLI::Range(0.0, 1.0));
  gen->add_option("--repeat-penalty", g->sampling.repeat_penalty, "repetition penalty (1: off)")
      ->check(CLI::Range(0.01, 100.0));
  gen->add_option("--repeat-last-n", g->sampling.repeat_last_n, "tokens the penalty looks back")
      ->check(CLI::Range(0, 1 << 30));
  gen->add_option("--seed", g->seed, "random seed (default: random, printed)")
      ->each([g](const std::string&) { g->seed_given = true; });
  gen->add_option("-t,--threads", g->threads, "threads (default: all cores)")
      ->check(CLI::Range(1, 1024));
  gen->add_option("-c,--ctx-size", g->n_ctx, "context size in tokens (default: min(4096, model))")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 24));
  gen->add_option("-b,--batch-size", g->n_batch, "prompt tokens per forward pass")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  gen->add_option("--cache-type-k", g->ctk, "K cache type: f32, f16, q8_0, q4_1, q4_0 (alias -ctk)");
  gen->add_option("--cache-type-v", g->ctv, "V cache type: f32, f16, q8_0, q4_1, q4_0 (alias -ctv)");
  return {gen, [g] { return run_generate(*g); }};
}

}  // namespace kvlm::cli
