// Scalar reference kernels: (de)quantization against goldens from the `gguf` Python package
// (tools/gen_dequant_goldens.py), matmul against a double-precision naive product, and the
// row-wise ops against double-precision formulas. Tolerances are stated beside each check.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/thread_pool.h"
#include "kernels/act_blocks.h"
#include "kernels/ops.h"
#include "tensor/dtype.h"
#include "tensor/tensor.h"
#include "kernels/random_blocks.h"
#include "kernels/ref/ref.h"
#include "test_util.h"

namespace kvlm::kernels {
namespace {

constexpr double kEpsF32 = 0x1p-24;  // unit roundoff of f32 (half an ulp of 1)

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

std::vector<float> random_floats(std::mt19937& rng, int64_t n, float scale) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& f : v) f = dist(rng);
  return v;
}

// ---- goldens ------------------------------------------------------------------------------------

// One record of tests/data/dequant_goldens.bin; the format is documented in the generator.
struct Golden {
  enum Kind : uint32_t { kDequantize = 0, kQuantize = 1, kLayout = 2 };
  Kind kind;
  std::string name;
  DType type;
  int64_t n;
  std::vector<uint8_t> raw;   // [row_bytes(type, n)]
  std::vector<float> values;  // [n]
};

std::vector<Golden> load_goldens() {
  const std::string path = test::data_path("dequant_goldens.bin");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot open; run tools/gen_dequant_goldens.py");
  auto u32 = [&] {
    uint32_t v = 0;
    f.read(reinterpret_cast<char*>(&v), 4);  // little-endian host assumed (x86-64, aarch64)
    return v;
  };
  char magic[4];
  f.read(magic, 4);
  if (std::memcmp(magic, "KVDG", 4) != 0 || u32() != 1) throw Error(path + ": not a v1 file");
  std::vector<Golden> out(u32());
  for (Golden& g : out) {
    g.kind = static_cast<Golden::Kind>(u32());
    g.name.resize(u32());
    f.read(g.name.data(), static_cast<std::streamsize>(g.name.size()));
    g.type = static_cast<DType>(u32());
    g.n = u32();
    g.raw.resize(u32());
    f.read(reinterpret_cast<char*>(g.raw.data()), static_cast<std::streamsize>(g.raw.size()));
    g.values.resize(static_cast<size_t>(g.n));
    f.read(reinterpret_cast<char*>(g.values.data()), g.n * 4);
    if (!f) throw Error(path + ": truncated at record '" + g.name + "'");
    if (g.kind == Golden::kLayout) continue;  // checked by Goldens.LayoutOfEveryGgufType
    if (dtype_info(static_cast<uint32_t>(g.type)) == nullptr ||
        g.raw.size() != row_bytes(g.type, g.n))
      throw Error(path + ": record '" + g.name + "' has an inconsistent type or size");
  }
  return out;
}

// Every type kvlm computes with (DTypeInfo::compute) has a dequantize golden of real-looking
// data, and every block type one of hostile blocks (tools/gen_dequant_goldens.py: zero, subnormal,
// extreme, inf and NaN f16 scales, extreme sub-block scales), whose values include NaN and inf.
TEST(Goldens, CoverEveryComputeType) {
  const std::vector<Golden> goldens = load_goldens();
  const std::vector<DType> types = test::compute_types();
  // F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K .. Q6_K, IQ4_NL, IQ4_XS
  EXPECT_EQ(types.size(), 15u);
  for (DType t : types) {
    bool real = false, hostile = false;
    for (const Golden& g : goldens) {
      if (g.type != t || g.kind != Golden::kDequantize) continue;
      (g.name.starts_with("hostile/") ? hostile : real) = true;
    }
    EXPECT_TRUE(real) << dtype_name(t);
    EXPECT_TRUE(hostile) << dtype_name(t);
  }
  int n_nan = 0, n_inf = 0;
  for (const Golden& g : goldens)
    for (float v : g.values) {
      n_nan += std::isnan(v);
      n_inf += std::isinf(v);
    }
  EXPECT_GT(n_nan, 1000);
  EXPECT_GT(n_inf, 1000);
}

// kvlm knows every type gguf does (so it parses, and `kvlm inspect` lists, any file gguf
// writes), under the same name, with the same block size and bytes per block.
TEST(Goldens, LayoutOfEveryGgufType) {
  int n_checked = 0;
  for (const Golden& g : load_goldens()) {
    if (g.kind != Golden::kLayout) continue;
    const DTypeInfo* info = dtype_info(static_cast<uint32_t>(g.type));
    ASSERT_NE(info, nullptr) << g.name << " (GGML type " << static_cast<uint32_t>(g.type) << ")";
    EXPECT_EQ(dtype_from_name(g.name), g.type) << g.name;
    EXPECT_EQ(info->block_size, g.n) << g.name;
    EXPECT_EQ(info->type_size, static_cast<int64_t>(g.raw.size())) << g.name;
    ++n_checked;
  }
  EXPECT_GE(n_checked, 30);
}

