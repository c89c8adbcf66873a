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
#include <string>
#include <vector>

#include "engine/scheduler.h"
#include "server/api.h"

namespace kvlm::server {

// GET /kv/state: the snapshot, the scheduler's counters and the model's name.
json kv_state_json(const KvSnapshot& snap, const SchedulerStats& stats, const ServedModel& model);
// One event as the stream's JSON object: {"type": kv_event_name, "id", ...}.
json kv_event_json(const KvEvent& e);

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
