// Model differences are data: one ModelConfig filled from GGUF metadata, plus a row of the
// architecture table saying which blocks the forward pass uses. No subclass per model.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/ops.h"

namespace kvlm {

enum class NormKind { Rms, Layer };
enum class PosKind { Rope, Learned };
enum class FfnKind { SwiGlu, Gelu };

struct ArchInfo {
  const char* name;      // general.architecture
  NormKind norm;         // RMSNorm (weight only) or LayerNorm (weight + bias)
  PosKind pos;           // RoPE on Q/K, or a learned position embedding added to the input
  kernels::RopeMode rope_mode;
  FfnKind ffn;           // gate/up/down with SiLU, or up/down with GELU
  bool fused_qkv;        // one attn_qkv matrix [3 * n_embd, n_embd] instead of q, k, v
  bool biases;           // every linear layer and norm has a bias
  const char* eps_key;   // "<arch>.attention.layer_norm_rms_epsilon" or "..._epsilon" suffix
};

// nullptr when kvlm does not support the architecture.
const ArchInfo* find_arch(const std::string& name);
// Comma-separated list of supported architecture names, for error messages.
std::string supported_archs();

struct ModelConfig {
  const ArchInfo* arch = nullptr;
  std::string name;          // general.name
  int32_t n_vocab = 0;
  int32_t n_ctx_train = 0;   // context the model was trained for
  int32_t n_embd = 0;
  int32_t n_layer = 0;
  int32_t n_head = 0;
  int32_t n_kv_head = 0;     // < n_head with grouped-query attention
  int32_t head_dim = 0;      // n_embd / n_head
  int32_t n_ff = 0;
  int32_t n_rot = 0;         // dims of each head that RoPE rotates
  float norm_eps = 1e-5f;
  float rope_freq_base = 10000.0f;
  bool tied_output = false;  // output projection shares token_embd
  // Sliding-window attention per layer: layer il's query at position p sees keys at positions
  // (p - layer_window[il], p] only; 0: every earlier position. [n_layer], from
  // <arch>.attention.sliding_window and .sliding_window_pattern (read_layer_windows, model.cpp).
  std::vector<int32_t> layer_window;

  int32_t n_gqa() const { return n_head / n_kv_head; }  // query heads per KV head
  int64_t q_dim() const { return int64_t{n_head} * head_dim; }
  int64_t kv_dim() const { return int64_t{n_kv_head} * head_dim; }
  int32_t window(int32_t il) const {  // layer il's sliding window, 0: full attention
    return layer_window.empty() ? 0 : layer_window[static_cast<size_t>(il)];
  }
};

}  // namespace kvlm
