// Sampler tests: greedy/argmax, seeding, each filter's support against hand-computed or slow
// reference sets, a chi-square check of plain temperature sampling, repetition penalty, validate().
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "base/error.h"
#include "sampling/sampler.h"

namespace kvlm {
namespace {

SamplingParams plain(float temperature, uint64_t seed = 1) {
  SamplingParams p;
  p.temperature = temperature;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.min_p = 0.0f;
  p.repeat_penalty = 1.0f;
  p.seed = seed;
  return p;
}

std::vector<float> random_logits(int32_t n, uint64_t seed, float stddev = 2.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  return v;
}

// Every token drawn in n_draws samples.
std::set<int32_t> support(Sampler& s, const std::vector<float>& logits, int n_draws,
                          std::span<const int32_t> history = {}) {
  std::set<int32_t> seen;
  for (int i = 0; i < n_draws; ++i) {
    seen.insert(s.sample(logits.data(), static_cast<int32_t>(logits.size()), history));
  }
  return seen;
}

// Logits for probabilities {0.5, 0.25, 0.125, 0.0625, 0.0625}, placed at scrambled token ids so
// that the id bookkeeping through sorting is exercised: id kIds[r] has the r-th largest prob.
constexpr int32_t kIds[5] = {3, 0, 4, 1, 2};
std::vector<float> halving_logits() {
  const double probs[5] = {0.5, 0.25, 0.125, 0.0625, 0.0625};
  std::vector<float> v(5);
  for (int r = 0; r < 5; ++r)
    v[static_cast<size_t>(kIds[r])] = static_cast<float>(std::log(probs[r]));
  return v;
}
std::set<int32_t> top_ranks(int n) {
  return std::set<int32_t>(kIds, kIds + n);
}

// ---------------------------------------------------------------------------------------------
// argmax and greedy

TEST(Argmax, LowestIndexWinsTies) {
  const float v[] = {1.0f, 3.0f, 2.0f, 3.0f};
  EXPECT_EQ(argmax(v, 4), 1);
}

TEST(Argmax, IgnoresNaN) {
  const float v[] = {NAN, -5.0f, NAN, -1.0f, NAN};
  EXPECT_EQ(argmax(v, 5), 3);
  const float first_nan[] = {NAN, -INFINITY};
  EXPECT_EQ(argmax(first_nan, 2), 1);
  const float all_nan[] = {NAN, NAN};
  EXPECT_EQ(argmax(all_nan, 2), 0);
}

// The definition, one element at a time: the lowest index of the largest value that is not NaN.
int32_t argmax_one_by_one(const float* v, int32_t n) {
  int32_t best = 0;
  bool found = false;
  for (int32_t i = 0; i < n; ++i) {
    if (std::isnan(v[i])) continue;
    if (!found || v[i] > v[best]) best = i, found = true;
  }
  return best;
}

// argmax works in 16 lanes: every length around the lane width and a vocabulary's, values drawn
// from a few levels (many ties across and within lanes), with NaN, -inf and +inf mixed in.
TEST(Argmax, EqualsOneByOneWithTiesNaNAndInfinities) {
  std::mt19937 rng(5);
  const float levels[] = {-INFINITY, -2.0f, 0.0f, -0.0f, 1.5f, 3.0f, INFINITY, NAN};
  for (int32_t n : {1, 2, 15, 16, 17, 31, 32, 33, 47, 100, 1000, 49152}) {
    for (int trial = 0; trial < 200; ++trial) {
      std::vector<float> v(static_cast<size_t>(n));
      // Trials draw from fewer levels as they go, down to only NaN and -inf.
      const int n_levels = 8 - trial % 8;
      for (float& x : v) x = levels[7 - rng() % n_levels];
      ASSERT_EQ(argmax(v.data(), n), argmax_one_by_one(v.data(), n))
          << "n " << n << " trial " << trial;
      std::uniform_real_distribution<float> u(-10.0f, 10.0f);
      for (float& x : v) x = u(rng);
      if (trial % 3 == 0) v[rng() % n] = NAN;
      ASSERT_EQ(argmax(v.data(), n), argmax_one_by_one(v.data(), n))
          << "n " << n << " trial " << trial;
    }
  }
}

TEST(Sampler, GreedyIsArgmax) {
  for (float t : {0.0f, -1.0f}) {
    Sampler s(plain(t));
    for (uint64_t seed = 0; seed < 20; ++seed) {
      const std::vector<float> v = random_logits(1000, seed);
      EXPECT_EQ(s.sample(v.data(), 1000, {}), argmax(v.data(), 1000));
    }
  }
}

// argmax_only() (the scheduler's cue to sample on one thread) holds exactly when sample() is an
// argmax whatever the history.
TEST(Sampler, ArgmaxOnlyMeansArgmaxWithAnyHistory) {
  const std::vector<float> v = random_logits(1000, 3);
  const std::vector<int32_t> history = {argmax(v.data(), 1000), 5, 7};
  SamplingParams greedy = plain(0.0f);
  SamplingParams penalised = greedy;
  penalised.repeat_penalty = 1.5f;
  SamplingParams no_window = penalised;
  no_window.repeat_last_n = 0;
  for (const SamplingParams& p : {greedy, no_window}) {
    Sampler s(p);
    EXPECT_TRUE(s.argmax_only());
    EXPECT_EQ(s.sample(v.data(), 1000, history), argmax(v.data(), 1000));
  }
  Sampler pen(penalised);
  EXPECT_FALSE(pen.argmax_only());
  EXPECT_NE(pen.sample(v.data(), 1000, history), argmax(v.data(), 1000));  // the max is penalised
  EXPECT_FALSE(Sampler(plain(0.8f)).argmax_only());
}

TEST(Sampler, GreedyWithDefaultFiltersIsArgmax) {
  SamplingParams p;  // defaults: top-k/p, min-p on
  p.temperature = 0.0f;
  Sampler s(p);
  const std::vector<float> v = random_logits(49152, 7);
  EXPECT_EQ(s.sample(v.data(), 49152, {}), argmax(v.data(), 49152));
}

TEST(Sampler, TopK1IsGreedyAtAnyTemperature) {
  for (float t : {0.1f, 1.0f, 5.0f, 100.0f}) {
    SamplingParams p = plain(t, 42);
    p.top_k = 1;
    Sampler s(p);
    for (uint64_t seed = 0; seed < 20; ++seed) {
      std::vector<float> v = random_logits(500, seed);
      v[17] = v[300] = *std::max_element(v.begin(), v.end()) + 1.0f;  // tie: lowest id wins
      EXPECT_EQ(s.sample(v.data(), 500, {}), 17) << "temperature " << t;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// seeding

TEST(Sampler, SameSeedSameSequenceDifferentSeedDiffers) {
  const std::vector<float> v = random_logits(49152, 3, 1.0f);
  auto draws = [&](uint64_t seed) {
    SamplingParams p;  // default chain
    p.temperature = 1.0f;
    p.seed = seed;
    Sampler s(p);
    std::vector<int32_t> out;
    for (int i = 0; i < 1000; ++i) out.push_back(s.sample(v.data(), 49152, {}));
    return out;
  };
  const std::vector<int32_t> a = draws(1234), b = draws(1234), c = draws(1235);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_GT(std::set<int32_t>(a.begin(), a.end()).size(), 5u);  // it really is random
}

// ---------------------------------------------------------------------------------------------
// filters

TEST(Sampler, TopKRestrictsSupport) {
  const std::vector<float> v = random_logits(1000, 11);
  std::vector<int32_t> order(1000);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return v[a] > v[b]; });
  const std::set<int32_t> top5(order.begin(), order.begin() + 5);

  SamplingParams p = plain(100.0f);  // nearly uniform over whatever survives
  p.top_k = 5;
  Sampler s(p);
  EXPECT_EQ(support(s, v, 5000), top5);
}

// Top-k without a penalty selects from the logits directly (no candidate per token); with one it
// fills every candidate first. A penalty whose history holds only an id outside the vocabulary
// changes no logit but takes the second path, so both must draw the same tokens from the same
// seed: the same k candidates in the same order, whatever ties, NaN and infinities the logits
// hold, with top-p, min-p and temperature after them.
TEST(Sampler, TopKFromLogitsDrawsAsTheFullCandidateList) {
  std::mt19937 rng(17);
  const float levels[] = {-INFINITY, -3.0f, -1.0f, 0.0f, 0.5f, 2.0f, INFINITY, NAN};
  const std::vector<int32_t> outside = {-1};
  for (int32_t k : {1, 2, 5, 40, 300}) {
    for (int trial = 0; trial < 12; ++trial) {
      const int32_t n = 1000;
      std::vector<float> v(n);
      std::normal_distribution<float> nd(0.0f, 2.0f);
      for (float& x : v) x = trial % 3 == 0 ? levels[rng() % 8] : nd(rng);
      if (trial % 3 == 1)
        for (int j = 0; j < 20; ++j) v[rng() % n] = levels[rng() % 8];
      SamplingParams p = plain(trial % 2 ? 0.7f : 1.5f, 100 + trial);
      p.top_k = k;
      p.top_p = trial % 4 < 2 ? 0.9f : 1.0f;
      p.min_p = trial % 4 == 1 ? 0.05f : 0.0f;
      SamplingParams q = p;
      q.repeat_penalty = 1.3f;
      Sampler direct(p), full(q);
      for (int draw = 0; draw < 50; ++draw)
        ASSERT_EQ(direct.sample(v.data(), n, {}), full.sample(v.data(), n, outside))
            << "k " << k << " trial " << trial << " draw " << draw;
    }
  }
}

TEST(Sampler, TopPSupportIsNucleus) {
  const std::vector<float> v = halving_logits();
  // Cumulative mass by rank: 0.5, 0.75, 0.875, 0.9375, 1.0.
  const std::pair<float, int> cases[] = {{0.0f, 1}, {0.4f, 1},  {0.6f, 2}, {0.8f, 3},
                                         {0.9f, 4}, {0.95f, 5}, {1.0f, 5}};
  for (auto [top_p, n_keep] : cases) {
    SamplingParams p = plain(1.0f);
    p.top_p = top_p;
    Sampler s(p);
    EXPECT_EQ(support(s, v, 5000), top_ranks(n_keep)) << "top_p " << top_p;
  }
}

// Equal logits all land in one top-p bucket; the nucleus is then cut by the id tie-break
// (lowest ids first), the same order argmax and top-k use.
TEST(Sampler, TopPTiesCutByLowestId) {
  const std::vector<float> v(200, 0.5f);
  SamplingParams p = plain(1.0f);
  p.top_p = 0.0975f;  // target 19.5 of 200 equal masses: 20 tokens
  Sampler s(p);
  std::set<int32_t> want;
  for (int32_t i = 0; i < 20; ++i) want.insert(i);
  EXPECT_EQ(support(s, v, 4000), want);
}

TEST(Sampler, MinPSupport) {
  const std::vector<float> v = halving_logits();
  // p / p_max by rank: 1, 0.5, 0.25, 0.125, 0.125.
  const std::pair<float, int> cases[] = {{1.0f, 1}, {0.6f, 1}, {0.3f, 2},
                                         {0.2f, 3}, {0.1f, 5}, {0.0f, 5}};
  for (auto [min_p, n_keep] : cases) {
    SamplingParams p = plain(1.0f);
    p.min_p = min_p;
    Sampler s(p);
    EXPECT_EQ(support(s, v, 5000), top_ranks(n_keep)) << "min_p " << min_p;
  }
}

TEST(Sampler, TopPThenMinPInThatOrder) {
  const std::vector<float> v = halving_logits();
  SamplingParams p = plain(1.0f);
  p.top_p = 0.9f;  // keeps 4 ranks
  p.min_p = 0.2f;  // of those, p >= 0.1 keeps 3
  Sampler s(p);
  EXPECT_EQ(support(s, v, 5000), top_ranks(3));
}

// Slow reference for the whole filter chain's support: full sort, then the same rules.
std::set<int32_t> reference_support(const std::vector<float>& v, const SamplingParams& p) {
  std::vector<int32_t> order(v.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return v[a] > v[b]; });
  size_t n = order.size();
  if (p.top_k > 0) n = std::min(n, static_cast<size_t>(p.top_k));
  const double l_max = v[order[0]];
  if (p.top_p < 1.0f) {
    double total = 0.0;
    for (size_t i = 0; i < n; ++i) total += std::exp(v[order[i]] - l_max);
    double cum = 0.0;
    size_t keep = 0;
    while (keep < n) {
      cum += std::exp(v[order[keep++]] - l_max);
      if (cum >= p.top_p * total) break;
    }
    n = keep;
  }
  if (p.min_p > 0.0f) {
    size_t keep = 1;
    while (keep < n && std::exp(v[order[keep]] - l_max) >= p.min_p) ++keep;
    n = keep;
  }
  return std::set<int32_t>(order.begin(), order.begin() + static_cast<long>(n));
}

// A large nucleus (hundreds of tokens) drives top-p's chunked partial sort through several
// doublings; every draw must stay inside the reference support.
TEST(Sampler, FilterChainMatchesReferenceSupport) {
  struct Case {
    int32_t top_k;
    float top_p, min_p;
  };
  const Case cases[] = {{0, 0.9f, 0.0f},  {0, 0.99f, 0.0f},   {0, 0.5f, 0.01f},
                        {0, 1.0f, 0.05f}, {300, 0.95f, 0.0f}, {40, 0.95f, 0.05f}};
  for (const Case& k : cases) {
    const std::vector<float> v = random_logits(4000, 99, 1.0f);
    SamplingParams p = plain(1.0f, 5);
    p.top_k = k.top_k;
    p.top_p = k.top_p;
    p.min_p = k.min_p;
    const std::set<int32_t> want = reference_support(v, p);
    ASSERT_GT(want.size(), 1u);
    Sampler s(p);
    const std::set<int32_t> got = support(s, v, 4000);
    EXPECT_TRUE(std::includes(want.begin(), want.end(), got.begin(), got.end()))
        << "top_k " << k.top_k << " top_p " << k.top_p << " min_p " << k.min_p;
    EXPECT_GT(got.size(), want.size() / 4);
  }
}

// ---------------------------------------------------------------------------------------------
// temperature sampling is softmax sampling

TEST(Sampler, TemperatureOneMatchesSoftmaxChiSquare) {
  const std::vector<float> v = {1.0f, 0.5f, 0.0f, -0.5f, 2.0f, -1.0f, 0.25f, 1.5f};
  const size_t n = v.size();
  std::vector<double> prob(n);
  double z = 0.0;
  for (size_t i = 0; i < n; ++i) z += prob[i] = std::exp(v[i]);
  for (double& q : prob) q /= z;

  constexpr int kDraws = 20000;
  Sampler s(plain(1.0f, 2024));
  std::vector<int> count(n, 0);
  for (int i = 0; i < kDraws; ++i) ++count[static_cast<size_t>(s.sample(v.data(), 8, {}))];

  double chi2 = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double expect = prob[i] * kDraws;
    chi2 += (count[i] - expect) * (count[i] - expect) / expect;
  }
  // 7 degrees of freedom: P(chi2 > 24.32) = 0.001 for a correct sampler.
  EXPECT_LT(chi2, 24.32);
}

TEST(Sampler, HighTemperatureFlattensLowSharpens) {
  const std::vector<float> v = {2.0f, 0.0f};
  auto share_of_0 = [&](float t) {
    Sampler s(plain(t, 9));
    int n0 = 0;
    for (int i = 0; i < 10000; ++i) n0 += s.sample(v.data(), 2, {}) == 0;
    return n0 / 10000.0;
  };
  // softmax([2, 0] / T)[0]: T=0.5 -> 0.982, T=1 -> 0.881, T=4 -> 0.622.
  EXPECT_NEAR(share_of_0(0.5f), 0.982, 0.01);
  EXPECT_NEAR(share_of_0(1.0f), 0.881, 0.015);
  EXPECT_NEAR(share_of_0(4.0f), 0.622, 0.02);
}

TEST(Sampler, NaNAndInfLogitsAreNeverDrawnOrBreakDrawing) {
  const std::vector<float> v = {NAN, 0.0f, -INFINITY, 0.0f, NAN};
  Sampler s(plain(1.0f));
  EXPECT_EQ(support(s, v, 2000), (std::set<int32_t>{1, 3}));
  const std::vector<float> inf = {0.0f, INFINITY, 1.0f};
  Sampler s2(plain(1.0f));
  EXPECT_EQ(support(s2, inf, 200), (std::set<int32_t>{1}));
  const std::vector<float> none = {-INFINITY, NAN};
  EXPECT_EQ(s2.sample(none.data(), 2, {}), 0);
}

// ---------------------------------------------------------------------------------------------
// repetition penalty

TEST(Sampler, RepeatPenaltyPositiveLogitDivides) {
  SamplingParams p = plain(0.0f);
  p.repeat_penalty = 1.2f;
  Sampler s(p);
  const std::vector<float> v = {2.0f, 1.9f, 0.5f};
  const int32_t hist[] = {0};
  EXPECT_EQ(s.sample(v.data(), 3, {}), 0);
  EXPECT_EQ(s.sample(v.data(), 3, hist), 1);  // 2.0 / 1.2 = 1.67 < 1.9
}

TEST(Sampler, RepeatPenaltyNegativeLogitMultiplies) {
  SamplingParams p = plain(0.0f);
  p.repeat_penalty = 1.2f;
  Sampler s(p);
  const std::vector<float> v = {-1.0f, -1.1f, -3.0f};
  const int32_t hist[] = {0};
  EXPECT_EQ(s.sample(v.data(), 3, hist), 1);  // -1.0 * 1.2 = -1.2 < -1.1 (dividing would raise it)
}

TEST(Sampler, RepeatPenaltyEachDistinctTokenOnceWithinWindow) {
  SamplingParams p = plain(0.0f);
  p.repeat_penalty = 1.2f;
  p.repeat_last_n = 3;
  Sampler s(p);
  const std::vector<float> v = {2.0f, 1.5f};
  // Penalised once: 2.0 / 1.2 = 1.67 > 1.5. Three times would give 1.16 < 1.5.
  const int32_t repeated[] = {0, 0, 0};
  EXPECT_EQ(s.sample(v.data(), 2, repeated), 0);
  EXPECT_EQ(s.sample(v.data(), 2, repeated), 0);  // the seen-marks were restored

  const std::vector<float> w = {2.0f, 1.9f, 0.0f};
  const int32_t old_zero[] = {0, 2, 2, 2};  // 0 is outside the last 3
  EXPECT_EQ(s.sample(w.data(), 3, old_zero), 0);
  const int32_t recent_zero[] = {2, 2, 0};
  EXPECT_EQ(s.sample(w.data(), 3, recent_zero), 1);
  const int32_t out_of_range[] = {-1, 7, 3};  // ignored
  EXPECT_EQ(s.sample(w.data(), 3, out_of_range), 0);
}

TEST(Sampler, RepeatPenaltyAppliesBeforeTopK) {
  SamplingParams p = plain(1.0f);
  p.top_k = 1;
  p.repeat_penalty = 1.2f;
  Sampler s(p);
  const std::vector<float> v = {2.0f, 1.9f, 0.5f};
  const int32_t hist[] = {0};
  EXPECT_EQ(s.sample(v.data(), 3, hist), 1);
}

// OpenAI's additive penalties: a token seen c times in the window loses presence + c x frequency.
TEST(Sampler, PresenceAndFrequencyPenaltiesSubtract) {
  SamplingParams p = plain(0.0f);
  p.presence_penalty = 0.5f;
  Sampler presence(p);
  const std::vector<float> v = {2.0f, 1.6f, 0.0f};
  const int32_t once[] = {0}, thrice[] = {0, 0, 0};
  EXPECT_EQ(presence.sample(v.data(), 3, once), 1);    // 2.0 - 0.5 = 1.5 < 1.6
  EXPECT_EQ(presence.sample(v.data(), 3, thrice), 1);  // the same: presence ignores the count
  EXPECT_FALSE(presence.argmax_only());
  p.presence_penalty = 0.0f;
  p.frequency_penalty = 0.15f;
  Sampler frequency(p);
  EXPECT_EQ(frequency.sample(v.data(), 3, once), 0);    // 2.0 - 0.15 = 1.85 > 1.6
  EXPECT_EQ(frequency.sample(v.data(), 3, thrice), 1);  // 2.0 - 0.45 = 1.55 < 1.6
  EXPECT_EQ(frequency.sample(v.data(), 3, thrice), 1);  // the counts were reset
  p.frequency_penalty = -1.0f;  // negative: encourages repetition
  Sampler encourage(p);
  const std::vector<float> w = {1.0f, 1.5f};
  const int32_t zero[] = {0};
  EXPECT_EQ(encourage.sample(w.data(), 2, zero), 0);  // 1.0 + 1.0 = 2.0 > 1.5
}

TEST(Sampler, LogitBiasAddsBeforeEverything) {
  SamplingParams p = plain(0.0f);
  p.logit_bias = {{2, 5.0f}};
  Sampler s(p);
  EXPECT_FALSE(s.argmax_only());
  const std::vector<float> v = {2.0f, 1.9f, -2.0f};
  EXPECT_EQ(s.sample(v.data(), 3, {}), 2);  // -2 + 5 = 3
  p.logit_bias = {{0, -100.0f}, {9, 50.0f}};  // an id past the vocabulary is ignored
  Sampler ban(p);
  EXPECT_EQ(ban.sample(v.data(), 3, {}), 1);
  // At a temperature, -100 leaves the banned token all but undrawable.
  p = plain(1.0f);
  p.top_k = 0;
  p.logit_bias = {{0, -100.0f}};
  Sampler drawn(p);
  for (int i = 0; i < 200; ++i) EXPECT_NE(drawn.sample(v.data(), 3, {}), 0);
}

// Log-probabilities: the log-softmax of the logits after bias and penalties, whatever the
// temperature and cuts, against a double-precision reference over a random row.
TEST(Sampler, LogprobsAreTheLogSoftmaxOfTheAdjustedLogits) {
  constexpr int32_t kVocab = 5000;
  const std::vector<float> logits = random_logits(kVocab, 7, 3.0f);
  const std::vector<int32_t> history = {3, 3, 17, 42, 42, 42, 4999, 0};
  SamplingParams p;  // the server's defaults: top-k 40, top-p 0.95, min-p 0.05
  p.temperature = 0.7f;
  p.repeat_penalty = 1.3f;
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 0.25f;
  p.logit_bias = {{10, 4.0f}, {11, -100.0f}, {42, 2.0f}};
  p.n_logprobs = 20;
  p.seed = 3;
  // The reference: bias, then per distinct history id its count's penalties, in double.
  std::vector<double> ref(logits.begin(), logits.end());
  for (const auto& [id, b] : p.logit_bias) ref[static_cast<size_t>(id)] += b;
  std::vector<int> count(kVocab, 0);
  for (int32_t t : history) ++count[static_cast<size_t>(t)];
  for (int32_t t = 0; t < kVocab; ++t) {
    if (count[static_cast<size_t>(t)] == 0) continue;
    double& l = ref[static_cast<size_t>(t)];
    l = l > 0 ? l / p.repeat_penalty : l * p.repeat_penalty;
    l -= p.presence_penalty + count[static_cast<size_t>(t)] * p.frequency_penalty;
  }
  const double l_max = *std::max_element(ref.begin(), ref.end());
  double sum = 0.0;
  for (double l : ref) sum += std::exp(l - l_max);
  const double lse = l_max + std::log(sum);
  std::vector<int32_t> order(kVocab);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return ref[static_cast<size_t>(a)] > ref[static_cast<size_t>(b)];
  });

  for (const float temperature : {0.7f, 0.0f}) {
    p.temperature = temperature;
    Sampler s(p);
    EXPECT_FALSE(s.argmax_only());
    StepLogprobs lp;
    const int32_t t = s.sample(logits.data(), kVocab, history, &lp);
    EXPECT_EQ(lp.chosen.id, t);
    EXPECT_NEAR(lp.chosen.logprob, ref[static_cast<size_t>(t)] - lse, 1e-5);
    ASSERT_EQ(lp.top.size(), 20u);
    double mass = 0.0;
    for (size_t i = 0; i < lp.top.size(); ++i) {
      EXPECT_EQ(lp.top[i].id, order[i]) << i;
      EXPECT_NEAR(lp.top[i].logprob, ref[static_cast<size_t>(order[i])] - lse, 1e-5) << i;
      mass += std::exp(lp.top[i].logprob);
    }
    EXPECT_LE(mass, 1.0 + 1e-6);
    if (temperature == 0.0f) {
      EXPECT_EQ(t, lp.top[0].id);  // greedy: the chosen token leads
    }
  }
  // n_logprobs 0: the chosen token alone; no lp asked for: nothing filled, same draw.
  p.n_logprobs = 0;
  Sampler zero(p);
  StepLogprobs lp;
  const int32_t t0 = zero.sample(logits.data(), kVocab, history, &lp);
  EXPECT_TRUE(lp.top.empty());
  EXPECT_NEAR(lp.chosen.logprob, ref[static_cast<size_t>(t0)] - lse, 1e-5);
  p.n_logprobs = 21;
  EXPECT_THROW(validate(p), Error);
}

