// AVX2 kernels against their scalar twins (ref), called directly so that both run whatever
// KVLM_KERNELS says; plus the AVX2 variant's own invariants and the variant choice.
//
// What must be equal, and what may differ:
//  * bit-identical: activation quantization (codes and f16 scales), f16/bf16 dequantization, the
//    quantized (Q4_0/Q4_1/Q8_0) matmul and dot_row, packed or not, and, within the AVX2 variant,
//    matmul across n_tok / threads / row splits and dot_row == matmul.
//  * within a tolerance: the f32/f16/bf16 dot products, because AVX2 sums in 8 lanes with FMAs
//    where ref sums in 16 lanes without FMA. Both start from the same exact terms, so each
//    differs from the exact sum by at most its rounding error:
//    |fast - ref| <= (err_fast + err_ref) * sum|terms|, with the error factors derived beside
//    each tolerance below.
//
// Unaligned data: buffers are offset from a 32-byte boundary by every multiple of each element
// type's own alignment (4 bytes for f32, 2 for f16 rows and quantized blocks, whose fields are
// uint16_t): every placement real data can have relative to the vector width, without ever
// making a misaligned scalar access (undefined behaviour, and an error under UBSan).
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "base/thread_pool.h"
#include "kernels/act_blocks.h"
#include "kernels/avx2/avx2.h"
#include "kernels/dispatch.h"
#include "kernels/packed.h"
#include "kernels/ops.h"
#include "kernels/random_blocks.h"
#include "kernels/ref/ref.h"
#include "tensor/dtype.h"
#include "tensor/tensor.h"

namespace kvlm::kernels {
namespace {

constexpr double kEpsF32 = 0x1p-24;  // unit roundoff of f32

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

#define SKIP_WITHOUT_AVX2() \
  if (!avx2::cpu_supported()) GTEST_SKIP() << "CPU lacks AVX2, FMA or F16C"

// A byte buffer whose payload starts `offset` bytes past a 32-byte boundary.
class Buffer {
 public:
  Buffer(size_t bytes, size_t offset) : raw_(bytes + offset + 64) {
    const auto base = reinterpret_cast<uintptr_t>(raw_.data());
    data_ = raw_.data() + ((32 - base % 32) % 32) + offset;
  }
  uint8_t* data() { return data_; }
  template <class T>
  T* as() {
    return reinterpret_cast<T*>(data_);
  }

 private:
  std::vector<uint8_t> raw_;
  uint8_t* data_;
};

std::vector<float> random_floats(std::mt19937& rng, int64_t n, float scale) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& f : v) f = dist(rng);
  return v;
}

// A random row of type t with n elements written at dst. Quantized types get random codes over
// their whole range (Q8_0 including -128, which a third-party quantizer may write) and f16
// scales of either sign (test::random_block_row); float types get normal values.
void random_row(DType t, int64_t n, std::mt19937& rng, uint8_t* dst) {
  if (dtype_info(t).block_size > 1) return test::random_block_row(t, n, rng, dst);
  const std::vector<float> v = random_floats(rng, n, 1.0f);
  quantize_row(t, v.data(), dst, n);
}

// ---- variant choice -----------------------------------------------------------------------------

TEST(Avx2Dispatch, ChoiceFollowsEnvironmentAndCpu) {
  EXPECT_STREQ(choose_backend(nullptr, true, false, false), "avx2");
  EXPECT_STREQ(choose_backend("", true, false, false), "avx2");
  EXPECT_STREQ(choose_backend("auto", true, false, false), "avx2");
  EXPECT_STREQ(choose_backend(nullptr, true, true, false), "avx2-vnni");
  EXPECT_STREQ(choose_backend("auto", true, true, false), "avx2-vnni");
  EXPECT_STREQ(choose_backend(nullptr, true, true, true), "avx2-amx");
  EXPECT_STREQ(choose_backend("scalar", true, true, true), "scalar");
  EXPECT_STREQ(choose_backend("avx2", true, true, true), "avx2");  // AVX2 without the VNNI kernels
  EXPECT_STREQ(choose_backend("avx2-vnni", true, true, true), "avx2-vnni");  // without AMX
  EXPECT_STREQ(choose_backend("avx2-amx", true, true, true), "avx2-amx");
  EXPECT_STREQ(choose_backend("avx2-vnni", true, false, false), "avx2");  // warns; cannot honour it
  EXPECT_STREQ(choose_backend("avx2-amx", true, true, false), "avx2-vnni");  // warns
  EXPECT_STREQ(choose_backend(nullptr, true, false, true), "avx2");      // AMX needs VNNI too
  EXPECT_STREQ(choose_backend(nullptr, false, true, true), "scalar");    // VNNI needs AVX2 too
  EXPECT_STREQ(choose_backend(nullptr, false, false, false), "scalar");
  EXPECT_STREQ(choose_backend("avx2", false, false, false), "scalar");  // warns; cannot honour it
  EXPECT_STREQ(choose_backend("bogus", true, false, false), "avx2");    // warns; chooses automatically
  EXPECT_STREQ(kernels_backend(), choose_backend(std::getenv("KVLM_KERNELS"), avx2::cpu_supported(),
                                                 avx2::vnni_supported(), avx2::amx_supported()));
}

// The choice is made once per process, so the environment is set in a fresh child process
// (the "threadsafe" death-test style re-executes this binary for just this statement).
TEST(Avx2Dispatch, EnvironmentForcesScalar) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        setenv("KVLM_KERNELS", "scalar", 1);
        std::exit(std::strcmp(kernels_backend(), "scalar") == 0 ? 0 : 1);
      },
      testing::ExitedWithCode(0), "");
}

// ---- activation quantization: bit-identical -----------------------------------------------------

// Inputs that probe each step of the quantizer: exact halves (x * id lands on k + 0.5 when
// amax = 127 makes id = 1), NaN and inf (NaN codes become 0; an inf amax makes id 0), amax so
// small that 127 / amax overflows, values at the f32 extremes, zero blocks and signed zeros.
std::vector<float> tricky_block(int kind, std::mt19937& rng) {
  std::vector<float> b = random_floats(rng, 32, 1.0f);
  switch (kind) {
    case 0:
      for (int j = 0; j < 32; ++j) b[j] = static_cast<float>(j - 16) + 0.5f;
      b[5] = 127.0f;
      break;
    case 1:
      b[3] = NAN;
      break;
    case 2:
      b[7] = INFINITY;
      b[9] = -INFINITY;
      break;
    case 3:
      for (auto& f : b) f *= 1e-39f;  // subnormal amax: 127 / amax = inf
      break;
    case 4:
      for (auto& f : b) f *= 3e37f;
      break;
    case 5:
      std::fill(b.begin(), b.end(), 0.0f);
      b[1] = -0.0f;
      break;
    case 6:
      b[0] = -127.0f;
      for (int j = 1; j < 32; ++j) b[j] = std::round(b[j] * 40.0f) + 0.5f;
      break;
    default:
      break;
  }
  return b;
}

TEST(Avx2Quant, ActivationBlocksBitIdentical) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(11);
  for (int64_t n = 32; n <= 4608; n += n < 256 ? 32 : 544) {
    const int64_t nb = n / 32;
    for (size_t off : {0, 4, 12, 28}) {
      Buffer xbuf(n * 4, off);
      float* x = xbuf.as<float>();
      const std::vector<float> v = random_floats(rng, n, n % 3 == 0 ? 30.0f : 0.7f);
      std::memcpy(x, v.data(), n * 4);
      for (int64_t b = 0; b < nb; ++b)
        if (b % 4 == 1) {
          const std::vector<float> t = tricky_block(static_cast<int>((b / 4 + n) % 8), rng);
          std::memcpy(x + b * 32, t.data(), 32 * 4);
        }
      std::vector<BlockQ8_0> r0(nb), f0(nb);
      std::vector<BlockQ8_1> r1(nb), f1(nb);
      ref::quant_act_q8_0(x, r0.data(), nb);
      avx2::quant_act_q8_0(x, f0.data(), nb);
      ref::quant_act_q8_1(x, r1.data(), nb);
      avx2::quant_act_q8_1(x, f1.data(), nb);
      for (int64_t b = 0; b < nb; ++b) {
        ASSERT_EQ(0, std::memcmp(&r0[b], &f0[b], sizeof(BlockQ8_0))) << "n " << n << " block " << b;
        ASSERT_EQ(0, std::memcmp(&r1[b], &f1[b], sizeof(BlockQ8_1))) << "n " << n << " block " << b;
      }
    }
  }
}

// The K types' activation super-blocks (BlockQ8_K): codes, the 16-sums and d = 1 / id the same
// bytes as ref's, over random rows of several scales with the tricky 32-value blocks (ties,
// NaN, inf, zeros, tiny values) put into some sub-blocks, so a super-block's amax sometimes comes
// from one of them; and all-zero super-blocks (d = 0).
TEST(Avx2Quant, ActivationSuperBlocksBitIdentical) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(12);
  for (int64_t n : {256, 512, 768, 2048, 4608}) {
    const int64_t n_sb = n / 256;
    for (int rep = 0; rep < 24; ++rep) {
      Buffer xbuf(n * 4, static_cast<size_t>(4 * (rep % 4)));
      float* x = xbuf.as<float>();
      const std::vector<float> v = random_floats(rng, n, rep % 3 == 0 ? 30.0f : 0.7f);
      std::memcpy(x, v.data(), n * 4);
      for (int64_t b = 0; b < n / 32; ++b)
        if ((b + rep) % 5 == 1) {
          const std::vector<float> t = tricky_block(static_cast<int>((b + rep) % 8), rng);
          std::memcpy(x + b * 32, t.data(), 32 * 4);
        }
      if (rep % 6 == 5) std::fill(x, x + 256, 0.0f);
      std::vector<BlockQ8_K> r(n_sb), f(n_sb);
      ref::quant_act_q8_k(x, r.data(), n_sb);
      avx2::quant_act_q8_k(x, f.data(), n_sb);
      for (int64_t b = 0; b < n_sb; ++b) {
        ASSERT_EQ(0, std::memcmp(&r[b], &f[b], sizeof(BlockQ8_K)))
            << "n " << n << " rep " << rep << " super-block " << b;
        int sum = 0;
        for (int e = 0; e < 256; ++e) {
          ASSERT_LE(std::abs(r[b].qs[e]), 127);
          sum += r[b].qs[e];
          if (e % 16 == 15) {
            ASSERT_EQ(r[b].sums[e / 16], sum);
            sum = 0;
          }
        }
      }
    }
  }
}

// ---- dequantization: bit-identical --------------------------------------------------------------

TEST(Avx2Dequant, F16ExhaustiveAndBf16BitIdentical) {
  SKIP_WITHOUT_AVX2();
  // Every f16 bit pattern, with n = 65536 + 5 so the scalar tail runs too.
  const int64_t n = 65536 + 5;
  for (size_t off : {0, 2, 6, 30}) {
    Buffer src(n * 2, off);
    for (int64_t i = 0; i < n; ++i) src.as<uint16_t>()[i] = static_cast<uint16_t>(i * 40503u);
    for (DType t : {DType::F16, DType::BF16}) {
      std::vector<float> r(n), f(n);
      ref::dequantize_row(t, src.data(), r.data(), n);
      avx2::dequantize_row(t, src.data(), f.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        // F16C quiets a signalling NaN (sets the top mantissa bit); ref keeps the payload as is.
        // Both are NaN, and nothing in kvlm reads NaN payloads.
        if (std::isnan(r[i])) {
          ASSERT_TRUE(std::isnan(f[i])) << dtype_name(t) << " " << i;
          continue;
        }
        ASSERT_EQ(bits_of(r[i]), bits_of(f[i])) << dtype_name(t) << " element " << i;
      }
    }
  }
}

