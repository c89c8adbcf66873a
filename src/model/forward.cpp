// The forward pass, top to bottom: embed -> per layer (norm, QKV, RoPE, write K/V into the cache,
// attention over the cache, output projection, MLP) -> final norm -> logits.
// Prefill and decode are the same code; only n_tok differs.
#include <algorithm>
#include <cmath>
#include <vector>

#include "base/error.h"
#include "kernels/ops.h"
#include "model/model.h"

namespace kvlm {

namespace {

constexpr int64_t kAttnChunk = 256;   // positions per attention work item
constexpr int64_t kAttnTokens = 32;   // queries per parallel attention pass
constexpr int64_t kAttnTokBlock = 8;  // queries of one work item, sharing its K/V tiles

// Float offset of the row-pointer area in a thread's attention work area (after the tiles,
// scores, outputs, max and sum; even, so the pointers are 8-byte aligned).
constexpr int64_t attn_ptr_offset(int64_t hd, int64_t gqa) {
  return (2 * kAttnChunk * hd + gqa * kAttnChunk + gqa * hd + 2 * gqa + 1) / 2 * 2;
}

void grow(AlignedBuffer& b, size_t n_floats) {
  if (b.size() < n_floats * sizeof(float)) b.resize(n_floats * sizeof(float));
}

void ensure_scratch(Scratch& s, const ModelConfig& c, int64_t n_tok, int64_t n_ctx, int n_threads) {
  if (s.n_batch >= n_tok && s.n_ctx >= n_ctx && s.n_threads >= n_threads) return;
  s.n_batch = std::max(s.n_batch, n_tok);
  s.n_ctx = std::max(s.n_ctx, n_ctx);
  s.n_threads = std::max<int64_t>(s.n_threads, n_threads);
  const size_t B = s.n_batch;
  grow(s.x, B * c.n_embd);
  grow(s.h, B * c.n_embd);
  grow(s.q, B * c.q_dim());
  grow(s.q16, B * c.q_dim());
  grow(s.k, B * c.kv_dim());
  grow(s.v, B * c.kv_dim());
  grow(s.attn, B * c.q_dim());
  grow(s.gate, B * c.n_ff);
  grow(s.up, B * c.n_ff);
  // K and V tiles, scores, q in f16, outputs, max and sum (see attention()).
  // Then 2 x 2 x kAttnChunk row pointers (8 bytes = 2 floats each): this job's and the next's.
  s.scores_per_thread = attn_ptr_offset(c.head_dim, c.n_gqa()) + 8 * kAttnChunk;
  grow(s.scores, s.n_threads * s.scores_per_thread);
  const int64_t max_chunks = (s.n_ctx + kAttnChunk - 1) / kAttnChunk;
  grow(s.attn_part, std::min<int64_t>(s.n_batch, kAttnTokens) * c.n_head * max_chunks * (c.head_dim + 2));
  grow(s.logits, B * c.n_vocab);
  s.pos.resize(B);
}

void norm_rows(const ModelConfig& c, const float* x, const TensorView& w, const TensorView& b,
               float* y, int64_t n_rows) {
  for (int64_t i = 0; i < n_rows; ++i) {
    const float* xi = x + i * c.n_embd;
    float* yi = y + i * c.n_embd;
    if (c.arch->norm == NormKind::Rms)
      kernels::rms_norm(xi, w.f32(), yi, c.n_embd, c.norm_eps);
    else
      kernels::layer_norm(xi, w.f32(), b.f32(), yi, c.n_embd, c.norm_eps);
  }
}

void add_bias(float* y, const TensorView& b, int64_t n_rows, int64_t n) {
  if (b.empty()) return;
  for (int64_t i = 0; i < n_rows; ++i) kernels::add(y + i * n, b.f32(), n);
}

// Runs fn(i0, i1) over token rows [0, n_tok): on the pool's threads for a batch, whose
// element-wise activations (tens of microseconds) the other threads would otherwise wait for; on
// the calling thread for a few rows, which cost less than a hand-off. For element-wise kernels,
// whose outputs depend on their own inputs only: the same numbers either way.
constexpr int64_t kParallelRows = 8;
template <class Fn>
void rows_on_pool(int64_t n_tok, ThreadPool& pool, const Fn& fn) {
  if (n_tok < kParallelRows) return fn(0, n_tok);
  pool.parallel_for(n_tok, [&](int64_t i0, int64_t i1, int) { fn(i0, i1); });
}

// One sequence's share of a forward pass, for attention: its n_tok queries at positions
// [pos0, pos0 + n_tok) are rows [row0, row0 + n_tok) of the batch (s.q, s.k, s.v, s.attn), and kv
// views its cached positions [0, pos0 + n_tok) of the layer being run.
struct AttnSeq {
  KvLayerView kv;
  int64_t row0 = 0;
  int64_t n_tok = 0;
  int64_t pos0 = 0;
  int64_t window = 0;  // the layer's sliding window: query p sees (p - window, p]; 0: all of [0, p]
};

// The first position query pos sees: pos - window + 1 with a sliding window, else 0.
inline int64_t first_visible(int64_t pos, int64_t window) {
  return window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
}

// Calls fn(j, n) for each run [j, j + n) of [j0, j1) that lies in one block (one run when
// contiguous): inside a run a head's positions are a fixed stride apart (k_pos_stride,
// v_pos_stride), so the table lookup and its divisions happen once per run.
template <class Fn>
void for_each_run(const KvLayerView& kv, int64_t j0, int64_t j1, Fn&& fn) {
  for (int64_t j = j0; j < j1;) {
    const int64_t n =
        kv.blocks == nullptr ? j1 - j : std::min(kv.block_size - j % kv.block_size, j1 - j);
    fn(j, n);
    j += n;
  }
}

// Dequantizes positions [j0, j1) of KV head g's slices (K when k, else V) into tile [j1 - j0, hd]:
// one strided read when contiguous, one per block when paged. Paged or not, each position gets the
// same values, so attention over a block table equals attention over a contiguous cache bit for
// bit.
void load_rows(const KvLayerView& kv, bool k, int64_t g, int64_t j0, int64_t j1, float* tile,
               int64_t hd) {
  const DType t = k ? kv.dtype_k : kv.dtype_v;
  const size_t stride = k ? kv.k_pos_stride() : kv.v_pos_stride();
  for_each_run(kv, j0, j1, [&](int64_t j, int64_t n) {
    kernels::dequantize_rows(t, k ? kv.k_head(j, g) : kv.v_head(j, g), stride, n,
                             tile + (j - j0) * hd, hd);
  });
}

// An f16 cache is read in place by attn_chunk_f16 (plain rows; KIVI's sealed K is not f16).
bool reads_in_place(const KvLayerView& kv) {
  return kv.kivi_residual < 0 && kv.dtype_k == DType::F16 && kv.dtype_v == DType::F16;
}

// Pointers to KV head g's K and V slices of positions [j0, j1) of a plain cache (any row type;
// attn_chunk_f16 reads them as f16), a run at a time.   k_rows, v_rows: [j1 - j0]
void gather_rows(const KvLayerView& kv, int64_t g, int64_t j0, int64_t j1,
                 const uint16_t** k_rows, const uint16_t** v_rows) {
  const size_t ks = kv.k_pos_stride(), vs = kv.v_pos_stride();
  for_each_run(kv, j0, j1, [&](int64_t j, int64_t n) {
    const uint8_t* k = kv.k_head(j, g);
    const uint8_t* v = kv.v_head(j, g);
    for (int64_t r = 0; r < n; ++r) {
      k_rows[j - j0 + r] = reinterpret_cast<const uint16_t*>(k + r * ks);
      v_rows[j - j0 + r] = reinterpret_cast<const uint16_t*>(v + r * vs);
    }
  });
}

// Whether views a and b (plain layouts) hold the same rows at positions [j0, j1): the same
// arenas and, when paged, the same blocks there (sequences sharing a prefix's blocks).
bool same_rows(const KvLayerView& a, const KvLayerView& b, int64_t j0, int64_t j1) {
  if (a.k != b.k || a.v != b.v || b.kivi_residual >= 0 || a.dtype_k != b.dtype_k ||
      a.dtype_v != b.dtype_v)
    return false;
  if (a.blocks == b.blocks) return true;  // one sequence (or one contiguous cache)
  if (a.blocks == nullptr || b.blocks == nullptr || a.block_size != b.block_size ||
      a.head_major != b.head_major)
    return false;
  const int64_t b0 = j0 / a.block_size, b1 = (j1 - 1) / a.block_size + 1;
  return std::equal(a.blocks + b0, a.blocks + b1, b.blocks + b0);
}

// Causal attention of every sequence's queries over its cached positions, for one layer.
//   s.q:    [n_rows, n_head * head_dim]   (after RoPE)
//   s.attn: [n_rows, n_head * head_dim]   output
// Work items are (sequence, block of kAttnTokBlock tokens, KV head, chunk of kAttnChunk
// positions): the chunk's K and V rows of that head are dequantized once into f32 tiles, which
// every query head of the group (GQA) and every token of the block then reads (prefill reuses
// each tile up to kAttnTokBlock times; an f16 cache is read in place instead, see in_place), and
// kernels::attn_chunk (or attn_chunk_f16) computes each (token, head)'s
// online-softmax partial (max, sum, unnormalised output). A long context splits into chunks that
// threads share (flash-decoding); the partials are merged in chunk order. The work items of all
// sequences of a pass (up to kAttnTokens queries) share one parallel section, so a batch of
// decoding sequences costs one hand-off per layer, not one per sequence. Chunk boundaries are
// fixed multiples of kAttnChunk and a token's partial depends only on its q and the rows it
// sees, so a position's result never depends on the batch, the other sequences or the thread
// count (cached decoding == recomputation; batched == alone). With an f16 K, q is rounded to f16
// first, as llama.cpp's f16 K.q product does.
// KIVI layout (kv.kivi_residual >= 0, docs/KV.md): query i at pos0 + i reads positions
// [0, kv_kivi_sealed(n_sealed0, pos0 + i + 1)) from the sealed groups / V rows, then f16 rows:
// older ones from the residual, this batch's from s.k / s.v (the rows given to kv.write, rounded
// to f16 as the residual stores them), so every query sees what a decode step at its position
// sees. Which source holds a position then depends on the token, so KIVI blocks are one token.
void attention(const ModelConfig& c, std::span<const AttnSeq> seqs, Scratch& s, ThreadPool& pool) {
  const int64_t hd = c.head_dim, n_kv = c.n_kv_head, gqa = c.n_gqa(), KV = c.kv_dim(),
                Q = c.q_dim();
  const float scale = c.attn_scale;  // 1/sqrt(hd), or Gemma 3 27B's (attention_scale)
  const int64_t part_stride = hd + 2;  // per (token, head, chunk): m, l, o[hd]
  float* parts = s.attn_part.as<float>();
  const float* q_all = s.q.as<float>();  // [n_rows, Q]
  float* out_all = s.attn.as<float>();   // [n_rows, Q]
  for (const AttnSeq& a : seqs)
    if (a.kv.dtype_k == DType::F16) {
      // Rounded once here, not per chunk: every chunk then reads the same rounded q.
      kernels::round_to_f16(q_all + a.row0 * Q, s.q16.as<float>() + a.row0 * Q, a.n_tok * Q);
    }

  // A segment: up to kAttnTokens queries of one sequence. A pass: segments whose queries total at
  // most kAttnTokens, run as one parallel section; parts holds each segment's partials
  // [nt, n_head, max_chunks, hd + 2] at part_off (sized for kAttnTokens x the longest context).
  struct Segment {
    const AttnSeq* seq;
    int64_t t0, nt, tok_block, n_tblocks, max_chunks, part_off;
  };
  // A work item: segment seg, KV head g, chunk ch, token block [i0, i1) and the cached positions
  // it reads, [j0, j_end) (non-empty).
  struct Job {
    int64_t seg, g, ch, i0, i1, j0, j_end;
  };
  // One pass's segments and work items, in run order (a few, and a few hundred, per layer): kept
  // per calling thread and cleared per pass, so a forward pass allocates them once, not per layer.
  // Used through references: the pool's threads must read the caller's lists, and a lambda that
  // named a thread_local would find its own thread's.
  thread_local std::vector<Segment> segs_of_thread;
  thread_local std::vector<Job> jobs_of_thread;
  std::vector<Segment>& segs = segs_of_thread;  // [<= kAttnTokens]
  std::vector<Job>& jobs = jobs_of_thread;
  size_t next_seq = 0;
  int64_t next_t0 = 0;
  while (next_seq < seqs.size()) {
    segs.clear();
    int64_t n_q = 0, part_off = 0;
    while (next_seq < seqs.size() && n_q < kAttnTokens) {
      const AttnSeq& a = seqs[next_seq];
      const int64_t nt = std::min(kAttnTokens - n_q, a.n_tok - next_t0);
      Segment g;
      g.seq = &a;
      g.t0 = next_t0;
      g.nt = nt;
      g.tok_block = a.kv.kivi_residual >= 0 ? 1 : kAttnTokBlock;
      g.n_tblocks = (nt + g.tok_block - 1) / g.tok_block;
      g.max_chunks = (a.pos0 + next_t0 + nt + kAttnChunk - 1) / kAttnChunk;
      g.part_off = part_off;
      segs.push_back(g);
      part_off += nt * c.n_head * g.max_chunks * part_stride;
      n_q += nt;
      next_t0 += nt;
      if (next_t0 == a.n_tok) {
        ++next_seq;
        next_t0 = 0;
      }
    }
    // The pass's work items, chunk-major: (chunk, KV head, segment, token block). Items that
    // read the same rows then run one after another on the same thread, which finds the rows in
    // its caches and keeps their pointers (or tiles) instead of gathering them again
    // (same_rows): every sequence's chunk 0 when they share a system prompt's blocks, and a
    // prefill segment's token blocks over one chunk. Items whose tokens see none of the chunk
    // (causal) are left out. The order changes no result: each item writes its own partials.
    jobs.clear();
    int64_t n_chunks_max = 0;
    for (const Segment& sg : segs) n_chunks_max = std::max(n_chunks_max, sg.max_chunks);
    for (int64_t ch = 0; ch < n_chunks_max; ++ch)
      for (int64_t g = 0; g < n_kv; ++g)
        for (size_t si = 0; si < segs.size(); ++si) {
          const Segment& sg = segs[si];
          if (ch >= sg.max_chunks) continue;
          for (int64_t tb = 0; tb < sg.n_tblocks; ++tb) {
            Job jb;
            jb.seg = static_cast<int64_t>(si);
            jb.g = g;
            jb.ch = ch;
            jb.i0 = sg.t0 + tb * sg.tok_block;
            jb.i1 = std::min(sg.t0 + sg.nt, jb.i0 + sg.tok_block);
            // The block's last token sees the most: causal positions [0, pos0 + i1 - 1]; with a
            // sliding window its first token sees the earliest, from first_visible.
            jb.j0 = std::max(ch * kAttnChunk,
                             first_visible(sg.seq->pos0 + jb.i0, sg.seq->window));
            jb.j_end = std::min(sg.seq->pos0 + jb.i1, (ch + 1) * kAttnChunk);
            if (jb.j0 < jb.j_end) jobs.push_back(jb);
          }
        }
    const int64_t n_jobs = static_cast<int64_t>(jobs.size());
    pool.parallel_for(n_jobs, [&](int64_t begin, int64_t end, int tid) {
      float* work = s.scores.as<float>() + tid * s.scores_per_thread;
      float* ktile = work;                      // [kAttnChunk, head_dim] K rows in f32
      float* vtile = ktile + kAttnChunk * hd;   // [kAttnChunk, head_dim] V rows in f32
      float* sc = vtile + kAttnChunk * hd;      // [gqa, kAttnChunk] scores, then weights
      float* o_part = sc + gqa * kAttnChunk;    // [gqa, head_dim] unnormalised outputs
      float* m_part = o_part + gqa * hd;        // [gqa]
      float* l_part = m_part + gqa;             // [gqa]
      // f16 row pointers in two sets, [2][2, kAttnChunk] (K then V): the current job's, and the
      // next job's, gathered one job ahead (see below).
      const uint16_t** row_sets =
          reinterpret_cast<const uint16_t**>(work + attn_ptr_offset(hd, gqa));
      int cur = 0;        // set of the job being run
      bool have = false;  // row_sets[cur] already holds this job's rows
      bool kept = false;  // ktile / vtile already hold this job's rows (the previous job's)
      for (int64_t job = begin; job < end; ++job) {
        const Job& jr0 = jobs[job];
        const Segment& sg = segs[jr0.seg];
        const AttnSeq& a = *sg.seq;
        const KvLayerView& kv = a.kv;
        const bool kivi = kv.kivi_residual >= 0;
        const int64_t pos0 = a.pos0;
        const float* q = (kv.dtype_k == DType::F16 ? s.q16.as<float>() : q_all) + a.row0 * Q;
        const float* k_new = s.k.as<float>() + a.row0 * KV;  // [n_tok, kv_dim] this batch's K
        const float* v_new = s.v.as<float>() + a.row0 * KV;  // [n_tok, kv_dim] this batch's V
        const int64_t max_chunks = sg.max_chunks, ch = jr0.ch, g = jr0.g, i0 = jr0.i0,
                      i1 = jr0.i1, j0 = jr0.j0, j_end = jr0.j_end;
        const uint16_t** k_rows = row_sets + cur * 2 * kAttnChunk;
        const uint16_t** v_rows = k_rows + kAttnChunk;
        // Positions [j0, js) are stored rows (plain) or sealed (KIVI); KIVI's f16 rows are
        // [js, jr) in the residual and [jr, j_end) in this batch (KIVI blocks are one token).
        const int64_t js = kivi ? std::clamp(kv_kivi_sealed(kv.n_sealed0, pos0 + i0 + 1,
                                                            kv.kivi_residual, kv.kivi_group),
                                             j0, j_end)
                                : j_end;
        const int64_t jr = std::clamp(pos0, js, j_end);
        auto f16_row = [&](const uint16_t* resid, const float* batch, int64_t j, float* row) {
          if (j < jr)
            kernels::dequantize_row(DType::F16, resid + (j - kv.n_sealed0) * KV + g * hd, row, hd);
          else
            kernels::round_to_f16(batch + (j - pos0) * KV + g * hd, row, hd);
        };
        // An f16 cache: the kernel reads the rows where they are, for decode and prefill alike
        // (attn_chunk_f16 == attn_chunk over the dequantized rows, bit for bit). For prefill
        // that is faster than tiles too: the block's tokens re-read 2 x 128 B f16 rows per
        // position from L1/L2 instead of 2 x 256 B f32 tile rows, and nothing is converted.
        const bool in_place = reads_in_place(kv);
        if (in_place) {
          if (!have) gather_rows(kv, g, j0, j_end, k_rows, v_rows);
        } else if (kept) {
          // The previous job's tiles: the same rows.
        } else if (!kivi) {
          load_rows(kv, true, g, j0, j_end, ktile, hd);
          load_rows(kv, false, g, j0, j_end, vtile, hd);
        } else {
          for (int64_t j = j0; j < j_end; ++j) {
            float* krow = ktile + (j - j0) * hd;
            float* vrow = vtile + (j - j0) * hd;
            if (j >= js) {
              f16_row(kv.k_resid, k_new, j, krow);
              f16_row(kv.v_resid, v_new, j, vrow);
              continue;
            }
            // The group of position j starts at row(j - j % group) (a group's bytes are group x
            // k_row_bytes, and never straddle a block: KiviSealed, kv_kivi.h).
            const int64_t g0 = j - j % kv.kivi_group;
            kv_kivi_dequantize_k_row(kv.k + kv.row(g0) * kv.k_row_bytes, kv.kivi_group, KV,
                                     j % kv.kivi_group, g * hd, hd, krow);
            // KIVI's sealed V rows are plain dtype_v rows at their positions.
            kernels::dequantize_row(kv.dtype_v, kv.v_head(j, g), vrow, hd);
          }
        }
        // The next job's rows, asked for now: their memory latency then overlaps this job's
        // arithmetic instead of stalling the next job's first pass (+27-29% measured for decode
        // at depth 4096 and for 16 sequences decoding together;
        // docs/bench-log/2026-12-02-zen4-avx512.md). An f16 next job keeps the gathered pointers
        // (no second gather); other plain types only prefetch.
        // A next job over the same rows (or a first part of them) keeps this job's pointers or
        // tiles: nothing to gather, load or prefetch.
        have = kept = false;
        int next = cur ^ 1;
        if (job + 1 < end) {
          const Job& nx = jobs[job + 1];
          const KvLayerView& kvn = segs[nx.seg].seq->kv;
          if (!kivi && nx.g == g && nx.j0 == j0 && nx.j_end <= j_end &&
              same_rows(kv, kvn, nx.j0, nx.j_end)) {
            have = in_place;
            kept = !in_place;
            next = cur;
          } else if (kvn.kivi_residual < 0) {
            const uint16_t** nk = row_sets + (cur ^ 1) * 2 * kAttnChunk;
            const uint16_t** nv = nk + kAttnChunk;
            gather_rows(kvn, nx.g, nx.j0, nx.j_end, nk, nv);
            const int64_t nn = nx.j_end - nx.j0;
            kernels::prefetch_rows_l2(reinterpret_cast<const void* const*>(nk), nn,
                                      static_cast<int64_t>(kvn.k_row_bytes / n_kv));
            kernels::prefetch_rows_l2(reinterpret_cast<const void* const*>(nv), nn,
                                      static_cast<int64_t>(kvn.v_row_bytes / n_kv));
            have = reads_in_place(kvn);
          }
        }
        for (int64_t i = i0; i < i1; ++i) {
          // Token i sees [lo, end) of the rows loaded for [j0, j_end): causal up to its position,
          // from its window's first position on. None: its partial for this chunk is never read.
          const int64_t lo = std::max(j0, first_visible(pos0 + i, a.window));
          const int64_t end = std::min(pos0 + i + 1, (ch + 1) * kAttnChunk);
          const int64_t n = end - lo, off = lo - j0;
          if (n <= 0) continue;
          const float* qg = q + i * Q + g * gqa * hd;  // [gqa, head_dim] group g's heads
          if (in_place)  // work: scores, then (variants without an in-place path) tiles
            kernels::attn_chunk_f16(k_rows + off, v_rows + off, n, hd, qg, gqa, scale, m_part,
                                    l_part, o_part, ktile);
          else
            kernels::attn_chunk(ktile + off * hd, vtile + off * hd, n, hd, qg, gqa, scale, m_part,
                                l_part, o_part, sc);
          for (int64_t h = 0; h < gqa; ++h) {
            float* p = parts + sg.part_off +
                       (((i - sg.t0) * c.n_head + g * gqa + h) * max_chunks + ch) * part_stride;
            p[0] = m_part[h];
            p[1] = l_part[h];
            std::copy_n(o_part + h * hd, hd, p + 2);
          }
        }
        if (have) cur = next;
      }
    });
    // Merge the chunk partials of each (token, head) in chunk order.
    for (const Segment& sg : segs) {
      const AttnSeq& a = *sg.seq;
      for (int64_t i = sg.t0; i < sg.t0 + sg.nt; ++i) {
        // The chunks token i sees: from its window's first position's to its own.
        const int64_t n_chunks = (a.pos0 + i + 1 + kAttnChunk - 1) / kAttnChunk;
        const int64_t ch0 = first_visible(a.pos0 + i, a.window) / kAttnChunk;
        for (int64_t h = 0; h < c.n_head; ++h) {
          const float* p =
              parts + sg.part_off + ((i - sg.t0) * c.n_head + h) * sg.max_chunks * part_stride;
          float m = p[ch0 * part_stride];
          for (int64_t ch = ch0 + 1; ch < n_chunks; ++ch) m = std::max(m, p[ch * part_stride]);
          float* o = out_all + (a.row0 + i) * Q + h * hd;
          std::fill(o, o + hd, 0.0f);
          float l = 0;
          for (int64_t ch = ch0; ch < n_chunks; ++ch) {
            const float* pc = p + ch * part_stride;
            const float f = std::exp(pc[0] - m);
            l += pc[1] * f;
            for (int64_t d = 0; d < hd; ++d) o[d] += pc[2 + d] * f;
          }
          const float inv = 1.0f / l;
          for (int64_t d = 0; d < hd; ++d) o[d] *= inv;
        }
      }
    }
  }
}

// The attention map a sequence's probe asks for (AttnProbe), after `attention` ran its layer: the
// scores q . k x scale over the positions each token sees, softmaxed, from the same q (rounded to
// f16 for an f16 K, as attention reads it) and the same cached K rows. Not the kernel's arithmetic
// order, so equal to its weights up to rounding (tests/model/test_attention_map.cpp checks that
// the weights times V give attention's output).
void probe_weights(const ModelConfig& c, const AttnSeq& a, const Scratch& s, AttnProbe& p) {
  const int64_t hd = c.head_dim, Q = c.q_dim(), n_pos = a.pos0 + a.n_tok;
  const int64_t g = p.head / c.n_gqa();
  const float* q = (a.kv.dtype_k == DType::F16 ? s.q16.as<float>() : s.q.as<float>()) +
                   a.row0 * Q + p.head * hd;  // [n_tok, Q] rows, this head's slice
  // K rows of head g, from the first position any of the pass's tokens sees.
  const int64_t j_lo = first_visible(a.pos0, a.window);
  std::vector<float> k(static_cast<size_t>((n_pos - j_lo) * hd));  // [n_pos - j_lo, head_dim]
  load_rows(a.kv, true, g, j_lo, n_pos, k.data(), hd);
  p.weights.assign(static_cast<size_t>(a.n_tok * n_pos), 0.0f);
  for (int64_t i = 0; i < a.n_tok; ++i) {
    const int64_t lo = first_visible(a.pos0 + i, a.window), end = a.pos0 + i + 1;
    float* w = p.weights.data() + i * n_pos;  // [n_pos]
    float m = -INFINITY;
    for (int64_t j = lo; j < end; ++j) {
      const float* kj = k.data() + (j - j_lo) * hd;
      float dot = 0;
      for (int64_t d = 0; d < hd; ++d) dot += q[i * Q + d] * kj[d];
      w[j] = dot * c.attn_scale;
      m = std::max(m, w[j]);
    }
    float sum = 0;
    for (int64_t j = lo; j < end; ++j) sum += (w[j] = std::exp(w[j] - m));
    for (int64_t j = lo; j < end; ++j) w[j] /= sum;
  }
}

// Where a forward pass's K/V go and what attention reads, per layer: every sequence's rows in the
// store, through its block table (and KIVI's residual slot).
struct PassKv {
  PagedKvStore& store;
  std::span<const BatchSeq> batch;
  const int64_t KV;
  // Stores this pass's rows of layer il.   k, v: [n_rows, kv_dim] f32
  void write(int32_t il, const float* k, const float* v) {
    int64_t row = 0;
    const int32_t g = store.layer_group(il);
    for (const BatchSeq& q : batch) {
      const int64_t n = static_cast<int64_t>(q.tokens.size());
      const KvSeqCache& c = q.kv[static_cast<size_t>(g)];
      if (store.shape().kivi())
        store.kivi_write(il, c.blocks, c.kivi_slot, c.n_sealed, q.pos0, n, k + row * KV,
                         v + row * KV);
      else
        store.write(il, c.blocks, q.pos0, n, k + row * KV, v + row * KV);
      row += n;
    }
  }
  // Fills every sequence's view of layer il (rows past the cache's length written above).
  void views(int32_t il, std::vector<AttnSeq>& seqs) const {
    const auto g = static_cast<size_t>(store.layer_group(il));
    for (size_t i = 0; i < batch.size(); ++i) {
      const KvSeqCache& c = batch[i].kv[g];
      seqs[i].kv = store.view(il, c.blocks,
                              batch[i].pos0 + static_cast<int64_t>(batch[i].tokens.size()),
                              c.kivi_slot, c.n_sealed);
    }
  }
  // Called once attention has read layer il (KIVI moves its residual on).
  void finish(int32_t il, const float* k, const float* v) {
    if (!store.shape().kivi()) return;
    int64_t row = 0;
    for (const BatchSeq& q : batch) {
      const int64_t n = static_cast<int64_t>(q.tokens.size());
      store.kivi_finish_write(il, q.kv[0].kivi_slot, q.kv[0].n_sealed, q.pos0, n, k + row * KV,
                              v + row * KV);
      row += n;
    }
  }
  bool rotated() const { return store.shape().rotate; }
};

// Token embeddings (plus learned positions) of n_tok tokens into x: [n_tok, n_embd]; h: [n_embd]
// scratch. With embed_scale they are multiplied by sqrt(n_embd), in float as llama.cpp does.
void embed(const ModelConfig& c, const Weights& w, const int32_t* tokens, const int64_t* pos,
           int64_t n_tok, float* x, float* h) {
  const int64_t E = c.n_embd;
  const float scale = std::sqrt(static_cast<float>(E));
  for (int64_t i = 0; i < n_tok; ++i) {
    float* xi = x + i * E;
    kernels::dequantize_row(w.tok_embd.dtype, w.tok_embd.row(tokens[i]), xi, E);
    if (c.arch->pos == PosKind::Learned) {
      kernels::dequantize_row(w.pos_embd.dtype, w.pos_embd.row(pos[i]), h, E);
      kernels::add(xi, h, E);
    }
    if (c.arch->embed_scale)
      for (int64_t j = 0; j < E; ++j) xi[j] *= scale;
  }
}

// A RoPE table for one base (frequencies scaled as rope_inv_freq does), once per forward pass and
// shared by every layer of that base and every Q and K head: [n_tok, 2, n_rot / 2] cos, then sin,
// of token i's angles (rope_rotate equals kernels::rope bit for bit, so a token gets the same
// numbers in prefill and decode), both times rope_attn_factor (YaRN's and LongRoPE's magnitude).
std::vector<double> rope_table(const ModelConfig& c, float base, const int64_t* pos,
                               int64_t n_tok) {
  const int64_t n_pairs = c.n_rot / 2;
  std::vector<double> inv_freq(static_cast<size_t>(n_pairs));  // [n_rot / 2]
  rope_inv_freq(kv_rope_of(c), base, inv_freq.data());
  std::vector<double> cs(static_cast<size_t>(n_tok * c.n_rot));
  for (int64_t i = 0; i < n_tok; ++i)
    kernels::rope_cos_sin(inv_freq.data(), n_pairs, pos[i], cs.data() + i * c.n_rot);
  if (c.rope_attn_factor != 1.0f)
    for (double& x : cs) x *= double{c.rope_attn_factor};
  return cs;
}

// RMS-normalizes each head_dim slice of x: [n_rows, n_heads, head_dim] in place by w: [head_dim]
// (Gemma 3's and Qwen 3's Q and K norms).
void norm_heads(const ModelConfig& c, float* x, const TensorView& w, int64_t n_rows,
                int64_t n_heads) {
  for (int64_t r = 0; r < n_rows * n_heads; ++r)
    kernels::rms_norm(x + r * c.head_dim, w.f32(), x + r * c.head_dim, c.head_dim, c.norm_eps);
}

// Q, K and V of the normed input h: [n_tok, n_embd] into s.q: [n_tok, Q], s.k, s.v:
// [n_tok, KV], plus their biases; Q and K per-head normed when the layer has those norms (before
// RoPE).
void project_qkv(const ModelConfig& c, const LayerWeights& l, const float* h, int64_t n_tok,
                 Scratch& s, ThreadPool& pool) {
  float* q = s.q.as<float>();
  float* k = s.k.as<float>();
  float* v = s.v.as<float>();
  const kernels::MatmulPart qkv[3] = {{&l.wq, q}, {&l.wk, k}, {&l.wv, v}};
  kernels::matmul_multi(qkv, 3, h, n_tok, pool);
  add_bias(q, l.bq, n_tok, c.q_dim());
  add_bias(k, l.bk, n_tok, c.kv_dim());
  add_bias(v, l.bv, n_tok, c.kv_dim());
  if (!l.q_norm.empty()) {
    norm_heads(c, q, l.q_norm, n_tok, c.n_head);
    norm_heads(c, k, l.k_norm, n_tok, c.n_kv_head);
  }
}

// The feed-forward block of the normed input h: [n_tok, n_embd]; its output goes to h.
void feed_forward(const ModelConfig& c, const LayerWeights& l, float* h, int64_t n_tok,
                  Scratch& s, ThreadPool& pool) {
  const int64_t F = c.n_ff;
  float* gate = s.gate.as<float>();  // [n_tok, F]
  float* up = s.up.as<float>();      // [n_tok, F]
  float* act = up;                   // [n_tok, F] input of ffn_down
  if (c.arch->ffn != FfnKind::Gelu) {
    const kernels::MatmulPart gate_up[2] = {{&l.ffn_gate, gate}, {&l.ffn_up, up}};
    kernels::matmul_multi(gate_up, 2, h, n_tok, pool);
    add_bias(up, l.ffn_up_b, n_tok, F);
    const bool silu = c.arch->ffn == FfnKind::SwiGlu;
    rows_on_pool(n_tok, pool, [&](int64_t i0, int64_t i1) {
      float* g = gate + i0 * F;
      const float* u = up + i0 * F;
      const int64_t n = (i1 - i0) * F;
      if (silu) return kernels::swiglu(g, u, n);
      kernels::gelu(g, n);  // GeGLU: gelu(gate) * up
      for (int64_t j = 0; j < n; ++j) g[j] *= u[j];
    });
    act = gate;
  } else {
    kernels::matmul(l.ffn_up, h, up, n_tok, pool);
    add_bias(up, l.ffn_up_b, n_tok, F);
    rows_on_pool(n_tok, pool, [&](int64_t i0, int64_t i1) {
      kernels::gelu(up + i0 * F, (i1 - i0) * F);
    });
  }
  kernels::matmul(l.ffn_down, act, h, n_tok, pool);
  add_bias(h, l.ffn_down_b, n_tok, c.n_embd);
}

// Adds a block's output h: [n_tok, n_embd] to the residual stream x, normed first when the
// layer has a post-norm (Gemma 3's post_attention_norm, post_ffw_norm).
void add_residual(const ModelConfig& c, const TensorView& post_norm, float* x, float* h,
                  int64_t n_tok) {
  if (!post_norm.empty()) norm_rows(c, h, post_norm, TensorView{}, h, n_tok);
  kernels::add(x, h, n_tok * c.n_embd);
}

// The layers of one forward pass over n_rows tokens of one or more sequences: token i is
// tokens[i] at position pos[i]; attention of each sequence reads its own cache (seqs, io). Leaves
// the residual stream in s.x: [n_rows, n_embd]. Every step except attention treats rows alone,
// so a row's result does not depend on which other rows share the pass.
void run_layers(const ModelConfig& c, const Weights& w, const int32_t* tokens, const int64_t* pos,
                int64_t n_tok, std::vector<AttnSeq>& seqs, PassKv& io, Scratch& s,
                ThreadPool& pool) {
  const int64_t E = c.n_embd, Q = c.q_dim(), KV = c.kv_dim();
  float* x = s.x.as<float>();     // [n_tok, E]
  float* h = s.h.as<float>();     // [n_tok, E]
  float* q = s.q.as<float>();     // [n_tok, Q]
  float* k = s.k.as<float>();     // [n_tok, KV]
  float* v = s.v.as<float>();     // [n_tok, KV]
  float* att = s.attn.as<float>();  // [n_tok, Q]
  embed(c, w, tokens, pos, n_tok, x, h);

  // [n_tok, 2, n_rot / 2] each: the global layers' table, and the windowed layers' when their
  // base differs (Gemma 3).
  std::vector<double> rope_cs, rope_cs_swa;
  if (c.arch->pos == PosKind::Rope) {
    rope_cs = rope_table(c, c.rope_freq_base, pos, n_tok);
    if (c.rope_freq_base_swa != c.rope_freq_base)
      rope_cs_swa = rope_table(c, c.rope_freq_base_swa, pos, n_tok);
  }

  for (int32_t il = 0; il < c.n_layer; ++il) {
    const LayerWeights& l = w.layers[il];
    // ---- attention block ----
    norm_rows(c, x, l.attn_norm, l.attn_norm_b, h, n_tok);
    project_qkv(c, l, h, n_tok, s, pool);
    if (c.arch->pos == PosKind::Rope) {
      const std::vector<double>& table =
          c.rope_base(il) == c.rope_freq_base ? rope_cs : rope_cs_swa;
      for (int64_t i = 0; i < n_tok; ++i) {
        const double* cs = table.data() + i * c.n_rot;  // [2, n_rot / 2]
        kernels::rope_rotate(q + i * Q, c.n_head, c.head_dim, c.n_rot, cs, c.arch->rope_mode);
        kernels::rope_rotate(k + i * KV, c.n_kv_head, c.head_dim, c.n_rot, cs, c.arch->rope_mode);
      }
    }
    // Rotated cache: H k and H v are stored, attention scores H q . H k == q . k, and its output
    // sum_j w_j H v_j = H o is rotated back (H H = I).
    const bool rot = io.rotated();
    if (rot) {
      kernels::hadamard(q, n_tok * c.n_head, c.head_dim);
      kernels::hadamard(k, n_tok * c.n_kv_head, c.head_dim);
      kernels::hadamard(v, n_tok * c.n_kv_head, c.head_dim);
    }
    // K is stored after RoPE (docs/KV.md): attention then needs no per-read rotation.
    io.write(il, k, v);
    io.views(il, seqs);
    for (AttnSeq& a : seqs) a.window = c.window(il);
    attention(c, seqs, s, pool);
    for (size_t si = 0; si < seqs.size(); ++si)
      if (AttnProbe* p = io.batch[si].probe; p && p->layer == il) probe_weights(c, seqs[si], s, *p);
    io.finish(il, k, v);  // KIVI: the residual moves on once attention has read it
    if (rot) kernels::hadamard(att, n_tok * c.n_head, c.head_dim);
    kernels::matmul(l.wo, att, h, n_tok, pool);
    add_bias(h, l.bo, n_tok, E);
    add_residual(c, l.attn_post_norm, x, h, n_tok);

    // ---- feed-forward block ----
    norm_rows(c, x, l.ffn_norm, l.ffn_norm_b, h, n_tok);
    feed_forward(c, l, h, n_tok, s, pool);
    add_residual(c, l.ffn_post_norm, x, h, n_tok);
  }
}

// Logits of n_out rows of the final residual stream: rows[r] of s.x (rows == nullptr: the last
// n_out rows of n_tok). Returns [n_out, n_vocab] in s.logits.
std::span<const float> output_logits(const ModelConfig& c, const Weights& w, const int64_t* rows,
                                     int64_t n_out, int64_t n_tok, Scratch& s, ThreadPool& pool) {
  const int64_t E = c.n_embd;
  const float* x = s.x.as<float>();
  float* h = s.h.as<float>();
  for (int64_t r = 0; r < n_out; ++r) {
    const int64_t row = rows ? rows[r] : n_tok - n_out + r;
    norm_rows(c, x + row * E, w.output_norm, w.output_norm_b, h + r * E, 1);
  }
  float* logits = s.logits.as<float>();  // [n_out, n_vocab]
  kernels::matmul(w.output, h, logits, n_out, pool);
  add_bias(logits, w.output_b, n_out, c.n_vocab);
  return {logits, static_cast<size_t>(n_out * c.n_vocab)};
}

void check_tokens(const ModelConfig& c, std::span<const int32_t> tokens, int64_t pos_end) {
  if (c.arch->pos == PosKind::Learned && pos_end > c.n_ctx_train)
    fail("position {} is past the {} positions this model has learned embeddings for",
         pos_end - 1, c.n_ctx_train);
  for (int32_t t : tokens)
    if (t < 0 || t >= c.n_vocab) fail("token id {} is out of range [0, {})", t, c.n_vocab);
}

// Each group's table covers the new positions and holds every block attention reads: those a
// window released (kNoBlock, at the front) lie before the window of every layer of the group.
void check_tables(const ModelConfig& c, const PagedKvStore& store, const BatchSeq& q) {
  const int64_t n = static_cast<int64_t>(q.tokens.size()), bs = store.block_size();
  if (static_cast<int32_t>(q.kv.size()) != store.n_groups())
    fail("forward: {} block tables for a store of {} layer groups", q.kv.size(), store.n_groups());
  if (q.pos0 < 0) fail("forward: negative position {}", q.pos0);
  std::vector<int64_t> first_held(q.kv.size(), 0);  // [n_groups] first block that is not a hole
  for (size_t g = 0; g < q.kv.size(); ++g) {
    const auto blocks = q.kv[g].blocks;
    if (q.pos0 + n > static_cast<int64_t>(blocks.size()) * bs)
      fail("forward: positions [{}, {}) are not covered by the sequence's {} blocks", q.pos0,
           q.pos0 + n, blocks.size());
    while (first_held[g] < static_cast<int64_t>(blocks.size()) &&
           blocks[static_cast<size_t>(first_held[g])] == kNoBlock)
      ++first_held[g];
  }
  for (int32_t il = 0; il < c.n_layer; ++il)
    if (first_visible(q.pos0, c.window(il)) < first_held[store.layer_group(il)] * bs)
      fail("forward: layer {} reads positions from {}, but the sequence's blocks before {} were "
           "released", il, first_visible(q.pos0, c.window(il)),
           first_held[store.layer_group(il)] * bs);
}

void check_probe(const ModelConfig& c, const PagedKvStore& store, const BatchSeq& q) {
  if (!q.probe) return;
  if (q.probe->layer < 0 || q.probe->layer >= c.n_layer)
    fail("attention map: layer {} is out of range [0, {})", q.probe->layer, c.n_layer);
  if (q.probe->head < 0 || q.probe->head >= c.n_head)
    fail("attention map: head {} is out of range [0, {})", q.probe->head, c.n_head);
  if (store.shape().kivi()) fail("attention map: not with a KIVI cache (--kv-residual)");
}

}  // namespace

std::span<const float> Model::forward(std::span<const BatchSeq> batch, PagedKvStore& store,
                                      Scratch& s, ThreadPool& pool) const {
  const ModelConfig& c = config_;
  if (batch.empty()) fail("forward: no sequences");
  if (store.shape().n_layer != c.n_layer || store.shape().kv_dim() != c.kv_dim() ||
      store.shape().head_dim != c.head_dim)
    fail("forward: the KV store's shape does not match the model");
  int64_t n_tok = 0, max_ctx = 0;
  for (const BatchSeq& q : batch) {
    const int64_t n = static_cast<int64_t>(q.tokens.size());
    if (n <= 0) fail("forward: a sequence of the batch has no tokens");
    check_tables(c, store, q);
    check_probe(c, store, q);
    check_tokens(c, q.tokens, q.pos0 + n);
    n_tok += n;
    max_ctx = std::max(max_ctx, q.pos0 + n);
  }
  ensure_scratch(s, c, n_tok, max_ctx, pool.size());
  std::vector<AttnSeq> seqs;  // [n_seqs]
  std::vector<int32_t>& toks = s.tokens;
  toks.clear();
  std::vector<int64_t> out_rows;  // rows whose logits are returned, in batch order
  for (const BatchSeq& q : batch) {
    const int64_t row0 = static_cast<int64_t>(toks.size()), n = static_cast<int64_t>(q.tokens.size());
    for (int64_t j = 0; j < n; ++j) s.pos[row0 + j] = q.pos0 + j;
    toks.insert(toks.end(), q.tokens.begin(), q.tokens.end());
    seqs.push_back(AttnSeq{{}, row0, n, q.pos0});
    for (int64_t j = q.all_logits ? 0 : n - 1; j < n; ++j) out_rows.push_back(row0 + j);
  }
  PassKv io{store, batch, c.kv_dim()};
  run_layers(c, weights_, toks.data(), s.pos.data(), n_tok, seqs, io, s, pool);
  return output_logits(c, weights_, out_rows.data(), static_cast<int64_t>(out_rows.size()), n_tok,
                       s, pool);
}

}  // namespace kvlm
