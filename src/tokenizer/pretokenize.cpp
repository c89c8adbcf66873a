#include "tokenizer/pretokenize.h"

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <string_view>

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

// '[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD] at pos: its length, or 0. Only ASCII
// case folds, as in the regexes' [sS] classes.
size_t contraction_len(const uint32_t* cpts, size_t pos, size_t end) {
  if (pos + 1 >= end || cpts[pos] != '\'') return 0;
  auto lower = [&](size_t p) -> uint32_t {
    const uint32_t c = cpts[p];
    return c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c;
  };
  const uint32_t c1 = lower(pos + 1);
  if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return 2;
  if (pos + 2 >= end) return 0;
  const uint32_t c2 = lower(pos + 2);
  return (c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l') ? 3 : 0;
}

bool is_newline(uint32_t c) {
  return c == '\r' || c == '\n';
}

// !-/ :-@ [-` {-~: ASCII punctuation and symbols.
bool is_ascii_punct(uint32_t c) {
  return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x60) ||
         (c >= 0x7B && c <= 0x7E);
}

// The whitespace run at pos: its length and the length up to its last newline (0 when none).
struct SpaceRun {
  size_t n = 0, past_newline = 0;
};
SpaceRun space_run(const uint32_t* cpts, const uint8_t* flags, size_t pos, size_t end) {
  SpaceRun r;
  for (; pos + r.n < end && (flags[pos + r.n] & kCptWhitespace); ++r.n)
    if (is_newline(cpts[pos + r.n])) r.past_newline = r.n + 1;
  return r;
}

// The whitespace alternatives that close most regex lists, at pos (0 when pos is not
// whitespace): with `newline_runs`, \s*[\r\n]+ (the run up to its last newline, when it has one);
// then \s+(?!\S) (all but the last character when more text follows in the piece), then \s+.
size_t whitespace_len(const uint32_t* cpts, const uint8_t* flags, size_t pos, size_t end,
                      bool newline_runs) {
  const SpaceRun r = space_run(cpts, flags, pos, end);
  if (newline_runs && r.past_newline > 0) return r.past_newline;
  return r.n > 1 && pos + r.n < end ? r.n - 1 : r.n;
}

// Jais 2's whitespace: \s*[\r\n]+, then the first of \s{512}, \s{256} ... \s{4}, \s{1,2} that
// is not followed by non-whitespace, then \s{1}.
size_t jais2_whitespace_len(const uint32_t* cpts, const uint8_t* flags, size_t pos, size_t end) {
  const SpaceRun r = space_run(cpts, flags, pos, end);
  if (r.past_newline > 0 || r.n == 0) return r.past_newline;
  // \s{k}(?!\S): k characters of the run, then whitespace or the end of the piece.
  auto fits = [&](size_t k) { return k < r.n || (k == r.n && pos + r.n == end); };
  for (size_t k = 512; k >= 4; k /= 2)
    if (fits(k)) return k;
  return fits(2) ? 2 : 1;
}

// C|[^\r\n\p{L}\p{N}]?L+|\p{N}{1,max_digits}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// and its relatives (see WordRegex), at pos; every character matches one alternative.
struct WordRegex {
  uint8_t letters = kCptLetter;      // L: \p{L}, or \p{L} and \p{M} (Qwen 3.5)
  size_t max_digits = 3;             // SIZE_MAX for \p{N}+
  bool contractions = true;          // the leading C alternative
  bool suffix_contractions = false;  // L+ C? instead (Kimi K2)
  bool exclude_han = false;          // Han is not in L (Kimi K2 splits it off first)
  bool punct_newlines = true;        // [\r\n]* after the punctuation run (Seed-Coder: no)
  bool jais2_spaces = false;         // Jais 2's whitespace alternatives
  // EXAONE MoE: words are (\p{L}\p{M}*(?: \p{L}\p{M}*)*)+, so marks and single spaces between
  // letters stay inside ("hello world" is one word), and [\r\n/]? follows punctuation.
  bool exaone = false;
};

