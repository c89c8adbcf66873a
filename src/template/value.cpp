#include "template/value.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cctype>

namespace kvlm::tmpl {

const Value* Args::get(size_t i, std::string_view name) const {
  if (i < pos.size()) return &pos[i];
  for (const auto& [k, v] : kw)
    if (k == name) return &v;
  return nullptr;
}

Value Value::make_list(List items) {
  Value v;
  v.kind = Kind::List;
  v.list = std::make_shared<List>(std::move(items));
  return v;
}

Value Value::make_dict() {
  Value v;
  v.kind = Kind::Dict;
  v.dict = std::make_shared<Dict>();
  return v;
}

Value Value::callable(std::string name, std::function<Value(Interp&, const Args&)> fn) {
  Value v;
  v.kind = Kind::Callable;
  v.fn = std::make_shared<const Callable>(Callable{std::move(name), std::move(fn)});
  return v;
}

const Value* Dict::find(std::string_view key) const {
  for (const auto& [k, v] : items)
    if (k.is_string() && k.s == key) return &v;
  return nullptr;
}

const Value* Dict::find(const Value& key) const {
  for (const auto& [k, v] : items)
    if (equal(k, key)) return &v;
  return nullptr;
}

void Dict::set(Value key, Value v) {
  for (auto& [k, old] : items)
    if (equal(k, key)) {
      old = std::move(v);
      return;
    }
  items.emplace_back(std::move(key), std::move(v));
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case Kind::Undefined:
    case Kind::None: return false;
    case Kind::Bool: return v.b;
    case Kind::Int: return v.i != 0;
    case Kind::Float: return v.f != 0;
    case Kind::String: return !v.s.empty();
    case Kind::List: return !v.list->empty();
    case Kind::Dict: return !v.dict->items.empty();
    case Kind::Callable: return true;
  }
  return false;
}

std::string float_repr(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  // Python's repr: the shortest digits that read back as x, positional for exponents in
  // [-4, 16), otherwise d.ddde+XX.
  char buf[64];
  int prec = 1;
  for (; prec < 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*e", prec - 1, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  std::snprintf(buf, sizeof buf, "%.*e", prec - 1, x);
  const std::string e = buf;
  const size_t epos = e.find('e');
  const int exp = std::atoi(e.c_str() + epos + 1);
  std::string digits;
  for (size_t k = 0; k < epos; ++k)
    if (std::isdigit(static_cast<unsigned char>(e[k]))) digits += e[k];
  std::string out = x < 0 ? "-" : "";
  if (exp < -4 || exp >= 16) {
    out += digits[0];
    if (digits.size() > 1) out.append(".").append(digits, 1, std::string::npos);
    out += fmt::format("e{}{:02d}", exp < 0 ? '-' : '+', std::abs(exp));
  } else if (exp < 0) {
    out.append("0.").append(size_t(-exp - 1), '0').append(digits);
  } else if (size_t(exp) + 1 >= digits.size()) {
    out.append(digits).append(size_t(exp) + 1 - digits.size(), '0').append(".0");
  } else {
    out.append(digits, 0, size_t(exp) + 1).append(".").append(digits, size_t(exp) + 1);
  }
  return out;
}

namespace {

std::string repr_string(const std::string& s) {
  const bool dq = s.find('\'') != std::string::npos && s.find('"') == std::string::npos;
  const char q = dq ? '"' : '\'';
  std::string out(1, q);
  for (unsigned char c : s) {
    if (c == '\\') out += "\\\\";
    else if (c == static_cast<unsigned char>(q)) out += std::string("\\") + q;
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7f) out += fmt::format("\\x{:02x}", c);
    else out += static_cast<char>(c);
  }
  return out + q;
}

// The code point of the UTF-8 sequence at s[p] and its length; a malformed one reads as U+FFFD
// (one byte), as Python could not hold it in a str.
std::pair<uint32_t, size_t> utf8_decode(std::string_view s, size_t p) {
  const auto c = static_cast<unsigned char>(s[p]);
  const size_t n = (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (n == 0 || p + n > s.size()) return {0xFFFD, 1};
  uint32_t cp = c & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) {
    const auto d = static_cast<unsigned char>(s[p + k]);
    if ((d & 0xC0) != 0x80) return {0xFFFD, 1};
    cp = cp << 6 | (d & 0x3F);
  }
  return {cp, n};
}

// json.dumps's string: with ensure_ascii DEL and every non-ASCII code point as \uXXXX (a surrogate pair
// above U+FFFF), else the UTF-8 bytes as they are.
void json_string(std::string_view s, bool ensure_ascii, std::string& out) {
  out += '"';
  for (size_t p = 0; p < s.size(); ++p) {
    const auto c = static_cast<unsigned char>(s[p]);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          out += fmt::format("\\u{:04x}", c);
        } else if (c >= 0x7F && ensure_ascii) {  // Python escapes DEL too (not in ' '..'~')
          const auto [cp, n] = c == 0x7F ? std::pair<uint32_t, size_t>{0x7F, 1} : utf8_decode(s, p);
          p += n - 1;
          if (cp < 0x10000) {
            out += fmt::format("\\u{:04x}", cp);
          } else {
            const uint32_t v = cp - 0x10000;
            out += fmt::format("\\u{:04x}\\u{:04x}", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF));
          }
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

void json_rec(const Value& v, const JsonStyle& st, int depth, std::string& out) {
  const int indent = st.indent;
  if (depth > 256) throw std::runtime_error("tojson: value nested too deeply");
  std::string nl, nl_end;
  if (indent >= 0) {
    nl_end = std::string(size_t(indent) * size_t(depth) + 1, ' ');
    nl_end[0] = '\n';
    nl = nl_end + std::string(size_t(indent), ' ');
  }
  switch (v.kind) {
    case Kind::None: out += "null"; return;
    case Kind::Bool: out += v.b ? "true" : "false"; return;
    case Kind::Int: out += std::to_string(v.i); return;
    case Kind::Float:
      out += std::isnan(v.f) ? "NaN" : std::isinf(v.f) ? (v.f > 0 ? "Infinity" : "-Infinity")
                                                        : float_repr(v.f);
      return;
    case Kind::String: json_string(v.s, st.ensure_ascii, out); return;
    case Kind::List: {
      if (v.list->empty()) { out += "[]"; return; }
      out += '[';
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += st.item_sep;
        out += nl;
        json_rec((*v.list)[k], st, depth + 1, out);
      }
      out += nl_end + "]";
      return;
    }
    case Kind::Dict: {
      if (v.dict->items.empty()) { out += "{}"; return; }
      // json.dumps writes non-string keys as their JSON text ("1", "true", "null").
      std::vector<std::pair<std::string, const Value*>> items;
      for (const auto& [k, x] : v.dict->items) {
        if (k.is_list() || k.is_dict() || k.kind == Kind::Callable || k.is_undefined())
          throw std::runtime_error("keys must be str, int, float, bool or None");
        items.emplace_back(k.is_string() ? k.s : to_json(k, JsonStyle{}), &x);
      }
      if (st.sort_keys)
        std::stable_sort(items.begin(), items.end(),
                         [](const auto& a, const auto& b) { return a.first < b.first; });
      out += '{';
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) out += st.item_sep;
        out += nl;
        json_string(items[k].first, st.ensure_ascii, out);
        out += st.key_sep;
        json_rec(*items[k].second, st, depth + 1, out);
      }
      out += nl_end + "}";
      return;
    }
    case Kind::Undefined:
    case Kind::Callable:
      throw std::runtime_error(fmt::format("Object of type {} is not JSON serializable",
                                           kind_name(v.kind)));
  }
}

}  // namespace

