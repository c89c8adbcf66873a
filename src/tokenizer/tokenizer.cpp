// Byte-level BPE as llama.cpp's "gpt2" tokenizer model (llama-vocab.cpp) does it:
//
//   text -> special-token partition -> pre-tokenizer words -> bytes mapped to printable chars
//        -> merges by rank within each word -> token ids
//
// Loading also reproduces llama.cpp's adjustments to the vocabulary that change tokenization:
// end-of-generation and fill-in-the-middle tokens recognised by their text are forced to CONTROL
// (so that they are parsed as special tokens), and empty token texts become "[EMPTY_<id>]".

#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <array>
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

// Pre-tokenizer names llama.cpp maps to each regex list (see pretokenize.h). "gpt2" is not a name
// llama.cpp knows (its converter writes "gpt-2"); kvlm accepts it as the same thing.
struct PreName {
  std::string_view name;
  tok::PreKind kind;
};
constexpr PreName kPreNames[] = {
    {"gpt2", tok::PreKind::Gpt2},         {"gpt-2", tok::PreKind::Gpt2},
    {"phi-2", tok::PreKind::Gpt2},        {"mpt", tok::PreKind::Gpt2},
    {"olmo", tok::PreKind::Gpt2},         {"jais", tok::PreKind::Gpt2},
    {"smollm", tok::PreKind::Smollm},     {"starcoder", tok::PreKind::Smollm},
    {"refact", tok::PreKind::Smollm},     {"codeshell", tok::PreKind::Smollm},
    {"command-r", tok::PreKind::Smollm},  {"exaone", tok::PreKind::Smollm},
    {"minerva-7b", tok::PreKind::Smollm}, {"default", tok::PreKind::Default},
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

// A candidate merge of two adjacent symbols. Entries go stale when either side changes; they are
// checked when popped rather than removed from the heap.
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

// Per-call buffers, reused across the words of one encode() call.
struct Scratch {
  std::vector<uint32_t> cpts;
  std::vector<uint8_t> flags;
  std::vector<uint32_t> word_lens;
  std::vector<uint32_t> split_scratch;
  std::string word;
  std::vector<Symbol> symbols;
  std::vector<Candidate> heap;
};

}  // namespace

struct Tokenizer::Impl {
  std::vector<std::string> texts;   // [n_vocab] as stored, "[EMPTY_<id>]" for empty ones
  std::vector<TokenType> types;     // [n_vocab] after llama.cpp's overrides
  std::vector<std::string> pieces;  // [n_vocab] bytes of each token, special ones as their text
  std::unordered_map<std::string, int32_t> token_to_id;

  // Symbols for BPE: ids below n_vocab are tokens; ids from n_vocab on are strings that occur in
  // merges without being tokens themselves.
  std::unordered_map<std::string, int32_t> extra_symbols;
  std::unordered_map<uint64_t, Merge> merges;  // pair_key(left, right) -> merge
  std::array<int32_t, 256> byte_symbol{};      // symbol of each byte's printable character

  std::vector<int32_t> special_ids;  // control/user-defined/unknown, longest text first
  std::vector<bool> eog;             // [n_vocab]

  tok::PreKind pre_kind = tok::PreKind::Gpt2;
  std::string pre_name;
  std::string chat_template;
  int32_t bos = -1, eos = -1;
  bool add_bos = false, add_eos = false;

  int32_t n_vocab() const { return static_cast<int32_t>(texts.size()); }

  int32_t intern(const std::string& s) {
    if (auto it = token_to_id.find(s); it != token_to_id.end()) return it->second;
    auto [it, inserted] =
        extra_symbols.try_emplace(s, n_vocab() + static_cast<int32_t>(extra_symbols.size()));
    return it->second;
  }
  int32_t symbol_of(const std::string& s) const {
    if (auto it = token_to_id.find(s); it != token_to_id.end()) return it->second;
    if (auto it = extra_symbols.find(s); it != extra_symbols.end()) return it->second;
    return -1;
  }