// Kimi K2's \p{Han}: CJK ideographs with extensions A-F and the compatibility blocks.
bool is_han(uint32_t c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) ||
         (c >= 0x20000 && c <= 0x2A6DF) || (c >= 0x2A700 && c <= 0x2EBEF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

size_t match_word(const uint32_t* cpts, const uint8_t* flags, size_t pos, size_t end,
                  const WordRegex& re) {
  const uint8_t f = flags[pos];
  auto letter = [&](size_t p) {
    return p < end && (flags[p] & re.letters) && !(re.exclude_han && is_han(cpts[p]));
  };
  if (re.contractions)
    if (const size_t len = contraction_len(cpts, pos, end); len > 0) return len;
  // An optional non-letter, non-number, non-newline prefix, then letters.
  if (letter(pos) ||
      (!is_newline(cpts[pos]) && !(f & (kCptLetter | kCptNumber)) && letter(pos + 1))) {
    size_t p = pos + 1;
    if (re.exaone) {
      for (;;) {
        while (p < end && (flags[p] & kCptMark)) ++p;
        if (letter(p)) {
          ++p;
        } else if (p < end && cpts[p] == ' ' && letter(p + 1)) {
          p += 2;
        } else {
          break;
        }
      }
    }
    while (letter(p)) ++p;
    if (re.suffix_contractions) p += contraction_len(cpts, p, end);
    return p - pos;
  }
  if (f & kCptNumber) {
    size_t p = pos;
    while (p - pos < re.max_digits && p < end && (flags[p] & kCptNumber)) ++p;
    return p - pos;
  }
  // " ?[^\s\p{L}\p{N}]+[\r\n]*": the optional space is classified by the character after it.
  const uint8_t not_punct = kCptWhitespace | kCptLetter | re.letters | kCptNumber;
  auto punct = [&](size_t p) { return p < end && !(flags[p] & not_punct); };
  if (size_t p = pos + (cpts[pos] == ' '); punct(p)) {
    while (punct(p)) ++p;
    if (re.exaone) {
      p += p < end && (is_newline(cpts[p]) || cpts[p] == '/');
    } else if (re.punct_newlines) {
      while (p < end && is_newline(cpts[p])) ++p;
    }
    return p - pos;
  }
  const size_t len = re.jais2_spaces ? jais2_whitespace_len(cpts, flags, pos, end)
                                     : whitespace_len(cpts, flags, pos, end, true);
  return len > 0 ? len : 1;
}

// GPT-4o's regex and its relatives (see CasedRegex), as llama.cpp runs them: through std::regex
// on text where every non-ASCII codepoint stands for its category, so the case classes
// ((?=[\p{L}])[^a-z] and (?=[\p{L}])[^A-Z]) see ASCII case only and a non-ASCII letter is both:
//   P?U*L+C?|P?U+L*C?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
// with P = [^\r\n\p{L}\p{N}], U = a letter but not a-z, L = a letter but not A-Z, C a
// contraction. The alternatives are tried in order with backtracking, so U*L+ gives back
// uppercase letters until a lowercase one can start L+ ("ÉCOLE" -> "É", "COLE").
struct CasedRegex {
  uint8_t letters = kCptLetter;  // the class the lookaheads test (granite-embed adds \p{M})
  bool case_split = true;        // false: U and L are both the whole class (Tiny Aya)
  bool contractions = true;      // C? after each word (Tekken: none)
  size_t max_digits = 3;
};

size_t match_cased(const uint32_t* cpts, const uint8_t* flags, size_t pos, size_t end,
                   const CasedRegex& re) {
  auto letter = [&](size_t p) { return p < end && (flags[p] & re.letters); };
  auto upper = [&](size_t p) {
    return letter(p) && !(re.case_split && cpts[p] >= 'a' && cpts[p] <= 'z');
  };
  auto lower = [&](size_t p) {
    return letter(p) && !(re.case_split && cpts[p] >= 'A' && cpts[p] <= 'Z');
  };
  auto finish = [&](size_t p) {
    return (re.contractions ? p + contraction_len(cpts, p, end) : p) - pos;
  };
  // U*L+ from s: U* backs off until L+ can start; 0 when it never can.
  auto upper_lower = [&](size_t s) -> size_t {
    size_t u = s;
    while (upper(u)) ++u;
    for (size_t k = u + 1; k-- > s;) {
      if (!lower(k)) continue;
      while (lower(k)) ++k;
      return finish(k);
    }
    return 0;
  };
  auto upper_then_lower = [&](size_t s) -> size_t {
    if (!upper(s)) return 0;
    size_t p = s;
    while (upper(p)) ++p;
    while (lower(p)) ++p;
    return finish(p);
  };
  const uint8_t f = flags[pos];
  // P? is greedy: each word alternative is tried with the prefix taken, then without it.
  const bool prefix = !is_newline(cpts[pos]) && !(f & (kCptLetter | kCptNumber));
  if (prefix)
    if (const size_t len = upper_lower(pos + 1); len > 0) return len;
  if (const size_t len = upper_lower(pos); len > 0) return len;
  if (prefix)
    if (const size_t len = upper_then_lower(pos + 1); len > 0) return len;
  if (const size_t len = upper_then_lower(pos); len > 0) return len;
  if (f & kCptNumber) {
    size_t p = pos;
    while (p - pos < re.max_digits && p < end && (flags[p] & kCptNumber)) ++p;
    return p - pos;
  }
  constexpr uint8_t kNotPunct = kCptWhitespace | kCptLetter | kCptNumber;
  auto punct = [&](size_t p) { return p < end && !(flags[p] & kNotPunct); };
  if (size_t p = pos + (cpts[pos] == ' '); punct(p)) {
    while (punct(p)) ++p;
    while (p < end && (is_newline(cpts[p]) || cpts[p] == '/')) ++p;
    return p - pos;
  }
  const size_t len = whitespace_len(cpts, flags, pos, end, true);
  return len > 0 ? len : 1;
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

// \p{N}{1,3} as a regex of its own (not an alternative): leftmost runs of up to three numbers.
size_t number_triple_len(const uint8_t* flags, size_t pos, size_t end) {
  size_t p = pos;
  while (p - pos < 3 && p < end && (flags[p] & kCptNumber)) ++p;
  return p - pos;
}

// Cuts inside maximal runs of `in_run` characters: cuts(run_begin, run_end, pieces) adds them.
template <class InRun, class Cuts>
void split_inside_runs(const std::vector<uint32_t>& in, std::vector<uint32_t>* out, InRun in_run,
                       Cuts cuts) {
  size_t ini = 0;
  for (uint32_t piece_len : in) {
    const size_t end = ini + piece_len;
    Pieces pieces{out, ini};
    for (size_t pos = ini; pos < end;) {
      if (!in_run(pos)) {
        ++pos;
        continue;
      }
      size_t run_end = pos;
      while (run_end < end && in_run(run_end)) ++run_end;
      cuts(pos, run_end, pieces);
      pos = run_end;
    }
    pieces.add(end);
    ini = end;
  }
}

// Runs of numbers cut into threes from the right, the leftover 1-2 first ("1234567" -> "1",
// "234", "567"): llama.cpp's handler for AFMoE's digits and Tiny Aya's \d{1,3}(?=(?:\d{3})*\b).
// It cuts only after each group, so the text before a run joins its first group ("ab12345" ->
// "ab12", "345").
void split_number_groups(const uint8_t* flags, const std::vector<uint32_t>& in,
                         std::vector<uint32_t>* out) {
  split_inside_runs(
      in, out, [&](size_t p) { return (flags[p] & kCptNumber) != 0; },
      [](size_t begin, size_t end, Pieces& pieces) {
        const size_t first = (end - begin) % 3 == 0 ? 3 : (end - begin) % 3;
        for (size_t cut = begin + first; cut <= end; cut += 3) pieces.add(cut);
      });
}

// SuperBPE's (?=(\d{3})+(?!\d)): an empty match wherever the ASCII digits from there to the next
// non-digit are a positive multiple of three, each one a cut ("1234567" -> "1", "234", "567";
// std::regex's \d is ASCII only).
void split_superbpe_digits(const uint32_t* cpts, const std::vector<uint32_t>& in,
                           std::vector<uint32_t>* out) {
  split_inside_runs(
      in, out, [&](size_t p) { return cpts[p] >= '0' && cpts[p] <= '9'; },
      [](size_t begin, size_t end, Pieces& pieces) {
        for (size_t p = begin; p < end; ++p)
          if ((end - p) % 3 == 0) pieces.add(p);
      });
}

// Bloom's  ?[^(\s|.,!?…。，、।۔،)]+  (the parentheses and the bar are members of the class).
size_t match_bloom(const uint32_t* cpts, const uint8_t* flags, size_t pos, size_t end) {
  constexpr uint32_t kOutside[] = {'(',    ')',    '|',    '.',    ',',    '!',    '?',
                                   0x2026, 0x3002, 0xFF0C, 0x3001, 0x0964, 0x06D4, 0x060C};
  auto member = [&](size_t p) {
    return p < end && !(flags[p] & kCptWhitespace) &&
           std::find(std::begin(kOutside), std::end(kOutside), cpts[p]) == std::end(kOutside);
  };
  size_t p = pos + (cpts[pos] == ' ');
  if (!member(p)) return 0;
  while (member(p)) ++p;
  return p - pos;
}

// Whether the ASCII text `lit` is at pos.
bool literal_at(const uint32_t* cpts, size_t pos, size_t end, std::string_view lit) {
  if (end - pos < lit.size()) return false;
  for (size_t i = 0; i < lit.size(); ++i)
    if (cpts[pos + i] != static_cast<uint8_t>(lit[i])) return false;
  return true;
}

// Chameleon's first three regexes, tried in turn: <sentinel:[0-9]+>, then image tokens
// IMGIMG[A-I]{1,4}Z, then ([\t\n]|    |  ).
size_t match_sentinel(const uint32_t* cpts, size_t pos, size_t end) {
  constexpr std::string_view kOpen = "<sentinel:";
  if (!literal_at(cpts, pos, end, kOpen)) return 0;
  size_t p = pos + kOpen.size();
  const size_t digits = p;
  while (p < end && cpts[p] >= '0' && cpts[p] <= '9') ++p;
  return p > digits && p < end && cpts[p] == '>' ? p + 1 - pos : 0;
}
size_t match_image_token(const uint32_t* cpts, size_t pos, size_t end) {
  constexpr std::string_view kOpen = "IMGIMG";
  if (!literal_at(cpts, pos, end, kOpen)) return 0;
  size_t p = pos + kOpen.size();
  const size_t letters = p;
  while (p < end && cpts[p] >= 'A' && cpts[p] <= 'I') ++p;
  // [A-I]{1,4} backtracks, but Z is not in A-I, so only the whole run can precede it.
  const size_t n = p - letters;
  return n >= 1 && n <= 4 && p < end && cpts[p] == 'Z' ? p + 1 - pos : 0;
}
size_t match_chameleon_space(const uint32_t* cpts, size_t pos, size_t end) {
  if (cpts[pos] == '\t' || cpts[pos] == '\n') return 1;
  size_t n = 0;
  while (n < 4 && pos + n < end && cpts[pos + n] == ' ') ++n;
  return n == 4 ? 4 : n >= 2 ? 2 : 0;
}

// The last regex of DeepSeek V3's list (and AFMoE's, Spark 2.5's with the two options off):
//   [ASCII punctuation][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|
//   \s*[\r\n]+|\s+(?!\S)|\s+
// Spark 2.5 has no [\r\n]* after punctuation and [\r\n] in place of \s*[\r\n]+. Characters none
// of these match (control characters, numbers left whole by the earlier regexes) stay between.
size_t match_ds3(const uint32_t* cpts, const uint8_t* flags, size_t pos, size_t end, bool spark) {
  const uint32_t c = cpts[pos];
  const uint8_t f = flags[pos];
  auto ascii_letter = [&](size_t p) {
    return p < end && ((cpts[p] >= 'a' && cpts[p] <= 'z') || (cpts[p] >= 'A' && cpts[p] <= 'Z'));
  };
  size_t p = pos + 1;
  if (is_ascii_punct(c) && ascii_letter(p)) {
    while (ascii_letter(p)) ++p;
    return p - pos;
  }
  auto letter_mark = [&](size_t q) { return q < end && (flags[q] & (kCptLetter | kCptMark)); };
  if (letter_mark(pos) ||
      (!is_newline(c) && !(f & (kCptLetter | kCptPunct | kCptSymbol)) && letter_mark(p))) {
    while (letter_mark(p)) ++p;
    return p - pos;
  }
  auto punct = [&](size_t q) { return q < end && (flags[q] & (kCptPunct | kCptSymbol)); };
  if (p = pos + (c == ' '); punct(p)) {
    while (punct(p)) ++p;
    if (!spark)
      while (p < end && is_newline(cpts[p])) ++p;
    return p - pos;
  }
  if (spark && is_newline(c)) return 1;
  return whitespace_len(cpts, flags, pos, end, !spark);
}

// DeepSeek V3 (and Spark 2.5): \p{N}{1,3}, then [一-龥぀-ゟ゠-ヿ]+, then match_ds3.
void split_deepseek3(bool spark, const uint32_t* cpts, const uint8_t* flags,
                     std::vector<uint32_t>* word_lens, std::vector<uint32_t>& a,
                     std::vector<uint32_t>& b) {
  split_matches(a, &b, [&](size_t p, size_t e) { return number_triple_len(flags, p, e); });
  a.clear();
  split_runs(b, &a, [&](size_t p) {
    const uint32_t c = cpts[p];
    return (c >= 0x4E00 && c <= 0x9FA5) || (c >= 0x3040 && c <= 0x30FF);
  });
  auto last = [&](size_t p, size_t e) { return match_ds3(cpts, flags, p, e, spark); };
  if (!spark) {
    split_matches(a, word_lens, last);
    return;
  }
  b.clear();
  split_matches(a, &b, last);
  split_each_number(flags, b, word_lens);
}

// AFMoE's scripts regex: CJK (with extension A), kana, halfwidth katakana, Kangxi radicals, Thai
// from U+0E40, Lao, Khmer, Myanmar (with extensions A and B), Hangul. The compatibility
// ideographs' range starts at U+8C48 in llama.cpp's source (豈 in its unified form, not U+F900),
// so it runs on to U+FAFF over Hangul and the private use area.
constexpr CptRange kAfmoeScripts[] = {
    {0x4E00, 0x9FFF}, {0x3400, 0x4DBF}, {0x8C48, 0xFAFF}, {0x3040, 0x30FF}, {0xFF65, 0xFF9F},
    {0x2F00, 0x2FDF}, {0x0E40, 0x0EFF}, {0x1780, 0x17FF}, {0x1000, 0x109F}, {0xAA60, 0xAA7F},
    {0xA9E0, 0xA9FF}, {0xAC00, 0xD7AF}, {0x1100, 0x11FF},
};

// Chameleon: sentinels, image tokens, tabs/newlines/space pairs, each number, each punctuation
// character (\p{P} and all ASCII punctuation), then GPT-2's regex.
void split_chameleon(const uint32_t* cpts, const uint8_t* flags, std::vector<uint32_t>* word_lens,
                     std::vector<uint32_t>& a, std::vector<uint32_t>& b) {
  split_matches(a, &b, [&](size_t p, size_t e) { return match_sentinel(cpts, p, e); });
  a.clear();
  split_matches(b, &a, [&](size_t p, size_t e) { return match_image_token(cpts, p, e); });
  b.clear();
  split_matches(a, &b, [&](size_t p, size_t e) { return match_chameleon_space(cpts, p, e); });
  a.clear();
  split_each_number(flags, b, &a);
  b.clear();
  split_matches(a, &b, [&](size_t p, size_t) -> size_t {
    return is_ascii_punct(cpts[p]) || (flags[p] & kCptPunct) ? 1 : 0;
  });
  split_gpt2(cpts, flags, b, word_lens);
}

// Youtu's first regex:
// [가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+,
// the class (1-4) of a codepoint or 0. The classes are disjoint, so its matches are the runs of one
// class.
int youtu_script(uint32_t c) {
  if ((c >= 0xAC00 && c <= 0xD7A3) || (c >= 0x3131 && c <= 0x318E)) return 1;
  constexpr uint32_t kPunct[] = {0xFF01, 0x2026, 0x201C, 0x201D, 0x2018,
                                 0x2019, 0x2014, 0xFF1A, 0xFF1B, 0xFF0C};
  if ((c >= 0x3001 && c <= 0x303F) || (c >= 0xFE30 && c <= 0xFE4F) ||
      std::find(std::begin(kPunct), std::end(kPunct), c) != std::end(kPunct))
    return 2;
  if (c >= 0x3105 && c <= 0x312F) return 3;
  if ((c >= 0x4E00 && c <= 0x9FA5) || (c >= 0x3040 && c <= 0x30FF)) return 4;
  return 0;
}

// The options of each kind that match_word / match_cased serve.
WordRegex word_regex(PreKind kind) {
  WordRegex re;
  switch (kind) {
    case PreKind::Qwen2:
    case PreKind::Laguna:
      re.max_digits = 1;
      break;
    case PreKind::Qwen35:
      re.max_digits = 1;
      re.letters = kCptLetter | kCptMark;
      break;
    case PreKind::SeedCoder:
      re.max_digits = 1;
      re.punct_newlines = false;
      break;
    case PreKind::Ufakzeka:
      re.max_digits = 1;
      re.contractions = false;
      break;
    case PreKind::Minicpm5:
      re.max_digits = SIZE_MAX;
      break;
    case PreKind::Jais2:
      re.jais2_spaces = true;
      break;
    case PreKind::ExaoneMoe:
      re.max_digits = 1;
      re.exaone = true;
      break;
    case PreKind::KimiK2:
      re.contractions = false;
      re.suffix_contractions = true;
      re.exclude_han = true;
      break;
    default:
      break;
  }
  return re;
}

CasedRegex cased_regex(PreKind kind) {
  CasedRegex re;
  if (kind == PreKind::Tekken) {
    re.contractions = false;
    re.max_digits = 1;
  } else if (kind == PreKind::GraniteEmbMulti) {
    re.letters = kCptLetter | kCptMark;
  } else if (kind == PreKind::TinyAya || kind == PreKind::Youtu) {
    re.letters = kCptLetter | kCptMark;
    re.case_split = false;
    if (kind == PreKind::Youtu) re.max_digits = 1;
  }
  return re;
}

size_t han_run_len(const uint32_t* cpts, size_t pos, size_t end) {
  size_t p = pos;
  while (p < end && is_han(cpts[p])) ++p;
  return p - pos;
}

// The default list and Falcon's: punctuation runs, GPT-2's regex, (default only) number runs,
// then ASCII digit triples.
void split_default(bool falcon, const uint32_t* cpts, const uint8_t* flags,
                   std::vector<uint32_t>* word_lens, std::vector<uint32_t>& a,
                   std::vector<uint32_t>& b) {
  auto punct = [&](size_t p) {
    const uint32_t c = cpts[p];
    return (flags[p] & kCptPunct) || c == '$' || c == '+' || c == '<' || c == '=' || c == '>' ||
           c == '^' || c == '~' || c == '|' || (falcon && c == '`');
  };
  split_runs(a, &b, punct);
  a.clear();
  split_gpt2(cpts, flags, b, &a);
  if (falcon) {
    split_ascii_digit_triples(cpts, a, word_lens);
    return;
  }
  b.clear();
  split_runs(a, &b, [&](size_t p) { return (flags[p] & kCptNumber) != 0; });
  split_ascii_digit_triples(cpts, b, word_lens);
}

// The regex lists built on match_word: Llama 3's regex and its relatives, Kimi K2's Han runs
// alongside them, and MiniCPM 5's and Laguna's regex before them.
void split_words(PreKind kind, const uint32_t* cpts, const uint8_t* flags,
                 std::vector<uint32_t>* word_lens, std::vector<uint32_t>& a,
                 std::vector<uint32_t>& b) {
  if (kind == PreKind::Minicpm5) {
    split_matches(a, &b, [&](size_t p, size_t e) { return number_triple_len(flags, p, e); });
    a.swap(b);
  } else if (kind == PreKind::Laguna) {
    split_runs(a, &b, [&](size_t p) { return cpts[p] == '\n'; });
    a.swap(b);
  }
  const WordRegex re = word_regex(kind);
  const bool han_runs = kind == PreKind::KimiK2;
  split_matches(a, word_lens, [&](size_t p, size_t e) {
    return han_runs && is_han(cpts[p]) ? han_run_len(cpts, p, e)
                                       : match_word(cpts, flags, p, e, re);
  });
}

// AFMoE: llama.cpp's digit groups, then its scripts regex, then DeepSeek V3's last regex.
void split_afmoe(const uint32_t* cpts, const uint8_t* flags, std::vector<uint32_t>* word_lens,
                 std::vector<uint32_t>& a, std::vector<uint32_t>& b) {
  split_number_groups(flags, a, &b);
  a.clear();
  split_runs(b, &a, [&](size_t p) {
    return in_ranges(cpts[p], std::begin(kAfmoeScripts), std::end(kAfmoeScripts));
  });
  split_matches(a, word_lens,
                [&](size_t p, size_t e) { return match_ds3(cpts, flags, p, e, false); });
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
    case PreKind::Falcon:
      split_default(kind == PreKind::Falcon, cpts, flags, word_lens, a, b);
      break;
    case PreKind::Llama3:
    case PreKind::Qwen2:
    case PreKind::Qwen35:
    case PreKind::SeedCoder:
    case PreKind::Ufakzeka:
    case PreKind::Jais2:
    case PreKind::KimiK2:
    case PreKind::Minicpm5:
    case PreKind::Laguna:
    case PreKind::ExaoneMoe:
      split_words(kind, cpts, flags, word_lens, a, b);
      break;
    case PreKind::Gpt4o:
    case PreKind::Tekken:
    case PreKind::GraniteEmbMulti:
    case PreKind::TinyAya:
    case PreKind::Youtu:
      if (kind == PreKind::TinyAya) {
        split_number_groups(flags, a, &b);
        a.swap(b);
      } else if (kind == PreKind::Youtu) {
        split_runs(a, &b, [&](size_t p) { return youtu_script(cpts[p]); });
        a.swap(b);
      }
      split_matches(a, word_lens, [&, re = cased_regex(kind)](size_t p, size_t e) {
        return match_cased(cpts, flags, p, e, re);
      });
      break;
    case PreKind::DeepseekV3:
    case PreKind::Spark25:
      split_deepseek3(kind == PreKind::Spark25, cpts, flags, word_lens, a, b);
      break;
    case PreKind::Afmoe:
      split_afmoe(cpts, flags, word_lens, a, b);
      break;
    case PreKind::Bloom:
    case PreKind::Viking: {
      auto bloom = [&](size_t p, size_t e) { return match_bloom(cpts, flags, p, e); };
      split_matches(a, kind == PreKind::Bloom ? word_lens : &b, bloom);
      if (kind == PreKind::Viking) split_each_number(flags, b, word_lens);
      break;
    }
    case PreKind::Chameleon:
      split_chameleon(cpts, flags, word_lens, a, b);
      break;
    case PreKind::SuperBpe:
      split_runs(a, &b, [&](size_t p) { return (flags[p] & kCptNumber) != 0; });
      split_superbpe_digits(cpts, b, word_lens);
      break;
    case PreKind::DeepseekLlm:
    case PreKind::DeepseekCoder:
      split_deepseek(kind == PreKind::DeepseekCoder, cpts, flags, word_lens, a, b);
      break;
    case PreKind::Newlines:
    case PreKind::Sarvam:
      split_runs(a, word_lens, [&](size_t p) { return cpts[p] == '\n'; });
      break;
  }
}

}  // namespace kvlm::tok
