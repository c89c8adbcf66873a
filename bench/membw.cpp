// kvlm_membw: main-memory bandwidth, for the decode roofline (docs/BENCHMARKS.md).
//
// STREAM-style triad a[i] = b[i] + s * c[i] over three arrays of doubles, each far larger than
// the last-level cache (default 256 MiB each; this machine's L3 is 32 MiB), split across threads
// in contiguous slices; each thread first-touches its own slice. Reported as the best of N passes
// (STREAM's convention: the best pass is the least disturbed one).
//
// Bytes moved per element, stated exactly:
//   triad   24 B counted: 8 read of b + 8 read of c + 8 written to a, as STREAM counts them.
//           Ordinary stores also read a's line first (write-allocate), so the bus really moves
//           32 B/element; "triad_wa_gbs" counts that (x 4/3). Nothing here uses streaming stores.
//   read    8 B/element: a sum over b only. Decoding reads weights and never writes them, so this
//           read-only figure is the closest to what decode can get; the roofline uses both.
//
// Usage: kvlm_membw [--mib MIB_PER_ARRAY] [--passes N] [--threads N] [--json]
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Options {
  int64_t mib = 256;  // per array
  int passes = 10;
  int threads = 0;  // 0: hardware_concurrency
  bool json = false;
};

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "kvlm_membw: error: %s (usage: kvlm_membw [--mib MIB_PER_ARRAY] "
                       "[--passes N] [--threads N] [--json])\n",
               msg.c_str());
  std::exit(2);
}

int64_t parse_int(const char* flag, const char* s, int64_t lo, int64_t hi) {
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  if (end == s || *end != '\0' || v < lo || v > hi)
    usage_error(fmt::format("{} '{}': expected an integer in [{}, {}]", flag, s, lo, hi));
  return v;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) usage_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--mib") o.mib = parse_int("--mib", value(), 1, 1 << 16);
    else if (a == "--passes") o.passes = static_cast<int>(parse_int("--passes", value(), 1, 1000));
    else if (a == "--threads") o.threads = static_cast<int>(parse_int("--threads", value(), 1, 1024));
    else if (a == "--json") o.json = true;
    else usage_error("unknown argument '" + a + "'");
  }
  if (o.threads == 0) o.threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return o;
}

// Last-level cache size from sysfs ("32768K"), 0 if unknown.
int64_t llc_bytes() {
  int64_t best = 0;
  for (int idx = 0; idx < 8; ++idx) {
    const std::string path =
        fmt::format("/sys/devices/system/cpu/cpu0/cache/index{}/size", idx);
    std::FILE* f = std::fopen(path.c_str(), "r");
    if (!f) break;
    long long v = 0;
    char unit = 0;
    if (std::fscanf(f, "%lld%c", &v, &unit) >= 1)
      best = std::max<int64_t>(best, unit == 'K' ? v << 10 : unit == 'M' ? v << 20 : v);
    std::fclose(f);
  }
  return best;
}

struct Slice {
  int64_t begin, end;
};

