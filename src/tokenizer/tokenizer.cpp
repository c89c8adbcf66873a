// The tokenizer models of llama.cpp (llama-vocab.cpp) that kvlm implements:
//
//   BPE ("gpt2"): text -> special-token partition -> pre-tokenizer words -> bytes mapped to
//        printable chars -> merges by rank within each word -> token ids
//   BPE on raw UTF-8 ("gemma4"): spaces become U+2581, words are runs of newlines and of other
//        text, merges start from characters, bytes without a token become <0xXX> tokens
//   SentencePiece ("llama"): a space prefix, spaces become U+2581, adjacent pieces merge while
//        their concatenation is a token, highest score first; leftover bytes become <0xXX>
//
// Loading also reproduces llama.cpp's adjustments to the vocabulary that change tokenization:
// end-of-generation and fill-in-the-middle tokens recognised by their text are forced to CONTROL
// (so that they are parsed as special tokens), and empty token texts become "[EMPTY_<id>]".

#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <functional>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "base/error.h"
#include "gguf/gguf.h"
#include "tokenizer/pretokenize.h"
#include "tokenizer/unicode.h"

namespace kvlm {

namespace {

constexpr std::string_view kKeyModel = "tokenizer.ggml.model";
constexpr std::string_view kKeyPre = "tokenizer.ggml.pre";
constexpr std::string_view kKeyTokens = "tokenizer.ggml.tokens";
constexpr std::string_view kKeyTypes = "tokenizer.ggml.token_type";
constexpr std::string_view kKeyMerges = "tokenizer.ggml.merges";
constexpr std::string_view kKeyScores = "tokenizer.ggml.scores";

// Pre-tokenizer names llama.cpp maps to each regex list (see pretokenize.h), with the options it
// sets alongside: ignore_merges (a word that is a whole token skips merging), clean_spaces (decode
// removes spaces before punctuation and some contractions) and add_bos (the default when the file
// has no tokenizer.ggml.add_bos_token). "gpt2" is not a name llama.cpp knows (its converter writes
// "gpt-2"); kvlm accepts it as the same thing.
struct PreName {
  std::string_view name;
  tok::PreKind kind;
  bool ignore_merges = false;
  bool clean_spaces = true;
  bool add_bos = false;
};
constexpr bool kNoClean = false;
// Every name llama.cpp 0.3.36 knows but "whitespace" (\S+ on raw UTF-8, for
// jina-embeddings-v2-base-zh): llama.cpp aborts on it (find_bpe_rank's assert) for any text with
// a space next to other whitespace, so there is no reference to match.
constexpr PreName kPreNames[] = {
    {"default", tok::PreKind::Default},
    {"gpt2", tok::PreKind::Gpt2},
    {"gpt-2", tok::PreKind::Gpt2},
    {"phi-2", tok::PreKind::Gpt2},
    {"mpt", tok::PreKind::Gpt2},
    {"olmo", tok::PreKind::Gpt2},
    {"jais", tok::PreKind::Gpt2},
    {"jina-es", tok::PreKind::Gpt2},
    {"jina-de", tok::PreKind::Gpt2},
    {"jina-v2-es", tok::PreKind::Gpt2},
    {"jina-v2-de", tok::PreKind::Gpt2},
    {"gigachat", tok::PreKind::Gpt2},
    {"a.x-4.0", tok::PreKind::Gpt2},
    {"mellum", tok::PreKind::Gpt2},
    {"modern-bert", tok::PreKind::Gpt2},
    {"exaone4", tok::PreKind::Gpt2},
    {"trillion", tok::PreKind::Gpt2, false, kNoClean},
    {"granite-docling", tok::PreKind::Gpt2, false, kNoClean},
    {"jina-v1-en", tok::PreKind::Gpt2},
    {"jina-v2-code", tok::PreKind::Gpt2},
    {"roberta-bpe", tok::PreKind::Gpt2},
    {"smollm", tok::PreKind::Smollm, false, kNoClean},
    {"starcoder", tok::PreKind::Smollm},
    {"refact", tok::PreKind::Smollm},
    {"codeshell", tok::PreKind::Smollm},
    {"command-r", tok::PreKind::Smollm, false, kNoClean},
    {"exaone", tok::PreKind::Smollm},
    {"minerva-7b", tok::PreKind::Smollm},
    {"mellum2", tok::PreKind::Smollm},
    {"falcon", tok::PreKind::Falcon},
    {"llama3", tok::PreKind::Llama3, true, true, true},
    {"llama-v3", tok::PreKind::Llama3, true, true, true},
    {"llama-bpe", tok::PreKind::Llama3, true, true, true},
    {"falcon3", tok::PreKind::Llama3, true, true, true},
    {"falcon-h1", tok::PreKind::Llama3, true, true, true},
    {"pixtral", tok::PreKind::Llama3, true, true, true},
    {"midm-2.0", tok::PreKind::Llama3, true, true, true},
    {"lfm2", tok::PreKind::Llama3, true, true, true},
    {"jina-v5-nano", tok::PreKind::Llama3, true, true, true},
    {"dbrx", tok::PreKind::Llama3},
    {"smaug-bpe", tok::PreKind::Llama3},
    {"chatglm-bpe", tok::PreKind::Llama3},
    {"glm4", tok::PreKind::Llama3, true},
    {"glm5", tok::PreKind::Llama3, true},
    {"qwen2", tok::PreKind::Qwen2, false, kNoClean},
    {"deepseek-r1-qwen", tok::PreKind::Qwen2, false, kNoClean},
    {"kormo", tok::PreKind::Qwen2, false, kNoClean},
    {"f2llmv2", tok::PreKind::Qwen2, false, kNoClean},
    {"hunyuan", tok::PreKind::Qwen2, false, kNoClean},
    {"grok-2", tok::PreKind::Qwen2, false, kNoClean},
    {"solar-open", tok::PreKind::Qwen2, false, kNoClean},
    {"stablelm2", tok::PreKind::Qwen2},
    {"megrez", tok::PreKind::Qwen2},
    {"qwen35", tok::PreKind::Qwen35, false, kNoClean},
    {"deepseek-llm", tok::PreKind::DeepseekLlm, false, kNoClean},
    {"deepseek-coder", tok::PreKind::DeepseekCoder, false, kNoClean},
    {"bailingmoe", tok::PreKind::Qwen2, false, kNoClean},
    {"bailingmoe2", tok::PreKind::Qwen2, false, kNoClean},
    {"llada-moe", tok::PreKind::Qwen2, false, kNoClean},
    {"gpt-4o", tok::PreKind::Gpt4o, false, kNoClean},
    {"llama4", tok::PreKind::Gpt4o, false, kNoClean},
    {"kanana2", tok::PreKind::Gpt4o, false, kNoClean},
    {"talkie", tok::PreKind::Gpt4o, false, kNoClean},
    {"minimax-m2", tok::PreKind::Gpt4o, false, kNoClean},
    {"tekken", tok::PreKind::Tekken, true, kNoClean, true},
    {"granite-embed-multi-97m", tok::PreKind::GraniteEmbMulti, true, kNoClean},
    {"tiny_aya", tok::PreKind::TinyAya, false, kNoClean},
    {"cohere2moe", tok::PreKind::TinyAya, false, kNoClean},
    {"youtu", tok::PreKind::Youtu, true, kNoClean},
    {"deepseek-v3", tok::PreKind::DeepseekV3, false, kNoClean},
    {"hunyuan-dense", tok::PreKind::DeepseekV3, false, kNoClean},
    {"hy_v4", tok::PreKind::DeepseekV3, false, kNoClean},
    {"joyai-llm", tok::PreKind::DeepseekV3, false, kNoClean},
    {"spark2_5", tok::PreKind::Spark25, false, kNoClean},
    {"afmoe", tok::PreKind::Afmoe, false, kNoClean},
    {"kimi-k2", tok::PreKind::KimiK2, false, kNoClean},
    {"seed-coder", tok::PreKind::SeedCoder, false, kNoClean},
    {"ufakzeka", tok::PreKind::Ufakzeka, false, kNoClean},
    {"minicpm5", tok::PreKind::Minicpm5, true},
    {"laguna", tok::PreKind::Laguna, false, kNoClean},
    {"jais-2", tok::PreKind::Jais2},
    {"exaone-moe", tok::PreKind::ExaoneMoe},
    {"bloom", tok::PreKind::Bloom},
    {"gpt3-finnish", tok::PreKind::Bloom},
    {"poro-chat", tok::PreKind::Bloom, false, kNoClean},
    {"viking", tok::PreKind::Viking, false, kNoClean},
    {"chameleon", tok::PreKind::Chameleon, false, kNoClean, true},
    {"superbpe", tok::PreKind::SuperBpe, false, kNoClean},
    {"gemma4", tok::PreKind::Newlines},
    {"granite-embed-multi-311m", tok::PreKind::Newlines},
    {"sarvam-moe", tok::PreKind::Sarvam, false, kNoClean},
};

// Token texts llama.cpp treats as end of generation (llama_vocab::impl::load).
constexpr std::string_view kEogTexts[] = {
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<\xef\xbd\x9c"
    "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>",
    "[e~[",
};
// End-of-turn texts, which llama.cpp also forces to CONTROL when no EOT id is given.
constexpr std::string_view kEotTexts[] = {
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<\xef\xbd\x9c"
    "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>",
    "<end_of_utterance>",
};
// Fill-in-the-middle texts. llama.cpp forces all of them to CONTROL; the repo, file-separator and
// pad tokens also end generation (each starts a new file in code-completion prompts).
struct FimKind {
  std::string_view key;  // id key, consulted first
  bool eog;
  std::vector<std::string_view> texts;
};
const std::array<FimKind, 6>& fim_kinds() {
  static const std::array<FimKind, 6> kinds = {{
      {"tokenizer.ggml.fim_pre_token_id",
       false,
       {"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>",
        "<\xef\xbd\x9c"
        "fim\xe2\x96\x81"
        "begin\xef\xbd\x9c>",
        "<PRE>", "\xe2\x96\x81<PRE>", "<|code_prefix|>", "<|prefix|>"}},
      {"tokenizer.ggml.fim_suf_token_id",
       false,
       {"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
        "<\xef\xbd\x9c"
        "fim\xe2\x96\x81hole\xef\xbd\x9c>",
        "<SUF>", "\xe2\x96\x81<SUF>", "<|code_suffix|>", "<|suffix|>"}},
      {"tokenizer.ggml.fim_mid_token_id",
       false,
       {"<|fim_middle|>", "<fim-middle>", "<fim_middle>",
        "<\xef\xbd\x9c"
        "fim\xe2\x96\x81"
        "end\xef\xbd\x9c>",
        "<MID>", "\xe2\x96\x81<MID>", "<|code_middle|>", "<|middle|>"}},
      {"tokenizer.ggml.fim_pad_token_id",
       true,
       {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"}},
      {"tokenizer.ggml.fim_rep_token_id",
       true,
       {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"}},
      {"tokenizer.ggml.fim_sep_token_id", true, {"<|file_sep|>"}},
  }};
  return kinds;
}

template <size_t N>
bool one_of(std::string_view s, const std::string_view (&list)[N]) {
  return std::find(std::begin(list), std::end(list), s) != std::end(list);
}

// Hashing for maps keyed by text that are looked up with string_views (no allocation per lookup).
struct TextHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using TextMap = std::unordered_map<std::string, int32_t, TextHash, std::equal_to<>>;

// One merge rule: the pair (left, right) of symbols becomes `result` with priority `rank`
// (lower first).
struct Merge {
  int32_t rank;
  int32_t result;
};
inline uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// A symbol of the word being merged: a run of the word's bytes, linked to its neighbours.
struct Symbol {
  int32_t id;      // interned symbol, -1 when the text is in neither vocabulary nor merges
  int32_t prev;    // index of the previous live symbol, -1 at the start
  int32_t next;    // index of the next live symbol, -1 at the end
  uint32_t begin;  // byte offset in the word
  uint32_t len;    // bytes; 0 once merged into its left neighbour
};

// A candidate BPE merge of two adjacent symbols. Entries go stale when either side changes; they
// are checked when popped rather than removed from the heap.
struct Candidate {
  int32_t rank;
  int32_t left, right;        // symbol indices
  int32_t left_id, right_id;  // symbol ids when queued
  int32_t result;
};
// Max-heap order that pops the lowest rank first, then the leftmost pair (llama.cpp's order).
struct CandidateAfter {
  bool operator()(const Candidate& a, const Candidate& b) const {
    return a.rank > b.rank || (a.rank == b.rank && a.left > b.left);
  }
};

// A candidate SentencePiece merge: the two symbols' concatenation is a token with this score.
// Stale once either side has changed length (lengths only grow, so the sum identifies the pair).
struct SpmCandidate {
  float score;
  int32_t left, right;  // symbol indices
  uint32_t len;         // bytes of the concatenation when queued
};
// Pops the highest score first, then the leftmost pair (llama.cpp's order).
struct SpmCandidateAfter {
  bool operator()(const SpmCandidate& a, const SpmCandidate& b) const {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  }
};

// Per-call buffers, reused across the words of one encode() call.
struct Scratch {
  std::vector<uint32_t> cpts;
  std::vector<uint8_t> flags;
  std::vector<uint32_t> word_lens;
  std::vector<uint32_t> split_scratch;
  std::string word;
  std::string mapped;  // the fragment with spaces escaped
  std::string lookup;  // a word in the vocabulary's spelling
  std::vector<Symbol> symbols;
  std::vector<Candidate> heap;
  std::vector<SpmCandidate> spm_heap;
};

// Bytes of the UTF-8 character a lead byte starts, as llama.cpp counts them (by the high nibble,
// without validation; a stray continuation byte counts as one).
size_t utf8_len(uint8_t lead) {
  static constexpr uint8_t kLen[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return kLen[lead >> 4];
}

// Appends one symbol per UTF-8 character of `text` (llama.cpp's character split), with the id
// id_of(character), each linked to its neighbours.
template <class IdOf>
void push_char_symbols(std::string_view text, std::vector<Symbol>* sym, IdOf id_of) {
  const auto n = static_cast<uint32_t>(text.size());
  for (uint32_t i = 0; i < n;) {
    const auto len =
        std::min<uint32_t>(static_cast<uint32_t>(utf8_len(static_cast<uint8_t>(text[i]))), n - i);
    const auto k = static_cast<int32_t>(sym->size());
    sym->push_back(Symbol{id_of(text.substr(i, len)), k - 1, k + 1, i, len});
    i += len;
  }
  if (!sym->empty()) sym->back().next = -1;
}

// Symbol `left` takes over the next live symbol's bytes; that one leaves the chain.
void absorb_next(std::vector<Symbol>& sym, int32_t left) {
  Symbol& l = sym[left];
  Symbol& r = sym[l.next];
  l.len += r.len;
  r.len = 0;
  l.next = r.next;
  if (r.next >= 0) sym[r.next].prev = left;
}

constexpr std::string_view kSpaceMark = "\xe2\x96\x81";  // U+2581, SentencePiece's space

// Replaces every ' ' with U+2581 (appends to `out`).
void escape_spaces_into(std::string_view text, std::string* out) {
  for (char c : text) {
    if (c == ' ')
      out->append(kSpaceMark);
    else
      out->push_back(c);
  }
}

// Bytes after which text must not be cut before a space mark (see for_each_space_word): for each
// U+2581 in `piece` past its start and not inside a run of them, the byte before it.
using CutBlockers = std::array<bool, 256>;
void add_cut_blockers(std::string_view piece, CutBlockers* blockers) {
  for (size_t at = piece.find(kSpaceMark, 1); at != std::string_view::npos;
       at = piece.find(kSpaceMark, at + 1)) {
    if (at < kSpaceMark.size() ||
        piece.compare(at - kSpaceMark.size(), kSpaceMark.size(), kSpaceMark) != 0)
      (*blockers)[static_cast<uint8_t>(piece[at - 1])] = true;
  }
}

// Calls f(segment) for the pieces of `text` cut before the U+2581 that starts a word (runs of
// them stay together). A merge never crosses such a cut unless some token or merge result has a
// space mark after the byte before it (`blockers`), so merging the pieces one by one gives what
// merging the whole text gives, with small heaps instead of one the size of the text. Cuts fall
// only between the characters merging starts from, which invalid UTF-8 can shift: a lead byte
// takes the next bytes whatever they are.
template <class F>
void for_each_space_word(std::string_view text, const CutBlockers& blockers, F f) {
  auto mark_at = [&](size_t i) { return text.compare(i, kSpaceMark.size(), kSpaceMark) == 0; };
  size_t begin = 0;
  for (size_t i = 0; i < text.size();) {
    if (i > begin && mark_at(i) && !(i >= kSpaceMark.size() && mark_at(i - kSpaceMark.size())) &&
        !blockers[static_cast<uint8_t>(text[i - 1])]) {
      f(text.substr(begin, i - begin));
      begin = i;
    }
    i += std::min(utf8_len(static_cast<uint8_t>(text[i])), text.size() - i);
  }
  if (begin < text.size()) f(text.substr(begin));
}

std::string byte_token_text(uint8_t b) {
  return fmt::format("<0x{:02X}>", b);
}

bool is_ascii_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

}  // namespace

struct Tokenizer::Impl {
  enum class Model { Bpe, Spm };

  std::vector<std::string> texts;   // [n_vocab] as stored, "[EMPTY_<id>]" for empty ones
  std::vector<TokenType> types;     // [n_vocab] after llama.cpp's overrides
  std::vector<float> scores;        // [n_vocab] SentencePiece merge priorities (higher first)
  std::vector<std::string> pieces;  // [n_vocab] bytes of each token, special ones as their text
  TextMap token_to_id;

  // Symbols for BPE: ids below n_vocab are tokens; ids from n_vocab on are strings that occur in
  // merges without being tokens themselves.
  TextMap extra_symbols;
  std::unordered_map<uint64_t, Merge> merges;  // pair_key(left, right) -> merge
  std::array<int32_t, 256> byte_symbol{};      // symbol of each byte's printable character
  std::array<int32_t, 256> byte_token{};       // token "<0xXX>" of each byte, -1 when none

  std::vector<int32_t> special_ids;  // control/user-defined/unknown, longest text first
  std::vector<bool> eog;             // [n_vocab]
  // [n_vocab] whitespace a special token swallows on its left / right when matched in text
  // (llama.cpp's LSTRIP / RSTRIP attributes, which it sets by model name).
  std::vector<bool> lstrip, rstrip;

  Model model = Model::Bpe;
  tok::PreKind pre_kind = tok::PreKind::Gpt2;
  std::string pre_name;
  std::string chat_template;
  bool byte_encode = true;        // BPE over GPT-2's printable byte mapping (false: raw UTF-8)
  bool escape_spaces = false;     // ' ' -> U+2581 before BPE (SentencePiece always does)
  bool ignore_merges = false;     // a word that is a token is taken whole
  bool clean_spaces = false;      // decode drops the space before ?!., and some contractions
  bool add_space_prefix = false;  // SentencePiece: ' ' before text that follows BOS/special/start
  // SentencePiece and BPE on UTF-8 merge word by word where no token (SentencePiece) or merge
  // result (BPE) can span the start of a word (for_each_space_word).
  CutBlockers cut_blockers{};
  int32_t bos = -1, eos = -1, unk = -1;
  bool add_bos = false, add_eos = false;

  int32_t n_vocab() const { return static_cast<int32_t>(texts.size()); }

  int32_t intern(const std::string& s) {
    if (auto it = token_to_id.find(s); it != token_to_id.end()) return it->second;
    auto [it, inserted] =
        extra_symbols.try_emplace(s, n_vocab() + static_cast<int32_t>(extra_symbols.size()));
    return it->second;
  }
  int32_t symbol_of(std::string_view s) const {
    if (auto it = token_to_id.find(s); it != token_to_id.end()) return it->second;
    if (auto it = extra_symbols.find(s); it != extra_symbols.end()) return it->second;
    return -1;
  }
  int32_t token_of(std::string_view s) const {
    auto it = token_to_id.find(s);
    return it == token_to_id.end() ? -1 : it->second;
  }

  void load_model(const GgufFile& f);
  void load_tokens(const GgufFile& f);
  void load_merges(const GgufFile& f);
  void load_special_ids(const GgufFile& f);
  void recognise_special_texts(const GgufFile& f);
  void set_strip_attributes(const GgufFile& f);

  void bpe_word(std::string_view word, Scratch& s, std::vector<int32_t>* out) const;
  void bpe_fallback(std::string_view text, std::vector<int32_t>* out) const;
  void encode_bpe(std::string_view text, Scratch& s, std::vector<int32_t>* out) const;
  void encode_spm(std::string_view text, Scratch& s, std::vector<int32_t>* out) const;
  std::string make_piece(int32_t id) const;
};

// ---- loading -----------------------------------------------------------------------------------

namespace {

// An optional token id key; out-of-range ids are errors rather than llama.cpp's silent fallback.
// `fallback` (llama.cpp's default for the tokenizer model) applies when the key is absent and the
// id is inside the vocabulary.
int32_t read_token_id(const GgufFile& f, std::string_view key, int32_t n_vocab,
                      int32_t fallback = -1) {
  auto v = f.get_int(key);
  if (!v) return fallback < n_vocab ? fallback : -1;
  if (*v < 0 || *v >= n_vocab)
    fail("{}: {} is {}, outside the vocabulary (0..{}); the file's tokenizer metadata is broken",
         f.path(), key, *v, n_vocab - 1);
  return static_cast<int32_t>(*v);
}

}  // namespace

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::~Tokenizer() = default;

// tokenizer.ggml.model and .pre: which algorithm, which pre-tokenizer and their options.
void Tokenizer::Impl::load_model(const GgufFile& f) {
  const auto name = f.get_string(kKeyModel);
  if (!name) fail("{}: no {} key; the file has no tokenizer", f.path(), kKeyModel);
  if (*name == "llama") {
    // SentencePiece: no pre-tokenizer; tokenizer.ggml.pre ("default" when written) is ignored.
    model = Model::Spm;
    pre_name = "default";
    escape_spaces = true;
    add_space_prefix = true;
    add_bos = true;
  } else if (*name == "gpt2" || *name == "gemma4") {
    model = Model::Bpe;
    // Gemma 4's model name implies its pre-tokenizer, whatever the file says.
    pre_name = *name == "gemma4" ? "gemma4" : f.get_string(kKeyPre).value_or("default");
    if (pre_name.empty()) pre_name = "default";  // as llama.cpp, with its quality warning
    const PreName* pre = nullptr;
    for (const PreName& p : kPreNames)
      if (p.name == pre_name) pre = &p;
    if (!pre)
      fail(
          "{}: {} is '{}', a pre-tokenizer kvlm does not implement (kvlm knows the llama.cpp "
          "names of the gpt-2, smollm, default, falcon, llama3, qwen2, qwen35, deepseek-llm, "
          "deepseek-coder, deepseek-v3, gpt-4o, tekken, kimi-k2, bloom, chameleon, superbpe "
          "and gemma4 regex lists and their relatives; not whitespace)",
          f.path(), kKeyPre, pre_name);
    pre_kind = pre->kind;
    ignore_merges = pre->ignore_merges;
    clean_spaces = pre->clean_spaces;
    add_bos = pre->add_bos;
    // BPE on UTF-8 with U+2581 for spaces; Gemma 4's forced BOS and whole newline runs are
    // Newlines' alone (llama.cpp keys them on its GEMMA4 type, which Sarvam does not share).
    if (pre_kind == tok::PreKind::Newlines || pre_kind == tok::PreKind::Sarvam) {
      byte_encode = false;
      escape_spaces = true;
    }
  } else {
    fail(
        "{}: {} is '{}'; kvlm supports the tokenizer models 'gpt2' (byte-level BPE), 'gemma4' "
        "(BPE on UTF-8) and 'llama' (SentencePiece), not WordPiece ('bert'), Unigram ('t5'), "
        "RWKV or others",
        f.path(), kKeyModel, *name);
  }
  // SentencePiece's own switch; the BPE models above never add the prefix in llama.cpp unless
  // the file asks.
  add_space_prefix = f.get_bool("tokenizer.ggml.add_space_prefix").value_or(add_space_prefix);
}

void Tokenizer::Impl::load_tokens(const GgufFile& f) {
  const auto* tokens = f.get_string_array(kKeyTokens);
  if (!tokens || tokens->empty())
    fail("{}: no {} array; the file has no vocabulary", f.path(), kKeyTokens);
  if (tokens->size() > static_cast<size_t>(INT32_MAX / 2))
    fail("{}: {} has {} entries, too many for 32-bit token ids", f.path(), kKeyTokens,
         tokens->size());
  const int32_t n = static_cast<int32_t>(tokens->size());

  const auto* types_in = f.get_number_array(kKeyTypes);
  if (types_in && types_in->size() < tokens->size())
    fail("{}: {} has {} entries for {} tokens", f.path(), kKeyTypes, types_in->size(), n);
  const auto* scores_in = f.get_number_array(kKeyScores);
  if (scores_in && scores_in->size() < tokens->size())
    fail("{}: {} has {} entries for {} tokens", f.path(), kKeyScores, scores_in->size(), n);

  texts.resize(n);
  types.resize(n, TokenType::Normal);
  scores.assign(n, 0.0f);
  token_to_id.reserve(n);
  for (int32_t id = 0; id < n; ++id) {
    std::string text = (*tokens)[id];
    if (text.empty()) text = fmt::format("[EMPTY_{}]", id);  // as llama.cpp, so it can't match ""
    auto [it, inserted] = token_to_id.try_emplace(text, id);
    if (!inserted)
      fail("{}: {} has '{}' twice (ids {} and {})", f.path(), kKeyTokens, text, it->second, id);
    texts[id] = std::move(text);
    if (types_in) {
      const double t = (*types_in)[id];
      types[id] = (t >= 0 && t <= 6 && t == static_cast<int>(t))
                      ? static_cast<TokenType>(static_cast<int>(t))
                      : TokenType::Undefined;
    }
    if (scores_in) scores[id] = static_cast<float>((*scores_in)[id]);
  }
  if (model == Model::Spm)
    for (const std::string& t : texts) add_cut_blockers(t, &cut_blockers);
  // Byte fallback tokens; SentencePiece falls back to a token of the byte's own text when a
  // vocabulary has no "<0xXX>" for it.
  for (int b = 0; b < 256; ++b) {
    byte_token[b] = token_of(byte_token_text(static_cast<uint8_t>(b)));
    if (byte_token[b] < 0 && model == Model::Spm)
      byte_token[b] = token_of(std::string(1, static_cast<char>(b)));
  }
}

void Tokenizer::Impl::load_merges(const GgufFile& f) {
  const auto* rules = f.get_string_array(kKeyMerges);
  if (!rules) fail("{}: no {} array; BPE needs its merge rules", f.path(), kKeyMerges);
  merges.reserve(rules->size());
  for (size_t i = 0; i < rules->size(); ++i) {
    const std::string& rule = (*rules)[i];
    // The separator is the first space after the first byte: a pair's left side is never empty.
    const size_t sp = rule.find(' ', 1);
    if (sp == std::string::npos)
      fail("{}: {}[{}] is '{}', not two symbols separated by a space", f.path(), kKeyMerges, i,
           rule);
    std::string left = rule.substr(0, sp), right = rule.substr(sp + 1);
    const int32_t l = intern(left), r = intern(right);
    const int32_t result = intern(left + right);
    if (!byte_encode) add_cut_blockers(left + right, &cut_blockers);
    // A repeated pair keeps its first (best) rank, as llama.cpp's map emplace does.
    merges.try_emplace(pair_key(l, r), Merge{static_cast<int32_t>(i), result});
  }
  for (int b = 0; b < 256; ++b)
    byte_symbol[b] = symbol_of(tok::byte_to_unicode(static_cast<uint8_t>(b)));
}

void Tokenizer::Impl::load_special_ids(const GgufFile& f) {
  const int32_t n = n_vocab();
  // llama.cpp's SentencePiece defaults: <unk> 0, <s> 1, </s> 2.
  const bool spm = model == Model::Spm;
  bos = read_token_id(f, "tokenizer.ggml.bos_token_id", n, spm ? 1 : -1);
  eos = read_token_id(f, "tokenizer.ggml.eos_token_id", n, spm ? 2 : -1);
  unk = read_token_id(f, "tokenizer.ggml.unknown_token_id", n, spm ? 0 : -1);
  read_token_id(f, "tokenizer.ggml.padding_token_id", n);
  const auto add_bos_key = f.get_bool("tokenizer.ggml.add_bos_token");
  add_bos = add_bos_key.value_or(add_bos);
  add_eos = f.get_bool("tokenizer.ggml.add_eos_token").value_or(false);
  // Gemma 4 always starts with BOS in llama.cpp, whatever the file says.
  const bool forced_bos = pre_kind == tok::PreKind::Newlines && model == Model::Bpe;
  if (forced_bos) add_bos = true;
  // A default (Llama 3's) without a BOS id quietly adds nothing; an explicit request is an error.
  if (add_bos && bos < 0 && !add_bos_key && !forced_bos) add_bos = false;
  if (add_bos && bos < 0)
    fail("{}: tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is not set",
         f.path());
  if (add_eos && eos < 0)
    fail("{}: tokenizer.ggml.add_eos_token is true but tokenizer.ggml.eos_token_id is not set",
         f.path());
}

// llama.cpp recognises special tokens by text and forces them to CONTROL. It scans an
// unordered_map, so which of several EOT candidates it picks is unspecified; the choice does not
// matter here (all of them end generation), so take the lowest id.
void Tokenizer::Impl::recognise_special_texts(const GgufFile& f) {
  const int32_t n = n_vocab();
  int32_t eot = read_token_id(f, "tokenizer.ggml.eot_token_id", n);
  int32_t eom = read_token_id(f, "tokenizer.ggml.eom_token_id", n);
  auto force_control = [&](int32_t id) { types[id] = TokenType::Control; };
  eog.assign(n, false);
  std::array<int32_t, 6> fim_ids;
  for (size_t k = 0; k < fim_kinds().size(); ++k)
    fim_ids[k] = read_token_id(f, fim_kinds()[k].key, n);
  for (int32_t id = 0; id < n; ++id) {
    const std::string& t = texts[id];
    if (t.size() < 3 || t.size() > 40) continue;  // none of the recognised texts is outside this
    if (eot < 0 && one_of(t, kEotTexts)) {
      eot = id;
      force_control(id);
    }
    if (eom < 0 && t == "<|eom_id|>") {
      eom = id;
      force_control(id);
    }
    for (size_t k = 0; k < fim_kinds().size(); ++k) {
      const auto& fim_texts = fim_kinds()[k].texts;
      if (fim_ids[k] < 0 && std::find(fim_texts.begin(), fim_texts.end(), t) != fim_texts.end()) {
        fim_ids[k] = id;
        force_control(id);
      }
    }
  }
  for (size_t k = 0; k < fim_kinds().size(); ++k)
    if (fim_kinds()[k].eog && fim_ids[k] >= 0) eog[fim_ids[k]] = true;
  for (int32_t id = 0; id < n; ++id) {
    const std::string& t = texts[id];
    if (t.size() >= 3 && t.size() <= 40 && one_of(t, kEogTexts)) {
      eog[id] = true;
      force_control(id);
    }
    // gpt-oss's channel markers always render (llama.cpp makes them user-defined).
    if (t == "<|channel|>" || t == "<|message|>" || t == "<|start|>" || t == "<|constrain|>")
      types[id] = TokenType::UserDefined;
  }
  for (int32_t id : {eos, eot, eom})
    if (id >= 0) eog[id] = true;

  // Gemma 4 (and PLaMo 2) have a "</s>" that is ordinary text; llama.cpp recognises them by their
  // own end markers and undoes the override.
  const int32_t s_id = token_of("</s>");
  for (std::string_view marker : {"<|tool_response>", "<|plamo:eos|>"}) {
    const int32_t m = token_of(marker);
    if (m >= 0 && eog[m] && s_id >= 0 && eog[s_id]) {
      eog[s_id] = false;
      types[s_id] = TokenType::Normal;
    }
  }
  // o200k_harmony / solar-open: "<|end|>" ends a message, not the generation, when the
  // vocabulary has the return/call (or calls/flush) markers.
  auto eog_text = [&](std::string_view t) {
    const int32_t id = token_of(t);
    return id >= 0 && eog[id];
  };
  const int32_t end_id = token_of("<|end|>");
  if (end_id >= 0 && eog[end_id] &&
      ((eog_text("<|return|>") && (eog_text("<|call|>") || eog_text("<|calls|>"))) ||
       (eog_text("<|calls|>") && eog_text("<|flush|>")))) {
    eog[end_id] = false;
    types[end_id] = TokenType::UserDefined;
  }
}

// Phi-3's special tokens swallow the whitespace after them when matched in text (llama.cpp keys
// this on general.name); <unk>, <s> and <|endoftext|> do not.
void Tokenizer::Impl::set_strip_attributes(const GgufFile& f) {
  lstrip.assign(n_vocab(), false);
  rstrip.assign(n_vocab(), false);
  std::string name = f.get_string("general.name").value_or("");
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (name.find("phi-3") == std::string::npos && name.find("phi3") == std::string::npos) return;
  for (int32_t id : special_ids) rstrip[id] = true;
  if (int32_t id = token_of("</s>"); id >= 0) rstrip[id] = true;
  for (std::string_view t : {"<unk>", "<s>", "<|endoftext|>"})
    if (int32_t id = token_of(t); id >= 0) rstrip[id] = false;
}

std::unique_ptr<Tokenizer> Tokenizer::from_gguf(const GgufFile& f) {
  std::unique_ptr<Tokenizer> tok(new Tokenizer());
  Impl& m = *tok->impl_;
  m.load_model(f);
  m.load_tokens(f);
  if (m.model == Impl::Model::Bpe) m.load_merges(f);
  m.load_special_ids(f);
  m.recognise_special_texts(f);

  for (int32_t id = 0; id < m.n_vocab(); ++id) {
    const TokenType t = m.types[id];
    if (t == TokenType::Control || t == TokenType::UserDefined || t == TokenType::Unknown)
      m.special_ids.push_back(id);
  }
  // Longest first, so that a special token containing another one wins; ties by id for a
  // deterministic order (llama.cpp's std::sort leaves ties unspecified).
  std::stable_sort(m.special_ids.begin(), m.special_ids.end(),
                   [&](int32_t a, int32_t b) { return m.texts[a].size() > m.texts[b].size(); });
  m.set_strip_attributes(f);

  m.pieces.resize(m.n_vocab());
  for (int32_t id = 0; id < m.n_vocab(); ++id) m.pieces[id] = m.make_piece(id);

  m.chat_template = f.get_string("tokenizer.chat_template").value_or("");
  return tok;
}

// Bytes of a token as llama.cpp's token_to_piece renders it with special=true: control, unknown
// and user-defined tokens verbatim, normal tokens with the byte mapping undone (or U+2581 turned
// back into a space), byte tokens ("<0xAB>") as their byte, anything else (unused, undefined) as
// nothing.
std::string Tokenizer::Impl::make_piece(int32_t id) const {
  const std::string& text = texts[id];
  switch (types[id]) {
    case TokenType::Control:
    case TokenType::Unknown:
    case TokenType::UserDefined:
      return text;
    case TokenType::Normal: {
      std::string out;
      if (escape_spaces) {
        for (size_t i = 0; i < text.size();) {
          if (text.compare(i, kSpaceMark.size(), kSpaceMark) == 0) {
            out.push_back(' ');
            i += kSpaceMark.size();
          } else {
            out.push_back(text[i++]);
          }
        }
        return out;
      }
      std::vector<uint32_t> cpts;
      tok::decode_utf8_lenient(text, &cpts);
      std::string ch;
      for (uint32_t c : cpts) {
        ch.clear();
        tok::append_utf8(c, &ch);
        const int b = tok::unicode_to_byte(ch);
        if (b >= 0) {
          out.push_back(static_cast<char>(b));
        } else {
          // A character outside the byte mapping: llama.cpp writes this marker, so do we.
          out += "[UNK_BYTE_0x";
          for (unsigned char c8 : ch) out += fmt::format("{:02x}", c8);
          out += text + "]";
        }
      }
      return out;
    }
    case TokenType::Byte:
      if (text.size() == 6 && text.compare(0, 3, "<0x") == 0 && text[5] == '>') {
        auto hex = [](char c) {
          return c >= '0' && c <= '9'   ? c - '0'
                 : c >= 'a' && c <= 'f' ? c - 'a' + 10
                 : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                        : -1;
        };
        const int hi = hex(text[3]), lo = hex(text[4]);
        if (hi >= 0 && lo >= 0) return std::string(1, static_cast<char>(hi * 16 + lo));
      }
      return {};
    default:
      return {};
  }
}

// ---- encoding ----------------------------------------------------------------------------------

// Merges the symbols of one word by rank. With byte_encode the word is raw bytes, each one symbol
// (its printable character); otherwise the word is UTF-8 and each character is a symbol.
void Tokenizer::Impl::bpe_word(std::string_view word, Scratch& s, std::vector<int32_t>* out) const {
  auto& sym = s.symbols;
  auto& heap = s.heap;
  sym.clear();
  heap.clear();
  const int32_t n = static_cast<int32_t>(word.size());
  if (byte_encode) {
    for (int32_t i = 0; i < n; ++i) {
      const int32_t id = byte_symbol[static_cast<uint8_t>(word[i])];
      sym.push_back(Symbol{id, i - 1, i + 1 < n ? i + 1 : -1, static_cast<uint32_t>(i), 1});
    }
  } else {
    push_char_symbols(word, &sym, [&](std::string_view ch) { return symbol_of(ch); });
  }
  const int32_t n_sym = static_cast<int32_t>(sym.size());

  auto try_queue = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const int32_t l = sym[left].id, r = sym[right].id;
    if (l < 0 || r < 0) return;
    auto it = merges.find(pair_key(l, r));
    if (it == merges.end()) return;
    heap.push_back(Candidate{it->second.rank, left, right, l, r, it->second.result});
    std::push_heap(heap.begin(), heap.end(), CandidateAfter{});
  };
  for (int32_t i = 0; i + 1 < n_sym; ++i) try_queue(i, i + 1);

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), CandidateAfter{});
    const Candidate c = heap.back();
    heap.pop_back();
    Symbol& l = sym[c.left];
    Symbol& r = sym[c.right];
    // Stale unless both sides are still live, adjacent and unchanged since queued.
    if (l.len == 0 || r.len == 0 || l.next != c.right || l.id != c.left_id || r.id != c.right_id)
      continue;
    l.id = c.result;
    absorb_next(sym, c.left);
    try_queue(l.prev, c.left);
    try_queue(c.left, l.next);
  }

  for (int32_t i = 0; i >= 0 && i < n_sym; i = sym[i].next) {
    const Symbol& x = sym[i];
    if (x.id >= 0 && x.id < n_vocab()) {
      out->push_back(x.id);
    } else {
      bpe_fallback(word.substr(x.begin, x.len), out);
    }
  }
}

// A merged symbol that is not a token (a merge result missing from the vocabulary, or a character
// with no token). llama.cpp emits the tokens of its single bytes and drops bytes without one:
// with the byte mapping, the single bytes of the mapped text; on raw UTF-8, the <0xXX> tokens.
void Tokenizer::Impl::bpe_fallback(std::string_view text, std::vector<int32_t>* out) const {
  if (!byte_encode) {
    for (char ch : text)
      if (const int32_t id = byte_token[static_cast<uint8_t>(ch)]; id >= 0) out->push_back(id);
    return;
  }
  std::string mapped;
  for (char ch : text) mapped += tok::byte_to_unicode(static_cast<uint8_t>(ch));
  for (char ch : mapped)
    if (const int32_t id = token_of(std::string_view(&ch, 1)); id >= 0) out->push_back(id);
}

void Tokenizer::Impl::encode_bpe(std::string_view text, Scratch& s,
                                 std::vector<int32_t>* out) const {
  if (escape_spaces) {
    s.mapped.clear();
    escape_spaces_into(text, &s.mapped);
    text = s.mapped;
  }
  s.cpts.clear();
  tok::decode_utf8_lenient(text, &s.cpts);
  const size_t n = s.cpts.size();
  s.flags.resize(n);
  for (size_t i = 0; i < n; ++i) s.flags[i] = tok::cpt_flags(s.cpts[i]);
  s.word_lens.clear();
  tok::pretokenize(pre_kind, s.cpts.data(), s.flags.data(), n, &s.word_lens, &s.split_scratch);
  // Words are re-encoded from codepoints, so invalid input bytes reach BPE as U+FFFD (and overlong
  // forms in their shortest encoding), exactly as in llama.cpp.
  size_t pos = 0;
  for (uint32_t len : s.word_lens) {
    s.word.clear();
    for (size_t i = pos; i < pos + len; ++i) tok::append_utf8(s.cpts[i], &s.word);
    pos += len;
    if (ignore_merges) {
      // Looked up in the vocabulary's own (mapped) spelling.
      s.lookup.clear();
      for (char ch : s.word) s.lookup += tok::byte_to_unicode(static_cast<uint8_t>(ch));
      if (const int32_t id = token_of(byte_encode ? s.lookup : s.word); id >= 0) {
        out->push_back(id);
        continue;
      }
    }
    // Gemma 4: a run of newlines that is a token stays whole.
    if (pre_kind == tok::PreKind::Newlines && s.word.find_first_not_of('\n') == std::string::npos) {
      if (const int32_t id = token_of(s.word); id >= 0) {
        out->push_back(id);
        continue;
      }
    }
    if (!byte_encode) {
      for_each_space_word(s.word, cut_blockers, [&](std::string_view w) { bpe_word(w, s, out); });
    } else {
      bpe_word(s.word, s, out);
    }
  }
}

// SentencePiece on one fragment (spaces already U+2581): every UTF-8 character starts as a
// symbol; the adjacent pair whose concatenation is the highest-scored token merges first.
void Tokenizer::Impl::encode_spm(std::string_view text, Scratch& s,
                                 std::vector<int32_t>* out) const {
  auto& sym = s.symbols;
  auto& heap = s.spm_heap;
  sym.clear();
  heap.clear();
  push_char_symbols(text, &sym, [](std::string_view) { return -1; });  // ids unused
  const int32_t n_sym = static_cast<int32_t>(sym.size());

  auto try_queue = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const uint32_t len = sym[left].len + sym[right].len;
    const int32_t id = token_of(text.substr(sym[left].begin, len));
    if (id < 0) return;
    heap.push_back(SpmCandidate{scores[id], left, right, len});
    std::push_heap(heap.begin(), heap.end(), SpmCandidateAfter{});
  };
  for (int32_t i = 0; i + 1 < n_sym; ++i) try_queue(i, i + 1);

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), SpmCandidateAfter{});
    const SpmCandidate c = heap.back();
    heap.pop_back();
    Symbol& l = sym[c.left];
    Symbol& r = sym[c.right];
    if (l.len == 0 || r.len == 0 || l.len + r.len != c.len) continue;
    absorb_next(sym, c.left);
    try_queue(l.prev, c.left);
    try_queue(c.left, l.next);
  }

  for (int32_t i = 0; i >= 0 && i < n_sym; i = sym[i].next) {
    const std::string_view piece = text.substr(sym[i].begin, sym[i].len);
    if (const int32_t id = token_of(piece); id >= 0) {
      out->push_back(id);
      continue;
    }
    // Byte fallback. llama.cpp throws for a byte with no token at all; kvlm emits <unk> (or
    // nothing when the vocabulary has none).
    for (char ch : piece) {
      const int32_t id = byte_token[static_cast<uint8_t>(ch)];
      if (id >= 0)
        out->push_back(id);
      else if (unk >= 0)
        out->push_back(unk);
    }
  }
}