TEST(Avx2Dequant, OtherTypesMatchRef) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(5);
  for (DType t : test::compute_types()) {
    const int64_t n = 512;
    std::vector<uint8_t> row(row_bytes(t, n));
    random_row(t, n, rng, row.data());
    std::vector<float> r(n), f(n);
    ref::dequantize_row(t, row.data(), r.data(), n);
    avx2::dequantize_row(t, row.data(), f.data(), n);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(bits_of(r[i]), bits_of(f[i])) << dtype_name(t);
  }
}

// Strided multi-row dequantization equals row-by-row, and round_to_f16 and f32_to_f16 equal the
// exact software conversion (ties to even, subnormals, overflow to inf, NaN), for both variants.
TEST(Avx2Dequant, RowsAndF16RoundingBitIdentical) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(7);
  for (DType t : {DType::F32, DType::F16, DType::Q4_0, DType::Q4_1, DType::Q8_0}) {
    const int64_t n = 64, n_rows = 9;
    const size_t stride = row_bytes(t, 3 * n) + 2;  // one head of a 3-head row, padded
    Buffer buf(stride * n_rows, 2);
    for (int64_t r = 0; r < n_rows; ++r) random_row(t, 3 * n, rng, buf.data() + r * stride);
    const size_t off = row_bytes(t, n);  // the second head
    std::vector<float> got(n_rows * n), want(n_rows * n);
    for (auto rows : {avx2::dequantize_rows, ref::dequantize_rows}) {
      rows(t, buf.data() + off, stride, n_rows, got.data(), n);
      for (int64_t r = 0; r < n_rows; ++r)
        ref::dequantize_row(t, buf.data() + off + r * stride, want.data() + r * n, n);
      for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(bits_of(got[i]), bits_of(want[i])) << dtype_name(t);
    }
  }
  std::vector<float> x = random_floats(rng, 4000, 100.0f);
  for (float v : {0.0f, -0.0f, 65504.0f, 65520.0f, 65519.0f, 1e6f, -1e6f, 6e-8f, 3e-8f, 2.9e-8f,
                  1e-5f, -6.1e-5f, 1.0009765625f, 1.00048828125f, 1.00146484375f, INFINITY})
    x.push_back(v);
  for (int i = 0; i < 3000; ++i) {  // values exactly halfway between two f16s
    const uint16_t h = static_cast<uint16_t>(rng() & 0x7bff);
    x.push_back((fp16_to_fp32(h) + fp16_to_fp32(static_cast<uint16_t>(h + 1))) / 2);
  }
  std::vector<float> a(x.size()), b(x.size());
  avx2::round_to_f16(x.data(), a.data(), static_cast<int64_t>(x.size()));
  ref::round_to_f16(x.data(), b.data(), static_cast<int64_t>(x.size()));
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(bits_of(a[i]), bits_of(b[i])) << x[i];
  const float nan = NAN;
  float y;
  avx2::round_to_f16(&nan, &y, 1);
  EXPECT_TRUE(std::isnan(y));
  // f32_to_f16 (f16 cache writes): fp32_to_fp16's bits, NaNs of any sign and payload included,
  // at every offset of an 8-lane vector and in the scalar tail.
  for (uint32_t bits : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff812345u, 0x7fffffffu,
                        0x7f800000u, 0xff800000u, 0x00000001u, 0x80000001u, 0x33000000u,
                        0x33000001u})
    for (int rep = 0; rep < 3; ++rep)
      x.insert(x.begin() + static_cast<long>(rng() % x.size()), std::bit_cast<float>(bits));
  for (int64_t start : {0, 1, 3, 7}) {
    const int64_t n = static_cast<int64_t>(x.size()) - start;
    std::vector<uint16_t> h_avx(static_cast<size_t>(n)), h_ref(static_cast<size_t>(n));
    avx2::f32_to_f16(x.data() + start, h_avx.data(), n);
    ref::f32_to_f16(x.data() + start, h_ref.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(h_ref[i], fp32_to_fp16(x[start + i]));
      ASSERT_EQ(h_avx[i], h_ref[i]) << "bits " << std::hex << std::bit_cast<uint32_t>(x[start + i]);
    }
  }
}

// ---- dots: within tolerance ---------------------------------------------------------------------

// Sum of |terms| a quantized-activation dot rounds, from the blocks both variants see:
//   sum_b |d_w d_x| sum_j |q_w q_x|  (+ sum_b |m_b s_b| for Q4_1)
// q_w is the integer the kernels multiply: nibble - 8 (Q4_0), nibble (Q4_1), code (Q8_0).
double quantized_abs_terms(DType t, const uint8_t* w, const uint8_t* xq, int64_t nb) {
  double sum = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const BlockQ8_0* x0 = reinterpret_cast<const BlockQ8_0*>(xq) + b;
    const BlockQ8_1* x1 = reinterpret_cast<const BlockQ8_1*>(xq) + b;
    double ints = 0;
    if (t == DType::Q8_0) {
      const auto* wb = reinterpret_cast<const BlockQ8_0*>(w) + b;
      for (int j = 0; j < 32; ++j) ints += std::abs(wb->qs[j] * x0->qs[j]);
      sum += std::fabs(double(fp16_to_fp32(wb->d)) * fp16_to_fp32(x0->d)) * ints;
    } else if (t == DType::Q4_0) {
      const auto* wb = reinterpret_cast<const BlockQ4_0*>(w) + b;
      for (int j = 0; j < 16; ++j) {
        ints += std::abs(((wb->qs[j] & 15) - 8) * x0->qs[j]);
        ints += std::abs(((wb->qs[j] >> 4) - 8) * x0->qs[j + 16]);
      }
      sum += std::fabs(double(fp16_to_fp32(wb->d)) * fp16_to_fp32(x0->d)) * ints;
    } else if (t == DType::Q5_0 || t == DType::IQ4_NL) {
      // (code - 16) d and value d are exact in f32 (an f16 times an integer of at most 8 bits):
      // the dequantized values.
      float wv[32];
      ref::dequantize_row(t, w + b * row_bytes(t, 32), wv, 32);
      for (int j = 0; j < 32; ++j)
        sum += std::fabs(double(wv[j]) * x0->qs[j] * fp16_to_fp32(x0->d));
    } else if (ref::k_packed_type(t)) {
      // The K types: |d sc_e q_e p_e dx| and |dmin m p_e dx| from the integers (ref::KInts),
      // against the activation super-block (BlockQ8_K) that holds block b.
      ref::KInts k;
      ref::k_block_ints(t, w + (b / 8) * row_bytes(t, kQK_K), &k);
      const BlockQ8_K& xk = reinterpret_cast<const BlockQ8_K*>(xq)[b / 8];
      const double dx = xk.d;
      for (int j = 0; j < 32; ++j) {
        const int e = 32 * int(b % 8) + j;
        sum += std::fabs(double(fp16_to_fp32(k.d)) * dx) * std::abs(k.sc[e / 16] * k.q[e] * xk.qs[e]);
        sum += std::fabs(double(fp16_to_fp32(k.dmin)) * dx) * std::abs(k.m[e / 16] * xk.qs[e]);
      }
    } else if (t == DType::Q5_1) {
      const auto* wb = reinterpret_cast<const BlockQ5_1*>(w) + b;
      uint32_t h;
      std::memcpy(&h, wb->qh, 4);
      for (int j = 0; j < 16; ++j) {
        ints += std::abs(((wb->qs[j] & 15) | int((h >> j) & 1) << 4) * x1->qs[j]);
        ints += std::abs(((wb->qs[j] >> 4) | int((h >> (j + 16)) & 1) << 4) * x1->qs[j + 16]);
      }
      sum += std::fabs(double(fp16_to_fp32(wb->d)) * fp16_to_fp32(x1->d)) * ints;
      sum += std::fabs(double(fp16_to_fp32(wb->m)) * fp16_to_fp32(x1->s));
    } else {
      const auto* wb = reinterpret_cast<const BlockQ4_1*>(w) + b;
      for (int j = 0; j < 16; ++j) {
        ints += std::abs((wb->qs[j] & 15) * x1->qs[j]);
        ints += std::abs((wb->qs[j] >> 4) * x1->qs[j + 16]);
      }
      sum += std::fabs(double(fp16_to_fp32(wb->d)) * fp16_to_fp32(x1->d)) * ints;
      sum += std::fabs(double(fp16_to_fp32(wb->m)) * fp16_to_fp32(x1->s));
    }
  }
  return sum;
}

// Quantized dots. Ref: per block one rounded product d * sumi (and m * s, and their sum) added to
// one running sum: each term passes through at most nb + 2 roundings. AVX2: per lane one FMA
// rounding per block, then a 3-level fold, and Q4_1's sum m * s through dot_f32 (fewer than
// nb + 6 roundings). Both exact inputs, so |fast - ref| <= 2 (nb + 6) u sum|terms| to first
// order; the factor 2 on top absorbs the second-order terms.
double quantized_tolerance(int64_t nb, double abs_terms) {
  return 2.0 * 2.0 * double(nb + 6) * kEpsF32 * abs_terms + 1e-30;
}

// f32 dots. Ref: 16 lanes of ceil(n/16) rounded products and sums, then a 4-level fold: error
// <= (ceil(n/16) + 5) u sum|a b|. AVX2: 32 lanes of ceil(n/32) + 1 FMAs, a 2-level fold and a
// 3-level hsum: <= (ceil(n/32) + 6) u sum|a b|. Doubled for second-order terms.
double f32_tolerance(int64_t n, double abs_terms) {
  return 2.0 * double((n + 15) / 16 + 5 + (n + 31) / 32 + 6) * kEpsF32 * abs_terms + 1e-30;
}

double abs_dot(const float* a, const float* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::fabs(double(a[i]) * b[i]);
  return s;
}

// The quantized matmul computes ref's arithmetic (per block: the exact integer dot, times the
// rounded scale product, added to one running sum) for 8 rows at once over packed row groups, so
// it equals ref bit for bit: packed at load or packed on the fly, every row count (groups short
// of 8 rows), every token count (1..4-token kernels, 64-token chunks), every alignment, 1 and 2
// threads, dot_row too.
TEST(Avx2Matmul, QuantizedEqualsRefBitForBit) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(21);
  ThreadPool pool1(1), pool2(2);
  for (DType t : {DType::Q4_0, DType::Q4_1, DType::Q8_0}) {
    for (int64_t n_cols : {32, 64, 96, 576, 1536, 4128}) {
      for (int64_t n_rows : {1, 7, 8, 9, 37, 131}) {
        if (n_cols * n_rows > 1536 * 37) continue;  // keep the scalar side quick
        for (size_t off : {0, 2, 18}) {
          const size_t stride = row_bytes(t, n_cols) + (n_rows % 2 ? 0 : 6);
          Buffer buf(stride * n_rows, off);
          for (int64_t r = 0; r < n_rows; ++r) random_row(t, n_cols, rng, buf.data() + r * stride);
          TensorView w{t, buf.data(), n_rows, n_cols, stride};
          const std::vector<uint8_t> packed = pack_weights(w);
          ASSERT_EQ(packed.size(), size_t((n_rows + 7) / 8) * (n_cols / 32) * 8 *
                                       size_t(dtype_info(t).type_size));
          TensorView wp = w;
          wp.packed = packed.data();
          for (int64_t n_tok : {1, 2, 3, 4, 5, 8, 9, 15, 16, 33, 70}) {
            if (n_tok > 16 && n_cols > 576) continue;
            const std::vector<float> x = random_floats(rng, n_tok * n_cols, 1.5f);
            std::vector<float> yr(n_tok * n_rows), yu(n_tok * n_rows, -1.0f),
                yp(n_tok * n_rows, -2.0f);
            ref::matmul(w, x.data(), yr.data(), n_tok, pool1);
            avx2::matmul(w, x.data(), yu.data(), n_tok, n_tok % 2 ? pool1 : pool2);
            avx2::matmul(wp, x.data(), yp.data(), n_tok, n_tok % 2 ? pool2 : pool1);
            std::vector<float> yv = yr, ya = yr;
            if (avx2::vnni_supported()) {
              avx2::matmul_vnni(n_tok % 3 ? wp : w, x.data(), yv.data(), n_tok, pool2);
            }
            if (avx2::amx_supported()) {
              avx2::matmul_amx(n_tok % 2 ? wp : w, x.data(), ya.data(), n_tok,
                               n_tok % 3 ? pool2 : pool1);
            }
            for (size_t k = 0; k < yr.size(); ++k) {
              ASSERT_EQ(bits_of(ya[k]), bits_of(yr[k]))
                  << dtype_name(t) << " " << n_rows << "x" << n_cols << " n_tok " << n_tok
                  << " offset " << off << " element " << k << " (amx)";
              ASSERT_EQ(bits_of(yv[k]), bits_of(yr[k]))
                  << dtype_name(t) << " " << n_rows << "x" << n_cols << " n_tok " << n_tok
                  << " offset " << off << " element " << k << " (vnni)";
              ASSERT_EQ(bits_of(yu[k]), bits_of(yr[k]))
                  << dtype_name(t) << " " << n_rows << "x" << n_cols << " n_tok " << n_tok
                  << " offset " << off << " element " << k << " (unpacked)";
              ASSERT_EQ(bits_of(yp[k]), bits_of(yr[k]))
                  << dtype_name(t) << " " << n_rows << "x" << n_cols << " n_tok " << n_tok
                  << " offset " << off << " element " << k << " (packed)";
            }
            ASSERT_EQ(bits_of(avx2::dot_row(t, w.row(n_rows - 1), x.data(), n_cols)),
                      bits_of(yr[n_rows - 1]));
          }
        }
      }
    }
  }
}