// Bit-exact: kvlm and gguf evaluate the same f32 formula operation for operation (no FMA), so
// no tolerance is needed, and -0 vs +0 is checked too. A NaN must be a NaN (its payload may
// differ: numpy and C may quiet a signalling NaN differently).
TEST(Goldens, DequantizeBitExact) {
  int n_checked = 0;
  for (const Golden& g : load_goldens()) {
    if (g.kind != Golden::kDequantize) continue;
    std::vector<float> y(static_cast<size_t>(g.n), -12345.0f);
    dequantize_row(g.type, g.raw.data(), y.data(), g.n);
    int64_t n_bad = 0;
    for (int64_t i = 0; i < g.n; ++i) {
      const bool same = std::isnan(g.values[i]) ? std::isnan(y[i])
                                                : bits_of(y[i]) == bits_of(g.values[i]);
      if (!same && n_bad++ < 5)
        ADD_FAILURE() << g.name << " [" << i << "]: kvlm " << y[i] << " gguf " << g.values[i];
    }
    EXPECT_EQ(n_bad, 0) << g.name;
    ++n_checked;
  }
  EXPECT_GE(n_checked, 50);
}

TEST(Goldens, QuantizeBytesEqual) {
  int n_checked = 0;
  for (const Golden& g : load_goldens()) {
    if (g.kind != Golden::kQuantize) continue;
    std::vector<uint8_t> q(g.raw.size(), 0xcd);
    quantize_row(g.type, g.values.data(), q.data(), g.n);
    int64_t n_bad = 0;
    for (size_t i = 0; i < q.size(); ++i) {
      if (q[i] != g.raw[i] && n_bad++ < 5)
        ADD_FAILURE() << g.name << " byte " << i << ": kvlm " << int(q[i]) << " gguf "
                      << int(g.raw[i]);
    }
    EXPECT_EQ(n_bad, 0) << g.name;
    ++n_checked;
  }
  EXPECT_GE(n_checked, 12);
}

TEST(Quantization, UnsupportedTypesThrow) {
  std::vector<uint8_t> raw(1024);
  std::vector<float> f(256);
  EXPECT_THROW(dequantize_row(DType::IQ2_XXS, raw.data(), f.data(), 256), Error);
  EXPECT_THROW(dequantize_row(DType::Q8_K, raw.data(), f.data(), 256), Error);
  EXPECT_THROW(quantize_row(DType::Q6_K, f.data(), raw.data(), 256), Error);
  EXPECT_THROW(quantize_row(DType::Q5_1, f.data(), raw.data(), 32), Error);
  ThreadPool pool(1);
  TensorView w{DType::IQ3_S, raw.data(), 1, 256, 110};
  std::vector<float> y(1);
  EXPECT_THROW(matmul(w, f.data(), y.data(), 1, pool), Error);
}

// Largest error of rounding v to f16 (half an ulp), for |v| below f16's overflow threshold.
double f16_err(double v) {
  return std::max(std::fabs(v) * 0x1p-11, 0x1p-25);
}

// Largest |x - dequantize(quantize(x))| for x in a 32-element block with max |.| amax, min mn and
// max mx: the quantizer's half step (or the Q4_0 clamp step) plus the f16 rounding of the stored
// scale (times the largest code) and min.
double round_trip_bound(DType t, float x, double amax, double mn, double mx) {
  switch (t) {
    case DType::F32:
      return 0;
    case DType::F16:
      return f16_err(x);
    case DType::BF16:
      return std::fabs(x) * 0x1p-8;  // half an ulp; no bf16 subnormals at these scales
    case DType::Q8_0:                // step d = amax / 127, codes up to 127
      return amax / 127.0 / 2 + 127 * f16_err(amax / 127.0);
    case DType::Q4_0:  // step d = amax / 8; the far end clamps at code 15, a full step short
      return amax / 8.0 + 8 * f16_err(amax / 8.0);
    case DType::Q4_1: {  // step d = (max - min) / 15, codes up to 15, plus m's rounding
      const double d = (mx - mn) / 15.0;
      return d / 2 + 15 * f16_err(d) + f16_err(mn);
    }
    default:
      return NAN;
  }
}

// Round-trip error within round_trip_bound, per block, for random data of several scales.
TEST(Quantization, RoundTripBounds) {
  std::mt19937 rng(7);
  constexpr int64_t n = 1024;
  for (float scale : {1e-3f, 1.0f, 300.0f}) {
    for (int rep = 0; rep < 10; ++rep) {
      std::vector<float> x = random_floats(rng, n, scale);
      if (rep == 0) std::fill(x.begin(), x.begin() + 32, 0.0f);  // a zero block round-trips
      for (DType t : {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1}) {
        std::vector<uint8_t> q(row_bytes(t, n));
        std::vector<float> y(n);
        quantize_row(t, x.data(), q.data(), n);
        dequantize_row(t, q.data(), y.data(), n);
        for (int64_t b = 0; b < n / 32; ++b) {
          const float* xb = x.data() + b * 32;
          float amax = 0, mn = xb[0], mx = xb[0];
          for (int j = 0; j < 32; ++j) {
            amax = std::max(amax, std::fabs(xb[j]));
            mn = std::min(mn, xb[j]);
            mx = std::max(mx, xb[j]);
          }
          for (int j = 0; j < 32; ++j) {
            const double err = std::fabs(double(xb[j]) - y[b * 32 + j]);
            const double bound = round_trip_bound(t, xb[j], amax, mn, mx);
            ASSERT_LE(err, bound * (1 + 1e-5) + 1e-30)
                << dtype_name(t) << " scale " << scale << " block " << b << " j " << j;
          }
        }
      }
    }
  }
}

// ---- matmul -------------------------------------------------------------------------------------

