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
constexpr int64_t kAttnTokBlock = 8;  // queries of one work item, sharing its K/V tiles

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
  grow(s.q16, B * c.q_dim());
  grow(s.k, B * c.kv_dim());
  grow(s.v, B * c.kv_dim());
  if (c.arch->fused_qkv) grow(s.qkv, B * (c.q_dim() + 2 * c.kv_dim()));
  grow(s.attn, B * c.q_dim());
  grow(s.gate, B * c.n_ff);
  grow(s.up, B * c.n_ff);
  // K and V tiles, scores, q in f16, outputs, max and sum (see attention()).
  s.scores_per_thread = 2 * kAttnChunk * c.head_dim + c.n_gqa() * kAttnChunk +
                        c.n_gqa() * c.head_dim + 2 * c.n_gqa();
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
// Work items are (block of kAttnTokBlock tokens, KV head, chunk of kAttnChunk positions): the
// chunk's K and V rows of that head are dequantized once into f32 tiles, which every query head
// of the group (GQA) and every token of the block then reads (prefill reuses each tile up to
// kAttnTokBlock times), and kernels::attn_chunk computes each (token, head)'s online-softmax
// partial (max, sum, unnormalised output). A long context splits into chunks that threads share
// (flash-decoding); the partials are merged in chunk order. Chunk boundaries are fixed multiples
// of kAttnChunk and a token's partial depends only on its q and the rows it sees, so a
// position's result never depends on the batch or the thread count (cached decoding ==
// recomputation). With an f16 K, q is rounded to f16 first, as llama.cpp's f16 K.q product does.
// KIVI layout (kv.kivi_residual >= 0, docs/KV.md): query i at pos0 + i reads positions
// [0, kv_kivi_sealed(n_sealed0, pos0 + i + 1)) from the sealed groups / V rows, then f16 rows:
// older ones from the residual, this batch's from s.k / s.v (the rows given to kv.write, rounded
// to f16 as the residual stores them), so every query sees what a decode step at its position
// sees. Which source holds a position then depends on the token, so KIVI blocks are one token.
void attention(const ModelConfig& c, const KvLayerView& kv, const float* q, float* out,
               int64_t n_tok, int64_t pos0, Scratch& s, ThreadPool& pool) {
  const int64_t hd = c.head_dim, n_kv = c.n_kv_head, gqa = c.n_gqa(), KV = c.kv_dim();
  const bool kivi = kv.kivi_residual >= 0;
  const int64_t tok_block = kivi ? 1 : kAttnTokBlock;
  const float* k_new = s.k.as<float>();  // [n_tok, kv_dim] this batch's K (KIVI reads it)
  const float* v_new = s.v.as<float>();  // [n_tok, kv_dim] this batch's V
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const size_t k_head_bytes = kv.k_row_bytes / n_kv;
  const size_t v_head_bytes = kv.v_row_bytes / n_kv;
  const int64_t max_chunks = (pos0 + n_tok + kAttnChunk - 1) / kAttnChunk;
  const int64_t part_stride = hd + 2;  // per (token, head, chunk): m, l, o[hd]
  float* parts = s.attn_part.as<float>();  // [kAttnTokens, n_head, max_chunks, hd + 2]
  if (kv.dtype_k == DType::F16) {
    // Rounded once here, not per chunk: every chunk then reads the same rounded q.
    float* q16 = s.q16.as<float>();  // [n_tok, q_dim]
    kernels::round_to_f16(q, q16, n_tok * c.q_dim());
    q = q16;
  }
  for (int64_t t0 = 0; t0 < n_tok; t0 += kAttnTokens) {
    const int64_t nt = std::min(kAttnTokens, n_tok - t0);
    const int64_t n_blocks = (nt + tok_block - 1) / tok_block;
    pool.parallel_for(n_blocks * n_kv * max_chunks, [&](int64_t begin, int64_t end, int tid) {
      float* work = s.scores.as<float>() + tid * s.scores_per_thread;
      float* ktile = work;                      // [kAttnChunk, head_dim] K rows in f32
      float* vtile = ktile + kAttnChunk * hd;   // [kAttnChunk, head_dim] V rows in f32
      float* sc = vtile + kAttnChunk * hd;      // [gqa, kAttnChunk] scores, then weights
      float* o_part = sc + gqa * kAttnChunk;    // [gqa, head_dim] unnormalised outputs
      float* m_part = o_part + gqa * hd;        // [gqa]
      float* l_part = m_part + gqa;             // [gqa]
      for (int64_t job = begin; job < end; ++job) {
        const int64_t ch = job % max_chunks, g = (job / max_chunks) % n_kv;
        const int64_t i0 = t0 + (job / (max_chunks * n_kv)) * tok_block;
        const int64_t i1 = std::min(t0 + nt, i0 + tok_block);
        // The block's last token sees the most: causal positions [0, pos0 + i1 - 1].
        const int64_t j0 = ch * kAttnChunk, j_end = std::min(pos0 + i1, j0 + kAttnChunk);
        if (j0 >= j_end) continue;
        // Positions [j0, js) are stored rows (plain) or sealed (KIVI); KIVI's f16 rows are
        // [js, jr) in the residual and [jr, j_end) in this batch (KIVI blocks are one token).
        const int64_t js = kivi ? std::clamp(kv_kivi_sealed(kv.n_sealed0, pos0 + i0 + 1,
                                                            kv.kivi_residual, kv.kivi_group),
                                             j0, j_end)
                                : j_end;
        const int64_t jr = std::clamp(pos0, js, j_end);
        auto f16_row = [&](const uint16_t* resid, const float* batch, int64_t j, float* row) {
          if (j < jr)
            kernels::dequantize_row(DType::F16, resid + (j - kv.n_sealed0) * KV + g * hd, row, hd);
          else
            kernels::round_to_f16(batch + (j - pos0) * KV + g * hd, row, hd);
        };
        if (!kivi) {  // one strided read of head g's rows per tile
          kernels::dequantize_rows(kv.dtype_k, kv.k + j0 * kv.k_row_bytes + g * k_head_bytes,
                                   kv.k_row_bytes, j_end - j0, ktile, hd);
          kernels::dequantize_rows(kv.dtype_v, kv.v + j0 * kv.v_row_bytes + g * v_head_bytes,
                                   kv.v_row_bytes, j_end - j0, vtile, hd);
        } else {
          for (int64_t j = j0; j < j_end; ++j) {
            float* krow = ktile + (j - j0) * hd;
            float* vrow = vtile + (j - j0) * hd;
            if (j >= js) {
              f16_row(kv.k_resid, k_new, j, krow);
              f16_row(kv.v_resid, v_new, j, vrow);
              continue;
            }
            kv_kivi_dequantize_k_row(kv.k + (j / kv.kivi_group) * kv.kivi_group_bytes,
                                     kv.kivi_group, KV, j % kv.kivi_group, g * hd, hd, krow);
            // KIVI's sealed V rows are plain dtype_v rows at their positions.
            kernels::dequantize_row(kv.dtype_v, kv.v + j * kv.v_row_bytes + g * v_head_bytes,
                                    vrow, hd);
          }
        }
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t n = std::min(pos0 + i + 1, j0 + kAttnChunk) - j0;  // causal: [0, pos]
          if (n <= 0) continue;
          const float* qg = q + i * c.q_dim() + g * gqa * hd;  // [gqa, head_dim] group g's heads
          kernels::attn_chunk(ktile, vtile, n, hd, qg, gqa, scale, m_part, l_part, o_part, sc);
          for (int64_t a = 0; a < gqa; ++a) {
            float* p = parts + (((i - t0) * c.n_head + g * gqa + a) * max_chunks + ch) * part_stride;
            p[0] = m_part[a];
            p[1] = l_part[a];
            std::copy_n(o_part + a * hd, hd, p + 2);
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
      const kernels::MatmulPart qkv[3] = {{&l.wq, q}, {&l.wk, k}, {&l.wv, v}};
      kernels::matmul_multi(qkv, 3, h, n_tok, pool);
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
    kv.finish_write(il, pos0, n_tok, k, v);  // KIVI: the residual moves on once attention has read it
    kernels::matmul(l.wo, att, h, n_tok, pool);
    add_bias(h, l.bo, n_tok, E);
    kernels::add(x, h, n_tok * E);

    // ---- feed-forward block ----
    norm_rows(c, x, l.ffn_norm, l.ffn_norm_b, h, n_tok);
    float* act = up;  // [n_tok, F] input of ffn_down
    if (c.arch->ffn == FfnKind::SwiGlu) {
      const kernels::MatmulPart gate_up[2] = {{&l.ffn_gate, gate}, {&l.ffn_up, up}};
      kernels::matmul_multi(gate_up, 2, h, n_tok, pool);
      add_bias(up, l.ffn_up_b, n_tok, F);
      kernels::swiglu(gate, up, n_tok * F);
      act = gate;
    } else {
      kernels::matmul(l.ffn_up, h, up, n_tok, pool);
      add_bias(up, l.ffn_up_b, n_tok, F);
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
