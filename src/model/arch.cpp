#include <string>

#include "model/config.h"

namespace kvlm {

namespace {
// The architecture table. Adding an architecture is adding a row (and tensor names in model.cpp
// if it uses new ones), not a subclass.
constexpr ArchInfo kArchs[] = {
    {"llama", NormKind::Rms, PosKind::Rope, kernels::RopeMode::Normal, FfnKind::SwiGlu,
     /*fused_qkv=*/false, /*biases=*/false, "attention.layer_norm_rms_epsilon"},
    {"gpt2", NormKind::Layer, PosKind::Learned, kernels::RopeMode::Normal, FfnKind::Gelu,
     /*fused_qkv=*/true, /*biases=*/true, "attention.layer_norm_epsilon"},
};
}  // namespace

const ArchInfo* find_arch(const std::string& name) {
  for (const auto& a : kArchs)
    if (name == a.name) return &a;
  return nullptr;
}

std::string supported_archs() {
  std::string out;
  for (const auto& a : kArchs) {
    if (!out.empty()) out += ", ";
    out += a.name;
  }
  return out;
}

}  // namespace kvlm
