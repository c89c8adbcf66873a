#include "engine/vocab_trie.h"

#include <string>
#include <vector>

namespace kvlm {

std::unique_ptr<TokenTrie> vocab_token_trie(const Tokenizer& tok) {
  std::vector<std::string> bytes(static_cast<size_t>(tok.n_vocab()));
  std::vector<int32_t> ends;
  for (int32_t id = 0; id < tok.n_vocab(); ++id) {
    const TokenType t = tok.token_type(id);
    if (tok.is_eog(id)) {
      ends.push_back(id);  // never text, even where the vocabulary types it so
      continue;
    }
    if (t == TokenType::Normal || t == TokenType::Byte || t == TokenType::UserDefined)
      bytes[static_cast<size_t>(id)] = tok.token_bytes(id, false);
  }
  return std::make_unique<TokenTrie>(bytes, std::move(ends));
}

}  // namespace kvlm