  void bpe_word(std::string_view word, Scratch& s, std::vector<int32_t>* out) const;
  void encode_text(std::string_view text, Scratch& s, std::vector<int32_t>* out) const;
  std::string make_piece(int32_t id) const;
};

// ---- loading -----------------------------------------------------------------------------------

namespace {

// An optional token id key; out-of-range ids are errors rather than llama.cpp's silent fallback.
int32_t read_token_id(const GgufFile& f, std::string_view key, int32_t n_vocab) {
  auto v = f.get_int(key);
  if (!v) return -1;
  if (*v < 0 || *v >= n_vocab)
    fail("{}: {} is {}, outside the vocabulary (0..{}); the file's tokenizer metadata is broken",
         f.path(), key, *v, n_vocab - 1);
  return static_cast<int32_t>(*v);
}

}  // namespace

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::from_gguf(const GgufFile& f) {
  std::unique_ptr<Tokenizer> tok(new Tokenizer());
  Impl& m = *tok->impl_;

  const auto model = f.get_string(kKeyModel);
  if (!model) fail("{}: no {} key; the file has no tokenizer", f.path(), kKeyModel);
  if (*model != "gpt2")
    fail("{}: {} is '{}'; kvlm supports only byte-level BPE tokenizers ('gpt2')", f.path(),
         kKeyModel, *model);

  // A missing pre-tokenizer means llama.cpp's "default" regex list, as in llama.cpp.
  m.pre_name = f.get_string(kKeyPre).value_or("default");
  if (m.pre_name.empty()) m.pre_name = "default";
  const PreName* pre = nullptr;
  for (const PreName& p : kPreNames)
    if (p.name == m.pre_name) pre = &p;
  if (!pre)
    fail(
        "{}: {} is '{}', a pre-tokenizer kvlm does not implement (supported: smollm, gpt2/gpt-2, "
        "default and the llama.cpp names sharing their regexes)",
        f.path(), kKeyPre, m.pre_name);
  m.pre_kind = pre->kind;

  const auto* tokens = f.get_string_array(kKeyTokens);
  if (!tokens || tokens->empty())
    fail("{}: no {} array; the file has no vocabulary", f.path(), kKeyTokens);
  if (tokens->size() > static_cast<size_t>(INT32_MAX / 2))
    fail("{}: {} has {} entries, too many for 32-bit token ids", f.path(), kKeyTokens,
         tokens->size());
  const int32_t n_vocab = static_cast<int32_t>(tokens->size());

  const auto* types = f.get_number_array(kKeyTypes);
  if (types && types->size() < tokens->size())
    fail("{}: {} has {} entries for {} tokens", f.path(), kKeyTypes, types->size(), n_vocab);

  m.texts.resize(n_vocab);
  m.types.resize(n_vocab, TokenType::Normal);
  m.token_to_id.reserve(n_vocab);
  for (int32_t id = 0; id < n_vocab; ++id) {
    std::string text = (*tokens)[id];
    if (text.empty()) text = fmt::format("[EMPTY_{}]", id);  // as llama.cpp, so it can't match ""
    auto [it, inserted] = m.token_to_id.try_emplace(text, id);
    if (!inserted)
      fail("{}: {} has '{}' twice (ids {} and {})", f.path(), kKeyTokens, text, it->second, id);
    m.texts[id] = std::move(text);
    if (types) {
      const double t = (*types)[id];
      m.types[id] = (t >= 0 && t <= 6 && t == static_cast<int>(t))
                        ? static_cast<TokenType>(static_cast<int>(t))
                        : TokenType::Undefined;
    }
  }

  const auto* merges = f.get_string_array(kKeyMerges);
  if (!merges) fail("{}: no {} array; BPE needs its merge rules", f.path(), kKeyMerges);
  m.merges.reserve(merges->size());
  for (size_t i = 0; i < merges->size(); ++i) {
    const std::string& rule = (*merges)[i];
    // The separator is the first space after the first byte: a pair's left side is never empty.
    const size_t sp = rule.find(' ', 1);
    if (sp == std::string::npos)
      fail("{}: {}[{}] is '{}', not two symbols separated by a space", f.path(), kKeyMerges, i,
           rule);
    std::string left = rule.substr(0, sp), right = rule.substr(sp + 1);
    const int32_t l = m.intern(left), r = m.intern(right);
    const int32_t result = m.intern(left + right);
    // A repeated pair keeps its first (best) rank, as llama.cpp's map emplace does.
    m.merges.try_emplace(pair_key(l, r), Merge{static_cast<int32_t>(i), result});
  }
  for (int b = 0; b < 256; ++b)
    m.byte_symbol[b] = m.symbol_of(tok::byte_to_unicode(static_cast<uint8_t>(b)));

  m.bos = read_token_id(f, "tokenizer.ggml.bos_token_id", n_vocab);
  m.eos = read_token_id(f, "tokenizer.ggml.eos_token_id", n_vocab);
  int32_t eot = read_token_id(f, "tokenizer.ggml.eot_token_id", n_vocab);
  int32_t eom = read_token_id(f, "tokenizer.ggml.eom_token_id", n_vocab);
  read_token_id(f, "tokenizer.ggml.unknown_token_id", n_vocab);
  read_token_id(f, "tokenizer.ggml.padding_token_id", n_vocab);
  m.add_bos = f.get_bool("tokenizer.ggml.add_bos_token").value_or(false);
  m.add_eos = f.get_bool("tokenizer.ggml.add_eos_token").value_or(false);
  if (m.add_bos && m.bos < 0)
    fail("{}: tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is not set",
         f.path());
  if (m.add_eos && m.eos < 0)
    fail("{}: tokenizer.ggml.add_eos_token is true but tokenizer.ggml.eos_token_id is not set",
         f.path());

  // llama.cpp recognises special tokens by text and forces them to CONTROL. It scans an
  // unordered_map, so which of several EOT candidates it picks is unspecified; the choice does not
  // matter here (all of them end generation), so take the lowest id.
  auto force_control = [&](int32_t id) {
    if (m.types[id] != TokenType::Control) m.types[id] = TokenType::Control;
  };
  m.eog.assign(n_vocab, false);
  std::array<int32_t, 6> fim_ids;
  for (size_t k = 0; k < fim_kinds().size(); ++k)
    fim_ids[k] = read_token_id(f, fim_kinds()[k].key, n_vocab);
  for (int32_t id = 0; id < n_vocab; ++id) {
    const std::string& t = m.texts[id];
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
      const auto& texts = fim_kinds()[k].texts;
      if (fim_ids[k] < 0 && std::find(texts.begin(), texts.end(), t) != texts.end()) {
        fim_ids[k] = id;
        force_control(id);
      }
    }
  }
  for (size_t k = 0; k < fim_kinds().size(); ++k)
    if (fim_kinds()[k].eog && fim_ids[k] >= 0) m.eog[fim_ids[k]] = true;
  for (int32_t id = 0; id < n_vocab; ++id) {
    const std::string& t = m.texts[id];
    if (t.size() >= 3 && t.size() <= 40 && one_of(t, kEogTexts)) {
      m.eog[id] = true;
      force_control(id);
    }
  }
  for (int32_t id : {m.eos, eot, eom})
    if (id >= 0) m.eog[id] = true;

  for (int32_t id = 0; id < n_vocab; ++id) {
    const TokenType t = m.types[id];
    if (t == TokenType::Control || t == TokenType::UserDefined || t == TokenType::Unknown)
      m.special_ids.push_back(id);
  }
  // Longest first, so that a special token containing another one wins; ties by id for a
  // deterministic order (llama.cpp's std::sort leaves ties unspecified).
  std::stable_sort(m.special_ids.begin(), m.special_ids.end(),
                   [&](int32_t a, int32_t b) { return m.texts[a].size() > m.texts[b].size(); });

  m.pieces.resize(n_vocab);
  for (int32_t id = 0; id < n_vocab; ++id) m.pieces[id] = m.make_piece(id);

  m.chat_template = f.get_string("tokenizer.chat_template").value_or("");
  return tok;
}

