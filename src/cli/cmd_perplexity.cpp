// kvlm perplexity: PPL of a model over a text, and KL divergence against a saved base run
// (src/engine/perplexity.h says what is scored and how KL is approximated). Results on stdout.
#include <fmt/format.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>

#include "base/error.h"
#include "base/thread_pool.h"
#include "cli/common.h"
#include "engine/perplexity.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace kvlm::cli {
namespace {

// The text everyone measures on: Debian's jargon-text package (scripts/setup.sh installs it).
constexpr const char* kJargonGz = "/usr/share/doc/jargon-text/jargon.txt.gz";

struct PerplexityArgs {
  std::string model, file, kl_base, kl_base_out, kl_ref;
  CacheFlags cache;
  int64_t n_ctx = 512;
  int64_t n_chunks = -1;
  int64_t n_batch = 512;
  int threads = 0;
};


int run_perplexity(const PerplexityArgs& a) {
  PerplexityOptions opts;
  opts.n_ctx = a.n_ctx;
  opts.n_chunks = a.n_chunks;
  opts.n_batch = a.n_batch;
  opts.kl_base = a.kl_base;
  opts.kl_base_out = a.kl_base_out;

  const std::string text = read_text_file(a.file);
  auto model = Model::load(resolve_model(a.model), a.n_ctx);  // LongRoPE: factors for a chunk
  auto tok = Tokenizer::from_gguf(model->gguf());
  const ModelConfig& c = model->config();
  opts.kv = to_kv_options(a.cache, c);
  opts.dtype_k = opts.kv.dtype_k;
  opts.dtype_v = opts.kv.dtype_v;
  if (!a.kl_ref.empty()) {
    KvOptions ref;  // a plain contiguous cache of one type for K and V
    ref.dtype_k = ref.dtype_v = parse_cache_type(a.kl_ref, "--kl-ref");
    opts.kl_ref = ref;
  }
  if (opts.kv.window && opts.kv.n_ctx >= a.n_ctx)
    fail("--kv-window: sinks + window ({}) must be smaller than the chunk (--ctx {}) to evict "
         "anything", opts.kv.n_ctx, a.n_ctx);
  const std::vector<int32_t> tokens = perplexity_tokens(*tok, text);
  const int32_t bos = tok->add_bos_default() ? tok->bos_id() : -1;

  ThreadPool pool(resolve_threads(a.threads));
  bool header_done = false;
  auto header = [&](int64_t n_chunks) {
    if (header_done) return;
    header_done = true;
    fmt::print("model:  {} ({}), cache {}, {} threads\n", c.name, c.arch->name,
               describe_cache(opts.kv), pool.size());
    fmt::print("text:   {}: {} bytes, {} tokens = {} chunks of {}; evaluating {}, scoring "
               "positions {}..{} of each ({} tokens)\n",
               a.file == "-" ? "stdin" : a.file, text.size(), tokens.size(),
               static_cast<int64_t>(tokens.size()) / a.n_ctx, a.n_ctx, n_chunks, a.n_ctx / 2,
               a.n_ctx - 2, perplexity_scored_per_chunk(a.n_ctx));
    std::fflush(stdout);
  };
  const PerplexityResult r =
      perplexity(*model, tokens, bos, opts, pool, [&](const PerplexityProgress& p) {
        header(p.n_chunks);
        std::string kl = p.kld_mean >= 0 ? fmt::format("  KLD {:.6f}", p.kld_mean) : "";
        fmt::print("[{}/{}] PPL {:.4f}{}  ({:.1f} s)\n", p.chunk + 1, p.n_chunks, p.ppl, kl,
                   p.chunk_seconds);
        std::fflush(stdout);
      });
  header(r.n_chunks);

  const int64_t n_evaluated = r.n_chunks * (r.n_ctx - 1);  // the last token of a chunk is not run
  fmt::print("PPL = {:.4f} +/- {:.4f}  ({} tokens scored; {} evaluated in {:.1f} s, {:.1f} tok/s)\n",
             r.ppl, r.ppl_err, r.n_scored, n_evaluated, r.seconds,
             r.seconds > 0 ? n_evaluated / r.seconds : 0.0);
  if (r.kl) {
    const KlStats& k = *r.kl;
    if (k.full_vocab)
      fmt::print("KL divergence against an in-process run with cache K {} / V {}, over the full "
                 "vocabulary (exact):\n",
                 dtype_name(k.base_dtype_k), dtype_name(k.base_dtype_v));
    else
      fmt::print("KL divergence against {} (cache K {} / V {}), over the base's top-{} tokens + "
                 "the rest (a lower bound of the full KL):\n",
                 a.kl_base, dtype_name(k.base_dtype_k), dtype_name(k.base_dtype_v), kKlTopK);
    fmt::print("  mean KLD      = {:.6f} +/- {:.6f}\n", k.kld_mean, k.kld_err);
    fmt::print("  median KLD    = {:.6f}, 99% {:.6f}, max {:.6f}\n", k.kld_median, k.kld_p99,
               k.kld_max);
    fmt::print("  same top p    = {:.3f} %\n", 100 * k.same_top);
    fmt::print("  base PPL      = {:.4f}, PPL - base = {:+.4f} ({:+.3f} %)\n", k.base_ppl,
               r.ppl - k.base_ppl, 100 * (r.ppl / k.base_ppl - 1));
    fmt::print("  ln(PPL/base)  = {:.6f} +/- {:.6f}\n", k.ln_ppl_ratio, k.ln_ppl_ratio_err);
  }
  if (!a.kl_base_out.empty()) {
    std::error_code ec;
    const auto size = std::filesystem::file_size(a.kl_base_out, ec);
    fmt::print("KL base written to {} ({} positions, {})\n", a.kl_base_out, r.n_scored,
               human_bytes(ec ? 0.0 : static_cast<double>(size)));
  }
  return 0;
}

}  // namespace