// Runs fn(slice, thread_index) on n_threads threads (the caller is thread 0); returns seconds.
template <class Fn>
double timed_parallel(int n_threads, int64_t n, Fn fn) {
  std::vector<std::thread> workers;
  const int64_t chunk = (n + n_threads - 1) / n_threads;
  auto slice = [&](int t) { return Slice{std::min(n, t * chunk), std::min(n, (t + 1) * chunk)}; };
  // Threads are started before the clock, then released together.
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  for (int t = 1; t < n_threads; ++t)
    workers.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) {
      }
      fn(slice(t), t);
    });
  while (ready.load() != n_threads - 1) {
  }
  const auto t0 = std::chrono::steady_clock::now();
  go.store(true, std::memory_order_release);
  fn(slice(0), 0);
  for (auto& w : workers) w.join();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  const int64_t n = o.mib * (int64_t{1} << 20) / static_cast<int64_t>(sizeof(double));
  if (const int64_t llc = llc_bytes(); llc > 0 && 3 * o.mib * (int64_t{1} << 20) < 4 * llc)
    std::fprintf(stderr, "kvlm_membw: warning: 3 x %lld MiB is less than 4x the last-level cache "
                         "(%lld MiB): part of the traffic may hit the cache (raise --mib)\n",
                 static_cast<long long>(o.mib), static_cast<long long>(llc >> 20));
  // Uninitialised on purpose: the threads' first touch places the pages.
  std::unique_ptr<double[]> a(new double[n]), b(new double[n]), c(new double[n]);
  double* pa = a.get();
  double* pb = b.get();
  double* pc = c.get();
  timed_parallel(o.threads, n, [&](Slice s, int) {
    for (int64_t i = s.begin; i < s.end; ++i) {
      pa[i] = 0.0;
      pb[i] = 1.0;
      pc[i] = 2.0;
    }
  });

  const double scalar = 3.0;
  double best_triad = 1e30, best_read = 1e30;
  std::vector<double> sums(static_cast<size_t>(o.threads));
  for (int p = 0; p < o.passes; ++p) {
    best_triad = std::min(best_triad, timed_parallel(o.threads, n, [&](Slice s, int) {
      for (int64_t i = s.begin; i < s.end; ++i) pa[i] = pb[i] + scalar * pc[i];
    }));
    best_read = std::min(best_read, timed_parallel(o.threads, n, [&](Slice s, int t) {
      double acc[8] = {};  // eight independent chains, so add latency never limits the loads
      int64_t i = s.begin;
      for (; i + 8 <= s.end; i += 8)
        for (int k = 0; k < 8; ++k) acc[k] += pb[i + k];
      for (; i < s.end; ++i) acc[0] += pb[i];
      double sum = 0;
      for (double v : acc) sum += v;
      sums[static_cast<size_t>(t)] = sum;
    }));
  }
  // Checks that the work happened (and keeps the compiler from dropping it).
  double total = 0;
  for (double v : sums) total += v;
  if (pa[n / 2] != 1.0 + scalar * 2.0 || total != static_cast<double>(n)) {
    std::fprintf(stderr, "kvlm_membw: error: wrong results (a[n/2] = %g, sum = %g)\n", pa[n / 2],
                 total);
    return 1;
  }

  const double triad_gbs = 24.0 * static_cast<double>(n) / best_triad / 1e9;
  const double read_gbs = 8.0 * static_cast<double>(n) / best_read / 1e9;
  if (o.json) {
    fmt::print(
        "{{\"array_mib\": {}, \"arrays\": 3, \"elements\": {}, \"threads\": {}, \"passes\": {}, "
        "\"triad_s\": {:.6f}, \"triad_gbs\": {:.3f}, \"triad_wa_gbs\": {:.3f}, "
        "\"read_s\": {:.6f}, \"read_gbs\": {:.3f}, "
        "\"bytes_note\": \"triad_gbs counts 24 B/element (STREAM: read b, read c, write a); "
        "triad_wa_gbs adds the write-allocate read of a (32 B/element); read_gbs counts 8 "
        "B/element of a read-only sum; GB = 1e9 B; best of passes\"}}\n",
        o.mib, n, o.threads, o.passes, best_triad, triad_gbs, triad_gbs * 4.0 / 3.0, best_read,
        read_gbs);
  } else {
    fmt::print("arrays:  3 x {} MiB of doubles ({} elements each), {} threads, best of {}\n",
               o.mib, n, o.threads, o.passes);
    fmt::print("triad:   {:.2f} GB/s  (a = b + s*c, 24 B/element as STREAM counts; {:.2f} GB/s "
               "with the write-allocate read of a, 32 B/element)\n",
               triad_gbs, triad_gbs * 4.0 / 3.0);
    fmt::print("read:    {:.2f} GB/s  (sum over b, 8 B/element)\n", read_gbs);
  }
  return 0;
}
