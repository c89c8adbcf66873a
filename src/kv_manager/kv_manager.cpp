#include "kv_manager/kv_manager.h"

#include <algorithm>
#include <limits>

#include "base/error.h"

namespace kvlm {

namespace {

// The groups a config describes: its own, or one full group of every layer.
std::vector<KvGroupSpec> group_specs(const KvManagerConfig& c) {
  if (!c.groups.empty()) return c.groups;
  return {KvGroupSpec{0, c.n_blocks, c.max_blocks}};
}

std::vector<int32_t> layer_groups(const KvManagerConfig& c) {
  if (!c.layer_group.empty()) return c.layer_group;
  return std::vector<int32_t>(static_cast<size_t>(c.shape.n_layer), 0);
}

// Checks what the parts would otherwise check later, or not at all (a KIVI block is sealed: a
// fresh prompt of its tokens holds something else, so it is never a prefix hit).
const KvManagerConfig& checked(const KvManagerConfig& c) {
  validate(c.shape);
  if (c.block_size <= 0) fail("the KV block size must be positive, got {}", c.block_size);
  for (const KvGroupSpec& g : group_specs(c)) {
    if (g.n_blocks <= 0) fail("the KV pool needs at least one block, got {}", g.n_blocks);
    if (g.window < 0) fail("a sliding window must be positive, got {}", g.window);
    if (g.max_blocks > g.n_blocks && c.prefix_cache)
      fail("a growing (dynamic) KV pool cannot have a prefix cache");
  }
  if (!c.groups.empty()) {
    if (static_cast<int32_t>(c.layer_group.size()) != c.shape.n_layer)
      fail("KV layer groups: {} layers named, the shape has {}", c.layer_group.size(),
           c.shape.n_layer);
    for (int32_t g : c.layer_group)
      if (g < 0 || g >= static_cast<int32_t>(c.groups.size()))
        fail("KV layer groups: group {} of {}", g, c.groups.size());
    if (c.prefix_cache && c.groups[0].window != 0)
      fail("the prefix cache needs a full-attention layer group first (a model whose every layer "
           "is windowed runs without it)");
  }
  if (c.shape.kivi() && c.prefix_cache)
    fail("the prefix cache does not apply to the KIVI cache (--kv-residual): a sealed block is "
         "not what a fresh prompt of its tokens holds (--no-prefix-cache)");
  if (c.shape.kivi() && c.block_size % c.shape.kivi_group != 0)
    fail("the KIVI cache's K groups of {} tokens need a --block-size that is a multiple of {}, "
         "got {}",
         c.shape.kivi_group, c.shape.kivi_group, c.block_size);
  return c;
}

PagedKvStore make_store(const KvManagerConfig& c) {
  if (!c.bytes) return PagedKvStore(c.shape, 1, c.block_size, c.n_slots);  // never written
  if (c.groups.empty()) return PagedKvStore(c.shape, c.n_blocks, c.block_size, c.n_slots);
  std::vector<int32_t> blocks;
  for (const KvGroupSpec& g : c.groups) blocks.push_back(g.n_blocks);
  return PagedKvStore(c.shape, c.block_size, c.layer_group, std::move(blocks), c.n_slots);
}

int32_t checked_blocks(int64_t n, int64_t n_ctx) {
  if (n > std::numeric_limits<int32_t>::max()) fail("a context of {} tokens is too large", n_ctx);
  return static_cast<int32_t>(n);
}

}  // namespace

KvManagerConfig kv_seq_config(const KvShape& shape, int64_t n_ctx, KvAlloc alloc,
                              const KvRope& rope, std::span<const int32_t> layer_window,
                              int64_t n_batch) {
  validate(shape);
  if (n_ctx <= 0) fail("the context must be positive, got {}", n_ctx);
  kv_bytes(shape, n_ctx);  // throws on overflow before anything is sized
  const KvSeqGroups sg =
      kv_seq_groups(shape, n_ctx, alloc == KvAlloc::Dynamic, layer_window, n_batch);
  KvManagerConfig c{.shape = shape,
                    .block_size = kv_seq_block_size(shape),
                    .n_blocks = checked_blocks(sg.groups[0].n_blocks, n_ctx),
                    .max_blocks = checked_blocks(sg.groups[0].max_blocks, n_ctx),
                    .n_slots = shape.kivi() ? 1 : 0,
                    .prefix_cache = false,
                    .rope = rope};
  if (sg.groups.size() == 1 && sg.groups[0].window == 0) return c;  // one full group
  for (const KvSeqGroup& g : sg.groups)
    c.groups.push_back({.window = g.window,
                        .n_blocks = checked_blocks(g.n_blocks, n_ctx),
                        .max_blocks = checked_blocks(g.max_blocks, n_ctx)});
  c.layer_group = sg.layer_group;
  return c;
}

namespace {

// Layers of each distinct window, in first-seen order (the groups' order after the full group).
std::vector<std::pair<int32_t, int32_t>> window_layers(std::span<const int32_t> layer_window) {
  std::vector<std::pair<int32_t, int32_t>> out;  // (window, n_layers)
  for (int32_t w : layer_window) {
    if (w <= 0) continue;
    auto it = std::find_if(out.begin(), out.end(), [&](auto& p) { return p.first == w; });
    if (it == out.end()) out.push_back({w, 1}); else ++it->second;
  }
  return out;
}

// Bytes of one block of one layer (a block spans every layer of its group).
uint64_t layer_block_bytes(const KvPoolSpec& spec) {
  return PagedKvStore::block_bytes(spec.shape, spec.block_size) /
         static_cast<uint64_t>(spec.shape.n_layer);
}

int64_t window_group_blocks(const KvPoolSpec& spec, int32_t window) {
  return kv_window_pool_blocks(window, spec.n_parallel, spec.n_batch, spec.n_ctx, spec.block_size);
}

}  // namespace

uint64_t kv_window_groups_bytes(const KvPoolSpec& spec) {
  uint64_t out = 0;
  for (const auto& [w, n_layers] : window_layers(spec.layer_window))
    out += uint64_t(window_group_blocks(spec, w)) * uint64_t(n_layers) * layer_block_bytes(spec);
  return out;
}

uint64_t kv_full_block_bytes(const KvPoolSpec& spec) {
  const auto windowed = static_cast<int64_t>(std::count_if(
      spec.layer_window.begin(), spec.layer_window.end(), [](int32_t w) { return w > 0; }));
  return uint64_t(spec.shape.n_layer - windowed) * layer_block_bytes(spec);
}

KvManagerConfig kv_pool_config(const KvPoolSpec& spec, int64_t full_blocks, int32_t n_slots,
                               bool prefix_cache, const KvRope& rope) {
  const auto windows = window_layers(spec.layer_window);
  KvManagerConfig c{.shape = spec.shape,
                    .block_size = spec.block_size,
                    .n_blocks = checked_blocks(full_blocks, spec.n_ctx),
                    .n_slots = n_slots,
                    .prefix_cache = prefix_cache,
                    .rope = rope};
  if (windows.empty()) return c;
  c.release_on_commit = true;  // what window_group_blocks counts on
  std::vector<int32_t> group_window;  // [n_groups]
  if (kv_full_block_bytes(spec) > 0) {
    group_window.push_back(0);
    c.groups.push_back({.window = 0, .n_blocks = c.n_blocks});
  }
  for (const auto& [w, n_layers] : windows) {
    group_window.push_back(w);
    c.groups.push_back(
        {.window = w,
         .n_blocks = checked_blocks(window_group_blocks(spec, w), spec.n_ctx),
         .seq_blocks = checked_blocks(
             kv_window_blocks(w, spec.n_batch, spec.n_ctx, spec.block_size), spec.n_ctx)});
  }
  for (int32_t w : spec.layer_window)
    c.layer_group.push_back(static_cast<int32_t>(
        std::find(group_window.begin(), group_window.end(), std::max(w, 0)) -
        group_window.begin()));
  return c;
}

KvManager::KvManager(const KvManagerConfig& config)
    : shape_(checked(config).shape),
      block_size_(config.block_size),
      bytes_(config.bytes),
      store_(make_store(config)),
      rope_(config.rope),
      layer_group_(layer_groups(config)),
      release_on_commit_(config.release_on_commit) {
  const std::vector<int32_t>& lg = layer_group_;
  for (const KvGroupSpec& g : group_specs(config)) {
    Group grp;
    grp.window = g.window;
    grp.max_blocks = std::max(g.max_blocks, g.n_blocks);
    grp.seq_blocks = g.seq_blocks > 0 ? g.seq_blocks : grp.max_blocks;
    grp.n_layers = static_cast<int32_t>(
        std::count(lg.begin(), lg.end(), static_cast<int32_t>(groups_.size())));
    grp.pool = std::make_unique<BlockPool>(BlockPool::Config{
        .n_blocks = g.n_blocks, .block_size = config.block_size, .audit = config.audit});
    groups_.push_back(std::move(grp));
  }
  if (config.prefix_cache) {
    prefix_ = std::make_unique<PrefixCache>(PrefixCache::Config{
        .n_blocks = config.n_blocks, .block_size = config.block_size, .audit = config.audit});
    pool0().set_evict_hook([this](BlockId b) {
      prefix_->erase(b);
      unpair_full(b);
    });
    for (size_t gi = 1; gi < groups_.size(); ++gi)
      groups_[gi].pool->set_evict_hook([this, gi](BlockId b) { unpair_window(groups_[gi], b); });
  }
  for (int32_t i = config.n_slots - 1; i >= 0; --i) free_slots_.push_back(i);
  const KvShape& s = shape_;
  const int32_t key[] = {s.n_layer, s.n_kv_head, s.head_dim, static_cast<int32_t>(s.dtype_k),
                         static_cast<int32_t>(s.dtype_v), block_size_, s.rotate ? 1 : 0,
                         s.kivi_residual};
  cache_type_ = prefix_hash_xxh3(key, sizeof(key));
}

KvManager::~KvManager() = default;

int64_t KvManager::blocks_for_budget(const KvShape& shape, int32_t block_size,
                                     uint64_t budget_bytes, int32_t n_slots) {
  return PagedKvStore::blocks_for_budget(shape, block_size, budget_bytes, n_slots);
}

KvManagerStats KvManager::stats() const {
  KvManagerStats s;
  s.block_size = block_size_;
  s.bytes_total = store_.bytes();
  // A block of every layer; a group's block spans only its layers.
  const uint64_t per_layer_block =
      PagedKvStore::block_bytes(shape_, block_size_) / static_cast<uint64_t>(shape_.n_layer);
  for (const Group& g : groups_) {
    KvGroupStats gs;
    gs.window = g.window;
    gs.n_layers = g.n_layers;
    gs.blocks = g.pool->stats();
    gs.bytes_total = uint64_t(gs.blocks.n_total) * per_layer_block * uint64_t(g.n_layers);
    gs.bytes_used = uint64_t(gs.blocks.n_used) * per_layer_block * uint64_t(g.n_layers);
    s.blocks.n_total += gs.blocks.n_total;
    s.blocks.n_free += gs.blocks.n_free;
    s.blocks.n_used += gs.blocks.n_used;
    s.blocks.n_cached += gs.blocks.n_cached;
    s.blocks.n_cached_free += gs.blocks.n_cached_free;
    s.blocks.n_evicted += gs.blocks.n_evicted;
    s.bytes_used += gs.bytes_used;
    s.groups.push_back(gs);
  }
  // The KIVI residual slots sequences hold.
  s.bytes_used += uint64_t(store_.n_slots() - static_cast<int32_t>(free_slots_.size())) *
                  PagedKvStore::residual_slot_bytes(shape_);
  s.n_seqs = static_cast<int64_t>(seqs_.size());
  s.n_evicted_tokens = n_evicted_tokens_;
  return s;
}

int64_t KvManager::capacity_tokens() const {
  int64_t out = std::numeric_limits<int64_t>::max();
  for (const Group& g : groups_)
    if (g.window == 0) out = std::min(out, int64_t{g.pool->n_blocks()} * block_size_);
  return out;
}

KvManager::SeqState& KvManager::state(SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) fail("KV manager: unknown sequence {}", seq);
  return it->second;
}