Command add_perplexity(CLI::App& app) {
  auto a = std::make_shared<PerplexityArgs>();
  auto* ppl = app.add_subcommand(
      "perplexity", "perplexity of a text (llama.cpp's scheme), and KL divergence against a base run");
  ppl->footer(fmt::format(
      "Scores the second half of each chunk of --ctx tokens (positions ctx/2 .. ctx-2 predicting "
      "the next token), from an empty cache per chunk.\nThe shared text: the Jargon File, from "
      "Debian's jargon-text package (scripts/setup.sh installs it):\n  zcat {} > jargon.txt && "
      "kvlm perplexity -f jargon.txt --chunks 4\nKL: make a base with the reference cache "
      "(--kl-base-out base.kld -ctk f16 -ctv f16), then compare another cache type with "
      "--kl-base base.kld; or compare in one run, over the full vocabulary, with --kl-ref f16.\n",
      kJargonGz));
  ppl->add_option("-m,--model", a->model, "GGUF model (default: SmolLM2-135M-Instruct Q4_1)");
  ppl->add_option("-f,--file", a->file,
                  fmt::format("text to score ('-': stdin); recommended: the Jargon File, "
                              "zcat {} > jargon.txt",
                              kJargonGz))
      ->required();
  ppl->add_option("-c,--ctx", a->n_ctx, "tokens per chunk (default 512)")
      ->check(CLI::Range(int64_t{4}, int64_t{1} << 24));
  ppl->add_option("--chunks", a->n_chunks, "chunks to evaluate (default: all, or the base's)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 32));
  add_threads_flag(ppl, a->threads);
  add_llama_cpp_flags(ppl);
  ppl->add_option("-b,--batch-size", a->n_batch, "tokens per forward pass")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  add_cache_flags(ppl, a->cache, false);
  auto* out = ppl->add_option("--kl-base-out", a->kl_base_out,
                              "save the run's top-32 token distributions here, as a KL base");
  ppl->add_option("--kl-base", a->kl_base,
                  "compare with a base saved by --kl-base-out (same model, text, --ctx)")
      ->excludes(out);
  ppl->add_option("--kl-ref", a->kl_ref,
                  "compare with an in-process run of every chunk with this cache type (e.g. f16): "
                  "exact full-vocabulary KL, twice the time")
      ->excludes(out)
      ->excludes("--kl-base");
  return {ppl, [a] { return run_perplexity(*a); }};
}

}  // namespace kvlm::cli
