// Token sampling in llama.cpp's default chain order. See sampler.h for the parameter meanings.
//
// The candidate list cand_ holds (logit, token id) pairs. While it is still indexed by token id
// (before any reordering) the penalty step uses the id field as a "seen" mark, so penalising each
// distinct history token once needs no set and no allocation. Sorting is avoided where it can
// be: top-k sorts only its k winners, top-p finds its cut with a histogram of masses and sorts
// only the bucket the cut falls in, and with every filter off nothing is sorted at all.
#include "sampling/sampler.h"

#include <algorithm>
#include <array>
#include <cassert>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <functional>

#include "base/error.h"

namespace kvlm {

namespace {

using Cand = std::pair<float, int32_t>;

// Top-k up to this k uses a heap select (std::partial_sort), which touches most losers with one
// well-predicted comparison; above it nth_element + sort wins. Measured at n_vocab 49,152:
// k=1000 partial 336 us vs 611 us, k=5000 partial 1486 us vs 876 us.
constexpr size_t kPartialSortMaxK = 2048;

// Top-p buckets candidates by their logit gap below the max: kTopPBuckets equal buckets over
// [0, kTopPGapRange) nats, the last one also holding every larger gap (weight < e^-32).
constexpr int32_t kTopPBuckets = 1024;
constexpr float kTopPGapRange = 32.0f;

// Descending logit, then ascending id, so ties resolve as argmax does (lowest id first) and the
// order is a strict total order on non-NaN logits.
inline bool cand_before(const Cand& a, const Cand& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

// Uniform double in [0, 1) from the top 53 bits of one draw. Written out rather than using
// std::uniform_real_distribution so the sequence of tokens for a seed depends only on
// std::mt19937_64 (which the standard pins down exactly), not on the standard library's
// distribution algorithm.
inline double uniform01(std::mt19937_64& rng) {
  return static_cast<double>(rng() >> 11) * 0x1.0p-53;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// validation

void validate(const SamplingParams& p) {
  if (std::isnan(p.temperature)) {
    fail("temperature must be a number (<= 0 means greedy), got {}", p.temperature);
  }
  if (!(p.top_p >= 0.0f && p.top_p <= 1.0f)) {
    fail("top_p must be in [0, 1] (1 turns it off), got {}", p.top_p);
  }
  if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) {
    fail("min_p must be in [0, 1] (0 turns it off), got {}", p.min_p);
  }
  if (!(p.repeat_penalty > 0.0f && std::isfinite(p.repeat_penalty))) {
    fail("repeat_penalty must be a finite number > 0 (1 turns it off), got {}", p.repeat_penalty);
  }
  if (p.repeat_last_n < 0) {
    fail("repeat_last_n must be >= 0, got {}", p.repeat_last_n);
  }
  if (!std::isfinite(p.presence_penalty)) fail("presence_penalty must be a finite number");
  if (!std::isfinite(p.frequency_penalty)) fail("frequency_penalty must be a finite number");
  for (const auto& [id, bias] : p.logit_bias)
    if (!std::isfinite(bias)) fail("logit_bias of token {} must be a finite number", id);
  if (p.n_logprobs > kMaxLogprobs)
    fail("n_logprobs must be at most {}, got {}", kMaxLogprobs, p.n_logprobs);
}

// ---------------------------------------------------------------------------------------------
// argmax

int32_t argmax(const float* logits, int32_t n) {
  // Precondition: n > 0. NaN never wins; all-NaN returns 0.
  assert(logits != nullptr && n > 0);
  // 16 lanes in four 4-wide vectors (GCC's vector extensions: SSE2 compares and selects on any
  // x86-64), lane j seeing the elements i with i % 16 == j: each keeps the first index of its
  // largest value above -inf (strict >, so NaN and -inf never enter). A greedy server samples
  // 16 x 49,152 logits per step, and one element at a time took ~30-50 us per sequence. The
  // result is the one-at-a-time loop's: the lowest index among the lanes holding the largest value.
  using F4 = float __attribute__((vector_size(16)));
  using I4 = int32_t __attribute__((vector_size(16)));
  constexpr int32_t kLanes = 16;
  F4 vmax[4];
  I4 vidx[4], at[4];
  for (int k = 0; k < 4; ++k) {
    vmax[k] = F4{} - INFINITY;
    vidx[k] = I4{} - 1;
    at[k] = I4{0, 1, 2, 3} + 4 * k;
  }
  int32_t i0 = 0;
  for (; i0 + kLanes <= n; i0 += kLanes)
    for (int k = 0; k < 4; ++k) {
      F4 v;
      std::memcpy(&v, logits + i0 + 4 * k, sizeof v);
      const I4 take = v > vmax[k];
      vmax[k] = take ? v : vmax[k];
      vidx[k] = take ? at[k] : vidx[k];
      at[k] += kLanes;
    }
  float lane_val[kLanes];
  int32_t lane_idx[kLanes];
  std::memcpy(lane_val, vmax, sizeof lane_val);
  std::memcpy(lane_idx, vidx, sizeof lane_idx);
  for (int32_t i = i0; i < n; ++i) {
    const int32_t j = i - i0;
    if (logits[i] > lane_val[j]) {
      lane_val[j] = logits[i];
      lane_idx[j] = i;
    }
  }
  int32_t best = -1;
  for (int32_t j = 0; j < kLanes; ++j) {
    if (lane_idx[j] < 0) continue;
    if (best < 0 || lane_val[j] > logits[best] ||
        (lane_val[j] == logits[best] && lane_idx[j] < best))
      best = lane_idx[j];
  }
  if (best >= 0) return best;
  // Nothing above -inf: the first value that is not NaN (-inf), else 0.
  for (int32_t i = 0; i < n; ++i)
    if (!std::isnan(logits[i])) return i;
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Sampler

namespace {

// Top-k straight from the logits, for 0 < k < n and no penalty: the k-th largest value first,
// from a min-heap of the k largest seen (past the first k, a logit costs one compare with the
// heap's top and rarely enters it), then only the logits at or above it (the top k and any ties
// with the k-th) become candidates, sorted by cand_before. So c[0, k) holds the same k candidates
// in the same order as filling c with the whole vocabulary and partially sorting it, which took
// ~100 us per token for k = 40 over 49,152 logits. Values as Sampler::sample sanitises them (NaN
// never a candidate, +inf as FLT_MAX). False when the k-th largest is -inf: the general path then
// handles the NaN and -inf logits.
bool top_k_from_logits(const float* logits, int32_t n, size_t k, std::vector<float>& heap,
                       Cand* c) {
  heap.resize(k);
  for (size_t i = 0; i < k; ++i)
    heap[i] = std::isnan(logits[i]) ? -INFINITY : std::min(logits[i], FLT_MAX);
  std::make_heap(heap.begin(), heap.end(), std::greater<float>());
  for (int32_t i = static_cast<int32_t>(k); i < n; ++i) {
    if (logits[i] > heap.front()) {  // false for NaN
      std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
      heap.back() = std::min(logits[i], FLT_MAX);
      std::push_heap(heap.begin(), heap.end(), std::greater<float>());
    }
  }
  const float kth = heap.front();
  if (!(kth > -INFINITY)) return false;
  size_t m = 0;
  for (int32_t i = 0; i < n; ++i)
    if (logits[i] >= kth) c[m++] = {std::min(logits[i], FLT_MAX), i};  // false for NaN
  std::partial_sort(c, c + k, c + m, cand_before);
  return true;
}

}  // namespace

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {
  validate(params_);
}

void Sampler::apply_bias(Cand* c, int32_t n_vocab) const {
  for (const auto& [id, bias] : params_.logit_bias) {
    if (id < 0 || id >= n_vocab) continue;  // checked when the request was read
    float& l = c[id].first;
    if (l > -INFINITY) l = std::clamp(l + bias, -FLT_MAX, FLT_MAX);  // stays finite
  }
}

// Over the last repeat_last_n history tokens, each distinct id once: llama.cpp's multiplicative
// repetition penalty, then OpenAI's presence and frequency penalties with the id's count there.
// Ids outside [0, n_vocab) (should not happen) are ignored rather than trusted.
void Sampler::apply_penalties(Cand* c, int32_t n_vocab, std::span<const int32_t> history) {
  const SamplingParams& p = params_;
  if (counts_.size() < static_cast<size_t>(n_vocab)) counts_.resize(static_cast<size_t>(n_vocab), 0);
  const size_t n_window = std::min(history.size(), static_cast<size_t>(p.repeat_last_n));
  const std::span<const int32_t> window = history.last(n_window);
  for (int32_t t : window)
    if (t >= 0 && t < n_vocab) ++counts_[static_cast<size_t>(t)];
  for (int32_t t : window) {
    if (t < 0 || t >= n_vocab || counts_[static_cast<size_t>(t)] == 0) continue;
    float& l = c[t].first;
    // Finite logits stay finite, so every later (l - max) is a number.
    if (l > -INFINITY) {
      l = std::clamp(l > 0.0f ? l / p.repeat_penalty : l * p.repeat_penalty, -FLT_MAX, FLT_MAX);
      const float n = static_cast<float>(counts_[static_cast<size_t>(t)]);
      l = std::clamp(l - p.presence_penalty - n * p.frequency_penalty, -FLT_MAX, FLT_MAX);
    }
    counts_[static_cast<size_t>(t)] = 0;  // each id once; the scratch is zero again after
  }
}

int32_t Sampler::sample(const float* logits, int32_t n_vocab, std::span<const int32_t> history,
                        StepLogprobs* lp, const uint32_t* allowed) {
  if (allowed != nullptr) logits = apply_mask(logits, n_vocab, allowed);
  const bool want = lp != nullptr && params_.n_logprobs >= 0;
  const int32_t t = draw(logits, n_vocab, history, want);
  if (want) fill_logprobs(t, lp);
  return t;
}

// A copy of the logits with the disallowed tokens at -inf (~10 us at 49,152 tokens): bias and
// penalties leave -inf alone, so this equals masking after them. Nothing allowed and drawable:
// the logits unmasked (the caller's grammar has a bug; a token is better than none).
const float* Sampler::apply_mask(const float* logits, int32_t n_vocab, const uint32_t* allowed) {
  masked_.resize(static_cast<size_t>(n_vocab));
  bool any = false;
  for (int32_t i = 0; i < n_vocab; ++i) {
    const bool ok = (allowed[i >> 5] >> (i & 31)) & 1;
    masked_[static_cast<size_t>(i)] = ok ? logits[i] : -INFINITY;
    any |= ok && logits[i] > -INFINITY;
  }
  return any ? masked_.data() : logits;
}

// Log-sum-exp over adjusted_ (the max subtracted first, so no term overflows), then each
// reported logprob as (logit - lse) in double. The top list is kept sorted by insertion: past the
// first n, a token costs one compare with the list's last.
void Sampler::fill_logprobs(int32_t chosen, StepLogprobs* lp) const {
  const size_t n = adjusted_.size();
  const float* a = adjusted_.data();
  // The max over 8 lanes in registers (one running std::max went through memory, ~5 cycles a
  // token, most of this function's time).
  float lane[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY,
                   -INFINITY, -INFINITY, -INFINITY, -INFINITY};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (size_t j = 0; j < 8; ++j) lane[j] = a[i + j] > lane[j] ? a[i + j] : lane[j];
  for (; i < n; ++i) lane[0] = a[i] > lane[0] ? a[i] : lane[0];
  const float l_max = *std::max_element(lane, lane + 8);
  // Each term in float (relative error ~1e-7), summed in double over 8 independent partial sums
  // (one chain of dependent double adds over 49,152 terms cost ~50 us).
  double part[8] = {};
  i = 0;
  for (; i + 8 <= n; i += 8)
    for (size_t j = 0; j < 8; ++j) part[j] += std::exp(a[i + j] - l_max);
  for (; i < n; ++i) part[0] += std::exp(a[i] - l_max);
  const double sum =
      ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  // Nothing drawable (every logit -inf or NaN): each logprob is then -inf rather than NaN.
  const double lse = l_max > -INFINITY ? l_max + std::log(sum) : 0.0;
  auto logprob = [&](int32_t id) { return static_cast<float>(static_cast<double>(a[id]) - lse); };
  lp->chosen = {chosen, logprob(chosen)};
  const size_t k = std::min(static_cast<size_t>(params_.n_logprobs), n);
  std::vector<TokenLogprob>& top = lp->top;
  top.clear();
  top.reserve(k + 1);
  float kth = -INFINITY;  // the list's last value once it holds k
  for (size_t t = 0; t < n && k > 0; ++t) {
    if (top.size() == k && !(a[t] > kth)) continue;  // ties keep the lower id
    auto at = std::upper_bound(top.begin(), top.end(), a[t],
                               [&](float v, const TokenLogprob& x) { return v > a[x.id]; });
    top.insert(at, {static_cast<int32_t>(t), 0.0f});
    if (top.size() > k) top.pop_back();
    if (top.size() == k) kth = a[top.back().id];
  }
  for (TokenLogprob& x : top) x.logprob = logprob(x.id);
}

int32_t Sampler::draw(const float* logits, int32_t n_vocab, std::span<const int32_t> history,
                      bool keep_adjusted) {
  // Precondition: logits holds n_vocab > 0 values.
  assert(logits != nullptr && n_vocab > 0);
  const SamplingParams& p = params_;
  const bool penalise = penalises() && !history.empty();
  const bool biased = !p.logit_bias.empty();

  if (p.temperature <= 0.0f && !penalise && !biased && !keep_adjusted)
    return argmax(logits, n_vocab);

  // Reallocates only when n_vocab grows past what an earlier call saw.
  cand_.resize(static_cast<size_t>(n_vocab));
  Cand* c = cand_.data();
  size_t n_cand = static_cast<size_t>(n_vocab);
  size_t n_sorted = 0;  // c[0, n_sorted) is sorted by cand_before and precedes all the rest

  // --- top-k without a penalty (what most requests ask for): from the logits, without a
  // candidate for every token. Otherwise every token becomes a candidate, penalised and cut below.
  if (!penalise && !biased && !keep_adjusted && p.top_k > 0 &&
      static_cast<size_t>(p.top_k) < n_cand && static_cast<size_t>(p.top_k) <= kPartialSortMaxK &&
      top_k_from_logits(logits, n_vocab, static_cast<size_t>(p.top_k), heap_, c)) {
    n_cand = n_sorted = static_cast<size_t>(p.top_k);
  } else {
    bool any_drawable = false;
    for (int32_t i = 0; i < n_vocab; ++i) {
      float l = logits[i];
      // NaN can never be drawn; +inf is clamped so that (l - max) stays finite.
      if (std::isnan(l)) l = -INFINITY;
      any_drawable |= l > -INFINITY;
      c[i] = {std::min(l, FLT_MAX), i};
    }
    // Neither turns a drawable logit into -inf nor the reverse, so any_drawable still holds.
    if (biased) apply_bias(c, n_vocab);
    if (penalise) apply_penalties(c, n_vocab, history);
    if (keep_adjusted) {
      adjusted_.resize(static_cast<size_t>(n_vocab));
      for (int32_t i = 0; i < n_vocab; ++i) adjusted_[static_cast<size_t>(i)] = c[i].first;
    }
    if (!any_drawable) return argmax(logits, n_vocab);

    if (p.temperature <= 0.0f) {
      int32_t best = 0;
      for (int32_t i = 1; i < n_vocab; ++i) {
        if (c[i].first > c[best].first) best = i;
      }
      return best;
    }

    // --- top-k
    if (p.top_k > 0 && static_cast<size_t>(p.top_k) < n_cand) {
      n_cand = static_cast<size_t>(p.top_k);
      if (n_cand <= kPartialSortMaxK) {
        std::partial_sort(c, c + n_cand, c + n_vocab, cand_before);
      } else {
        std::nth_element(c, c + n_cand - 1, c + n_vocab, cand_before);
        std::sort(c, c + n_cand, cand_before);
      }
      n_sorted = n_cand;
    }
  }

  // --- top-p: the smallest prefix, in cand_before order, whose softmax mass reaches top_p (at
  // least 1 token). Masses stay unnormalised (relative to the max logit) against top_p * total.
  if (p.top_p < 1.0f && n_cand > 1) {
    float l_max = c[0].first;
    if (n_sorted < n_cand) {
      for (size_t i = 1; i < n_cand; ++i) l_max = std::max(l_max, c[i].first);
    }
    // Bucket the masses by logit gap instead of sorting: with a large nucleus (top-k off, top_p
    // near 1) sorting the vocabulary costs milliseconds per token. Buckets are monotone in the
    // logit, so the buckets above the one where the cumulative mass crosses the target hold
    // exactly the best candidates, and only the crossing bucket needs sorting.
    // Invariant after this block: c[0, lo) holds exactly the lo best candidates, mass_before is
    // their mass, c[lo, hi) is sorted and the cut (prefix length) lies in (lo, hi].
    size_t lo = 0, hi = n_cand;
    double mass_before = 0.0, target = 0.0;
    if (n_sorted >= n_cand) {
      double total = 0.0;
      for (size_t i = 0; i < n_cand; ++i) total += std::exp(c[i].first - l_max);
      target = static_cast<double>(p.top_p) * total;
    } else {
      constexpr float kBucketsPerNat = kTopPBuckets / kTopPGapRange;
      auto bucket_of = [&](float l) {
        const float gap = (l_max - l) * kBucketsPerNat;  // >= 0; +inf for -inf logits
        return gap < kTopPBuckets - 1 ? static_cast<int32_t>(gap) : kTopPBuckets - 1;
      };
      std::array<double, kTopPBuckets> bucket_mass{};
      double total = 0.0;
      for (size_t i = 0; i < n_cand; ++i) {
        const double w = std::exp(c[i].first - l_max);
        bucket_mass[static_cast<size_t>(bucket_of(c[i].first))] += w;
        total += w;
      }
      target = static_cast<double>(p.top_p) * total;
      int32_t crossing = kTopPBuckets - 1;
      for (int32_t b = 0; b < kTopPBuckets - 1; ++b) {
        if (mass_before + bucket_mass[static_cast<size_t>(b)] >= target) {
          crossing = b;
          break;
        }
        mass_before += bucket_mass[static_cast<size_t>(b)];
      }
      Cand* above = std::partition(c, c + n_cand,
                                   [&](const Cand& x) { return bucket_of(x.first) < crossing; });
      Cand* in = std::partition(above, c + n_cand,
                                [&](const Cand& x) { return bucket_of(x.first) == crossing; });
      lo = static_cast<size_t>(above - c);
      hi = static_cast<size_t>(in - c);
      std::sort(c + lo, c + hi, cand_before);
      n_sorted = lo == 0 ? hi : 0;  // c[0, lo) is the right set but in no particular order
    }
    double cum = mass_before;
    size_t cut = hi;  // reached only if rounding keeps cum a hair under target
    for (size_t i = lo; i < hi; ++i) {
      cum += std::exp(c[i].first - l_max);
      if (cum >= target) {
        cut = i + 1;
        break;
      }
    }
    n_cand = cut;
  }

  // --- min-p: keep p_i >= min_p * p_max, i.e. l_i >= l_max + log(min_p); the softmax
  // normalisation cancels, so this needs one log instead of an exp per candidate.
  if (p.min_p > 0.0f && n_cand > 1) {
    float l_max = c[0].first;
    if (n_sorted < n_cand) {
      for (size_t i = 1; i < n_cand; ++i) l_max = std::max(l_max, c[i].first);
    }
    const float l_min = l_max + std::log(p.min_p);
    if (n_sorted >= n_cand) {
      size_t keep = 1;
      while (keep < n_cand && c[keep].first >= l_min) ++keep;
      n_cand = keep;
    } else {
      size_t keep = 0;  // ends >= 1: the max itself passes (min_p <= 1)
      for (size_t i = 0; i < n_cand; ++i) {
        if (c[i].first >= l_min) c[keep++] = c[i];
      }
      n_cand = keep;
      n_sorted = std::min(n_sorted, keep);
    }
  }

  if (n_cand == 1) return c[0].second;

  // --- temperature, softmax, draw. Weights overwrite the logits in place.
  // The max is finite here (some logit is drawable and every filter keeps the max).
  float l_max = c[0].first;
  if (n_sorted < n_cand) {
    for (size_t i = 1; i < n_cand; ++i) l_max = std::max(l_max, c[i].first);
  }

  // Divide rather than multiply by 1/T: a denormal T makes 1/T infinite and 0 * inf NaN.
  double total = 0.0;
  for (size_t i = 0; i < n_cand; ++i) {
    const float w = std::exp((c[i].first - l_max) / p.temperature);
    c[i].first = w;
    total += w;
  }
  const double u = uniform01(rng_) * total;
  double cum = 0.0;
  size_t last_positive = 0;
  for (size_t i = 0; i < n_cand; ++i) {
    if (c[i].first <= 0.0f) continue;
    cum += c[i].first;
    last_positive = i;
    if (u < cum) return c[i].second;
  }
  return c[last_positive].second;  // rounding left u just past the final sum
}

}  // namespace kvlm
