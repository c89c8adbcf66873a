// The lexer, following jinja2's: text between tags with whitespace control applied ({%- -%},
// trim_blocks, lstrip_blocks), then the tokens inside each tag.

#include <cctype>
#include <string>

#include "base/error.h"
#include "template/ast.h"

namespace kvlm::tmpl {

namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

// jinja2 normalises every newline to \n and drops one trailing newline (keep_trailing_newline).
std::string normalise_newlines(std::string_view src) {
  std::string out;
  out.reserve(src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    if (src[i] == '\r') {
      out += '\n';
      if (i + 1 < src.size() && src[i + 1] == '\n') ++i;
    } else {
      out += src[i];
    }
  }
  if (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

int line_of(const std::string& s, size_t pos, size_t from, int line_at_from) {
  int line = line_at_from;
  for (size_t k = from; k < pos && k < s.size(); ++k) line += s[k] == '\n';
  return line;
}

// Python-style string escapes, as jinja2 decodes string literals.
void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6)), out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12)), out += char(0x80 | ((cp >> 6) & 0x3F)),
        out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18)), out += char(0x80 | ((cp >> 12) & 0x3F)),
        out += char(0x80 | ((cp >> 6) & 0x3F)), out += char(0x80 | (cp & 0x3F));
  }
}

class TagLexer {
 public:
  TagLexer(const std::string& s, std::vector<Token>& out) : s_(s), out_(out) {}

  // Lexes tokens from pos until the closing `end` ("}}" or "%}") outside brackets; returns the
  // position just after it and whether it was written with '-' (strip what follows).
  size_t run(size_t pos, std::string_view end, int& line, bool* strip_after) {
    int depth = 0;
    while (true) {
      while (pos < s_.size() && is_space(s_[pos])) line += s_[pos++] == '\n';
      if (pos >= s_.size()) fail("template line {}: missing '{}' before the end of the template", line, end);
      if (depth == 0) {
        if (s_.compare(pos, end.size(), end) == 0) { *strip_after = false; return pos + end.size(); }
        if (s_[pos] == '-' && s_.compare(pos + 1, end.size(), end) == 0) {
          *strip_after = true;
          return pos + 1 + end.size();
        }
        if (s_[pos] == '+' && s_.compare(pos + 1, end.size(), end) == 0) {
          *strip_after = false;
          return pos + 1 + end.size();
        }
      }
      const char c = s_[pos];
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t e = pos;
        while (e < s_.size() && (std::isalnum(static_cast<unsigned char>(s_[e])) || s_[e] == '_')) ++e;
        out_.push_back({Tok::Name, s_.substr(pos, e - pos), line});
        pos = e;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        pos = number(pos, line);
      } else if (c == '\'' || c == '"') {
        pos = string(pos, line);
      } else {
        static const char* kOps[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%",
                                     "~", "<", ">", "=", "(", ")", "[", "]", "{", "}", ",", ".",
                                     ":", "|"};
        bool found = false;
        for (const char* op : kOps) {
          const std::string_view o(op);
          if (s_.compare(pos, o.size(), o) == 0) {
            if (o == "(" || o == "[" || o == "{") ++depth;
            if ((o == ")" || o == "]" || o == "}") && depth > 0) --depth;
            out_.push_back({Tok::Op, std::string(o), line});
            pos += o.size();
            found = true;
            break;
          }
        }
        if (!found) fail("template line {}: unexpected character '{}'", line, c);
      }
    }
  }

 private:
  size_t number(size_t pos, int line) {
    size_t e = pos;
    bool is_float = false;
    while (e < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[e])) || s_[e] == '_')) ++e;
    if (e + 1 < s_.size() && s_[e] == '.' && std::isdigit(static_cast<unsigned char>(s_[e + 1]))) {
      is_float = true;
      for (++e; e < s_.size() && std::isdigit(static_cast<unsigned char>(s_[e])); ++e) {}
    }
    if (e < s_.size() && (s_[e] == 'e' || s_[e] == 'E')) {
      size_t k = e + 1;
      if (k < s_.size() && (s_[k] == '+' || s_[k] == '-')) ++k;
      if (k < s_.size() && std::isdigit(static_cast<unsigned char>(s_[k]))) {
        is_float = true;
        for (e = k; e < s_.size() && std::isdigit(static_cast<unsigned char>(s_[e])); ++e) {}
      }
    }
    std::string text;
    for (size_t k = pos; k < e; ++k)
      if (s_[k] != '_') text += s_[k];
    out_.push_back({is_float ? Tok::Float : Tok::Int, text, line});
    return e;
  }

  size_t string(size_t pos, int& line) {
    const char q = s_[pos];
    const int start_line = line;
    std::string v;
    size_t k = pos + 1;
    for (; k < s_.size() && s_[k] != q; ++k) {
      line += s_[k] == '\n';
      if (s_[k] != '\\' || k + 1 >= s_.size()) { v += s_[k]; continue; }
      const char e = s_[++k];
      switch (e) {
        case 'n': v += '\n'; break;
        case 't': v += '\t'; break;
        case 'r': v += '\r'; break;
        case '0': v += '\0'; break;
        case 'b': v += '\b'; break;
        case 'f': v += '\f'; break;
        case '\\': case '\'': case '"': v += e; break;
        case '\n': ++line; break;  // a backslash-newline continues the literal
        case 'x': case 'u': case 'U': {
          const size_t n = e == 'x' ? 2 : e == 'u' ? 4 : 8;
          if (k + n >= s_.size()) fail("template line {}: bad \\{} escape in a string", line, e);
          append_utf8(v, uint32_t(std::stoul(s_.substr(k + 1, n), nullptr, 16)));
          k += n;
          break;
        }
        default: v += '\\', v += e;  // Python keeps unknown escapes as written
      }
    }
    if (k >= s_.size()) fail("template line {}: unterminated string", start_line);
    out_.push_back({Tok::String, v, start_line});
    return k + 1;
  }

  const std::string& s_;
  std::vector<Token>& out_;
};

