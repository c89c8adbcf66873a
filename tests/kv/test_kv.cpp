// KV cache accounting: bytes per token and their overflow checks. No model needed: the cache only
// knows a KvShape. A sequence's cache (allocation, round trips, eviction) is tested through the
// KV manager in tests/kv_manager/test_kv_seq.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <utility>
#include <vector>

#include "base/error.h"
#include "kernels/ops.h"
#include "kv/kv_cache.h"

namespace kvlm {
namespace {

KvShape shape(int n_layer, int n_kv_head, int head_dim, DType k, DType v) {
  KvShape s;
  s.n_layer = n_layer;
  s.n_kv_head = n_kv_head;
  s.head_dim = head_dim;
  s.dtype_k = k;
  s.dtype_v = v;
  return s;
}

// The seeds' worked example: LLaMA-7B (32 layers, 32 heads of 128, no GQA) in fp16 takes
// 2 (K and V) x 32 x 32 x 128 x 2 bytes = 524,288 bytes per token.
TEST(KvAccounting, Llama7bWorkedExample) {
  KvShape s = shape(32, 32, 128, DType::F16, DType::F16);
  EXPECT_EQ(kv_bytes_per_token(s), 524288u);
  EXPECT_EQ(kv_bytes(s, 1024), 512ull << 20);  // 512 MiB at 1,024 tokens
  EXPECT_EQ(kv_bytes(s, 4096), 2ull << 30);    // 2 GiB at 4,096 tokens
}

TEST(KvAccounting, SmolLm2PerToken) {
  // 30 layers x 3 KV heads x 64 dims x 2 (K, V): f16 = 23,040 B/token, f32 = 46,080.
  EXPECT_EQ(kv_bytes_per_token(shape(30, 3, 64, DType::F16, DType::F16)), 23040u);
  EXPECT_EQ(kv_bytes_per_token(shape(30, 3, 64, DType::F32, DType::F32)), 46080u);
  EXPECT_EQ(kv_bytes_per_token(shape(30, 3, 64, DType::F32, DType::F16)), 34560u);
}

TEST(KvAccounting, OverflowIsAnError) {
  KvShape s = shape(4096, 4096, 4096, DType::F32, DType::F32);
  EXPECT_THROW(kv_bytes(s, int64_t{1} << 40), Error);
  EXPECT_THROW(kv_bytes(s, -1), Error);
}

// Eviction re-rotates K with the model's RoPE scaling: frequencies halved by Llama-3-style factors
// of 2 (or a linear scale of 0.5) turn a shift of 2d positions into the plain rotation by d, bit
// for bit (halving is exact in double); without them the shift would be 2d.
TEST(KvRerotate, CarriesFrequencyFactorsAndLinearScale) {
  const KvShape shape{.n_layer = 1, .n_kv_head = 2, .head_dim = 16, .dtype_k = DType::F32,
                      .dtype_v = DType::F32};
  std::mt19937 rng(7);
  std::normal_distribution<float> dist;
  std::vector<float> k(32), scratch(32);
  for (float& x : k) x = dist(rng);
  const KvRope plain{.n_rot = 16, .freq_base = 10000.0f};
  KvRope factors = plain;
  factors.freq_factors.assign(8, 2.0f);
  KvRope linear = plain;
  linear.freq_scale = 0.5f;
  std::vector<float> want = k;
  kv_rerotate_k_row(shape, plain, -5, reinterpret_cast<std::byte*>(want.data()), scratch.data());
  for (const KvRope* r : {&factors, &linear}) {
    std::vector<float> got = k;
    kv_rerotate_k_row(shape, *r, -10, reinterpret_cast<std::byte*>(got.data()), scratch.data());
    EXPECT_EQ(got, want);
    std::vector<float> unscaled = k;
    kv_rerotate_k_row(shape, plain, -10, reinterpret_cast<std::byte*>(unscaled.data()),
                      scratch.data());
    EXPECT_NE(got, unscaled);
  }
}

// YaRN as Qwen2.5 configures it (factor 4 over an original 32768 positions, base 1e6, NEOX
// pairs, the default betas 32 and 1), written out here in long double from its definition: pair
// d turns L * base^(-2d / n) / (2 pi) times over the original context L; the ramp runs over whole
// pairs from where that count is beta_fast (rounded down) to where it is beta_slow (rounded up);
// a pair a fraction t along the ramp gets frequency theta_d * (t / factor + (1 - t)).
struct YarnReference {
  int n_rot = 64;
  long double base = 1e6L, factor = 4, orig = 32768, beta_fast = 32, beta_slow = 1;
  long double pair_at(long double turns) const {
    return n_rot * std::log(orig / (turns * 2 * std::acos(-1.0L))) / (2 * std::log(base));
  }
  long double freq(int d) const {
    const long double theta = std::pow(base, -2.0L * d / n_rot);
    const long double first = std::max(0.0L, std::floor(pair_at(beta_fast)));
    const long double last = std::min<long double>(n_rot - 1, std::ceil(pair_at(beta_slow)));
    const long double t = std::clamp((d - first) / std::max(0.001L, last - first), 0.0L, 1.0L);
    return theta * (t / factor + (1 - t));
  }
  // x: [n_rot] one NEOX head, rotated for position pos.
  std::vector<long double> rotate(const std::vector<float>& x, int64_t pos) const {
    std::vector<long double> y(x.begin(), x.end());
    for (int d = 0; d < n_rot / 2; ++d) {
      const long double a = pos * freq(d), x0 = x[d], x1 = x[d + n_rot / 2];
      y[d] = x0 * std::cos(a) - x1 * std::sin(a);
      y[d + n_rot / 2] = x0 * std::sin(a) + x1 * std::cos(a);
    }
    return y;
  }
};

KvRope qwen_yarn_rope() {
  return KvRope{.n_rot = 64, .freq_base = 1e6f, .mode = kernels::RopeMode::Neox,
                .freq_scale = 0.25f, .ext_factor = 1.0f, .n_ctx_orig = 32768};
}

// kvlm's rotation through rope_inv_freq's tables, as the forward pass does it.
std::vector<float> kvlm_rotate(const KvRope& r, std::vector<float> x, int64_t pos) {
  std::vector<double> inv_freq(r.n_rot / 2), cs(r.n_rot);
  rope_inv_freq(r, r.freq_base, inv_freq.data());
  kernels::rope_cos_sin(inv_freq.data(), r.n_rot / 2, pos, cs.data());
  kernels::rope_rotate(x.data(), 1, r.n_rot, r.n_rot, cs.data(), r.mode);
  return x;
}

// Within the original context, past it and at the end of the 131072-token training context.
// Angles reach 1.3e5 radians, so a frequency off by a part in 1e9 shows.
TEST(RopeYarn, MatchesLongDoubleReferenceAtLargePositions) {
  const YarnReference ref;
  const KvRope r = qwen_yarn_rope();
  std::mt19937 rng(11);
  std::normal_distribution<float> dist;
  std::vector<float> x(64);
  for (float& v : x) v = dist(rng);
  for (int64_t pos : {1, 100, 4097, 32767, 32768, 50000, 131071}) {
    const std::vector<float> got = kvlm_rotate(r, x, pos);
    const std::vector<long double> want = ref.rotate(x, pos);
    for (size_t i = 0; i < x.size(); ++i)
      ASSERT_NEAR(got[i], static_cast<double>(want[i]), 2e-6) << "pos " << pos << " dim " << i;
  }
}

// A cache shift re-rotates K with YaRN's frequencies and no magnitude factor: rotating to p and
// shifting by delta is rotating to p + delta (the row keeps the one mscale it was written with).
TEST(KvRerotate, CarriesYarnFrequencies) {
  const KvRope r = qwen_yarn_rope();
  const KvShape shape{.n_layer = 1, .n_kv_head = 1, .head_dim = 64, .dtype_k = DType::F32,
                      .dtype_v = DType::F32};
  std::mt19937 rng(5);
  std::normal_distribution<float> dist;
  std::vector<float> x(64), scratch(64);
  for (float& v : x) v = dist(rng);
  for (auto [p, delta] : {std::pair<int64_t, int64_t>{40000, -20000}, {70000, -1000}}) {
    std::vector<float> got = kvlm_rotate(r, x, p);
    kv_rerotate_k_row(shape, r, delta, reinterpret_cast<std::byte*>(got.data()), scratch.data());
    const std::vector<float> want = kvlm_rotate(r, x, p + delta);
    for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(got[i], want[i], 1e-5) << "dim " << i;
  }
}

}  // namespace
}  // namespace kvlm
