#include <cmath>
#include <string>

#include "model/config.h"

namespace kvlm {

namespace {
// The architecture table. Adding an architecture is adding a row (and tensor names in model.cpp
// if it uses new ones), not a subclass.
constexpr ArchInfo kArchs[] = {
    // Llama 1-3, Mistral (llama arch; a sliding_window key windows every layer) and SmolLM.
    // Llama 3 files add rope_freqs.weight, read for any RoPE architecture (model.cpp).
    {"llama", NormKind::Rms, PosKind::Rope, kernels::RopeMode::Normal, FfnKind::SwiGlu,
     /*fused_gate_up=*/false, /*biases=*/false, /*qkv_bias=*/false,
     "attention.layer_norm_rms_epsilon", /*qk_norm=*/false, /*post_norms=*/false,
     /*embed_scale=*/false, /*swa_pattern=*/0, /*swa_keys=*/true, /*swa_rope_base=*/0, /*embd_scale_layers=*/0},
    {"gpt2", NormKind::Layer, PosKind::Learned, kernels::RopeMode::Normal, FfnKind::Gelu,
     /*fused_gate_up=*/false, /*biases=*/true, /*qkv_bias=*/false, "attention.layer_norm_epsilon",
     /*qk_norm=*/false, /*post_norms=*/false, /*embed_scale=*/false, /*swa_pattern=*/0,
     /*swa_keys=*/true, /*swa_rope_base=*/0, /*embd_scale_layers=*/0},
    // Gemma 3 as llama.cpp runs it: NEOX RoPE, GELU-gated FFN, per-head Q/K norms, norms after
    // the attention and FFN blocks too, embeddings scaled by sqrt(n_embd); five windowed layers
    // (RoPE base 10000) to one global (the file's base). Norm weights are used as stored: the
    // converter already added Gemma's +1.
    {"gemma3", NormKind::Rms, PosKind::Rope, kernels::RopeMode::Neox, FfnKind::GeGlu,
     /*fused_gate_up=*/false, /*biases=*/false, /*qkv_bias=*/false,
     "attention.layer_norm_rms_epsilon", /*qk_norm=*/true, /*post_norms=*/true,
     /*embed_scale=*/true, /*swa_pattern=*/6, /*swa_keys=*/true, /*swa_rope_base=*/10000.0f, /*embd_scale_layers=*/62},
    // Qwen 2 / 2.5: Llama's blocks with biases on Q, K and V, NEOX RoPE.
    {"qwen2", NormKind::Rms, PosKind::Rope, kernels::RopeMode::Neox, FfnKind::SwiGlu,
     /*fused_gate_up=*/false, /*biases=*/false, /*qkv_bias=*/true,
     "attention.layer_norm_rms_epsilon", /*qk_norm=*/false, /*post_norms=*/false,
     /*embed_scale=*/false, /*swa_pattern=*/0, /*swa_keys=*/true, /*swa_rope_base=*/0, /*embd_scale_layers=*/0},
    // Qwen 3 (dense): no biases, per-head RMSNorm of Q and K before RoPE, head size from
    // key_length (128 with n_embd 1024 and 16 heads in Qwen3-0.6B).
    {"qwen3", NormKind::Rms, PosKind::Rope, kernels::RopeMode::Neox, FfnKind::SwiGlu,
     /*fused_gate_up=*/false, /*biases=*/false, /*qkv_bias=*/false,
     "attention.layer_norm_rms_epsilon", /*qk_norm=*/true, /*post_norms=*/false,
     /*embed_scale=*/false, /*swa_pattern=*/0, /*swa_keys=*/true, /*swa_rope_base=*/0, /*embd_scale_layers=*/0},
    // Phi-3: fused attn_qkv (split into Q, K, V at load), fused gate/up in ffn_up, NEOX RoPE;
    // its sliding_window key is ignored, as llama.cpp does.
    {"phi3", NormKind::Rms, PosKind::Rope, kernels::RopeMode::Neox, FfnKind::SwiGlu,
     /*fused_gate_up=*/true, /*biases=*/false, /*qkv_bias=*/false,
     "attention.layer_norm_rms_epsilon", /*qk_norm=*/false, /*post_norms=*/false,
     /*embed_scale=*/false, /*swa_pattern=*/0, /*swa_keys=*/false, /*swa_rope_base=*/0, /*embd_scale_layers=*/0},
};
}  // namespace

float attention_scale(const ArchInfo& arch, int32_t n_layer, int32_t n_embd, int32_t n_head,
                      int32_t head_dim) {
  if (arch.embd_scale_layers > 0 && n_layer == arch.embd_scale_layers)
    return 1.0f / std::sqrt(static_cast<float>(n_embd / n_head));
  return 1.0f / std::sqrt(static_cast<float>(head_dim));
}

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
