// Tokenizers built from GGUF metadata (tokenizer.ggml.*) as llama.cpp builds them: byte-level BPE
// ("gpt2", with llama.cpp's pre-tokenizers for GPT-2, SmolLM/StarCoder, Llama 3, Qwen 2/3.5,
// DeepSeek LLM/Coder/V3, Falcon, GPT-4o/Llama 4, Tekken, Kimi K2, Bloom, Chameleon, SuperBPE and
// the default list, see pretokenize.h), Gemma 4's BPE on UTF-8 ("gemma4") and SentencePiece
// ("llama": Llama 2, Mistral, Phi-3, Gemma 1-3); special/control tokens; UTF-8-safe incremental
// decoding. Chat templates are rendered by src/template (chat_template.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace kvlm {

class GgufFile;

// tokenizer.ggml.token_type values.
enum class TokenType : int32_t {
  Undefined = 0,
  Normal = 1,
  Unknown = 2,
  Control = 3,
  UserDefined = 4,
  Unused = 5,
  Byte = 6,
};

class Tokenizer {
 public:
  // Throws kvlm::Error naming the key for missing/unsupported metadata (tokenizer.ggml.model other
  // than "gpt2", "gemma4" or "llama", an unknown tokenizer.ggml.pre, malformed merges, ids out of
  // range).
  static std::unique_ptr<Tokenizer> from_gguf(const GgufFile& file);
  ~Tokenizer();

  int32_t n_vocab() const;
  // -1 when absent; SentencePiece defaults to 1 (and EOS to 2) as in llama.cpp, BPE has none
  // (llama.cpp would fall back to id 11 for "gpt2").
  int32_t bos_id() const;
  int32_t eos_id() const;        // -1 when absent
  bool add_bos_default() const;  // tokenizer.ggml.add_bos_token (llama.cpp's default when absent)
  // End of generation, as llama.cpp's llama_vocab_is_eog: EOS, EOT, tokens that end a turn by
  // their text ("<|im_end|>", "<|endoftext|>", ...) and the fill-in-the-middle repo/file/pad
  // tokens (SmolLM2's "<reponame>"). False for ids outside the vocabulary.
  bool is_eog(int32_t id) const;
  TokenType token_type(int32_t id) const;
  const std::string& token_text(int32_t id) const;  // as stored in the vocabulary
  const std::string& chat_template() const;         // tokenizer.chat_template, may be empty
  const std::string& pre() const;                   // pre-tokenizer name, "default" when absent

  // Text -> ids, exactly as llama.cpp's llama_tokenize(text, add_special=add_bos,
  // parse_special): with parse_special, control token texts in `text` become their single ids
  // (user-defined ones always do). add_bos adds BOS (and EOS) only where the vocabulary asks for
  // it (tokenizer.ggml.add_bos_token / add_eos_token, or llama.cpp's default for the tokenizer:
  // yes for SentencePiece, Llama 3 and Gemma 4), as llama.cpp's add_special does; SmolLM2 asks for
  // neither. Invalid UTF-8 in `text` is tokenized as U+FFFD by BPE; SentencePiece falls back to
  // the bytes' <0xXX> tokens.
  std::vector<int32_t> encode(std::string_view text, bool add_bos, bool parse_special) const;
  // Bytes of one token (byte-level BPE mapping undone). Control tokens give their text when
  // render_special is true and nothing otherwise.
  // Throws kvlm::Error for ids outside the vocabulary (as do token_type, token_text and decode).
  std::string token_bytes(int32_t id, bool render_special = true) const;
  // The text of `ids` as llama.cpp's llama_detokenize (remove_special=false): the token bytes
  // joined, less the space a SentencePiece prefix put before the first piece, with llama.cpp's
  // space clean-up for the BPE vocabularies that ask for it (" ," -> ","). Streaming output uses
  // token_bytes / StreamDecoder, which never strip anything, as llama.cpp's generation does.
  std::string decode(const std::vector<int32_t>& ids, bool render_special = true) const;

 private:
  Tokenizer();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Turns a stream of token ids into text that never ends in half a UTF-8 character: bytes of an
// incomplete character are held back until the token completing it arrives (or flush()).
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool render_special = false)
      : tok_(tok), render_special_(render_special) {}
  // Output is always valid UTF-8: invalid byte sequences become U+FFFD as soon as they are known
  // to be invalid.
  std::string push(int32_t id);
  // Remaining held bytes (invalid sequences become U+FFFD).
  std::string flush();

 private:
  const Tokenizer& tok_;
  bool render_special_;
  std::string pending_;
};

}  // namespace kvlm
