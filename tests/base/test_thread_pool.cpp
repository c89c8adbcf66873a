// ThreadPool: every index of [0, n) is handed out exactly once, in grain-aligned ranges, through
// both hand-off paths (spinning and sleeping), over many back-to-back sections and after idle gaps
// long enough for the workers to fall asleep; a delayed thread's share of the rest goes to others.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <thread>
#include <vector>

#include "base/thread_pool.h"

namespace kvlm {
namespace {

// Runs `rounds` sections of n items on pool and checks coverage and grain alignment of each.
void check_sections(ThreadPool& pool, int rounds, int64_t n, int64_t grain, bool pause) {
  std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
  for (int r = 0; r < rounds; ++r) {
    for (auto& h : hits) h.store(0);
    std::atomic<int> bad_chunk{0};
    pool.parallel_for(
        n,
        [&](int64_t b, int64_t e, int tid) {
          if (b % grain != 0 || (e % grain != 0 && e != n) || tid < 0 || tid >= pool.size())
            bad_chunk.fetch_add(1);
          for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
        },
        grain);
    ASSERT_EQ(bad_chunk.load(), 0) << "round " << r;
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "round " << r << " i " << i;
    if (pause) std::this_thread::sleep_for(std::chrono::microseconds(ThreadPool::kSpinMicros * 3));
  }
}

TEST(ThreadPool, CoversEveryIndexOnceBackToBack) {
  for (int threads : {1, 2, 3, 4}) {
    ThreadPool pool(threads);
    ASSERT_EQ(pool.size(), threads);
    check_sections(pool, 3000, 97, 1, false);
    check_sections(pool, 300, 1000, 16, false);
  }
}

TEST(ThreadPool, CoversEveryIndexAfterWorkersSleep) {
  ThreadPool pool(2);
  check_sections(pool, 50, 64, 4, true);  // idle gaps past the spin bound: the sleeping path
}

TEST(ThreadPool, NeverSpinningPoolWorks) {
  setenv("KVLM_SPIN_US", "0", 1);
  ThreadPool pool(3);
  unsetenv("KVLM_SPIN_US");
  check_sections(pool, 2000, 50, 1, false);
}

TEST(ThreadPool, SmallRangesRunInlineOnTheCaller) {
  ThreadPool pool(2);
  int calls = 0, tid_seen = -1;
  pool.parallel_for(
      8,
      [&](int64_t b, int64_t e, int tid) {
        ++calls;
        tid_seen = tid;
        EXPECT_EQ(e - b, 8);
      },
      16);
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(tid_seen, 0);
  pool.parallel_for(0, [&](int64_t, int64_t, int) { calls++; });
  EXPECT_EQ(calls, 1);
}

// A thread held up in its fixed run leaves the shared rest to the others: with the caller asleep
// in its first range, the worker runs its own 3/8 and then the whole remaining quarter.
TEST(ThreadPool, ADelayedThreadLeavesTheRestToTheOthers) {
  ThreadPool pool(2);
  const int64_t n = 64;
  std::atomic<int64_t> done_by[2] = {0, 0};
  std::atomic<int> caller_calls{0};
  pool.parallel_for(n, [&](int64_t b, int64_t e, int tid) {
    if (tid == 0 && caller_calls.fetch_add(1) == 0)
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    done_by[tid].fetch_add(e - b);
  });
  EXPECT_EQ(done_by[0].load() + done_by[1].load(), n);
  EXPECT_EQ(done_by[0].load(), n * 3 / 8) << "the caller ran only its fixed run";
  EXPECT_EQ(done_by[1].load(), n - n * 3 / 8);
}

TEST(ThreadPool, DestroysCleanlyWhileWorkersSpinOrSleep) {
  for (int i = 0; i < 50; ++i) {
    ThreadPool pool(2);
    check_sections(pool, 2, 10, 1, i % 2 == 0);
  }
}

}  // namespace
}  // namespace kvlm
