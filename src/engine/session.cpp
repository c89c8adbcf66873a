#include "engine/session.h"

#include <algorithm>

#include "base/error.h"
#include "base/timer.h"
#include "engine/vocab_trie.h"
#include "grammar/matcher.h"
#include "tokenizer/tokenizer.h"

namespace kvlm {

namespace {
KvOptions plain_options(DType dtype_k, DType dtype_v, int64_t n_ctx) {
  KvOptions o;
  o.dtype_k = dtype_k;
  o.dtype_v = dtype_v;
  o.n_ctx = n_ctx;
  return o;
}

KvShape cache_shape(const Model& model, const KvOptions& kv) {
  KvShape s = model.kv_shape(kv.dtype_k, kv.dtype_v);
  s.kivi_residual = kv.kivi_residual;
  s.rotate = kv.rotate;
  return s;
}

}  // namespace

Session::Session(const Model& model, DType dtype_k, DType dtype_v, int64_t n_ctx, ThreadPool& pool,
                 int64_t n_batch)
    : Session(model, plain_options(dtype_k, dtype_v, n_ctx), pool, n_batch) {}

int64_t Eviction::count(int64_t n_held, int64_t m, int64_t n_ctx) const {
  const int64_t need = n_held + m - n_ctx;
  if (need <= 0) return 0;
  if (!on()) return -1;
  int64_t c = window ? std::max(need, window_chunk) : std::max(need, (n_held - n_keep) / 2);
  c = std::min(c, n_held - kept() - reach);
  return c < need ? -1 : c;  // even evicting everything evictable leaves too little room
}

void Eviction::validate(int64_t n_ctx, bool kivi) const {
  if (window && n_keep >= 0) fail("--kv-window and --keep are two eviction policies: choose one");
  if (window) {
    if (n_sinks < 0 || n_sinks >= n_ctx)
      fail("--kv-sinks {} must be at least 0 and smaller than sinks + window ({})", n_sinks, n_ctx);
    if (window_chunk < 1 || window_chunk > n_ctx - n_sinks)
      fail("window eviction chunk {} must be in [1, window]", window_chunk);
  }
  if (n_keep >= n_ctx) fail("--keep {} must be smaller than the context ({})", n_keep, n_ctx);
  if (on() && room(n_ctx) < 1)
    fail("{} with this model's sliding window of {} tokens needs a context of at least {} "
         "(kept + window), got {}",
         window ? "--kv-window / --kv-sinks" : "--keep", reach + 1, kept() + reach + 1, n_ctx);
  if (kivi && on())
    fail("the KIVI cache (--kv-residual) cannot evict tokens: drop --kv-window / --keep");
}

Session::Session(const Model& model, const KvOptions& kv, ThreadPool& pool, int64_t n_batch)
    : model_(model),
      pool_(pool),
      opts_(kv),
      eviction_(kv.eviction()),
      kv_(kv_seq_config(cache_shape(model, kv), kv.n_ctx, kv.alloc, model.kv_rope(),
                        model.config().layer_window, std::max<int64_t>(1, n_batch))),
      n_batch_(std::max<int64_t>(1, n_batch)) {
  eviction_.reach = std::max(0, model.config().max_window() - 1);
  eviction_.validate(kv.n_ctx, kv.kivi_residual >= 0);
  KVLM_CHECK(kv_.admit(kSeq, {}, "", 0, KvHit{}));
}

KvStats Session::kv_stats() const {
  const KvManagerStats m = kv_.stats();
  KvStats s;
  s.n_tokens = n_cached();
  s.n_ctx = opts_.n_ctx;
  s.capacity = kv_.capacity_tokens();
  s.bytes_used = m.bytes_used;
  s.bytes_allocated = m.bytes_total;
  s.n_evicted = n_evicted_;
  return s;
}

bool Session::make_room(int64_t m) {
  const Eviction& ev = eviction_;
  const int64_t count = ev.count(n_cached(), m, opts_.n_ctx);
  if (count <= 0) return count == 0;
  const int64_t begin = ev.kept();
  // One sequence shares no block, so the shift never needs a free block for a copy, and a window
  // group's renewed blocks (at most its window's) fit in what its pool holds for it.
  KVLM_CHECK(kv_.evict(kSeq, begin, count));
  tokens_.erase(tokens_.begin() + begin, tokens_.begin() + begin + count);
  last_evicted_ += count;
  n_evicted_ += count;
  return true;
}

std::span<const float> Session::run(std::span<const int32_t> tokens, bool all_logits,
                                    AttnProbe* probe) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) fail("no tokens to run");
  last_evicted_ = 0;
  if (!evicts() && n_cached() + n > opts_.n_ctx)
    fail("context full: {} tokens held + {} new exceed the context of {} tokens (raise -c)",
         n_cached(), n, opts_.n_ctx);
  const int64_t n_vocab = model_.config().n_vocab;
  if (all_logits) all_logits_.resize(static_cast<size_t>(n * n_vocab));
  std::span<const float> last;
  for (int64_t i = 0, m = 0; i < n; i += m) {
    // An evicting cache can make room for at most what lies past the kept prefix (the sinks or
    // --keep tokens), so longer feeds go in pieces of that size.
    const int64_t room = evicts() ? eviction_.room(opts_.n_ctx) : n_batch_;
    m = std::min({n_batch_, room, n - i});
    if (!make_room(m))
      fail("context full: {} tokens held + {} new exceed the context of {} tokens and the "
           "eviction policy cannot free enough (raise -c or the window)",
           n_cached(), m, opts_.n_ctx);
    auto chunk = tokens.subspan(i, m);
    const int64_t pos0 = n_cached();
    // The blocks hold n_ctx tokens (static), or grow to them (dynamic).
    KVLM_CHECK(kv_.reserve(kSeq, m));
    const BatchSeq q{chunk, pos0, kv_.seq_caches(kSeq), all_logits, probe};
    try {
      last = model_.forward({&q, 1}, kv_.store(), scratch_, pool_);
    } catch (...) {
      kv_.truncate(kSeq, pos0);  // a refused pass (an id out of range) leaves the cache as it was
      throw;
    }
    tokens_.insert(tokens_.end(), chunk.begin(), chunk.end());
    kv_.commit(kSeq, tokens_, pos0 + m);
    if (all_logits) std::copy(last.begin(), last.end(), all_logits_.begin() + i * n_vocab);
  }
  if (all_logits) return all_logits_;
  return last.subspan(last.size() - n_vocab);
}