namespace {

// A piece of the text being encoded: raw text or a special token.
struct Fragment {
  int32_t id;  // -1 for raw text
  size_t begin, len;
};

}  // namespace

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos,
                                       bool parse_special) const {
  const Impl& m = *impl_;
  // Partition into raw-text fragments and special tokens: each special token in turn (longest
  // first) is cut out of every remaining raw fragment, leftmost occurrences first. Without
  // parse_special only user-defined tokens are cut out, as in llama.cpp. A token with lstrip /
  // rstrip also takes the ASCII whitespace next to it.
  std::vector<Fragment> frags, next;
  if (!text.empty()) frags.push_back({-1, 0, text.size()});
  for (int32_t id : m.special_ids) {
    const TokenType t = m.types[id];
    if (!parse_special && (t == TokenType::Control || t == TokenType::Unknown)) continue;
    const std::string& st = m.texts[id];
    bool found = false;
    for (const Fragment& fr : frags) {
      if (fr.id < 0 && text.substr(fr.begin, fr.len).find(st) != std::string_view::npos) {
        found = true;
        break;
      }
    }
    if (!found) continue;
    next.clear();
    for (const Fragment& fr : frags) {
      if (fr.id >= 0) {
        next.push_back(fr);
        continue;
      }
      const std::string_view raw = text.substr(fr.begin, fr.len);
      size_t from = 0;
      for (size_t at; (at = raw.find(st, from)) != std::string_view::npos;) {
        size_t left_end = at;
        if (m.lstrip[id])
          while (left_end > from && is_ascii_space(raw[left_end - 1])) --left_end;
        if (left_end > from) next.push_back({-1, fr.begin + from, left_end - from});
        next.push_back({id, 0, 0});
        from = at + st.size();
        if (m.rstrip[id])
          while (from < raw.size() && is_ascii_space(raw[from])) ++from;
      }
      if (from < raw.size()) next.push_back({-1, fr.begin + from, raw.size() - from});
    }
    frags.swap(next);
  }

  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  // add_bos is llama.cpp's add_special: BOS/EOS are added only where the vocabulary asks for them.
  if (add_bos && m.add_bos) out.push_back(m.bos);
  Scratch s;
  // SentencePiece puts a space before text at the start and after each special token.
  bool after_special = true;
  for (const Fragment& fr : frags) {
    if (fr.id >= 0) {
      out.push_back(fr.id);
      after_special = true;
      continue;
    }
    const std::string_view raw = text.substr(fr.begin, fr.len);
    if (m.model == Impl::Model::Spm) {
      s.mapped.clear();
      if (m.add_space_prefix && after_special) s.mapped.append(kSpaceMark);
      escape_spaces_into(raw, &s.mapped);
      for_each_space_word(s.mapped, m.cut_blockers,
                          [&](std::string_view w) { m.encode_spm(w, s, &out); });
    } else {
      m.encode_bpe(raw, s, &out);
    }
    after_special = false;
  }
  if (add_bos && m.add_eos) out.push_back(m.eos);
  return out;
}

