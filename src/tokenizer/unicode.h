// Unicode helpers private to the tokenizer: UTF-8 decoding the way llama.cpp's tokenizer does it
// (lenient), strict validation for streamed output, codepoint classes for the pre-tokenizers, and
// GPT-2's byte <-> printable-character mapping.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace kvlm::tok {

inline constexpr uint32_t kReplacementChar = 0xFFFD;

// Codepoint classes as the pre-tokenizer regexes use them.
enum CptFlag : uint8_t {
  kCptLetter = 1 << 0,      // \p{L}: Lu Ll Lt Lm Lo
  kCptNumber = 1 << 1,      // \p{N}: Nd Nl No
  kCptWhitespace = 1 << 2,  // \s: the Unicode White_Space property
  kCptPunct = 1 << 3,       // \p{P}: Pc Pd Ps Pe Pi Pf Po
  kCptMark = 1 << 4,        // \p{M}: Mn Mc Me
  kCptSymbol = 1 << 5,      // \p{S}: Sm Sc Sk So
};

// Flags of one codepoint; codepoints past U+10FFFF have none.
uint8_t cpt_flags(uint32_t cpt);

// Decodes like llama.cpp's unicode_cpts_from_utf8: a lead byte followed by the right number of
// continuation bytes decodes without further checks (overlong forms and surrogates included, up
// to 0x1FFFFF); any other byte becomes U+FFFD and decoding resumes at the next byte. Appends.
void decode_utf8_lenient(std::string_view s, std::vector<uint32_t>* out);

// Appends the UTF-8 encoding of `cpt`; values past U+10FFFF (which only the lenient decoder can
// produce) are written as U+FFFD.
void append_utf8(uint32_t cpt, std::string* out);

// Copies the valid UTF-8 in `in` to `out`, replacing each maximal invalid subpart with U+FFFD
// (surrogates, overlong forms and values past U+10FFFF are invalid). When `final` is false, a
// trailing sequence that is an incomplete but so far valid character is left unconsumed. Returns
// the number of bytes of `in` consumed.
size_t sanitize_utf8(std::string_view in, bool final, std::string* out);

bool is_valid_utf8(std::string_view s);

// GPT-2 byte-level mapping: every byte value to a printable character (as UTF-8), and back.
const std::string& byte_to_unicode(uint8_t b);
// -1 when `ch` (one UTF-8 character) is not the image of a byte.
int unicode_to_byte(std::string_view ch);

}  // namespace kvlm::tok
