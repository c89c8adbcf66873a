// A vocabulary as the grammar's token trie (grammar/matcher.h): the bytes of every token a
// grammar could take, for constrained sampling in kvlm serve (Scheduler) and kvlm generate.
#pragma once

#include <memory>

#include "grammar/matcher.h"
#include "tokenizer/tokenizer.h"

namespace kvlm {

// Control and unused tokens are never text a grammar could take; end-of-generation tokens are
// allowed apart (once the grammar is complete).
std::unique_ptr<TokenTrie> vocab_token_trie(const Tokenizer& tok);

}  // namespace kvlm
