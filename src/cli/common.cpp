#include "cli/common.h"

#include <sched.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <iterator>
#include <iostream>
#include <cstring>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <thread>

#include "base/error.h"
#include "kv/kv_shape.h"
#include "server/api.h"

namespace kvlm::cli {

static constexpr const char* kDefaultModelFile = "SmolLM2-135M-Instruct.Q4_1.gguf";

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
  if (!t || !kv_type_supported(*t))
    fail("{}: unknown or unsupported cache type '{}' (supported: {})", flag, s,
         kv_supported_types());
  return *t;
}

void add_cache_flags(CLI::App* app, CacheFlags& f, bool context_flag) {
  const std::string types = kv_supported_types();
  app->add_option("--cache-type-k", f.ctk, "K cache type: " + types + " (alias -ctk)");
  app->add_option("--cache-type-v", f.ctv, "V cache type: " + types + " (alias -ctv)");
  if (context_flag)
    app->add_option("-c,--ctx-size", f.n_ctx, "context size in tokens (default: min(4096, model))")
        ->check(CLI::Range(int64_t{1}, int64_t{1} << 24));
  app->add_option("--kv-alloc", f.alloc,
                  "static: reserve the whole context up front; dynamic: grow in chunks of 256 "
                  "tokens as they arrive")
      ->check(CLI::IsMember({"static", "dynamic"}));
  app->add_option("--kv-window", f.window,
                  "sliding window: keep only the most recent W tokens (plus --kv-sinks); memory "
                  "stays bounded and generation can run past the model's context")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 24));
  app->add_option("--kv-sinks", f.sinks, "attention-sink tokens kept at the start with --kv-window")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 20));
  app->add_option("--kv-evict-chunk", f.evict_chunk,
                  "tokens evicted at once when the window is full (default: window / 8)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 24));
  app->add_option("--keep", f.keep,
                  "context shift: when the context is full keep the first N tokens and drop the "
                  "older half of the rest (as llama.cpp --keep)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 24));
  app->add_option("--kv-residual", f.kv_residual,
                  "KIVI cache: K quantized per channel in groups of 64 tokens, V per token, the "
                  "most recent R..R+63 tokens in f16; needs -ctk q4_0 (e.g. -ctk q4_0 -ctv q4_0 "
                  "--kv-residual 32)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 20));
  app->add_flag("--kv-rotate", f.kv_rotate,
                "store K and V multiplied by a Hadamard matrix per head (q rotated alike, the "
                "output rotated back): spreads outliers before quantization, same bytes; for "
                "quantized caches (e.g. -ctk q4_0 -ctv q4_0 --kv-rotate)");
}

void add_threads_flag(CLI::App* app, int& threads, const std::string& help) {
  const CLI::Validator at_least_one(
      [](std::string& s) {
        long long v = 0;
        if (CLI::detail::lexical_cast(s, v) && v >= 1 && v <= INT_MAX) return std::string();
        return fmt::format(
            "must be a whole number from 1 to {} (more than the cores are "
            "clamped to them), got {}",
            INT_MAX, s.substr(0, 32));
      },
      "INT >= 1");
  app->add_option("-t,--threads", threads, help)->check(at_least_one);
}

// The whole file ("-": stdin). A gzip file gets a hint instead of a PPL over compressed bytes.
std::string read_text_file(const std::string& path) {
  std::string text;
  if (path == "-") {
    text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  } else {
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec)) fail("{}: is a directory, not a text file", path);
    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) fail("{}: cannot open the text ({})", path, std::strerror(errno));
    char buf[1 << 16];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
    const bool err = std::ferror(f);
    std::fclose(f);
    if (err) fail("{}: read failed", path);
  }
  if (text.size() >= 2 && static_cast<unsigned char>(text[0]) == 0x1f &&
      static_cast<unsigned char>(text[1]) == 0x8b)
    fail("{}: gzip-compressed; decompress it first (zcat {} > text.txt) or pipe it in with -f -",
         path == "-" ? "stdin" : path, path == "-" ? "FILE" : path);
  if (text.empty()) fail("{}: empty text", path == "-" ? "stdin" : path);
  return text;
}

void add_chat_template_flag(CLI::App* app, std::string& path) {
  app->add_option("--chat-template,--chat-template-file", path,
                  "Jinja chat template file used instead of the model's tokenizer.chat_template");
}

std::string chat_template_origin(const std::string& path) {
  return path.empty() ? "the model's chat template" : "--chat-template " + path;
}

ChatTemplate load_chat_template(const Tokenizer& tok, const std::string& path) {
  const std::string source = path.empty() ? tok.chat_template() : read_text_file(path);
  if (!path.empty() && source.empty()) fail("--chat-template {}: the file is empty", path);
  try {
    return ChatTemplate(source, server::chat_env(tok));
  } catch (const Error& e) {
    if (path.empty()) throw;
    fail("--chat-template {}: {}", path, e.what());
  }
}