// The packed K types (Q2_K .. Q6_K, IQ4_XS: kquant_avx2.cpp) compute ref::dot_k_q8_k's arithmetic
// (Q5_0, Q5_1, IQ4_NL: ref's block dots) for 8 rows at once, so every variant equals ref bit for
// bit: every token count from 1 to 70 (the 1..4-token kernels, 64-token chunks and their tails), 1
// and 2 threads, groups short of 8 rows, packed at load or on the fly, unaligned rows, dot_row too.
TEST(Avx2Matmul, KQuantsEqualRefBitForBit) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(22);
  ThreadPool pool1(1), pool2(2);
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K, DType::IQ4_XS, DType::Q3_K, DType::Q2_K,
                  DType::Q5_0, DType::Q5_1, DType::IQ4_NL}) {
    for (auto [n_rows, n_cols] : {std::pair<int64_t, int64_t>{1, 256}, {7, 512}, {9, 256},
                                  {8, 1024}, {37, 768}, {5, 32}, {17, 96}}) {
      if (n_cols % packed_block_cols(t) != 0) continue;
      const size_t off = 2 * static_cast<size_t>(n_rows % 3);
      const size_t stride = row_bytes(t, n_cols) + (n_rows % 2 ? 0 : 6);
      Buffer buf(stride * n_rows, off);
      for (int64_t r = 0; r < n_rows; ++r) random_row(t, n_cols, rng, buf.data() + r * stride);
      TensorView w{t, buf.data(), n_rows, n_cols, stride};
      const std::vector<uint8_t> packed = pack_weights(w);
      ASSERT_EQ(packed.size(),
                size_t((n_rows + 7) / 8) * (n_cols / packed_block_cols(t)) * packed_block_bytes(t));
      TensorView wp = w;
      wp.packed = packed.data();
      for (int64_t n_tok = 1; n_tok <= 70; n_tok += (n_tok < 20 ? 1 : 7)) {
        const std::vector<float> x = random_floats(rng, n_tok * n_cols, 1.5f);
        const size_t ny = static_cast<size_t>(n_tok * n_rows);
        std::vector<float> yr(ny), yu(ny, -1.0f), yp(ny, -2.0f), yv(ny, -3.0f), ya(ny, -4.0f);
        ref::matmul(w, x.data(), yr.data(), n_tok, pool1);
        avx2::matmul(w, x.data(), yu.data(), n_tok, n_tok % 2 ? pool1 : pool2);
        avx2::matmul(wp, x.data(), yp.data(), n_tok, n_tok % 2 ? pool2 : pool1);
        if (avx2::vnni_supported())
          avx2::matmul_vnni(wp, x.data(), yv.data(), n_tok, pool2);
        else
          yv = yr;
        if (avx2::amx_supported())
          avx2::matmul_amx(n_tok % 2 ? wp : w, x.data(), ya.data(), n_tok, pool2);
        else
          ya = yr;
        for (size_t k = 0; k < ny; ++k) {
          const auto where = [&](const char* v) {
            return fmt::format("{} {}x{} n_tok {} element {} ({})", dtype_name(t), n_rows, n_cols,
                               n_tok, k, v);
          };
          ASSERT_EQ(bits_of(yu[k]), bits_of(yr[k])) << where("unpacked") << " " << yu[k] << " " << yr[k];
          ASSERT_EQ(bits_of(yp[k]), bits_of(yr[k])) << where("packed");
          ASSERT_EQ(bits_of(yv[k]), bits_of(yr[k])) << where("vnni");
          ASSERT_EQ(bits_of(ya[k]), bits_of(yr[k])) << where("amx");
        }
        ASSERT_EQ(bits_of(avx2::dot_row(t, w.row(n_rows - 1), x.data(), n_cols)),
                  bits_of(yr[n_rows - 1]));
      }
    }
  }
}

// The K types' tile kernels (two groups against whole 16-token tiles, each super-block unpacked
// once for up to 64 tokens) equal ref bit for bit across 64-token chunks: several pairs of groups
// and a lone last group, tiles in the first and later chunks with a tail after them, packed at load
// or on the fly, 1 and 2 threads, every variant the CPU runs.
TEST(Avx2Matmul, KQuantTilesEqualRefBitForBit) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(23);
  ThreadPool pool1(1), pool2(2);
  const int64_t n_rows = 41, n_cols = 512;  // 6 groups (the last one short), 2 super-blocks
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K, DType::IQ4_XS, DType::Q3_K, DType::Q2_K}) {
    const size_t stride = row_bytes(t, n_cols);
    std::vector<uint8_t> buf(stride * n_rows);
    for (int64_t r = 0; r < n_rows; ++r) random_row(t, n_cols, rng, buf.data() + r * stride);
    TensorView w{t, buf.data(), n_rows, n_cols, stride};
    const std::vector<uint8_t> packed = pack_weights(w);
    TensorView wp = w;
    wp.packed = packed.data();
    for (int64_t n_tok : {16, 48, 64, 80, 131}) {
      const std::vector<float> x = random_floats(rng, n_tok * n_cols, 1.5f);
      const size_t ny = static_cast<size_t>(n_tok * n_rows);
      std::vector<float> yr(ny), y(ny);
      ref::matmul(w, x.data(), yr.data(), n_tok, pool1);
      for (int v = 0; v < 4; ++v) {
        if (v >= 2 && !avx2::vnni_supported()) break;
        const TensorView& wv = v % 2 ? wp : w;
        ThreadPool& pool = n_tok % 2 ? pool1 : pool2;
        std::fill(y.begin(), y.end(), -1.0f);
        if (v < 2)
          avx2::matmul(wv, x.data(), y.data(), n_tok, pool);
        else
          avx2::matmul_vnni(wv, x.data(), y.data(), n_tok, pool);
        for (size_t k = 0; k < ny; ++k)
          ASSERT_EQ(bits_of(y[k]), bits_of(yr[k]))
              << dtype_name(t) << " n_tok " << n_tok << " element " << k
              << (v < 2 ? " (avx2" : " (vnni") << (v % 2 ? ", packed)" : ", unpacked)");
      }
    }
  }
}

// The extremes of the K kernels' 16-bit stages: every code at its largest magnitude (Q4_K 15,
// Q5_K 31, Q6_K -32 and 31, IQ4_XS -127 and 113, Q3_K -4 and 3, Q2_K 3) and the largest scales
// (and mins), against codes all +-127. Three row groups, so the pair kernels run them too, and 21
// tokens: a 16-token tile (the tile kernels) and 5 more (the group and pair kernels).
TEST(Avx2Matmul, KQuantExtremesAreExact) {
  SKIP_WITHOUT_AVX2();
  ThreadPool pool(1);
  const int64_t n = 512, n_rows = 17, n_tok = 21;
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K, DType::IQ4_XS, DType::Q3_K, DType::Q2_K}) {
    for (uint8_t fill : {uint8_t(0xff), uint8_t(0x00), uint8_t(0x80), uint8_t(0x7f)}) {
      for (float xv : {1.0f, -1.0f}) {
        const size_t stride = row_bytes(t, n);
        std::vector<uint8_t> w(stride * n_rows, fill);  // codes, scales and mins all `fill`
        for (size_t b = 0; b < w.size() / row_bytes(t, kQK_K); ++b)
          for (size_t off : test::f16_scale_offsets(t)) {
            const uint16_t h = fp32_to_fp16(off == 0 ? 0.5f : 0.25f);
            std::memcpy(w.data() + b * row_bytes(t, kQK_K) + off, &h, 2);
          }
        const TensorView view{t, w.data(), n_rows, n, stride};
        std::vector<float> x(n_tok * n, xv);
        for (int64_t i = 0; i < n_tok * n; i += 3) x[i] = -xv;
        std::vector<float> yr(n_tok * n_rows), yf(n_tok * n_rows);
        ref::matmul(view, x.data(), yr.data(), n_tok, pool);
        avx2::matmul(view, x.data(), yf.data(), n_tok, pool);
        for (size_t k = 0; k < yr.size(); ++k)
          ASSERT_EQ(bits_of(yf[k]), bits_of(yr[k])) << dtype_name(t) << " fill " << int(fill);
        if (avx2::vnni_supported()) {
          std::vector<float> yv(yr.size());
          avx2::matmul_vnni(view, x.data(), yv.data(), n_tok, pool);
          for (size_t k = 0; k < yr.size(); ++k)
            ASSERT_EQ(bits_of(yv[k]), bits_of(yr[k])) << dtype_name(t) << " fill " << int(fill);
        }
        // And the scalar twin against the exact value of its own integers (no saturation there).
        ref::KInts ki;
        ref::k_block_ints(t, w.data(), &ki);
        std::vector<BlockQ8_K> xq(n / 256);
        ref::quant_act_q8_k(x.data(), xq.data(), n / 256);
        double want = 0;
        for (int64_t e = 0; e < n; ++e) {
          const double dx = xq[e / 256].d, p = xq[e / 256].qs[e % 256];
          want += double(fp16_to_fp32(ki.d)) * ki.sc[e % 256 / 16] * ki.q[e % 256] * p * dx -
                  double(fp16_to_fp32(ki.dmin)) * ki.m[e % 256 / 16] * p * dx;
        }
        ASSERT_NEAR(yr[0], want, 1e-5 * std::fabs(want) + 1e-6) << dtype_name(t) << " " << int(fill);
      }
    }
  }
}

