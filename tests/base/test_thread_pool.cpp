// ThreadPool: every index of [0, n) is handed out exactly once, in grain-aligned chunks, through
// both hand-off paths (spinning and sleeping), over many back-to-back sections and after idle gaps
// long enough for the workers to fall asleep.
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

TEST(ThreadPool, DestroysCleanlyWhileWorkersSpinOrSleep) {
  for (int i = 0; i < 50; ++i) {
    ThreadPool pool(2);
    check_sections(pool, 2, 10, 1, i % 2 == 0);
  }
}

}  // namespace
}  // namespace kvlm