// ---------------------------------------------------------------------------------------------
// validate

// A grammar's mask: only allowed tokens are drawn, greedy or not, with or without the filters,
// and logprobs are the log-softmax over the allowed tokens (the others -inf).
TEST(Sampler, MaskAllowsOnlyItsTokens) {
  constexpr int32_t kVocab = 300;
  const std::vector<float> logits = random_logits(kVocab, 11, 3.0f);
  std::vector<uint32_t> mask((kVocab + 31) / 32, 0);
  std::set<int32_t> allowed;
  for (int32_t id = 5; id < kVocab; id += 37) {
    mask[static_cast<size_t>(id) / 32] |= 1u << (id % 32);
    allowed.insert(id);
  }
  int32_t best = *allowed.begin();
  for (int32_t id : allowed)
    if (logits[static_cast<size_t>(id)] > logits[static_cast<size_t>(best)]) best = id;
  Sampler greedy(plain(0.0f));
  EXPECT_EQ(greedy.sample(logits.data(), kVocab, {}, nullptr, mask.data()), best);
  for (SamplingParams p : {plain(1.0f, 5), SamplingParams{}}) {
    p.seed = 5;
    Sampler s(p);
    std::set<int32_t> seen;
    for (int i = 0; i < 400; ++i) seen.insert(s.sample(logits.data(), kVocab, {}, nullptr, mask.data()));
    for (int32_t id : seen) EXPECT_TRUE(allowed.count(id)) << id;
  }
  SamplingParams p = plain(1.0f, 9);
  p.n_logprobs = 3;
  Sampler s(p);
  StepLogprobs lp;
  const int32_t t = s.sample(logits.data(), kVocab, {}, &lp, mask.data());
  EXPECT_TRUE(allowed.count(t));
  double mass = 0.0;
  for (int32_t id : allowed) mass += std::exp(static_cast<double>(logits[static_cast<size_t>(id)]));
  const double lse = std::log(mass);
  EXPECT_NEAR(lp.chosen.logprob, logits[static_cast<size_t>(t)] - lse, 1e-4);
  ASSERT_EQ(lp.top.size(), 3u);
  EXPECT_EQ(lp.top[0].id, best);
  for (const TokenLogprob& x : lp.top) EXPECT_TRUE(allowed.count(x.id)) << x.id;
}