const KvManager::SeqState& KvManager::state(SeqId seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) fail("KV manager: unknown sequence {}", seq);
  return it->second;
}

bool KvManager::evicted(SeqId seq) const { return state(seq).evicted; }

KvManager::Dropped KvManager::dropped(SeqId seq) const { return state(seq).dropped; }

void KvManager::copy_blocks(const std::vector<BlockCopy>& copies, int32_t group) {
  if (!bytes_) return;
  for (const BlockCopy& cp : copies) store_.copy_block(cp.src, cp.dst, group);
}

// ---- a sequence's life ---------------------------------------------------------------------------

KvHit KvManager::lookup(std::span<const int32_t> tokens, std::string_view salt) const {
  KvHit hit;
  if (!prefix_) return hit;
  const PrefixKey k{cache_type_, salt};
  hit.full = prefix_->match(k, tokens);
  if (windowed_prefix()) {
    // The longest run of full blocks whose window groups still hold the twins the next query's
    // windows read; no partial hit (its window rows would need a copy in every group too).
    std::vector<BlockId> ids;
    size_t n = hit.full.block_ids.size();
    for (; n > 0; --n) {
      const std::span<const BlockId> head(hit.full.block_ids.data(), n);
      bool all = true;
      for (size_t gi = 1; gi < groups_.size() && all; ++gi)
        all = window_hit(groups_[gi], head, &ids);
      if (all) break;
    }
    hit.full.block_ids.resize(n);
    hit.full.n_tokens = static_cast<int64_t>(n) * block_size_;
    return hit;
  }
  hit.partial = prefix_->match_partial(k, tokens, hit.full);
  return hit;
}

