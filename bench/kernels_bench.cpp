// Kernel microbenchmarks (Google Benchmark), for before/after numbers of kernel changes. Not a
// test: nothing here checks results (tests/kernels does, against the scalar twins).
//
//   build/bin/kvlm_kernels_bench --benchmark_filter=AttnF16 --benchmark_repetitions=5
//
// AttnF16/<n_q>/<mode>: kernels::attn_chunk_f16 over one 256-position chunk of one KV head with
// SmolLM2's head size (64), the way decode attention calls it: n_q query heads (the GQA group,
// 3 for SmolLM2), rows reached through pointers into blocks of 16 positions (rows of all 3 KV
// heads, 384 bytes, as the cache stores them). mode 0: the same chunk every call (its rows stay
// in L1/L2); mode 1: each call reads the next of 256 chunks of blocks picked at random from a
// 64 MiB arena, so its rows come from memory, as in serving where every sequence reads its own
// history once per layer; mode 2: the same but the blocks of a chunk are consecutive, as one
// sequence's contiguous cache (decode at depth). Counter ns_per_qpos: nanoseconds per (query
// head, position) pair, the unit the attention measurements of docs/bench-log/ use.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include "base/aligned.h"
#include "base/thread_pool.h"
#include "kernels/ops.h"
#include "tensor/dtype.h"

