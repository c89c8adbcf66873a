// GET /metrics: the scheduler's counters and the server's latency histograms in the Prometheus
// text format (version 0.0.4), every name prefixed kvlm_, each with HELP and TYPE lines.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "engine/scheduler.h"

namespace kvlm::server {

// A Prometheus histogram: cumulative counts per upper bound (seconds), plus +Inf, sum and count.
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);  // strictly increasing upper bounds
  void observe(double v);
  // Appends HELP, TYPE, the _bucket lines, _sum and _count.
  void render(std::string& out, const char* name, const char* help) const;

 private:
  std::vector<double> bounds_;
  mutable std::mutex mu_;         // guards the fields below (one lock per token is cheap next to
  std::vector<uint64_t> counts_;  // a forward pass)  [bounds_.size() + 1], not cumulative
  double sum_ = 0;
};

class Metrics {
 public:
  Metrics();
  // Seconds from submit() to the first generated token's event.
  void observe_ttft(double s) { ttft_.observe(s); }
  // Seconds between two consecutive token events of one request.
  void observe_itl(double s) { itl_.observe(s); }
  // Seconds from submit() to the final event (or to the stop string).
  void observe_e2e(double s) { e2e_.observe(s); }
  // One finished generation request: "stop", "length", "cancelled" (client gone, server
  // stopping) or "error".
  void count_finish(const std::string& reason);
  // Requests refused before reaching the scheduler or by it (4xx/5xx of generation endpoints).
  void count_rejected() { rejected_.fetch_add(1, std::memory_order_relaxed); }

  std::string render(const SchedulerStats& s) const;

 private:
  static constexpr std::array<const char*, 4> kReasons = {"stop", "length", "cancelled", "error"};
  std::array<std::atomic<uint64_t>, kReasons.size()> finished_{};
  std::atomic<uint64_t> rejected_{0};
  Histogram ttft_, itl_, e2e_;
};

}  // namespace kvlm::server
