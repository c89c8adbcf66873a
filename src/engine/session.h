// One sequence being generated: the model (shared, immutable), this sequence's KV cache (a KV
// manager holding one sequence: kvlm generate, chat and perplexity run the cache kvlm serve runs)
// and scratch, and the token history. Prefill and decode both go through feed().
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/thread_pool.h"
#include "grammar/grammar.h"
#include "kv/kv_cache.h"
#include "kv_manager/kv_manager.h"
#include "model/model.h"
#include "sampling/sampler.h"

namespace kvlm {

class Tokenizer;

// What a full cache does: its eviction policy and the arithmetic of it, in one place, so that a
// Session and the Scheduler (kvlm serve) evict the same tokens at the same lengths.
struct Eviction {
  // Sliding window with attention sinks (StreamingLLM): keep the first n_sinks tokens, evict at
  // least window_chunk after them (n_ctx is n_sinks + window).
  bool window = false;
  int64_t n_sinks = 0;
  int64_t window_chunk = 1;
  // Context shift (llama.cpp --keep): keep the first n_keep tokens, drop the older half of the
  // rest. -1: off.
  int64_t n_keep = -1;
  // The model's largest sliding window minus one (0: none; set from the model, not a flag): an
  // eviction leaves at least kept() + reach positions, so the window of every later query starts
  // past the kept ones and a window group never needs a kept row it released (KvManager::evict).
  int64_t reach = 0;

  bool on() const { return window || n_keep >= 0; }
  // Positions [0, kept()) are never evicted; eviction starts there. Meaningful when on().
  int64_t kept() const { return window ? n_sinks : n_keep; }
  // The most tokens one forward pass may add to an evicting sequence.
  int64_t room(int64_t n_ctx) const { return n_ctx - kept() - reach; }
  // Tokens to evict from kept() so that m more fit in n_ctx with n_held held: 0 when they fit
  // already, -1 when no policy is on or even evicting everything evictable is not enough.
  int64_t count(int64_t n_held, int64_t m, int64_t n_ctx) const;
  // Throws kvlm::Error naming the flag when the options do not fit a context of n_ctx tokens, or
  // are on for a KIVI cache (which cannot evict).
  void validate(int64_t n_ctx, bool kivi) const;
};

// How a session's cache is laid out and what happens when it is full.
struct KvOptions {
  DType dtype_k = DType::F16;
  DType dtype_v = DType::F16;
  int64_t n_ctx = 4096;               // maximum tokens held
  // Static: every block of n_ctx tokens allocated at once (Hugging Face StaticCache); Dynamic:
  // the blocks grow in chunks of kKvChunkTokens as tokens arrive (DynamicCache).
  KvAlloc alloc = KvAlloc::Static;
  // Sliding window with attention sinks (StreamingLLM): when full, keep the first n_sinks tokens
  // and the most recent ones, evicting from position n_sinks in chunks of window_chunk tokens.
  // n_ctx is then n_sinks + window: memory stays bounded however long generation runs.
  bool window = false;
  int64_t n_sinks = 0;
  int64_t window_chunk = 1;
  // Context shift (llama.cpp --keep, for chat): when full, keep the first n_keep tokens and drop
  // the older half of the rest. -1: off (a full cache is an error).
  int64_t n_keep = -1;
  // KIVI layout (--kv-residual R, docs/KV.md): -1 off; >= 0 keeps at least R recent tokens in f16,
  // K per channel (dtype_k must be q4_0), V per token in dtype_v. No eviction, no session files.
  int32_t kivi_residual = -1;
  // Hadamard-rotated K and V rows (--kv-rotate, KvShape::rotate): better quantized caches at the
  // same bytes.
  bool rotate = false;

  Eviction eviction() const { return {window, n_sinks, window_chunk, n_keep}; }
};

class Session {
 public:
  // n_ctx: cache capacity in tokens (a static cache is allocated here, once). Throws kvlm::Error
  // for a bad shape, n_ctx <= 0, options that do not fit the context, or a size that overflows.
  Session(const Model& model, DType dtype_k, DType dtype_v, int64_t n_ctx, ThreadPool& pool,
          int64_t n_batch = 512);
  Session(const Model& model, const KvOptions& kv, ThreadPool& pool, int64_t n_batch = 512);