// The same for the 32-column types with group kernels in kquant_kernels.h: Q5_0 / Q5_1 codes all
// 31 or 0 (Q5_0's values 15 and -16), IQ4_NL's table ends (-127, 113), against codes all +-127;
// and ref against the exact sum of the dequantized weights times the activations' values.
TEST(Avx2Matmul, Q5AndIq4NlExtremesAreExact) {
  SKIP_WITHOUT_AVX2();
  ThreadPool pool(1);
  const int64_t n = 96, n_rows = 17, n_tok = 5;
  for (DType t : {DType::Q5_0, DType::Q5_1, DType::IQ4_NL}) {
    for (uint8_t fill : {uint8_t(0xff), uint8_t(0x00), uint8_t(0x88)}) {
      for (float xv : {1.0f, -1.0f}) {
        const size_t stride = row_bytes(t, n), bsize = row_bytes(t, 32);
        std::vector<uint8_t> w(stride * n_rows, fill);
        for (size_t b = 0; b < w.size() / bsize; ++b)
          for (size_t off : test::f16_scale_offsets(t)) {
            const uint16_t h = fp32_to_fp16(off == 0 ? 0.5f : -0.25f);
            std::memcpy(w.data() + b * bsize + off, &h, 2);
          }
        const TensorView view{t, w.data(), n_rows, n, stride};
        std::vector<float> x(n_tok * n, xv);
        for (int64_t i = 0; i < n_tok * n; i += 3) x[i] = -xv;
        std::vector<float> yr(n_tok * n_rows), yf(n_tok * n_rows), yv(n_tok * n_rows);
        ref::matmul(view, x.data(), yr.data(), n_tok, pool);
        avx2::matmul(view, x.data(), yf.data(), n_tok, pool);
        if (avx2::vnni_supported())
          avx2::matmul_vnni(view, x.data(), yv.data(), n_tok, pool);
        else
          yv = yr;
        for (size_t k = 0; k < yr.size(); ++k) {
          ASSERT_EQ(bits_of(yf[k]), bits_of(yr[k])) << dtype_name(t) << " fill " << int(fill);
          ASSERT_EQ(bits_of(yv[k]), bits_of(yr[k])) << dtype_name(t) << " fill " << int(fill);
        }
        std::vector<float> wv(n);
        ref::dequantize_row(t, w.data(), wv.data(), n);
        std::vector<BlockQ8_0> xq(n / 32);
        ref::quant_act_q8_0(x.data(), xq.data(), n / 32);  // Q8_1's codes and d are these too
        double want = 0, abs_terms = 0;
        for (int64_t e = 0; e < n; ++e) {
          const double term = double(wv[e]) * xq[e / 32].qs[e % 32] * fp16_to_fp32(xq[e / 32].d);
          want += term;
          abs_terms += std::fabs(term);
        }
        // Q5_1's m * s takes s rounded to f16 (relative 2^-11): within 2^-10 of the terms.
        ASSERT_NEAR(yr[0], want, 0x1p-10 * abs_terms + 1e-6) << dtype_name(t) << " " << int(fill);
      }
    }
  }
}

// The extremes of the integer sums: Q4 nibbles all 15 against codes all +-127 (each 16-bit lane
// sums 8 maddubs pairs to 30,480 of 32,767), Q8_0 codes of -128 (a file may hold them; |w| = 128
// is still exact in maddubs) against -127, and Q4_0's nibble 0 (value -8). Two row groups and 16
// tokens, so the VNNI variant's pair kernels (two groups in 512-bit vectors) and the AMX tile
// kernels run them too.
TEST(Avx2Matmul, QuantizedExtremesAreExact) {
  SKIP_WITHOUT_AVX2();
  ThreadPool pool(1);
  const int64_t n = 64, n_rows = 16;
  for (DType t : {DType::Q4_0, DType::Q4_1, DType::Q8_0}) {
    for (uint8_t code : {uint8_t(0xff), uint8_t(0x00), uint8_t(0x80)}) {
      for (float xv : {1.0f, -1.0f}) {
        const size_t stride = row_bytes(t, n);
        std::vector<uint8_t> w(stride * n_rows, code);
        const size_t bsize = dtype_info(t).type_size;
        for (size_t b = 0; b < w.size() / bsize; ++b) {
          const uint16_t d = fp32_to_fp16(0.5f), m = fp32_to_fp16(-0.25f);
          std::memcpy(w.data() + b * bsize, &d, 2);
          if (t == DType::Q4_1) std::memcpy(w.data() + b * bsize + 2, &m, 2);
        }
        const TensorView view{t, w.data(), n_rows, n, stride};
        const int64_t n_tok = 16;                   // a whole tile for the AMX kernels
        const std::vector<float> x(n_tok * n, xv);  // every code is +-127
        std::vector<float> yr(n_tok * n_rows), yf(n_tok * n_rows);
        ref::matmul(view, x.data(), yr.data(), n_tok, pool);
        avx2::matmul(view, x.data(), yf.data(), n_tok, pool);
        for (size_t k = 0; k < yr.size(); ++k)
          ASSERT_EQ(bits_of(yf[k]), bits_of(yr[k])) << dtype_name(t) << " code " << int(code);
        if (avx2::vnni_supported()) {
          std::vector<float> yv(yr.size());
          avx2::matmul_vnni(view, x.data(), yv.data(), n_tok, pool);
          for (size_t k = 0; k < yr.size(); ++k)
            ASSERT_EQ(bits_of(yv[k]), bits_of(yr[k])) << dtype_name(t) << " code " << int(code);
        }
        if (avx2::amx_supported()) {
          std::vector<float> ya(yr.size());
          avx2::matmul_amx(view, x.data(), ya.data(), n_tok, pool);
          for (size_t k = 0; k < yr.size(); ++k)
            ASSERT_EQ(bits_of(ya[k]), bits_of(yr[k]))
                << dtype_name(t) << " code " << int(code) << " (amx)";
        }
        // And the value itself, exactly: d_w d_x sum(q_w q_x) (+ m s), d_x = 1/127.
        const int qx = xv > 0 ? 127 : -127;
        int sum_qw;  // sum of one block's 32 weight integers
        if (t == DType::Q8_0) {
          sum_qw = 32 * static_cast<int8_t>(code);
        } else {
          const int off = t == DType::Q4_0 ? 8 : 0;
          sum_qw = 16 * ((code & 15) - off) + 16 * ((code >> 4) - off);
        }
        const double dx = fp16_to_fp32(fp32_to_fp16(1.0f / 127));
        double want = 2.0 * 0.5 * dx * sum_qw * qx;  // 2 blocks
        if (t == DType::Q4_1) want += 2.0 * -0.25 * fp16_to_fp32(fp32_to_fp16(float(dx * 32 * qx)));
        ASSERT_NEAR(yf[0], want, 1e-4 * std::fabs(want) + 1e-6)
            << dtype_name(t) << " code " << int(code) << " x " << xv << " y1 " << yf[1];
      }
    }
  }
}

// pack_weights moves bytes only: every row's scales and codes are where packed.h says, and rows
// past the last are zero.
TEST(Pack, LayoutIsTheDocumentedInterleave) {
  std::mt19937 rng(23);
  for (DType t : {DType::Q4_0, DType::Q4_1, DType::Q8_0}) {
    const int64_t n_rows = 13, n_cols = 96, nb = 3;
    const size_t stride = row_bytes(t, n_cols);
    std::vector<uint8_t> w(stride * n_rows);
    for (int64_t r = 0; r < n_rows; ++r) random_row(t, n_cols, rng, w.data() + r * stride);
    const std::vector<uint8_t> p = pack_weights({t, w.data(), n_rows, n_cols, stride});
    const size_t bsize = dtype_info(t).type_size, pbytes = 8 * bsize;
    const size_t code_bytes = t == DType::Q8_0 ? 32 : 16, code_off = bsize - code_bytes;
    ASSERT_EQ(p.size(), 2 * nb * pbytes);
    for (int64_t r = 0; r < 16; ++r) {
      for (int64_t ib = 0; ib < nb; ++ib) {
        const uint8_t* pb = p.data() + ((r / 8) * nb + ib) * pbytes;
        const int k = static_cast<int>(r % 8);
        std::vector<uint8_t> blk(bsize, 0);
        if (r < n_rows) std::memcpy(blk.data(), w.data() + r * stride + ib * bsize, bsize);
        ASSERT_EQ(std::memcmp(pb + 2 * k, blk.data(), 2), 0) << "d of row " << r;
        if (t == DType::Q4_1) {
          ASSERT_EQ(std::memcmp(pb + 16 + 2 * k, blk.data() + 2, 2), 0);
        }
        const uint8_t* qs = pb + (t == DType::Q4_1 ? 32 : 16);
        for (size_t v = 0; v < code_bytes / 4; ++v)
          ASSERT_EQ(std::memcmp(qs + 32 * v + 4 * k, blk.data() + code_off + 4 * v, 4), 0)
              << dtype_name(t) << " row " << r << " block " << ib << " vector " << v;
      }
    }
  }
  EXPECT_TRUE(pack_weights({DType::F16, nullptr, 4, 32, 64}).empty());
  EXPECT_FALSE(packable(DType::F32));
  EXPECT_TRUE(packable(DType::Q2_K));
  EXPECT_TRUE(packable(DType::Q5_0));
  EXPECT_TRUE(packable(DType::Q6_K));
}

TEST(Avx2Dot, F32AndF16DotsMatchRef) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(31);
  // Every tail length 0..31 around several multiples of 32, and long rows.
  std::vector<int64_t> sizes;
  for (int64_t n = 0; n <= 100; ++n) sizes.push_back(n);
  for (int64_t n : {127, 128, 129, 576, 1000, 1536, 4095, 4096, 4097, 8200}) sizes.push_back(n);
  for (int64_t n : sizes) {
    for (size_t off : {0, 4, 16, 28}) {
      Buffer a(n * 4 + 4, off), b(n * 4 + 4, 32 - off), h(n * 2 + 2, off / 2);
      const std::vector<float> av = random_floats(rng, n, 1.0f), bv = random_floats(rng, n, 1.0f);
      std::copy(av.begin(), av.end(), a.as<float>());
      std::copy(bv.begin(), bv.end(), b.as<float>());
      quantize_row(DType::F16, av.data(), h.data(), n);
      const float r = ref::dot_f32(a.as<float>(), b.as<float>(), n);
      const float f = avx2::dot_f32(a.as<float>(), b.as<float>(), n);
      ASSERT_NEAR(f, r, f32_tolerance(n, abs_dot(a.as<float>(), b.as<float>(), n)))
          << "n " << n << " offset " << off;
      // The f16 row dot is the f32 dot of the dequantized row, bit for bit, and matches ref's
      // f16 dot_row (dequantize, then its f32 dot) within the f32 tolerance.
      std::vector<float> hf(n);
      ref::dequantize_row(DType::F16, h.data(), hf.data(), n);
      const float f16 = avx2::dot_f16(h.as<uint16_t>(), b.as<float>(), n);
      ASSERT_EQ(bits_of(f16), bits_of(avx2::dot_f32(hf.data(), b.as<float>(), n))) << "n " << n;
      const float r16 = ref::dot_row(DType::F16, h.data(), b.as<float>(), n);
      ASSERT_NEAR(f16, r16, f32_tolerance(n, abs_dot(hf.data(), b.as<float>(), n))) << "n " << n;
    }
  }
}

// ---- matmul -------------------------------------------------------------------------------------

struct Matrix {
  DType type;
  int64_t n_rows, n_cols;
  size_t stride;
  Buffer buf;
  TensorView view() { return {type, buf.data(), n_rows, n_cols, stride}; }
  const uint8_t* row(int64_t r) { return buf.data() + r * stride; }
};

// Rows padded by `pad` bytes (an even number: keeps blocks 2-byte aligned) after `offset`.
Matrix random_matrix(DType t, int64_t n_rows, int64_t n_cols, size_t pad, size_t offset,
                     std::mt19937& rng) {
  const size_t stride = row_bytes(t, n_cols) + pad;
  Matrix m{t, n_rows, n_cols, stride, Buffer(stride * n_rows, offset)};
  for (int64_t r = 0; r < n_rows; ++r) random_row(t, n_cols, rng, m.buf.data() + r * stride);
  return m;
}

