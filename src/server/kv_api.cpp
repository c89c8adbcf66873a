#include "server/kv_api.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

#include <fmt/format.h>

#include "tensor/dtype.h"

namespace kvlm::server {

namespace {

// One letter per block (docs/SERVER.md): f free, c cached-free (held by no sequence, its contents
// still reusable by a prefix hit), u in use by one sequence, r in use by one and registered in
// the prefix index, s shared by several sequences (refs > 1).
std::string block_states(const KvViewGroup& g) {
  std::string out(g.refs.size(), 'f');
  for (size_t b = 0; b < g.refs.size(); ++b)
    out[b] = g.refs[b] > 1 ? 's' : g.refs[b] == 1 ? (g.cached[b] ? 'r' : 'u') : g.cached[b] ? 'c' : 'f';
  return out;
}

json group_json(const KvViewGroup& g) {
  return {{"window", g.window},
          {"n_layers", g.n_layers},
          {"n_blocks", g.blocks.n_total},
          {"n_free", g.blocks.n_free},
          {"n_used", g.blocks.n_used},
          {"n_cached", g.blocks.n_cached},
          {"n_cached_free", g.blocks.n_cached_free},
          {"n_shared", std::count_if(g.refs.begin(), g.refs.end(), [](int32_t r) { return r > 1; })},
          {"bytes_total", g.bytes_total},
          {"bytes_used", g.bytes_used},
          {"states", block_states(g)},
          {"refs", g.refs}};
}

json seq_json(const KvViewSeq& q, int32_t block_size) {
  json tables = json::array();
  for (const auto& t : q.tables) tables.push_back(t);
  // The last block holds n_held - (blocks - 1) x block_size positions; the others are full.
  const int64_t n_blocks = q.tables.empty() ? 0 : static_cast<int64_t>(q.tables[0].size());
  return {{"id", q.id},
          {"n_prompt", q.n_prompt},
          {"n_generated", q.n_generated},
          {"n_computed", q.n_computed},
          {"n_held", q.n_held},
          {"n_cached", q.n_cached},
          {"n_cached_blocks", q.n_cached / block_size},
          {"evict_begin", q.evict_begin},
          {"n_evicted", q.n_evicted},
          {"last_block_fill", n_blocks > 0 ? q.n_held - (n_blocks - 1) * block_size : 0},
          {"tables", std::move(tables)}};
}

}  // namespace

json kv_state_json(const KvSnapshot& snap, const SchedulerStats& st, const ServedModel& model) {
  const KvShape& s = snap.shape;
  json j;
  j["model"] = {{"name", model.name()},
                {"n_layer", s.n_layer},
                {"n_head", snap.n_head},
                {"n_kv_head", s.n_kv_head},
                {"head_dim", s.head_dim},
                {"layer_window", snap.layer_window},
                {"n_ctx", model.n_ctx}};
  j["cache"] = {{"type_k", dtype_name(s.dtype_k)},
                {"type_v", dtype_name(s.dtype_v)},
                {"kivi_residual", s.kivi_residual},
                {"rotate", s.rotate},
                {"block_size", snap.block_size},
                {"bytes_per_token", snap.bytes_per_token},
                {"bytes_total", st.kv_bytes_total},
                {"bytes_used", st.kv_bytes_used},
                {"capacity_tokens", model.capacity_tokens},
                {"evicts", model.evicts}};
  j["groups"] = json::array();
  for (const KvViewGroup& g : snap.groups) j["groups"].push_back(group_json(g));
  j["running"] = json::array();
  for (const KvViewSeq& q : snap.running) j["running"].push_back(seq_json(q, snap.block_size));
  j["waiting"] = json::array();
  for (const KvViewWaiting& w : snap.waiting)
    j["waiting"].push_back({{"id", w.id}, {"n_prompt", w.n_prompt}, {"preempted", w.preempted}});
  j["counters"] = {{"prompt_tokens", st.prompt_tokens},
                   {"prompt_tokens_cached", st.prompt_tokens_cached},
                   {"generated_tokens", st.generated_tokens},
                   {"preemptions", st.n_preemptions},
                   {"evicted_tokens", snap.n_evicted_tokens},
                   {"requests_finished", st.requests_finished},
                   {"steps", st.n_steps}};
  return j;
}

namespace {

// An integer field in [lo, hi], or `fallback` when absent or null; 400 naming it otherwise.
int64_t int_field(const json& body, const char* key, int64_t lo, int64_t hi,
                  std::optional<int64_t> fallback = std::nullopt) {
  const auto it = body.find(key);
  if (it == body.end() || it->is_null()) {
    if (fallback) return *fallback;
    throw HttpError(400, fmt::format("'{}' is missing", key), key);
  }
  if (!it->is_number_integer())
    throw HttpError(400, fmt::format("'{}' must be an integer, got {}", key, it->type_name()), key);
  const int64_t v = it->is_number_unsigned() && it->get<uint64_t>() > uint64_t{INT64_MAX}
                        ? INT64_MAX
                        : it->get<int64_t>();
  if (v < lo || v > hi)
    throw HttpError(400, fmt::format("'{}' must be in [{}, {}], got {}", key, lo, hi, v), key);
  return v;
}

}  // namespace

AttentionQuery parse_attention_request(const json& body, const Tokenizer& tok,
                                       const ServedModel& m, const ModelConfig& c) {
  AttentionQuery a;
  const bool has_messages = body.contains("messages"), has_prompt = body.contains("prompt");
  if (has_messages == has_prompt)
    throw HttpError(400, "give either 'messages' (a chat) or 'prompt' (a text)", "messages");
  const char* param = has_messages ? "messages" : "prompt";
  if (has_messages) {
    a.tokens = render_chat(chat_messages(body), tok, m, /*add_generation_prompt=*/false);
  } else {
    const json& p = body["prompt"];
    if (!p.is_string())
      throw HttpError(400, fmt::format("'prompt' must be a string, got {}", p.type_name()), param);
    a.tokens = tok.encode(p.get_ref<const std::string&>(), tok.add_bos_default(), true);
    if (a.tokens.empty()) throw HttpError(400, "the prompt has no tokens", param);
  }
  if (static_cast<int64_t>(a.tokens.size()) > m.n_ctx)
    throw HttpError(400,
                    fmt::format("the text has {} tokens, more than the context of {}",
                                a.tokens.size(), m.n_ctx),
                    param, "context_length_exceeded");
  a.layer = static_cast<int32_t>(int_field(body, "layer", 0, c.n_layer - 1));
  a.head = static_cast<int32_t>(int_field(body, "head", 0, c.n_head - 1));
  a.n_query = std::min<int64_t>(int_field(body, "last", 1, kMaxAttentionRows, 32),
                                static_cast<int64_t>(a.tokens.size()));
  return a;
}

json attention_map_json(const AttentionMap& map, std::span<const int32_t> tokens,
                        const Tokenizer& tok) {
  json pieces = json::array();
  for (int32_t id : tokens) pieces.push_back(tok.token_bytes(id, /*render_special=*/true));
  json rows = json::array();
  for (int64_t i = 0; i < map.n_pos - map.q0; ++i) {
    std::vector<double> row(static_cast<size_t>(map.n_pos));
    for (int64_t j = 0; j < map.n_pos; ++j)
      row[j] = std::round(map.weights[i * map.n_pos + j] * 1e5) / 1e5;
    rows.push_back(std::move(row));
  }
  return {{"layer", map.layer}, {"head", map.head}, {"kv_head", map.kv_head},
          {"window", map.window}, {"q0", map.q0},     {"n_pos", map.n_pos},
          {"tokens", std::move(pieces)}, {"weights", std::move(rows)}};
}

json kv_event_json(const KvEvent& e) {
  return {{"type", kv_event_name(e.kind)}, {"id", e.id},           {"n_prompt", e.n_prompt},
          {"n_cached", e.n_cached},       {"n_blocks", e.n_blocks}, {"n_tokens", e.n_tokens}};
}

// ---- subscribers ---------------------------------------------------------------------------------

std::string KvSubscriber::take(std::chrono::milliseconds max_wait) {
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait_for(l, max_wait, [&] { return closed_ || !q_.empty(); });
  std::string out;
  if (n_dropped_ > 0) {
    out = sse_event({{"type", "dropped"}, {"n_events", n_dropped_}});
    n_dropped_ = 0;
  }
  for (const std::string& e : q_) out += e;
  q_.clear();
  return out;
}

bool KvSubscriber::closed() const {
  std::lock_guard<std::mutex> l(mu_);
  return closed_;
}

std::shared_ptr<KvSubscriber> KvEventHub::subscribe() {
  std::lock_guard<std::mutex> l(mu_);
  if (closed_ || static_cast<int>(subs_.size()) >= max_) return nullptr;
  subs_.push_back(std::make_shared<KvSubscriber>());
  if (subs_.size() == 1 && on_watch_) on_watch_(true);
  return subs_.back();
}

void KvEventHub::unsubscribe(const std::shared_ptr<KvSubscriber>& s) {
  std::lock_guard<std::mutex> l(mu_);
  const auto it = std::find(subs_.begin(), subs_.end(), s);
  if (it == subs_.end()) return;
  subs_.erase(it);
  if (subs_.empty() && on_watch_) on_watch_(false);
}

void KvEventHub::publish(const json& event) {
  std::lock_guard<std::mutex> l(mu_);
  if (subs_.empty()) return;
  const std::string chunk = sse_event(event);
  for (const auto& s : subs_) {
    {
      std::lock_guard<std::mutex> sl(s->mu_);
      s->q_.push_back(chunk);
      if (s->q_.size() > KvSubscriber::kMaxQueued) {
        s->q_.pop_front();
        ++s->n_dropped_;
      }
    }
    s->cv_.notify_one();
  }
}

bool KvEventHub::watched() const {
  std::lock_guard<std::mutex> l(mu_);
  return !subs_.empty();
}

void KvEventHub::close() {
  std::lock_guard<std::mutex> l(mu_);
  closed_ = true;
  for (const auto& s : subs_) {
    {
      std::lock_guard<std::mutex> sl(s->mu_);
      s->closed_ = true;
    }
    s->cv_.notify_one();
  }
}

}  // namespace kvlm::server