namespace kvlm {
namespace {

constexpr int64_t kHeadDim = 64;
constexpr int64_t kChunk = 256;       // positions per call (forward.cpp's kAttnChunk)
constexpr int64_t kBlock = 16;        // positions per paged block
constexpr int64_t kKvHeads = 3;       // a cache row holds all KV heads of a position
constexpr int64_t kArenaBytes = 64 << 20;

void BM_AttnF16(benchmark::State& state) {
  const int64_t n_q = state.range(0);
  const int64_t mode = state.range(1);  // 0 hot, 1 cold paged, 2 cold contiguous
  const bool cold = mode != 0;
  const int64_t row_bytes = kKvHeads * kHeadDim * 2;            // one position of K (or V)
  const int64_t n_rows = kArenaBytes / (2 * row_bytes);         // positions the arena holds
  const int64_t n_blocks = n_rows / kBlock;
  AlignedBuffer k_arena(static_cast<size_t>(n_rows * row_bytes));  // [n_rows, kv_heads, hd] f16
  AlignedBuffer v_arena(static_cast<size_t>(n_rows * row_bytes));
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  {
    for (int64_t r = 0; r < n_rows; ++r) {
      uint16_t* kr = k_arena.as<uint16_t>() + r * kKvHeads * kHeadDim;
      uint16_t* vr = v_arena.as<uint16_t>() + r * kKvHeads * kHeadDim;
      for (int64_t d = 0; d < kKvHeads * kHeadDim; ++d) kr[d] = fp32_to_fp16(nd(rng));
      for (int64_t d = 0; d < kKvHeads * kHeadDim; ++d) vr[d] = fp32_to_fp16(nd(rng));
    }
  }
  // Chunks of kChunk positions, each from kChunk / kBlock blocks picked at random (a block
  // table), head 1 of each row.
  const int64_t n_tables = cold ? 256 : 1;
  std::vector<const uint16_t*> k_rows(static_cast<size_t>(n_tables * kChunk));
  std::vector<const uint16_t*> v_rows(k_rows.size());
  std::uniform_int_distribution<int64_t> pick(0, n_blocks - 1);
  for (int64_t t = 0; t < n_tables; ++t)
    for (int64_t b = 0; b < kChunk / kBlock; ++b) {
      // mode 2: consecutive blocks, as a one-block (contiguous) run of positions holds them.
      const int64_t blk = mode == 2 ? (t * kChunk / kBlock + b) % n_blocks : pick(rng);
      for (int64_t j = 0; j < kBlock; ++j) {
        const int64_t row = blk * kBlock + j, i = t * kChunk + b * kBlock + j;
        k_rows[i] = k_arena.as<uint16_t>() + row * kKvHeads * kHeadDim + kHeadDim;
        v_rows[i] = v_arena.as<uint16_t>() + row * kKvHeads * kHeadDim + kHeadDim;
      }
    }
  std::vector<float> q(static_cast<size_t>(n_q * kHeadDim)), o(q.size()), m(n_q), l(n_q);
  for (float& x : q) x = nd(rng) * 0.3f;
  kernels::round_to_f16(q.data(), q.data(), n_q * kHeadDim);  // as attention() rounds q
  std::vector<float> work(static_cast<size_t>(n_q * kChunk + 2 * kChunk * kHeadDim));
  const float scale = 0.125f;
  int64_t t = 0;
  for (auto _ : state) {
    kernels::attn_chunk_f16(k_rows.data() + t * kChunk, v_rows.data() + t * kChunk, kChunk,
                            kHeadDim, q.data(), n_q, scale, m.data(), l.data(), o.data(),
                            work.data());
    benchmark::DoNotOptimize(o.data());
    if (++t == n_tables) t = 0;
  }
  const double pairs = static_cast<double>(state.iterations()) * n_q * kChunk;
  state.counters["ns_per_qpos"] =
      benchmark::Counter(pairs, benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}
BENCHMARK(BM_AttnF16)->Name("AttnF16")->ArgsProduct({{1, 3}, {0, 1, 2}});

// AttnF32/<n_q>: kernels::attn_chunk over one 256-position chunk already in f32 tiles (as a
// quantized cache's rows are dequantized once per job), the tiles hot in L1/L2: against AttnF16's
// mode 0, the cost of converting f16 rows inside the kernel. Counter ns_per_qpos as AttnF16's.
void BM_AttnF32(benchmark::State& state) {
  const int64_t n_q = state.range(0);
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> k(static_cast<size_t>(kChunk * kHeadDim)), v(k.size());
  for (float& x : k) x = fp16_to_fp32(fp32_to_fp16(nd(rng)));
  for (float& x : v) x = fp16_to_fp32(fp32_to_fp16(nd(rng)));
  std::vector<float> q(static_cast<size_t>(n_q * kHeadDim)), o(q.size()), m(n_q), l(n_q);
  for (float& x : q) x = nd(rng) * 0.3f;
  kernels::round_to_f16(q.data(), q.data(), n_q * kHeadDim);
  std::vector<float> work(static_cast<size_t>(n_q * kChunk + 2 * kChunk * kHeadDim));
  for (auto _ : state) {
    kernels::attn_chunk(k.data(), v.data(), kChunk, kHeadDim, q.data(), n_q, 0.125f, m.data(),
                        l.data(), o.data(), work.data());
    benchmark::DoNotOptimize(o.data());
  }
  const double pairs = static_cast<double>(state.iterations()) * n_q * kChunk;
  state.counters["ns_per_qpos"] =
      benchmark::Counter(pairs, benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}
BENCHMARK(BM_AttnF32)->Name("AttnF32")->Arg(3);

// n_rows rows of type t, n_cols wide, back to back: N(0, 1) rows quantized where quantize_row
// has t, else (the K types) random codes and scales (the speed is the same).
std::vector<uint8_t> random_rows(DType t, int64_t n_rows, int64_t n_cols, std::mt19937& rng) {
  const size_t stride = row_bytes(t, n_cols);
  std::vector<uint8_t> bytes(stride * n_rows);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> row(n_cols);
  const bool quantizer = t == DType::Q4_1 || t == DType::Q8_0 || t == DType::F16 ||
                         t == DType::BF16;
  for (int64_t r = 0; r < n_rows; ++r) {
    for (float& x : row) x = nd(rng);
    if (quantizer) {
      kernels::quantize_row(t, row.data(), bytes.data() + r * stride, n_cols);
    } else {
      for (size_t i = 0; i < stride; ++i) bytes[r * stride + i] = static_cast<uint8_t>(rng());
    }
  }
  return bytes;
}

// QMatmul/<type>/<n_tok>/<cold>: kernels::matmul of a packed random SmolLM2 FFN-down-sized matrix
// (576 x 1536; type 0 Q4_1, 1 Q8_0, 2 Q4_K, 3 Q6_K, 4 IQ4_XS, 5 Q3_K, 6 Q2_K, 7 Q5_1, 8 IQ4_NL,
// 9 Q5_K, 10 Q4_0) with n_tok tokens on one thread (512: a pp512 prompt).
// cold 0: the same matrix every call (0.5-0.9 MiB, staying in L2), so the counter is the
// kernel's arithmetic rate; cold 1: each call the next of copies filling kArenaBytes, so the
// weights come from memory, as in a forward
// pass (which reads each matrix once). Counter gmac_per_s: 10^9 multiply-adds per second.
void BM_QMatmul(benchmark::State& state) {
  const DType types[] = {DType::Q4_1, DType::Q8_0, DType::Q4_K,   DType::Q6_K,  DType::IQ4_XS,
                         DType::Q3_K, DType::Q2_K, DType::Q5_1, DType::IQ4_NL, DType::Q5_K,
                         DType::Q4_0};
  const DType t = types[state.range(0)];
  const int64_t n_tok = state.range(1), n_rows = 576, n_cols = 1536;
  const size_t stride = row_bytes(t, n_cols);
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<uint8_t> bytes = random_rows(t, n_rows, n_cols, rng);
  TensorView w{t, bytes.data(), n_rows, n_cols, stride};
  const std::vector<uint8_t> packed = kernels::pack_weights(w);
  const int64_t n_copies =
      state.range(2) == 0 ? 1 : kArenaBytes / static_cast<int64_t>(packed.size()) + 1;
  std::vector<std::vector<uint8_t>> copies(static_cast<size_t>(n_copies), packed);
  std::vector<float> x(static_cast<size_t>(n_tok * n_cols)), y(static_cast<size_t>(n_tok * n_rows));
  for (float& v : x) v = nd(rng);
  ThreadPool pool(1);
  int64_t c = 0;
  for (auto _ : state) {
    w.packed = copies[static_cast<size_t>(c)].data();
    c = c + 1 == n_copies ? 0 : c + 1;
    kernels::matmul(w, x.data(), y.data(), n_tok, pool);
    benchmark::DoNotOptimize(y.data());
  }
  const double macs = static_cast<double>(state.iterations()) * n_tok * n_rows * n_cols;
  state.counters["gmac_per_s"] = benchmark::Counter(macs * 1e-9, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_QMatmul)
    ->Name("QMatmul")
    ->ArgsProduct({{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, {1, 4, 16, 64, 512}, {0, 1}});

// HalfMatmul/<type>/<n_tok>: kernels::matmul of a random F16 (type 0) or BF16 (type 1) matrix of
// Llama-3.2-1B's attention shape (2048 x 2048, 8 MiB: from L3 or memory, as in a forward pass)
// with n_tok tokens on one thread. Counter gmac_per_s as QMatmul's.
void BM_HalfMatmul(benchmark::State& state) {
  const DType t = state.range(0) == 0 ? DType::F16 : DType::BF16;
  const int64_t n_tok = state.range(1), n_rows = 2048, n_cols = 2048;
  const size_t stride = row_bytes(t, n_cols);
  std::mt19937 rng(12);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const std::vector<uint8_t> bytes = random_rows(t, n_rows, n_cols, rng);
  const TensorView w{t, bytes.data(), n_rows, n_cols, stride};
  std::vector<float> x(static_cast<size_t>(n_tok * n_cols)), y(static_cast<size_t>(n_tok * n_rows));
  for (float& v : x) v = nd(rng);
  ThreadPool pool(1);
  for (auto _ : state) {
    kernels::matmul(w, x.data(), y.data(), n_tok, pool);
    benchmark::DoNotOptimize(y.data());
  }
  const double macs = static_cast<double>(state.iterations()) * n_tok * n_rows * n_cols;
  state.counters["gmac_per_s"] = benchmark::Counter(macs * 1e-9, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_HalfMatmul)->Name("HalfMatmul")->ArgsProduct({{0, 1}, {1, 4, 16, 64}});

}  // namespace
}  // namespace kvlm

BENCHMARK_MAIN();
