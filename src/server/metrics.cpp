#include "server/metrics.h"

#include <fmt/format.h>

#include <algorithm>
#include <span>

#include "base/error.h"

namespace kvlm::server {
namespace {

void metric(std::string& out, const char* name, const char* type, const char* help, double v) {
  out += fmt::format("# HELP {} {}\n# TYPE {} {}\n{} {}\n", name, help, name, type, name, v);
}

// A Prometheus histogram from per-bucket counts (not cumulative; counts[bounds.size()] is above
// every bound).
template <class Count>
void histogram(std::string& out, const char* name, const char* help, std::span<const double> bounds,
               std::span<const Count> counts, double sum) {
  out += fmt::format("# HELP {} {}\n# TYPE {} histogram\n", name, help, name);
  uint64_t cum = 0;
  for (size_t i = 0; i < bounds.size(); ++i) {
    cum += static_cast<uint64_t>(counts[i]);
    out += fmt::format("{}_bucket{{le=\"{}\"}} {}\n", name, bounds[i], cum);
  }
  cum += static_cast<uint64_t>(counts[bounds.size()]);
  out += fmt::format("{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n", name, cum, name, sum,
                     name, cum);
}

}  // namespace

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {
  KVLM_CHECK(std::is_sorted(bounds_.begin(), bounds_.end()));
}

void Histogram::observe(double v) {
  const size_t b = std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin();  // le
  std::lock_guard<std::mutex> l(mu_);
  ++counts_[b];
  sum_ += v;
}

void Histogram::render(std::string& out, const char* name, const char* help) const {
  std::lock_guard<std::mutex> l(mu_);
  histogram<uint64_t>(out, name, help, bounds_, counts_, sum_);
}

// Buckets, seconds. TTFT spans a queued request behind a long prefill (tens of seconds on a CPU)
// down to a prefix-cache hit; inter-token latency a small model's ~5 ms steps up to a step
// carrying a 512-token prefill chunk.
Metrics::Metrics()
    : ttft_({0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}),
      itl_({0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}),
      e2e_({0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}) {}

void Metrics::count_finish(const std::string& reason) {
  for (size_t i = 0; i < kReasons.size(); ++i)
    if (reason == kReasons[i]) finished_[i].fetch_add(1, std::memory_order_relaxed);
}

std::string Metrics::render(const SchedulerStats& s) const {
  std::string out;
  metric(out, "kvlm_kv_blocks_total", "gauge", "KV blocks in the paged pool", s.blocks_total);
  metric(out, "kvlm_kv_blocks_used", "gauge",
         "KV blocks held by running sequences (cached blocks no sequence holds count as free)",
         s.blocks_used);
  metric(out, "kvlm_kv_blocks_cached", "gauge", "KV blocks registered in the prefix index",
         s.blocks_cached);
  metric(out, "kvlm_kv_block_size_tokens", "gauge", "tokens per KV block", s.block_size);
  metric(out, "kvlm_kv_bytes_total", "gauge", "bytes of the KV pool's arenas",
         static_cast<double>(s.kv_bytes_total));
  metric(out, "kvlm_kv_bytes_used", "gauge", "bytes of the KV blocks in use",
         static_cast<double>(s.kv_bytes_used));
  metric(out, "kvlm_requests_running", "gauge", "sequences being generated", s.running);
  metric(out, "kvlm_requests_waiting", "gauge", "requests queued for admission", s.waiting);
  metric(out, "kvlm_preemptions_total", "counter",
         "running sequences preempted for blocks (recomputed later)", s.n_preemptions);
  metric(out, "kvlm_prompt_tokens_total", "counter", "prompt tokens of admitted requests",
         s.prompt_tokens);
  metric(out, "kvlm_prompt_tokens_cached_total", "counter",
         "prompt tokens served by the prefix cache", s.prompt_tokens_cached);
  metric(out, "kvlm_prompt_tokens_forked_total", "counter",
         "prompt tokens the choices 2..n of n > 1 requests shared by fork instead of computing "
         "(prompt_tokens counts such a prompt once)",
         s.prompt_tokens_forked);
  metric(out, "kvlm_prefix_cache_hit_rate", "gauge",
         "prompt_tokens_cached_total / prompt_tokens_total (0 before any prompt)",
         s.prompt_tokens > 0 ? double(s.prompt_tokens_cached) / double(s.prompt_tokens) : 0.0);
  metric(out, "kvlm_generated_tokens_total", "counter", "tokens generated", s.generated_tokens);
  metric(out, "kvlm_kv_evicted_tokens_total", "counter",
         "cached tokens dropped by the sliding window or context shift (--kv-window, --keep)",
         s.evicted_tokens);
  metric(out, "kvlm_scheduler_steps_total", "counter", "forward passes of the scheduler",
         s.n_steps);
  metric(out, "kvlm_batch_tokens_total", "counter",
         "tokens computed by the forward passes (decode tokens and prefill chunks)",
         s.batch_tokens);
  metric(out, "kvlm_forward_seconds_total", "counter",
         "wall seconds inside the scheduler's batched forward passes", s.forward_seconds);
  metric(out, "kvlm_scheduler_host_seconds_total", "counter",
         "wall seconds of scheduler steps outside the forward pass (admission, blocks, sampling, "
         "token hand-off)",
         s.step_host_seconds);

  out +=
      "# HELP kvlm_requests_total generation requests finished, by finish reason\n"
      "# TYPE kvlm_requests_total counter\n";
  for (size_t i = 0; i < kReasons.size(); ++i)
    out += fmt::format("kvlm_requests_total{{finish_reason=\"{}\"}} {}\n", kReasons[i],
                       finished_[i].load(std::memory_order_relaxed));
  metric(out, "kvlm_requests_rejected_total", "counter",
         "generation requests answered with an HTTP error",
         static_cast<double>(rejected_.load(std::memory_order_relaxed)));

  histogram<int64_t>(out, "kvlm_forward_pass_seconds",
                     "wall seconds of the scheduler's forward passes (decode tokens and prefill "
                     "chunks of all running sequences together)",
                     kPassSecondsBounds, s.pass_seconds_counts, s.forward_seconds);
  ttft_.render(out, "kvlm_time_to_first_token_seconds",
               "seconds from submission to the first generated token");
  itl_.render(out, "kvlm_inter_token_latency_seconds",
              "seconds between consecutive generated tokens of a request");
  e2e_.render(out, "kvlm_request_duration_seconds",
              "seconds from submission to the end of generation");
  return out;
}

}  // namespace kvlm::server
