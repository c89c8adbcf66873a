#include "tokenizer/pretokenize.h"

#include "tokenizer/unicode.h"

namespace kvlm::tok {

namespace {

// Each stage re-splits every piece of `in` (lengths in codepoints, consecutive from 0) into
// `out`. A piece is a half-open range [ini, end) of codepoints.
struct Pieces {
  std::vector<uint32_t>* out;
  size_t prev_end;
  // Closes the current word at `end` (empty words are dropped); returns its length.
  size_t add(size_t end) {
    const size_t len = end - prev_end;
    if (len > 0) out->push_back(static_cast<uint32_t>(len));
    prev_end = end;
    return len;
  }
};

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
// The alternatives are tried in order at each position, as a backtracking regex engine would.
void split_gpt2(const uint32_t* cpts, const uint8_t* flags, const std::vector<uint32_t>& in,
                std::vector<uint32_t>* out) {
  constexpr uint8_t kLN = kCptLetter | kCptNumber;
  constexpr uint8_t kWLN = kCptWhitespace | kCptLetter | kCptNumber;
  size_t ini = 0;
  for (uint32_t piece_len : in) {
    const size_t end = ini + piece_len;
    Pieces pieces{out, ini};
    size_t pos = ini;
    while (pos < end) {
      const uint32_t c = cpts[pos];
      if (c == '\'' && pos + 1 < end) {
        const uint32_t c1 = cpts[pos + 1];
        if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
          pos += pieces.add(pos + 2);
          continue;
        }
        if (pos + 2 < end) {
          const uint32_t c2 = cpts[pos + 2];
          if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
            pos += pieces.add(pos + 3);
            continue;
          }
        }
      }
      // The optional leading space: classify by the character after it.
      const bool space = c == ' ';
      const bool has_next = !space || pos + 1 < end;
      const uint8_t f = space ? (has_next ? flags[pos + 1] : 0) : flags[pos];
      if (f & kLN) {
        const uint8_t cls = (f & kCptLetter) ? kCptLetter : kCptNumber;
        pos += space;
        while (pos < end && (flags[pos] & cls)) ++pos;
        pieces.add(pos);
        continue;
      }
      if (has_next && !(f & kWLN)) {
        pos += space;
        while (pos < end && !(flags[pos] & kWLN)) ++pos;
        pieces.add(pos);
        continue;
      }
      size_t n_ws = 0;
      while (pos + n_ws < end && (flags[pos + n_ws] & kCptWhitespace)) ++n_ws;
      if (n_ws > 1 && pos + n_ws < end) {
        // \s+(?!\S): the run minus its last character, which goes with the word after it.
        pos += n_ws - 1;
        pieces.add(pos);
        continue;
      }
      if (n_ws > 0) {
        pos += n_ws;
        pieces.add(pos);
        continue;
      }
      pieces.add(++pos);  // matched by none of the alternatives: a word of its own
    }
    ini = end;
  }
}

// \p{N}: every number character is a word; the text between them is a word too.
void split_each_number(const uint8_t* flags, const std::vector<uint32_t>& in,
                       std::vector<uint32_t>* out) {
  size_t ini = 0;
  for (uint32_t piece_len : in) {
    const size_t end = ini + piece_len;
    Pieces pieces{out, ini};
    for (size_t pos = ini; pos < end; ++pos) {
      if (flags[pos] & kCptNumber) {
        pieces.add(pos);
        pieces.add(pos + 1);
      }
    }
    pieces.add(end);
    ini = end;
  }
}

// [class]+: maximal runs of class members and the runs between them, alternately.
template <class InClass>
void split_runs(const std::vector<uint32_t>& in, std::vector<uint32_t>* out, InClass in_class) {
  size_t ini = 0;
  for (uint32_t piece_len : in) {
    const size_t end = ini + piece_len;
    Pieces pieces{out, ini};
    for (size_t pos = ini + 1; pos < end; ++pos) {
      if (in_class(pos) != in_class(pos - 1)) pieces.add(pos);
    }
    pieces.add(end);
    ini = end;
  }
}

// [0-9][0-9][0-9]: leftmost non-overlapping triples of ASCII digits.
void split_ascii_digit_triples(const uint32_t* cpts, const std::vector<uint32_t>& in,
                               std::vector<uint32_t>* out) {
  auto digit = [&](size_t p) { return cpts[p] >= '0' && cpts[p] <= '9'; };
  size_t ini = 0;
  for (uint32_t piece_len : in) {
    const size_t end = ini + piece_len;
    Pieces pieces{out, ini};
    size_t pos = ini;
    while (pos + 3 <= end) {
      if (digit(pos) && digit(pos + 1) && digit(pos + 2)) {
        pieces.add(pos);
        pieces.add(pos + 3);
        pos += 3;
      } else {
        ++pos;
      }
    }
    pieces.add(end);
    ini = end;
  }
}