  const Model& model() const { return model_; }
  const KvOptions& kv_options() const { return opts_; }
  const KvShape& kv_shape() const { return kv_.shape(); }
  int64_t n_ctx() const { return opts_.n_ctx; }
  int64_t n_cached() const { return kv_.seq_tokens(kSeq); }  // positions whose K/V are held
  KvStats kv_stats() const;
  // KIVI: positions [0, n_sealed()) are quantized, the rest f16. Plain layouts: 0.
  int64_t n_sealed() const { return kv_.seq_cache(kSeq).n_sealed; }
  // The cache itself, for inspection (tests, views): one sequence, kSeq.
  const KvManager& kv() const { return kv_; }
  static constexpr SeqId kSeq = 0;
  // True when a full cache evicts (window or context shift) instead of failing.
  bool evicts() const { return eviction_.on(); }
  // Tokens evicted by the window or context shift during the last feed/recompute call.
  int64_t last_evicted() const { return last_evicted_; }
  const std::vector<int32_t>& tokens() const { return tokens_; }
  int64_t n_batch() const { return n_batch_; }

  // Appends tokens and runs them through the model in chunks of n_batch, reusing the cache.
  // Returns the last token's logits [n_vocab] (valid until the next call).
  // Throws kvlm::Error when the tokens do not fit in the context.
  std::span<const float> feed(std::span<const int32_t> tokens);
  // Like feed, but returns logits for every fed token: [n_tok, n_vocab].
  std::span<const float> feed_all_logits(std::span<const int32_t> tokens);
  // Like feed, in one forward pass (at most n_batch tokens, no eviction), filling `probe` with
  // the attention map of the tokens fed (AttnProbe).
  std::span<const float> feed_probed(std::span<const int32_t> tokens, AttnProbe& probe);
  // The "no cache" baseline: appends tokens, then forgets all cached K/V and recomputes the whole
  // history from position 0. Returns the last token's logits.
  std::span<const float> recompute(std::span<const int32_t> tokens);

  void reset();
  // Forgets every token from position n on (their cache rows included). n <= tokens().size().
  void truncate(int64_t n);

  // Session files (kvlm chat's /save and /load): the token history and the cache rows, with a
  // header carrying a model fingerprint, the cache shape and a checksum (session_file.cpp).
  // save: kvlm::Error if the file cannot be written. load: kvlm::Error, leaving the session
  // unchanged, if the file is unreadable, corrupt, for another model or another cache shape.
  // `meta` is opaque text stored alongside (chat keeps its messages there). load calls
  // check_meta (if given) with it once the rest of the file is validated and before anything
  // changes: a kvlm::Error from it refuses the file, leaving the session unchanged.
  void save(const std::string& path, const std::string& meta) const;
  std::string load(const std::string& path,
                   const std::function<void(const std::string&)>& check_meta = {});

 private:
  std::span<const float> run(std::span<const int32_t> tokens, bool all_logits,
                             AttnProbe* probe = nullptr);
  // Frees room for m more tokens by the window or context-shift policy; false if none applies.
  bool make_room(int64_t m);

  const Model& model_;
  ThreadPool& pool_;
  KvOptions opts_;
  Eviction eviction_;  // opts_'s policy with this model's window reach
  int64_t last_evicted_ = 0;
  int64_t n_evicted_ = 0;  // since construction or reset()
  KvManager kv_;           // one sequence, kSeq, always admitted
  Scratch scratch_;
  int64_t n_batch_;
  std::vector<int32_t> tokens_;   // [n_cached()] history: prompt + generated
  std::vector<float> all_logits_;  // [n_tok, n_vocab] gathered across chunks
};

struct GenerateOptions {
  int32_t n_predict = 128;  // max new tokens; < 0: until end of generation or context full
  bool use_cache = true;    // false: recompute the whole prefix at every step
  bool ignore_eos = false;  // keep generating past end-of-generation tokens (benchmarks, tests)
  std::vector<int32_t> stop_tokens;  // generation also stops after sampling one of these
  SamplingParams sampling;
  // Constrains the output to the grammar's sentences (kvlm generate --json / --json-schema):
  // each draw is masked to the tokens it takes; generation ends when the sentence can take no
  // more bytes, or with an end-of-generation token once it is whole. Null: unconstrained.
  std::shared_ptr<const Grammar> grammar;
  // Called after every forward pass (prefill and each decode step), e.g. for --trace.
  std::function<void(const struct StepTrace&)> on_step;
};

// One forward pass as seen from the cache.
struct StepTrace {
  int64_t step = 0;        // 0 = prefill
  bool prefill = false;
  int64_t n_computed = 0;  // tokens run through the model in this pass
  int64_t n_cached = 0;    // cache length after the pass
  int64_t n_evicted = 0;   // tokens evicted (window / context shift) during the pass
  int64_t evict_begin = 0; // the evicted positions were [evict_begin, evict_begin + n_evicted)
  int64_t pos0 = 0;        // the computed tokens' positions: [pos0, pos0 + n_computed)
  std::span<const int32_t> tokens;  // [n_computed] the tokens computed (valid during the call)
  double ms = 0;
  KvStats kv;
};

enum class StopReason { Eog, Length, ContextFull, Callback, StopToken, GrammarDone };
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
