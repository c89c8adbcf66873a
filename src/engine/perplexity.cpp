#include "engine/perplexity.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>

#include "base/error.h"
#include "base/timer.h"
#include "engine/session.h"
#include "tokenizer/tokenizer.h"

namespace kvlm {

static_assert(std::endian::native == std::endian::little, "KL base files are little-endian");

namespace {

// ---- hashing ----------------------------------------------------------------------------------
// FNV-1a, 64-bit: identifies files, not a defence against forgery.
constexpr uint64_t kFnvOffset = 14695981039346656037ull;
constexpr uint64_t kFnvPrime = 1099511628211ull;

void fnv_bytes(uint64_t& h, const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * kFnvPrime;
}
template <class T>
void fnv_pod(uint64_t& h, const T& v) {
  fnv_bytes(h, &v, sizeof v);
}

// ---- one logits row ---------------------------------------------------------------------------
struct RowStats {
  double lse = 0;    // ln sum_i exp(logit_i)
  double rest = 0;   // probability mass of the tokens with mask[i] == 0 (0 when mask is null)
  int32_t top1 = 0;  // argmax, lowest id on ties
};

// logits [n_vocab]; mask [n_vocab] or null. Two passes in double: max, then sum of exp. The same
// arithmetic serves the base run and the compared run, so a run compared with its own base gives
// bit-identical numbers (KL exactly 0).
RowStats row_stats(const float* logits, int32_t n_vocab, const uint8_t* mask) {
  RowStats r;
  float mx = logits[0];
  for (int32_t i = 1; i < n_vocab; ++i)
    if (logits[i] > mx) {
      mx = logits[i];
      r.top1 = i;
    }
  double sum = 0, rest = 0;
  for (int32_t i = 0; i < n_vocab; ++i) {
    const double e = std::exp(double{logits[i]} - mx);
    sum += e;
    if (mask && !mask[i]) rest += e;
  }
  r.lse = mx + std::log(sum);
  r.rest = rest / sum;
  return r;
}

// "a ranks before b": larger logit, then lower id.
struct Ranks {
  const float* logits;
  bool operator()(int32_t a, int32_t b) const {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  }
};

// ids [k] <- the k best tokens of logits [n_vocab], best first. A heap of k, worst on top.
void top_k_ids(const float* logits, int32_t n_vocab, int32_t k, int32_t* ids) {
  const Ranks ranks{logits};
  int32_t n = 0;
  for (int32_t i = 0; i < n_vocab; ++i) {
    if (n < k) {
      ids[n++] = i;
      std::push_heap(ids, ids + n, ranks);
    } else if (ranks(i, ids[0])) {
      std::pop_heap(ids, ids + k, ranks);
      ids[k - 1] = i;
      std::push_heap(ids, ids + k, ranks);
    }
  }
  std::sort_heap(ids, ids + k, ranks);
}

// The stored log-probability of a token: rounded to f32 the same way on both sides.
float logprob_f32(const float* logits, int32_t id, double lse) {
  return static_cast<float>(double{logits[id]} - lse);
}

// ---- base file records ------------------------------------------------------------------------
// One chunk's records, unpacked.
struct RecordBlock {
  int64_t top_k = 0;
  std::vector<double> target_logprob;  // [n]
  std::vector<double> rest;            // [n]
  std::vector<int32_t> ids;            // [n, top_k]
  std::vector<float> logprobs;         // [n, top_k]