// C|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_digits}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// with `letters` as the letter class (\p{L}, or \p{L} and \p{M} for Qwen35). Contractions fold
// only ASCII case, as the regex's [sS] classes do.
void split_llama3(const uint32_t* cpts, const uint8_t* flags, const std::vector<uint32_t>& in,
                  std::vector<uint32_t>* out, size_t max_digits, uint8_t letters) {
  const uint8_t not_punct = kCptWhitespace | letters | kCptNumber;
  size_t ini = 0;
  for (uint32_t piece_len : in) {
    const size_t end = ini + piece_len;
    Pieces pieces{out, ini};
    auto flag_at = [&](size_t p) -> uint8_t { return p < end ? flags[p] : 0; };
    auto lower_at = [&](size_t p) -> uint32_t {
      const uint32_t c = cpts[p];
      return c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c;
    };
    auto newline = [&](size_t p) { return p < end && (cpts[p] == '\r' || cpts[p] == '\n'); };
    size_t pos = ini;
    while (pos < end) {
      const uint32_t c = cpts[pos];
      const uint8_t f = flags[pos];
      if (c == '\'' && pos + 1 < end) {
        const uint32_t c1 = lower_at(pos + 1);
        if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
          pos += pieces.add(pos + 2);
          continue;
        }
        if (pos + 2 < end) {
          const uint32_t c2 = lower_at(pos + 2);
          if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
            pos += pieces.add(pos + 3);
            continue;
          }
        }
      }
      // An optional non-letter, non-number, non-newline prefix, then letters.
      if (!newline(pos) && !(f & kCptNumber) && ((f & letters) || (flag_at(pos + 1) & letters))) {
        ++pos;
        while (flag_at(pos) & letters) ++pos;
        pieces.add(pos);
        continue;
      }
      if (f & kCptNumber) {
        for (size_t n = 0; n < max_digits && (flag_at(pos) & kCptNumber); ++n) ++pos;
        pieces.add(pos);
        continue;
      }
      // " ?[^\s\p{L}\p{N}]+[\r\n]*": the optional space is classified by the character after it.
      const bool space = c == ' ';
      if ((!space || pos + 1 < end) && !((space ? flags[pos + 1] : f) & not_punct)) {
        pos += space;
        while (pos < end && !(flags[pos] & not_punct)) ++pos;
        while (newline(pos)) ++pos;
        pieces.add(pos);
        continue;
      }
      // Whitespace: up to the last newline of the run if it has one (\s*[\r\n]+), else all but
      // the last character when more text follows (\s+(?!\S)), else the whole run.
      size_t n_ws = 0, past_newline = 0;
      for (; pos + n_ws < end && (flags[pos + n_ws] & kCptWhitespace); ++n_ws)
        if (newline(pos + n_ws)) past_newline = pos + n_ws + 1;
      if (past_newline > 0) {
        pos = past_newline;
      } else if (n_ws > 1 && pos + n_ws < end) {
        pos += n_ws - 1;
      } else {
        pos += n_ws > 0 ? n_ws : 1;
      }
      pieces.add(pos);
    }
    ini = end;
  }
}

// The leftmost-first matches of one regex in every piece, as std::regex_iterator finds them:
// `match(pos, end)` is the length of the match starting at pos (0 for none); the text between
// matches becomes pieces too.
template <class Match>
void split_matches(const std::vector<uint32_t>& in, std::vector<uint32_t>* out, Match match) {
  size_t ini = 0;
  for (uint32_t piece_len : in) {
    const size_t end = ini + piece_len;
    Pieces pieces{out, ini};
    for (size_t pos = ini; pos < end;) {
      const size_t len = match(pos, end);
      if (len == 0) {
        ++pos;
        continue;
      }
      pieces.add(pos);
      pos += pieces.add(pos + len);
    }
    pieces.add(end);
    ini = end;
  }
}

// \s?[class]+ for a class without whitespace.
template <class InClass>
auto space_then_run(const uint8_t* flags, InClass in_class) {
  return [flags, in_class](size_t pos, size_t end) -> size_t {
    size_t p = pos;
    if ((flags[p] & kCptWhitespace) && p + 1 < end && in_class(p + 1)) ++p;
    if (!in_class(p)) return 0;
    while (p < end && in_class(p)) ++p;
    return p - pos;
  };
}