// A weight matrix of type t, [n_rows, n_cols], rows row_stride bytes apart (>= row_bytes, padded
// to test that matmul honours the stride), plus its exact f32 value (dequantized).
struct Weights {
  DType type;
  int64_t n_rows, n_cols;
  size_t row_stride;
  std::vector<uint8_t> raw;   // [n_rows * row_stride]
  std::vector<float> values;  // [n_rows, n_cols]
  TensorView view() const { return {type, raw.data(), n_rows, n_cols, row_stride}; }
};

// The types quantize_row writes (ops.h).
bool quantizable(DType t) {
  for (DType q : {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1})
    if (t == q) return true;
  return false;
}

Weights make_weights(DType t, int64_t n_rows, int64_t n_cols, std::mt19937& rng, size_t pad) {
  Weights w{t, n_rows, n_cols, row_bytes(t, n_cols) + pad, {}, {}};
  w.raw.assign(static_cast<size_t>(n_rows) * w.row_stride, 0);
  w.values.resize(static_cast<size_t>(n_rows * n_cols));
  for (int64_t r = 0; r < n_rows; ++r) {
    uint8_t* row = w.raw.data() + r * w.row_stride;
    if (!quantizable(t)) {
      // No quantizer: random codes and sub-scales under small f16 scales.
      test::random_block_row(t, n_cols, rng, row);
    } else {
      std::vector<float> src = random_floats(rng, n_cols, 0.5f);
      quantize_row(t, src.data(), row, n_cols);
    }
    dequantize_row(t, row, w.values.data() + r * n_cols, n_cols);
  }
  return w;
}

// y = x W^T with every product and sum in double; also sum |w x|, which scales the f32 error.
void naive_matmul(const Weights& w, const float* x, int64_t n_tok, std::vector<double>* y,
                  std::vector<double>* y_abs) {
  y->assign(static_cast<size_t>(n_tok * w.n_rows), 0.0);
  y_abs->assign(y->size(), 0.0);
  for (int64_t i = 0; i < n_tok; ++i)
    for (int64_t r = 0; r < w.n_rows; ++r) {
      double s = 0, sa = 0;
      for (int64_t c = 0; c < w.n_cols; ++c) {
        const double p = double(w.values[r * w.n_cols + c]) * x[i * w.n_cols + c];
        s += p;
        sa += std::fabs(p);
      }
      (*y)[i * w.n_rows + r] = s;
      (*y_abs)[i * w.n_rows + r] = sa;
    }
}

// Q4_0/Q4_1/Q8_0 weights multiply 8-bit activations (llama.cpp's vec_dot_type path): the reference
// then multiplies by the activations as the kernel quantized them (Q8_0 codes and scales; Q8_1
// has the same ones; the K types' Q8_K super-blocks), so the comparison still isolates the dot's arithmetic. That is
// ref::quant_act_q8_0's rounding (127 / amax, ties to even), which every variant reproduces bit for
// bit, not quantize_row's (1 / d, ties away from zero): the two differ in a code now and then,
// and one code is far outside the dot's rounding bound.
std::vector<float> quantized_activations(DType t, const std::vector<float>& x) {
  if (act_type(t) == DType::F32) return x;
  const int64_t n = static_cast<int64_t>(x.size());
  if (act_type(t) == DType::Q8_K) {  // the K types: super-blocks of 256 (ref::quant_act_q8_k)
    std::vector<BlockQ8_K> q(static_cast<size_t>(n / 256));
    ref::quant_act_q8_k(x.data(), q.data(), n / 256);
    std::vector<float> out(x.size());
    for (int64_t e = 0; e < n; ++e) out[e] = q[e / 256].d * q[e / 256].qs[e % 256];
    return out;
  }
  std::vector<BlockQ8_0> q(static_cast<size_t>(n / kQK8_0));
  ref::quant_act_q8_0(x.data(), q.data(), n / kQK8_0);
  std::vector<float> out(x.size());
  dequantize_row(DType::Q8_0, q.data(), out.data(), n);
  return out;
}

struct MatmulCase {
  DType type;
  std::vector<int64_t> n_cols;
};

const std::vector<MatmulCase>& matmul_cases() {
  static const std::vector<MatmulCase> cases = {
      {DType::F32, {7, 32, 33, 96, 576}},  // plain types: any width, including lane tails
      {DType::F16, {5, 32, 64, 576}},     {DType::BF16, {32, 47, 576}},
      {DType::Q4_0, {32, 64, 96, 576}},   {DType::Q4_1, {32, 64, 96, 576}},
      {DType::Q8_0, {32, 64, 96, 576}},   {DType::Q5_0, {32, 96, 576}},
      {DType::Q5_1, {32, 96, 576}},       {DType::IQ4_NL, {32, 96, 576}},
      {DType::Q2_K, {256, 512}},          {DType::Q3_K, {256, 512}},
      {DType::Q4_K, {256, 512}},          {DType::Q5_K, {256, 512}},
      {DType::Q6_K, {256, 512}},          {DType::IQ4_XS, {256, 512}},
  };
  return cases;
}

