// The forward pass, top to bottom: embed -> per layer (norm, QKV, RoPE, write K/V into the cache,
// attention over the cache, output projection, MLP) -> final norm -> logits.
// Prefill and decode are the same code; only n_tok differs.
#include <algorithm>
#include <cmath>

#include "base/error.h"
#include "kernels/ops.h"
#include "model/model.h"

namespace kvlm {

namespace {

void grow(AlignedBuffer& b, size_t n_floats) {
  if (b.size() < n_floats * sizeof(float)) b.resize(n_floats * sizeof(float));
}

void ensure_scratch(Scratch& s, const ModelConfig& c, int64_t n_tok, int64_t n_ctx, int n_threads) {
  if (s.n_batch >= n_tok && s.n_ctx >= n_ctx && s.n_threads >= n_threads) return;
  s.n_batch = std::max(s.n_batch, n_tok);
  s.n_ctx = std::max(s.n_ctx, n_ctx);
  s.n_threads = std::max<int64_t>(s.n_threads, n_threads);
  const size_t B = s.n_batch;
  grow(s.x, B * c.n_embd);
  grow(s.h, B * c.n_embd);
  grow(s.q, B * c.q_dim());
  grow(s.k, B * c.kv_dim());
  grow(s.v, B * c.kv_dim());
  if (c.arch->fused_qkv) grow(s.qkv, B * (c.q_dim() + 2 * c.kv_dim()));
  grow(s.attn, B * c.q_dim());
  grow(s.gate, B * c.n_ff);
  grow(s.up, B * c.n_ff);
  grow(s.scores, s.n_threads * s.n_ctx);
  grow(s.vrow, s.n_threads * 2 * c.head_dim);
  grow(s.logits, B * c.n_vocab);
}

void norm_rows(const ModelConfig& c, const float* x, const TensorView& w, const TensorView& b,
               float* y, int64_t n_rows) {
  for (int64_t i = 0; i < n_rows; ++i) {
    const float* xi = x + i * c.n_embd;
    float* yi = y + i * c.n_embd;
    if (c.arch->norm == NormKind::Rms)
      kernels::rms_norm(xi, w.f32(), yi, c.n_embd, c.norm_eps);
    else
      kernels::layer_norm(xi, w.f32(), b.f32(), yi, c.n_embd, c.norm_eps);
  }
}

void add_bias(float* y, const TensorView& b, int64_t n_rows, int64_t n) {
  if (b.empty()) return;
  for (int64_t i = 0; i < n_rows; ++i) kernels::add(y + i * n, b.f32(), n);
}

// Causal attention of n_tok queries at positions [pos0, pos0 + n_tok) over cached positions
// [0, pos0 + n_tok) of one layer.
//   q:   [n_tok, n_head * head_dim]   (after RoPE)
//   out: [n_tok, n_head * head_dim]
// Each (token, head) is computed by one thread in a fixed order, so the result for a position
// does not depend on how many tokens share the batch. With an f16 cache the other operand of each
// dot is rounded to f16 too (q for K.q, the probabilities for p.V), as llama.cpp's f16 matrix
// products do: the same storage type then gives the same attention as the reference.
void attention(const ModelConfig& c, const KvLayerView& kv, const float* q, float* out,
               int64_t n_tok, int64_t pos0, Scratch& s, ThreadPool& pool) {
  const int64_t hd = c.head_dim, n_head = c.n_head, gqa = c.n_gqa();
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const size_t k_head_bytes = kv.k_row_bytes / c.n_kv_head;
  const size_t v_head_bytes = kv.v_row_bytes / c.n_kv_head;
  pool.parallel_for(n_tok * n_head, [&](int64_t begin, int64_t end, int tid) {
    float* scores = s.scores.as<float>() + tid * s.n_ctx;  // [n_ctx]
    float* vrow = s.vrow.as<float>() + tid * 2 * hd;        // [head_dim]
    float* q16 = vrow + hd;                                 // [head_dim] q rounded to f16
    for (int64_t job = begin; job < end; ++job) {
      const int64_t i = job / n_head, h = job % n_head, kvh = h / gqa;
      const int64_t n_vis = pos0 + i + 1;  // causal: positions [0, pos]
      const float* qh = q + i * c.q_dim() + h * hd;
      if (kv.dtype_k == DType::F16) {
        for (int64_t d = 0; d < hd; ++d) q16[d] = fp16_to_fp32(fp32_to_fp16(qh[d]));
        qh = q16;
      }
      float* oh = out + i * c.q_dim() + h * hd;
      for (int64_t j = 0; j < n_vis; ++j) {
        const uint8_t* kj = kv.k + j * kv.k_row_bytes + kvh * k_head_bytes;
        scores[j] = kernels::dot_row(kv.dtype_k, kj, qh, hd) * scale;
      }
      kernels::softmax(scores, n_vis);
      if (kv.dtype_v == DType::F16)
        for (int64_t j = 0; j < n_vis; ++j) scores[j] = fp16_to_fp32(fp32_to_fp16(scores[j]));
      std::fill(oh, oh + hd, 0.0f);
      for (int64_t j = 0; j < n_vis; ++j) {
        const uint8_t* vj = kv.v + j * kv.v_row_bytes + kvh * v_head_bytes;
        kernels::dequantize_row(kv.dtype_v, vj, vrow, hd);
        const float p = scores[j];
        for (int64_t d = 0; d < hd; ++d) oh[d] += p * vrow[d];
      }
    }
  });
}

}  // namespace

std::span<const float> Model::forward(std::span<const int32_t> tokens, int64_t pos0, KvCache& kv,
                                      Scratch& s, ThreadPool& pool, bool all_logits) const {
  const ModelConfig& c = config_;
  const Weights& w = weights_;
  const int64_t n_tok = static_cast<int64_t>(tokens.size());
  if (n_tok <= 0) fail("forward: no tokens");
  if (pos0 != kv.size()) fail("forward: position {} does not follow the cache ({} tokens)", pos0, kv.size());
  if (pos0 + n_tok > kv.n_ctx())
    fail("context full: {} cached + {} new tokens exceed the context of {} tokens", pos0, n_tok,
         kv.n_ctx());
  if (c.arch->pos == PosKind::Learned && pos0 + n_tok > c.n_ctx_train)
    fail("position {} is past the {} positions this model has learned embeddings for",
         pos0 + n_tok - 1, c.n_ctx_train);
  for (int32_t t : tokens)
    if (t < 0 || t >= c.n_vocab) fail("token id {} is out of range [0, {})", t, c.n_vocab);

  ensure_scratch(s, c, n_tok, kv.n_ctx(), pool.size());
  const int64_t E = c.n_embd, Q = c.q_dim(), KV = c.kv_dim(), F = c.n_ff;
  float* x = s.x.as<float>();     // [n_tok, E]
  float* h = s.h.as<float>();     // [n_tok, E]
  float* q = s.q.as<float>();     // [n_tok, Q]
  float* k = s.k.as<float>();     // [n_tok, KV]
  float* v = s.v.as<float>();     // [n_tok, KV]
  float* att = s.attn.as<float>();  // [n_tok, Q]
  float* gate = s.gate.as<float>();  // [n_tok, F]
  float* up = s.up.as<float>();      // [n_tok, F]

  // ---- embeddings ----
  for (int64_t i = 0; i < n_tok; ++i) {
    kernels::dequantize_row(w.tok_embd.dtype, w.tok_embd.row(tokens[i]), x + i * E, E);
    if (c.arch->pos == PosKind::Learned) {
      kernels::dequantize_row(w.pos_embd.dtype, w.pos_embd.row(pos0 + i), h, E);
      kernels::add(x + i * E, h, E);
    }
  }

  for (int32_t il = 0; il < c.n_layer; ++il) {
    const LayerWeights& l = w.layers[il];
    // ---- attention block ----
    norm_rows(c, x, l.attn_norm, l.attn_norm_b, h, n_tok);
    if (c.arch->fused_qkv) {
      const int64_t QKV = Q + 2 * KV;
      float* qkv = s.qkv.as<float>();  // [n_tok, Q + 2 KV]: q | k | v per row
      kernels::matmul(l.wqkv, h, qkv, n_tok, pool);
      add_bias(qkv, l.bqkv, n_tok, QKV);
      for (int64_t i = 0; i < n_tok; ++i) {
        std::copy_n(qkv + i * QKV, Q, q + i * Q);
        std::copy_n(qkv + i * QKV + Q, KV, k + i * KV);
        std::copy_n(qkv + i * QKV + Q + KV, KV, v + i * KV);
      }
    } else {
      kernels::matmul(l.wq, h, q, n_tok, pool);
      kernels::matmul(l.wk, h, k, n_tok, pool);
      kernels::matmul(l.wv, h, v, n_tok, pool);
    }
    if (c.arch->pos == PosKind::Rope) {
      for (int64_t i = 0; i < n_tok; ++i) {
        kernels::rope(q + i * Q, c.n_head, c.head_dim, c.n_rot, pos0 + i, c.rope_freq_base,
                      c.arch->rope_mode);
        kernels::rope(k + i * KV, c.n_kv_head, c.head_dim, c.n_rot, pos0 + i, c.rope_freq_base,
                      c.arch->rope_mode);
      }
    }
    // K is stored after RoPE (docs/KV.md): attention then needs no per-read rotation.
    kv.write(il, pos0, n_tok, k, v);
    attention(c, kv.view(il, pos0 + n_tok), q, att, n_tok, pos0, s, pool);
    kernels::matmul(l.wo, att, h, n_tok, pool);
    add_bias(h, l.bo, n_tok, E);
    kernels::add(x, h, n_tok * E);

    // ---- feed-forward block ----
    norm_rows(c, x, l.ffn_norm, l.ffn_norm_b, h, n_tok);
    kernels::matmul(l.ffn_up, h, up, n_tok, pool);
    add_bias(up, l.ffn_up_b, n_tok, F);
    float* act = up;  // [n_tok, F] input of ffn_down
    if (c.arch->ffn == FfnKind::SwiGlu) {
      kernels::matmul(l.ffn_gate, h, gate, n_tok, pool);
      kernels::swiglu(gate, up, n_tok * F);
      act = gate;
    } else {
      kernels::gelu(up, n_tok * F);
    }
    kernels::matmul(l.ffn_down, act, h, n_tok, pool);
    add_bias(h, l.ffn_down_b, n_tok, E);
    kernels::add(x, h, n_tok * E);
  }
  kv.commit(pos0 + n_tok);

  // ---- output ----
  const int64_t n_out = all_logits ? n_tok : 1;
  const float* x_out = x + (n_tok - n_out) * E;
  norm_rows(c, x_out, w.output_norm, w.output_norm_b, h, n_out);
  float* logits = s.logits.as<float>();  // [n_out, n_vocab]
  kernels::matmul(w.output, h, logits, n_out, pool);
  return {logits, static_cast<size_t>(n_out * c.n_vocab)};
}

}  // namespace kvlm