// \s+$: the whitespace that ends each piece.
void split_trailing_space(const uint8_t* flags, const std::vector<uint32_t>& in,
                          std::vector<uint32_t>* out) {
  size_t ini = 0;
  for (uint32_t piece_len : in) {
    const size_t end = ini + piece_len;
    size_t begin = end;
    while (begin > ini && (flags[begin - 1] & kCptWhitespace)) --begin;
    Pieces pieces{out, ini};
    pieces.add(begin);
    pieces.add(end);
    ini = end;
  }
}

struct CptRange {
  uint32_t lo, hi;  // inclusive
};
bool in_ranges(uint32_t c, const CptRange* begin, const CptRange* end) {
  for (const CptRange* r = begin; r != end; ++r)
    if (c >= r->lo && c <= r->hi) return true;
  return false;
}

// [一-龥ࠀ-一가-퟿]: CJK ideographs, U+0800 up to them, Hangul syllables. The range holds
// spaces (U+2000...), which std::wregex sees as U+000B and so never matches.
bool is_deepseek_cjk(uint32_t c, uint8_t flags) {
  return ((c >= 0x0800 && c <= 0x9FA5) || (c >= 0xAC00 && c <= 0xD7FF)) &&
         !(flags & kCptWhitespace);
}

// DeepSeek LLM's letter class (the ranges of its tokenizer.json regex): Latin, Greek, Cyrillic,
// Armenian, Georgian, Cherokee and a few other cased scripts.
constexpr CptRange kDeepseekLetters[] = {
    {0x41, 0x5A},       {0x61, 0x7A},       {0xB5, 0xB5},       {0xC0, 0xD6},
    {0xD8, 0xF6},       {0xF8, 0x1BA},      {0x1BC, 0x1BF},     {0x1C4, 0x293},
    {0x295, 0x2AF},     {0x370, 0x373},     {0x376, 0x377},     {0x37B, 0x37D},
    {0x37F, 0x37F},     {0x386, 0x386},     {0x388, 0x38A},     {0x38C, 0x38C},
    {0x38E, 0x3A1},     {0x3A3, 0x3F5},     {0x3F7, 0x481},     {0x48A, 0x52F},
    {0x531, 0x556},     {0x10A0, 0x10C5},   {0x13A0, 0x13F5},   {0x13F8, 0x13FD},
    {0x1C90, 0x1CBA},   {0x1CBD, 0x1CBF},   {0x1D00, 0x1D2B},   {0x1D6B, 0x1D77},
    {0x1D79, 0x1D9A},   {0x1E00, 0x1F15},   {0x1F18, 0x1F1D},   {0x1F20, 0x1F45},
    {0x1F48, 0x1F4D},   {0x1F50, 0x1F57},   {0x1F59, 0x1F59},   {0x1F5B, 0x1F5B},
    {0x1F5D, 0x1F5D},   {0x1F5F, 0x1F7D},   {0x1F80, 0x1FB4},   {0x1FB6, 0x1FBC},
    {0x1FBE, 0x1FBE},   {0x1FC2, 0x1FC4},   {0x1FC6, 0x1FCC},   {0x1FD0, 0x1FD3},
    {0x1FD6, 0x1FDB},   {0x1FE0, 0x1FEC},   {0x1FF2, 0x1FF4},   {0x1FF6, 0x1FFC},
    {0x2102, 0x2102},   {0x2107, 0x2107},   {0x210A, 0x2113},   {0x2115, 0x2115},
    {0x2119, 0x211D},   {0x2124, 0x2124},   {0x2126, 0x2126},   {0x2128, 0x2128},
    {0x212A, 0x212D},   {0x212F, 0x2134},   {0x2139, 0x2139},   {0x213C, 0x213F},
    {0x2145, 0x2149},   {0x214E, 0x214E},   {0x2183, 0x2184},   {0x2C00, 0x2C7B},
    {0x2C7E, 0x2CE4},   {0x2CEB, 0x2CEE},   {0x2CF2, 0x2CF3},   {0xA640, 0xA66D},
    {0xA680, 0xA69B},   {0xA722, 0xA76F},   {0xA771, 0xA787},   {0xA78B, 0xA78E},
    {0xAB70, 0xABBF},   {0xFB00, 0xFB06},   {0xFB13, 0xFB17},   {0xFF21, 0xFF3A},
    {0xFF41, 0xFF5A},   {0x10400, 0x1044F}, {0x104B0, 0x104D3}, {0x104D8, 0x104FB},
    {0x10C80, 0x10CB2}, {0x10CC0, 0x10CF2}, {0x118A0, 0x118DF}, {0x1E900, 0x1E943},
};
// [!-/:-~！-／：-～‘-‟　-。]
constexpr CptRange kDeepseekPunct[] = {
    {0x21, 0x2F},     {0x3A, 0x7E},     {0xFF01, 0xFF0F},
    {0xFF1A, 0xFF5E}, {0x2018, 0x201F}, {0x3000, 0x3002},
};

