// Gemma 3 270M (Q4_K_M), kvlm's second real model, against llama.cpp on the same file: goldens from
// tools/gen_gemma3_goldens.py (pinned llama-cpp-python and llama.cpp's own llama-perplexity);
// llama.cpp is not needed here. `make test` fetches the model (scripts/fetch-model.sh gemma3-270m).
//   - the tokenizer gives llama.cpp's ids for every prompt;
//   - teacher-forced top-1 over 20 prompts x 48 tokens agrees with llama.cpp's flash-attention run
//     at least as often as llama.cpp's own flash-on and flash-off runs agree, with its
//     non-flash run within 0.5% of that and only at near-ties (see kAgreementSlack);
//   - perplexity on the Jargon File within 1% of llama-perplexity's, with 512-token chunks and
//     with 2048-token chunks (past the 512-token window of the 15 local layers).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "engine/perplexity.h"
#include "engine/session.h"
#include "model/model.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace kvlm {
namespace {

using nlohmann::json;

ThreadPool& pool() {
  static ThreadPool p(2);
  return p;
}

const json& goldens() {
  static const json g = [] {
    std::ifstream in(test::data_path("gemma3_270m_goldens.json"));
    EXPECT_TRUE(in.good()) << "missing gemma3_270m_goldens.json";
    return json::parse(in);
  }();
  return g;
}

const Model& model() {
  static const std::unique_ptr<Model> m = Model::load(test::gemma3_270m_path());
  return *m;
}

const Tokenizer& tokenizer() {
  static const std::unique_ptr<Tokenizer> t = Tokenizer::from_gguf(model().gguf());
  return *t;
}

std::vector<int32_t> ids(const json& j) { return j.get<std::vector<int32_t>>(); }

TEST(Gemma3_270m, TokenizesPromptsLikeLlamaCpp) {
  for (const json& p : goldens()["prompts"]) {
    SCOPED_TRACE(p["name"].get<std::string>());
    EXPECT_EQ(tokenizer().encode(p["text"].get<std::string>(), true, false), ids(p["prompt_ids"]));
  }
}

// kvlm quantizes the activations of its K-quant matmuls as llama.cpp does (super-blocks of 256 with
// an f32 scale, Q8_K's rounding; Q5_0 and Q8_0 in blocks of 32), so the same codes go into exact
// integer dots; what remains is f32 summation order and the attention's roundings, and near-tie
// argmaxes still fall differently now and then. Measured on this file (Zen 5, avx2-vnni; every
// variant gives the same bits), teacher-forced over the 960 tokens:
//   llama.cpp flash attention on vs off:   937 (0.976), the yardstick;
//   kvlm vs llama.cpp's flash-attention run: 937 (0.976): kvlm's attention is the same algorithm
//     (one pass, running max and sum; kvlm has no other mode), so this is the like-for-like
//     comparison, and the goal (at least llama.cpp's own agreement) is required with no slack;
//   kvlm vs llama.cpp's non-flash run: 935 (0.974; 930 when kvlm used blocks of 32 for the K
//     types), allowed kAgreementSlack below the yardstick, every disagreement a near-tie: llama.cpp's
//     own flips have top-2 gaps up to 0.59, kvlm's measured up to 0.59; a real error (a wrong
//     layer, a wrong scale) flips tokens with gaps of several logits.
constexpr double kAgreementSlack = 0.005;
constexpr double kNearTieGap = 1.0;

TEST(Gemma3_270m, TeacherForcedTop1AtLlamaCppsOwnAgreement) {
  const int32_t n_vocab = model().config().n_vocab;
  int64_t agree = 0, agree_flash = 0, total = 0;
  for (const json& p : goldens()["prompts"]) {
    const std::vector<int32_t> prompt = ids(p["prompt_ids"]), cont = ids(p["continuation"]);
    const std::vector<int32_t> want = ids(p["argmax_no_flash"]), flash = ids(p["argmax_flash"]);
    const auto gaps = p["top2_gap"].get<std::vector<double>>();
    std::vector<int32_t> seq = prompt;
    seq.insert(seq.end(), cont.begin(), cont.end() - 1);
    Session s(model(), DType::F16, DType::F16, static_cast<int64_t>(seq.size()), pool());
    const std::span<const float> logits = s.feed_all_logits(seq);
    for (size_t i = 0; i < want.size(); ++i) {
      const float* row = logits.data() + (prompt.size() - 1 + i) * n_vocab;
      const auto got = static_cast<int32_t>(std::max_element(row, row + n_vocab) - row);
      agree += got == want[i];
      agree_flash += got == flash[i];
      if (got == want[i]) continue;
      EXPECT_LT(gaps[i], kNearTieGap) << p["name"] << " token " << i;
      std::printf("  %s token %zu: kvlm %d, llama.cpp %d (its top-2 gap %.4f)\n",
                    p["name"].get<std::string>().c_str(), i, got, want[i], gaps[i]);
    }
    total += static_cast<int64_t>(want.size());
  }
  const double ours = double(agree) / double(total);
  const double theirs = goldens()["agreement_flash_vs_no_flash"].get<double>();
  std::printf("  top-1 agreement with llama.cpp: %.4f (%lld/%lld; with its flash-attention run "
              "%lld); llama.cpp flash on vs off: %.4f\n",
              ours, static_cast<long long>(agree), static_cast<long long>(total),
              static_cast<long long>(agree_flash), theirs);
  EXPECT_GE(double(agree_flash) / double(total), theirs) << "against llama.cpp's flash run";
  EXPECT_GE(ours, theirs - kAgreementSlack) << "against llama.cpp's non-flash run";
}

// The Jargon File's first bytes (enough for every chunk), as Debian's jargon-text ships it.
std::string jargon_head(size_t n_bytes) {
  gzFile f = gzopen("/usr/share/doc/jargon-text/jargon.txt.gz", "rb");
  EXPECT_NE(f, nullptr) << "jargon-text is not installed (scripts/setup.sh)";
  std::string out(n_bytes, '\0');
  const int got = f ? gzread(f, out.data(), static_cast<unsigned>(n_bytes)) : 0;
  if (f) gzclose(f);
  out.resize(static_cast<size_t>(std::max(got, 0)));
  return out;
}

TEST(Gemma3_270m, PerplexityWithinOnePercentOfLlamaCpp) {
  // llama-perplexity tokenizes the whole file; the first 200 KB give the same leading tokens
  // (SentencePiece merges are local), far more than the 8192 the chunks take.
  const Tokenizer& tok = tokenizer();
  const std::vector<int32_t> tokens = perplexity_tokens(tok, jargon_head(200'000));
  const int32_t bos = tok.add_bos_default() ? tok.bos_id() : -1;  // as kvlm perplexity
  for (const json& run : goldens()["perplexity"]) {
    PerplexityOptions o;
    o.n_ctx = run["ctx"].get<int64_t>();
    o.n_chunks = run["chunks"].get<int64_t>();
    o.n_batch = o.n_ctx;
    ASSERT_GE(static_cast<int64_t>(tokens.size()), o.n_ctx * o.n_chunks);
    const PerplexityResult r = perplexity(model(), tokens, bos, o, pool());
    const double ref = run["ppl_no_flash"].get<double>(), spread = run["ppl_flash"].get<double>();
    std::printf("  ctx %lld x %lld: kvlm %.4f, llama.cpp %.4f (flash on: %.4f)\n",
                static_cast<long long>(o.n_ctx), static_cast<long long>(o.n_chunks), r.ppl, ref,
                spread);
    EXPECT_NEAR(r.ppl / ref, 1.0, 0.01) << "ctx " << o.n_ctx;
  }
}

// KIVI on a model with sliding-window layers (15 of 18 windowed at 512): one 2048-token chunk of
// the Jargon File, past the window, with the exact full-vocabulary KL against an f16 cache in the
// same process (what `kvlm perplexity -ctk q4_0 -ctv q4_0 --kv-residual 32 --kl-ref f16` prints).
// Measured 2026-12-07: this chunk PPL 4.5779 vs f16 4.5507 (+0.60%), mean KLD 0.0065, same top
// 97.8%; two chunks +0.70%, 0.0094.
// Bounds with ~3x headroom, as KvStrategies.KiviBeatsBlockwiseQ4 on SmolLM2.
TEST(Gemma3_270m, KiviWithWindowLayersStaysCloseToF16) {
  const Tokenizer& tok = tokenizer();
  const std::vector<int32_t> tokens = perplexity_tokens(tok, jargon_head(20'000));
  PerplexityOptions o;
  o.n_ctx = 2048;
  o.n_chunks = 1;
  o.dtype_k = o.dtype_v = o.kv.dtype_k = o.kv.dtype_v = DType::Q4_0;
  o.kv.kivi_residual = 32;
  KvOptions ref;
  ref.dtype_k = ref.dtype_v = DType::F16;
  o.kl_ref = ref;
  ASSERT_GE(static_cast<int64_t>(tokens.size()), o.n_ctx);
  const int32_t bos = tok.add_bos_default() ? tok.bos_id() : -1;
  const PerplexityResult r = perplexity(model(), tokens, bos, o, pool());
  ASSERT_TRUE(r.kl.has_value());
  std::printf("  KIVI r32: PPL %.4f, f16 %.4f (%+.2f%%), mean KLD %.4f, same top %.1f%%\n", r.ppl,
              r.kl->base_ppl, 100 * (r.ppl / r.kl->base_ppl - 1), r.kl->kld_mean,
              100 * r.kl->same_top);
  EXPECT_NEAR(r.ppl / r.kl->base_ppl, 1.0, 0.03);
  EXPECT_LT(r.kl->kld_mean, 0.03);
  EXPECT_GT(r.kl->same_top, 0.9);
}

}  // namespace
}  // namespace kvlm