std::span<const float> Session::feed(std::span<const int32_t> tokens) { return run(tokens, false); }

std::span<const float> Session::feed_all_logits(std::span<const int32_t> tokens) {
  return run(tokens, true);
}

std::span<const float> Session::feed_probed(std::span<const int32_t> tokens, AttnProbe& probe) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n > n_batch_) fail("attention map: {} tokens exceed one pass of {}", n, n_batch_);
  if (n_cached() + n > opts_.n_ctx)
    fail("attention map: {} tokens held + {} new exceed the context of {} tokens", n_cached(), n,
         opts_.n_ctx);
  return run(tokens, false, &probe);
}

std::span<const float> Session::recompute(std::span<const int32_t> tokens) {
  std::vector<int32_t> all = tokens_;
  all.insert(all.end(), tokens.begin(), tokens.end());
  reset();
  return run(all, false);
}

void Session::truncate(int64_t n) {
  KVLM_CHECK(n >= 0 && n <= static_cast<int64_t>(tokens_.size()));
  tokens_.resize(static_cast<size_t>(n));
  if (kv_.can_truncate(kSeq, n)) {
    kv_.truncate(kSeq, n);
    return;
  }
  // KIVI: quantized groups cannot return to f16; a sliding window has released blocks position
  // n reads. The kept prefix is recomputed (giving the state a fresh prefill of it has).
  std::vector<int32_t> keep = tokens_;
  reset();
  if (!keep.empty()) run(keep, false);
}

void Session::reset() {
  kv_.release(kSeq, {}, 0, false);
  KVLM_CHECK(kv_.admit(kSeq, {}, "", 0, KvHit{}));
  tokens_.clear();
  n_evicted_ = 0;
}

const char* stop_reason_name(StopReason r) {
  switch (r) {
    case StopReason::Eog: return "end of generation";
    case StopReason::Length: return "length";
    case StopReason::ContextFull: return "context full";
    case StopReason::Callback: return "stopped";
    case StopReason::StopToken: return "stop token";
    case StopReason::GrammarDone: return "grammar complete";
  }
  return "?";
}

