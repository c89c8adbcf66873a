#include "grammar/grammar.h"

#include <algorithm>

#include "base/error.h"

namespace kvlm {

uint32_t GrammarBuilder::new_rule() {
  if (rules_.size() >= kMaxGrammarRules)
    fail("the JSON schema is too large: its grammar needs more than {} rules", kMaxGrammarRules);
  rules_.emplace_back();
  defined_.push_back(false);
  return static_cast<uint32_t>(rules_.size() - 1);
}

void GrammarBuilder::define(uint32_t rule, std::vector<Alt> alts) {
  KVLM_CHECK(rule < rules_.size() && !defined_[rule]);
  for (const Alt& a : alts) n_elems_ += a.size();
  if (n_elems_ > kMaxGrammarElems)
    fail("the JSON schema is too large: its grammar needs more than {} elements",
         kMaxGrammarElems);
  rules_[rule] = std::move(alts);
  defined_[rule] = true;
}

GrammarElem GrammarBuilder::bytes(const ByteSet& s, uint16_t min, uint16_t max) {
  KVLM_CHECK(min <= max && max >= 1);
  auto it = std::find(sets_.begin(), sets_.end(), s);
  const auto id = static_cast<uint32_t>(it - sets_.begin());
  if (it == sets_.end()) sets_.push_back(s);
  return {false, id, min, max};
}

GrammarElem GrammarBuilder::byte(char c) {
  ByteSet s;
  s.add(static_cast<uint8_t>(c));
  return bytes(s);
}

void GrammarBuilder::append_literal(Alt& alt, std::string_view text) {
  for (char c : text) alt.push_back(byte(c));
}

Grammar GrammarBuilder::finish(uint32_t root) {
  KVLM_CHECK(root < rules_.size());
  Grammar g;
  g.sets = sets_;
  g.root = root;
  g.rule_alt.push_back(0);
  g.alt_begin.push_back(0);
  for (size_t r = 0; r < rules_.size(); ++r) {
    KVLM_CHECK(defined_[r]);
    for (const Alt& a : rules_[r]) {
      g.elems.insert(g.elems.end(), a.begin(), a.end());
      g.alt_begin.push_back(static_cast<uint32_t>(g.elems.size()));
    }
    g.rule_alt.push_back(static_cast<uint32_t>(g.alt_begin.size() - 1));
  }
  return g;
}

}  // namespace kvlm
