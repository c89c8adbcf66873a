// Constrained sampling: which tokens may come next under a grammar (grammar.h).
//
// GrammarMatcher runs the grammar as a pushdown automaton over bytes. Its state is a set of
// stacks (more than one while alternatives share a prefix: anyOf, an optional property); a
// stack is a chain of frames (alternative, element, repetitions so far) in an arena, shared
// between stacks by their parents, and normalised so that every top frame sits on a byte class
// that can still take a byte. A byte advances every stack whose top class holds it.
//
// The per-step token mask walks the vocabulary's byte trie (TokenTrie) together with the
// grammar: a trie edge advances the state by its byte, a subtree whose state died is skipped,
// so tokens sharing a prefix test it once. A subtree whose bytes all lie in the class of an
// unbounded repetition on top of a live stack (a string's body) is accepted whole without
// walking it: inside a JSON string only the paths to tokens holding a quote, a backslash or a
// control byte are walked.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "grammar/grammar.h"

namespace kvlm {

// The vocabulary as bytes, for masks: built once per model.
class TokenTrie {
 public:
  // token_bytes[id]: the bytes token id stands for; empty for tokens the grammar never allows
  // (control tokens). end_ids: the end-of-generation tokens, allowed once the grammar is complete.
  TokenTrie(const std::vector<std::string>& token_bytes, std::vector<int32_t> end_ids);
  // The 256 single bytes as tokens 0..255 and no end token: a matcher over it checks any text
  // (GrammarMatcher::accept_bytes) without a model's vocabulary.
  static const TokenTrie& single_bytes();

  int32_t n_vocab() const { return n_vocab_; }
  size_t n_nodes() const { return nodes_.size(); }

 private:
  friend class GrammarMatcher;
  struct Node {
    uint32_t first_child = 0;  // children are nodes_[first_child, first_child + n_children)
    uint32_t n_children = 0;
    uint32_t tok_lo = 0;       // the subtree's tokens are order_[tok_lo, tok_hi) ...
    uint32_t tok_hi = 0;
    uint32_t n_end = 0;        // ... the first n_end of which end at this node
    uint8_t byte = 0;          // the edge from the parent
    ByteSet below;             // every byte on an edge below this node
  };
  void build(uint32_t node, uint32_t lo, uint32_t hi, size_t depth);

  int32_t n_vocab_ = 0;
  std::vector<std::string> bytes_;  // [n_vocab] (kept for building only while building)
  std::vector<int32_t> order_;      // token ids sorted by their bytes (text tokens only)
  std::vector<Node> nodes_;         // [0] is the root; depth-first order
  std::vector<int32_t> end_ids_;
};

class GrammarMatcher {
 public:
  // The grammar and trie must outlive the matcher.
  GrammarMatcher(std::shared_ptr<const Grammar> grammar, const TokenTrie& trie);

  // Bit id of mask ([ceil(n_vocab / 32)] words) is set when token id may come next: its bytes
  // take the state somewhere live, or it ends generation and the grammar is complete.
  void fill_mask(std::span<uint32_t> mask);
  // Advances by a token's bytes; false (state unchanged) when the grammar does not take them.
  // End-of-generation tokens are not passed here.
  bool accept_token(int32_t id);
  bool accept_bytes(std::string_view bytes);
  // The bytes so far form a whole sentence of the grammar (end of generation may follow).
  bool complete() const;
  // Complete, and no byte can follow: generation is over.
  bool finished() const;

 private:
  static constexpr uint32_t kNone = 0xFFFFFFFFu;    // no parent
  static constexpr uint32_t kAccept = 0xFFFFFFFEu;  // a stack that is empty: the sentence is whole
  struct Frame {
    uint32_t parent;  // arena index or kNone
    uint32_t alt;     // alternative
    uint32_t elem;    // index into Grammar::elems (== the alternative's end: finished)
    uint16_t count;   // repetitions of elem so far (capped at elem.min for unbounded ones)
    uint16_t depth;   // frames below this one
  };

  uint32_t push(const Frame& f);
  // Adds to out (deduplicated) every top frame reachable from frame id without a byte.
  void normalise(uint32_t id, std::vector<uint32_t>& out, int& budget);
  void add_top(uint32_t id, std::vector<uint32_t>& out) const;
  bool same_stack(uint32_t a, uint32_t b) const;
  // out: the stacks after byte b from stacks in[0, n).
  void advance(const uint32_t* in, size_t n, uint8_t b, std::vector<uint32_t>& out);
  void walk(uint32_t node, size_t lo, size_t hi, uint32_t* mask);
  void accept_subtree(const TokenTrie::Node& n, uint32_t from, uint32_t* mask) const;
  void compact();

  std::shared_ptr<const Grammar> g_;
  const TokenTrie& trie_;
  std::vector<Frame> arena_;
  std::vector<uint32_t> state_;  // top frames (or kAccept) of the committed stacks
  std::vector<uint32_t> buf_;    // the trie walk's states, a segment per depth
  std::vector<uint32_t> tmp_;
};

// Stacks a state may hold: past it further alternatives are dropped, which narrows what the
// grammar takes but never widens it (the JSON compiler keeps states far smaller: an enum is a
// trie, anyOf and properties are bounded).
inline constexpr size_t kMaxStacks = 1024;

// Frames a stack may hold: a deeper nesting dies (inputs nest at most ~kMaxStackDepth / 3 levels).
inline constexpr uint16_t kMaxStackDepth = 192;

}  // namespace kvlm