void expect_rejected(const SamplingParams& p, const std::string& name) {
  try {
    validate(p);
    ADD_FAILURE() << name << ": accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
  }
  EXPECT_THROW(Sampler{p}, Error);
}

TEST(Validate, AcceptsDefaultsAndEdges) {
  EXPECT_NO_THROW(validate(SamplingParams{}));
  SamplingParams p;
  p.temperature = -1.0f;
  p.top_k = -5;
  p.top_p = 0.0f;
  p.min_p = 1.0f;
  p.repeat_last_n = 0;
  EXPECT_NO_THROW(validate(p));
}

TEST(Validate, RejectsBadValuesNamingTheParameter) {
  SamplingParams p;
  p.top_p = 1.5f;
  expect_rejected(p, "top_p");
  p = {};
  p.top_p = -0.1f;
  expect_rejected(p, "top_p");
  p = {};
  p.top_p = NAN;
  expect_rejected(p, "top_p");
  p = {};
  p.min_p = 2.0f;
  expect_rejected(p, "min_p");
  p = {};
  p.min_p = -1.0f;
  expect_rejected(p, "min_p");
  p = {};
  p.repeat_penalty = 0.0f;
  expect_rejected(p, "repeat_penalty");
  p = {};
  p.repeat_penalty = -1.0f;
  expect_rejected(p, "repeat_penalty");
  p = {};
  p.repeat_last_n = -1;
  expect_rejected(p, "repeat_last_n");
  p = {};
  p.temperature = NAN;
  expect_rejected(p, "temperature");
}

TEST(Validate, MessageShowsTheValue) {
  SamplingParams p;
  p.top_p = 1.5f;
  try {
    validate(p);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("1.5"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kvlm