// f32 error of the dots, to first order: ref's dot_f32 (16 lanes of ceil(n/16) terms, a 4-level
// fold, each product rounded) <= (ceil(n/16) + 5) * 2^-24 * sum |w x|; the avx2 variants' (32 FMA
// lanes of ceil(n/32) + 1 terms, a 5-level fold) <= (ceil(n/32) + 6) * 2^-24 * sum |w x|; the
// quantized-activation dots (one rounded term per 32-block, nb + 2 roundings) are within either.
// Whichever variant the dispatcher chose, 2x the larger covers the second-order terms. The
// reference uses the same dequantized weights (and activations), so quantization error is not in
// play. q8_1_term: for Q4_1 weights, max|w| of the row times sum|x| of the token. The m * s term
// uses s = d * sum(q) rounded to f16 (relative error 2^-11), and |m| <= max|w| of its block.
double matmul_tolerance(int64_t n_cols, double sum_abs, double q8_1_term = 0.0) {
  const double n_round = std::max((n_cols + 15) / 16 + 5, (n_cols + 31) / 32 + 6);
  return 2.0 * n_round * kEpsF32 * sum_abs + 0x1p-11 * q8_1_term + 1e-30;
}

// The dispatched matmul of w with n_tok tokens of x on `pool`, against the double-precision
// product of the dequantized weights and the activations as the kernel sees them (quantized to
// 8 bits for Q4_0/Q4_1/Q8_0), within matmul_tolerance. Stops at the first element out of bounds.
void expect_matmul_near(const Weights& w, const std::vector<float>& x, int64_t n_tok,
                        ThreadPool& pool) {
  const int64_t n_rows = w.n_rows, n_cols = w.n_cols;
  std::vector<double> ref, ref_abs;
  const std::vector<float> xq = quantized_activations(w.type, x);
  naive_matmul(w, xq.data(), n_tok, &ref, &ref_abs);
  std::vector<double> q8_1_terms(ref.size(), 0.0);
  if (act_type(w.type) == DType::Q8_1) {  // Q4_1, Q5_1
    for (int64_t i = 0; i < n_tok; ++i)
      for (int64_t r = 0; r < n_rows; ++r) {
        double wmax = 0, xsum = 0;
        for (int64_t c = 0; c < n_cols; ++c) {
          wmax = std::max(wmax, std::fabs(double(w.values[r * n_cols + c])));
          xsum += std::fabs(double(xq[i * n_cols + c]));
        }
        q8_1_terms[i * n_rows + r] = wmax * xsum;
      }
  }
  // The packed K types multiply integers (ref::dot_k_q8_k), not the dequantized weights, whose
  // d * sc and (d sc) q - dmin m are rounded: up to 3 roundings of |d sc q| + |dmin m| per weight
  // (beyond |w|, which the subtraction can cancel), times |x|.
  std::vector<double> k_terms(ref.size(), 0.0);
  if (ref::k_packed_type(w.type)) {
    const size_t sb = row_bytes(w.type, kQK_K);
    for (int64_t r = 0; r < n_rows; ++r)
      for (int64_t c0 = 0; c0 < n_cols; c0 += kQK_K) {
        ref::KInts k;
        ref::k_block_ints(w.type, w.raw.data() + r * w.row_stride + c0 / kQK_K * sb, &k);
        for (int e = 0; e < kQK_K; ++e) {
          const double a = std::fabs(double(fp16_to_fp32(k.d)) * k.sc[e / 16] * k.q[e]) +
                           std::fabs(double(fp16_to_fp32(k.dmin)) * k.m[e / 16]);
          for (int64_t i = 0; i < n_tok; ++i)
            k_terms[i * n_rows + r] += a * std::fabs(double(xq[i * n_cols + c0 + e]));
        }
      }
  }
  std::vector<float> y(static_cast<size_t>(n_tok * n_rows), NAN);
  matmul(w.view(), x.data(), y.data(), n_tok, pool);
  for (size_t k = 0; k < y.size(); ++k)
    ASSERT_NEAR(y[k], ref[k],
                matmul_tolerance(n_cols, ref_abs[k], q8_1_terms[k]) + 4 * kEpsF32 * k_terms[k])
        << dtype_name(w.type) << " " << n_rows << "x" << n_cols << " n_tok " << n_tok
        << " threads " << pool.size() << " element " << k << " (kernels " << kernels_backend()
        << ")";
}

TEST(Matmul, MatchesDoubleReference) {
  std::mt19937 rng(42);
  ThreadPool pool1(1), pool2(2);
  for (const MatmulCase& mc : matmul_cases()) {
    for (int64_t n_cols : mc.n_cols) {
      for (int64_t n_rows : {1, 3, 17, 33}) {
        const Weights w = make_weights(mc.type, n_rows, n_cols, rng, n_rows % 2 ? 0 : 4);
        for (int64_t n_tok = 1; n_tok <= 7; ++n_tok) {
          const std::vector<float> x = random_floats(rng, n_tok * n_cols, 1.0f);
          for (ThreadPool* pool : {&pool1, &pool2})
            ASSERT_NO_FATAL_FAILURE(expect_matmul_near(w, x, n_tok, *pool));
        }
      }
    }
  }
}

// Every type kvlm computes with, through the dispatched matmul (tests/kernels/CMakeLists.txt runs
// this file under each KVLM_KERNELS variant): 1 to 70 tokens (decode, the fast variants' 1-4
// token kernels, whole 16-token tiles and their rests, more than one 64-token chunk), odd row
// counts (partial 8-row groups and row tiles), rows padded or not, 1 and 2 threads.
TEST(Matmul, EveryTypeOneTo70Tokens) {
  std::mt19937 rng(70);
  ThreadPool pool1(1), pool2(2);
  const std::vector<DType> types = test::compute_types();
  ASSERT_EQ(types.size(), 15u);
  for (DType t : types) {
    const int64_t bs = dtype_info(t).block_size;
    const int64_t n_cols = bs == 1 ? 77 : bs == 32 ? 96 : 512;
    for (int64_t n_rows : {5, 37}) {
      const Weights w = make_weights(t, n_rows, n_cols, rng, n_rows == 5 ? 4 : 0);
      for (int64_t n_tok = 1; n_tok <= 70; ++n_tok) {
        const std::vector<float> x = random_floats(rng, n_tok * n_cols, 1.0f);
        for (ThreadPool* pool : {&pool1, &pool2})
          ASSERT_NO_FATAL_FAILURE(expect_matmul_near(w, x, n_tok, *pool));
      }
    }
  }
}