bool KvManager::admit(SeqId seq, std::span<const int32_t> tokens, std::string_view salt,
                      int64_t n_held, const KvHit& hit) {
  if (seqs_.count(seq) != 0) fail("KV manager: sequence {} is already admitted", seq);
  if ((hit.n_tokens() > 0 && hit.n_tokens() >= static_cast<int64_t>(tokens.size())) ||
      n_held < hit.n_tokens())
    fail("KV manager: a prefix hit of {} tokens for {} tokens, {} held", hit.n_tokens(),
         tokens.size(), n_held);
  if (shape_.kivi() && free_slots_.empty())
    fail("KV manager: all {} KIVI residual slots are held", store_.n_slots());
  // Matched blocks with no holder leave the free queue when shared: they do not count as free.
  // A window group needs at most its bound (its pool's size) at once.
  const int64_t n_blocks_all = blocks_for(n_held);
  std::vector<std::vector<BlockId>> shared(groups_.size());  // [n_groups] the hit's blocks
  shared[0].assign(hit.full.block_ids.begin(), hit.full.block_ids.end());
  for (size_t gi = 1; gi < groups_.size() && windowed_prefix(); ++gi)
    if (!window_hit(groups_[gi], hit.full.block_ids, &shared[gi]))
      fail("KV manager: a prefix hit whose window blocks are gone (not from lookup())");
  for (const Group& g : groups_) {
    int64_t matched_free = 0, matched = 0;
    for (BlockId b : shared[static_cast<size_t>(&g - groups_.data())]) {
      if (b == kNoBlock) continue;
      matched_free += g.pool->ref_count(b) == 0;
      ++matched;
    }
    const int64_t need = std::max<int64_t>(
        0, std::min<int64_t>(n_blocks_all, g.window > 0 ? g.seq_blocks : n_blocks_all) - matched);
    if (g.pool->stats().n_free - matched_free < need) return false;
  }

  for (const Group& g : groups_) g.pool->add_seq(seq);
  SeqState& s = seqs_[seq];
  s.salt = salt;
  s.caches.resize(groups_.size());
  if (shape_.kivi()) {
    s.kivi_slot = free_slots_.back();
    free_slots_.pop_back();
  }
  for (size_t gi = 0; gi < groups_.size(); ++gi) groups_[gi].pool->append_shared(seq, shared[gi]);
  s.n_registered = static_cast<int64_t>(hit.full.block_ids.size());
  s.canon = shared[0];
  for (BlockId b : s.canon) s.canon_gen.push_back(prefix_ ? prefix_->generation(b) : 0);
  if (hit.partial.block >= 0) {
    // The partial hit goes into a fresh block of seq's own (one of the `need` counted above, so
    // append cannot fail), copied now: the source is cached-free or shared and stays as the index
    // registered it, but later admissions may evict it and a forward pass overwrite it. When the
    // pool hands out the source itself as the fresh block (it was the only free one), its rows
    // are already in place and only its index entry goes.
    copies_.clear();
    const bool got = pool0().append(seq, hit.partial.n_tokens, &copies_);
    KVLM_CHECK(got && copies_.empty());
    if (bytes_) store_.copy_block(hit.partial.block, pool0().block_table(seq).back());
  }
  return true;
}