// ---- decoding and accessors --------------------------------------------------------------------

int32_t Tokenizer::n_vocab() const {
  return impl_->n_vocab();
}
int32_t Tokenizer::bos_id() const {
  return impl_->bos;
}
int32_t Tokenizer::eos_id() const {
  return impl_->eos;
}
bool Tokenizer::add_bos_default() const {
  return impl_->add_bos;
}
const std::string& Tokenizer::chat_template() const {
  return impl_->chat_template;
}
const std::string& Tokenizer::pre() const {
  return impl_->pre_name;
}

namespace {

// llama.cpp's clean-up of decoded BPE text (clean_spaces): no space before ?!., , a lone
// apostrophe between spaces loses both spaces, and " 's", " 'm", " 're", " 've" lose the space.
std::string clean_up_spaces(const std::string& in) {
  std::string a;
  a.reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    const char x = in[i];
    if (i > 0 && in[i - 1] == ' ' && (x == '?' || x == '!' || x == '.' || x == ',') && !a.empty())
      a.pop_back();
    a.push_back(x);
  }
  std::string b;
  b.reserve(a.size());
  // llama.cpp blanks the dropped space in place, so the character after it never sees a space
  // before it.
  bool prev_blanked = false;
  for (size_t i = 0; i < a.size(); ++i) {
    const char x = a[i];
    const bool prev_space = i > 0 && a[i - 1] == ' ' && !prev_blanked;
    prev_blanked = false;
    if (x == '\'' && i + 1 < a.size() && prev_space && a[i + 1] == ' ') {
      b.pop_back();
      b.push_back(x);
      ++i;  // the space after it
      prev_blanked = true;
      continue;
    }
    b.push_back(x);
  }
  std::string c;
  c.reserve(b.size());
  for (size_t i = 0; i < b.size(); ++i) {
    const char x = b[i];
    if (i > 0 && b[i - 1] == ' ' && x == '\'' && i + 1 < b.size()) {
      const char x1 = b[i + 1];
      const char x2 = i + 2 < b.size() ? b[i + 2] : '\0';
      if (x1 == 's' || x1 == 'm' || (x1 == 'r' && x2 == 'e') || (x1 == 'v' && x2 == 'e'))
        c.pop_back();
    }
    c.push_back(x);
  }
  return c;
}