// Tolerance for one matmul element, as for dot_row of that row.
double element_tolerance(DType t, const uint8_t* row, const float* x, int64_t n) {
  if (act_type(t) != DType::F32) {
    std::vector<uint8_t> xq(act_row_bytes(t, n));
    if (act_type(t) == DType::Q8_1)
      ref::quant_act_q8_1(x, reinterpret_cast<BlockQ8_1*>(xq.data()), n / 32);
    else if (act_type(t) == DType::Q8_K)
      ref::quant_act_q8_k(x, reinterpret_cast<BlockQ8_K*>(xq.data()), n / 256);
    else
      ref::quant_act_q8_0(x, reinterpret_cast<BlockQ8_0*>(xq.data()), n / 32);
    return quantized_tolerance(n / 32, quantized_abs_terms(t, row, xq.data(), n / 32));
  }
  std::vector<float> w(n);
  ref::dequantize_row(t, row, w.data(), n);
  return f32_tolerance(n, abs_dot(w.data(), x, n));
}

struct Case {
  DType type;
  std::vector<int64_t> n_cols;
};

const std::vector<Case>& cases() {
  static const std::vector<Case> c = {
      {DType::Q4_0, {32, 96, 576, 1536}},  {DType::Q4_1, {32, 64, 576, 1536}},
      {DType::Q8_0, {32, 160, 576, 4096}}, {DType::F32, {7, 33, 576}},
      {DType::F16, {5, 64, 576}},          {DType::BF16, {32, 47}},
      {DType::Q5_0, {32, 576}},            {DType::Q5_1, {32, 576}},
      {DType::IQ4_NL, {32, 576}},          {DType::Q2_K, {256, 512}},
      {DType::Q3_K, {256, 512}},           {DType::Q4_K, {256, 512}},
      {DType::Q5_K, {256, 512}},           {DType::Q6_K, {256, 512}},
      {DType::IQ4_XS, {256, 512}},
  };
  return c;
}

TEST(Avx2Matmul, MatchesRefWithinTolerance) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(41);
  ThreadPool pool(2);
  for (const Case& c : cases()) {
    for (int64_t n_cols : c.n_cols) {
      for (int64_t n_rows : {1, 5, 37}) {
        Matrix w =
            random_matrix(c.type, n_rows, n_cols, n_rows % 2 ? 0 : 6, 2 * (n_rows % 16), rng);
        for (int64_t n_tok : {1, 3, 4, 5, 9, 17}) {
          const std::vector<float> x = random_floats(rng, n_tok * n_cols, 1.5f);
          std::vector<float> yr(n_tok * n_rows), yf(n_tok * n_rows);
          ref::matmul(w.view(), x.data(), yr.data(), n_tok, pool);
          avx2::matmul(w.view(), x.data(), yf.data(), n_tok, pool);
          for (int64_t i = 0; i < n_tok; ++i)
            for (int64_t r = 0; r < n_rows; ++r) {
              const double tol = element_tolerance(c.type, w.row(r), x.data() + i * n_cols, n_cols);
              ASSERT_NEAR(yf[i * n_rows + r], yr[i * n_rows + r], tol)
                  << dtype_name(c.type) << " " << n_rows << "x" << n_cols << " n_tok " << n_tok
                  << " token " << i << " row " << r;
            }
        }
      }
    }
  }
}

// The cached-vs-recomputed equivalence needs y[i, r] independent of n_tok (decode path for
// n_tok <= 4, prefill tiles above, with partial tiles at either edge), the thread count, the row
// split (views starting at other rows shift every chunk, tile and panel boundary), and equal to
// dot_row. All bitwise, within the AVX2 variant.
TEST(Avx2Matmul, BatchThreadsSplitAndDotRowBitIdentical) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(51);
  ThreadPool pool1(1), pool2(2), pool3(3);
  for (const Case& c : cases()) {
    const int64_t n_cols = c.n_cols.back();
    // Enough rows for several prefill panels (about 16 KiB of unpacked rows each) per thread.
    const int64_t n_rows = n_cols <= 64 ? 203 : 131;
    // 23 tokens make every batch but bf16's big enough to be split across threads (matmul runs
    // less than ~1M multiply-adds inline); the single-token calls run inline.
    const int64_t n_tok = 23;
    Matrix w = random_matrix(c.type, n_rows, n_cols, 0, 2, rng);
    const std::vector<float> x = random_floats(rng, n_tok * n_cols, 1.0f);
    std::vector<float> batch(n_tok * n_rows), batch3(n_tok * n_rows);
    avx2::matmul(w.view(), x.data(), batch.data(), n_tok, pool2);
    avx2::matmul(w.view(), x.data(), batch3.data(), n_tok, pool3);
    for (int64_t k = 0; k < n_tok * n_rows; ++k)
      ASSERT_EQ(bits_of(batch[k]), bits_of(batch3[k])) << dtype_name(c.type) << " element " << k;
    // Sub-batches of every size from 1 to 7 (decode and prefill paths), at every start.
    for (int64_t t0 = 0, len = 1; t0 < n_tok; t0 += len, len = len % 7 + 1) {
      const int64_t m = std::min(len, n_tok - t0);
      std::vector<float> part(m * n_rows);
      avx2::matmul(w.view(), x.data() + t0 * n_cols, part.data(), m, m % 2 ? pool1 : pool2);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t r = 0; r < n_rows; ++r)
          ASSERT_EQ(bits_of(batch[(t0 + i) * n_rows + r]), bits_of(part[i * n_rows + r]))
              << dtype_name(c.type) << " tokens " << t0 << "+" << m << " row " << r;
    }
    for (int64_t shift : {1, 5, 17}) {
      TensorView tail = w.view();
      tail.data = w.row(shift);
      tail.n_rows = n_rows - shift;
      for (int64_t m : {1, 6}) {
        std::vector<float> part(m * tail.n_rows);
        avx2::matmul(tail, x.data(), part.data(), m, pool2);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t r = 0; r < tail.n_rows; ++r)
            ASSERT_EQ(bits_of(batch[i * n_rows + r + shift]), bits_of(part[i * tail.n_rows + r]))
                << dtype_name(c.type) << " shift " << shift << " n_tok " << m << " row " << r;
      }
    }
    for (int64_t i = 0; i < n_tok; i += 5)
      for (int64_t r = 0; r < n_rows; ++r)
        ASSERT_EQ(bits_of(batch[i * n_rows + r]),
                  bits_of(avx2::dot_row(c.type, w.row(r), x.data() + i * n_cols, n_cols)))
            << dtype_name(c.type) << " token " << i << " row " << r;
  }
}

// The F16/BF16 matmul (half_avx2.cpp) keeps ref's 16-lane order and fuses each product-add, so
// every element is within 2 (ceil(n / 16) + 5) 2^-24 sum |w x| of ref's (each is within half of
// that of the exact sum). Checked for 1..70 tokens (every tile and token tail), 1 and 2 threads,
// every column tail mod 16 and row counts that leave partial row tiles; within the variant, each
// token count gives the 70-token batch's bits (the VNNI variants' matmul too) and dot_row gives
// matmul's. Prints the worst |avx2 - ref| / (2^-24 sum |w x|) seen.
TEST(Avx2Matmul, HalfMatchesRefForEveryTokenCountAndTail) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(71);
  ThreadPool pool1(1), pool2(2);
  double worst = 0;
  std::vector<int64_t> widths = {1, 5, 576, 2050};
  for (int64_t k = 0; k < 16; ++k) widths.push_back(48 + k);
  for (DType t : {DType::F16, DType::BF16}) {
    for (int64_t n_cols : widths) {
      const int64_t n_rows = n_cols > 1000 ? 19 : 7, n_tok = 70;
      Matrix w = random_matrix(t, n_rows, n_cols, 2 * (n_cols % 3), 2 * (n_cols % 5), rng);
      const std::vector<float> x = random_floats(rng, n_tok * n_cols, 1.5f);
      std::vector<float> yr(n_tok * n_rows), batch(n_tok * n_rows);
      ref::matmul(w.view(), x.data(), yr.data(), n_tok, pool1);
      avx2::matmul(w.view(), x.data(), batch.data(), n_tok, pool2);
      for (int64_t r = 0; r < n_rows; ++r) {
        std::vector<float> wf(n_cols);
        ref::dequantize_row(t, w.row(r), wf.data(), n_cols);
        for (int64_t i = 0; i < n_tok; ++i) {
          const double terms = abs_dot(wf.data(), x.data() + i * n_cols, n_cols) * kEpsF32;
          const double err = std::fabs(double(batch[i * n_rows + r]) - yr[i * n_rows + r]);
          ASSERT_LE(err, 2.0 * double((n_cols + 15) / 16 + 5) * terms + 1e-30)
              << dtype_name(t) << " " << n_rows << "x" << n_cols << " token " << i << " row " << r;
          if (terms > 0) worst = std::max(worst, err / terms);
          ASSERT_EQ(bits_of(batch[i * n_rows + r]),
                    bits_of(avx2::dot_row(t, w.row(r), x.data() + i * n_cols, n_cols)));
        }
      }
      for (int64_t m = 1; m <= n_tok; ++m) {
        std::vector<float> part(m * n_rows), partv(m * n_rows);
        avx2::matmul(w.view(), x.data(), part.data(), m, m % 2 ? pool1 : pool2);
        // The VNNI variants run the same tiles: the same bits.
        if (avx2::vnni_supported())
          avx2::matmul_vnni(w.view(), x.data(), partv.data(), m, m % 2 ? pool2 : pool1);
        for (int64_t k = 0; k < m * n_rows; ++k) {
          ASSERT_EQ(bits_of(part[k]), bits_of(batch[k]))
              << dtype_name(t) << " n_cols " << n_cols << " n_tok " << m << " element " << k;
          if (avx2::vnni_supported()) {
            ASSERT_EQ(bits_of(partv[k]), bits_of(batch[k]))
                << "vnni " << dtype_name(t) << " n_cols " << n_cols << " n_tok " << m
                << " element " << k;
          }
        }
      }
    }
  }
  std::printf("half matmul: worst |avx2 - ref| = %.3f x 2^-24 sum |w x|\n", worst);
}

// The dispatched entry points are the chosen variant's, exactly.
TEST(Avx2Matmul, PublicEntryPointsUseTheChosenVariant) {
  std::mt19937 rng(61);
  ThreadPool pool(2);
  const bool fast = std::strncmp(kernels_backend(), "avx2", 4) == 0;  // avx2, avx2-vnni or avx2-amx
  Matrix w = random_matrix(DType::Q4_1, 19, 576, 0, 0, rng);
  const std::vector<float> x = random_floats(rng, 6 * 576, 1.0f);
  std::vector<float> y(6 * 19), want(6 * 19);
  matmul(w.view(), x.data(), y.data(), 6, pool);
  (fast ? avx2::matmul : ref::matmul)(w.view(), x.data(), want.data(), 6, pool);
  for (size_t k = 0; k < y.size(); ++k) ASSERT_EQ(bits_of(y[k]), bits_of(want[k]));
  const float d = dot_row(DType::Q4_1, w.row(3), x.data(), 576);
  ASSERT_EQ(bits_of(d),
            bits_of((fast ? avx2::dot_row : ref::dot_row)(DType::Q4_1, w.row(3), x.data(), 576)));
}

