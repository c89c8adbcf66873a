// The KV view endpoints without HTTP (docs/SERVER.md): GET /kv/state renders a scheduler's
// KvSnapshot as JSON, GET /kv/events streams KvEvents and finished requests as server-sent events
// to a bounded number of subscribers (KvEventHub).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "engine/attention_map.h"
#include "engine/scheduler.h"
#include "server/api.h"

namespace kvlm::server {

// GET /kv/state: the snapshot, the scheduler's counters and the model's name.
json kv_state_json(const KvSnapshot& snap, const SchedulerStats& stats, const ServedModel& model);
// One event as the stream's JSON object: {"type": kv_event_name, "id", ...}.
json kv_event_json(const KvEvent& e);

// POST /kv/attention: which text, which layer's query head, how many of its last tokens as rows.
struct AttentionQuery {
  std::vector<int32_t> tokens;  // [n] the text: at most the server's context
  int32_t layer = 0;
  int32_t head = 0;
  int64_t n_query = 0;  // rows: the last n_query tokens
};
// {"messages": [...]} (rendered as /v1/chat/completions renders them, without the generation
// prompt: the map covers the conversation as it stands) or {"prompt": "text"}, with "layer",
// "head" and "last" (rows, default 32, at most kMaxAttentionRows; more than the text has: all).
// HttpError 400 naming the parameter for anything else.
AttentionQuery parse_attention_request(const json& body, const Tokenizer& tok,
                                       const ServedModel& m, const ModelConfig& c);
// {"layer", "head", "kv_head", "window", "q0", "n_pos", "tokens": [piece per position],
//  "weights": [[n_pos weights] per row, rounded to 5 decimals]}
json attention_map_json(const AttentionMap& map, std::span<const int32_t> tokens,
                        const Tokenizer& tok);

// One /kv/events client's queue: filled by publishers, drained by its HTTP thread.
class KvSubscriber {
 public:
  // The events queued, as SSE text; waits up to max_wait for one. Empty: none came, or closed.
  std::string take(std::chrono::milliseconds max_wait);
  bool closed() const;

 private:
  friend class KvEventHub;
  // Events a client has not read are dropped beyond this (the oldest first): a slow client never
  // grows the server's memory.
  static constexpr size_t kMaxQueued = 1024;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::string> q_;  // SSE chunks
  int64_t n_dropped_ = 0;      // told to the client in the next chunk
  bool closed_ = false;
};

// The subscribers of /kv/events. on_watch(true) runs when the first one arrives, on_watch(false)
// when the last leaves (the server starts and stops the scheduler's event tracking), under the
// hub's lock.
class KvEventHub {
 public:
  KvEventHub(int max_subscribers, std::function<void(bool)> on_watch)
      : max_(max_subscribers), on_watch_(std::move(on_watch)) {}
  // Null when max_subscribers are connected or the hub is closed.
  std::shared_ptr<KvSubscriber> subscribe();
  void unsubscribe(const std::shared_ptr<KvSubscriber>& s);
  // To every subscriber, as one SSE event "data: {json}".
  void publish(const json& event);
  bool watched() const;
  // Every subscriber's stream ends (server shutdown); later subscribe() calls get null.
  void close();
  int max_subscribers() const { return max_; }

 private:
  const int max_;
  std::function<void(bool)> on_watch_;
  mutable std::mutex mu_;
  std::vector<std::shared_ptr<KvSubscriber>> subs_;
  bool closed_ = false;
};

}  // namespace kvlm::server
