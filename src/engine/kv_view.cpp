#include "engine/kv_view.h"

#include <algorithm>

#include "kv/paged_kv.h"
#include "kv_manager/kv_manager.h"

namespace kvlm {

namespace {

// Blocks seq holds in every group (a window's released front entries are holes, not blocks).
int64_t blocks_held(const KvManager& kv, SeqId seq) {
  int64_t n = 0;
  for (int32_t g = 0; g < kv.n_groups(); ++g)
    for (BlockId b : kv.pool(g).block_table(seq)) n += b != kNoBlock;
  return n;
}

}  // namespace

KvSnapshot kv_snapshot(const KvManager& kv, const StepRunning& running, const StepQueue& waiting) {
  KvSnapshot s;
  s.shape = kv.shape();
  s.block_size = kv.block_size();
  s.bytes_per_token = PagedKvStore::block_bytes(s.shape, s.block_size) /
                      static_cast<uint64_t>(std::max(1, s.block_size));
  const KvManagerStats st = kv.stats();
  s.n_evicted_tokens = st.n_evicted_tokens;
  for (int32_t g = 0; g < kv.n_groups(); ++g) {
    const BlockPool& pool = kv.pool(g);
    KvViewGroup vg;
    vg.window = st.groups[static_cast<size_t>(g)].window;
    vg.n_layers = st.groups[static_cast<size_t>(g)].n_layers;
    vg.blocks = st.groups[static_cast<size_t>(g)].blocks;
    vg.bytes_total = st.groups[static_cast<size_t>(g)].bytes_total;
    vg.bytes_used = st.groups[static_cast<size_t>(g)].bytes_used;
    vg.refs.resize(static_cast<size_t>(pool.n_blocks()));
    vg.cached.resize(static_cast<size_t>(pool.n_blocks()));
    for (BlockId b = 0; b < pool.n_blocks(); ++b) {
      vg.refs[static_cast<size_t>(b)] = pool.ref_count(b);
      vg.cached[static_cast<size_t>(b)] = pool.is_cached(b);
    }
    s.groups.push_back(std::move(vg));
  }
  for (const auto& q : running) {
    if (!kv.has_seq(q->id)) continue;  // admitted by a plan that has not reserved yet
    KvViewSeq v;
    v.id = q->id;
    v.n_prompt = q->n_prompt;
    v.n_generated = static_cast<int64_t>(q->tokens.size()) - q->n_prompt;
    v.n_computed = q->n_computed;
    v.n_held = kv.seq_tokens(q->id);
    v.n_cached = std::max<int64_t>(q->n_cached, 0);
    v.evict_begin = kv.dropped(q->id).begin;
    v.n_evicted = kv.dropped(q->id).count;
    for (int32_t g = 0; g < kv.n_groups(); ++g) {
      const auto t = kv.pool(g).block_table(q->id);
      v.tables.emplace_back(t.begin(), t.end());
    }
    s.running.push_back(std::move(v));
  }
  for (const auto& q : waiting) s.waiting.push_back({q->id, q->n_prompt, q->n_cached >= 0});
  return s;
}

const char* kv_event_name(KvEventKind k) {
  switch (k) {
    case KvEventKind::Admit: return "admit";
    case KvEventKind::Blocks: return "blocks";
    case KvEventKind::Evict: return "evict";
    case KvEventKind::Preempt: return "preempt";
    case KvEventKind::Release: return "release";
  }
  return "?";
}

void KvEventTracker::diff(const KvManager& kv, const StepRunning& running,
                          const StepQueue& waiting, std::vector<KvEvent>& out) {
  std::unordered_map<SeqId, Seen> now;
  now.reserve(running.size());
  for (const auto& q : running) {
    if (!kv.has_seq(q->id)) continue;
    const int64_t n_held = kv.seq_tokens(q->id);
    const Seen cur{q->admitted_at, q->n_prompt, blocks_held(kv, q->id),
                   std::max<int64_t>(q->n_computed - n_held, 0)};
    const auto it = seen_.find(q->id);
    if (it == seen_.end() || it->second.admitted_at != cur.admitted_at) {
      out.push_back({KvEventKind::Admit, q->id, q->n_prompt, std::max<int64_t>(q->n_cached, 0),
                     cur.n_blocks, n_held});
    } else {
      if (cur.n_dropped > it->second.n_dropped)
        out.push_back({KvEventKind::Evict, q->id, q->n_prompt, 0, 0,
                       cur.n_dropped - it->second.n_dropped});
      if (cur.n_blocks != it->second.n_blocks)
        out.push_back({KvEventKind::Blocks, q->id, q->n_prompt, 0,
                       cur.n_blocks - it->second.n_blocks, n_held});
    }
    now.emplace(q->id, cur);
  }
  for (const auto& [id, seen] : seen_) {
    if (now.count(id)) continue;
    const bool requeued = std::any_of(waiting.begin(), waiting.end(),
                                      [id = id](const auto& q) { return q->id == id; });
    out.push_back({requeued ? KvEventKind::Preempt : KvEventKind::Release, id, seen.n_prompt, 0,
                   seen.n_blocks, 0});
  }
  seen_.swap(now);
}

}  // namespace kvlm