// matmul_multi is bit-identical to one matmul per part, for every variant (AMX where the CPU has
// it): shared quantized activations (same type), mixed types and f32 (the fallback), part sizes
// off the row grain, decode and prefill token counts (whole 16-token tiles and a rest), 1 and 2
// threads.
TEST(Avx2Matmul, MultiEqualsSeparateCallsBitForBit) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(97);
  ThreadPool pool1(1), pool2(2);
  const std::vector<std::vector<DType>> sets = {{DType::Q4_1, DType::Q4_1, DType::Q4_1},
                                                {DType::Q4_0, DType::Q4_0},
                                                {DType::Q8_0, DType::Q8_0},
                                                {DType::Q4_1, DType::Q8_0},
                                                {DType::F32, DType::F16}};
  const int64_t n_in = 96;
  for (const auto& types : sets) {
    std::vector<Matrix> ws;
    const int64_t sizes[3] = {37, 16, 5};
    for (size_t k = 0; k < types.size(); ++k)
      ws.push_back(random_matrix(types[k], sizes[k], n_in, 2 * k, 2 * k, rng));
    for (int64_t n_tok : {1, 3, 4, 7, 9, 16, 33}) {
      const std::vector<float> x = random_floats(rng, n_tok * n_in, 1.0f);
      for (ThreadPool* pool : {&pool1, &pool2}) {
        struct Variant {
          const char* name;
          decltype(&avx2::matmul_multi) multi;
          decltype(&avx2::matmul) single;
        };
        std::vector<Variant> variants = {{"avx2", avx2::matmul_multi, avx2::matmul},
                                         {"ref", ref::matmul_multi, ref::matmul}};
        if (avx2::amx_supported())
          variants.push_back({"amx", avx2::matmul_multi_amx, avx2::matmul_amx});
        for (const Variant& var : variants) {
          std::vector<TensorView> views;
          std::vector<std::vector<float>> got(ws.size()), want(ws.size());
          std::vector<MatmulPart> parts;
          for (size_t k = 0; k < ws.size(); ++k) views.push_back(ws[k].view());
          for (size_t k = 0; k < ws.size(); ++k) {
            got[k].assign(n_tok * ws[k].n_rows, -1.0f);
            want[k].assign(n_tok * ws[k].n_rows, -2.0f);
            parts.push_back({&views[k], got[k].data()});
            var.single(views[k], x.data(), want[k].data(), n_tok, *pool);
          }
          var.multi(parts.data(), static_cast<int>(parts.size()), x.data(), n_tok, *pool);
          for (size_t k = 0; k < ws.size(); ++k)
            for (size_t i = 0; i < got[k].size(); ++i)
              ASSERT_EQ(bits_of(got[k][i]), bits_of(want[k][i]))
                  << var.name << " part " << k << " n_tok " << n_tok << " i " << i;
        }
      }
    }
  }
}

// ---- attention chunk ----------------------------------------------------------------------------

// exp_f32 (Cephes expf) against std::exp over the range attention feeds it (s - max <= 0) and
// beyond: within 2 ulp where the result is normal; 0 below -87.3 (std::exp gives < 1.2e-38).
TEST(Avx2Attn, ExpWithinTwoUlp) {
  SKIP_WITHOUT_AVX2();
  std::vector<float> x;
  for (float v = -87.0f; v <= 88.0f; v += 0.0137f) x.push_back(v);
  for (float v : {0.0f, -0.0f, 1e-30f, -1e-30f, -1e-7f, 1e-7f}) x.push_back(v);
  const size_t n = x.size();
  for (size_t off : {0, 4, 12}) {  // unaligned and masked-tail placements
    Buffer in((n + 1) * 4, off), out((n + 1) * 4, off);
    std::memcpy(in.data(), x.data(), n * 4);
    avx2::exp_f32(in.as<float>(), out.as<float>(), static_cast<int64_t>(n));
    for (size_t i = 0; i < n; ++i) {
      const double want = std::exp(static_cast<double>(x[i]));
      const double got = out.as<float>()[i];
      ASSERT_LE(std::abs(got - want), 2 * kEpsF32 * 2 * want) << "x=" << x[i];
    }
  }
  float lo[3] = {-87.5f, -100.0f, -INFINITY}, out[3];
  avx2::exp_f32(lo, out, 3);
  for (float v : out) EXPECT_EQ(v, 0.0f);
}

// attn_chunk: AVX2 against ref over head sizes with and without 8-lane tails, chunk lengths with
// and without tails, several query heads, unaligned rows. Bounds: each score is a dot of hd terms,
// so |s_fast - s_ref| <= ds = 2 hd eps scale max_j sum_d |q_d k_jd| (both variants' rounding);
// the weights exp(s - m) then differ relatively by at most 2 ds (s and m) plus 4 ulp of the two
// exps, and the normalised output o / l by twice that, times max |v|, plus the rounding of the
// sums over n positions (n eps each variant).
TEST(Avx2Attn, ChunkMatchesRef) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(83);
  for (int64_t hd : {5, 8, 16, 24, 64, 80, 128}) {
    for (int64_t n : {1, 3, 8, 9, 31, 256}) {
      for (int64_t n_q : {1, 3}) {
        const size_t off = static_cast<size_t>(4 * ((hd + n + n_q) % 8));
        Buffer kb(n * hd * 4, off), vb(n * hd * 4, off), qb(n_q * hd * 4, off);
        const std::vector<float> kv = random_floats(rng, n * hd, 1.0f);
        const std::vector<float> vv = random_floats(rng, n * hd, 1.0f);
        const std::vector<float> qv = random_floats(rng, n_q * hd, 2.0f);
        std::memcpy(kb.data(), kv.data(), kv.size() * 4);
        std::memcpy(vb.data(), vv.data(), vv.size() * 4);
        std::memcpy(qb.data(), qv.data(), qv.size() * 4);
        const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
        std::vector<float> m1(n_q), l1(n_q), o1(n_q * hd), w1(n_q * n);
        std::vector<float> m2(n_q), l2(n_q), o2(n_q * hd), w2(n_q * n);
        avx2::attn_chunk(kb.as<float>(), vb.as<float>(), n, hd, qb.as<float>(), n_q, scale,
                         m1.data(), l1.data(), o1.data(), w1.data());
        ref::attn_chunk(kb.as<float>(), vb.as<float>(), n, hd, qb.as<float>(), n_q, scale,
                        m2.data(), l2.data(), o2.data(), w2.data());
        double vmax = 0;
        for (float f : vv) vmax = std::max(vmax, std::abs(double(f)));
        for (int64_t a = 0; a < n_q; ++a) {
          double sabs = 0;
          for (int64_t j = 0; j < n; ++j) {
            double t = 0;
            for (int64_t d = 0; d < hd; ++d) t += std::abs(double(qv[a * hd + d]) * kv[j * hd + d]);
            sabs = std::max(sabs, t);
          }
          const double ds = 2.0 * hd * kEpsF32 * scale * sabs;
          const std::string where = "hd=" + std::to_string(hd) + " n=" + std::to_string(n) +
                                    " a=" + std::to_string(a);
          ASSERT_NEAR(m1[a], m2[a], ds + 1e-30) << where;
          const double dw = 2 * ds + 4 * 2 * kEpsF32;
          ASSERT_NEAR(l1[a], l2[a], (dw + 2 * n * kEpsF32) * l2[a]) << where;
          for (int64_t d = 0; d < hd; ++d) {
            const double got = o1[a * hd + d] / l1[a], want = o2[a * hd + d] / l2[a];
            ASSERT_NEAR(got, want, (2 * dw + 4 * n * kEpsF32) * vmax) << where << " d=" << d;
          }
        }
      }
    }
  }
}

// attn_chunk_f16 reads f16 rows in place through row pointers (scattered, unaligned, in any
// order): bit-identical to attn_chunk over the same rows dequantized into tiles, for both
// variants, head sizes with and without 8-lane tails included, and query counts that the AVX2
// kernel's groups of 3 split in every way (3, 3 + 2, 3 + 3 + 1, ...).
TEST(Avx2Attn, F16RowsEqualTilesBitForBit) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(97);
  for (int64_t hd : {8, 24, 64, 80, 5})
  for (int64_t n_q : {1, 2, 3, 5, 7}) {
    for (int64_t n : {1, 7, 8, 12, 33, 256}) {
      // A pool of 2n rows; positions read rows in a shuffled order, one f16 value off alignment.
      std::vector<uint16_t> kpool(2 * n * hd + 1), vpool(2 * n * hd + 1);
      for (auto& h : kpool) h = fp32_to_fp16(std::uniform_real_distribution<float>(-2, 2)(rng));
      for (auto& h : vpool) h = fp32_to_fp16(std::uniform_real_distribution<float>(-2, 2)(rng));
      std::vector<int64_t> order(2 * n);
      for (int64_t i = 0; i < 2 * n; ++i) order[i] = i;
      std::shuffle(order.begin(), order.end(), rng);
      std::vector<const uint16_t*> kr(n), vr(n);
      std::vector<float> kt(n * hd), vt(n * hd);
      for (int64_t j = 0; j < n; ++j) {
        kr[j] = kpool.data() + 1 + order[j] * hd;
        vr[j] = vpool.data() + 1 + order[j] * hd;
        for (int64_t d = 0; d < hd; ++d) {
          kt[j * hd + d] = fp16_to_fp32(kr[j][d]);
          vt[j * hd + d] = fp16_to_fp32(vr[j][d]);
        }
      }
      const std::vector<float> q = random_floats(rng, n_q * hd, 2.0f);
      const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
      for (int variant = 0; variant < 2; ++variant) {
        std::vector<float> m1(n_q), l1(n_q), o1(n_q * hd), w1(n_q * n + 2 * n * hd);
        std::vector<float> m2(n_q), l2(n_q), o2(n_q * hd), w2(n_q * n);
        if (variant == 0) {
          avx2::attn_chunk_f16(kr.data(), vr.data(), n, hd, q.data(), n_q, scale, m1.data(),
                               l1.data(), o1.data(), w1.data());
          avx2::attn_chunk(kt.data(), vt.data(), n, hd, q.data(), n_q, scale, m2.data(), l2.data(),
                           o2.data(), w2.data());
        } else {
          ref::attn_chunk_f16(kr.data(), vr.data(), n, hd, q.data(), n_q, scale, m1.data(),
                              l1.data(), o1.data(), w1.data());
          ref::attn_chunk(kt.data(), vt.data(), n, hd, q.data(), n_q, scale, m2.data(), l2.data(),
                          o2.data(), w2.data());
        }
        const std::string where = std::string(variant ? "ref" : "avx2") + " hd=" +
                                  std::to_string(hd) + " n=" + std::to_string(n) +
                                  " n_q=" + std::to_string(n_q);
        for (int64_t a = 0; a < n_q; ++a) {
          ASSERT_EQ(bits_of(m1[a]), bits_of(m2[a])) << where;
          ASSERT_EQ(bits_of(l1[a]), bits_of(l2[a])) << where;
        }
        for (int64_t i = 0; i < n_q * hd; ++i) ASSERT_EQ(bits_of(o1[i]), bits_of(o2[i])) << where;
      }
    }
  }
}