// Removes spaces and tabs before a block tag when only they precede it on its line.
void lstrip_text(std::string& text, bool line_starting) {
  const size_t nl = text.rfind('\n');
  const size_t from = nl == std::string::npos ? 0 : nl + 1;
  if (from == 0 && !line_starting) return;
  if (text.find_first_not_of(" \t", from) != std::string::npos) return;
  text.erase(from);
}

}  // namespace

std::vector<Token> lex(std::string_view source, const Options& opt) {
  const std::string s = normalise_newlines(source);
  std::vector<Token> out;
  TagLexer tags(s, out);
  size_t pos = 0;
  int line = 1;
  bool strip_next = false;     // the previous tag ended with '-'
  bool line_starting = true;   // the previous tag's match ended with a newline
  while (pos <= s.size()) {
    size_t q = s.find('{', pos);
    while (q != std::string::npos && q + 1 < s.size() && s[q + 1] != '{' && s[q + 1] != '%' &&
           s[q + 1] != '#')
      q = s.find('{', q + 1);
    if (q != std::string::npos && q + 1 >= s.size()) q = std::string::npos;
    std::string text = s.substr(pos, q == std::string::npos ? std::string::npos : q - pos);
    if (strip_next) text.erase(0, text.find_first_not_of(" \t\n\r\f\v") == std::string::npos
                                      ? text.size() : text.find_first_not_of(" \t\n\r\f\v"));
    const int text_line = line;
    line = line_of(s, q == std::string::npos ? s.size() : q, pos, line);
    if (q == std::string::npos) {
      if (!text.empty()) out.push_back({Tok::Text, text, text_line});
      break;
    }
    const char kind = s[q + 1];
    const char mod = q + 2 < s.size() ? s[q + 2] : '\0';
    if (mod == '-') {
      text.erase(text.find_last_not_of(" \t\n\r\f\v") + 1);
    } else if (mod != '+' && kind != '{' && opt.lstrip_blocks) {
      lstrip_text(text, line_starting || (pos == q && line_starting));
    }
    if (!text.empty()) out.push_back({Tok::Text, text, text_line});
    size_t p = q + 2 + ((mod == '-' || mod == '+') ? 1 : 0);
    bool strip_after = false;
    if (kind == '#') {
      const size_t e = s.find("#}", p);
      if (e == std::string::npos) fail("template line {}: unterminated comment", line);
      strip_after = e > p && s[e - 1] == '-';
      line = line_of(s, e, q, line);
      p = e + 2;
    } else {
      out.push_back({kind == '{' ? Tok::VarBegin : Tok::BlockBegin, "", line});
      p = tags.run(p, kind == '{' ? "}}" : "%}", line, &strip_after);
      out.push_back({kind == '{' ? Tok::VarEnd : Tok::BlockEnd, "", line});
    }
    const bool plus = kind != '{' && s[p - 3] == '+';
    if (!strip_after && !plus && kind != '{' && opt.trim_blocks && p < s.size() && s[p] == '\n') {
      ++p;
      ++line;
    }
    // jinja2's line_starting: the tag's match (with what it swallowed) ended with a newline.
    line_starting = p > 0 && s[p - 1] == '\n';
    strip_next = strip_after;
    pos = p;
  }
  out.push_back({Tok::Eof, "", line});
  return out;
}

}  // namespace kvlm::tmpl
