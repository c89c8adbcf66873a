// Pre-tokenizers: split text into the words BPE merges within, as llama.cpp's regex lists do.
//
// llama.cpp applies a list of regexes in sequence; each one re-splits every piece the previous
// one produced, and the text between matches becomes pieces of its own. Lookaheads therefore
// never see past the end of the current piece. These hand-written splitters reproduce that, for
// the regex lists below (quoted from llama.cpp's llama-vocab.cpp; "C" stands for contractions,
// (?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])):
//
// clang-format off
//   Gpt2:    's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
//   Smollm:  \p{N}   then the Gpt2 regex
//   Default: [\p{P}\$\+<=>\^~\|]+   then Gpt2, then \p{N}+, then [0-9][0-9][0-9]
//   Falcon:  [\p{P}\$\+<=>\^~\|`]+  then Gpt2, then [0-9][0-9][0-9]
//   Llama3:  C|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//            \s*[\r\n]+|\s+(?!\S)|\s+
//   Qwen2:   the Llama3 regex with \p{N} for \p{N}{1,3}
//   Qwen35:  the Qwen2 regex with marks (\p{M}) counted as letters in both letter classes
//   SeedCoder: the Qwen2 regex without [\r\n]* after punctuation
//   Ufakzeka:  the Qwen2 regex without C
//   Jais2:   the Llama3 regex with \s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|...|\s{4}(?!\S)|
//            \s{1,2}(?!\S)|\s{1} as its whitespace
//   Minicpm5: \p{N}{1,3}   then the Llama3 regex with \p{N}+
//   Laguna:  [^\n]+|[\n]+   then the Qwen2 regex
//   ExaoneMoe: C|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|
//            \p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+
//   KimiK2:  \p{Han}+|[^\r\n\p{L}\p{N}]?[letters but Han]+C?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//            \s*[\r\n]+|\s+(?!\S)|\s+   (llama.cpp's own handler for Kimi K2's regex)
//   Gpt4o:   P?U*L+C?|P?U+L*C?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
//            with P = [^\r\n\p{L}\p{N}], U = (?=[\p{L}])[^a-z], L = (?=[\p{L}])[^A-Z]
//   Tekken:  the Gpt4o regex without C and with \p{N}
//   GraniteEmbMulti: the Gpt4o regex with [\p{L}\p{M}] in the lookaheads
//   TinyAya: \d{1,3}(?=(?:\d{3})*\b)   then the Gpt4o regex with U and L both [\p{L}\p{M}]
//   Youtu:   [Hangul]+|[CJK punctuation]+|[Bopomofo]+|[一-龥぀-ゟ゠-ヿ]+   then the TinyAya
//            regex with \p{N}
//   DeepseekV3: \p{N}{1,3}   then [一-龥぀-ゟ゠-ヿ]+   then
//            [ASCII punct][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|
//            \s*[\r\n]+|\s+(?!\S)|\s+
//   Spark25: DeepseekV3 with [\r\n] for \s*[\r\n]+, no [\r\n]* after punctuation, then \p{N}
//   Afmoe:   llama.cpp's digit groups (as TinyAya's)   then [CJK, kana, Thai, Lao, Khmer,
//            Myanmar, Hangul...]+   then DeepseekV3's last regex
//   Bloom:    ?[^(\s|.,!?…。，、।۔،)]+
//   Viking:  the Bloom regex   then \p{N}
//   Chameleon: <sentinel:[0-9]+>   then (IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z   then
//            ([\t\n]|    |  )   then \p{N}   then [\p{P}!-/:-@\[-`{-~]   then Gpt2
//   SuperBpe: \p{N}+   then (?=(\d{3})+(?!\d))
//   DeepseekLlm:   [\r\n]   then \s?[Latin, Greek, Cyrillic... letters]+   then
//                  \s?[!-/:-~！-／：-～‘-‟　-。]+   then \s+$   then [一-龥ࠀ-一가-퟿]+   then
//                  \p{N}+
//   DeepseekCoder: [\r\n]   then \s?\p{L}+   then \s?\p{P}+   then [一-龥ࠀ-一가-퟿]+   then \p{N}
//   Newlines (Gemma 4), Sarvam:  [^\n]+|[\n]+
// clang-format on
//
// Where llama.cpp has no handler of its own for a regex, it runs std::regex on text in which
// every non-ASCII codepoint is replaced by one byte standing for its category (letter, number,
// punctuation, mark, symbol, other; whitespace becomes U+000B). Such regexes therefore see case
// (\p{Lu}, [^a-z]) in ASCII only, and the splitters here do the same. The regexes without
// \p{..} classes run on std::wregex, where non-ASCII whitespace is first replaced by U+000B; so
// U+3000 (a space) is not in DeepseekLlm's punctuation range.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvlm::tok {

enum class PreKind {
  Gpt2,
  Smollm,
  Default,
  Falcon,
  Llama3,
  Qwen2,
  Qwen35,
  DeepseekLlm,
  DeepseekCoder,
  Newlines,
  Gpt4o,
  Tekken,
  GraniteEmbMulti,
  TinyAya,
  Youtu,
  DeepseekV3,
  Spark25,
  Afmoe,
  KimiK2,
  SeedCoder,
  Ufakzeka,
  Minicpm5,
  Laguna,
  Jais2,
  ExaoneMoe,
  Bloom,
  Viking,
  Chameleon,
  SuperBpe,
  // Last (fuzz/fuzz_tokenize.cpp counts the kinds by it). Splits as Newlines; the tokenizer
  // gives it none of Gemma 4's fixes.
  Sarvam,
};

// Splits `n` codepoints (with their cpt_flags) into words; appends each word's length in
// codepoints to `word_lens`, which then sum to n. `scratch` is reused between calls.
void pretokenize(PreKind kind, const uint32_t* cpts, const uint8_t* flags, size_t n,
                 std::vector<uint32_t>* word_lens, std::vector<uint32_t>* scratch);

}  // namespace kvlm::tok