// The cached-vs-recomputed equivalence relies on y[i, r] not depending on n_tok, the thread
// count, or which rows share a chunk; and dot_row must be the same arithmetic. All bitwise.
TEST(Matmul, BatchThreadsAndDotRowBitIdentical) {
  std::mt19937 rng(3);
  ThreadPool pool1(1), pool2(2);
  for (const MatmulCase& mc : matmul_cases()) {
    const int64_t n_cols = mc.n_cols.back();
    const int64_t n_rows = 37, n_tok = 7;
    const Weights w = make_weights(mc.type, n_rows, n_cols, rng, 0);
    const std::vector<float> x = random_floats(rng, n_tok * n_cols, 1.0f);
    std::vector<float> batch(n_tok * n_rows), batch2(n_tok * n_rows);
    matmul(w.view(), x.data(), batch.data(), n_tok, pool1);
    matmul(w.view(), x.data(), batch2.data(), n_tok, pool2);
    for (int64_t i = 0; i < n_tok; ++i) {
      std::vector<float> single(n_rows);
      matmul(w.view(), x.data() + i * n_cols, single.data(), 1, i % 2 ? pool1 : pool2);
      // A view starting at row 5 shifts every chunk and tile boundary.
      TensorView tail = w.view();
      tail.data = w.raw.data() + 5 * w.row_stride;
      tail.n_rows = n_rows - 5;
      std::vector<float> shifted(n_rows - 5);
      matmul(tail, x.data() + i * n_cols, shifted.data(), 1, pool2);
      for (int64_t r = 0; r < n_rows; ++r) {
        const float b = batch[i * n_rows + r];
        const float d =
            dot_row(mc.type, w.raw.data() + r * w.row_stride, x.data() + i * n_cols, n_cols);
        ASSERT_EQ(bits_of(b), bits_of(batch2[i * n_rows + r])) << dtype_name(mc.type);
        ASSERT_EQ(bits_of(b), bits_of(single[r])) << dtype_name(mc.type) << " r " << r;
        ASSERT_EQ(bits_of(b), bits_of(d)) << dtype_name(mc.type) << " r " << r;
        if (r >= 5) {
          ASSERT_EQ(bits_of(b), bits_of(shifted[r - 5])) << dtype_name(mc.type);
        }
      }
    }
  }
}

TEST(Matmul, EmptyShapesAreNoOps) {
  ThreadPool pool(2);
  std::vector<float> w(64, 1.0f), x(64, 1.0f), y(4, 7.0f);
  matmul({DType::F32, w.data(), 2, 32, 128}, x.data(), y.data(), 0, pool);
  matmul({DType::F32, w.data(), 0, 32, 128}, x.data(), y.data(), 2, pool);
  for (float v : y) EXPECT_EQ(v, 7.0f);
}

// ---- norms, activations -------------------------------------------------------------------------

// rms_norm: scale is rounded once from double, then two f32 multiplies: <= 3 half-ulps. 4 allowed.
TEST(Ops, RmsNormMatchesDouble) {
  std::mt19937 rng(11);
  for (int64_t n : {1, 7, 576, 4096}) {
    const std::vector<float> x = random_floats(rng, n, 3.0f);
    const std::vector<float> w = random_floats(rng, n, 1.0f);
    const float eps = 1e-5f;
    double ss = 0;
    for (float v : x) ss += double(v) * v;
    const double scale = 1.0 / std::sqrt(ss / n + eps);
    std::vector<float> y(n);
    rms_norm(x.data(), w.data(), y.data(), n, eps);
    std::vector<float> inplace = x;
    rms_norm(inplace.data(), w.data(), inplace.data(), n, eps);
    for (int64_t i = 0; i < n; ++i) {
      const double ref = x[i] * scale * w[i];
      ASSERT_NEAR(y[i], ref, 4 * kEpsF32 * std::fabs(ref)) << n << " " << i;
      ASSERT_EQ(bits_of(inplace[i]), bits_of(y[i]));
    }
  }
}

// layer_norm: (x - mean) * scale rounded once, times w, plus b: <= 3 half-ulps of each term's
// magnitude; 4 allowed relative to |t w| + |b|.
TEST(Ops, LayerNormMatchesDouble) {
  std::mt19937 rng(12);
  for (int64_t n : {2, 33, 768}) {
    std::vector<float> x = random_floats(rng, n, 2.0f);
    for (auto& v : x) v += 100.0f;  // a large mean must not cost precision (two-pass variance)
    const std::vector<float> w = random_floats(rng, n, 1.0f);
    const std::vector<float> b = random_floats(rng, n, 1.0f);
    const float eps = 1e-5f;
    double mean = 0;
    for (float v : x) mean += v;
    mean /= n;
    double var = 0;
    for (float v : x) var += (v - mean) * (v - mean);
    var /= n;
    std::vector<float> y(n);
    layer_norm(x.data(), w.data(), b.data(), y.data(), n, eps);
    std::vector<float> inplace = x;
    layer_norm(inplace.data(), w.data(), b.data(), inplace.data(), n, eps);
    for (int64_t i = 0; i < n; ++i) {
      const double t = (x[i] - mean) / std::sqrt(var + eps) * w[i];
      ASSERT_NEAR(y[i], t + b[i], 4 * kEpsF32 * (std::fabs(t) + std::fabs(b[i]))) << i;
      ASSERT_EQ(bits_of(inplace[i]), bits_of(y[i]));
    }
  }
}

