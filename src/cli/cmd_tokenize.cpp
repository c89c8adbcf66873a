// kvlm tokenize: token ids and pieces of a text.
#include <fmt/format.h>

#include "cli/common.h"
#include "gguf/gguf.h"
#include "tokenizer/tokenizer.h"

namespace kvlm::cli {
namespace {

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

}  // namespace

Command add_tokenize(CLI::App& app) {
  struct Args {
    std::string model, text;
    bool no_bos = false;
  };
  auto a = std::make_shared<Args>();
  auto* tk = app.add_subcommand("tokenize", "print token ids and pieces of a text");
  tk->add_option("-m,--model", a->model, "GGUF model");
  tk->add_option("-p,--prompt", a->text, "text")->required();
  tk->add_flag("--no-bos", a->no_bos, "never add BOS");
  return {tk, [a] { return run_tokenize(a->model, a->text, a->no_bos); }};
}

}  // namespace kvlm::cli
