// kvlm command line: argv -> the chosen subcommand (cmd_*.cpp) -> stdout (text) and stderr
// (statistics, errors). Exit codes: 0 success, 1 runtime error (bad model file, prompt too long,
// ...), 2 usage error (unknown command or flag, out-of-range value).
#include <CLI/CLI.hpp>

#include <cstdio>
#include <string>
#include <vector>

#include "base/error.h"
#include "cli/common.h"

namespace kvlm::cli {
namespace {

int main_impl(int argc, char** argv) {
  CLI::App app{"kvlm: a KV-cache-centred LLM inference engine"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "kvlm 0.1.0");

  std::vector<Command> commands = {add_bench(app), add_chat(app), add_generate(app), add_inspect(app), add_kv_size(app), add_tokenize(app), add_perplexity(app), add_serve(app)};

  if (argc > 1 && argv[1][0] != '-') {
    bool known = false;
    std::string names;
    for (const Command& c : commands) {
      known |= c.app->get_name() == argv[1];
      names += (names.empty() ? "" : ", ") + c.app->get_name();
    }
    if (!known) {
      std::fprintf(stderr, "kvlm: error: unknown command '%s' (commands: %s)\n", argv[1],
                   names.c_str());
      return 2;
    }
  }
  // llama.cpp's multi-letter single-dash flags, which CLI11 would read as "-c tk".
  std::vector<std::string> args;
  for (int i = argc - 1; i >= 1; --i) {
    std::string s = argv[i];
    if (s == "-ctk") s = "--cache-type-k";
    if (s == "-ctv") s = "--cache-type-v";
    if (s == "-np") s = "--parallel";
    if (s == "-ngl") s = "--n-gpu-layers";
    if (s == "-fa") s = "--flash-attn";
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
    for (const Command& c : commands)
      if (*c.app) return c.run();
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
}  // namespace kvlm::cli

int main(int argc, char** argv) { return kvlm::cli::main_impl(argc, argv); }