  void resize(int64_t n, int64_t k) {
    top_k = k;
    target_logprob.resize(n);
    rest.resize(n);
    ids.resize(n * k);
    logprobs.resize(n * k);
  }
  int64_t size() const { return static_cast<int64_t>(rest.size()); }
};

// Owns a FILE*; closes it on every path.
struct File {
  std::FILE* f = nullptr;
  ~File() {
    if (f) std::fclose(f);
  }
};

// A log-probability that came from a file: finite, and not above 0 beyond f32 rounding.
bool plausible_logprob(double lp) { return std::isfinite(lp) && lp <= 1e-3; }

class KlBaseReader {
 public:
  // Reads and checks the header against the file's own size; run-specific checks are check().
  explicit KlBaseReader(const std::string& path) : path_(path) {
    std::error_code ec;
    const uint64_t size = std::filesystem::file_size(path, ec);
    if (ec) fail("{}: cannot read the KL base file ({})", path, ec.message());
    file_.f = std::fopen(path.c_str(), "rb");
    if (!file_.f) fail("{}: cannot open the KL base file ({})", path, std::strerror(errno));
    if (size < sizeof(KlBaseHeader))
      fail("{}: {} bytes, shorter than a KL base header ({} bytes): not a kvlm KL base file "
           "(make one with --kl-base-out)",
           path, size, sizeof(KlBaseHeader));
    if (std::fread(&h_, sizeof h_, 1, file_.f) != 1)
      fail("{}: cannot read the KL base header ({})", path, std::strerror(errno));
    if (std::memcmp(h_.magic, kKlMagic, sizeof kKlMagic) != 0)
      fail("{}: not a kvlm KL base file (bad magic; make one with --kl-base-out)", path);
    if (h_.version != kKlVersion)
      fail("{}: KL base format version {}, this kvlm reads version {} (remake it with "
           "--kl-base-out)",
           path, h_.version, kKlVersion);
    if (h_.n_vocab == 0 || h_.top_k == 0 || h_.top_k > std::min<uint32_t>(kKlTopK, h_.n_vocab))
      fail("{}: corrupt KL base header: top_k {} for a vocabulary of {} tokens (expected 1..{})",
           path, h_.top_k, h_.n_vocab, kKlTopK);
    if (h_.n_ctx < 4 || h_.n_ctx > (int64_t{1} << 24) || h_.n_chunks < 1 ||
        h_.n_chunks > (int64_t{1} << 32))
      fail("{}: corrupt KL base header: n_ctx {}, n_chunks {}", path, h_.n_ctx, h_.n_chunks);
    if (h_.n_scored != h_.n_chunks * perplexity_scored_per_chunk(h_.n_ctx))
      fail("{}: corrupt KL base header: {} positions recorded, but {} chunks of {} tokens score "
           "{}",
           path, h_.n_scored, h_.n_chunks, h_.n_ctx,
           h_.n_chunks * perplexity_scored_per_chunk(h_.n_ctx));
    for (uint16_t t : {h_.dtype_k, h_.dtype_v})
      if (!dtype_info(t)) fail("{}: corrupt KL base header: cache type id {}", path, t);
    uint64_t want = 0;
    if (!checked_mul(static_cast<uint64_t>(h_.n_scored), kl_record_bytes(h_.top_k), &want) ||
        !checked_add(want, sizeof(KlBaseHeader), &want) || size != want)
      fail("{}: {} bytes, but its header promises {} ({} positions of {} bytes after a {}-byte "
           "header): truncated or corrupt; remake it with --kl-base-out",
           path, size, want, h_.n_scored, kl_record_bytes(h_.top_k), sizeof(KlBaseHeader));
  }

  const KlBaseHeader& header() const { return h_; }

  // The base must come from the same model, text, --ctx and chunk count as this run.
  void check(int32_t n_vocab, uint64_t model_hash, int64_t n_ctx, int64_t n_chunks,
             uint64_t tokens_hash) const {
    if (h_.n_vocab != static_cast<uint32_t>(n_vocab))
      fail("{}: made with a model of {} tokens of vocabulary; this model has {}: use the model "
           "that made it",
           path_, h_.n_vocab, n_vocab);
    if (h_.model_hash != model_hash)
      fail("{}: made with a different model (fingerprint {:016x}, this model's {:016x}): use the "
           "model that made it",
           path_, h_.model_hash, model_hash);
    if (h_.n_ctx != n_ctx)
      fail("{}: made with --ctx {}; this run uses --ctx {}: pass --ctx {}", path_, h_.n_ctx, n_ctx,
           h_.n_ctx);
    if (h_.n_chunks != n_chunks)
      fail("{}: covers {} chunks; this run evaluates {}: pass --chunks {} (or leave it out) with "
           "the text that made it",
           path_, h_.n_chunks, n_chunks, h_.n_chunks);
    if (h_.tokens_hash != tokens_hash)
      fail("{}: made from a different text (token hash {:016x}, this text's {:016x}): use the "
           "same -f file",
           path_, h_.tokens_hash, tokens_hash);
  }

