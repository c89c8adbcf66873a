#include "base/thread_pool.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KVLM_CPU_RELAX() _mm_pause()
#else
#define KVLM_CPU_RELAX() std::this_thread::yield()
#endif

namespace kvlm {

namespace {
// A section of G grains: thread t first runs its fixed run, grains [t F, (t + 1) F) with
// F = fixed_grains(G, n_threads) (together 3/4 of the grains), then takes pieces of the rest, a
// quarter of the rest's share per thread at a time, until none is left.
int64_t fixed_grains(int64_t n_grains, int n_threads) {
  return n_grains * 3 / (4 * n_threads);
}
int64_t piece_grains(int64_t n_grains, int n_threads) {
  return std::max<int64_t>(
      1, (n_grains - fixed_grains(n_grains, n_threads) * n_threads) / (4 * n_threads));
}

long current_tid() { return static_cast<long>(syscall(SYS_gettid)); }

int open_own_schedstat() { return ::open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC); }

// Run-queue wait in ns from an open schedstat file ("<on-cpu ns> <run-queue ns> <slices>"), read
// afresh from offset 0; -1 when fd < 0 or the text does not parse.
int64_t read_run_wait_ns(int fd) {
  if (fd < 0) return -1;
  char buf[96];
  const ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
  if (n <= 0) return -1;
  buf[n] = 0;
  const char* p = buf;
  while (*p >= '0' && *p <= '9') ++p;
  if (*p != ' ') return -1;
  ++p;
  int64_t v = 0;
  const char* d = p;
  for (; *p >= '0' && *p <= '9'; ++p) v = v * 10 + (*p - '0');
  return p == d ? -1 : v;
}

int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

int64_t this_thread_run_wait_ns() {
  const int fd = open_own_schedstat();
  const int64_t v = read_run_wait_ns(fd);
  if (fd >= 0) ::close(fd);
  return v;
}

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) n_threads = std::max(1u, std::thread::hardware_concurrency());
  n_threads_ = n_threads;
  if (const char* e = std::getenv("KVLM_SPIN_US")) max_spin_ = std::clamp(std::atoi(e), 0, 1000000);
  spin_micros_ = max_spin_;
  stat_fds_ = std::vector<std::atomic<int>>(static_cast<size_t>(n_threads_));
  for (auto& fd : stat_fds_) fd.store(-1);
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
  for (auto& fd : stat_fds_)
    if (fd.load() >= 0) ::close(fd.load());
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

// The fixed run, then pieces of the rest while any is left. Equal fixed shares alone left one
// thread waiting for the other at the end of most sections (the two rarely read memory at the same
// speed: one starts later, one finds its rows in cache); the shared rest lets the faster one take
// more, so they finish within about a piece of each other.
void ThreadPool::run_share(int index) {
  const RangeFn& fn = *job_;
  const int64_t n = job_n_, grain = job_grain_, n_grains = job_grains_, piece = job_piece_;
  const int64_t f0 = index * job_fixed_;
  if (job_fixed_ > 0) fn(f0 * grain, std::min(n, (f0 + job_fixed_) * grain), index);
  for (;;) {
    // Relaxed: the job fields were published by generation_, results are published by pending_.
    const int64_t g = next_grain_.fetch_add(piece, std::memory_order_relaxed);
    if (g >= n_grains) return;
    fn(g * grain, std::min(n, std::min(n_grains, g + piece) * grain), index);
  }
}

void ThreadPool::worker(int index) {
  stat_fds_[static_cast<size_t>(index)].store(open_own_schedstat());
  uint64_t seen = 0;
  for (;;) {
    spin_then_sleep([&] { return generation_.load() != seen; }, cv_, n_sleeping_);
    seen = generation_.load();
    if (stop_.load()) return;
    run_share(index);
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
  job_grains_ = (n + grain - 1) / grain;
  job_fixed_ = fixed_grains(job_grains_, n_threads_);
  job_piece_ = piece_grains(job_grains_, n_threads_);
  next_grain_.store(job_fixed_ * n_threads_, std::memory_order_relaxed);
  pending_.store(n_threads_ - 1, std::memory_order_relaxed);
  generation_.fetch_add(1);  // seq_cst: ordered before the n_sleeping_ load below
  if (n_sleeping_.load() > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    cv_.notify_all();
  }
  run_share(0);
  if (++n_sections_ % kCheckEvery == 0) check_busy();
  // A worker that is not running (oversubscribed machine) or has a long chunk: the caller sleeps
  // until the last one notifies.
  spin_then_sleep([&] { return pending_.load() == 0; }, cv_done_, n_caller_sleeping_);
}

// Other runnable threads are taking our cores when the pool's threads waited kBusyWaitPercent of
// the window in the run queue: spinning would then only wait out their time slices, so sleep
// until a check finds the machine quiet again.
void ThreadPool::check_busy() {
  const long tid = current_tid();
  if (tid != caller_tid_) {  // another thread calls now: its own file, a new baseline
    if (stat_fds_[0].load() >= 0) ::close(stat_fds_[0].load());
    stat_fds_[0].store(open_own_schedstat());
    caller_tid_ = tid;
    last_wait_ns_ = -1;
  }
  int64_t wait_ns = 0;
  for (const auto& fd : stat_fds_) {
    const int64_t w = read_run_wait_ns(fd.load(std::memory_order_relaxed));
    if (w < 0) {
      wait_ns = -1;
      break;
    }
    wait_ns += w;
  }
  const int64_t now = steady_ns();
  if (wait_ns >= 0) {
    if (last_wait_ns_ >= 0) {
      const int64_t wall = (now - last_check_ns_) * n_threads_;
      const bool busy = (wait_ns - last_wait_ns_) * 100 >= wall * kBusyWaitPercent;
      n_checks_.fetch_add(1, std::memory_order_relaxed);
      if (busy) n_busy_checks_.fetch_add(1, std::memory_order_relaxed);
      spin_micros_.store(busy ? 0 : max_spin_, std::memory_order_relaxed);
    }
    last_wait_ns_ = wait_ns;
    last_check_ns_ = now;
    return;
  }
  // No schedstat (a kernel without it, or a worker that has not opened its file yet): count the
  // caller's involuntary context switches instead.
  last_wait_ns_ = -1;
  rusage ru{};
  if (getrusage(RUSAGE_THREAD, &ru) == 0) {
    const int64_t d = ru.ru_nivcsw - last_nivcsw_;
    last_nivcsw_ = ru.ru_nivcsw;
    spin_micros_.store(d >= kBusySwitches ? 0 : max_spin_, std::memory_order_relaxed);
  }
}

}  // namespace kvlm