namespace {

// GenerateOptions::grammar over one generation: the mask before each draw, the state after it.
class Constraint {
 public:
  Constraint(std::shared_ptr<const Grammar> g, const Tokenizer& tok, int32_t n_vocab) {
    if (!g) return;
    trie_ = vocab_token_trie(tok);
    matcher_ = std::make_unique<GrammarMatcher>(std::move(g), *trie_);
    mask_.resize((static_cast<size_t>(std::max(n_vocab, tok.n_vocab())) + 31) / 32);
  }
  bool on() const { return matcher_ != nullptr; }
  const uint32_t* mask() {
    if (!matcher_) return nullptr;
    matcher_->fill_mask(mask_);
    return mask_.data();
  }
  // A drawn token that is not an end of generation; the mask allowed it.
  void accept(int32_t id) {
    if (matcher_ && !matcher_->accept_token(id))
      fail("the grammar refused token {}, which its mask allowed", id);
  }
  bool finished() const { return matcher_ && matcher_->finished(); }

 private:
  std::unique_ptr<TokenTrie> trie_;
  std::unique_ptr<GrammarMatcher> matcher_;
  std::vector<uint32_t> mask_;  // [ceil(n_vocab / 32)]
};

}  // namespace

GenerateStats generate(Session& session, const Tokenizer& tok, std::span<const int32_t> prompt,
                       const GenerateOptions& opts, const std::function<bool(int32_t)>& on_token) {
  GenerateStats st;
  st.n_prompt = static_cast<int64_t>(prompt.size());
  if (prompt.empty()) fail("the prompt is empty (no tokens)");
  const int64_t n_ctx = session.n_ctx();
  if (!session.evicts() && session.n_cached() + st.n_prompt > n_ctx)
    fail("the prompt has {} tokens but the context holds {} (raise -c, at most the model's {})",
         st.n_prompt, n_ctx - session.n_cached(), session.model().config().n_ctx_train);
  Sampler sampler(opts.sampling);
  const int32_t n_vocab = session.model().config().n_vocab;
  Constraint constraint(opts.grammar, tok, n_vocab);

  auto trace = [&](int64_t step, int64_t n_computed, double ms) {
    if (!opts.on_step) return;
    StepTrace tr;
    tr.step = step;
    tr.prefill = step == 0;
    tr.n_computed = n_computed;
    tr.n_cached = session.n_cached();
    tr.n_evicted = session.last_evicted();
    if (tr.n_evicted > 0) tr.evict_begin = session.kv_options().eviction().kept();
    // The computed tokens are the history's last n_computed (all of it when recomputing; a long
    // prompt under eviction: the part still held).
    const std::vector<int32_t>& hist = session.tokens();
    tr.pos0 = static_cast<int64_t>(hist.size()) -
              std::min<int64_t>(n_computed, static_cast<int64_t>(hist.size()));
    tr.tokens = std::span<const int32_t>(hist).subspan(static_cast<size_t>(tr.pos0));
    tr.ms = ms;
    tr.kv = session.kv_stats();
    opts.on_step(tr);
  };
  Timer t;
  std::span<const float> logits =
      opts.use_cache ? session.feed(prompt) : session.recompute(prompt);
  st.prefill_ms = t.ms();
  trace(0, opts.use_cache ? st.n_prompt : session.n_cached(), st.prefill_ms);
  t.reset();
  st.stop = StopReason::Length;
  for (int64_t i = 0; opts.n_predict < 0 || i < opts.n_predict; ++i) {
    const int32_t id =
        sampler.sample(logits.data(), n_vocab, session.tokens(), nullptr, constraint.mask());
    ++st.n_generated;
    const bool go_on = on_token(id);
    const bool eog = tok.is_eog(id);
    if (eog && (!opts.ignore_eos || constraint.on())) {  // a grammar's mask allows it when whole
      st.stop = StopReason::Eog;
      break;
    }
    if (!eog) constraint.accept(id);
    if (constraint.finished()) {
      st.stop = StopReason::GrammarDone;
      break;
    }
    if (std::find(opts.stop_tokens.begin(), opts.stop_tokens.end(), id) != opts.stop_tokens.end()) {
      st.stop = StopReason::StopToken;
      break;
    }
    if (!go_on) {
      st.stop = StopReason::Callback;
      break;
    }
    if (opts.n_predict >= 0 && i + 1 == opts.n_predict) break;
    if (!session.evicts() && session.n_cached() + 1 > n_ctx) {
      st.stop = StopReason::ContextFull;
      break;
    }
    const int32_t one[1] = {id};
    Timer ts;
    logits = opts.use_cache ? session.feed(one) : session.recompute(one);
    ++st.n_decode;
    trace(st.n_decode, opts.use_cache ? 1 : session.n_cached(), ts.ms());
  }
  st.decode_ms = t.ms();
  st.kv = session.kv_stats();
  return st;
}

}  // namespace kvlm