  // Reads the next block.size() records and validates every value (at a chunk boundary, so the
  // per-position loop that follows never meets a bad id). mask [n_vocab] scratch, left zeroed.
  void read(RecordBlock& block, uint8_t* mask) {
    const int64_t k = block.top_k;
    for (int64_t i = 0; i < block.size(); ++i, ++n_read_) {
      int32_t* ids = block.ids.data() + i * k;
      float* lps = block.logprobs.data() + i * k;
      if (std::fread(&block.target_logprob[i], 8, 1, file_.f) != 1 ||
          std::fread(&block.rest[i], 8, 1, file_.f) != 1 ||
          std::fread(ids, 4, k, file_.f) != static_cast<size_t>(k) ||
          std::fread(lps, 4, k, file_.f) != static_cast<size_t>(k))
        fail("{}: read failed at record {} ({})", path_, n_read_,
             std::feof(file_.f) ? "end of file" : std::strerror(errno));
      const double tlp = block.target_logprob[i], rest = block.rest[i];
      if (!plausible_logprob(tlp) || !std::isfinite(rest) || rest < 0 || rest > 1 + 1e-6)
        fail("{}: corrupt record {}: target log-probability {}, rest mass {}", path_, n_read_, tlp,
             rest);
      int64_t j = 0;
      for (; j < k; ++j) {
        if (ids[j] < 0 || static_cast<uint32_t>(ids[j]) >= h_.n_vocab || mask[ids[j]] ||
            !plausible_logprob(lps[j]))
          break;
        mask[ids[j]] = 1;
      }
      for (int64_t m = 0; m < j; ++m) mask[ids[m]] = 0;
      if (j < k)
        fail("{}: corrupt record {}: entry {} (token id {} out of range or repeated, or "
             "log-probability {} not finite and <= 0)",
             path_, n_read_, j, ids[j], lps[j]);
    }
  }

 private:
  std::string path_;
  File file_;
  KlBaseHeader h_{};
  int64_t n_read_ = 0;
};

// Writes to PATH.tmp and renames it to PATH once every record is written, so an interrupted run
// never leaves a partial base file behind.
class KlBaseWriter {
 public:
  KlBaseWriter(const std::string& path, const KlBaseHeader& h)
      : path_(path), tmp_(path + ".tmp") {
    file_.f = std::fopen(tmp_.c_str(), "wb");
    if (!file_.f) fail("{}: cannot create ({})", tmp_, std::strerror(errno));
    if (std::fwrite(&h, sizeof h, 1, file_.f) != 1)
      fail("{}: write failed ({})", tmp_, std::strerror(errno));
  }
  ~KlBaseWriter() {
    if (!done_) {
      std::fclose(file_.f);
      file_.f = nullptr;
      std::remove(tmp_.c_str());
    }
  }
  void write(const RecordBlock& block) {
    const int64_t k = block.top_k;
    for (int64_t i = 0; i < block.size(); ++i)
      if (std::fwrite(&block.target_logprob[i], 8, 1, file_.f) != 1 ||
          std::fwrite(&block.rest[i], 8, 1, file_.f) != 1 ||
          std::fwrite(block.ids.data() + i * k, 4, k, file_.f) != static_cast<size_t>(k) ||
          std::fwrite(block.logprobs.data() + i * k, 4, k, file_.f) != static_cast<size_t>(k))
        fail("{}: write failed ({})", tmp_, std::strerror(errno));
  }
  void finish() {
    const bool ok = std::fflush(file_.f) == 0 && !std::ferror(file_.f);
    const int closed = std::fclose(file_.f);
    file_.f = nullptr;
    if (!ok || closed != 0) {
      std::remove(tmp_.c_str());
      done_ = true;
      fail("{}: write failed ({})", tmp_, std::strerror(errno));
    }
    if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
      const int err = errno;
      std::remove(tmp_.c_str());
      done_ = true;
      fail("{}: cannot rename {} to it ({})", path_, tmp_, std::strerror(err));
    }
    done_ = true;
  }

 private:
  std::string path_, tmp_;
  File file_;
  bool done_ = false;
};

// Mean and llama.cpp's standard error of the mean: sqrt(var / (n - 1)).
struct MeanErr {
  double mean = 0, err = 0;
};
MeanErr mean_err(double sum, double sum2, int64_t n) {
  MeanErr r;
  if (n <= 0) return r;
  r.mean = sum / n;
  const double var = sum2 / n - r.mean * r.mean;
  r.err = n > 1 && var > 0 ? std::sqrt(var / (n - 1)) : 0;
  return r;
}

// Value at quantile q of v (reorders v).
double quantile(std::vector<double>& v, double q) {
  if (v.empty()) return 0;
  const auto k = static_cast<size_t>(std::min<double>(v.size() - 1, q * (v.size() - 1) + 0.5));
  std::nth_element(v.begin(), v.begin() + k, v.end());
  return v[k];
}

}  // namespace

