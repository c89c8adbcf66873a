// kvlm inspect: metadata, tensor table, derived config and KV bytes per token. The first two come
// from the GGUF reader alone, so a file kvlm cannot run still lists.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <memory>

#include "base/error.h"
#include "cli/common.h"
#include "gguf/gguf.h"
#include "kv/kv_shape.h"
#include "model/model.h"

namespace kvlm::cli {
namespace {

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

// Metadata and tensor table, from the GGUF reader alone: any valid GGUF file lists, whatever its
// architecture or tensor types.
void print_file(const std::string& path, const GgufFile& f) {
  fmt::print("file: {} (GGUF v{}, {} bytes, alignment {})\n\n", path, f.version(), f.file_size(),
             f.alignment());
  fmt::print("metadata ({} keys):\n", f.metadata().size());
  for (const auto& [k, v] : f.metadata()) fmt::print("  {:<42} {}\n", k, value_str(v));
  fmt::print("\ntensors ({}):\n  {:<32} {:<7} {:<16} {:>12}\n", f.tensors().size(), "name",
             "type", "shape", "bytes");
  uint64_t total = 0;
  for (const auto& t : f.tensors()) {
    fmt::print("  {:<32} {:<7} {:<16} {:>12}\n", t.name, dtype_name(t.type),
               fmt::format("[{}]", fmt::join(t.ne, ", ")), t.n_bytes);
    total += t.n_bytes;
  }
  fmt::print("  {:<57} {:>12}\n", "total", total);
}

// The derived config and memory figures of a model kvlm can run.
void print_model(const Model& model) {
  const ModelConfig& c = model.config();
  fmt::print("\nconfig:\n");
  fmt::print("  architecture      {}\n  n_vocab           {}\n  n_ctx_train       {}\n", c.arch->name,
             c.n_vocab, c.n_ctx_train);
  fmt::print("  n_embd            {}\n  n_layer           {}\n  n_head            {}\n", c.n_embd,
             c.n_layer, c.n_head);
  fmt::print("  n_kv_head         {} (GQA: {} query heads per KV head)\n", c.n_kv_head, c.n_gqa());
  fmt::print("  head_dim          {}\n  n_ff              {}\n  norm_eps          {}\n", c.head_dim,
             c.n_ff, c.norm_eps);
  if (c.arch->pos == PosKind::Rope) {
    fmt::print("  rope              {} dims, freq_base {}", c.n_rot, c.rope_freq_base);
    if (c.rope_scaling != "none") fmt::print(", {} scaling", c.rope_scaling);
    if (c.rope_freq_scale != 1.0f) fmt::print(" x{}", c.rope_freq_scale);
    if (c.rope_ext_factor != 0.0f || c.rope_scaling == "longrope")
      fmt::print(" (original context {})", c.rope_n_ctx_orig);
    if (c.rope_attn_factor != 1.0f) fmt::print(", attention factor {}", c.rope_attn_factor);
    if (!c.rope_freq_factors.empty()) {
      const auto [lo, hi] =
          std::minmax_element(c.rope_freq_factors.begin(), c.rope_freq_factors.end());
      fmt::print(", frequency factors {}..{}", *lo, *hi);
      if (c.rope_scaling == "longrope")  // Model::load(path) loads for the training context
        fmt::print(" (the long set, for contexts above {})", c.rope_n_ctx_orig);
    }
    fmt::print("\n");
  }
  fmt::print("  output            {}\n", c.tied_output ? "tied to token_embd" : "separate");
  fmt::print("\nKV cache (per token = n_layer x n_kv_head x head_dim x 2 (K and V) x bytes):\n");
  for (DType t : {DType::F32, DType::F16}) {
    KvShape s = model.kv_shape(t, t);
    fmt::print("  {:<4} {:>8} bytes/token, {} at n_ctx_train={}\n", dtype_name(t),
               kv_bytes_per_token(s), human_bytes(kv_bytes(s, c.n_ctx_train)), c.n_ctx_train);
  }
  fmt::print("weights read per decoded token: {}\n", human_bytes(model.weight_bytes()));
  // The matmul's packed copies live in memory beside the mapped file (docs/ARCHITECTURE.md).
  fmt::print("packed weight copies in memory: {}\n", human_bytes(model.packed_bytes()));
}

// A file that is not valid GGUF is an error (exit 1); a valid one kvlm cannot run (architecture,
// tensor types, shapes) is still listed, followed by "cannot run: <why>" (exit 0).
int run_inspect(const std::string& model_arg) {
  const std::string path = resolve_model(model_arg);
  print_file(path, *GgufFile::open(path));
  std::unique_ptr<Model> model;
  try {
    model = Model::load(path);
  } catch (const Error& e) {
    fmt::print("\ncannot run: {}\n", e.what());
    return 0;
  }
  print_model(*model);
  return 0;
}

}  // namespace

Command add_inspect(CLI::App& app) {
  auto model = std::make_shared<std::string>();
  auto* ins = app.add_subcommand("inspect", "print metadata, tensors and the derived config");
  ins->add_option("-m,--model", *model, "GGUF model");
  return {ins, [model] { return run_inspect(*model); }};
}

}  // namespace kvlm::cli
