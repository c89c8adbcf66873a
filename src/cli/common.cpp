#include "cli/common.h"

#include <cstdlib>
#include <filesystem>

#include "base/error.h"
#include "kv/kv_shape.h"

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

}  // namespace kvlm::cli
