// The KV memory planner: the seeds' worked examples, exact inverse questions, byte-size parsing,
// and "predicted == allocated": for every allocation strategy and storage type, the bytes the
// planner predicts are the bytes a one-sequence KV manager (as Session holds it) allocates.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "base/error.h"
#include "kv/kv_cache.h"
#include "kv/kv_plan.h"
#include "kv_manager/kv_manager.h"

namespace kvlm {
namespace {

KvShape shape(int n_layer, int n_kv_head, int head_dim, DType k = DType::F16, DType v = DType::F16) {
  KvShape s;
  s.n_layer = n_layer;
  s.n_kv_head = n_kv_head;
  s.head_dim = head_dim;
  s.dtype_k = k;
  s.dtype_v = v;
  return s;
}

constexpr uint64_t kMiB = uint64_t{1} << 20, kGiB = uint64_t{1} << 30;

// ---- worked examples ---------------------------------------------------------------------------

// LLaMA-7B (32 layers, 32 KV heads of 128, no GQA) in fp16: 2 x 32 x 32 x 128 x 2 bytes per token.
TEST(KvPlan, Llama7bWorkedExample) {
  const KvShape s = shape(32, 32, 128);
  KvPlan p = plan_kv(s, 1024);
  EXPECT_EQ(p.bytes_per_token, 524288u);
  EXPECT_EQ(p.bytes_per_token_layer, 16384u);
  EXPECT_EQ(p.k_bytes_per_token_layer, 8192u);
  EXPECT_EQ(p.v_bytes_per_token_layer, 8192u);
  EXPECT_EQ(p.k_bytes_per_token, 262144u);
  EXPECT_EQ(p.v_bytes_per_token, 262144u);
  EXPECT_EQ(p.bytes_total, 512 * kMiB);  // 512 MiB at 1,024 tokens
  EXPECT_EQ(plan_kv(s, 4096).bytes_total, 2 * kGiB);  // 2 GiB at 4,096 tokens
  EXPECT_EQ(plan_kv(s, 4096, 3).bytes_total, 6 * kGiB);
  EXPECT_EQ(plan_kv(s, 4096, 3).bytes_per_seq, 2 * kGiB);
  // And back: 2 GiB holds 4,096 tokens of one sequence, or 2 sequences of 2,048.
  EXPECT_EQ(max_ctx_for_budget(s, 1, 2 * kGiB), 4096);
  EXPECT_EQ(max_seqs_for_budget(s, 2048, 2 * kGiB), 2);
}

TEST(KvPlan, SmolLm2EveryType) {
  // 30 layers x 3 KV heads x 64 dims (docs/KV.md).
  const KvShape s = shape(30, 3, 64);
  std::vector<DType> types = kv_plan_types(s);
  std::vector<size_t> per_token;
  for (DType t : types) per_token.push_back(plan_kv(shape(30, 3, 64, t, t), 1).bytes_per_token);
  // f32 and f16 are always there; every type kv_shape accepts is listed, largest first.
  ASSERT_GE(types.size(), 2u);
  EXPECT_EQ(types[0], DType::F32);
  EXPECT_EQ(per_token[0], 46080u);
  EXPECT_EQ(types[1], DType::F16);
  EXPECT_EQ(per_token[1], 23040u);
  for (size_t i = 1; i < per_token.size(); ++i) EXPECT_GE(per_token[i - 1], per_token[i]);
  for (DType t : kKvTypes) EXPECT_NE(std::find(types.begin(), types.end(), t), types.end());
  EXPECT_EQ(types.size(), std::size(kKvTypes));
  EXPECT_EQ(plan_kv(shape(30, 3, 64, DType::F32, DType::F16), 1).bytes_per_token, 34560u);
}

TEST(KvPlan, TypesFollowValidate) {
  // head_dim 48: no 32-value block fits a head, so only the plain types remain.
  for (DType t : kv_plan_types(shape(2, 2, 48))) EXPECT_EQ(dtype_info(t).block_size, 1);
  EXPECT_THROW(kv_plan_types(shape(0, 2, 64)), Error);
}

TEST(KvPlan, BadInputsAreErrors) {
  EXPECT_THROW(plan_kv(shape(32, 32, 128), 0), Error);
  EXPECT_THROW(plan_kv(shape(32, 32, 128), 16, 0), Error);
  EXPECT_THROW(plan_kv(shape(0, 32, 128), 16), Error);
  EXPECT_THROW(plan_kv(shape(4096, 4096, 4096, DType::F32, DType::F32), int64_t{1} << 40), Error);
  // Each sequence fits in size_t, all of them together do not.
  EXPECT_THROW(plan_kv(shape(32, 32, 128), int64_t{1} << 40, int64_t{1} << 30), Error);
  EXPECT_THROW(max_ctx_for_budget(shape(32, 32, 128), 0, kGiB), Error);
  EXPECT_THROW(max_seqs_for_budget(shape(32, 32, 128), 0, kGiB), Error);
}

// ---- inverse questions -------------------------------------------------------------------------

// A sequence holds whole blocks of 16 tokens, so a budget that holds n tokens holds the rest of
// n's last block too: the answer is the longest context of those bytes, a multiple of 16; one
// block less fits exactly a byte less.
TEST(KvPlan, InverseQuestionsAreExactAtBoundaries) {
  for (DType t : kv_plan_types(shape(30, 3, 64))) {
    const KvShape s = shape(30, 3, 64, t, t);
    for (int64_t n_seqs : {1, 2, 7})
      for (int64_t n : {1, 2, 255, 256, 4096, 100000}) {
        const uint64_t exact = plan_kv(s, n, n_seqs).bytes_total;
        const int64_t whole = (n + 15) / 16 * 16;
        EXPECT_EQ(max_ctx_for_budget(s, n_seqs, exact), whole);
        EXPECT_EQ(max_ctx_for_budget(s, n_seqs, exact - 1), whole - 16);
        EXPECT_EQ(max_ctx_for_budget(s, n_seqs, exact + 1), whole);
        EXPECT_EQ(plan_kv(s, whole, n_seqs).bytes_total, exact);
        // The same budget seen from the other side: n_seqs sequences of n tokens.
        EXPECT_EQ(max_seqs_for_budget(s, n, exact), n_seqs);
        EXPECT_EQ(max_seqs_for_budget(s, n, exact - 1), n_seqs - 1);
      }
  }
}

TEST(KvPlan, InverseQuestionsAtTheEdges) {
  const KvShape s = shape(30, 3, 64);  // 23,040 B/token, blocks of 16 tokens: 368,640 B
  EXPECT_EQ(max_ctx_for_budget(s, 1, 0), 0);
  EXPECT_EQ(max_ctx_for_budget(s, 1, 1024), 0);
  EXPECT_EQ(max_ctx_for_budget(s, 1, 23040), 0);  // a token's bytes, not a block's
  EXPECT_EQ(max_ctx_for_budget(s, 1, 368639), 0);
  EXPECT_EQ(max_ctx_for_budget(s, 1, 368640), 16);
  EXPECT_EQ(max_ctx_for_budget(s, 2, 368640), 0);
  EXPECT_EQ(max_seqs_for_budget(s, 1, 368639), 0);
  EXPECT_EQ(max_seqs_for_budget(s, int64_t{1} << 62, 1000 * kGiB), 0);  // kv_bytes would overflow
  const uint64_t all = std::numeric_limits<uint64_t>::max();
  EXPECT_EQ(max_ctx_for_budget(s, 1, all), static_cast<int64_t>(all / 368640 * 16));
  EXPECT_EQ(max_seqs_for_budget(s, 1, all), static_cast<int64_t>(all / 368640));
}

// ---- predicted == allocated --------------------------------------------------------------------

// A one-sequence cache as Session allocates it (kv_seq_config): its arenas hold the planner's
// bytes at construction, after every growth, and at full context.
void expect_predicted_equals_allocated(const KvShape& s, KvAlloc alloc, int64_t n_ctx) {
  KvManager kv(kv_seq_config(s, n_ctx, alloc, KvRope{}));
  ASSERT_TRUE(kv.admit(0, {}, "", 0, KvHit{}));
  EXPECT_EQ(kv.stats().bytes_total, kv_alloc_bytes(s, alloc, n_ctx, 0));
  for (int64_t n : {int64_t{1}, n_ctx / 2, n_ctx - 1, n_ctx}) {
    if (n <= kv.seq_tokens(0)) continue;
    ASSERT_TRUE(kv.reserve(0, n - kv.seq_tokens(0)));
    EXPECT_EQ(kv.stats().bytes_total, kv_alloc_bytes(s, alloc, n_ctx, n)) << n;
  }
  EXPECT_EQ(kv.stats().bytes_total, plan_kv(s, n_ctx).bytes_per_seq);
}

// For every strategy and storage type: the planner's bytes are the arenas' bytes, at construction,
// after growth, and at full context (where both strategies hold plan_kv's bytes_per_seq).
TEST(KvPlan, PredictedEqualsAllocated) {
  const KvShape shapes[] = {shape(3, 2, 64), shape(2, 1, 32), shape(1, 4, 128), shape(2, 3, 48)};
  for (const KvShape& base : shapes)
    for (DType k : kv_plan_types(base))
      for (DType v : kv_plan_types(base))
        for (KvAlloc alloc : {KvAlloc::Static, KvAlloc::Dynamic})
          for (int64_t n_ctx : {1, 17, 256, 257, 700}) {
            KvShape s = base;
            s.dtype_k = k;
            s.dtype_v = v;
            SCOPED_TRACE(testing::Message() << dtype_name(k) << "/" << dtype_name(v) << " dims "
                                            << s.n_layer << "x" << s.n_kv_head << "x" << s.head_dim
                                            << (alloc == KvAlloc::Static ? " static" : " dynamic")
                                            << " n_ctx " << n_ctx);
            expect_predicted_equals_allocated(s, alloc, n_ctx);
          }
}

// The KIVI layout (sealed K groups + sealed V rows + f16 residual) through the same accounting:
// what the planner predicts is what the arenas hold, for both strategies and every size.
TEST(KvPlan, PredictedEqualsAllocatedKivi) {
  const KvShape shapes[] = {shape(3, 2, 64), shape(2, 1, 32), shape(1, 4, 128)};
  for (const KvShape& base : shapes)
    for (DType v : {DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::F16})
      for (int32_t residual : {0, 5, 64})
        for (int32_t group : {32, 64, 128})
          for (KvAlloc alloc : {KvAlloc::Static, KvAlloc::Dynamic})
            for (int64_t n_ctx : {1, 17, 256, 257, 700}) {
              KvShape s = base;
              s.dtype_k = DType::Q4_0;
              s.dtype_v = v;
              s.kivi_residual = residual;
              s.kivi_group = group;
              SCOPED_TRACE(testing::Message() << "kivi V " << dtype_name(v) << " r" << residual
                                              << " g" << group << " kv_dim " << s.kv_dim()
                                              << (alloc == KvAlloc::Static ? " static" : " dynamic")
                                              << " n_ctx " << n_ctx);
              expect_predicted_equals_allocated(s, alloc, n_ctx);
            }
}

// SmolLM2 with --kv-residual 32 (docs/KV.md): sealed tokens cost q4_0's 6,480 B/token in blocks of
// one K group (64 tokens), plus the f16 residual slot of 95 tokens (768 B per token and layer).
TEST(KvPlan, SmolLm2Kivi) {
  KvShape s = shape(30, 3, 64, DType::Q4_0, DType::Q4_0);
  s.kivi_residual = 32;
  EXPECT_EQ(kv_kivi_group_bytes(s), 192u * 36);
  EXPECT_EQ(plan_kv(s, 1).bytes_per_token, 6480u);
  EXPECT_EQ(kv_k_row_bytes(s), 108u);
  // 4,096 tokens: 64 blocks of 64 at the sealed density + 95 f16 rows, per layer.
  EXPECT_EQ(plan_kv(s, 4096).bytes_per_seq, 30u * (64 * 6912 + 4096 * 108 + 95 * 768));
  EXPECT_EQ(plan_kv(s, 4096).bytes_per_seq, 28730880u);
  EXPECT_EQ(plan_kv(s, 10).bytes_per_seq, 30u * (6912 + 64 * 108 + 95 * 768));  // one block
}

// KIVI's bytes are a step function of the context (a group seals every 64 tokens), so the inverse
// answer is the longest context with the same bytes; it must still fit and one more must not.
TEST(KvPlan, InverseQuestionsKivi) {
  for (int32_t residual : {0, 32}) {
    KvShape s = shape(30, 3, 64, DType::Q4_0, DType::Q4_0);
    s.kivi_residual = residual;
    for (int64_t n_seqs : {1, 3})
      for (int64_t n : {1, 2, 95, 96, 255, 4096, 100000}) {
        const uint64_t exact = plan_kv(s, n, n_seqs).bytes_total;
        for (uint64_t budget : {exact - 1, exact, exact + 1}) {
          const int64_t got = max_ctx_for_budget(s, n_seqs, budget);
          EXPECT_EQ(got >= n, budget >= exact) << n << " " << budget;
          if (got > 0) {
            EXPECT_LE(plan_kv(s, got, n_seqs).bytes_total, budget);
          }
          EXPECT_GT(plan_kv(s, got + 1, n_seqs).bytes_total, budget);
        }
        EXPECT_EQ(max_seqs_for_budget(s, n, exact), n_seqs);
        EXPECT_EQ(max_seqs_for_budget(s, n, exact - 1), n_seqs - 1);
      }
  }
}

// n_seqs sequences are n_seqs caches: the plan's total is their sum.
TEST(KvPlan, PredictedEqualsAllocatedForSeveralSequences) {
  for (DType t : kv_plan_types(shape(2, 2, 64)))
    for (int64_t n_seqs : {1, 2, 5}) {
      const KvShape s = shape(2, 2, 64, t, t);
      const int64_t n_ctx = 300;
      std::vector<std::unique_ptr<KvManager>> caches;
      size_t allocated = 0;
      for (int64_t i = 0; i < n_seqs; ++i) {
        caches.push_back(
            std::make_unique<KvManager>(kv_seq_config(s, n_ctx, KvAlloc::Static, KvRope{})));
        allocated += caches.back()->stats().bytes_total;
      }
      EXPECT_EQ(allocated, plan_kv(s, n_ctx, n_seqs).bytes_total) << dtype_name(t) << " " << n_seqs;
      // The budget that exactly holds them admits exactly these caches, of up to 304 tokens each
      // (19 whole blocks).
      EXPECT_EQ(max_seqs_for_budget(s, n_ctx, allocated), n_seqs);
      EXPECT_EQ(max_ctx_for_budget(s, n_seqs, allocated), 304);
    }
}

// Per-layer cache groups (sliding-window layers): the planner's bytes, per group and in all, are
// the arenas a Session's manager allocates (kv_seq_groups is both's arithmetic), for Mistral-like
// (every layer windowed), alternating and Gemma-3-like layouts, f16 and KIVI (blocks of 64 in
// every group, one f16 residual slot of every layer); the inverse answers hold.
TEST(KvPlan, PredictedEqualsAllocatedWithWindowGroups) {
  KvShape kivi = shape(18, 1, 256, DType::Q4_0, DType::Q4_0);
  kivi.kivi_residual = 32;
  for (const KvShape& s : {shape(18, 1, 256), kivi}) {
    for (int32_t pattern : {0, 2, 6})
      for (int32_t window : {16, 100, 512})
        for (int64_t n_ctx : {1, 300, 4096}) {
          SCOPED_TRACE(testing::Message() << "pattern " << pattern << " window " << window
                                          << " n_ctx " << n_ctx << " kivi " << s.kivi());
          const std::vector<int32_t> lw = kv_layer_windows(18, window, pattern);
          KvManager kv(kv_seq_config(s, n_ctx, KvAlloc::Static, KvRope{}, lw, kKvPlanBatch));
          const KvPlan p = plan_kv(s, n_ctx, 1, lw);
          const KvManagerStats st = kv.stats();
          EXPECT_EQ(st.bytes_total, p.bytes_per_seq);
          ASSERT_EQ(st.groups.size(), p.groups.size());
          for (size_t g = 0; g < p.groups.size(); ++g) {
            EXPECT_EQ(st.groups[g].window, p.groups[g].window);
            EXPECT_EQ(st.groups[g].n_layers, p.groups[g].n_layers);
            EXPECT_EQ(st.groups[g].bytes_total, p.groups[g].bytes_per_seq);
          }
          EXPECT_EQ(max_seqs_for_budget(s, n_ctx, p.bytes_per_seq, lw), 1);
          EXPECT_EQ(max_seqs_for_budget(s, n_ctx, p.bytes_per_seq - 1, lw), 0);
          EXPECT_GE(max_ctx_for_budget(s, 1, p.bytes_per_seq, lw), n_ctx);
        }
  }
  // Gemma 3 270M, f16, 32,768 tokens: 3 global layers x 32,768 x 1,024 B = 96 MiB; 15 window
  // layers x 65 blocks of 16 x 1,024 B; every layer full: 576 MiB.
  const KvShape s = shape(18, 1, 256);
  const auto gemma = kv_layer_windows(18, 512, 6);
  const KvPlan p = plan_kv(s, 32768, 1, gemma);
  ASSERT_EQ(p.groups.size(), 2u);
  EXPECT_EQ(p.groups[0].bytes_per_seq, 96 * kMiB);
  EXPECT_EQ(p.groups[1].bytes_per_seq, 15u * 65 * 16 * 1024);
  EXPECT_EQ(plan_kv(s, 32768).bytes_per_seq, 576 * kMiB);
  EXPECT_EQ(llama_cpp_iswa_bytes(s, 32768, gemma), (3u * 32768 + 15 * 1024) * 1024);
  EXPECT_THROW(kv_layer_windows(18, 512, 19), Error);  // a pattern past the layers
}

// KIVI with window groups on Gemma 3 270M's shape: the window layers stay bounded while the
// global ones grow with the context; the f16 residual slot is counted once.
TEST(KvPlan, KiviWithWindowGroupsGemma3) {
  KvShape s = shape(18, 1, 256, DType::Q4_0, DType::Q4_0);
  s.kivi_residual = 32;
  // 32,768 tokens: 3 global layers x 512 blocks of 64 x 288 B (K 144 + V 144 per token), 15
  // window layers x 17 blocks (ceil((511 + 512) / 64) + 1), and the 95-row f16 slot of 18 layers.
  const auto gemma = kv_layer_windows(18, 512, 6);
  const KvPlan p = plan_kv(s, 32768, 1, gemma);
  ASSERT_EQ(p.groups.size(), 2u);
  EXPECT_EQ(p.groups[0].bytes_per_seq, 3u * 32768 * 288);
  EXPECT_EQ(p.groups[1].bytes_per_seq, 15u * 17 * 64 * 288);
  EXPECT_EQ(p.bytes_per_seq, 3u * 32768 * 288 + 15u * 17 * 64 * 288 + 95u * 256 * 4 * 18);
}

// ---- parse_bytes -------------------------------------------------------------------------------

TEST(ParseBytes, Table) {
  struct Case {
    const char* s;
    uint64_t bytes;
  };
  const Case cases[] = {
      {"0", 0},
      {"1000000", 1000000},
      {"1B", 1},
      {"2GiB", 2 * kGiB},
      {"2gib", 2 * kGiB},
      {"2 GiB", 2 * kGiB},
      {" 512MiB ", 512 * kMiB},
      {"512M", 512 * kMiB},
      {"64k", 65536},
      {"64KiB", 65536},
      {"64KB", 64000},
      {"64kb", 64000},
      {"1.5GB", 1500000000},
      {"1.5GiB", 3 * kGiB / 2},
      {"1.5", 1},  // fractions of a byte are dropped
      {"0.1KiB", 102},
      {".5K", 512},
      {"3.", 3},
      {"1TB", 1000000000000ull},
      {"1TiB", uint64_t{1} << 40},
      {"18446744073709551615", std::numeric_limits<uint64_t>::max()},
      {"16777215.999999999999999999TiB", (uint64_t{1} << 40) * 16777215 + ((uint64_t{1} << 40) - 1)},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.s);
    EXPECT_EQ(parse_bytes(c.s), c.bytes);
  }
}

TEST(ParseBytes, Errors) {
  const char* bad[] = {"",      "   ",   "-1",    "-1GiB", "+5",   "GiB",     "abc",
                       "1e9",   "2XB",   "2 G B", "1..5",  ".",    "1.5.GiB", "0x10",
                       "18446744073709551616",     "16777216TiB", "1.0000000000000000001"};
  for (const char* s : bad) {
    SCOPED_TRACE(s);
    EXPECT_THROW(parse_bytes(s), Error);
  }
  // The message names the string and what to do.
  try {
    parse_bytes("2XB");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'2XB'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("GiB"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kvlm
