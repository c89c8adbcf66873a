// A loaded model: config, immutable weight views into the GGUF mapping, and the forward pass.
// Weights never change after load; a sequence's state lives in a KV manager's blocks and a Scratch.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/aligned.h"
#include "base/thread_pool.h"
#include "gguf/gguf.h"
#include "kv/kv_cache.h"
#include "kv/paged_kv.h"
#include "model/config.h"
#include "tensor/tensor.h"

namespace kvlm {

struct LayerWeights {
  TensorView attn_norm, attn_norm_b;  // [n_embd]
  TensorView wq, wk, wv;              // [q_dim, n_embd], [kv_dim, n_embd], [kv_dim, n_embd]; a
                                      //   fused attn_qkv's row ranges (q | k | v) when the file
                                      //   has one
  TensorView bq, bk, bv;              // [q_dim], [kv_dim], [kv_dim] biases (gpt2's are attn_qkv
                                      //   .bias's ranges; qwen2: attn_q/k/v.bias), or empty
  TensorView q_norm, k_norm;          // [head_dim] per-head RMSNorm (ArchInfo::qk_norm)
  TensorView wo, bo;                  // [n_embd, q_dim], bias [n_embd]
  TensorView attn_post_norm;          // [n_embd] (ArchInfo::post_norms)
  TensorView ffn_norm, ffn_norm_b;    // [n_embd]
  TensorView ffn_gate;                // [n_ff, n_embd] (gated FFNs only; Phi-3: the first n_ff
                                      //   rows of its fused ffn_up [2 * n_ff, n_embd])
  TensorView ffn_up, ffn_up_b;        // [n_ff, n_embd], bias [n_ff]
  TensorView ffn_down, ffn_down_b;    // [n_embd, n_ff], bias [n_embd]
  TensorView ffn_post_norm;           // [n_embd] (ArchInfo::post_norms)
};

struct Weights {
  TensorView tok_embd;                    // [n_vocab, n_embd]
  TensorView pos_embd;                    // [n_ctx_train, n_embd] (learned positions only)
  TensorView output_norm, output_norm_b;  // [n_embd]
  TensorView output;                      // [n_vocab, n_embd]; == tok_embd when tied
  TensorView output_b;                    // [n_vocab] optional bias of the head (llama.cpp reads
                                          //   it for qwen2 and phi3)
  std::vector<LayerWeights> layers;       // [n_layer]
};

// Per-sequence activation buffers, sized for up to n_batch tokens per forward and n_ctx cached
// positions. Grown (never shrunk) at batch boundaries.
struct Scratch {
  int64_t n_batch = 0, n_ctx = 0, n_threads = 0;
  AlignedBuffer x;       // [n_batch, n_embd]        residual stream
  AlignedBuffer h;       // [n_batch, n_embd]        normed input of a block
  AlignedBuffer q;       // [n_batch, q_dim]
  AlignedBuffer q16;     // [n_batch, q_dim]         q rounded to f16 (attention over an f16 K)
  AlignedBuffer k;       // [n_batch, kv_dim]
  AlignedBuffer v;       // [n_batch, kv_dim]
  AlignedBuffer attn;    // [n_batch, q_dim]         attention output, heads concatenated
  AlignedBuffer gate;    // [n_batch, n_ff]
  AlignedBuffer up;      // [n_batch, n_ff]
  AlignedBuffer scores;  // [n_threads, scores_per_thread]  attention work area per thread: K and
                         //   V tiles [256, head_dim], scores [n_gqa, 256], outputs
                         //   [n_gqa, head_dim], max and sum [n_gqa], row pointers
                         //   [2, 2, 256] (a job's K and V rows, and the next job's)
  int64_t scores_per_thread = 0;
  AlignedBuffer attn_part;  // [32, n_head, ceil(n_ctx / 256), head_dim + 2] online-softmax partials
  AlignedBuffer logits;  // [n_batch, n_vocab]
  std::vector<int64_t> pos;     // [n_batch] position of each row
  std::vector<int32_t> tokens;  // [n_rows] the batch's tokens, sequences end to end (paged)
};

// An attention map asked of a forward pass (kvlm serve's POST /kv/attention): the softmax weights
// of one layer's query head for a sequence's tokens of the pass, over every position each sees.
// A side computation from the pass's q and the cached K (the fast attention never forms the
// weights); not for KIVI caches.
struct AttnProbe {
  int32_t layer = 0;
  int32_t head = 0;             // query head; it reads K/V head head / (n_head / n_kv_head)
  std::vector<float> weights;   // [n, pos0 + n] filled by forward: row i is the token at pos0 + i,
                                //   0 where it sees nothing (the future, outside its window)
};

// One sequence's part of a forward pass: new tokens at positions [pos0, pos0 + n) of a sequence
// whose positions [0, pos0) are already in the KV store, through its caches `kv`, one per layer
// group of the store (the KV manager's seq_caches: block tables covering at least pos0 + n
// positions, a window group's with released blocks before its window, and KIVI's state).
struct BatchSeq {
  std::span<const int32_t> tokens;  // [n] n >= 1
  int64_t pos0 = 0;
  std::span<const KvSeqCache> kv;   // [n_groups] blocks: [>= ceil((pos0 + n) / block_size)]
  bool all_logits = false;          // logits of every token (perplexity), else of the last one
  AttnProbe* probe = nullptr;       // optional: filled with this sequence's attention map
};

// The RoPE of a config as KvRope (n_rot 0 for learned positions): the forward pass's frequencies
// and the cache's re-rotation of moved K rows.
KvRope kv_rope_of(const ModelConfig& c);

class Model {
 public:
  // Maps the file and validates architecture, hyper-parameters and every tensor's shape and type.
  // n_ctx: the context per sequence the caller will run (0 or more than the training context: the
  // training context, as llama.cpp's n_ctx 0); only LongRoPE models depend on it, choosing their
  // long or short frequency factors.
  // Throws kvlm::Error with one line naming the file and the problem.
  static std::unique_ptr<Model> load(const std::string& path, int64_t n_ctx = 0);