void KvManager::fork(SeqId src, SeqId dst) {
  const SeqState& s = state(src);
  if (seqs_.count(dst) != 0) fail("KV manager: fork target sequence {} already exists", dst);
  if (shape_.kivi()) fail("KV manager: the KIVI cache cannot fork a sequence");
  for (const Group& g : groups_) g.pool->fork(src, dst);
  SeqState& d = seqs_[dst];
  d.salt = s.salt;
  d.n_registered = s.n_registered;
  d.canon = s.canon;
  d.canon_gen = s.canon_gen;
  d.evicted = s.evicted;
  d.n_sealed = s.n_sealed;
  d.caches.resize(groups_.size());
}

int64_t KvManager::unseen_blocks(const Group& g, int64_t pos) const {
  if (g.window == 0) return 0;
  return std::max<int64_t>(0, pos - g.window + 1) / block_size_;
}

bool KvManager::fits(SeqId seq, int64_t n) {
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    Group& g = groups_[gi];
    while (g.pool->blocks_needed(seq, n) > g.pool->stats().n_free) {
      if (g.pool->n_blocks() >= g.max_blocks) return false;
      // A dynamic cache's next chunk (kv_seq_blocks' arithmetic: kKvChunkTokens at a time).
      const int64_t chunk = std::max<int64_t>(1, kKvChunkTokens / block_size_);
      const auto to =
          static_cast<int32_t>(std::min<int64_t>(g.max_blocks, g.pool->n_blocks() + chunk));
      if (bytes_) store_.grow(to, static_cast<int32_t>(gi));
      g.pool->grow(to);
    }
  }
  return true;
}

