// The KV cache as people look at it (`kvlm serve`'s GET /kv/state and /kv/events, the web page):
// a snapshot of the pool (every block's state, every running sequence's block table, the queue)
// and the events one scheduler step caused (admissions with their prefix hits, blocks taken and
// given back, preemptions, evictions).
//
// Both are built on the scheduler thread, which alone may read the KV manager, and only when
// asked: a snapshot when a client wants one (Scheduler::kv_snapshot), events while a listener
// watches (Scheduler::watch_kv). Building either is O(blocks + table entries) or O(running), a
// few microseconds next to a forward pass of milliseconds.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "engine/step_plan.h"
#include "kv/block_pool.h"
#include "kv/kv_shape.h"

namespace kvlm {

struct KvViewGroup {
  int32_t window = 0;    // 0: full attention
  int32_t n_layers = 0;  // layers whose K/V live in this group's blocks
  BlockPoolStats blocks;
  uint64_t bytes_total = 0, bytes_used = 0;
  std::vector<int32_t> refs;    // [n_blocks] block-table entries naming each block (0: free)
  std::vector<uint8_t> cached;  // [n_blocks] 1: contents registered in the prefix index
};

struct KvViewSeq {
  SeqId id = 0;
  int64_t n_prompt = 0;
  int64_t n_generated = 0;
  int64_t n_computed = 0;  // positions with K/V (pending prompt or the last sampled token not yet)
  int64_t n_held = 0;      // positions the blocks hold (n_computed minus evicted ones, plus
                           // room reserved for this step's tokens)
  int64_t n_cached = 0;    // prompt tokens the prefix cache served at first admission
  // Positions a window or context shift dropped: [evict_begin, evict_begin + n_evicted)
  // (KvManager::dropped); evict_begin -1: none.
  int64_t evict_begin = -1;
  int64_t n_evicted = 0;
  std::vector<std::vector<BlockId>> tables;  // [n_groups][ceil(n_held / block_size)], kNoBlock:
                                             // a block a sliding window released
};

struct KvViewWaiting {
  SeqId id = 0;
  int64_t n_prompt = 0;
  bool preempted = false;  // ran before and gave its blocks back; it is recomputed
};

struct KvSnapshot {
  KvShape shape;
  int32_t n_head = 0;                 // query heads: n_head / shape.n_kv_head share each KV head
  std::vector<int32_t> layer_window;  // [n_layer] 0: full attention, else the layer's window
  int32_t block_size = 0;
  uint64_t bytes_per_token = 0;  // every layer's K and V of one position
  std::vector<KvViewGroup> groups;     // [n_groups]
  std::vector<KvViewSeq> running;      // admission order
  std::vector<KvViewWaiting> waiting;  // admission order (preempted first)
  int64_t n_evicted_tokens = 0;        // positions dropped by windows / context shift, ever
};

// Reads the manager and the scheduler's lists (the scheduler thread only).
KvSnapshot kv_snapshot(const KvManager& kv, const StepRunning& running, const StepQueue& waiting);

enum class KvEventKind {
  Admit,    // a sequence got blocks (n_cached: its prefix-cache hit; again after a preemption)
  Blocks,   // a running sequence's block count changed by n_blocks (+ taken, - given back)
  Evict,    // n_tokens positions dropped by the window or context shift
  Preempt,  // gave its n_blocks back and returned to the queue
  Release,  // finished or cancelled: its n_blocks went back to the pool
};
const char* kv_event_name(KvEventKind k);  // "admit", "blocks", "evict", "preempt", "release"

struct KvEvent {
  KvEventKind kind = KvEventKind::Admit;
  SeqId id = 0;
  int64_t n_prompt = 0;
  int64_t n_cached = 0;  // Admit
  int64_t n_blocks = 0;  // Admit: held after admission; Blocks: the change; Preempt, Release:
                         // given back
  int64_t n_tokens = 0;  // Evict: positions dropped; else positions held
};

// What changed since the last call, from the running and waiting lists after a step. A sequence
// first seen running is admitted; one gone from running is preempted if it waits again, else
// released.
class KvEventTracker {
 public:
  void diff(const KvManager& kv, const StepRunning& running, const StepQueue& waiting,
            std::vector<KvEvent>& out);
  void reset() { seen_.clear(); }

 private:
  struct Seen {
    uint64_t admitted_at = 0;
    int64_t n_prompt = 0;
    int64_t n_blocks = 0;
    int64_t n_dropped = 0;  // n_computed - n_held: positions evicted so far
  };
  std::unordered_map<SeqId, Seen> seen_;
};

}  // namespace kvlm
