// A context-free grammar over bytes, as the constrained sampler walks it (matcher.h), and the
// builder the JSON-schema compiler (json_schema.h) writes it with.
//
// A grammar is a list of rules; a rule is a list of alternatives; an alternative is a sequence
// of elements. An element is either a reference to a rule or a byte class repeated min..max
// times (`[0-9]{1,16}`, `[^"\\]*`): the repetition is part of the element, so a string body or a
// run of digits is one matcher frame that counts, not a chain of rules. Loops over rules (an
// array's items) are written as right recursion, which the matcher runs in constant stack depth
// (a reference in the last position replaces its frame).
#pragma once

#include <array>
#include <cstdint>
#include <string_view>
#include <vector>

namespace kvlm {

// A set of byte values: bit b of w[b / 64].
struct ByteSet {
  std::array<uint64_t, 4> w{};
  bool has(uint8_t b) const { return (w[b >> 6] >> (b & 63)) & 1; }
  void add(uint8_t b) { w[b >> 6] |= uint64_t{1} << (b & 63); }
  void add_range(uint8_t lo, uint8_t hi) {
    for (int b = lo; b <= hi; ++b) add(static_cast<uint8_t>(b));
  }
  bool contains_all(const ByteSet& o) const {
    return (o.w[0] & ~w[0]) == 0 && (o.w[1] & ~w[1]) == 0 && (o.w[2] & ~w[2]) == 0 &&
           (o.w[3] & ~w[3]) == 0;
  }
  bool operator==(const ByteSet&) const = default;
};

inline constexpr uint16_t kRepUnbounded = 0xFFFF;  // GrammarElem::max: no upper bound

struct GrammarElem {
  bool is_rule = false;
  uint32_t ref = 0;  // rule index (is_rule) or index into Grammar::sets
  uint16_t min = 1;  // byte classes: repetitions, min <= max, max >= 1; rules: always 1, 1
  uint16_t max = 1;
};

struct Grammar {
  std::vector<ByteSet> sets;
  std::vector<GrammarElem> elems;   // every alternative's elements, back to back
  std::vector<uint32_t> alt_begin;  // [n_alts + 1]: alternative a is elems[alt_begin[a], alt_begin[a + 1])
  std::vector<uint32_t> rule_alt;   // [n_rules + 1]: rule r is alternatives [rule_alt[r], rule_alt[r + 1])
  uint32_t root = 0;

  uint32_t n_rules() const { return static_cast<uint32_t>(rule_alt.size()) - 1; }
};

// Grammar sizes beyond which a grammar is refused (it comes from client input).
inline constexpr size_t kMaxGrammarRules = 200000;
inline constexpr size_t kMaxGrammarElems = 1000000;

class GrammarBuilder {
 public:
  using Alt = std::vector<GrammarElem>;

  uint32_t new_rule();  // an id to reference now and define() later
  // Throws kvlm::Error when the grammar grows past kMaxGrammarRules / kMaxGrammarElems.
  void define(uint32_t rule, std::vector<Alt> alts);
  GrammarElem bytes(const ByteSet& s, uint16_t min = 1, uint16_t max = 1);
  GrammarElem byte(char c);
  static GrammarElem ref(uint32_t rule) { return {true, rule, 1, 1}; }
  // Appends one single-byte element per byte of text.
  void append_literal(Alt& alt, std::string_view text);
  // Every rule must have been defined (a compiler bug otherwise: KVLM_CHECK).
  Grammar finish(uint32_t root);

 private:
  std::vector<ByteSet> sets_;
  std::vector<std::vector<Alt>> rules_;
  std::vector<bool> defined_;
  size_t n_elems_ = 0;
};

}  // namespace kvlm