// softmax: x - max is rounded (absolute error <= 2^-24 |x - max|, which exp turns into that much
// relative error), expf adds ~1 ulp, then one multiply by the rounded 1/sum.
TEST(Ops, SoftmaxMatchesDoubleAndSumsToOne) {
  std::mt19937 rng(13);
  for (int64_t n : {1, 5, 100, 4096}) {
    std::vector<float> x = random_floats(rng, n, 4.0f);
    std::vector<float> y = x;
    softmax(y.data(), n);
    double mx = x[0], sum = 0, got = 0;
    for (float v : x) mx = std::max<double>(mx, v);
    for (float v : x) sum += std::exp(v - mx);
    for (int64_t i = 0; i < n; ++i) {
      const double ref = std::exp(x[i] - mx) / sum;
      ASSERT_NEAR(y[i], ref, (std::fabs(x[i] - mx) + 6) * kEpsF32 * ref) << i;
      got += y[i];
    }
    EXPECT_NEAR(got, 1.0, 1e-6);
  }
}

TEST(Ops, SoftmaxStableWithLargeInputs) {
  std::vector<float> x = {1e4f, 1e4f - 1.0f, -1e30f, 3e38f, 3e38f, -INFINITY};
  softmax(x.data(), static_cast<int64_t>(x.size()));
  for (float v : x) EXPECT_TRUE(std::isfinite(v));
  EXPECT_FLOAT_EQ(x[3], 0.5f);
  EXPECT_FLOAT_EQ(x[4], 0.5f);
  EXPECT_EQ(x[0], 0.0f);
  EXPECT_EQ(x[5], 0.0f);
  std::vector<float> big = {1000.0f, 999.0f};  // exp(1000) overflows unless max-subtracted
  softmax(big.data(), 2);
  EXPECT_NEAR(big[0], 1.0 / (1.0 + std::exp(-1.0)), 1e-7);
}

std::vector<float> activation_inputs() {
  std::vector<float> v;
  for (int i = -2000; i <= 2000; ++i) v.push_back(i * 0.005f);  // [-10, 10] densely
  for (float f : {-100.0f, -88.0f, -87.0f, -30.0f, 30.0f, 88.0f, 100.0f, 1e-20f, -1e-20f, 0.0f})
    v.push_back(f);
  return v;
}

// gelu: tanhf and the polynomial are a few ulps; near the negative tail 1 + tanh cancels, so the
// error is absolute: 1e-6 * max(1, |x|) (the f32 ulp of 1 is 1.2e-7).
TEST(Ops, GeluMatchesDouble) {
  const std::vector<float> x = activation_inputs();
  std::vector<float> y = x;
  gelu(y.data(), static_cast<int64_t>(y.size()));
  for (size_t i = 0; i < x.size(); ++i) {
    const double v = x[i];
    const double ref =
        0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / std::numbers::pi) * (v + 0.044715 * v * v * v)));
    ASSERT_NEAR(y[i], ref, 1e-6 * std::max(1.0, std::fabs(v))) << v;
  }
}

// swiglu: expf, one add, one divide, one multiply: a few ulps; 8 * 2^-24 relative allowed, plus
// an absolute 1e-30 for the far negative tail that underflows to 0.
TEST(Ops, SwigluMatchesDouble) {
  const std::vector<float> g = activation_inputs();
  std::mt19937 rng(14);
  const std::vector<float> u = random_floats(rng, static_cast<int64_t>(g.size()), 2.0f);
  std::vector<float> y = g;
  swiglu(y.data(), u.data(), static_cast<int64_t>(y.size()));
  for (size_t i = 0; i < g.size(); ++i) {
    const double ref = double(g[i]) / (1.0 + std::exp(-double(g[i]))) * u[i];
    ASSERT_NEAR(y[i], ref, 8 * kEpsF32 * std::fabs(ref) + 1e-30) << g[i];
  }
}

TEST(Ops, AddIsExact) {
  std::vector<float> y = {1.0f, -2.0f, 0.5f}, x = {0.25f, 2.0f, 1e-8f};
  add(y.data(), x.data(), 3);
  EXPECT_EQ(y[0], 1.25f);
  EXPECT_EQ(y[1], 0.0f);
  EXPECT_EQ(y[2], 0.5f + 1e-8f);
}

// ---- rope ---------------------------------------------------------------------------------------

// Pair indices of pair i in a head for each mode.
std::pair<int64_t, int64_t> rope_pair(RopeMode mode, int64_t i, int64_t n_dims) {
  return mode == RopeMode::Normal ? std::make_pair(2 * i, 2 * i + 1)
                                  : std::make_pair(i, i + n_dims / 2);
}