bool KvManager::reserve(SeqId seq, int64_t n) {
  state(seq);  // an unknown sequence is an error, before any pool changes
  const int64_t pos = seq_tokens(seq);
  release_unseen(seq, pos);  // window groups give back what no query from pos on reads
  if (!fits(seq, n)) return false;
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    copies_.clear();
    const bool got = groups_[gi].pool->append(seq, n, &copies_);
    KVLM_CHECK(got);  // fits() counted every group's free blocks
    copy_blocks(copies_, static_cast<int32_t>(gi));
  }
  return true;
}

// Rows a window group holds after an eviction leaves n_after positions: those the window of
// position n_after reads, [lo, n_after). lo = 0 for a full group.
int64_t KvManager::evict_low(const Group& g, int64_t n_after) const {
  return g.window == 0 ? 0 : std::max<int64_t>(0, n_after - g.window + 1);
}

bool KvManager::evict(SeqId seq, int64_t begin, int64_t count) {
  SeqState& s = state(seq);
  if (shape_.kivi()) fail("KV manager: the KIVI cache cannot evict");
  const int64_t n_tokens = seq_tokens(seq), n_after = n_tokens - count;
  if (begin < 0 || count < 0 || begin + count > n_tokens)
    fail("KV manager: cannot evict [{}, {}) of {} positions", begin, begin + count, n_tokens);
  if (count == 0) return true;
  // All or nothing: every group's check before any group changes.
  for (const Group& g : groups_) {
    const int64_t lo = evict_low(g, n_after);
    const auto table = g.pool->block_table(seq);
    if (lo < begin && table[static_cast<size_t>(lo / block_size_)] == kNoBlock)
      fail("KV manager: cannot evict [{}, {}): the sliding window of {} after it reads kept "
           "positions from {} on, which its layers already released",
           begin, begin + count, g.window, lo);
    const bool fits = g.window == 0 ? g.pool->can_make_writable(seq, begin / block_size_,
                                                                blocks_for(n_after))
                                    : g.pool->can_renew(seq, n_after, lo / block_size_);
    if (!fits) return false;
  }
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    if (groups_[gi].window == 0) {
      shift_full(seq, static_cast<int32_t>(gi), begin, count);
    } else {
      shift_window(seq, static_cast<int32_t>(gi), begin, count);
    }
  }
  s.n_registered = std::min(s.n_registered, begin / block_size_);
  s.canon.resize(static_cast<size_t>(s.n_registered));
  s.canon_gen.resize(static_cast<size_t>(s.n_registered));
  s.evicted = true;
  // Later rows moved down by count: an eviction at the same begin drops the positions right
  // after the ones dropped before.
  if (s.dropped.count == 0) s.dropped.begin = begin;
  s.dropped.count += count;
  n_evicted_tokens_ += count;
  return true;
}

