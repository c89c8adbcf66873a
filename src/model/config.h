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
enum class FfnKind { SwiGlu, GeGlu, Gelu };

struct ArchInfo {
  const char* name;      // general.architecture
  NormKind norm;         // RMSNorm (weight only) or LayerNorm (weight + bias)
  PosKind pos;           // RoPE on Q/K, or a learned position embedding added to the input
  kernels::RopeMode rope_mode;
  FfnKind ffn;           // gate/up/down with SiLU(gate) or GELU(gate), or up/down with GELU
  bool fused_gate_up;    // gated FFN whose ffn_up [2 * n_ff, n_embd] holds the gate rows, then
                         //   the up rows (Phi-3), instead of ffn_gate and ffn_up [n_ff, n_embd]
  bool biases;           // every linear layer and norm has a bias
  bool qkv_bias;         // Q, K and V (only) have biases: attn_q/k/v.bias (Qwen2)
  const char* eps_key;   // "<arch>.attention.layer_norm_rms_epsilon" or "..._epsilon" suffix
  bool qk_norm;          // each head of Q and K is RMS-normed (attn_q_norm, attn_k_norm
                         //   [head_dim]) before RoPE
  bool post_norms;       // the attention and FFN outputs are normed (post_attention_norm,
                         //   post_ffw_norm [n_embd]) before their residual adds
  bool embed_scale;      // token embeddings are multiplied by sqrt(n_embd)
  int32_t swa_pattern;   // sliding_window_pattern when the file has a window but no pattern
                         //   key (0: every layer windowed)
  bool swa_keys;         // <arch>.attention.sliding_window is honoured; Phi-3 files carry one
                         //   that llama.cpp ignores (its Phi SWA is disabled), and so does kvlm
  float swa_rope_base;   // RoPE base of the windowed layers (0: the file's rope.freq_base);
                         //   Gemma 3 trains its local layers with 10000, its global ones with
                         //   the file's (llama.cpp's rope_freq_base_train_swa; a
                         //   <arch>.rope.freq_base_swa key overrides it)
  int32_t embd_scale_layers;  // with this many layers the attention scale is
                              //   1/sqrt(n_embd / n_head) instead of 1/sqrt(head_dim) (0: never):
                              //   Gemma 3 27B's query_pre_attn_scalar, which llama.cpp (and so
                              //   the GGUF) knows only from the 62-layer model type
};

// nullptr when kvlm does not support the architecture.
const ArchInfo* find_arch(const std::string& name);
// The factor attention scores are scaled by, q . k times this (ArchInfo::embd_scale_layers).
float attention_scale(const ArchInfo& arch, int32_t n_layer, int32_t n_embd, int32_t n_head,
                      int32_t head_dim);
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
  int32_t head_dim = 0;      // <arch>.attention.key_length, else n_embd / n_head
  int32_t n_ff = 0;
  int32_t n_rot = 0;         // dims of each head that RoPE rotates
  float norm_eps = 1e-5f;
  float rope_freq_base = 10000.0f;
  float rope_freq_base_swa = 10000.0f;  // the windowed layers' base (ArchInfo::swa_rope_base)
  float attn_scale = 0;      // attention_scale(): 1/sqrt(head_dim) for most models
  // RoPE scaling (read_rope, model.cpp; the fields mean what KvRope's do, kv/kv_cache.h):
  std::string rope_scaling = "none";  // none, linear, yarn or longrope (for kvlm inspect)
  // Linear and YaRN scaling (<arch>.rope.scaling.factor F): frequencies times 1 / F (YaRN: only
  // the interpolated pairs, rope_ext_factor != 0).
  float rope_freq_scale = 1.0f;
  // Pair i's frequency divided by factor i: Llama 3's rope_freqs.weight, or LongRoPE's
  // rope_factors_long.weight when the context asked for at load exceeds rope_n_ctx_orig, else
  // rope_factors_short.weight (Phi-3 128k; llama.cpp's choice).
  std::vector<float> rope_freq_factors;  // [n_rot / 2], or empty
  float rope_ext_factor = 0.0f;  // YaRN's ramp weight: 1 with type yarn, 0 otherwise
  int32_t rope_n_ctx_orig = 0;   // .rope.scaling.original_context_length, else n_ctx_train
  float rope_beta_fast = 32.0f;  // YaRN ramp ends (.rope.scaling.yarn_beta_fast / _slow)
  float rope_beta_slow = 1.0f;
  // Every rotated Q and K value is multiplied by this, so scores of the rotated dims grow by its
  // square: .rope.scaling.attn_factor (LongRoPE: sqrt(1 + ln F / ln n_ctx_orig)) times, with
  // YaRN and F > 1, 1 + 0.1 ln F (YaRN's "mscale"), as llama.cpp applies both.
  float rope_attn_factor = 1.0f;
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
  int32_t max_window() const {  // the largest sliding window of any layer, 0: none
    int32_t w = 0;
    for (int32_t x : layer_window) w = x > w ? x : w;
    return w;
  }
  float rope_base(int32_t il) const {  // layer il's RoPE base
    return window(il) > 0 ? rope_freq_base_swa : rope_freq_base;
  }
};

}  // namespace kvlm
