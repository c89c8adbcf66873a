// Helpers shared by the kvlm subcommands.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>

#include "tensor/dtype.h"

namespace kvlm::cli {

// A registered subcommand: its CLI11 app and what to run when it is chosen. run() returns the
// exit code; it may throw kvlm::Error (main turns it into one line and exit code 1).
struct Command {
  CLI::App* app = nullptr;
  std::function<int()> run;
};

Command add_generate(CLI::App& app);
Command add_inspect(CLI::App& app);
Command add_tokenize(CLI::App& app);

// Default model directory: $KVLM_MODELS or ~/.cache/kvlm/models.
std::string models_dir();
// `given` if not empty, else the default model; kvlm::Error naming the path if it is missing.
std::string resolve_model(const std::string& given);
// "1.50 MiB"
std::string human_bytes(double bytes);
// -ctk/-ctv values; kvlm::Error naming the flag for unknown or unsupported types.
DType parse_cache_type(const std::string& s, const char* flag);

}  // namespace kvlm::cli
