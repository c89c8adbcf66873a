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
    case PreKind::Default: {
      auto punct = [&](size_t p) {
        const uint32_t c = cpts[p];
        return (flags[p] & kCptPunct) || c == '$' || c == '+' || c == '<' || c == '=' || c == '>' ||
               c == '^' || c == '~' || c == '|';
      };
      split_runs(a, &b, punct);
      a.clear();
      split_gpt2(cpts, flags, b, &a);
      b.clear();
      split_runs(a, &b, [&](size_t p) { return (flags[p] & kCptNumber) != 0; });
      split_ascii_digit_triples(cpts, b, word_lens);
      break;
    }
  }
}

}  // namespace kvlm::tok