std::string repr(const Value& v) {
  switch (v.kind) {
    case Kind::String: return repr_string(v.s);
    case Kind::List: {
      std::string out = v.tuple ? "(" : "[";
      for (size_t k = 0; k < v.list->size(); ++k) out += (k ? ", " : "") + repr((*v.list)[k]);
      if (v.tuple && v.list->size() == 1) out += ",";
      return out + (v.tuple ? ")" : "]");
    }
    case Kind::Dict: {
      std::string out = "{";
      for (size_t k = 0; k < v.dict->items.size(); ++k)
        out += (k ? ", " : "") + repr(v.dict->items[k].first) + ": " +
               repr(v.dict->items[k].second);
      return out + "}";
    }
    default: return to_str(v);
  }
}

std::string to_str(const Value& v) {
  switch (v.kind) {
    case Kind::Undefined: return "";
    case Kind::None: return "None";
    case Kind::Bool: return v.b ? "True" : "False";
    case Kind::Int: return std::to_string(v.i);
    case Kind::Float: return float_repr(v.f);
    case Kind::String: return v.s;
    case Kind::Callable: return "<function " + v.fn->name + ">";
    case Kind::List:
    case Kind::Dict:
      if (v.is_dict() && v.dict->is_namespace) return "<Namespace>";
      return repr(v);
  }
  return "";
}

bool equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.kind != Kind::Float && b.kind != Kind::Float)
      return (a.kind == Kind::Bool ? a.b : a.i) == (b.kind == Kind::Bool ? b.b : b.i);
    return a.as_double() == b.as_double();
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Kind::Undefined:
    case Kind::None: return true;
    case Kind::String: return a.s == b.s;
    case Kind::List:
      if (a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k)
        if (!equal((*a.list)[k], (*b.list)[k])) return false;
      return true;
    case Kind::Dict:
      if (a.dict->items.size() != b.dict->items.size()) return false;
      for (const auto& [k, v] : a.dict->items) {
        const Value* o = b.dict->find(k);
        if (!o || !equal(v, *o)) return false;
      }
      return true;
    case Kind::Callable: return a.fn == b.fn;
    default: return false;
  }
}

std::string to_json(const Value& v, const JsonStyle& style) {
  std::string out;
  json_rec(v, style, 0, out);
  return out;
}

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::Undefined: return "Undefined";
    case Kind::None: return "NoneType";
    case Kind::Bool: return "bool";
    case Kind::Int: return "int";
    case Kind::Float: return "float";
    case Kind::String: return "str";
    case Kind::List: return "list";
    case Kind::Dict: return "dict";
    case Kind::Callable: return "function";
  }
  return "?";
}

std::vector<std::string> utf8_chars(std::string_view s) {
  std::vector<std::string> out;
  for (size_t p = 0; p < s.size();) {
    const auto c = static_cast<unsigned char>(s[p]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    n = std::min(n, s.size() - p);
    out.emplace_back(s.substr(p, n));
    p += n;
  }
  return out;
}

size_t utf8_length(std::string_view s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

}  // namespace kvlm::tmpl
