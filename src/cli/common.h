// Helpers shared by the kvlm subcommands.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <memory>
#include <string>

#include "engine/session.h"
#include "model/config.h"
#include "model/model.h"
#include "sampling/sampler.h"
#include "template/chat_template.h"
#include "tensor/dtype.h"
#include "tokenizer/tokenizer.h"

namespace kvlm::cli {

// A registered subcommand: its CLI11 app and what to run when it is chosen. run() returns the
// exit code; it may throw kvlm::Error (main turns it into one line and exit code 1).
struct Command {
  CLI::App* app = nullptr;
  std::function<int()> run;
};

Command add_bench(CLI::App& app);
Command add_chat(CLI::App& app);
Command add_generate(CLI::App& app);
Command add_inspect(CLI::App& app);
Command add_kv_size(CLI::App& app);
Command add_tokenize(CLI::App& app);
Command add_perplexity(CLI::App& app);
Command add_serve(CLI::App& app);

// The cache flags every command that runs the model shares (generate, chat, perplexity, bench,
// serve): storage types, context, allocation, sliding window with sinks, context shift.
struct CacheFlags {
  std::string ctk = "f16", ctv = "f16";
  int64_t n_ctx = 0;  // 0: min(4096, model's training context)
  std::string alloc = "static";
  int64_t window = 0;       // > 0: sliding window of this many recent tokens (plus sinks)
  int64_t sinks = 4;        // attention sinks kept at the start when windowed
  int64_t evict_chunk = 0;  // tokens evicted at once when the window is full (0: window / 8)
  int64_t keep = -1;        // context shift: tokens kept at the start (-1: off)
  int64_t kv_residual = -1;  // KIVI layout: recent tokens kept in f16 (-1: off)
  bool kv_rotate = false;    // Hadamard-rotated K/V rows
};
// context_flag: also -c/--ctx-size (commands whose context comes from elsewhere, perplexity's
// chunks or bench's tests, leave it out).
void add_cache_flags(CLI::App* app, CacheFlags& f, bool context_flag = true);
// "K f16 / V f16" plus the layout: ", dynamic", ", window 1024 + 4 sinks", ", KIVI residual 32".
std::string describe_cache(const KvOptions& o);
// The context a command runs when -c/--ctx-size is not given: min(this, the training context).
inline constexpr int64_t kDefaultCtx = 4096;
// Model::load for the context the flags ask for (LongRoPE models choose their factors by it).
std::unique_ptr<Model> load_model(const std::string& path, const CacheFlags& f);
// Resolves the flags against a model into the session's KvOptions; kvlm::Error naming the flag.
KvOptions to_kv_options(const CacheFlags& f, const ModelConfig& c);

// -t/--threads of every command that runs the model: 0 (not given) is every core this process
// may run on; 0 or negative given is refused; more than the cores is clamped (resolve_threads).
void add_threads_flag(CLI::App* app, int& threads,
                      const std::string& help = "threads (default: all cores)");
// The whole text file at path ("-": stdin); kvlm::Error for a directory, an unreadable file, or
// gzip-compressed bytes (with a hint to decompress).
std::string read_text_file(const std::string& path);
// llama.cpp's spellings that mean nothing different here, accepted so scripts written for it run:
// -ngl/--n-gpu-layers N (a one-line note: CPU only, ignored) and -fa/--flash-attn [on|off|auto]
// (a note: kvlm's attention is always the chunked online-softmax pass flash attention is).
void add_llama_cpp_flags(CLI::App* app);
// Cores this process may run on: its CPU affinity mask (taskset, cgroup cpusets), else
// std::thread::hardware_concurrency(); at least 1.
int available_cores();
// The pool size for -t `requested`: 0 -> available_cores(); more than available_cores() -> that,
// with a one-line note on stderr. A thread without a core of its own only waits: the pool hands
// work out by spinning, and a 2-core VM ran -t 1000 at a few tokens per second.
int resolve_threads(int requested);

// --chat-template FILE and llama.cpp's spelling --chat-template-file FILE (generate, chat,
// serve): a Jinja chat template that replaces the model's tokenizer.chat_template.
void add_chat_template_flag(CLI::App* app, std::string& path);
// The text of --chat-template's file (path not empty) or the model's template; parsed with the
// tokenizer's BOS/EOS texts. kvlm::Error naming the file or the model's template.
ChatTemplate load_chat_template(const Tokenizer& tok, const std::string& path);
// Where a chat template came from, for messages: the file, or "the model's chat template".
std::string chat_template_origin(const std::string& path);

// --temp --top-k --top-p --min-p --repeat-penalty --repeat-last-n (generate, chat, later serve).
void add_sampling_flags(CLI::App* app, SamplingParams& p);

// Default model directory: $KVLM_MODELS or ~/.cache/kvlm/models.
std::string models_dir();
// `given` if not empty, else the default model; kvlm::Error naming the path if it is missing.
std::string resolve_model(const std::string& given);
// "1.50 MiB"
std::string human_bytes(double bytes);
// -ctk/-ctv values; kvlm::Error naming the flag for unknown or unsupported types.
DType parse_cache_type(const std::string& s, const char* flag);

}  // namespace kvlm::cli
