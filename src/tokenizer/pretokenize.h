// Pre-tokenizers: split text into the words BPE merges within, as llama.cpp's regex lists do.
//
// llama.cpp applies a list of regexes in sequence; each one re-splits every piece the previous
// one produced, and the text between matches becomes pieces of its own. Lookaheads therefore
// never see past the end of the current piece. These hand-written splitters reproduce that, for
// the regex lists below (the regexes are quoted from llama.cpp's llama-vocab.cpp):
//
//   Gpt2:    's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
//   Smollm:  \p{N}   then the Gpt2 regex
//   Default: [\p{P}\$\+<=>\^~\|]+   then Gpt2, then \p{N}+, then [0-9][0-9][0-9]
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvlm::tok {

enum class PreKind { Gpt2, Smollm, Default };

// Splits `n` codepoints (with their cpt_flags) into words; appends each word's length in
// codepoints to `word_lens`, which then sum to n. `scratch` is reused between calls.
void pretokenize(PreKind kind, const uint32_t* cpts, const uint8_t* flags, size_t n,
                 std::vector<uint32_t>* word_lens, std::vector<uint32_t>* scratch);

}  // namespace kvlm::tok
