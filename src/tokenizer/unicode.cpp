#include "tokenizer/unicode.h"

#include <utf8proc.h>

#include <array>
#include <memory>
#include <unordered_map>

namespace kvlm::tok {

// ---- codepoint classes -------------------------------------------------------------------------

namespace {

// The White_Space property (PropList.txt). llama.cpp's \s is exactly this set; PCRE's and
// std::regex's differ (U+180E, U+0085), which is why the splitters are hand-written.
bool is_white_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

uint8_t compute_flags(uint32_t c) {
  uint8_t f = is_white_space(c) ? kCptWhitespace : 0;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
      f |= kCptLetter;
      break;
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_NO:
      f |= kCptNumber;
      break;
    case UTF8PROC_CATEGORY_PC:
    case UTF8PROC_CATEGORY_PD:
    case UTF8PROC_CATEGORY_PS:
    case UTF8PROC_CATEGORY_PE:
    case UTF8PROC_CATEGORY_PI:
    case UTF8PROC_CATEGORY_PF:
    case UTF8PROC_CATEGORY_PO:
      f |= kCptPunct;
      break;
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
      f |= kCptMark;
      break;
    case UTF8PROC_CATEGORY_SM:
    case UTF8PROC_CATEGORY_SC:
    case UTF8PROC_CATEGORY_SK:
    case UTF8PROC_CATEGORY_SO:
      f |= kCptSymbol;
      break;
    default:
      break;
  }
  return f;
}

// The Basic Multilingual Plane covers nearly all text; a 64 KiB table keeps utf8proc's
// two-level lookup out of the per-codepoint loop.
struct BmpFlags {
  std::array<uint8_t, 0x10000> flags;
  BmpFlags() {
    for (uint32_t c = 0; c < 0x10000; ++c) flags[c] = compute_flags(c);
  }
};

}  // namespace

uint8_t cpt_flags(uint32_t cpt) {
  static const auto bmp = std::make_unique<BmpFlags>();
  if (cpt < 0x10000) return bmp->flags[cpt];
  if (cpt > 0x10FFFF) return 0;
  return compute_flags(cpt);
}

// ---- UTF-8 -------------------------------------------------------------------------------------

void decode_utf8_lenient(std::string_view s, std::vector<uint32_t>* out) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  auto cont = [&](size_t k) { return i + k < n && (p[i + k] & 0xC0) == 0x80; };
  while (i < n) {
    const uint8_t b = p[i];
    if (b < 0x80) {
      out->push_back(b);
      i += 1;
    } else if ((b & 0xE0) == 0xC0 && cont(1)) {
      out->push_back(((b & 0x1Fu) << 6) | (p[i + 1] & 0x3Fu));
      i += 2;
    } else if ((b & 0xF0) == 0xE0 && cont(1) && cont(2)) {
      out->push_back(((b & 0x0Fu) << 12) | ((p[i + 1] & 0x3Fu) << 6) | (p[i + 2] & 0x3Fu));
      i += 3;
    } else if ((b & 0xF8) == 0xF0 && cont(1) && cont(2) && cont(3)) {
      out->push_back(((b & 0x07u) << 18) | ((p[i + 1] & 0x3Fu) << 12) | ((p[i + 2] & 0x3Fu) << 6) |
                     (p[i + 3] & 0x3Fu));
      i += 4;
    } else {
      out->push_back(kReplacementChar);
      i += 1;
    }
  }
}

void append_utf8(uint32_t c, std::string* out) {
  if (c < 0x80) {
    out->push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (c >> 6)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (c >> 12)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c <= 0x10FFFF) {
    out->push_back(static_cast<char>(0xF0 | (c >> 18)));
    out->push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    append_utf8(kReplacementChar, out);
  }
}

namespace {

// Length of the character a lead byte starts and the allowed range of its first continuation
// byte (Unicode Table 3-7, well-formed byte sequences); length 0 for bytes that never lead.
struct LeadInfo {
  uint8_t len, lo, hi;
};
LeadInfo lead_info(uint8_t b) {
  if (b < 0x80) return {1, 0, 0};
  if (b >= 0xC2 && b <= 0xDF) return {2, 0x80, 0xBF};
  if (b == 0xE0) return {3, 0xA0, 0xBF};
  if (b == 0xED) return {3, 0x80, 0x9F};  // excludes surrogates
  if (b >= 0xE1 && b <= 0xEF) return {3, 0x80, 0xBF};
  if (b == 0xF0) return {4, 0x90, 0xBF};
  if (b >= 0xF1 && b <= 0xF3) return {4, 0x80, 0xBF};
  if (b == 0xF4) return {4, 0x80, 0x8F};  // up to U+10FFFF
  return {0, 0, 0};
}

}  // namespace

size_t sanitize_utf8(std::string_view in, bool final, std::string* out) {
  const auto* p = reinterpret_cast<const uint8_t*>(in.data());
  const size_t n = in.size();
  size_t i = 0;
  while (i < n) {
    const LeadInfo li = lead_info(p[i]);
    if (li.len == 1) {
      out->push_back(static_cast<char>(p[i++]));
      continue;
    }
    if (li.len == 0) {
      append_utf8(kReplacementChar, out);
      ++i;
      continue;
    }
    // Count how many bytes of this character are present and well-formed.
    size_t k = 1;
    while (k < li.len && i + k < n) {
      const uint8_t c = p[i + k];
      const bool ok = k == 1 ? (c >= li.lo && c <= li.hi) : (c & 0xC0) == 0x80;
      if (!ok) break;
      ++k;
    }
    if (k == li.len) {
      out->append(in.substr(i, k));
      i += k;
    } else if (i + k == n && !final) {
      break;  // an incomplete character at the end: wait for the rest
    } else {
      append_utf8(kReplacementChar, out);  // one U+FFFD per maximal subpart
      i += k;
    }
  }
  return i;
}

bool is_valid_utf8(std::string_view s) {
  std::string scratch;
  scratch.reserve(s.size());
  return sanitize_utf8(s, true, &scratch) == s.size() && scratch == s;
}

// ---- GPT-2 byte mapping ------------------------------------------------------------------------

namespace {

// Printable Latin-1 bytes map to themselves; the others (controls, space, 0x7F-0xA0, 0xAD) map to
// U+0100 onwards in byte order, so that every token is printable text.
struct ByteMap {
  std::array<std::string, 256> to_unicode;
  std::unordered_map<std::string, uint8_t> to_byte;
  ByteMap() {
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable =
          (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      std::string s;
      append_utf8(printable ? static_cast<uint32_t>(b) : next++, &s);
      to_byte.emplace(s, static_cast<uint8_t>(b));
      to_unicode[b] = std::move(s);
    }
  }
};

const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

}  // namespace

const std::string& byte_to_unicode(uint8_t b) {
  return byte_map().to_unicode[b];
}

int unicode_to_byte(std::string_view ch) {
  const auto& m = byte_map().to_byte;
  auto it = m.find(std::string(ch));
  return it == m.end() ? -1 : it->second;
}

}  // namespace kvlm::tok
