#include <string>

#include "model/config.h"

namespace kvlm {

namespace {
// The architecture table. Adding an architecture is adding a row (and tensor names in model.cpp
// if it uses new ones), not a subclass.
constexpr ArchInfo kArchs[] = {
    {"llama", NormKind::Rms, PosKind::Rope, kernels::RopeMode::Normal, FfnKind::SwiGlu,
     /*fused_qkv=*/false, /*biases=*/false, "attention.layer_norm_rms_epsilon",
     /*qk_norm=*/false, /*post_norms=*/false, /*embed_scale=*/false, /*swa_pattern=*/0,
     /*swa_rope_base=*/0},
    {"gpt2", NormKind::Layer, PosKind::Learned, kernels::RopeMode::Normal, FfnKind::Gelu,
     /*fused_qkv=*/true, /*biases=*/true, "attention.layer_norm_epsilon",
     /*qk_norm=*/false, /*post_norms=*/false, /*embed_scale=*/false, /*swa_pattern=*/0,
     /*swa_rope_base=*/0},
    // Gemma 3 as llama.cpp runs it: NEOX RoPE, GELU-gated FFN, per-head Q/K norms, norms after
    // the attention and FFN blocks too, embeddings scaled by sqrt(n_embd); five windowed layers
    // (RoPE base 10000) to one global (the file's base). Norm weights are used as stored: the
    // converter already added Gemma's +1.
    {"gemma3", NormKind::Rms, PosKind::Rope, kernels::RopeMode::Neox, FfnKind::GeGlu,
     /*fused_qkv=*/false, /*biases=*/false, "attention.layer_norm_rms_epsilon",
     /*qk_norm=*/true, /*post_norms=*/true, /*embed_scale=*/true, /*swa_pattern=*/6,
     /*swa_rope_base=*/10000.0f},
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