// A query's numbers do not depend on how many queries share the call (the GQA group in decode,
// group x tokens in prefill): each query must get exactly what a one-query call gives, for f32
// tiles and f16 rows, head sizes with 16- and 8-lane tails and hd % 8 leftovers. (Whoever makes
// the kernel share loads between queries must keep this.)
TEST(Avx2Attn, QueriesAreIndependentOfTheirCount) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(101);
  for (int64_t hd : {8, 24, 64, 72, 13}) {
    for (int64_t n : {5, 8, 40}) {
      std::vector<float> kt(n * hd), vt(n * hd);
      std::vector<uint16_t> k16(n * hd), v16(n * hd);
      std::vector<const uint16_t*> kr(n), vr(n);
      for (int64_t i = 0; i < n * hd; ++i) {
        k16[i] = fp32_to_fp16(std::uniform_real_distribution<float>(-2, 2)(rng));
        v16[i] = fp32_to_fp16(std::uniform_real_distribution<float>(-2, 2)(rng));
        kt[i] = fp16_to_fp32(k16[i]);
        vt[i] = fp16_to_fp32(v16[i]);
      }
      for (int64_t j = 0; j < n; ++j) {
        kr[j] = k16.data() + j * hd;
        vr[j] = v16.data() + j * hd;
      }
      const float scale = 0.3f;
      for (int64_t n_q : {2, 3, 4, 5, 9}) {
        const std::vector<float> q = random_floats(rng, n_q * hd, 2.0f);
        for (bool f16 : {false, true}) {
          std::vector<float> m(n_q), l(n_q), o(n_q * hd), w(n_q * n + 2 * n * hd);
          if (f16)
            avx2::attn_chunk_f16(kr.data(), vr.data(), n, hd, q.data(), n_q, scale, m.data(),
                                 l.data(), o.data(), w.data());
          else
            avx2::attn_chunk(kt.data(), vt.data(), n, hd, q.data(), n_q, scale, m.data(), l.data(),
                             o.data(), w.data());
          for (int64_t a = 0; a < n_q; ++a) {
            float m1, l1;
            std::vector<float> o1(hd), w1(n + 2 * n * hd);
            if (f16)
              avx2::attn_chunk_f16(kr.data(), vr.data(), n, hd, q.data() + a * hd, 1, scale, &m1,
                                   &l1, o1.data(), w1.data());
            else
              avx2::attn_chunk(kt.data(), vt.data(), n, hd, q.data() + a * hd, 1, scale, &m1, &l1,
                               o1.data(), w1.data());
            const std::string where = std::string(f16 ? "f16" : "f32") + " hd=" +
                                      std::to_string(hd) + " n=" + std::to_string(n) +
                                      " n_q=" + std::to_string(n_q) + " a=" + std::to_string(a);
            ASSERT_EQ(bits_of(m[a]), bits_of(m1)) << where;
            ASSERT_EQ(bits_of(l[a]), bits_of(l1)) << where;
            for (int64_t d = 0; d < hd; ++d)
              ASSERT_EQ(bits_of(o[a * hd + d]), bits_of(o1[d])) << where << " d=" << d;
          }
        }
      }
    }
  }
}

// The dispatched attn_chunk is the chosen variant's, exactly.
TEST(Avx2Attn, PublicEntryPointUsesTheChosenVariant) {
  std::mt19937 rng(89);
  const int64_t n = 37, hd = 64, n_q = 3;
  const std::vector<float> k = random_floats(rng, n * hd, 1.0f), v = random_floats(rng, n * hd, 1.0f);
  const std::vector<float> q = random_floats(rng, n_q * hd, 1.0f);
  std::vector<float> m(n_q), l(n_q), o(n_q * hd), w(n_q * n), m2(n_q), l2(n_q), o2(n_q * hd);
  attn_chunk(k.data(), v.data(), n, hd, q.data(), n_q, 0.125f, m.data(), l.data(), o.data(), w.data());
  const bool fast = std::strncmp(kernels_backend(), "avx2", 4) == 0;  // avx2, avx2-vnni or avx2-amx
  (fast ? avx2::attn_chunk : ref::attn_chunk)(k.data(), v.data(), n, hd, q.data(), n_q, 0.125f,
                                               m2.data(), l2.data(), o2.data(), w.data());
  for (int64_t a = 0; a < n_q; ++a) {
    ASSERT_EQ(bits_of(m[a]), bits_of(m2[a]));
    ASSERT_EQ(bits_of(l[a]), bits_of(l2[a]));
  }
  for (size_t i = 0; i < o.size(); ++i) ASSERT_EQ(bits_of(o[i]), bits_of(o2[i]));
}

// ---- element-wise and row-wise ops --------------------------------------------------------------
// Sizes with every 8-lane tail length, around the vector widths and the model's rows (576, 1536),
// each placed at every f32 offset from a 32-byte boundary.
const std::vector<int64_t> kRowSizes = {1,  2,  3,  4,  5,  6,  7,   8,   9,    15,  16,
                                        17, 31, 33, 63, 64, 65, 100, 576, 1536, 4095};

// Inputs that reach the activations' edge cases: dense [-10, 10], the exp overflow and underflow
// thresholds, huge, tiny and signed-zero values, infinities.
std::vector<float> activation_edge_inputs() {
  std::vector<float> v;
  for (int i = -2000; i <= 2000; ++i) v.push_back(i * 0.005f);
  for (float f : {-1e30f, -1e6f,  -120.0f, -104.0f, -100.0f, -88.8f, -88.7f,   -87.4f,
                  -87.0f, -30.0f, 30.0f,   87.0f,   88.7f,   88.8f,  100.0f,   1e6f,
                  1e30f,  1e-20f, -1e-20f, 0.0f,    -0.0f,   1e-40f, INFINITY, -INFINITY})
    v.push_back(f);
  return v;
}

// exp_f32_full against std::exp (in double) over every 997th f32 in [-104.5, 89]: computed in
// double to < 2e-14 relative and rounded once, so within 0.5 ulp + 2e-14 relative of exact
// (normal and subnormal results alike: a subnormal's ulp is 2^-149), +inf past ln(FLT_MAX), NaN
// kept. An exhaustive run over all 2.24e9 f32 in that range measured 0.50000 ulp at most (i.e.
// correctly rounded) and results equal to glibc's expf (ref's, itself within ~0.502 ulp) for
// 2237498380 of 2237668968 normal results (99.992%); >= 99.9% checked here.
TEST(Avx2Elementwise, ExpFullWithinHalfUlp) {
  SKIP_WITHOUT_AVX2();
  std::vector<float> x;
  for (uint64_t u = 0; u <= 0xffffffffull; u += 997) {
    float f;
    const uint32_t b = static_cast<uint32_t>(u);
    std::memcpy(&f, &b, 4);
    if (f >= -104.5f && f <= 89.0f) x.push_back(f);
  }
  for (float f : {0.0f, -0.0f, 1e-30f, -1e-30f, 88.72283f, -87.33654f, -103.28f}) x.push_back(f);
  const size_t n = x.size();
  size_t n_same = 0;
  for (size_t off : {0, 4, 12, 28}) {  // unaligned and masked-tail placements
    Buffer in((n + 1) * 4, off), out((n + 1) * 4, off);
    std::memcpy(in.data(), x.data(), n * 4);
    avx2::exp_f32_full(in.as<float>(), out.as<float>(), static_cast<int64_t>(n) - off / 4);
    for (size_t i = 0; i < n - off / 4; ++i) {
      const double want = std::exp(static_cast<double>(x[i]));
      const double got = out.as<float>()[i];
      if (want > 0x1.fffffep127) {
        ASSERT_TRUE(std::isinf(got) && got > 0) << "x=" << x[i];
        continue;
      }
      const double ulp = want < 0x1p-126 ? 0x1p-149 : std::ldexp(1.0, std::ilogb(want) - 23);
      ASSERT_LE(std::abs(got - want), 0.5 * ulp + 2e-14 * want) << "x=" << x[i];
      n_same += bits_of(static_cast<float>(got)) == bits_of(std::exp(x[i]));
    }
  }
  EXPECT_GE(n_same, 4 * n * 999 / 1000);
  float special[5] = {INFINITY, -INFINITY, NAN, 88.7229f, -1e30f}, out[5];
  avx2::exp_f32_full(special, out, 5);
  EXPECT_EQ(out[0], INFINITY);
  EXPECT_EQ(out[1], 0.0f);
  EXPECT_TRUE(std::isnan(out[2]));
  EXPECT_EQ(out[3], INFINITY);
  EXPECT_EQ(out[4], 0.0f);
}

// add: the same IEEE additions as ref, so bit-identical, at every size and offset.
TEST(Avx2Elementwise, AddEqualsRefBitForBit) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(101);
  for (int64_t n : kRowSizes)
    for (size_t off = 0; off < 32; off += 4) {
      const std::vector<float> x = random_floats(rng, n, 3.0f), y0 = random_floats(rng, n, 3.0f);
      Buffer yb(n * 4, off), xb(n * 4, (off + 8) % 32);
      std::memcpy(yb.data(), y0.data(), n * 4);
      std::memcpy(xb.data(), x.data(), n * 4);
      std::vector<float> want = y0;
      ref::add(want.data(), x.data(), n);
      avx2::add(yb.as<float>(), xb.as<float>(), n);
      for (int64_t i = 0; i < n; ++i)
        ASSERT_EQ(bits_of(yb.as<float>()[i]), bits_of(want[i])) << n << " " << i;
    }
}

// rms_norm: the two variants' f32 scales (each f32(1 / sqrt(double sum / n + eps)), the double
// sums differing only in order) are equal or adjacent floats, 2 u apart relatively at most; each
// output then rounds twice in either variant: |fast - ref| <= 6 u |ref|. In place equals out of
// place bit for bit.
TEST(Avx2Elementwise, RmsNormMatchesRef) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(102);
  int64_t n_same = 0, n_total = 0;
  for (int64_t n : kRowSizes)
    for (size_t off = 0; off < 32; off += 4) {
      const std::vector<float> x = random_floats(rng, n, 3.0f), w = random_floats(rng, n, 1.0f);
      Buffer xb(n * 4, off), wb(n * 4, (off + 12) % 32), yb(n * 4, (off + 20) % 32);
      std::memcpy(xb.data(), x.data(), n * 4);
      std::memcpy(wb.data(), w.data(), n * 4);
      std::vector<float> want(n);
      ref::rms_norm(x.data(), w.data(), want.data(), n, 1e-5f);
      avx2::rms_norm(xb.as<float>(), wb.as<float>(), yb.as<float>(), n, 1e-5f);
      avx2::rms_norm(xb.as<float>(), wb.as<float>(), xb.as<float>(), n, 1e-5f);  // in place
      for (int64_t i = 0; i < n; ++i) {
        const float got = yb.as<float>()[i];
        ASSERT_NEAR(got, want[i], 6 * kEpsF32 * std::fabs(want[i])) << n << " " << i;
        ASSERT_EQ(bits_of(xb.as<float>()[i]), bits_of(got)) << n << " " << i;
        n_same += bits_of(got) == bits_of(want[i]);
        ++n_total;
      }
    }
  EXPECT_GE(n_same, n_total * 9 / 10);  // the scales differ only at rounding boundaries
}

// layer_norm: mean and scale in double (sums in a different order), t = f32((x - mean) * scale)
// then rounds to equal or adjacent floats (2 u of |t|), and t * w + b rounds twice in either
// variant: |fast - ref| <= 6 u (|t w| + |b|). A large mean (two-pass variance) included.
TEST(Avx2Elementwise, LayerNormMatchesRef) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(103);
  for (int64_t n : kRowSizes)
    for (size_t off = 0; off < 32; off += 4)
      for (float shift : {0.0f, 100.0f}) {
        std::vector<float> x = random_floats(rng, n, 2.0f);
        for (auto& v : x) v += shift;
        const std::vector<float> w = random_floats(rng, n, 1.0f), b = random_floats(rng, n, 1.0f);
        Buffer xb(n * 4, off), wb(n * 4, (off + 4) % 32), bb(n * 4, (off + 8) % 32),
            yb(n * 4, (off + 16) % 32);
        std::memcpy(xb.data(), x.data(), n * 4);
        std::memcpy(wb.data(), w.data(), n * 4);
        std::memcpy(bb.data(), b.data(), n * 4);
        std::vector<float> want(n);
        ref::layer_norm(x.data(), w.data(), b.data(), want.data(), n, 1e-5f);
        avx2::layer_norm(xb.as<float>(), wb.as<float>(), bb.as<float>(), yb.as<float>(), n, 1e-5f);
        avx2::layer_norm(xb.as<float>(), wb.as<float>(), bb.as<float>(), xb.as<float>(), n, 1e-5f);
        double mean = 0, var = 0;
        for (float v : x) mean += v;
        mean /= n;
        for (float v : x) var += (v - mean) * (v - mean);
        var /= n;
        for (int64_t i = 0; i < n; ++i) {
          const double tw = (x[i] - mean) / std::sqrt(var + 1e-5) * w[i];
          const float got = yb.as<float>()[i];
          ASSERT_NEAR(got, want[i], 6 * kEpsF32 * (std::fabs(tw) + std::fabs(b[i])))
              << n << " " << i;
          ASSERT_EQ(bits_of(xb.as<float>()[i]), bits_of(got)) << n << " " << i;
        }
      }
}