// The whole rotation in double, written from the definition. kvlm also works in double and
// rounds each output once, so 1 ulp of the pair's magnitude is allowed.
TEST(Rope, MatchesDoubleReference) {
  std::mt19937 rng(15);
  for (RopeMode mode : {RopeMode::Normal, RopeMode::Neox}) {
    for (auto [head_dim, n_dims] : {std::pair<int64_t, int64_t>{64, 64}, {128, 64}, {8, 4}}) {
      for (int64_t pos : {0, 1, 17, 4095, 100000}) {
        const int64_t n_head = 3;
        const float base = 10000.0f;
        const std::vector<float> x = random_floats(rng, n_head * head_dim, 1.0f);
        std::vector<float> y = x;
        rope(y.data(), n_head, head_dim, n_dims, pos, base, mode);
        for (int64_t h = 0; h < n_head; ++h) {
          const float* xh = x.data() + h * head_dim;
          const float* yh = y.data() + h * head_dim;
          for (int64_t i = 0; i < n_dims / 2; ++i) {
            const double theta = pos * std::pow(double(base), -2.0 * i / n_dims);
            const auto [i0, i1] = rope_pair(mode, i, n_dims);
            const double a = xh[i0], b = xh[i1];
            const double r0 = a * std::cos(theta) - b * std::sin(theta);
            const double r1 = a * std::sin(theta) + b * std::cos(theta);
            const double tol = 2 * kEpsF32 * std::hypot(a, b);
            ASSERT_NEAR(yh[i0], r0, tol) << pos << " " << i;
            ASSERT_NEAR(yh[i1], r1, tol) << pos << " " << i;
            // A rotation preserves each pair's length (to the two output roundings).
            ASSERT_NEAR(std::hypot(double(yh[i0]), double(yh[i1])), std::hypot(a, b),
                        4 * kEpsF32 * std::hypot(a, b));
          }
          for (int64_t d = n_dims; d < head_dim; ++d)  // dims past n_dims are untouched
            ASSERT_EQ(bits_of(yh[d]), bits_of(xh[d]));
        }
        if (pos == 0) {
          for (size_t k = 0; k < x.size(); ++k) ASSERT_EQ(y[k], x[k]);  // identity
        }
      }
    }
  }
}

// The forward pass's path: tables once (rope_freqs, rope_cos_sin), then the dispatched rotation
// for every head. Equals the definition bit for bit, negative positions (context shift) included.
TEST(Rope, TablesAndRotateEqualRope) {
  std::mt19937 rng(18);
  for (RopeMode mode : {RopeMode::Normal, RopeMode::Neox})
    for (auto [head_dim, n_dims] : {std::pair<int64_t, int64_t>{64, 64}, {128, 64}, {10, 10}})
      for (int64_t pos : {0, 3, 4095, 100000, -12}) {
        const int64_t n_head = 3;
        const std::vector<float> x = random_floats(rng, n_head * head_dim, 1.0f);
        std::vector<double> inv_freq(n_dims / 2), cs(n_dims);
        rope_freqs(n_dims, 500000.0f, inv_freq.data());
        rope_cos_sin(inv_freq.data(), n_dims / 2, pos, cs.data());
        std::vector<float> want = x, got = x;
        rope(want.data(), n_head, head_dim, n_dims, pos, 500000.0f, mode);
        rope_rotate(got.data(), n_head, head_dim, n_dims, cs.data(), mode);
        for (size_t k = 0; k < x.size(); ++k) ASSERT_EQ(bits_of(got[k]), bits_of(want[k])) << k;
      }
}

// hadamard == the Sylvester matrix H[i][j] = (-1)^popcount(i & j) / sqrt(n) applied in double,
// and applying it twice gives the input back (H is orthogonal and symmetric).
TEST(Hadamard, MatchesMatrixAndIsItsOwnInverse) {
  std::mt19937 rng(21);
  for (int64_t n : {1, 2, 8, 64, 128}) {
    const int64_t n_head = 3;
    const std::vector<float> x = random_floats(rng, n_head * n, 1.0f);
    std::vector<float> y = x;
    hadamard(y.data(), n_head, n);
    for (int64_t h = 0; h < n_head; ++h)
      for (int64_t i = 0; i < n; ++i) {
        double want = 0, mag = 0;
        for (int64_t j = 0; j < n; ++j) {
          const double sign = (__builtin_popcountll(static_cast<uint64_t>(i & j)) & 1) ? -1.0 : 1.0;
          want += sign * x[h * n + j];
          mag += std::fabs(x[h * n + j]);
        }
        want /= std::sqrt(double(n));
        // log2(n) f32 additions and one scaling, each within half an ulp of its magnitude.
        ASSERT_NEAR(y[h * n + i], want, (std::log2(double(n)) + 2) * kEpsF32 * mag) << n << " " << i;
      }
    std::vector<float> z = y;
    hadamard(z.data(), n_head, n);
    for (size_t k = 0; k < x.size(); ++k)
      ASSERT_NEAR(z[k], x[k], 4 * (std::log2(double(n)) + 2) * kEpsF32) << n << " " << k;
  }
}

