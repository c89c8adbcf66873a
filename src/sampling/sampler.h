// Token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty; seeded RNG per
// sampler (one per request), so the same seed gives the same tokens.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <utility>
#include <vector>

namespace kvlm {

struct SamplingParams {
  float temperature = 0.8f;    // <= 0: greedy (argmax, lowest id wins ties)
  int32_t top_k = 40;          // <= 0: off
  float top_p = 0.95f;         // >= 1: off
  float min_p = 0.05f;         // <= 0: off
  float repeat_penalty = 1.0f; // 1: off; as llama.cpp: logit > 0 ? logit / p : logit * p
  int32_t repeat_last_n = 64;  // how many recent tokens the penalties look at
  // OpenAI's additive penalties over the same window: a token seen c > 0 times loses
  // presence_penalty + c x frequency_penalty from its logit. 0: off.
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  // OpenAI's logit_bias: (token id, bias) pairs added to those logits before anything else.
  std::vector<std::pair<int32_t, float>> logit_bias;
  uint64_t seed = 0;
  // < 0: off. Else sample() also reports log-probabilities (StepLogprobs): the chosen token's and
  // those of the n_logprobs most likely tokens, at most kMaxLogprobs.
  int32_t n_logprobs = -1;
};

inline constexpr int32_t kMaxLogprobs = 20;  // OpenAI's limit on top_logprobs

struct TokenLogprob {
  int32_t id = -1;
  float logprob = 0.0f;  // natural log; -inf for a token that cannot be drawn
};

// One step's log-probabilities: the log-softmax of the logits after logit bias, penalties and a
// grammar's mask (disallowed tokens at -inf) and before temperature and the top-k/top-p/min-p cuts (what OpenAI documents): exp in float, the
// log-sum-exp and each (logit - lse) in double.
struct StepLogprobs {
  TokenLogprob chosen;            // the sampled token
  std::vector<TokenLogprob> top;  // [n_logprobs] most likely first (lower id first on ties)
};

// Throws kvlm::Error naming the parameter for out-of-range values (negative temperature is
// allowed and means greedy; top_p/min_p outside [0, 1], repeat_penalty <= 0, repeat_last_n < 0,
// presence/frequency penalties or biases that are not finite, n_logprobs > kMaxLogprobs).
void validate(const SamplingParams& p);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  // logits: [n_vocab]; history: tokens so far (prompt + generated), newest last.
  // Order as llama.cpp's default chain: logit bias -> penalties -> top-k -> top-p -> min-p ->
  // temperature -> draw. Allocation-free after the first call for a given n_vocab.
  // With n_logprobs >= 0 and lp given, also fills *lp (then every token is a candidate and the
  // log-softmax costs a pass of exp over the vocabulary; nothing of it is done otherwise).
  // allowed: null, or a bitmask ([ceil(n_vocab / 32)] words, bit id of word id / 32) of the
  // tokens that may be drawn (a grammar's, grammar/matcher.h): the others are treated as logits
  // of -inf before anything else, so they are never drawn and their logprobs are -inf (the
  // log-softmax is over the allowed tokens). The mask must allow some token with a logit above
  // -inf, else the draw falls back to the unmasked argmax.
  int32_t sample(const float* logits, int32_t n_vocab, std::span<const int32_t> history,
                 StepLogprobs* lp = nullptr, const uint32_t* allowed = nullptr);
  const SamplingParams& params() const { return params_; }
  // True when sample() is an argmax of the logits whatever the history (greedy, no penalty):
  // ~10 us over a 49,152-token vocabulary, where a draw or a penalty costs ~50-500 us.
  bool argmax_only() const {
    return params_.temperature <= 0.0f && !penalises() && params_.logit_bias.empty() &&
           params_.n_logprobs < 0;
  }

 private:
  bool penalises() const {
    return (params_.repeat_penalty != 1.0f || params_.presence_penalty != 0.0f ||
            params_.frequency_penalty != 0.0f) &&
           params_.repeat_last_n > 0;
  }
  // Adds the logit biases to c (every token a candidate, in id order).
  void apply_bias(std::pair<float, int32_t>* c, int32_t n_vocab) const;
  // The penalties over the window of history, each distinct id once (with its count).
  void apply_penalties(std::pair<float, int32_t>* c, int32_t n_vocab,
                       std::span<const int32_t> history);
  // The draw (sample() without the log-probabilities); keeps the adjusted logits in adjusted_
  // when keep_adjusted.
  int32_t draw(const float* logits, int32_t n_vocab, std::span<const int32_t> history,
               bool keep_adjusted);
  const float* apply_mask(const float* logits, int32_t n_vocab, const uint32_t* allowed);
  // *lp from adjusted_ for the chosen token.
  void fill_logprobs(int32_t chosen, StepLogprobs* lp) const;

  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> cand_;  // scratch [n_vocab]
  std::vector<float> heap_;                       // scratch [top_k]: the k largest logits seen
  std::vector<int32_t> counts_;                   // scratch [n_vocab]: 0 between calls
  std::vector<float> adjusted_;  // scratch [n_vocab]: logits after bias and penalties (logprobs)
  std::vector<float> masked_;    // scratch [n_vocab]: the logits with disallowed tokens at -inf
};

// Index of the largest logit (lowest index wins ties).     logits: [n]
int32_t argmax(const float* logits, int32_t n);

}  // namespace kvlm