// softmax: both variants subtract the same (exact) max with the same f32 rounding; then fast's exp
// is within 1 u, ref's libm expf within ~1 u, and each rounds 1 / sum and one product (the double
// sums differing by the exps' errors, <= 2 u relatively): |fast - ref| <= 8 u ref. Against
// exact arithmetic fast keeps the bound the public test states, (|x - max| + 6) u. Rows with -inf
// and huge entries too.
TEST(Avx2Elementwise, SoftmaxMatchesRef) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(104);
  for (int64_t n : kRowSizes)
    for (size_t off = 0; off < 32; off += 4) {
      std::vector<float> x = random_floats(rng, n, 4.0f);
      if (n >= 4) {
        x[n / 2] = -INFINITY;
        x[n / 3] = -1e30f;
      }
      Buffer xb(n * 4, off);
      std::memcpy(xb.data(), x.data(), n * 4);
      std::vector<float> want = x;
      ref::softmax(want.data(), n);
      avx2::softmax(xb.as<float>(), n);
      double mx = -INFINITY, sum = 0, total = 0, total_tol = 0;
      for (float v : x) mx = std::max<double>(mx, v);
      for (float v : x) sum += std::exp(v - mx);
      for (int64_t i = 0; i < n; ++i) {
        const double got = xb.as<float>()[i];
        const double exact = std::exp(x[i] - mx) / sum;
        const double tol = exact == 0 ? 0 : (std::fabs(x[i] - mx) + 6) * kEpsF32 * exact;  // -inf
        ASSERT_NEAR(got, want[i], 8 * kEpsF32 * want[i]) << n << " " << i;
        ASSERT_NEAR(got, exact, tol) << n << " " << i;
        total += got;
        total_tol += tol;
      }
      ASSERT_NEAR(total, 1.0, total_tol + 1e-15) << n;  // the sum of the elements' bounds
    }
  std::vector<float> big = {1e4f, 1e4f - 1.0f, -1e30f, 3e38f, 3e38f, -INFINITY, 0.0f, 1.0f, 2.0f};
  avx2::softmax(big.data(), static_cast<int64_t>(big.size()));
  EXPECT_EQ(big[3], 0.5f);
  EXPECT_EQ(big[4], 0.5f);
  for (int i : {0, 1, 2, 5, 6, 7, 8}) EXPECT_EQ(big[i], 0.0f) << i;
}

// swiglu: fast's exp(-g) is within 1 u, then one add (whose error the exp's shrinks into), one
// divide and one multiply: |fast - exact| <= 4 u |exact| (to first order; 5 u allowed). Ref has
// the same operations around glibc's expf (~1 u), so |fast - ref| <= 9 u |exact|, and the two
// agree bit for bit on almost every input (measured 99.89%; where they differ, glibc's expf was
// the misrounded one in every case inspected). >= 99% checked. Plus 1e-30 absolute: below g = -88.7
// exp(-g) overflows f32 in both variants and the result is a signed 0 where exact is < |g u|
// e^-88.7. Every element on its own: its result does not depend on which lane or tail it falls in.
TEST(Avx2Elementwise, SwigluMatchesRefAndExact) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(105);
  const std::vector<float> edge = activation_edge_inputs();
  int64_t n_same = 0, n_total = 0;
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{9}, static_cast<int64_t>(edge.size())})
    for (size_t off = 0; off < 32; off += 4) {
      std::vector<float> g(edge.begin(), edge.begin() + n);
      if (n < 16) g = random_floats(rng, n, 4.0f);
      const std::vector<float> u = random_floats(rng, n, 2.0f);
      Buffer gb(n * 4, off), ub(n * 4, (off + 4) % 32);
      std::memcpy(gb.data(), g.data(), n * 4);
      std::memcpy(ub.data(), u.data(), n * 4);
      std::vector<float> want = g;
      ref::swiglu(want.data(), u.data(), n);
      avx2::swiglu(gb.as<float>(), ub.as<float>(), n);
      for (int64_t i = 0; i < n; ++i) {
        const double got = gb.as<float>()[i];
        if (std::isinf(g[i])) {  // +inf * u and -inf / inf: ref's values (inf or NaN) exactly
          ASSERT_EQ(std::isnan(got), std::isnan(want[i])) << g[i];
          if (!std::isnan(got)) {
            ASSERT_EQ(got, want[i]) << g[i];
          }
          continue;
        }
        const double exact = double(g[i]) / (1.0 + std::exp(-double(g[i]))) * u[i];
        ASSERT_NEAR(got, exact, 5 * kEpsF32 * std::fabs(exact) + 1e-30) << g[i];
        ASSERT_NEAR(got, want[i], 9 * kEpsF32 * std::fabs(exact) + 1e-30) << g[i];
        n_same += bits_of(static_cast<float>(got)) == bits_of(want[i]);
        ++n_total;
      }
    }
  EXPECT_GE(n_same, n_total * 99 / 100);
  // The same value gives the same bits in a full vector, a masked tail and alone.
  const std::vector<float> g = random_floats(rng, 13, 3.0f), u = random_floats(rng, 13, 1.0f);
  std::vector<float> all = g;
  avx2::swiglu(all.data(), u.data(), 13);
  for (int64_t i = 0; i < 13; ++i) {
    float one = g[i];
    avx2::swiglu(&one, &u[i], 1);
    ASSERT_EQ(bits_of(one), bits_of(all[i])) << i;
  }
}

// gelu as v / (1 + exp(-2 t)): t = sqrt(2/pi) v (1 + 0.044715 v^2) rounds like ref's (<= 4 u
// relative, so exp(-2 t) is off by <= 8 u |t| relative), exp adds 1 u, the add and divide u each:
// |fast - exact| <= (5 + 8 |t|) u |exact| (the t term only matters in the negative tail, where
// exp(-2 t) dominates), plus 1e-30 absolute where exp(-2 t) overflows f32 (v < -10.1) and the
// result is a signed 0, as in ref. Ref's 1 + tanh(t) cancels in that tail, with an absolute error
// of up to ~2 u |v| (tanh rounds near -1), so |fast - ref| is bounded by 4 u |v| plus both relative
// bounds. +-inf gives ref's value (inf, or NaN from -inf / inf).
TEST(Avx2Elementwise, GeluMatchesRefAndExact) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(106);
  const std::vector<float> edge = activation_edge_inputs();
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{9}, static_cast<int64_t>(edge.size())})
    for (size_t off = 0; off < 32; off += 4) {
      std::vector<float> x(edge.begin(), edge.begin() + n);
      if (n < 16) x = random_floats(rng, n, 4.0f);
      Buffer xb(n * 4, off);
      std::memcpy(xb.data(), x.data(), n * 4);
      std::vector<float> want = x;
      ref::gelu(want.data(), n);
      avx2::gelu(xb.as<float>(), n);
      for (int64_t i = 0; i < n; ++i) {
        const double got = xb.as<float>()[i], v = x[i];
        if (std::isinf(v)) {
          ASSERT_EQ(std::isnan(got), std::isnan(want[i])) << v;
          if (!std::isnan(got)) {
            ASSERT_EQ(got, want[i]) << v;
          }
          continue;
        }
        const double t = std::sqrt(2.0 / std::numbers::pi) * (v + 0.044715 * v * v * v);
        const double exact = v / (1.0 + std::exp(-2.0 * t));
        const double rel = (5 + 8 * std::fabs(t)) * kEpsF32 * std::fabs(exact);
        ASSERT_NEAR(got, exact, rel + 1e-30) << v;
        ASSERT_NEAR(got, want[i], 4 * kEpsF32 * std::fabs(v) + 2 * rel + 1e-30) << v;
      }
    }
}

// rope_rotate: the same double multiplies and adds as ref (and as the definition, rope()), so
// both variants equal rope() bit for bit: both modes, half-dims with and without a 4-pair tail,
// partial rotation (n_dims < head_dim), negative positions (the cache's context shift), every
// f32 offset.
TEST(Avx2Elementwise, RopeRotateEqualsRopeBitForBit) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(107);
  const std::vector<std::pair<int64_t, int64_t>> dims = {{64, 64}, {128, 64}, {8, 4}, {6, 6},
                                                         {10, 10}, {18, 14},  {2, 2}, {96, 96},
                                                         {80, 80}, {64, 32},  {24, 8}};
  for (RopeMode mode : {RopeMode::Normal, RopeMode::Neox})
    for (auto [head_dim, n_dims] : dims)
      for (int64_t pos : {0, 1, 17, 4095, 100000, -37})
        for (int64_t n_head : {1, 3}) {
          const size_t off = static_cast<size_t>(4 * ((head_dim + pos + n_head) & 7));
          const std::vector<float> x = random_floats(rng, n_head * head_dim, 1.0f);
          std::vector<double> inv_freq(n_dims / 2), cs(n_dims);
          rope_freqs(n_dims, 10000.0f, inv_freq.data());
          rope_cos_sin(inv_freq.data(), n_dims / 2, pos, cs.data());
          std::vector<float> want = x, got_ref = x;
          rope(want.data(), n_head, head_dim, n_dims, pos, 10000.0f, mode);
          ref::rope_rotate(got_ref.data(), n_head, head_dim, n_dims, cs.data(), mode);
          Buffer xb(x.size() * 4, off);
          std::memcpy(xb.data(), x.data(), x.size() * 4);
          avx2::rope_rotate(xb.as<float>(), n_head, head_dim, n_dims, cs.data(), mode);
          for (size_t i = 0; i < x.size(); ++i) {
            ASSERT_EQ(bits_of(got_ref[i]), bits_of(want[i])) << head_dim << " " << pos << " " << i;
            ASSERT_EQ(bits_of(xb.as<float>()[i]), bits_of(want[i]))
                << head_dim << " " << n_dims << " " << pos << " " << i;
          }
        }
}

// The dispatched element-wise entry points are the chosen variant's, exactly.
TEST(Avx2Elementwise, PublicEntryPointsUseTheChosenVariant) {
  std::mt19937 rng(108);
  const bool fast = std::strncmp(kernels_backend(), "avx2", 4) == 0;  // avx2, avx2-vnni or avx2-amx
  const int64_t n = 45;
  const std::vector<float> x = random_floats(rng, n, 2.0f), w = random_floats(rng, n, 1.0f),
                           b = random_floats(rng, n, 1.0f);
  auto same = [&](const std::vector<float>& a, const std::vector<float>& c, const char* what) {
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(bits_of(a[i]), bits_of(c[i])) << what << " " << i;
  };
  std::vector<float> a(n), c(n);
  rms_norm(x.data(), w.data(), a.data(), n, 1e-6f);
  (fast ? avx2::rms_norm : ref::rms_norm)(x.data(), w.data(), c.data(), n, 1e-6f);
  same(a, c, "rms_norm");
  layer_norm(x.data(), w.data(), b.data(), a.data(), n, 1e-6f);
  (fast ? avx2::layer_norm : ref::layer_norm)(x.data(), w.data(), b.data(), c.data(), n, 1e-6f);
  same(a, c, "layer_norm");
  a = x, c = x;
  softmax(a.data(), n);
  (fast ? avx2::softmax : ref::softmax)(c.data(), n);
  same(a, c, "softmax");
  a = x, c = x;
  swiglu(a.data(), w.data(), n);
  (fast ? avx2::swiglu : ref::swiglu)(c.data(), w.data(), n);
  same(a, c, "swiglu");
  a = x, c = x;
  gelu(a.data(), n);
  (fast ? avx2::gelu : ref::gelu)(c.data(), n);
  same(a, c, "gelu");
}

}  // namespace
}  // namespace kvlm::kernels
