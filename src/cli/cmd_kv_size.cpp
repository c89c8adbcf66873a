// kvlm kv-size: the exact KV memory planner (src/kv/kv_plan.h) for a GGUF model, a Hugging Face
// config.json or a shape given by flags: bytes per token for each cache type, the total for
// --ctx tokens x --seqs sequences, and with --budget the longest context and the most sequences
// that fit. The numbers are the ones a Session's KV manager allocates (kv_plan.h: the same block
// arithmetic sizes both).
#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "base/error.h"
#include "cli/common.h"
#include "gguf/gguf.h"
#include "kv/kv_plan.h"
#include "model/config.h"

namespace kvlm::cli {
namespace {

constexpr int64_t kDefaultCtx = 4096;  // when the source does not say how long the model's context is

struct KvSizeArgs {
  std::string model, hf_config, ctk, ctv, budget;
  int32_t n_layer = 0, n_kv_head = 0, head_dim = 0;  // the flags source
  int64_t n_ctx = 0;                                 // 0: the model's context, else kDefaultCtx
  int64_t n_seqs = 1;
  int64_t kv_residual = -1;  // KIVI layout (--kv-residual); -1: plain rows
  int32_t kv_window = 0, kv_window_pattern = 0;  // flags source: sliding-window layers
  bool json = false;
  bool budget_given = false;  // --budget "" is an error, not "no budget"
};

// What a source tells the planner: the cache shape (storage types unset) and, when it knows, the
// context the model was trained for.
struct KvSource {
  std::string kind;  // "gguf", "hf-config", "flags"
  std::string path;  // empty for flags
  std::string arch;  // GGUF general.architecture / config.json model_type, may be empty
  KvShape shape;
  int64_t n_ctx_model = 0;  // 0: unknown
  std::vector<int32_t> layer_window{};  // [n_layer] sliding window per layer (0: full); empty: none
};

// Architectures whose GGUF files give a sliding window but not its layer pattern (llama.cpp
// knows it per architecture): the architecture table's (Gemma 3: one global layer in 6), Gemma 2
// (not run by kvlm yet) alternates. A pattern longer than the model windows every layer, as the
// model loader and llama.cpp read it.
int32_t default_window_pattern(const std::string& arch, int32_t n_layer) {
  const ArchInfo* info = find_arch(arch);
  const int32_t p = info ? info->swa_pattern : arch == "gemma2" ? 2 : 0;
  return p <= n_layer ? p : 0;
}

// ---- sources -----------------------------------------------------------------------------------

// GGUF metadata only (no weights bound), so any architecture's file can be planned for, including
// ones kvlm cannot run. head_dim as llama.cpp reads it: attention.key_length, else n_embd / n_head.
KvSource from_gguf(const std::string& path) {
  auto f = GgufFile::open(path);
  KvSource src{"gguf", path, "", {}, 0};
  auto arch = f->get_string("general.architecture");
  if (!arch) fail("{}: missing metadata key 'general.architecture'", path);
  src.arch = *arch;
  const std::string a = *arch + ".";
  auto get = [&](const std::string& key, bool required) -> std::optional<int32_t> {
    auto v = f->get_int(key);
    if (!v) {
      if (required) fail("{}: missing metadata key '{}'", path, key);
      return std::nullopt;
    }
    if (*v <= 0 || *v > std::numeric_limits<int32_t>::max())
      fail("{}: metadata key '{}' is {}, expected a positive 32-bit integer", path, key, *v);
    return static_cast<int32_t>(*v);
  };
  src.shape.n_layer = *get(a + "block_count", true);
  const int32_t n_head = *get(a + "attention.head_count", true);
  src.shape.n_kv_head = get(a + "attention.head_count_kv", false).value_or(n_head);
  const auto key_length = get(a + "attention.key_length", false);
  const auto value_length = get(a + "attention.value_length", false);
  if (key_length) {
    src.shape.head_dim = *key_length;
  } else {
    const int32_t n_embd = *get(a + "embedding_length", true);
    if (n_embd % n_head != 0)
      fail("{}: embedding_length {} is not a multiple of head_count {}", path, n_embd, n_head);
    src.shape.head_dim = n_embd / n_head;
  }
  if (value_length && *value_length != src.shape.head_dim)
    fail("{}: K heads of {} and V heads of {} values; kvlm's cache stores one head size for both",
         path, src.shape.head_dim, *value_length);
  src.n_ctx_model = get(a + "context_length", false).value_or(0);
  // The model's own reading (model.cpp) without its range checks against the context: a planner
  // shows what the file says.
  if (const auto w = get(a + "attention.sliding_window", false))
    src.layer_window = kv_layer_windows(
        src.shape.n_layer, *w,
        get(a + "attention.sliding_window_pattern", false)
            .value_or(default_window_pattern(*arch, src.shape.n_layer)));
  return src;
}

// A config's sliding window: "sliding_window" W (null or "use_sliding_window": false: none) on
// the layers "layer_types" marks "sliding_attention", or every layer but each
// "sliding_window_pattern"-th, or every layer.
void read_hf_windows(const nlohmann::json& c, const std::string& path, KvSource& src) {
  auto w = c.find("sliding_window");
  if (w == c.end() || w->is_null()) return;
  if (auto use = c.find("use_sliding_window"); use != c.end() && use->is_boolean() && !*use) return;
  if (!w->is_number_integer() || w->get<int64_t>() <= 0 || w->get<int64_t>() > (int64_t{1} << 30))
    fail("{}: field 'sliding_window' must be a positive integer", path);
  const auto window = static_cast<int32_t>(w->get<int64_t>());
  const int32_t n_layer = src.shape.n_layer;
  if (auto types = c.find("layer_types"); types != c.end() && types->is_array()) {
    if (static_cast<int32_t>(types->size()) != n_layer)
      fail("{}: 'layer_types' names {} layers, the model has {}", path, types->size(), n_layer);
    for (const auto& t : *types) {
      if (!t.is_string()) fail("{}: 'layer_types' holds a non-string", path);
      src.layer_window.push_back(t.get<std::string>() == "sliding_attention" ? window : 0);
    }
    return;
  }
  int32_t pattern = 0;
  if (auto p = c.find("sliding_window_pattern"); p != c.end() && !p->is_null()) {
    if (!p->is_number_integer() || p->get<int64_t>() <= 0 || p->get<int64_t>() > n_layer)
      fail("{}: field 'sliding_window_pattern' must be an integer in [1, {}]", path, n_layer);
    pattern = static_cast<int32_t>(p->get<int64_t>());
  }
  src.layer_window = kv_layer_windows(n_layer, window, pattern);
}

// A Hugging Face config.json. Multimodal configs keep the language model's under "text_config".
KvSource from_hf_config(const std::string& path) {
  if (std::filesystem::is_directory(path))
    fail("{}: is a directory; --hf-config wants the config.json file itself", path);
  std::ifstream in(path);
  if (!in) fail("{}: cannot open the file", path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::parse_error& e) {
    std::string what = e.what();
    // "[json.exception.parse_error.101] parse error at line 1, ..." -> "parse error at line 1, ..."
    if (auto p = what.find("] "); p != std::string::npos) what = what.substr(p + 2);
    std::replace(what.begin(), what.end(), '\n', ' ');
    fail("{}: invalid JSON: {}", path, what);
  }
  if (!j.is_object()) fail("{}: expected a JSON object (a Hugging Face config.json)", path);
  const nlohmann::json* c = &j;
  if (!j.contains("num_hidden_layers") && j.contains("text_config") && j["text_config"].is_object())
    c = &j["text_config"];

  KvSource src{"hf-config", path, c->value("model_type", std::string()), {}, 0};
  // null counts as absent: configs write "head_dim": null when it is derived.
  auto get = [&](const char* key, bool required) -> std::optional<int32_t> {
    auto it = c->find(key);
    if (it == c->end() || it->is_null()) {
      if (required) fail("{}: missing field '{}' (needed for the KV cache shape)", path, key);
      return std::nullopt;
    }
    if (!it->is_number_integer() || it->get<int64_t>() <= 0 ||
        it->get<int64_t>() > std::numeric_limits<int32_t>::max())
      fail("{}: field '{}' is {}, expected a positive integer", path, key, it->dump());
    return static_cast<int32_t>(it->get<int64_t>());
  };
  src.shape.n_layer = *get("num_hidden_layers", true);
  const int32_t n_head = *get("num_attention_heads", true);
  src.shape.n_kv_head = get("num_key_value_heads", false).value_or(n_head);
  if (auto hd = get("head_dim", false)) {
    src.shape.head_dim = *hd;
  } else {
    const int32_t n_embd = *get("hidden_size", true);
    if (n_embd % n_head != 0)
      fail("{}: hidden_size {} is not a multiple of num_attention_heads {} (give head_dim)", path,
           n_embd, n_head);
    src.shape.head_dim = n_embd / n_head;
  }
  src.n_ctx_model = get("max_position_embeddings", false).value_or(0);
  read_hf_windows(*c, path, src);
  return src;
}

KvSource resolve_source(const KvSizeArgs& a) {
  if (!a.hf_config.empty()) return from_hf_config(a.hf_config);
  if (a.n_layer > 0) {  // CLI11 requires all three flags together and rejects values <= 0
    KvSource src{"flags", "", "", {}, 0};
    src.shape.n_layer = a.n_layer;
    src.shape.n_kv_head = a.n_kv_head;
    src.shape.head_dim = a.head_dim;
    if (a.kv_window > 0)
      src.layer_window = kv_layer_windows(a.n_layer, a.kv_window, a.kv_window_pattern);
    return src;
  }
  return from_gguf(resolve_model(a.model));
}

// ---- output ------------------------------------------------------------------------------------

struct Row {
  KvPlan plan;
  std::optional<int64_t> max_ctx, max_seqs;  // with --budget
};

std::string type_pair(const KvShape& s) {
  if (s.kivi())
    return fmt::format("{}/{} kivi r{}", dtype_name(s.dtype_k), dtype_name(s.dtype_v), s.kivi_residual);
  return fmt::format("{}/{}", dtype_name(s.dtype_k), dtype_name(s.dtype_v));
}

std::string plural(int64_t n, const char* one, const char* many) {
  return fmt::format("{} {}", n, n == 1 ? one : many);
}

// Columns separated by two spaces; the first left-aligned, the others right-aligned.
void print_table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width(rows.front().size(), 0);
  for (const auto& r : rows)
    for (size_t i = 0; i < r.size(); ++i) width[i] = std::max(width[i], r[i].size());
  for (const auto& r : rows) {
    std::string line;
    for (size_t i = 0; i < r.size(); ++i)
      line += i == 0 ? fmt::format("{:<{}}", r[i], width[i]) : fmt::format("  {:>{}}", r[i], width[i]);
    fmt::print("{}\n", line);
  }
}

// A type's bytes per token against f16's for the same shape: what the cache type saves.
double pct_of_f16(const KvPlan& p) {
  KvShape f16 = p.shape;
  f16.dtype_k = f16.dtype_v = DType::F16;
  f16.kivi_residual = -1;
  return 100.0 * static_cast<double>(p.bytes_per_token) /
         static_cast<double>(kv_bytes_per_token(f16));
}

// The layers of a group, "0-29" or "5, 11, 17".
std::string group_layers(const KvSource& src, int32_t window) {
  std::vector<int32_t> ls;
  for (int32_t il = 0; il < src.shape.n_layer; ++il)
    if ((src.layer_window.empty() ? 0 : src.layer_window[static_cast<size_t>(il)]) == window)
      ls.push_back(il);
  if (ls.size() == 1) return fmt::format("{}", ls.front());
  if (ls.back() - ls.front() + 1 == static_cast<int32_t>(ls.size()))
    return fmt::format("{}-{}", ls.front(), ls.back());
  return fmt::format("{}", fmt::join(ls, ", "));
}

// Per-layer cache groups (sliding-window layers) for the first cache type, and what llama.cpp's
// interleaved-SWA cache would allocate for the same sequence.
void print_groups(const KvSource& src, const KvPlan& p, int64_t n_ctx) {
  if (p.groups.size() == 1 && p.groups[0].window == 0) {
    fmt::print("groups:  1 (every layer attends to the whole context)\n");
    return;
  }
  fmt::print("groups:  {} cache groups, one sequence of {} with {}:\n", p.groups.size(),
             plural(n_ctx, "token", "tokens"), type_pair(p.shape));
  for (const KvGroupPlan& g : p.groups)
    fmt::print("         {:<24} {:>9} ({}): {} tokens held, {} ({})\n",
               g.window == 0 ? std::string("full attention")
                             : fmt::format("sliding window {}", g.window),
               plural(g.n_layers, "layer", "layers"), group_layers(src, g.window),
               g.tokens_per_seq, g.bytes_per_seq,
               human_bytes(static_cast<double>(g.bytes_per_seq)));
  const size_t all_full = plan_kv(p.shape, n_ctx).bytes_per_seq;
  const size_t llama = llama_cpp_iswa_bytes(p.shape, n_ctx, src.layer_window);
  fmt::print("         every layer full would take {} ({}); llama.cpp's interleaved-SWA cache "
             "{} ({})\n",
             all_full, human_bytes(static_cast<double>(all_full)), llama,
             human_bytes(static_cast<double>(llama)));
}

void print_text(const KvSource& src, const KvSizeArgs& a, int64_t n_ctx,
                std::optional<uint64_t> budget, const std::vector<Row>& rows) {
  const KvShape& s = src.shape;
  fmt::print("source:  {}\n", src.kind == "flags"
                                  ? std::string("flags")
                                  : fmt::format("{} ({}{}{})", src.path, src.kind,
                                                src.arch.empty() ? "" : ", ", src.arch));
  fmt::print("shape:   layers 0-{} ({}), {} x {} dims (kv_dim {})\n", s.n_layer - 1,
             plural(s.n_layer, "layer", "layers"), plural(s.n_kv_head, "KV head", "KV heads"),
             s.head_dim, s.kv_dim());
  print_groups(src, rows.front().plan, n_ctx);
  fmt::print("request: {} x {}", plural(n_ctx, "token", "tokens"),
             plural(a.n_seqs, "sequence", "sequences"));
  if (budget) fmt::print(", budget {} ({} bytes)", a.budget, *budget);
  fmt::print("\n");
  if (src.n_ctx_model > 0 && n_ctx > src.n_ctx_model)
    fmt::print("note:    --ctx {} is more than the {} positions the model was trained for\n", n_ctx,
               src.n_ctx_model);
  fmt::print("\n");

  std::vector<std::vector<std::string>> table;
  std::vector<std::string> head = {"K/V type", "bytes/token/layer", "bytes/token", "% of f16",
                                   fmt::format("total: {} x {}", plural(n_ctx, "token", "tokens"),
                                               plural(a.n_seqs, "seq", "seqs"))};
  if (budget) {
    head.push_back(fmt::format("max ctx, {}", plural(a.n_seqs, "seq", "seqs")));
    head.push_back(fmt::format("max seqs, {}", plural(n_ctx, "token", "tokens")));
  }
  table.push_back(head);
  for (const Row& r : rows) {
    const KvPlan& p = r.plan;
    std::vector<std::string> row = {
        type_pair(p.shape), fmt::format("{}", p.bytes_per_token_layer),
        fmt::format("{}", p.bytes_per_token), fmt::format("{:.1f}%", pct_of_f16(p)),
        fmt::format("{} ({})", p.bytes_total, human_bytes(static_cast<double>(p.bytes_total)))};
    if (budget) {
      row.push_back(fmt::format("{}", *r.max_ctx));
      row.push_back(fmt::format("{}", *r.max_seqs));
    }
    table.push_back(row);
  }
  print_table(table);
  fmt::print("\nbytes/token = {} layers x (K row + V row); a sequence is one cache of --ctx tokens.\n"
             "Static caches allocate the total up front, dynamic ones grow to it in chunks of {} "
             "tokens.\n",
             s.n_layer, kKvChunkTokens);
  if (!rows.empty() && rows.front().plan.shape.kivi())
    fmt::print("KIVI: bytes/token are a sealed token's (K per channel in groups of {}); the total adds "
               "the f16 residual of up to R + {} tokens (docs/KV.md).\n",
               rows.front().plan.shape.kivi_group, rows.front().plan.shape.kivi_group - 1);
}

// One sequence of the plan, layer by layer: the K and V bytes each layer holds (its group's
// tokens x its row bytes).
nlohmann::json layers_json(const KvSource& src, const KvPlan& p) {
  nlohmann::json out = nlohmann::json::array();
  for (int32_t il = 0; il < p.shape.n_layer; ++il) {
    const int32_t w = src.layer_window.empty() ? 0 : src.layer_window[static_cast<size_t>(il)];
    const auto g = std::find_if(p.groups.begin(), p.groups.end(),
                                [&](const KvGroupPlan& x) { return x.window == w; });
    const auto tokens = static_cast<uint64_t>(g->tokens_per_seq);
    out.push_back({{"layer", il},
                   {"window", w},
                   {"tokens", tokens},
                   {"k_bytes", tokens * kv_k_row_bytes(p.shape)},
                   {"v_bytes", tokens * kv_v_row_bytes(p.shape)}});
  }
  return out;
}

nlohmann::json groups_json(const KvPlan& p) {
  nlohmann::json out = nlohmann::json::array();
  for (const KvGroupPlan& g : p.groups)
    out.push_back({{"window", g.window},
                   {"n_layer", g.n_layers},
                   {"tokens_per_seq", g.tokens_per_seq},
                   {"bytes_per_seq", g.bytes_per_seq}});
  return out;
}

void print_json(const KvSource& src, int64_t n_ctx, int64_t n_seqs, std::optional<uint64_t> budget,
                const std::vector<Row>& rows) {
  using nlohmann::json;
  auto opt = [](const auto& v) { return v ? json(*v) : json(nullptr); };
  json j;
  j["source"] = {{"kind", src.kind},
                 {"path", src.path.empty() ? json(nullptr) : json(src.path)},
                 {"arch", src.arch.empty() ? json(nullptr) : json(src.arch)}};
  j["n_ctx"] = n_ctx;
  j["n_ctx_model"] = src.n_ctx_model > 0 ? json(src.n_ctx_model) : json(nullptr);
  j["n_seqs"] = n_seqs;
  j["budget_bytes"] = opt(budget);
  j["layer_windows"] = src.layer_window.empty()
                           ? json(std::vector<int32_t>(static_cast<size_t>(src.shape.n_layer), 0))
                           : json(src.layer_window);
  j["layer_groups"] = json::array();
  for (const KvGroupPlan& g : rows.front().plan.groups)
    j["layer_groups"].push_back({{"window", g.window},
                                 {"n_layer", g.n_layers},
                                 {"n_kv_head", src.shape.n_kv_head},
                                 {"head_dim", src.shape.head_dim}});
  j["cache_types"] = json::array();
  for (const Row& r : rows) {
    const KvPlan& p = r.plan;
    j["cache_types"].push_back({{"type_k", dtype_name(p.shape.dtype_k)},
                                {"type_v", dtype_name(p.shape.dtype_v)},
                                {"kivi_residual", p.shape.kivi() ? json(p.shape.kivi_residual) : json(nullptr)},
                                {"k_bytes_per_token_layer", p.k_bytes_per_token_layer},
                                {"v_bytes_per_token_layer", p.v_bytes_per_token_layer},
                                {"bytes_per_token_layer", p.bytes_per_token_layer},
                                {"k_bytes_per_token", p.k_bytes_per_token},
                                {"v_bytes_per_token", p.v_bytes_per_token},
                                {"bytes_per_token", p.bytes_per_token},
                                {"bytes_per_seq", p.bytes_per_seq},
                                {"bytes_total", p.bytes_total},
                                {"max_ctx_for_budget", opt(r.max_ctx)},
                                {"max_seqs_for_budget", opt(r.max_seqs)},
                                {"pct_of_f16", pct_of_f16(p)},
                                {"groups", groups_json(p)},
                                {"layers", layers_json(src, p)},
                                {"llama_cpp_iswa_bytes_per_seq",
                                 llama_cpp_iswa_bytes(p.shape, n_ctx, src.layer_window)}});
  }
  fmt::print("{}\n", j.dump(2));
}

// ---- the command -------------------------------------------------------------------------------

int run_kv_size(const KvSizeArgs& a) {
  // Check the cheap inputs before opening any file.
  std::optional<uint64_t> budget;
  if (a.budget_given) budget = parse_bytes(a.budget);
  std::optional<std::pair<DType, DType>> pair;
  if (a.kv_residual >= 0)  // KIVI: K is q4_0-sized per-channel groups; V defaults to q4_0 too
    pair = {parse_cache_type(a.ctk.empty() ? "q4_0" : a.ctk, "-ctk"),
            parse_cache_type(a.ctv.empty() ? "q4_0" : a.ctv, "-ctv")};
  else if (!a.ctk.empty() || !a.ctv.empty())
    pair = {parse_cache_type(a.ctk.empty() ? "f16" : a.ctk, "-ctk"),
            parse_cache_type(a.ctv.empty() ? "f16" : a.ctv, "-ctv")};

  const KvSource src = resolve_source(a);
  const int64_t n_ctx = a.n_ctx > 0 ? a.n_ctx : src.n_ctx_model > 0 ? src.n_ctx_model : kDefaultCtx;

  std::vector<std::pair<DType, DType>> pairs;
  if (pair)
    pairs.push_back(*pair);
  else
    for (DType t : kv_plan_types(src.shape)) pairs.emplace_back(t, t);

  std::vector<Row> rows;
  for (const auto& [k, v] : pairs) {
    KvShape s = src.shape;
    s.dtype_k = k;
    s.dtype_v = v;
    s.kivi_residual = static_cast<int32_t>(a.kv_residual);
    Row r{plan_kv(s, n_ctx, a.n_seqs, src.layer_window), std::nullopt, std::nullopt};
    if (budget) {
      r.max_ctx = max_ctx_for_budget(s, a.n_seqs, *budget, src.layer_window);
      r.max_seqs = max_seqs_for_budget(s, n_ctx, *budget, src.layer_window);
    }
    rows.push_back(r);
  }
  if (budget) {
    // A budget no listed type can use at all is a mistake worth stopping for; one that only the
    // smaller types fit shows as zeros in the table.
    const Row* smallest = &rows.front();
    for (const Row& r : rows)
      if (r.plan.bytes_per_token < smallest->plan.bytes_per_token) smallest = &r;
    if (*smallest->max_ctx == 0)
      fail("budget {} ({} bytes) cannot hold one block ({} tokens) of {} (needs {} bytes{})",
           a.budget, *budget, kv_seq_block_size(smallest->plan.shape),
           a.n_seqs == 1 ? std::string("one sequence") : fmt::format("{} sequences", a.n_seqs),
           plan_kv(smallest->plan.shape, 1, a.n_seqs, src.layer_window).bytes_total,
           rows.size() > 1 ? " with " + type_pair(smallest->plan.shape) + ", the smallest type"
                           : std::string());
  }

  if (a.json)
    print_json(src, n_ctx, a.n_seqs, budget, rows);
  else
    print_text(src, a, n_ctx, budget, rows);
  return 0;
}

constexpr const char* kFooter = R"(Sources (exactly one; default: the default model):
  -m MODEL.gguf       <arch>.block_count, attention.head_count(_kv), key_length or
                      embedding_length / head_count, context_length
  --hf-config FILE    num_hidden_layers, num_attention_heads, num_key_value_heads
                      (default: heads), head_dim or hidden_size / heads, max_position_embeddings
  --layers --kv-heads --head-dim
Byte sizes: 1000000, 512MiB, 2GiB, 1.5GB, 64k (KiB/MiB/GiB/TiB and bare K/M/G/T are powers of
1024, KB/MB/GB/TB powers of 1000; case-insensitive).

--json prints one object; byte counts are integers, absent values null:
  source        {kind: "gguf"|"hf-config"|"flags", path, arch}
  n_ctx, n_ctx_model, n_seqs, budget_bytes
  layer_windows [n_layer] each layer's sliding window, 0: full attention
  layer_groups  [{window, n_layer, n_kv_head, head_dim}]
  cache_types   [{type_k, type_v, kivi_residual, k_bytes_per_token_layer, v_bytes_per_token_layer,
                  bytes_per_token_layer, k_bytes_per_token, v_bytes_per_token, bytes_per_token,
                  bytes_per_seq (one cache of n_ctx), bytes_total (n_seqs caches),
                  max_ctx_for_budget, max_seqs_for_budget,
                  pct_of_f16 (bytes per token against an f16 cache's),
                  groups [{window, n_layer, tokens_per_seq, bytes_per_seq}],
                  layers [{layer, window, tokens, k_bytes, v_bytes}] (one sequence),
                  llama_cpp_iswa_bytes_per_seq}]
Sliding windows: a GGUF's <arch>.attention.sliding_window (+ _pattern, or the architecture's:
gemma3 6, gemma2 2), a config's sliding_window with layer_types or sliding_window_pattern, or
--kv-window W [--kv-window-pattern N]. A window group holds the blocks of W - 1 + 512 tokens (a
pass of -b 512) at most; the planner and the allocator share that arithmetic.)";

}  // namespace