// A full group shifts in place: the blocks written made its own, rows moved down, the tail freed.
void KvManager::shift_full(SeqId seq, int32_t gi, int64_t begin, int64_t count) {
  BlockPool& pool = *groups_[static_cast<size_t>(gi)].pool;
  const int64_t n_tokens = pool.seq_tokens(seq), n_after = n_tokens - count;
  copies_.clear();
  KVLM_CHECK(pool.make_writable(seq, begin / block_size_, blocks_for(n_after), &copies_));
  copy_blocks(copies_, gi);
  if (bytes_) store_.shift_out(pool.block_table(seq), n_tokens, begin, count, rope_, gi);
  pool.truncate(seq, n_after);
}

// A window group keeps only the rows its window reads after the eviction, [lo, n_after): kept
// ones (p < begin) and moved ones (from p + count, K re-rotated). They are gathered, the group's
// blocks renewed from lo's block and the rows written back: shifting in place would hold the old
// window's blocks and the new one's at once, twice the window's bound.
void KvManager::shift_window(SeqId seq, int32_t gi, int64_t begin, int64_t count) {
  Group& g = groups_[static_cast<size_t>(gi)];
  const int64_t n_tokens = g.pool->seq_tokens(seq), n_after = n_tokens - count;
  const int64_t lo = evict_low(g, n_after), n_kept = std::max<int64_t>(0, begin - lo);
  const int64_t from = lo + n_kept, n_rows = n_after - lo;  // moved rows: [from, n_after)
  const size_t kb = kv_k_row_bytes(shape_), vb = kv_v_row_bytes(shape_);
  std::vector<std::byte> k, v;  // [layers of the group, n_rows, row bytes]
  std::vector<float> scratch(static_cast<size_t>(shape_.kv_dim()));
  if (bytes_) {
    k.resize(size_t(g.n_layers) * size_t(n_rows) * kb);
    v.resize(size_t(g.n_layers) * size_t(n_rows) * vb);
    const auto table = g.pool->block_table(seq);
    size_t l = 0;
    for (int32_t il = 0; il < shape_.n_layer; ++il) {
      if (layer_group_[static_cast<size_t>(il)] != gi) continue;
      std::byte* kl = k.data() + l * size_t(n_rows) * kb;
      std::byte* vl = v.data() + l * size_t(n_rows) * vb;
      store_.read_rows(il, table, lo, n_kept, kl, vl);
      store_.read_rows(il, table, from + count, n_after - from, kl + n_kept * kb, vl + n_kept * vb);
      for (int64_t r = n_kept; r < n_rows; ++r)
        kv_rerotate_k_row(shape_, rope_, -count, kl + size_t(r) * kb, scratch.data(), il);
      ++l;
    }
  }
  KVLM_CHECK(g.pool->renew(seq, n_after, lo / block_size_));
  if (!bytes_) return;
  const auto table = g.pool->block_table(seq);
  size_t l = 0;
  for (int32_t il = 0; il < shape_.n_layer; ++il) {
    if (layer_group_[static_cast<size_t>(il)] != gi) continue;
    store_.write_rows(il, table, lo, n_rows, k.data() + l * size_t(n_rows) * kb,
                      v.data() + l * size_t(n_rows) * vb);
    ++l;
  }
}

void KvManager::commit(SeqId seq, std::span<const int32_t> tokens, int64_t n_computed) {
  SeqState& s = state(seq);
  KVLM_CHECK(n_computed <= seq_tokens(seq) && n_computed <= static_cast<int64_t>(tokens.size()));
  if (shape_.kivi())
    s.n_sealed = kv_kivi_sealed(s.n_sealed, n_computed, shape_.kivi_residual, shape_.kivi_group);
  if (prefix_ && !s.evicted) register_blocks(seq, s, tokens, n_computed);
  // After registering (twins are paired first): the next query is at n_computed or later.
  if (release_on_commit_) release_unseen(seq, n_computed);
}

void KvManager::release_unseen(SeqId seq, int64_t pos) {
  for (Group& g : groups_) {
    const auto table = static_cast<int64_t>(g.pool->block_table(seq).size());
    const int64_t unseen = std::min(unseen_blocks(g, pos), table - 1);  // the last block stays
    if (unseen > 0) g.pool->release_front(seq, unseen);
  }
}

