#include "grammar/matcher.h"

#include <algorithm>
#include <numeric>

#include "base/error.h"

namespace kvlm {

// ---------------------------------------------------------------------------------------------
// TokenTrie

TokenTrie::TokenTrie(const std::vector<std::string>& token_bytes, std::vector<int32_t> end_ids)
    : n_vocab_(static_cast<int32_t>(token_bytes.size())),
      bytes_(token_bytes),
      end_ids_(std::move(end_ids)) {
  for (int32_t id = 0; id < n_vocab_; ++id)
    if (!bytes_[static_cast<size_t>(id)].empty()) order_.push_back(id);
  // Sorted by bytes, a node's subtree is a contiguous range of order_ and the tokens ending at
  // the node (prefixes of the others) come first in it.
  std::sort(order_.begin(), order_.end(), [&](int32_t a, int32_t b) {
    return bytes_[static_cast<size_t>(a)] < bytes_[static_cast<size_t>(b)];
  });
  nodes_.emplace_back();
  build(0, 0, static_cast<uint32_t>(order_.size()), 0);
}

const TokenTrie& TokenTrie::single_bytes() {
  static const TokenTrie trie = [] {
    std::vector<std::string> v;
    for (int b = 0; b < 256; ++b) v.emplace_back(1, static_cast<char>(b));
    return TokenTrie(v, {});
  }();
  return trie;
}

// Node `node` holds the tokens order_[lo, hi), which share their first `depth` bytes.
void TokenTrie::build(uint32_t node, uint32_t lo, uint32_t hi, size_t depth) {
  auto at = [&](uint32_t k) -> const std::string& { return bytes_[static_cast<size_t>(order_[k])]; };
  uint32_t n_end = 0;
  while (lo + n_end < hi && at(lo + n_end).size() == depth) ++n_end;
  nodes_[node].tok_lo = lo;
  nodes_[node].tok_hi = hi;
  nodes_[node].n_end = n_end;
  // One child per distinct byte at `depth`, allocated together so they are contiguous.
  std::vector<uint32_t> starts;
  for (uint32_t k = lo + n_end; k < hi; ++k)
    if (k == lo + n_end || at(k)[depth] != at(k - 1)[depth]) starts.push_back(k);
  const auto first = static_cast<uint32_t>(nodes_.size());
  nodes_[node].first_child = first;
  nodes_[node].n_children = static_cast<uint32_t>(starts.size());
  nodes_.resize(nodes_.size() + starts.size());
  ByteSet below;
  for (size_t i = 0; i < starts.size(); ++i) {
    const uint32_t c = first + static_cast<uint32_t>(i);
    const uint32_t end = i + 1 < starts.size() ? starts[i + 1] : hi;
    nodes_[c].byte = static_cast<uint8_t>(at(starts[i])[depth]);
    build(c, starts[i], end, depth + 1);
    below.add(nodes_[c].byte);
    for (int w = 0; w < 4; ++w) below.w[static_cast<size_t>(w)] |= nodes_[c].below.w[static_cast<size_t>(w)];
  }
  nodes_[node].below = below;
}

// ---------------------------------------------------------------------------------------------
// GrammarMatcher: stacks

namespace {
// Normalisation steps one byte may take (rule expansions and pops); a grammar needing more (a
// cycle through empty alternatives) loses the stacks past it rather than looping.
constexpr int kNormaliseBudget = 4096;

inline void set_bit(uint32_t* mask, int32_t id) {
  mask[static_cast<uint32_t>(id) >> 5] |= uint32_t{1} << (static_cast<uint32_t>(id) & 31);
}
}  // namespace

GrammarMatcher::GrammarMatcher(std::shared_ptr<const Grammar> grammar, const TokenTrie& trie)
    : g_(std::move(grammar)), trie_(trie) {
  const Grammar& g = *g_;
  int budget = kNormaliseBudget;
  for (uint32_t a = g.rule_alt[g.root]; a < g.rule_alt[g.root + 1]; ++a)
    normalise(push({kNone, a, g.alt_begin[a], 0, 0}), state_, budget);
}

uint32_t GrammarMatcher::push(const Frame& f) {
  arena_.push_back(f);
  return static_cast<uint32_t>(arena_.size() - 1);
}

bool GrammarMatcher::same_stack(uint32_t a, uint32_t b) const {
  while (a != b) {
    if (a >= kAccept || b >= kAccept) return false;  // kAccept or kNone against a frame
    const Frame& fa = arena_[a];
    const Frame& fb = arena_[b];
    if (fa.alt != fb.alt || fa.elem != fb.elem || fa.count != fb.count) return false;
    a = fa.parent;
    b = fb.parent;
  }
  return true;
}

void GrammarMatcher::add_top(uint32_t id, std::vector<uint32_t>& out) const {
  if (out.size() >= kMaxStacks) return;
  for (uint32_t x : out)
    if (same_stack(x, id)) return;
  out.push_back(id);
}

void GrammarMatcher::normalise(uint32_t id, std::vector<uint32_t>& out, int& budget) {
  if (--budget < 0) return;
  const Grammar& g = *g_;
  const Frame f = arena_[id];
  const uint32_t alt_end = g.alt_begin[f.alt + 1];
  if (f.elem == alt_end) {  // the alternative is whole: back to the parent's next element
    if (f.parent == kNone) return add_top(kAccept, out);
    const Frame p = arena_[f.parent];
    return normalise(push({p.parent, p.alt, p.elem + 1, 0, p.depth}), out, budget);
  }
  const GrammarElem& e = g.elems[f.elem];
  if (e.is_rule) {
    // A reference in the last position replaces its frame (nothing is left to return to), so
    // right recursion (item lists, string bodies with escapes) runs in constant depth.
    const bool tail = f.elem + 1 == alt_end;
    const uint32_t parent = tail ? f.parent : id;
    const uint16_t depth = tail ? f.depth : static_cast<uint16_t>(f.depth + 1);
    if (depth > kMaxStackDepth) return;
    for (uint32_t a = g.rule_alt[e.ref]; a < g.rule_alt[e.ref + 1]; ++a)
      normalise(push({parent, a, g.alt_begin[a], 0, depth}), out, budget);
    return;
  }
  if (f.count < e.max) add_top(id, out);
  if (f.count >= e.min) normalise(push({f.parent, f.alt, f.elem + 1, 0, f.depth}), out, budget);
}

void GrammarMatcher::advance(const uint32_t* in, size_t n, uint8_t b, std::vector<uint32_t>& out) {
  const Grammar& g = *g_;
  out.clear();
  int budget = kNormaliseBudget;
  for (size_t i = 0; i < n; ++i) {
    if (in[i] == kAccept) continue;
    const Frame f = arena_[in[i]];
    const GrammarElem& e = g.elems[f.elem];  // a byte class with f.count < e.max (normalised)
    if (!g.sets[e.ref].has(b)) continue;
    // An unbounded repetition only counts up to its minimum: past it every count behaves alike,
    // and the same frame can stand for the new state.
    const uint16_t count = e.max == kRepUnbounded ? std::min<uint16_t>(f.count + 1, e.min)
                                                  : static_cast<uint16_t>(f.count + 1);
    const uint32_t id = count == f.count ? in[i] : push({f.parent, f.alt, f.elem, count, f.depth});
    normalise(id, out, budget);
  }
}

bool GrammarMatcher::complete() const {
  return std::find(state_.begin(), state_.end(), kAccept) != state_.end();
}

bool GrammarMatcher::finished() const {
  return !state_.empty() &&
         std::all_of(state_.begin(), state_.end(), [](uint32_t s) { return s == kAccept; });
}

bool GrammarMatcher::accept_token(int32_t id) {
  if (id < 0 || id >= trie_.n_vocab()) return false;
  const std::string& bytes = trie_.bytes_[static_cast<size_t>(id)];
  return !bytes.empty() && accept_bytes(bytes);
}

bool GrammarMatcher::accept_bytes(std::string_view bytes) {
  const size_t mark = arena_.size();
  std::vector<uint32_t> cur = state_;
  for (char c : bytes) {
    advance(cur.data(), cur.size(), static_cast<uint8_t>(c), tmp_);
    if (tmp_.empty()) {
      arena_.resize(mark);
      return false;
    }
    cur.swap(tmp_);
  }
  state_ = std::move(cur);
  compact();
  return true;
}

// Copies the frames the committed stacks use into a fresh arena (each token adds frames; the
// ones of dead alternatives would otherwise pile up for the life of the request).
void GrammarMatcher::compact() {
  std::vector<Frame> fresh;
  std::vector<uint32_t> remap(arena_.size(), kNone);
  auto copy = [&](auto&& self, uint32_t id) -> uint32_t {
    if (id == kNone) return kNone;
    if (remap[id] != kNone) return remap[id];
    Frame f = arena_[id];
    f.parent = self(self, f.parent);
    fresh.push_back(f);
    return remap[id] = static_cast<uint32_t>(fresh.size() - 1);
  };
  for (uint32_t& s : state_)
    if (s != kAccept) s = copy(copy, s);
  arena_.swap(fresh);
}

// ---------------------------------------------------------------------------------------------
// GrammarMatcher: masks

void GrammarMatcher::accept_subtree(const TokenTrie::Node& n, uint32_t from, uint32_t* mask) const {
  for (uint32_t k = from; k < n.tok_hi; ++k) set_bit(mask, trie_.order_[k]);
}

void GrammarMatcher::fill_mask(std::span<uint32_t> mask) {
  KVLM_CHECK(mask.size() * 32 >= static_cast<size_t>(trie_.n_vocab()));
  std::fill(mask.begin(), mask.end(), 0u);
  if (complete())
    for (int32_t id : trie_.end_ids_)
      if (id >= 0 && id < trie_.n_vocab()) set_bit(mask.data(), id);
  buf_.assign(state_.begin(), state_.end());
  walk(0, 0, buf_.size(), mask.data());
}

// The children of trie node `node`, from the stacks buf_[lo, hi) (the state after its bytes).
void GrammarMatcher::walk(uint32_t node, size_t lo, size_t hi, uint32_t* mask) {
  const Grammar& g = *g_;
  const TokenTrie::Node& n = trie_.nodes_[node];
  for (uint32_t c = n.first_child; c < n.first_child + n.n_children; ++c) {
    const TokenTrie::Node& child = trie_.nodes_[c];
    const size_t mark = arena_.size();
    advance(buf_.data() + lo, hi - lo, child.byte, tmp_);
    if (!tmp_.empty()) {
      for (uint32_t k = child.tok_lo; k < child.tok_lo + child.n_end; ++k)
        set_bit(mask, trie_.order_[k]);
      if (child.n_children > 0) {
        const bool whole = std::any_of(tmp_.begin(), tmp_.end(), [&](uint32_t s) {
          if (s == kAccept) return false;
          const GrammarElem& e = g.elems[arena_[s].elem];
          return e.max == kRepUnbounded && g.sets[e.ref].contains_all(child.below);
        });
        if (whole) {
          accept_subtree(child, child.tok_lo + child.n_end, mask);
        } else {
          const size_t lo2 = buf_.size();
          buf_.insert(buf_.end(), tmp_.begin(), tmp_.end());
          walk(c, lo2, buf_.size(), mask);
          buf_.resize(lo2);
        }
      }
    }
    arena_.resize(mark);
  }
}

}  // namespace kvlm