// Neox rotates (x[i], x[i + n/2]); Normal rotates (x[2i], x[2i+1]) with the same angles. So
// interleaving the halves turns one into the other, bit for bit.
TEST(Rope, NeoxIsNormalOnInterleavedDims) {
  std::mt19937 rng(16);
  const int64_t head_dim = 64, n_dims = 64;
  const std::vector<float> x = random_floats(rng, head_dim, 1.0f);
  std::vector<float> neox = x, normal(head_dim);
  for (int64_t i = 0; i < n_dims / 2; ++i) {
    normal[2 * i] = x[i];
    normal[2 * i + 1] = x[i + n_dims / 2];
  }
  rope(neox.data(), 1, head_dim, n_dims, 123, 10000.0f, RopeMode::Neox);
  rope(normal.data(), 1, head_dim, n_dims, 123, 10000.0f, RopeMode::Normal);
  for (int64_t i = 0; i < n_dims / 2; ++i) {
    EXPECT_EQ(bits_of(neox[i]), bits_of(normal[2 * i]));
    EXPECT_EQ(bits_of(neox[i + n_dims / 2]), bits_of(normal[2 * i + 1]));
  }
}

// ---- half precision -----------------------------------------------------------------------------

// Value of an f16 bit pattern, computed independently of dtype.cpp.
double half_value(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  double v = exp == 0 ? std::ldexp(mant, -24) : std::ldexp(1024 + mant, exp - 25);
  if (exp == 31) v = mant ? NAN : INFINITY;
  return sign ? -v : v;
}

TEST(Half, ExhaustiveRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = fp16_to_fp32(static_cast<uint16_t>(h));
    const double ref = half_value(static_cast<uint16_t>(h));
    const uint16_t back = fp32_to_fp16(f);
    if (std::isnan(ref)) {
      ASSERT_TRUE(std::isnan(f)) << h;
      ASSERT_EQ(back & 0x7c00, 0x7c00) << h;  // NaN stays NaN (sign and payload may change)
      ASSERT_NE(back & 0x03ff, 0) << h;
    } else {
      ASSERT_EQ(double(f), ref) << h;
      ASSERT_EQ(std::signbit(f), bool(h & 0x8000)) << h;
      ASSERT_EQ(back, h) << h;
    }
  }
}

TEST(Half, Fp32ToFp16Rounding) {
  EXPECT_EQ(fp32_to_fp16(1.0f), 0x3c00);
  EXPECT_EQ(fp32_to_fp16(-0.0f), 0x8000);
  EXPECT_EQ(fp32_to_fp16(1.0f + 0x1p-11f), 0x3c00);             // tie -> even (down)
  EXPECT_EQ(fp32_to_fp16(1.0f + 3 * 0x1p-11f), 0x3c02);         // tie -> even (up)
  EXPECT_EQ(fp32_to_fp16(1.0f + 0x1p-11f + 0x1p-20f), 0x3c01);  // just above the tie
  EXPECT_EQ(fp32_to_fp16(65504.0f), 0x7bff);                    // largest finite
  EXPECT_EQ(fp32_to_fp16(65519.0f), 0x7bff);                    // below the midpoint to 65536
  EXPECT_EQ(fp32_to_fp16(65520.0f), 0x7c00);                    // the midpoint rounds to inf (even)
  EXPECT_EQ(fp32_to_fp16(-1e6f), 0xfc00);
  EXPECT_EQ(fp32_to_fp16(0x1p-14f), 0x0400);  // smallest normal
  EXPECT_EQ(fp32_to_fp16(0x1p-24f), 0x0001);  // smallest subnormal
  EXPECT_EQ(fp32_to_fp16(0x1p-25f), 0x0000);  // half of it: tie -> even 0
  EXPECT_EQ(fp32_to_fp16(0x1.000002p-25f), 0x0001);
  EXPECT_EQ(fp32_to_fp16(3 * 0x1p-25f), 0x0002);      // tie between 1 and 2 -> 2
  EXPECT_EQ(fp32_to_fp16(0x1.ffcp-15f), 0x03ff + 1);  // rounds up out of the subnormals
  EXPECT_EQ(fp32_to_fp16(1e-10f), 0x0000);
  EXPECT_EQ(fp32_to_fp16(INFINITY), 0x7c00);
}

// Random f32 magnitudes from 2^-25 up to (not including) 65520, where rounding goes to inf: the
// result is a nearest f16, ties to even.
TEST(Half, Fp32ToFp16IsNearest) {
  std::mt19937 rng(17);
  std::uniform_int_distribution<uint32_t> dist(0, 0xffffffffu);
  for (int k = 0; k < 1000000; ++k) {
    uint32_t u = dist(rng);
    u = (u & 0x80000000u) | (0x33000000u + (u & 0x7fffffffu) % (0x477ff000u - 0x33000000u));
    float f;
    std::memcpy(&f, &u, 4);
    const uint16_t h = fp32_to_fp16(f);
    const double err = std::fabs(half_value(h) - f);
    const uint16_t mag = h & 0x7fff;
    for (int step : {-1, 1}) {
      const int other = mag + step;
      if (other < 0 || other > 0x7bff) continue;
      const double other_err =
          std::fabs(half_value(static_cast<uint16_t>((h & 0x8000) | other)) - f);
      ASSERT_TRUE(err < other_err || (err == other_err && (h & 1) == 0)) << f;
    }
  }
}

TEST(Half, Bf16RoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_to_fp32(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(bf16_to_fp32(fp32_to_bf16(f)))) << h;
    } else {
      ASSERT_EQ(fp32_to_bf16(f), h) << h;
    }
  }
  EXPECT_EQ(fp32_to_bf16(1.0f + 0x1p-8f), 0x3f80);      // tie -> even
  EXPECT_EQ(fp32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);  // tie -> even
}

}  // namespace
}  // namespace kvlm::kernels