void check_id(int32_t id, int32_t n_vocab) {
  if (id < 0 || id >= n_vocab)
    fail("token id {} is outside the vocabulary (0..{})", id, n_vocab - 1);
}
}  // namespace

bool Tokenizer::is_eog(int32_t id) const {
  return id >= 0 && id < n_vocab() && impl_->eog[id];
}

TokenType Tokenizer::token_type(int32_t id) const {
  check_id(id, n_vocab());
  return impl_->types[id];
}

const std::string& Tokenizer::token_text(int32_t id) const {
  check_id(id, n_vocab());
  return impl_->texts[id];
}

std::string Tokenizer::token_bytes(int32_t id, bool render_special) const {
  check_id(id, n_vocab());
  const TokenType t = impl_->types[id];
  if (!render_special && (t == TokenType::Control || t == TokenType::Unknown)) return {};
  return impl_->pieces[id];
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool render_special) const {
  const Impl& m = *impl_;
  std::string out;
  // As llama_detokenize: the space that add_space_prefix put before the text comes off the first
  // piece (at most one), then clean_spaces tidies the whole text.
  bool strip_space = m.add_space_prefix;
  for (int32_t id : ids) {
    check_id(id, n_vocab());
    const TokenType t = m.types[id];
    const bool skip = !render_special && (t == TokenType::Control || t == TokenType::Unknown);
    static const std::string kNothing;
    const std::string& piece = skip ? kNothing : m.pieces[id];
    out.append(piece, strip_space && !piece.empty() && piece[0] == ' ' ? 1 : 0);
    strip_space = false;
  }
  return m.clean_spaces ? clean_up_spaces(out) : out;
}

std::string StreamDecoder::push(int32_t id) {
  pending_ += tok_.token_bytes(id, render_special_);
  std::string out;
  const size_t used = tok::sanitize_utf8(pending_, /*final=*/false, &out);
  pending_.erase(0, used);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out;
  tok::sanitize_utf8(pending_, /*final=*/true, &out);
  pending_.clear();
  return out;
}

}  // namespace kvlm