void add_llama_cpp_flags(CLI::App* app) {
  app->add_option_function<std::string>(
         "--gpu-layers,--n-gpu-layers",  // and -ngl (main.cpp)
         [](const std::string& n) {
           std::fprintf(stderr, "kvlm: note: kvlm runs on the CPU only; -ngl %s is ignored\n",
                        n.substr(0, 32).c_str());
         },
         "llama.cpp's GPU offload: accepted and ignored (CPU only)")
      ->check(CLI::NonNegativeNumber);
  app->add_option_function<std::string>(
         "--flash-attn",  // and -fa (main.cpp)
         [](const std::string&) {
           std::fprintf(stderr,
                        "kvlm: note: attention is always one chunked online-softmax pass (what "
                        "-fa turns on in llama.cpp); -fa changes nothing\n");
         },
         "llama.cpp's flash attention switch: accepted (on|off|auto); kvlm has only that mode")
      ->expected(0, 1)
      ->default_str("on")
      ->check(CLI::IsMember({"on", "off", "auto"}));
}

int available_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  // A mask wider than cpu_set_t (over 1024 CPUs) fails with EINVAL; the machine's count serves.
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

int resolve_threads(int requested) {
  const int cores = available_cores();
  if (requested <= 0) return cores;
  if (requested > cores)
    std::fprintf(stderr,
                 "kvlm: note: -t %d is more than the %d cores this process may run on; "
                 "using %d threads\n",
                 requested, cores, cores);
  return std::min(requested, cores);
}

void add_sampling_flags(CLI::App* app, SamplingParams& p) {
  app->add_option("--temp", p.temperature, "temperature (0: greedy)")->check(CLI::Range(0.0, 100.0));
  app->add_option("--top-k", p.top_k, "top-k (0: off)")->check(CLI::Range(0, 1 << 30));
  app->add_option("--top-p", p.top_p, "top-p (1: off)")->check(CLI::Range(0.0, 1.0));
  app->add_option("--min-p", p.min_p, "min-p (0: off)")->check(CLI::Range(0.0, 1.0));
  app->add_option("--repeat-penalty", p.repeat_penalty, "repetition penalty (1: off)")
      ->check(CLI::Range(0.01, 100.0));
  app->add_option("--repeat-last-n", p.repeat_last_n, "tokens the penalty looks back")
      ->check(CLI::Range(0, 1 << 30));
}

std::string describe_cache(const KvOptions& o) {
  std::string s = fmt::format("K {} / V {}", dtype_name(o.dtype_k), dtype_name(o.dtype_v));
  if (o.alloc == KvAlloc::Dynamic) s += ", dynamic";
  if (o.window) s += fmt::format(", window {} + {} sinks", o.n_ctx - o.n_sinks, o.n_sinks);
  if (o.n_keep >= 0) s += fmt::format(", context shift keeping {}", o.n_keep);
  if (o.kivi_residual >= 0) s += fmt::format(", KIVI residual {}", o.kivi_residual);
  if (o.rotate) s += ", Hadamard-rotated";
  return s;
}

KvOptions to_kv_options(const CacheFlags& f, const ModelConfig& c) {
  KvOptions o;
  o.dtype_k = parse_cache_type(f.ctk, "-ctk");
  o.dtype_v = parse_cache_type(f.ctv, "-ctv");
  o.alloc = f.alloc == "dynamic" ? KvAlloc::Dynamic : KvAlloc::Static;
  o.n_ctx = f.n_ctx > 0 ? f.n_ctx : std::min<int64_t>(kDefaultCtx, c.n_ctx_train);
  if (f.window > 0) {
    if (f.keep >= 0) fail("--kv-window and --keep are two eviction policies: choose one");
    if (f.n_ctx > 0)
      fail("--kv-window sets the context to sinks + window ({} + {}); drop -c", f.sinks, f.window);
    o.window = true;
    o.n_sinks = f.sinks;
    o.n_ctx = f.sinks + f.window;
    o.window_chunk = f.evict_chunk > 0 ? f.evict_chunk : std::max<int64_t>(1, f.window / 8);
    if (o.window_chunk > f.window)
      fail("--kv-evict-chunk {} is larger than the window {}", o.window_chunk, f.window);
  }
  o.n_keep = f.keep;
  if (f.kv_residual >= 0) {
    if (o.dtype_k != DType::Q4_0)
      fail("--kv-residual quantizes K per channel in 4 bits (q4_0's 0.5625 bytes/value): use -ctk "
           "q4_0 (got -ctk {})", f.ctk);
    if (f.window > 0) fail("--kv-residual cannot be combined with --kv-window (KIVI does not evict)");
    if (f.keep >= 0) fail("--kv-residual cannot be combined with --keep (KIVI does not evict)");
    o.kivi_residual = static_cast<int32_t>(f.kv_residual);
  }
  if (f.kv_rotate && f.kv_residual >= 0)
    fail("--kv-rotate cannot be combined with --kv-residual (KIVI quantizes K per channel)");
  o.rotate = f.kv_rotate;
  if (o.n_keep >= o.n_ctx) fail("--keep {} must be smaller than the context ({})", o.n_keep, o.n_ctx);
  if (o.n_ctx > c.n_ctx_train && c.arch->pos == PosKind::Learned)
    fail("a context of {} tokens is larger than the {} positions this model has learned", o.n_ctx,
         c.n_ctx_train);
  return o;
}

std::unique_ptr<Model> load_model(const std::string& path, const CacheFlags& f) {
  // Without --ctx-size, to_kv_options runs min(kDefaultCtx, n_ctx_train), and Model::load
  // clamps the context to n_ctx_train for its choice: the same number.
  return Model::load(path, f.n_ctx > 0 ? f.n_ctx : kDefaultCtx);
}

}  // namespace kvlm::cli