  const ModelConfig& config() const { return config_; }
  const Weights& weights() const { return weights_; }
  const GgufFile& gguf() const { return *file_; }
  // Shape of the cache this model needs, with the given storage types.
  KvShape kv_shape(DType dtype_k, DType dtype_v) const;
  // How K is rotated, so the cache can re-rotate rows it moves (n_rot 0: learned positions).
  KvRope kv_rope() const;

  // The forward pass: one step of one or many sequences (a single sequence is a batch of one).
  // Every sequence's tokens go through the matrix products together, attention runs per sequence
  // through its block table; K/V of the new tokens are written into `store`. Prefill (many
  // tokens) and decode (one) are this same function. Returns the logits of each sequence's last
  // token, or of all its tokens when all_logits, in batch order: [n_out, n_vocab]; the span lives
  // in `scratch` until the next call. A sequence's rows do not depend on the other sequences of
  // the batch (tests/model/test_paged.cpp). The caller (KvManager) has reserved the positions and
  // commits them afterwards. Throws kvlm::Error for ids out of range, positions not covered by a
  // block table, or a store of another shape.
  std::span<const float> forward(std::span<const BatchSeq> batch, PagedKvStore& store,
                                 Scratch& scratch, ThreadPool& pool) const;

  // Bytes of weights read per decoded token (all matrices once): for roofline estimates.
  uint64_t weight_bytes() const;
  // Bytes of the matrices' packed copies (held besides the mapped file).
  uint64_t packed_bytes() const;

 private:
  Model() = default;
  // Packs every matrix of a packed type that matmul reads (kernels::pack_weights), points its
  // view's `packed` at the copy (packed_bytes() in all) and releases the mapped pages of the
  // original (GgufFile::release_pages), except a tied output head's, which the embedding lookup
  // still reads: resident memory holds one copy of the weights, plus that head twice.
  void pack_matrices();

  std::unique_ptr<GgufFile> file_;
  ModelConfig config_;
  Weights weights_;
  AlignedBuffer packed_;        // the views' packed bytes, one matrix after another (64-aligned)
  uint64_t packed_bytes_ = 0;   // their sum, without the alignment padding
};

}  // namespace kvlm