void split_deepseek(bool coder, const uint32_t* cpts, const uint8_t* flags,
                    std::vector<uint32_t>* word_lens, std::vector<uint32_t>& a,
                    std::vector<uint32_t>& b) {
  auto newline = [&](size_t p) { return cpts[p] == '\r' || cpts[p] == '\n'; };
  split_matches(a, &b, [&](size_t p, size_t) -> size_t { return newline(p) ? 1 : 0; });
  a.clear();
  if (coder) {
    split_matches(b, &a,
                  space_then_run(flags, [&](size_t p) { return (flags[p] & kCptLetter) != 0; }));
    b.clear();
    split_matches(a, &b,
                  space_then_run(flags, [&](size_t p) { return (flags[p] & kCptPunct) != 0; }));
  } else {
    split_matches(b, &a, space_then_run(flags, [&](size_t p) {
                    return in_ranges(cpts[p], std::begin(kDeepseekLetters),
                                     std::end(kDeepseekLetters));
                  }));
    b.clear();
    // Non-ASCII whitespace is U+000B to std::wregex, so it is never in the punctuation ranges.
    split_matches(a, &b, space_then_run(flags, [&](size_t p) {
                    return !(cpts[p] > 0x7F && (flags[p] & kCptWhitespace)) &&
                           in_ranges(cpts[p], std::begin(kDeepseekPunct), std::end(kDeepseekPunct));
                  }));
    a.clear();
    split_trailing_space(flags, b, &a);
    b.swap(a);
  }
  a.clear();
  split_runs(b, &a, [&](size_t p) { return is_deepseek_cjk(cpts[p], flags[p]); });
  if (coder) {
    split_each_number(flags, a, word_lens);
  } else {
    split_runs(a, word_lens, [&](size_t p) { return (flags[p] & kCptNumber) != 0; });
  }
}

}  // namespace

void pretokenize(PreKind kind, const uint32_t* cpts, const uint8_t* flags, size_t n,
                 std::vector<uint32_t>* word_lens, std::vector<uint32_t>* scratch) {
  if (n == 0) return;
  // Stages ping-pong between `a` and `b`; the last one writes the caller's vector.
  std::vector<uint32_t>& a = *scratch;
  std::vector<uint32_t> b;
  a.assign(1, static_cast<uint32_t>(n));
  switch (kind) {
    case PreKind::Gpt2:
      split_gpt2(cpts, flags, a, word_lens);
      break;
    case PreKind::Smollm:
      b.reserve(n / 2 + 1);
      split_each_number(flags, a, &b);
      split_gpt2(cpts, flags, b, word_lens);
      break;
    case PreKind::Default:
    case PreKind::Falcon: {
      const bool falcon = kind == PreKind::Falcon;
      auto punct = [&](size_t p) {
        const uint32_t c = cpts[p];
        return (flags[p] & kCptPunct) || c == '$' || c == '+' || c == '<' || c == '=' || c == '>' ||
               c == '^' || c == '~' || c == '|' || (falcon && c == '`');
      };
      split_runs(a, &b, punct);
      a.clear();
      split_gpt2(cpts, flags, b, &a);
      b.clear();
      if (falcon) {
        split_ascii_digit_triples(cpts, a, word_lens);
        break;
      }
      split_runs(a, &b, [&](size_t p) { return (flags[p] & kCptNumber) != 0; });
      split_ascii_digit_triples(cpts, b, word_lens);
      break;
    }
    case PreKind::Llama3:
      split_llama3(cpts, flags, a, word_lens, 3, kCptLetter);
      break;
    case PreKind::Qwen2:
      split_llama3(cpts, flags, a, word_lens, 1, kCptLetter);
      break;
    case PreKind::Qwen35:
      split_llama3(cpts, flags, a, word_lens, 1, kCptLetter | kCptMark);
      break;
    case PreKind::DeepseekLlm:
    case PreKind::DeepseekCoder:
      split_deepseek(kind == PreKind::DeepseekCoder, cpts, flags, word_lens, a, b);
      break;
    case PreKind::Newlines:
      split_runs(a, word_lens, [&](size_t p) { return cpts[p] == '\n'; });
      break;
  }
}

}  // namespace kvlm::tok
