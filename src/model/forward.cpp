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

constexpr int64_t kAttnChunk = 256;   // positions per attention work item
constexpr int64_t kAttnTokens = 32;   // queries per parallel attention pass

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
  s.scores_per_thread = c.n_gqa() * kAttnChunk + 2 * c.head_dim + c.n_gqa() * c.head_dim;
  grow(s.scores, s.n_threads * s.scores_per_thread);
  const int64_t max_chunks = (s.n_ctx + kAttnChunk - 1) / kAttnChunk;
  grow(s.attn_part, std::min<int64_t>(s.n_batch, kAttnTokens) * c.n_head * max_chunks * (c.head_dim + 2));
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
// Work items are (token, KV head, chunk of kAttnChunk positions): each K and V row is read and
// dequantized once for all the query heads that share it (GQA), and a long context splits into
// chunks that threads share (flash-decoding). Each chunk keeps an online-softmax partial (max,
// sum, unnormalised output) and the partials are merged in chunk order. Chunk boundaries are
// fixed multiples of kAttnChunk, so a position's result never depends on the batch or the
// thread count (cached decoding == recomputation). With an f16 K, q is rounded to f16 first, as
// llama.cpp's f16 K.q product does.
void attention(const ModelConfig& c, const KvLayerView& kv, const float* q, float* out,
               int64_t n_tok, int64_t pos0, Scratch& s, ThreadPool& pool) {
  const int64_t hd = c.head_dim, n_kv = c.n_kv_head, gqa = c.n_gqa();
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const size_t k_head_bytes = kv.k_row_bytes / n_kv;
  const size_t v_head_bytes = kv.v_row_bytes / n_kv;
  const int64_t max_chunks = (pos0 + n_tok + kAttnChunk - 1) / kAttnChunk;
  const int64_t part_stride = hd + 2;  // per (token, head, chunk): m, l, o[hd]
  float* parts = s.attn_part.as<float>();  // [kAttnTokens, n_head, max_chunks, hd + 2]
  for (int64_t t0 = 0; t0 < n_tok; t0 += kAttnTokens) {
    const int64_t nt = std::min(kAttnTokens, n_tok - t0);
    pool.parallel_for(nt * n_kv * max_chunks, [&](int64_t begin, int64_t end, int tid) {
      float* work = s.scores.as<float>() + tid * s.scores_per_thread;
      float* sc = work;                        // [gqa, kAttnChunk] scores, then weights
      float* krow = sc + gqa * kAttnChunk;     // [head_dim] K row in f32
      float* vrow = krow + hd;                 // [head_dim] V row in f32
      float* qh16 = vrow + hd;                 // [gqa, head_dim] q rounded to f16
      for (int64_t job = begin; job < end; ++job) {
        const int64_t ch = job % max_chunks, g = (job / max_chunks) % n_kv;
        const int64_t i = t0 + job / (max_chunks * n_kv);
        const int64_t n_vis = pos0 + i + 1;  // causal: positions [0, pos]
        const int64_t j0 = ch * kAttnChunk, j1 = std::min(n_vis, j0 + kAttnChunk);
        if (j0 >= j1) continue;
        const float* qg[16];  // gqa query heads of group g (n_gqa <= 16 checked at load)
        for (int64_t a = 0; a < gqa; ++a) {
          qg[a] = q + i * c.q_dim() + (g * gqa + a) * hd;
          if (kv.dtype_k == DType::F16) {
            for (int64_t d = 0; d < hd; ++d) qh16[a * hd + d] = fp16_to_fp32(fp32_to_fp16(qg[a][d]));
            qg[a] = qh16 + a * hd;
          }
        }
        for (int64_t j = j0; j < j1; ++j) {
          kernels::dequantize_row(kv.dtype_k, kv.k + j * kv.k_row_bytes + g * k_head_bytes, krow, hd);
          for (int64_t a = 0; a < gqa; ++a)
            sc[a * kAttnChunk + (j - j0)] = kernels::dot_row(DType::F32, krow, qg[a], hd) * scale;
        }
        for (int64_t a = 0; a < gqa; ++a) {
          float* sa = sc + a * kAttnChunk;
          float m = sa[0];
          for (int64_t j = 1; j < j1 - j0; ++j) m = std::max(m, sa[j]);
          float l = 0;
          for (int64_t j = 0; j < j1 - j0; ++j) {
            sa[j] = std::exp(sa[j] - m);
            l += sa[j];
          }
          float* p = parts + (((i - t0) * c.n_head + g * gqa + a) * max_chunks + ch) * part_stride;
          p[0] = m;
          p[1] = l;
          std::fill(p + 2, p + 2 + hd, 0.0f);
        }
        for (int64_t j = j0; j < j1; ++j) {
          kernels::dequantize_row(kv.dtype_v, kv.v + j * kv.v_row_bytes + g * v_head_bytes, vrow, hd);
          for (int64_t a = 0; a < gqa; ++a) {
            const float w = sc[a * kAttnChunk + (j - j0)];
            float* o = parts + (((i - t0) * c.n_head + g * gqa + a) * max_chunks + ch) * part_stride + 2;
            for (int64_t d = 0; d < hd; ++d) o[d] += w * vrow[d];
          }
        }
      }
    });
    // Merge the chunk partials of each (token, head) in chunk order.
    for (int64_t i = t0; i < t0 + nt; ++i) {
      const int64_t n_chunks = (pos0 + i + 1 + kAttnChunk - 1) / kAttnChunk;
      for (int64_t h = 0; h < c.n_head; ++h) {
        const float* p = parts + ((i - t0) * c.n_head + h) * max_chunks * part_stride;
        float m = p[0];
        for (int64_t ch = 1; ch < n_chunks; ++ch) m = std::max(m, p[ch * part_stride]);
        float* o = out + i * c.q_dim() + h * hd;
        std::fill(o, o + hd, 0.0f);
        float l = 0;
        for (int64_t ch = 0; ch < n_chunks; ++ch) {
          const float* pc = p + ch * part_stride;
          const float f = std::exp(pc[0] - m);
          l += pc[1] * f;
          for (int64_t d = 0; d < hd; ++d) o[d] += pc[2 + d] * f;
        }
        const float inv = 1.0f / l;
        for (int64_t d = 0; d < hd; ++d) o[d] *= inv;
      }
    }
  }
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
  kv.reserve(pos0 + n_tok);

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
