#include "base/thread_pool.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>

#include <sys/resource.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KVLM_CPU_RELAX() _mm_pause()
#else
#define KVLM_CPU_RELAX() std::this_thread::yield()
#endif

namespace kvlm {

namespace {
// Chunk t of n items split over n_threads, rounded to multiples of grain.
void chunk_bounds(int64_t n, int64_t grain, int n_threads, int t, int64_t* begin, int64_t* end) {
  int64_t n_grains = (n + grain - 1) / grain;
  int64_t per = n_grains / n_threads, extra = n_grains % n_threads;
  int64_t g0 = t * per + std::min<int64_t>(t, extra);
  int64_t g1 = g0 + per + (t < extra ? 1 : 0);
  *begin = std::min(n, g0 * grain);
  *end = std::min(n, g1 * grain);
}
}  // namespace

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) n_threads = std::max(1u, std::thread::hardware_concurrency());
  n_threads_ = n_threads;
  if (const char* e = std::getenv("KVLM_SPIN_US")) max_spin_ = std::clamp(std::atoi(e), 0, 1000000);
  spin_micros_ = max_spin_;
  for (int i = 1; i < n_threads_; ++i) threads_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  {
    std::lock_guard<std::mutex> lock(mu_);
    generation_.fetch_add(1);
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

// Checks the clock every 256 pauses (~10 us). seq_cst on the counter and in done() orders the
// sleeper's registration against the waker's check, so no wake-up is lost.
template <class Done>
void ThreadPool::spin_then_sleep(const Done& done, std::condition_variable& cv,
                                 std::atomic<int>& n_sleeping) {
  using Clock = std::chrono::steady_clock;
  const auto deadline =
      Clock::now() + std::chrono::microseconds(spin_micros_.load(std::memory_order_relaxed));
  for (uint32_t i = 1; !done(); ++i) {
    KVLM_CPU_RELAX();
    if ((i & 255) == 0 && Clock::now() > deadline) {
      std::unique_lock<std::mutex> lock(mu_);
      n_sleeping.fetch_add(1);
      cv.wait(lock, done);
      n_sleeping.fetch_sub(1);
      return;
    }
  }
}

void ThreadPool::worker(int index) {
  uint64_t seen = 0;
  for (;;) {
    spin_then_sleep([&] { return generation_.load() != seen; }, cv_, n_sleeping_);
    seen = generation_.load();
    if (stop_.load()) return;
    int64_t b, e;
    chunk_bounds(job_n_, job_grain_, n_threads_, index, &b, &e);
    if (b < e) (*job_)(b, e, index);
    if (pending_.fetch_sub(1) == 1 && n_caller_sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_done_.notify_one();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, const RangeFn& fn, int64_t grain) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (n_threads_ == 1 || n <= grain) {
    fn(0, n, 0);
    return;
  }
  // The previous job has fully finished (pending_ reached 0 before we returned), so no worker
  // reads the job fields while they change.
  job_ = &fn;
  job_n_ = n;
  job_grain_ = grain;
  pending_.store(n_threads_ - 1, std::memory_order_relaxed);
  generation_.fetch_add(1);  // seq_cst: ordered before the n_sleeping_ load below
  if (n_sleeping_.load() > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    cv_.notify_all();
  }
  int64_t b, e;
  chunk_bounds(n, grain, n_threads_, 0, &b, &e);
  if (b < e) fn(b, e, 0);
  if (++n_sections_ % kCheckEvery == 0) {
    // Involuntary context switches of this thread since the last check: other runnable threads
    // are taking our cores, so spinning would only wait out their time slices. Sleep instead
    // until a check finds the machine quiet again.
    rusage ru{};
    if (getrusage(RUSAGE_THREAD, &ru) == 0) {
      const int64_t d = ru.ru_nivcsw - last_nivcsw_;
      last_nivcsw_ = ru.ru_nivcsw;
      spin_micros_.store(d >= kBusySwitches ? 0 : max_spin_, std::memory_order_relaxed);
    }
  }
  // A worker that is not running (oversubscribed machine) or has a long chunk: the caller sleeps
  // until the last one notifies.
  spin_then_sleep([&] { return pending_.load() == 0; }, cv_done_, n_caller_sleeping_);
}

}  // namespace kvlm