// Bytes of a token as llama.cpp's token_to_piece renders it with special=true: control, unknown
// and user-defined tokens verbatim, normal tokens with the byte mapping undone, byte tokens
// ("<0xAB>") as their byte, anything else (unused, undefined) as nothing.
std::string Tokenizer::Impl::make_piece(int32_t id) const {
  const std::string& text = texts[id];
  switch (types[id]) {
    case TokenType::Control:
    case TokenType::Unknown:
    case TokenType::UserDefined:
      return text;
    case TokenType::Normal: {
      std::string out;
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

void Tokenizer::Impl::bpe_word(std::string_view word, Scratch& s, std::vector<int32_t>* out) const {
  auto& sym = s.symbols;
  auto& heap = s.heap;
  sym.clear();
  heap.clear();
  const int32_t n = static_cast<int32_t>(word.size());
  // One initial symbol per byte: after the byte mapping each byte is one character.
  for (int32_t i = 0; i < n; ++i) {
    const int32_t id = byte_symbol[static_cast<uint8_t>(word[i])];
    sym.push_back(Symbol{id, i - 1, i + 1 < n ? i + 1 : -1, static_cast<uint32_t>(i), 1});
  }
  auto try_queue = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const int32_t l = sym[left].id, r = sym[right].id;
    if (l < 0 || r < 0) return;
    auto it = merges.find(pair_key(l, r));
    if (it == merges.end()) return;
    heap.push_back(Candidate{it->second.rank, left, right, l, r, it->second.result});
    std::push_heap(heap.begin(), heap.end(), CandidateAfter{});
  };
  for (int32_t i = 0; i + 1 < n; ++i) try_queue(i, i + 1);

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
    l.len += r.len;
    r.len = 0;
    l.next = r.next;
    if (r.next >= 0) sym[r.next].prev = c.left;
    try_queue(l.prev, c.left);
    try_queue(c.left, l.next);
  }

  for (int32_t i = 0; i >= 0 && i < n; i = sym[i].next) {
    const Symbol& x = sym[i];
    if (x.id >= 0 && x.id < n_vocab()) {
      out->push_back(x.id);
      continue;
    }
    // Not a token (a merge result missing from the vocabulary, or a byte with no token): llama.cpp
    // falls back to the single bytes of its mapped text that are tokens and drops the rest.
    std::string mapped;
    for (uint32_t k = 0; k < x.len; ++k)
      mapped += tok::byte_to_unicode(static_cast<uint8_t>(word[x.begin + k]));
    for (char ch : mapped) {
      auto it = token_to_id.find(std::string(1, ch));
      if (it != token_to_id.end()) out->push_back(it->second);
    }
  }
}

void Tokenizer::Impl::encode_text(std::string_view text, Scratch& s,
                                  std::vector<int32_t>* out) const {
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
    bpe_word(s.word, s, out);
  }
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos,
                                       bool parse_special) const {
  const Impl& m = *impl_;
  // Partition into raw-text fragments and special tokens: each special token in turn (longest
  // first) is cut out of every remaining raw fragment, leftmost occurrences first. Without
  // parse_special only user-defined tokens are cut out, as in llama.cpp.
  struct Fragment {
    int32_t id;  // -1 for raw text
    size_t begin, len;
  };
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
      for (size_t at; (at = raw.find(st, from)) != std::string_view::npos; from = at + st.size()) {
        if (at > from) next.push_back({-1, fr.begin + from, at - from});
        next.push_back({id, 0, 0});
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
  for (const Fragment& fr : frags) {
    if (fr.id >= 0) {
      out.push_back(fr.id);
    } else {
      m.encode_text(text.substr(fr.begin, fr.len), s, &out);
    }
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
  std::string out;
  for (int32_t id : ids) {
    check_id(id, n_vocab());
    const TokenType t = impl_->types[id];
    if (!render_special && (t == TokenType::Control || t == TokenType::Unknown)) continue;
    out += impl_->pieces[id];
  }
  return out;
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