std::vector<int32_t> perplexity_tokens(const Tokenizer& tok, std::string_view text) {
  return tok.encode(text, tok.add_bos_default(), /*parse_special=*/false);
}

uint64_t model_fingerprint(const Model& model) {
  uint64_t h = kFnvOffset;
  const GgufFile& f = model.gguf();
  fnv_pod(h, f.file_size());
  fnv_pod(h, model.config().n_vocab);
  for (const GgufTensorInfo& t : f.tensors()) {
    fnv_bytes(h, t.name.data(), t.name.size());
    fnv_pod(h, t.type);
    for (int64_t d : t.ne) fnv_pod(h, d);
    fnv_pod(h, t.offset);
    fnv_bytes(h, t.data, std::min<uint64_t>(t.n_bytes, 256));
  }
  return h;
}

PerplexityResult perplexity(const Model& model, std::span<const int32_t> tokens, int32_t bos,
                            const PerplexityOptions& opts, ThreadPool& pool,
                            const std::function<void(const PerplexityProgress&)>& on_chunk) {
  const ModelConfig& c = model.config();
  const int32_t n_vocab = c.n_vocab;
  const int64_t n_ctx = opts.n_ctx;
  if (n_ctx < 4) fail("--ctx {} is too small: a chunk needs at least 4 tokens", n_ctx);
  if (n_ctx > c.n_ctx_train && c.arch->pos == PosKind::Learned)
    fail("--ctx {} is larger than the {} positions this model has learned", n_ctx, c.n_ctx_train);
  if (!opts.kl_base.empty() && !opts.kl_base_out.empty())
    fail("--kl-base and --kl-base-out together: make the base in one run, compare in another");
  if (opts.kl_ref && (!opts.kl_base.empty() || !opts.kl_base_out.empty()))
    fail("--kl-ref compares in process: leave out --kl-base and --kl-base-out");
  if (bos >= n_vocab) fail("BOS id {} is outside the vocabulary of {} tokens", bos, n_vocab);

  PerplexityResult res;
  res.n_text_tokens = static_cast<int64_t>(tokens.size());
  res.n_ctx = n_ctx;
  res.n_chunks_max = res.n_text_tokens / n_ctx;
  if (res.n_chunks_max == 0)
    fail("the text has {} tokens, fewer than one chunk of --ctx {}: use a longer text or a "
         "smaller --ctx",
         res.n_text_tokens, n_ctx);

  std::optional<KlBaseReader> base;
  if (!opts.kl_base.empty()) base.emplace(opts.kl_base);

  int64_t n_chunks = res.n_chunks_max;
  if (opts.n_chunks >= 0) n_chunks = std::min(opts.n_chunks, n_chunks);
  if (base && opts.n_chunks < 0) {
    n_chunks = base->header().n_chunks;
    if (n_chunks > res.n_chunks_max)
      fail("{}: covers {} chunks of {} tokens, but this text holds only {}: use the text that "
           "made it",
           opts.kl_base, n_chunks, n_ctx, res.n_chunks_max);
  }
  if (n_chunks < 1) fail("--chunks {}: nothing to evaluate", opts.n_chunks);
  res.n_chunks = n_chunks;

  // The evaluated tokens, BOS substituted as llama.cpp does: [n_chunks, n_ctx].
  std::vector<int32_t> evaluated(tokens.begin(), tokens.begin() + n_chunks * n_ctx);
  if (bos >= 0)
    for (int64_t ic = 0; ic < n_chunks; ++ic) evaluated[ic * n_ctx] = bos;
  uint64_t tokens_hash = kFnvOffset;
  fnv_bytes(tokens_hash, evaluated.data(), evaluated.size() * sizeof(int32_t));
  const uint64_t model_hash = model_fingerprint(model);
  if (base) base->check(n_vocab, model_hash, n_ctx, n_chunks, tokens_hash);

  const int64_t first = n_ctx / 2;                            // first scored position
  const int64_t n_score = perplexity_scored_per_chunk(n_ctx);  // positions first .. n_ctx-2
  res.n_scored = n_chunks * n_score;
  const int32_t top_k = std::min(kKlTopK, n_vocab);

  std::optional<KlBaseWriter> out;
  if (!opts.kl_base_out.empty()) {
    KlBaseHeader h{};
    std::memcpy(h.magic, kKlMagic, sizeof kKlMagic);
    h.version = kKlVersion;
    h.top_k = static_cast<uint32_t>(top_k);
    h.n_vocab = static_cast<uint32_t>(n_vocab);
    h.dtype_k = static_cast<uint16_t>(opts.dtype_k);
    h.dtype_v = static_cast<uint16_t>(opts.dtype_v);
    h.n_ctx = n_ctx;
    h.n_chunks = n_chunks;
    h.n_scored = res.n_scored;
    h.model_hash = model_hash;
    h.tokens_hash = tokens_hash;
    out.emplace(opts.kl_base_out, h);
  }

  // A chunk's cache: exactly one chunk, unless a window evicts within it.
  auto chunk_kv = [n_ctx](KvOptions kvo) {
    if (!kvo.window) kvo.n_ctx = n_ctx;
    return kvo;
  };
  KvOptions kvo = opts.kv;
  kvo.dtype_k = opts.dtype_k;
  kvo.dtype_v = opts.dtype_v;
  Session session(model, chunk_kv(kvo), pool, opts.n_batch);
  std::optional<Session> ref;
  // [n_score, n_vocab] the reference run's scored logits: rows of ref's own buffer, valid until
  // ref is fed again (next chunk); the tested session has its own, so no copy is needed.
  std::span<const float> ref_logits;
  if (opts.kl_ref) ref.emplace(model, chunk_kv(*opts.kl_ref), pool, opts.n_batch);
  const bool comparing = base || ref;
  RecordBlock block;  // [n_score] records of the current chunk (read or written)
  block.resize(n_score, base ? base->header().top_k : top_k);
  std::vector<uint8_t> mask(static_cast<size_t>(pool.size()) * n_vocab, 0);  // [n_threads, n_vocab]
  std::vector<double> pos_nll(n_score), pos_kld(n_score);  // [n_score] of the current chunk
  std::vector<double> pos_base_lp(n_score);  // [n_score] ln p_base(target) when comparing
  std::vector<uint8_t> pos_same_top(n_score);              // [n_score]
  std::vector<double> klds;                                // [n_scored] when comparing
  if (comparing) klds.reserve(static_cast<size_t>(res.n_scored));

  double nll_sum = 0, nll_sum2 = 0;    // over scored tokens
  double kld_sum = 0, kld_sum2 = 0, kld_max = 0;
  double dnll_sum = 0, dnll_sum2 = 0;  // NLL - NLL_base
  double base_nll_sum = 0;
  int64_t n_same_top = 0, n_done = 0;
  Timer total;

  for (int64_t ic = 0; ic < n_chunks; ++ic) {
    Timer t;
    const std::span<const int32_t> chunk(evaluated.data() + ic * n_ctx, n_ctx);
    if (base) base->read(block, mask.data());
    if (ref) {
      ref->reset();
      ref->feed(chunk.first(first));
      ref_logits = ref->feed_all_logits(chunk.subspan(first, n_score));
    }
    session.reset();
    // The first half only conditions: no logits needed beyond the last one, which feed() returns
    // anyway. The scored half's logits: [n_score, n_vocab], rows for positions first .. n_ctx-2.
    session.feed(chunk.first(first));
    const std::span<const float> logits = session.feed_all_logits(chunk.subspan(first, n_score));

    // Positions in parallel (each writes only its own slots; a mask row per thread), then summed
    // in order below, so results do not depend on the thread count.
    pool.parallel_for(n_score, [&](int64_t j0, int64_t j1, int ti) {
      uint8_t* m = mask.data() + static_cast<size_t>(ti) * n_vocab;  // [n_vocab], zero between uses
      for (int64_t j = j0; j < j1; ++j) {
        const float* row = logits.data() + j * n_vocab;
        const int32_t target = chunk[first + j + 1];
        RowStats rs;
        if (out) {
          int32_t* ids = block.ids.data() + j * top_k;  // [top_k]
          float* lps = block.logprobs.data() + j * top_k;
          top_k_ids(row, n_vocab, top_k, ids);
          for (int32_t k = 0; k < top_k; ++k) m[ids[k]] = 1;
          rs = row_stats(row, n_vocab, m);
          for (int32_t k = 0; k < top_k; ++k) {
            m[ids[k]] = 0;
            lps[k] = logprob_f32(row, ids[k], rs.lse);
          }
          block.target_logprob[j] = double{row[target]} - rs.lse;
          block.rest[j] = rs.rest;
        } else if (base) {
          const int64_t k_base = block.top_k;
          const int32_t* ids = block.ids.data() + j * k_base;  // [k_base]
          const float* lps = block.logprobs.data() + j * k_base;
          const double p_rest = block.rest[j];
          for (int64_t k = 0; k < k_base; ++k) m[ids[k]] = 1;
          rs = row_stats(row, n_vocab, m);
          // KL(P || Q) over P's top-K tokens and one bucket for all the others (see the header).
          double kld = 0;
          for (int64_t k = 0; k < k_base; ++k) {
            m[ids[k]] = 0;
            const double lp = lps[k];
            const double lq = logprob_f32(row, ids[k], rs.lse);
            kld += std::exp(lp) * (lp - lq);
          }
          if (p_rest > 0)
            kld += p_rest * (std::log(p_rest) -
                             std::log(std::max(rs.rest, std::numeric_limits<double>::min())));
          pos_kld[j] = kld;
          pos_same_top[j] = rs.top1 == ids[0];
          pos_base_lp[j] = block.target_logprob[j];
        } else if (ref) {
          // Exact KL(P_ref || Q) = sum_i p_i (ln p_i - ln q_i) over all n_vocab tokens.
          const float* prow = ref_logits.data() + j * n_vocab;  // [n_vocab]
          const RowStats ps = row_stats(prow, n_vocab, nullptr);
          rs = row_stats(row, n_vocab, nullptr);
          double kld = 0;
          for (int32_t i = 0; i < n_vocab; ++i) {
            const double lp = double{prow[i]} - ps.lse, lq = double{row[i]} - rs.lse;
            kld += std::exp(lp) * (lp - lq);
          }
          pos_kld[j] = std::max(kld, 0.0);  // rounding leaves ~-1e-17 for identical rows
          pos_same_top[j] = rs.top1 == ps.top1;
          pos_base_lp[j] = double{prow[target]} - ps.lse;
        } else {
          rs = row_stats(row, n_vocab, nullptr);
        }
        pos_nll[j] = rs.lse - row[target];
      }
    });

    for (int64_t j = 0; j < n_score; ++j) {
      const double nll = pos_nll[j];
      nll_sum += nll;
      nll_sum2 += nll * nll;
      if (comparing) {
        const double kld = pos_kld[j];
        kld_sum += kld;
        kld_sum2 += kld * kld;
        kld_max = std::max(kld_max, kld);
        klds.push_back(kld);
        n_same_top += pos_same_top[j];
        const double dnll = nll + pos_base_lp[j];
        dnll_sum += dnll;
        dnll_sum2 += dnll * dnll;
        base_nll_sum -= pos_base_lp[j];
      }
    }
    n_done += n_score;
    if (out) out->write(block);
    if (on_chunk) {
      PerplexityProgress p;
      p.chunk = ic;
      p.n_chunks = n_chunks;
      p.ppl = std::exp(nll_sum / n_done);
      if (comparing) p.kld_mean = kld_sum / n_done;
      p.chunk_seconds = t.ms() / 1000;
      on_chunk(p);
    }
  }
  if (out) out->finish();
  res.seconds = total.ms() / 1000;

  const MeanErr nll = mean_err(nll_sum, nll_sum2, n_done);
  res.nll_mean = nll.mean;
  res.ppl = std::exp(nll.mean);
  res.ppl_err = nll.err * res.ppl;
  if (comparing) {
    KlStats kl;
    kl.n = n_done;
    const MeanErr kld = mean_err(kld_sum, kld_sum2, n_done);
    kl.kld_mean = kld.mean;
    kl.kld_err = kld.err;
    kl.kld_max = kld_max;
    kl.kld_p99 = quantile(klds, 0.99);
    kl.kld_median = quantile(klds, 0.5);
    kl.same_top = static_cast<double>(n_same_top) / n_done;
    kl.base_ppl = std::exp(base_nll_sum / n_done);
    const MeanErr d = mean_err(dnll_sum, dnll_sum2, n_done);
    kl.ln_ppl_ratio = d.mean;
    kl.ln_ppl_ratio_err = d.err;
    kl.base_dtype_k = base ? static_cast<DType>(base->header().dtype_k) : opts.kl_ref->dtype_k;
    kl.base_dtype_v = base ? static_cast<DType>(base->header().dtype_v) : opts.kl_ref->dtype_v;
    kl.full_vocab = !base;
    res.kl = kl;
  }
  return res;
}

}  // namespace kvlm