void KvManager::register_blocks(SeqId seq, SeqState& s, std::span<const int32_t> tokens,
                                int64_t n_computed) {
  const auto table = pool0().block_table(seq);
  const PrefixKey k = key(s);
  for (const int64_t full = n_computed / block_size_; s.n_registered < full; ++s.n_registered) {
    const int64_t bi = s.n_registered;
    const BlockId blk = table[static_cast<size_t>(bi)];
    const auto toks =
        tokens.subspan(static_cast<size_t>(bi * block_size_), static_cast<size_t>(block_size_));
    BlockId canon = blk;  // a block shared from the index is the registered one
    if (!pool0().is_cached(blk)) {
      const auto prev = static_cast<size_t>(bi - 1);
      const BlockId parent = bi == 0 ? kNoParent : s.canon[prev];
      if (bi > 0 && (parent < 0 || prefix_->generation(parent) != s.canon_gen[prev]))
        canon = -1;  // the chain ended before (or its block was registered anew): unverifiable
      else if (prefix_->insert(k, parent, toks, blk))
        pool0().mark_cached(blk);
      else
        canon = prefix_->registered(k, parent, toks);  // computed twice: continue from the first
    }
    s.canon.push_back(canon);
    s.canon_gen.push_back(canon >= 0 ? prefix_->generation(canon) : 0);
    if (canon >= 0 && windowed_prefix()) pair_twins(seq, bi, canon);
  }
}

bool KvManager::can_truncate(SeqId seq, int64_t n) const {
  const SeqState& s = state(seq);
  if (n < 0 || n > seq_tokens(seq) || n < s.n_sealed) return false;
  for (const Group& g : groups_) {
    const auto table = g.pool->block_table(seq);
    const int64_t first = unseen_blocks(g, n);  // the window of position n starts in this block
    for (int64_t b = first; b < blocks_for(n); ++b)
      if (table[static_cast<size_t>(b)] == kNoBlock) return false;
  }
  return true;
}

void KvManager::truncate(SeqId seq, int64_t n) {
  SeqState& s = state(seq);
  if (n < s.n_sealed)
    fail("KV manager: cannot truncate to {} positions: {} are sealed (KIVI)", n, s.n_sealed);
  if (!can_truncate(seq, n))
    fail("KV manager: cannot truncate to {} positions: a sliding window released blocks it reads",
         n);
  for (Group& g : groups_) g.pool->truncate(seq, n);
  // A registered block cut in the middle is re-registered once full again (the pool drops its
  // index entry before anything is written into it).
  s.n_registered = std::min(s.n_registered, n / block_size_);
  s.canon.resize(static_cast<size_t>(s.n_registered));
  s.canon_gen.resize(static_cast<size_t>(s.n_registered));
}

void KvManager::register_partial(SeqId seq, const SeqState& s, std::span<const int32_t> tokens,
                                 int64_t n_computed) {
  // The partly filled last block holds the K/V of tokens [f * bs, n_computed): the end of the
  // history a chat's next turn sends again. Registered as a leaf it stays in the pool's LRU after
  // free_seq, and the next prompt copies it instead of recomputing up to bs - 1 tokens. Only a
  // block this sequence holds alone, not already cached; insert_partial refuses it when the full
  // block before it is not registered (its chain could not be verified).
  const int64_t f = n_computed / block_size_, k = n_computed % block_size_;
  const auto table = pool0().block_table(seq);
  KVLM_CHECK(static_cast<int64_t>(table.size()) > f);
  const BlockId blk = table[static_cast<size_t>(f)];
  if (pool0().is_cached(blk) || pool0().ref_count(blk) != 1) return;
  const int32_t parent = f == 0 ? kNoParent : table[static_cast<size_t>(f - 1)];
  if (prefix_->insert_partial(key(s), parent,
                              tokens.subspan(static_cast<size_t>(f * block_size_),
                                             static_cast<size_t>(k)),
                              blk))
    pool0().mark_cached(blk);
}

