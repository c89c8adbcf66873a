// Persistent worker pool. Threads are created once; parallel_for hands [0, n) out in grain-aligned
// ranges and waits for all of them: each thread (the caller's is thread 0) first runs one fixed
// contiguous run of 3/4 of its equal share, then takes pieces of the remaining quarter from a
// shared counter until none is left, so a thread may be called several times per section. A pool
// of size 1 runs inline with no synchronisation.
//
// Hand-off is by spinning first, then sleeping. A decode step of a small model is hundreds of
// parallel sections a few microseconds apart, and waking a thread through a futex costs ~25 us
// each way on a VM (a condition-variable pool measured ~55 us per section, a third of decode
// time). So workers spin on an atomic generation counter, and the caller on the pending count,
// for a bounded time, and only then sleep on a condition variable; an idle pool (a chat waiting
// for input) sleeps and burns no CPU.
// Spinning needs the cores to ourselves. On an oversubscribed machine (ctest -j, other jobs) a
// spinning thread waits out whole time slices of a partner that is not running: with a fixed
// 200 us spin two 2-thread decoders on 2 cores ran at 14 tok/s each, against ~100 for a sleeping
// pool. So every kCheckEvery sections the caller measures how long the pool's threads sat
// runnable but not running (the run-queue wait the kernel keeps per thread, the second field of
// /proc/<tid>/schedstat): kBusyWaitPercent or more of the window's wall time per thread means
// another process wants our cores, and the pool sleeps instead of spinning until a check finds
// the wait small again. Short-lived threads of our own (a server's HTTP threads waking for each
// streamed token) preempt the pool a few microseconds at a time and stay far below the bound;
// a competing CPU-bound process costs tens of percent (measured on a 2-core VM, per check: a
// quiet decode 0-3%, 16 streamed users mostly under 8%, a second 2-thread decoder or one
// CPU-bound process ~30%; docs/bench-log/2026-12-02-zen4-avx512.md). (An earlier check counted
// involuntary context switches, which cannot tell the two apart: serving 16 users slept at most
// sections, docs/bench-log/2026-12-02-zen5-avx512.md. It remains the fallback where schedstat
// cannot be read.) KVLM_SPIN_US sets the spin bound (default kSpinMicros; 0: never spin).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kvlm {

// Nanoseconds the calling thread has spent runnable but not running since it started (the
// kernel's run-queue wait, /proc/thread-self/schedstat), or -1 where the kernel does not say.
int64_t this_thread_run_wait_ns();

class ThreadPool {
 public:
  // n_threads <= 0 means std::thread::hardware_concurrency().
  explicit ThreadPool(int n_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // fn(begin, end, thread_index) over disjoint ranges covering [0, n), one or more per thread
  // (in no promised order). Ranges are multiples of `grain` (except the last) so callers can keep
  // work aligned to blocks. Not reentrant, and called from one thread at a time.
  using RangeFn = std::function<void(int64_t begin, int64_t end, int thread_index)>;
  void parallel_for(int64_t n, const RangeFn& fn, int64_t grain = 1);

  // Longest spin of a waiting thread before it sleeps, microseconds.
  static constexpr int kSpinMicros = 200;

  // True while waiting threads spin before sleeping (the last busy check found the machine
  // quiet and KVLM_SPIN_US is not 0).
  bool spinning() const { return spin_micros_.load(std::memory_order_relaxed) > 0; }
  // Busy checks decided from run-queue wait so far, and how many of them found the machine busy.
  // Under contention the verdicts alternate: a sleeping pool's threads, woken with the
  // scheduler's credit for their sleep, often find their cores at once (a window of ~0% wait),
  // so the next window spins, waits ~35% and sleeps again (measured with one spinning thread per
  // core on a 2-core VM: 53 to 100 busy verdicts in 100 checks).
  uint64_t n_checks() const { return n_checks_.load(std::memory_order_relaxed); }
  uint64_t n_busy_checks() const { return n_busy_checks_.load(std::memory_order_relaxed); }

 private:
  void worker(int index);
  // Thread index's part of the current job: its fixed run, then pieces of the rest.
  void run_share(int index);
  // Waits until done(): spins up to spin_micros_, then sleeps on cv, counted in n_sleeping (the
  // side that makes done() true notifies cv under mu_ when n_sleeping > 0).
  template <class Done>
  void spin_then_sleep(const Done& done, std::condition_variable& cv, std::atomic<int>& n_sleeping);

  int n_threads_;
  std::vector<std::thread> threads_;
  // The job: written by parallel_for before generation_ is bumped (release), read by workers
  // after they observe the bump (acquire).
  const RangeFn* job_ = nullptr;
  int64_t job_n_ = 0;
  int64_t job_grain_ = 1;
  int64_t job_grains_ = 0;               // ceil(job_n_ / job_grain_)
  int64_t job_fixed_ = 0;                // grains in each thread's fixed run (fixed_grains)
  int64_t job_piece_ = 1;                // grains per piece of the shared rest
  std::atomic<int64_t> next_grain_{0};   // first grain of the rest not yet taken
  std::atomic<uint64_t> generation_{0};  // one per parallel_for (and one for stop)
  std::atomic<int> pending_{0};          // workers still running the current job
  std::atomic<bool> stop_{false};
  // Sleeping workers: n_sleeping_ changes under mu_, and parallel_for notifies under mu_ when it
  // is non-zero; with seq_cst on generation_ and n_sleeping_ no wake-up is lost.
  std::mutex mu_;
  std::condition_variable cv_;       // workers sleep here for a new generation
  std::condition_variable cv_done_;  // the caller sleeps here for pending_ == 0
  std::atomic<int> n_sleeping_{0};
  std::atomic<int> n_caller_sleeping_{0};  // likewise under mu_, for the last worker to notify
  std::atomic<int> spin_micros_{kSpinMicros};  // the bound now: 0 or max_spin_
  int max_spin_ = kSpinMicros;                 // KVLM_SPIN_US or kSpinMicros
  // The busy check (caller's thread only, except where noted).
  void check_busy();
  uint64_t n_sections_ = 0;   // parallel_for calls that used the workers
  // [n_threads] each thread's open /proc/thread-self/schedstat, -1 when unavailable: [0] is the
  // caller's (reopened when another thread calls), [i > 0] worker i's, set by the worker itself.
  std::vector<std::atomic<int>> stat_fds_;
  long caller_tid_ = 0;       // the thread stat_fds_[0] belongs to
  int64_t last_wait_ns_ = -1; // sum of the threads' run-queue waits at the last check; -1: none
  int64_t last_check_ns_ = 0; // steady clock at the last check
  int64_t last_nivcsw_ = 0;   // fallback: the caller's involuntary context switches
  std::atomic<uint64_t> n_checks_{0}, n_busy_checks_{0};  // see n_checks()
  static constexpr uint64_t kCheckEvery = 64;
  static constexpr int64_t kBusyWaitPercent = 10;
  static constexpr int64_t kBusySwitches = 2;  // fallback bound
};

}  // namespace kvlm