Command add_kv_size(CLI::App& app) {
  auto a = std::make_shared<KvSizeArgs>();
  auto* cmd = app.add_subcommand(
      "kv-size", "exact KV cache memory: bytes per token and in total, max context/users in a budget");
  cmd->footer(kFooter);
  auto* model = cmd->add_option("-m,--model", a->model, "GGUF model (reads the metadata only)");
  auto* hf = cmd->add_option("--hf-config", a->hf_config, "Hugging Face config.json");
  auto* layers = cmd->add_option("--layers", a->n_layer, "layers")->check(CLI::PositiveNumber);
  auto* kv_heads = cmd->add_option("--kv-heads", a->n_kv_head, "KV heads per layer")
                       ->check(CLI::PositiveNumber);
  auto* head_dim = cmd->add_option("--head-dim", a->head_dim, "values per head")
                       ->check(CLI::PositiveNumber);
  hf->excludes(model);
  for (CLI::Option* o : {layers, kv_heads, head_dim}) {
    o->excludes(model)->excludes(hf);
    for (CLI::Option* other : {layers, kv_heads, head_dim})
      if (other != o) o->needs(other);
  }
  cmd->add_option("-c,--ctx,--ctx-size", a->n_ctx,
                  "tokens per sequence (default: the model's context, else 4096)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--seqs", a->n_seqs, "sequences (users), each its own cache")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  auto* budget = cmd->add_option("--budget", a->budget,
                  "memory for the caches, e.g. 2GiB: adds the longest context for --seqs users and "
                  "the most users at --ctx");
  cmd->add_option("--cache-type-k", a->ctk, "only this K type (alias -ctk; the other defaults to f16)");
  cmd->add_option("--cache-type-v", a->ctv, "only this V type (alias -ctv; the other defaults to f16)");
  cmd->add_option("--kv-residual", a->kv_residual,
                  "only the KIVI cache keeping R recent tokens in f16 (K per channel; -ctk/-ctv "
                  "default to q4_0)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 20));
  auto* window = cmd->add_option("--kv-window", a->kv_window,
                                 "with --layers: sliding-window attention of W tokens")
                     ->check(CLI::PositiveNumber);
  cmd->add_option("--kv-window-pattern", a->kv_window_pattern,
                  "with --kv-window: every N-th layer attends to everything (Gemma 3: 6)")
      ->check(CLI::PositiveNumber)
      ->needs(window);
  window->needs(layers);
  cmd->add_flag("--json", a->json, "print one JSON object (keys below) instead of the table");
  return {cmd, [a, budget] {
            a->budget_given = budget->count() > 0;
            return run_kv_size(*a);
          }};
}

}  // namespace kvlm::cli