void KvManager::release(SeqId seq, std::span<const int32_t> tokens, int64_t n_computed,
                        bool keep_partial) {
  const SeqState& s = state(seq);
  KVLM_CHECK(n_computed <= seq_tokens(seq) && n_computed <= static_cast<int64_t>(tokens.size()));
  if (keep_partial && prefix_ && !windowed_prefix() && !s.evicted && n_computed % block_size_ > 0)
    register_partial(seq, s, tokens, n_computed);
  for (Group& g : groups_) g.pool->free_seq(seq);
  if (s.kivi_slot >= 0) free_slots_.push_back(s.kivi_slot);
  seqs_.erase(seq);
}

// ---- window groups with the prefix cache -------------------------------------------------------

bool KvManager::window_hit(const Group& g, std::span<const BlockId> full_ids,
                           std::vector<BlockId>* ids) const {
  const auto n = static_cast<int64_t>(full_ids.size());
  // The last block always stays (as release_front keeps it): the next token may read it.
  const int64_t first = std::min(unseen_blocks(g, n * block_size_), std::max<int64_t>(n - 1, 0));
  ids->assign(static_cast<size_t>(first), kNoBlock);
  for (int64_t b = first; b < n; ++b) {
    const auto it = g.of_full.find(full_ids[static_cast<size_t>(b)]);
    if (it == g.of_full.end()) return false;
    ids->push_back(it->second);
  }
  return true;
}

void KvManager::pair_twins(SeqId seq, int64_t bi, BlockId full) {
  for (size_t gi = 1; gi < groups_.size(); ++gi) {
    Group& g = groups_[gi];
    const BlockId blk = g.pool->block_table(seq)[static_cast<size_t>(bi)];
    if (blk == kNoBlock || g.of_full.count(full) != 0 || g.pool->is_cached(blk)) continue;
    g.pool->mark_cached(blk);
    g.of_full[full] = blk;
    g.full_of[blk] = full;
  }
}

void KvManager::unpair_full(BlockId full) {
  for (size_t gi = 1; gi < groups_.size(); ++gi) {
    Group& g = groups_[gi];
    const auto it = g.of_full.find(full);
    if (it == g.of_full.end()) continue;
    const BlockId blk = it->second;
    g.full_of.erase(blk);
    g.of_full.erase(it);
    g.pool->forget_cached(blk);  // no hit can reach it any more
  }
}

void KvManager::unpair_window(Group& g, BlockId blk) {
  const auto it = g.full_of.find(blk);
  if (it == g.full_of.end()) return;
  g.of_full.erase(it->second);
  g.full_of.erase(it);
}

KvSeqCache KvManager::seq_cache(SeqId seq) const { return seq_caches(seq)[0]; }

std::span<const KvSeqCache> KvManager::seq_caches(SeqId seq) const {
  const SeqState& s = state(seq);
  for (size_t g = 0; g < groups_.size(); ++g)
    s.caches[g] = KvSeqCache{groups_[g].pool->block_table(seq), s.kivi_slot, s.n_sealed};
  return s.caches;
}

void KvManager::check_invariants() const {
  for (const Group& g : groups_) g.pool->check_invariants();
  if (prefix_) prefix_->check_invariants();
  // Every cached block is registered in the index and the other way round.
  int32_t n_cached = 0;
  for (BlockId b = 0; b < pool0().n_blocks(); ++b) {
    const bool in_index = prefix_ && prefix_->contains(b);
    KVLM_CHECK(pool0().is_cached(b) == in_index);
    n_cached += in_index;
  }
  KVLM_CHECK(!prefix_ || n_cached == prefix_->n_cached());
  // A window group's cached blocks are exactly the twins of registered group-0 blocks.
  for (size_t gi = 1; gi < groups_.size(); ++gi) {
    const Group& g = groups_[gi];
    KVLM_CHECK(g.of_full.size() == g.full_of.size());
    for (const auto& [full, blk] : g.of_full) {
      KVLM_CHECK(prefix_ && prefix_->contains(full) && g.pool->is_cached(blk));
      KVLM_CHECK(g.full_of.at(blk) == full);
    }
    KVLM_CHECK(g.pool->stats().n_cached == static_cast<int32_t>(g.of_full.size()));
  }
  KVLM_CHECK(static_cast<int64_t>(free_slots_.size()) + (shape_.kivi() ? pool0().n_seqs() : 0) ==
             store_.n_slots());
  for (const Group& g : groups_) KVLM_CHECK(g.pool->n_seqs() == static_cast<int64_t>(seqs_.size()));
}

}  // namespace kvlm
