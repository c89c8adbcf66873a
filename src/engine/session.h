// One sequence being generated: the model (shared, immutable), this sequence's KV cache and
// scratch, and the token history. Prefill and decode both go through feed().
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "base/thread_pool.h"
#include "kv/kv_cache.h"
#include "model/model.h"
#include "sampling/sampler.h"

namespace kvlm {

class Tokenizer;

class Session {
 public:
  // n_ctx: cache capacity in tokens (the whole cache is allocated here, once).
  Session(const Model& model, DType dtype_k, DType dtype_v, int64_t n_ctx, ThreadPool& pool,
          int64_t n_batch = 512);

  const Model& model() const { return model_; }
  const KvCache& kv() const { return kv_; }
  const std::vector<int32_t>& tokens() const { return tokens_; }
  int64_t n_batch() const { return n_batch_; }

  // Appends tokens and runs them through the model in chunks of n_batch, reusing the cache.
  // Returns the last token's logits [n_vocab] (valid until the next call).
  // Throws kvlm::Error when the tokens do not fit in the context.
  std::span<const float> feed(std::span<const int32_t> tokens);
  // Like feed, but returns logits for every fed token: [n_tok, n_vocab].
  std::span<const float> feed_all_logits(std::span<const int32_t> tokens);
  // The "no cache" baseline: appends tokens, then forgets all cached K/V and recomputes the whole
  // history from position 0. Returns the last token's logits.
  std::span<const float> recompute(std::span<const int32_t> tokens);

  void reset();

 private:
  std::span<const float> run(std::span<const int32_t> tokens, bool all_logits);

  const Model& model_;
  ThreadPool& pool_;
  KvCache kv_;
  Scratch scratch_;
  int64_t n_batch_;
  std::vector<int32_t> tokens_;   // [kv.size()] history: prompt + generated
  std::vector<float> all_logits_;  // [n_tok, n_vocab] gathered across chunks
};

struct GenerateOptions {
  int32_t n_predict = 128;  // max new tokens; < 0: until end of generation or context full
  bool use_cache = true;    // false: recompute the whole prefix at every step
  SamplingParams sampling;
};

enum class StopReason { Eog, Length, ContextFull, Callback };
const char* stop_reason_name(StopReason r);

struct GenerateStats {
  int64_t n_prompt = 0;
  int64_t n_generated = 0;
  int64_t n_decode = 0;   // single-token forward passes after the prefill
  double prefill_ms = 0;  // first forward over the prompt
  double decode_ms = 0;   // every later forward, sampling included
  StopReason stop = StopReason::Length;
  KvStats kv;
};

// Prefills `prompt`, then samples up to n_predict tokens. on_token(id) is called for each
// generated token (end-of-generation tokens included, then generation stops); returning false
// stops generation. Throws kvlm::Error if the prompt does not fit in the context.
GenerateStats generate(Session& session, const Tokenizer& tok, std::span<const int32_t> prompt,
                       const GenerateOptions& opts, const std::function<bool(int32_t)>& on_token);

}  // namespace kvlm
