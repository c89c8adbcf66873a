// kvlm perplexity (src/engine/perplexity.h): PPL against an independent computation from
// Session::feed_all_logits, KL of a run against its own base (exactly 0) and across cache types
// (small, positive), the base file's layout, and one-line errors for bad base files and texts.
// Short runs only: the tiny random-weight model, and the default model over 2 chunks of 64.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

#include "base/error.h"
#include "engine/perplexity.h"
#include "engine/session.h"
#include "model/model.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace kvlm {
namespace {

// Plain prose, long enough for 2 chunks of 64 tokens of the default model and several chunks of
// the tiny model's byte-level vocabulary.
constexpr const char* kText =
    "The hacker's lexicon grew out of small communities that shared machines, jokes and a taste "
    "for precise language. A program that works but nobody understands is said to be magic; one "
    "that almost works is a kludge, and the person who fixes it at three in the morning earns "
    "the right to name it. Words were borrowed from engineering, from science fiction and from "
    "the manuals of long-forgotten computers, then bent until they fitted a new meaning.\n\n"
    "Much of this vocabulary is about time and patience. Waiting for a slow compiler, people "
    "read, argued and wrote down the words they used, and the lists were passed from one "
    "laboratory to the next. Each copy gained entries, lost a few and corrected others, so that "
    "the collection became a record of how a culture talked about its tools. Some terms faded "
    "when the hardware they described was switched off for the last time; others spread far "
    "beyond the machine rooms and are now heard in offices and kitchens.\n\n"
    "Reading such a glossary today is like walking through a museum where every exhibit still "
    "hums. The definitions are short, often funny, and nearly always precise about the thing "
    "they mock. They remind us that a technical community is held together not only by code but "
    "by the stories it tells about that code, and by the pleasure of finding exactly the right "
    "word for a bug that refuses to die.\n";

ThreadPool& pool() {
  static ThreadPool p(2);
  return p;
}

struct Loaded {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tok;
  std::vector<int32_t> tokens;
  int32_t bos = -1;
};

Loaded load(const std::string& path, const std::string& text = kText) {
  Loaded l;
  l.model = Model::load(path);
  l.tok = Tokenizer::from_gguf(l.model->gguf());
  l.tokens = perplexity_tokens(*l.tok, text);
  l.bos = l.tok->add_bos_default() ? l.tok->bos_id() : -1;
  return l;
}

const Loaded& tiny() {
  static Loaded l = load(test::data_path("tiny-llama.gguf"));
  return l;
}
const Loaded& smol() {
  static Loaded l = load(test::model_path());
  return l;
}

PerplexityOptions options(int64_t n_ctx, int64_t n_chunks, DType kv = DType::F16) {
  PerplexityOptions o;
  o.n_ctx = n_ctx;
  o.n_chunks = n_chunks;
  o.n_batch = 32;
  o.dtype_k = o.dtype_v = kv;
  return o;
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("kvlm_test_ppl_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

// ---- PPL == exp(mean NLL), computed here independently ----------------------------------------
// Each chunk through one feed_all_logits over all n_ctx tokens (perplexity() feeds the first half
// without logits, then the scored half), log-softmax in long double, scored positions
// n_ctx/2 .. n_ctx-2 as llama.cpp.
struct Reference {
  double ppl = 0, ppl_err = 0;
  int64_t n = 0;
};

Reference reference_ppl(const Loaded& l, int64_t n_ctx, int64_t n_chunks, DType kv) {
  const int32_t n_vocab = l.model->config().n_vocab;
  long double sum = 0, sum2 = 0;
  Reference r;
  for (int64_t ic = 0; ic < n_chunks; ++ic) {
    std::vector<int32_t> chunk(l.tokens.begin() + ic * n_ctx, l.tokens.begin() + (ic + 1) * n_ctx);
    if (l.bos >= 0) chunk[0] = l.bos;
    Session s(*l.model, kv, kv, n_ctx, pool());
    const std::span<const float> logits = s.feed_all_logits(chunk);
    for (int64_t pos = n_ctx / 2; pos <= n_ctx - 2; ++pos) {
      const float* row = logits.data() + pos * n_vocab;
      long double z = 0;
      for (int32_t i = 0; i < n_vocab; ++i) z += std::exp(static_cast<long double>(row[i]));
      const long double nll = std::log(z) - row[chunk[pos + 1]];
      sum += nll;
      sum2 += nll * nll;
      ++r.n;
    }
  }
  const long double mean = sum / r.n;
  r.ppl = static_cast<double>(std::exp(mean));
  r.ppl_err = static_cast<double>(std::sqrt((sum2 / r.n - mean * mean) / (r.n - 1)) * r.ppl);
  return r;
}

void check_against_reference(const Loaded& l, int64_t n_ctx, int64_t n_chunks, DType kv) {
  int n_progress = 0;
  const PerplexityResult res =
      perplexity(*l.model, l.tokens, l.bos, options(n_ctx, n_chunks, kv), pool(),
                 [&](const PerplexityProgress& p) {
                   EXPECT_EQ(p.chunk, n_progress);
                   EXPECT_EQ(p.n_chunks, n_chunks);
                   EXPECT_TRUE(std::isfinite(p.ppl));
                   EXPECT_LT(p.kld_mean, 0);
                   ++n_progress;
                 });
  const Reference ref = reference_ppl(l, n_ctx, n_chunks, kv);
  EXPECT_EQ(n_progress, n_chunks);
  EXPECT_EQ(res.n_chunks, n_chunks);
  EXPECT_EQ(res.n_scored, ref.n);
  EXPECT_EQ(res.n_scored, n_chunks * (n_ctx - 1 - n_ctx / 2));
  EXPECT_EQ(res.n_text_tokens, static_cast<int64_t>(l.tokens.size()));
  // Batch-size-independent kernels make the logits identical; what remains is summation order.
  EXPECT_NEAR(res.ppl, ref.ppl, 1e-7 * ref.ppl);
  EXPECT_NEAR(res.ppl_err, ref.ppl_err, 1e-5 * ref.ppl_err + 1e-12);
  EXPECT_GT(res.ppl, 1);
  EXPECT_FALSE(res.kl.has_value());
  std::printf("ppl %.6f +/- %.6f (reference %.6f), %lld tokens scored\n", res.ppl, res.ppl_err,
              ref.ppl, static_cast<long long>(res.n_scored));
}

TEST(Perplexity, TinyEqualsIndependentComputation) {
  ASSERT_GE(tiny().tokens.size(), 3u * 32);
  check_against_reference(tiny(), 32, 3, DType::F16);
  check_against_reference(tiny(), 33, 2, DType::F32);  // odd n_ctx: first scored = 16
}

TEST(Perplexity, SmolLm2EqualsIndependentComputation) {
  ASSERT_GE(smol().tokens.size(), 2u * 64);
  check_against_reference(smol(), 64, 2, DType::F16);
}

TEST(Perplexity, ChunksDefaultToAllThatFit) {
  const Loaded& l = tiny();
  const PerplexityResult r = perplexity(*l.model, l.tokens, l.bos, options(64, -1), pool());
  EXPECT_EQ(r.n_chunks_max, static_cast<int64_t>(l.tokens.size()) / 64);
  EXPECT_EQ(r.n_chunks, r.n_chunks_max);
  const PerplexityResult r2 = perplexity(*l.model, l.tokens, l.bos, options(64, 1000), pool());
  EXPECT_EQ(r2.n_chunks, r.n_chunks_max);  // clamped
  EXPECT_DOUBLE_EQ(r2.ppl, r.ppl);
}

// ---- KL ---------------------------------------------------------------------------------------
TEST(Perplexity, KlAgainstOwnBaseIsZero) {
  const Loaded& l = smol();
  const std::string base = temp_path("self.kld");
  PerplexityOptions o = options(64, 2);
  o.kl_base_out = base;
  const PerplexityResult a = perplexity(*l.model, l.tokens, l.bos, o, pool());
  ASSERT_TRUE(std::filesystem::exists(base));
  EXPECT_FALSE(std::filesystem::exists(base + ".tmp"));
  o.kl_base_out.clear();
  o.kl_base = base;
  o.n_chunks = -1;  // taken from the base
  int n_progress = 0;
  const PerplexityResult b =
      perplexity(*l.model, l.tokens, l.bos, o, pool(), [&](const PerplexityProgress& p) {
        EXPECT_EQ(p.kld_mean, 0);
        ++n_progress;
      });
  EXPECT_EQ(n_progress, 2);
  ASSERT_TRUE(b.kl.has_value());
  const KlStats& k = *b.kl;
  EXPECT_EQ(k.n, a.n_scored);
  EXPECT_EQ(k.kld_mean, 0);
  EXPECT_EQ(k.kld_max, 0);
  EXPECT_EQ(k.kld_median, 0);
  EXPECT_EQ(k.same_top, 1.0);
  EXPECT_EQ(k.ln_ppl_ratio, 0);
  EXPECT_DOUBLE_EQ(k.base_ppl, a.ppl);
  EXPECT_EQ(b.ppl, a.ppl);
  EXPECT_EQ(k.base_dtype_k, DType::F16);
  std::filesystem::remove(base);
}

TEST(Perplexity, KlF16CacheAgainstF32BaseIsSmallButPositive) {
  const Loaded& l = smol();
  const std::string base = temp_path("f32.kld");
  PerplexityOptions o = options(64, 2, DType::F32);
  o.kl_base_out = base;
  const PerplexityResult a = perplexity(*l.model, l.tokens, l.bos, o, pool());
  PerplexityOptions o16 = options(64, 2, DType::F16);
  o16.kl_base = base;
  const PerplexityResult b = perplexity(*l.model, l.tokens, l.bos, o16, pool());
  ASSERT_TRUE(b.kl.has_value());
  const KlStats& k = *b.kl;
  std::printf("f16 vs f32 cache: KLD mean %.3g +/- %.3g, max %.3g, same top %.2f %%, "
              "PPL %.4f vs %.4f\n",
              k.kld_mean, k.kld_err, k.kld_max, 100 * k.same_top, b.ppl, a.ppl);
  // Measured: mean 3.3e-3, max 0.02, same top 95 % (62 positions). test_kv_strategies measures
  // the full-vocabulary KL of f16 vs f32 at 5.6e-3 on SmolLM2; the bounds leave ~5x room.
  EXPECT_GT(k.kld_mean, 0);
  EXPECT_TRUE(std::isfinite(k.kld_max));
  EXPECT_LT(k.kld_mean, 0.02);
  EXPECT_LT(k.kld_max, 0.2);
  EXPECT_GT(k.same_top, 0.85);
  EXPECT_LE(k.kld_median, k.kld_p99);
  EXPECT_LE(k.kld_p99, k.kld_max);
  EXPECT_DOUBLE_EQ(k.base_ppl, a.ppl);
  EXPECT_NEAR(k.ln_ppl_ratio, std::log(b.ppl / a.ppl), 1e-9);
  EXPECT_EQ(k.base_dtype_k, DType::F32);
  std::filesystem::remove(base);
}

// ---- in-process reference: exact KL over the full vocabulary -----------------------------------
KvOptions plain_cache(DType t) {
  KvOptions kv;
  kv.dtype_k = kv.dtype_v = t;
  return kv;
}

TEST(Perplexity, KlRefWithTheSameCacheIsZero) {
  const Loaded& l = smol();
  PerplexityOptions o = options(64, 2);
  o.kl_ref = plain_cache(DType::F16);
  const PerplexityResult r = perplexity(*l.model, l.tokens, l.bos, o, pool());
  ASSERT_TRUE(r.kl.has_value());
  const KlStats& k = *r.kl;
  EXPECT_TRUE(k.full_vocab);
  EXPECT_EQ(k.n, r.n_scored);
  EXPECT_EQ(k.kld_mean, 0);
  EXPECT_EQ(k.kld_max, 0);
  EXPECT_EQ(k.same_top, 1.0);
  EXPECT_EQ(k.ln_ppl_ratio, 0);
  EXPECT_DOUBLE_EQ(k.base_ppl, r.ppl);
}

// Against an independent computation: both caches' logits for every chunk, KL(P_f16 || Q_q4_0)
// in long double over all tokens; and the base file's top-32 KL is a lower bound of it.
TEST(Perplexity, KlRefIsTheExactFullVocabularyKl) {
  const Loaded& l = smol();
  const int64_t n_ctx = 64, n_chunks = 2;
  PerplexityOptions o = options(n_ctx, n_chunks, DType::Q4_0);
  o.kl_ref = plain_cache(DType::F16);
  const PerplexityResult r = perplexity(*l.model, l.tokens, l.bos, o, pool());
  ASSERT_TRUE(r.kl.has_value());
  const KlStats& k = *r.kl;
  EXPECT_EQ(k.base_dtype_k, DType::F16);

  const int32_t n_vocab = l.model->config().n_vocab;
  long double kl_sum = 0;
  int64_t n = 0;
  for (int64_t ic = 0; ic < n_chunks; ++ic) {
    std::vector<int32_t> chunk(l.tokens.begin() + ic * n_ctx, l.tokens.begin() + (ic + 1) * n_ctx);
    if (l.bos >= 0) chunk[0] = l.bos;
    Session sp(*l.model, DType::F16, DType::F16, n_ctx, pool());
    Session sq(*l.model, DType::Q4_0, DType::Q4_0, n_ctx, pool());
    const std::span<const float> pp = sp.feed_all_logits(chunk);  // [n_ctx, n_vocab], each
    const std::span<const float> pq = sq.feed_all_logits(chunk);  // session owns its rows
    for (int64_t pos = n_ctx / 2; pos <= n_ctx - 2; ++pos, ++n) {
      const float* a = pp.data() + pos * n_vocab;
      const float* b = pq.data() + pos * n_vocab;
      long double za = 0, zb = 0;
      for (int32_t i = 0; i < n_vocab; ++i) {
        za += std::exp(static_cast<long double>(a[i]));
        zb += std::exp(static_cast<long double>(b[i]));
      }
      long double kl = 0;
      for (int32_t i = 0; i < n_vocab; ++i) {
        const long double la = a[i] - std::log(za), lb = b[i] - std::log(zb);
        kl += std::exp(la) * (la - lb);
      }
      kl_sum += kl;
    }
  }
  const double want = static_cast<double>(kl_sum / n);
  std::printf("q4_0 vs f16, full vocabulary: KLD %.6g (independent %.6g)\n", k.kld_mean, want);
  EXPECT_GT(want, 1e-4);  // q4_0 is measurably lossy, so the comparison is not 0 == 0
  EXPECT_NEAR(k.kld_mean, want, 1e-6 * want);

  // The same comparison through a base file: a coarsening of the same two distributions.
  const std::string base = temp_path("bound.kld");
  PerplexityOptions ob = options(n_ctx, n_chunks, DType::F16);
  ob.kl_base_out = base;
  const PerplexityResult rb = perplexity(*l.model, l.tokens, l.bos, ob, pool());
  PerplexityOptions oq = options(n_ctx, n_chunks, DType::Q4_0);
  oq.kl_base = base;
  const PerplexityResult rq = perplexity(*l.model, l.tokens, l.bos, oq, pool());
  ASSERT_TRUE(rq.kl.has_value());
  EXPECT_FALSE(rq.kl->full_vocab);
  EXPECT_LE(rq.kl->kld_mean, k.kld_mean * (1 + 1e-6));
  EXPECT_DOUBLE_EQ(rq.ppl, r.ppl);
  EXPECT_NEAR(k.base_ppl, rb.ppl, 1e-9 * rb.ppl);
  EXPECT_EQ(rq.kl->same_top, k.same_top);
  std::filesystem::remove(base);

  PerplexityOptions both = o;
  both.kl_base = base;
  EXPECT_THROW(perplexity(*l.model, l.tokens, l.bos, both, pool()), Error);
}

// The base file as perplexity.h documents it: header, then records with top-K sorted by
// descending log-probability whose probabilities and the rest mass sum to 1.
TEST(Perplexity, BaseFileLayout) {
  const Loaded& l = tiny();
  const std::string base = temp_path("layout.kld");
  PerplexityOptions o = options(32, 2);
  o.kl_base_out = base;
  perplexity(*l.model, l.tokens, l.bos, o, pool());
  std::ifstream in(base, std::ios::binary);
  KlBaseHeader h{};
  ASSERT_TRUE(in.read(reinterpret_cast<char*>(&h), sizeof h));
  EXPECT_EQ(std::memcmp(h.magic, kKlMagic, 8), 0);
  EXPECT_EQ(h.version, kKlVersion);
  EXPECT_EQ(h.top_k, static_cast<uint32_t>(kKlTopK));
  EXPECT_EQ(h.n_vocab, static_cast<uint32_t>(l.model->config().n_vocab));
  EXPECT_EQ(h.n_ctx, 32);
  EXPECT_EQ(h.n_chunks, 2);
  EXPECT_EQ(h.n_scored, 2 * 15);
  EXPECT_EQ(h.model_hash, model_fingerprint(*l.model));
  EXPECT_EQ(std::filesystem::file_size(base), sizeof h + h.n_scored * kl_record_bytes(h.top_k));
  for (int64_t i = 0; i < h.n_scored; ++i) {
    double tlp, rest;
    std::vector<int32_t> ids(h.top_k);
    std::vector<float> lps(h.top_k);
    in.read(reinterpret_cast<char*>(&tlp), 8);
    in.read(reinterpret_cast<char*>(&rest), 8);
    in.read(reinterpret_cast<char*>(ids.data()), 4 * h.top_k);
    ASSERT_TRUE(in.read(reinterpret_cast<char*>(lps.data()), 4 * h.top_k));
    EXPECT_LE(tlp, 0);
    double mass = rest;
    for (uint32_t k = 0; k < h.top_k; ++k) {
      ASSERT_GE(ids[k], 0);
      ASSERT_LT(ids[k], static_cast<int32_t>(h.n_vocab));
      if (k > 0) {
        EXPECT_GE(lps[k - 1], lps[k]);
      }
      mass += std::exp(double{lps[k]});
    }
    EXPECT_NEAR(mass, 1.0, 1e-5) << "record " << i;
  }
  std::filesystem::remove(base);
}

// ---- errors -----------------------------------------------------------------------------------
void expect_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no kvlm::Error; expected one containing '" << needle << "'";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "one line: " << msg;
  }
}

std::vector<char> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void write_all(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

TEST(Perplexity, BadBaseFilesAreErrors) {
  const Loaded& l = tiny();
  const std::string base = temp_path("good.kld"), bad = temp_path("bad.kld");
  PerplexityOptions make = options(32, 2);
  make.kl_base_out = base;
  perplexity(*l.model, l.tokens, l.bos, make, pool());
  const std::vector<char> good = read_all(base);

  auto compare = [&](const std::string& path, int64_t n_ctx = 32, int64_t n_chunks = -1,
                     const std::vector<int32_t>* tokens = nullptr) {
    PerplexityOptions o = options(n_ctx, n_chunks);
    o.kl_base = path;
    perplexity(*l.model, tokens ? *tokens : l.tokens, l.bos, o, pool());
  };
  compare(base);  // the good one passes

  expect_error([&] { compare(temp_path("missing.kld")); }, "missing.kld");

  std::vector<char> b = good;
  b.resize(b.size() - 10);
  write_all(bad, b);
  expect_error([&] { compare(bad); }, "truncated");

  write_all(bad, std::vector<char>(good.begin(), good.begin() + 20));
  expect_error([&] { compare(bad); }, "shorter than a KL base header");

  b = good;
  b[0] = 'X';
  write_all(bad, b);
  expect_error([&] { compare(bad); }, "bad magic");

  b = good;
  const uint32_t v2 = 2;
  std::memcpy(b.data() + offsetof(KlBaseHeader, version), &v2, 4);
  write_all(bad, b);
  expect_error([&] { compare(bad); }, "version 2");

  b = good;  // a record's token id out of range
  const int32_t id = 1 << 30;
  std::memcpy(b.data() + sizeof(KlBaseHeader) + kl_record_bytes(kKlTopK) + 16 + 4 * 3, &id, 4);
  write_all(bad, b);
  expect_error([&] { compare(bad); }, "corrupt record 1");

  b = good;  // a NaN log-probability
  const float nan = std::nanf("");
  std::memcpy(b.data() + sizeof(KlBaseHeader) + 16 + 4 * kKlTopK, &nan, 4);
  write_all(bad, b);
  expect_error([&] { compare(bad); }, "corrupt record 0");

  // Run mismatches, all detected before any evaluation.
  expect_error([&] { compare(base, 16); }, "--ctx 32");
  expect_error([&] { compare(base, 32, 1); }, "--chunks 2");
  std::vector<int32_t> other = l.tokens;
  other[40] = other[40] == 5 ? 6 : 5;
  expect_error([&] { compare(base, 32, -1, &other); }, "different text");
  const std::vector<int32_t> few(l.tokens.begin(), l.tokens.begin() + 40);
  expect_error([&] { compare(base, 32, -1, &few); }, "holds only 1");

  b = good;  // another model: same vocabulary size, different fingerprint
  b[offsetof(KlBaseHeader, model_hash)] ^= 1;
  write_all(bad, b);
  expect_error([&] { compare(bad); }, "different model");

  PerplexityOptions both = options(32, 2);
  both.kl_base = base;
  both.kl_base_out = bad;
  expect_error([&] { perplexity(*l.model, l.tokens, l.bos, both, pool()); }, "together");

  std::filesystem::remove(base);
  std::filesystem::remove(bad);
}

TEST(Perplexity, ShortTextAndBadContextAreErrors) {
  const Loaded& l = tiny();
  const std::vector<int32_t> few(l.tokens.begin(), l.tokens.begin() + 20);
  expect_error([&] { perplexity(*l.model, few, l.bos, options(32, -1), pool()); },
               "fewer than one chunk");
  expect_error([&] { perplexity(*l.model, l.tokens, l.bos, options(3, -1), pool()); },
               "too small");
}

}  // namespace
}  // namespace kvlm
