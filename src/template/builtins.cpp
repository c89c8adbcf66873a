// Filters, tests, methods of str/dict/list and global functions, with the behaviour of jinja2 3.1
// and Python 3 that chat templates rely on (HF's tojson; the immutable sandbox, so list.append
// and dict.update fail as they do under apply_chat_template).

#include <algorithm>
#include <cctype>
#include <cmath>
#include <map>
#include <string>

#include "template/interp.h"

namespace kvlm::tmpl {

namespace {

// ---- small helpers -----------------------------------------------------------------------------

const std::string kSpace = " \t\n\r\f\v";

std::string arg_str(Interp& in, const Args& a, size_t i, std::string_view name, std::string def) {
  const Value* v = a.get(i, name);
  if (!v || v->is_none()) return def;
  if (!v->is_string()) in.error("argument '{}' must be a string, got {}", name, kind_name(v->kind));
  return v->s;
}

int64_t arg_int(Interp& in, const Args& a, size_t i, std::string_view name, int64_t def) {
  const Value* v = a.get(i, name);
  if (!v || v->is_none()) return def;
  if (v->kind != Kind::Int && v->kind != Kind::Bool)
    in.error("argument '{}' must be an integer, got {}", name, kind_name(v->kind));
  return v->kind == Kind::Bool ? v->b : v->i;
}

bool arg_bool(const Args& a, size_t i, std::string_view name, bool def) {
  const Value* v = a.get(i, name);
  return v ? truthy(*v) : def;
}

std::string need_str(Interp& in, const Value& v, std::string_view what) {
  if (v.is_undefined()) in.undefined_error(v);
  if (!v.is_string()) in.error("{} needs a string, got {}", what, kind_name(v.kind));
  return v.s;
}

std::string ascii_upper(std::string s) {
  for (char& c : s) c = char(std::toupper(static_cast<unsigned char>(c)));
  return s;
}
std::string ascii_lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}
std::string capitalize(const std::string& s) {
  std::string r = ascii_lower(s);
  if (!r.empty()) r[0] = char(std::toupper(static_cast<unsigned char>(r[0])));
  return r;
}

std::string strip(const std::string& s, const std::string& chars, bool left, bool right) {
  size_t b = 0, e = s.size();
  if (left) b = std::min(s.size(), s.find_first_not_of(chars) == std::string::npos ? s.size() : s.find_first_not_of(chars));
  if (right) {
    const size_t l = s.find_last_not_of(chars);
    e = l == std::string::npos ? 0 : l + 1;
  }
  return b < e ? s.substr(b, e - b) : "";
}

std::string replace_all(Interp& in, const std::string& s, const std::string& from,
                        const std::string& to, int64_t count) {
  std::string out;
  size_t p = 0;
  int64_t n = 0;
  if (from.empty()) {  // Python inserts `to` between every character
    for (const std::string& c : utf8_chars(s)) {
      if (count < 0 || n++ < count) out += to;
      out += c;
      in.check_size(out.size());
    }
    return (count < 0 || n < count) ? out + to : out;
  }
  for (size_t q; (count < 0 || n < count) && (q = s.find(from, p)) != std::string::npos; ++n) {
    out.append(s, p, q - p);
    out += to;
    p = q + from.size();
    in.check_size(out.size());
  }
  return out + s.substr(p);
}

List split(const std::string& s, const Value* sep, int64_t maxsplit) {
  List out;
  if (!sep || sep->is_none()) {  // runs of whitespace, no empty pieces
    size_t p = s.find_first_not_of(kSpace);
    while (p != std::string::npos) {
      if (maxsplit >= 0 && int64_t(out.size()) == maxsplit) {
        out.push_back(Value::string(strip(s.substr(p), kSpace, false, true)));
        break;
      }
      const size_t e = s.find_first_of(kSpace, p);
      out.push_back(Value::string(s.substr(p, e == std::string::npos ? std::string::npos : e - p)));
      p = e == std::string::npos ? e : s.find_first_not_of(kSpace, e);
    }
    return out;
  }
  const std::string& d = sep->s;
  size_t p = 0;
  for (size_t q; (maxsplit < 0 || int64_t(out.size()) < maxsplit) &&
                 (q = s.find(d, p)) != std::string::npos;) {
    out.push_back(Value::string(s.substr(p, q - p)));
    p = q + d.size();
  }
  out.push_back(Value::string(s.substr(p)));
  return out;
}

// Python's str.title(): a letter after a letter is lowered, any other letter is raised.
std::string py_title(const std::string& s) {
  std::string r = s;
  bool prev = false;
  for (char& c : r) {
    const auto u = static_cast<unsigned char>(c);
    if (std::isalpha(u)) {
      c = char(prev ? std::tolower(u) : std::toupper(u));
      prev = true;
    } else {
      prev = u >= 0x80;  // letters of other scripts count as cased characters
    }
  }
  return r;
}

// jinja2's title filter: words start after '-', whitespace or an opening bracket.
std::string jinja_title(const std::string& s) {
  std::string r;
  bool start = true;
  for (char c : s) {
    const bool sep = c == '-' || c == '(' || c == '{' || c == '[' || c == '<' ||
                     kSpace.find(c) != std::string::npos;
    const auto u = static_cast<unsigned char>(c);
    r += sep ? c : char(start ? std::toupper(u) : std::tolower(u));
    start = sep;
  }
  return r;
}

// "{} {0} {name}".format(...) without format specs.
std::string py_format(Interp& in, const std::string& f, const Args& a) {
  std::string out;
  size_t auto_idx = 0;
  for (size_t k = 0; k < f.size(); ++k) {
    if (f[k] == '{' && k + 1 < f.size() && f[k + 1] == '{') { out += '{'; ++k; continue; }
    if (f[k] == '}' && k + 1 < f.size() && f[k + 1] == '}') { out += '}'; ++k; continue; }
    if (f[k] != '{') { out += f[k]; continue; }
    const size_t e = f.find('}', k);
    if (e == std::string::npos) in.error("str.format: unmatched '{{'");
    const std::string field = f.substr(k + 1, e - k - 1);
    if (field.find_first_of(":!") != std::string::npos) in.error("str.format: format specs are not supported");
    const Value* v = nullptr;
    if (field.empty()) v = auto_idx < a.pos.size() ? &a.pos[auto_idx++] : nullptr;
    else if (std::isdigit(static_cast<unsigned char>(field[0]))) v = size_t(std::stoul(field)) < a.pos.size() ? &a.pos[std::stoul(field)] : nullptr;
    else v = a.get(SIZE_MAX, field);
    if (!v) in.error("str.format: no argument for '{{{}}}'", field);
    out += to_str(*v);
    k = e;
  }
  return out;
}

// Dotted attribute path as selectattr/map/sort/join use ("a.b" is obj.a.b).
Value attr_path(Interp& in, const Value& v, const std::string& path) {
  Value cur = v;
  size_t p = 0;
  while (true) {
    const size_t d = path.find('.', p);
    const std::string part = path.substr(p, d == std::string::npos ? std::string::npos : d - p);
    if (!part.empty() && std::all_of(part.begin(), part.end(), ::isdigit) && cur.is_list())
      cur = get_item(in, cur, Value::integer(std::stoll(part)));
    else
      cur = get_attr(in, cur, part);
    if (d == std::string::npos) return cur;
    p = d + 1;
  }
}

// ---- filters -----------------------------------------------------------------------------------

// jinja2 skips a falsy input (`if value:`), so `none | selectattr(...)` is empty.
Value select_items(Interp& in, const Value& v, const Args& a, bool by_attr, bool keep) {
  const List items = truthy(v) ? iterate(in, v) : List{};
  size_t i = 0;
  std::string attr;
  if (by_attr) {
    if (a.pos.empty()) in.error("{} needs an attribute name", keep ? "selectattr" : "rejectattr");
    attr = need_str(in, a.pos[0], "selectattr");
    i = 1;
  }
  Args test_args;
  for (size_t k = i + 1; k < a.pos.size(); ++k) test_args.pos.push_back(a.pos[k]);
  const bool has_test = a.pos.size() > i;
  const std::string test = has_test ? need_str(in, a.pos[i], "a test name") : "";
  List out;
  for (const Value& item : items) {
    in.step();
    const Value x = by_attr ? attr_path(in, item, attr) : item;
    const bool ok = has_test ? apply_test(in, test, x, test_args) : truthy(x);
    if (ok == keep) out.push_back(item);
  }
  return Value::make_list(std::move(out));
}

Value map_items(Interp& in, const Value& v, const Args& a) {
  const List items = truthy(v) ? iterate(in, v) : List{};
  List out;
  if (const Value* attr = a.get(SIZE_MAX, "attribute")) {
    const Value* def = a.get(SIZE_MAX, "default");
    for (const Value& item : items) {
      Value x = attr_path(in, item, need_str(in, *attr, "map(attribute=)"));
      out.push_back(x.is_undefined() && def ? *def : x);
    }
    return Value::make_list(std::move(out));
  }
  if (a.pos.empty()) in.error("map needs a filter name or attribute=");
  const std::string filter = need_str(in, a.pos[0], "map");
  Args rest;
  rest.pos.assign(a.pos.begin() + 1, a.pos.end());
  rest.kw = a.kw;
  for (const Value& item : items) {
    in.step();
    out.push_back(apply_filter(in, filter, item, rest));
  }
  return Value::make_list(std::move(out));
}

Value sort_items(Interp& in, const Value& v, const Args& a) {
  List items = iterate(in, v);
  const bool reverse = arg_bool(a, 0, "reverse", false);
  const bool case_sensitive = arg_bool(a, 1, "case_sensitive", false);
  const Value* attr = a.get(2, "attribute");
  auto key = [&](const Value& x) {
    Value k = attr ? attr_path(in, x, need_str(in, *attr, "sort(attribute=)")) : x;
    if (k.is_string() && !case_sensitive) k.s = ascii_lower(k.s);
    return k;
  };
  std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) {
    return reverse ? less(in, key(y), key(x)) : less(in, key(x), key(y));
  });
  return Value::make_list(std::move(items));
}

Value dict_items(Interp& in, const Value& v) {
  if (v.is_undefined()) return Value::make_list();
  if (!v.is_dict()) in.error("items() needs a mapping, got {}", kind_name(v.kind));
  List out;
  for (const auto& [k, x] : v.dict->items) {
    out.push_back(Value::make_list({k, x}));
    out.back().tuple = true;
  }
  return Value::make_list(std::move(out));
}

// HF's tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False).
Value tojson(Interp& in, const Value& v, const Args& a) {
  JsonStyle st;
  st.ensure_ascii = arg_bool(a, 0, "ensure_ascii", false);
  st.indent = int(arg_int(in, a, 1, "indent", -1));
  std::string item_sep = st.indent >= 0 ? "," : ", ", key_sep = ": ";  // st's views point here
  if (const Value* sep = a.get(2, "separators"); sep && sep->is_list() && sep->list->size() == 2) {
    item_sep = need_str(in, (*sep->list)[0], "tojson separators");
    key_sep = need_str(in, (*sep->list)[1], "tojson separators");
  }
  st.item_sep = item_sep;
  st.key_sep = key_sep;
  st.sort_keys = arg_bool(a, 3, "sort_keys", false);
  try {
    return Value::string(to_json(v, st));
  } catch (const std::runtime_error& e) {
    in.error("tojson: {}", e.what());
  }
}

Value indent(Interp& in, const Value& v, const Args& a) {
  const std::string s = to_str(v);
  const Value* w = a.get(0, "width");
  const std::string pad = w && w->is_string() ? w->s : std::string(size_t(std::clamp<int64_t>(arg_int(in, a, 0, "width", 4), 0, 1024)), ' ');
  const bool first = arg_bool(a, 1, "first", false), blank = arg_bool(a, 2, "blank", false);
  std::vector<std::string> lines;
  for (size_t p = 0;;) {
    const size_t e = s.find('\n', p);
    lines.push_back(s.substr(p, e == std::string::npos ? std::string::npos : e - p));
    if (e == std::string::npos) break;
    p = e + 1;
  }
  if (lines.size() > 1 && lines.back().empty()) lines.pop_back();  // splitlines drops it
  std::string out = lines[0];
  for (size_t k = 1; k < lines.size(); ++k)
    out += "\n" + ((blank || !lines[k].empty()) ? pad : "") + lines[k];
  if (!s.empty() && s.back() == '\n') out += "\n";
  if (first) out = pad + out;
  in.check_size(out.size());
  return Value::string(out);
}

Value to_int(const Value& v, const Value* def) {
  const Value fallback = def ? *def : Value::integer(0);
  switch (v.kind) {
    case Kind::Int: return v;
    case Kind::Bool: return Value::integer(v.b);
    case Kind::Float: return std::isfinite(v.f) ? Value::integer(int64_t(v.f)) : fallback;
    case Kind::String: {
      const std::string t = strip(v.s, kSpace, true, true);
      char* end = nullptr;
      errno = 0;
      const long long i = std::strtoll(t.c_str(), &end, 10);
      if (!t.empty() && *end == '\0' && errno == 0) return Value::integer(i);
      const double d = std::strtod(t.c_str(), &end);
      if (!t.empty() && *end == '\0' && std::isfinite(d)) return Value::integer(int64_t(d));
      return fallback;
    }
    default: return fallback;
  }
}

Value min_max(Interp& in, const Value& v, bool want_max) {
  const List items = iterate(in, v);
  if (items.empty()) return Value::undefined("min/max of an empty sequence");
  Value best = items[0];
  for (const Value& x : items)
    if (want_max ? less(in, best, x) : less(in, x, best)) best = x;
  return best;
}

Value escape_html(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&#34;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return Value::string(out);
}

Value join(Interp& in, const Value& v, const Args& a) {
  const std::string sep = arg_str(in, a, 0, "d", "");
  const Value* attr = a.get(1, "attribute");
  std::string out;
  bool first = true;
  for (const Value& x : iterate(in, v)) {
    if (!first) out += sep;
    first = false;
    out += to_str(attr ? attr_path(in, x, need_str(in, *attr, "join(attribute=)")) : x);
    in.check_size(out.size());
  }
  return Value::string(out);
}

Value reverse(Interp& in, const Value& v) {
  if (v.is_string()) {
    std::vector<std::string> c = utf8_chars(v.s);
    std::string out;
    for (size_t k = c.size(); k-- > 0;) out += c[k];
    return Value::string(out);
  }
  List l = iterate(in, v);
  std::reverse(l.begin(), l.end());
  return Value::make_list(std::move(l));
}

Value unique(Interp& in, const Value& v) {
  List out;
  for (const Value& x : iterate(in, v)) {
    bool seen = false;
    for (const Value& y : out) seen |= equal(x.is_string() ? Value::string(ascii_lower(x.s)) : x,
                                             y.is_string() ? Value::string(ascii_lower(y.s)) : y);
    if (!seen) out.push_back(x);
  }
  return Value::make_list(std::move(out));
}

Value dictsort(Interp& in, const Value& v, const Args& a) {
  List items = dict_items(in, v).list ? *dict_items(in, v).list : List{};
  const bool cs = arg_bool(a, 0, "case_sensitive", false);
  const bool by_value = arg_str(in, a, 1, "by", "key") == "value";
  const bool rev = arg_bool(a, 2, "reverse", false);
  auto key = [&](const Value& kv) {
    Value k = (*kv.list)[by_value ? 1 : 0];
    if (k.is_string() && !cs) k.s = ascii_lower(k.s);
    return k;
  };
  std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) {
    return rev ? less(in, key(y), key(x)) : less(in, key(x), key(y));
  });
  return Value::make_list(std::move(items));
}

using FilterFn = Value (*)(Interp&, const Value&, const Args&);

const std::map<std::string, FilterFn, std::less<>>& filters() {
  static const std::map<std::string, FilterFn, std::less<>> table = {
      {"trim", [](Interp& in, const Value& v, const Args& a) {
         return Value::string(strip(to_str(v), arg_str(in, a, 0, "chars", kSpace), true, true)); }},
      {"length", [](Interp& in, const Value& v, const Args&) {
         if (v.is_string()) return Value::integer(int64_t(utf8_length(v.s)));
         if (v.is_dict()) return Value::integer(int64_t(v.dict->items.size()));
         if (v.is_list()) return Value::integer(int64_t(v.list->size()));
         if (v.is_undefined()) return Value::integer(0);
         in.error("object of type '{}' has no len()", kind_name(v.kind)); }},
      {"upper", [](Interp&, const Value& v, const Args&) { return Value::string(ascii_upper(to_str(v))); }},
      {"lower", [](Interp&, const Value& v, const Args&) { return Value::string(ascii_lower(to_str(v))); }},
      {"title", [](Interp&, const Value& v, const Args&) { return Value::string(jinja_title(to_str(v))); }},
      {"capitalize", [](Interp&, const Value& v, const Args&) { return Value::string(capitalize(to_str(v))); }},
      {"replace", [](Interp& in, const Value& v, const Args& a) {
         return Value::string(replace_all(in, to_str(v), arg_str(in, a, 0, "old", ""),
                                          arg_str(in, a, 1, "new", ""), arg_int(in, a, 2, "count", -1))); }},
      {"join", join},
      {"tojson", tojson},
      {"first", [](Interp& in, const Value& v, const Args&) {
         const List l = iterate(in, v);
         return l.empty() ? Value::undefined("first of an empty sequence") : l.front(); }},
      {"last", [](Interp& in, const Value& v, const Args&) {
         const List l = iterate(in, v);
         return l.empty() ? Value::undefined("last of an empty sequence") : l.back(); }},
      {"list", [](Interp& in, const Value& v, const Args&) { return Value::make_list(iterate(in, v)); }},
      {"items", [](Interp& in, const Value& v, const Args&) { return dict_items(in, v); }},
      {"dictsort", dictsort},
      {"default", [](Interp&, const Value& v, const Args& a) {
         const bool boolean = arg_bool(a, 1, "boolean", false);
         const Value* def = a.get(0, "default_value");
         if (v.is_undefined() || (boolean && !truthy(v))) return def ? *def : Value::string("");
         return v; }},
      {"selectattr", [](Interp& in, const Value& v, const Args& a) { return select_items(in, v, a, true, true); }},
      {"rejectattr", [](Interp& in, const Value& v, const Args& a) { return select_items(in, v, a, true, false); }},
      {"select", [](Interp& in, const Value& v, const Args& a) { return select_items(in, v, a, false, true); }},
      {"reject", [](Interp& in, const Value& v, const Args& a) { return select_items(in, v, a, false, false); }},
      {"map", map_items},
      {"sort", sort_items},
      {"unique", [](Interp& in, const Value& v, const Args&) { return unique(in, v); }},
      {"reverse", [](Interp& in, const Value& v, const Args&) { return reverse(in, v); }},
      {"string", [](Interp&, const Value& v, const Args&) { return Value::string(to_str(v)); }},
      {"safe", [](Interp&, const Value& v, const Args&) { return v; }},
      {"escape", [](Interp&, const Value& v, const Args&) { return escape_html(to_str(v)); }},
      {"int", [](Interp&, const Value& v, const Args& a) { return to_int(v, a.get(0, "default")); }},
      {"float", [](Interp&, const Value& v, const Args&) {
         if (v.is_number()) return Value::number(v.as_double());
         char* end = nullptr;
         const double d = v.is_string() ? std::strtod(v.s.c_str(), &end) : 0.0;
         return Value::number(v.is_string() && end && *end == '\0' ? d : 0.0); }},
      {"abs", [](Interp& in, const Value& v, const Args&) {
         if (v.kind == Kind::Float) return Value::number(std::fabs(v.f));
         if (!v.is_number()) in.error("bad operand type for abs(): '{}'", kind_name(v.kind));
         return Value::integer(std::llabs(v.kind == Kind::Bool ? v.b : v.i)); }},
      {"round", [](Interp& in, const Value& v, const Args& a) {
         if (!v.is_number()) in.error("round needs a number, got {}", kind_name(v.kind));
         const double scale = std::pow(10.0, double(arg_int(in, a, 0, "precision", 0)));
         const std::string method = arg_str(in, a, 1, "method", "common");
         const double x = v.as_double() * scale;
         const double r = method == "ceil" ? std::ceil(x) : method == "floor" ? std::floor(x) : std::round(x);
         return Value::number(r / scale); }},
      {"min", [](Interp& in, const Value& v, const Args&) { return min_max(in, v, false); }},
      {"max", [](Interp& in, const Value& v, const Args&) { return min_max(in, v, true); }},
      {"sum", [](Interp& in, const Value& v, const Args& a) {
         Value acc = a.get(1, "start") ? *a.get(1, "start") : Value::integer(0);
         const Value* attr = a.get(0, "attribute");
         for (const Value& x : iterate(in, v)) {
           const Value y = attr ? attr_path(in, x, need_str(in, *attr, "sum(attribute=)")) : x;
           if (!y.is_number() || !acc.is_number()) in.error("sum needs numbers");
           acc = acc.kind == Kind::Float || y.kind == Kind::Float ? Value::number(acc.as_double() + y.as_double())
                                                                  : Value::integer(int64_t(acc.as_double()) + int64_t(y.as_double()));
         }
         return acc; }},
      {"indent", indent},
      {"wordcount", [](Interp&, const Value& v, const Args&) {
         return Value::integer(int64_t(split(to_str(v), nullptr, -1).size())); }},
  };
  return table;
}

// ---- tests -------------------------------------------------------------------------------------

using TestFn = bool (*)(Interp&, const Value&, const Args&);

const Value& test_arg(Interp& in, const Args& a, const char* test) {
  if (a.pos.empty()) in.error("test '{}' needs an argument", test);
  return a.pos[0];
}

const std::map<std::string, TestFn, std::less<>>& tests() {
  static const std::map<std::string, TestFn, std::less<>> table = {
      {"defined", [](Interp&, const Value& v, const Args&) { return !v.is_undefined(); }},
      {"undefined", [](Interp&, const Value& v, const Args&) { return v.is_undefined(); }},
      {"none", [](Interp&, const Value& v, const Args&) { return v.is_none(); }},
      {"string", [](Interp&, const Value& v, const Args&) { return v.is_string(); }},
      {"mapping", [](Interp&, const Value& v, const Args&) { return v.is_dict(); }},
      {"iterable", [](Interp&, const Value& v, const Args&) {
         return v.is_list() || v.is_dict() || v.is_string() || v.is_undefined(); }},
      {"sequence", [](Interp&, const Value& v, const Args&) {
         return v.is_list() || v.is_dict() || v.is_string(); }},
      {"number", [](Interp&, const Value& v, const Args&) { return v.is_number(); }},
      {"integer", [](Interp&, const Value& v, const Args&) { return v.kind == Kind::Int; }},
      {"float", [](Interp&, const Value& v, const Args&) { return v.kind == Kind::Float; }},
      {"boolean", [](Interp&, const Value& v, const Args&) { return v.kind == Kind::Bool; }},
      {"true", [](Interp&, const Value& v, const Args&) { return v.kind == Kind::Bool && v.b; }},
      {"false", [](Interp&, const Value& v, const Args&) { return v.kind == Kind::Bool && !v.b; }},
      {"callable", [](Interp&, const Value& v, const Args&) { return v.kind == Kind::Callable; }},
      {"lower", [](Interp&, const Value& v, const Args&) { return v.is_string() && ascii_lower(v.s) == v.s; }},
      {"upper", [](Interp&, const Value& v, const Args&) { return v.is_string() && ascii_upper(v.s) == v.s; }},
      {"odd", [](Interp& in, const Value& v, const Args&) {
         if (v.kind != Kind::Int) in.error("test 'odd' needs an integer");
         return v.i % 2 != 0; }},
      {"even", [](Interp& in, const Value& v, const Args&) {
         if (v.kind != Kind::Int) in.error("test 'even' needs an integer");
         return v.i % 2 == 0; }},
      {"divisibleby", [](Interp& in, const Value& v, const Args& a) {
         const Value& d = test_arg(in, a, "divisibleby");
         if (v.kind != Kind::Int || d.kind != Kind::Int || d.i == 0) in.error("test 'divisibleby' needs non-zero integers");
         return v.i % d.i == 0; }},
      {"eq", [](Interp& in, const Value& v, const Args& a) { return equal(v, test_arg(in, a, "eq")); }},
      {"ne", [](Interp& in, const Value& v, const Args& a) { return !equal(v, test_arg(in, a, "ne")); }},
      {"lt", [](Interp& in, const Value& v, const Args& a) { return less(in, v, test_arg(in, a, "lt")); }},
      {"gt", [](Interp& in, const Value& v, const Args& a) { return less(in, test_arg(in, a, "gt"), v); }},
      {"le", [](Interp& in, const Value& v, const Args& a) { return !less(in, test_arg(in, a, "le"), v); }},
      {"ge", [](Interp& in, const Value& v, const Args& a) { return !less(in, v, test_arg(in, a, "ge")); }},
      {"sameas", [](Interp& in, const Value& v, const Args& a) {
         const Value& o = test_arg(in, a, "sameas");
         if (v.kind != o.kind) return false;
         if (v.is_list()) return v.list == o.list;
         if (v.is_dict()) return v.dict == o.dict;
         return equal(v, o); }},
      {"in", [](Interp& in, const Value& v, const Args& a) {
         const Value& seq = test_arg(in, a, "in");
         if (seq.is_string()) return v.is_string() && seq.s.find(v.s) != std::string::npos;
         if (seq.is_dict()) return seq.dict->find(v) != nullptr;
         for (const Value& x : iterate(in, seq))
           if (equal(x, v)) return true;
         return false; }},
  };
  return table;
}

// ---- methods -----------------------------------------------------------------------------------

bool string_method(Interp& in, const std::string& s, const std::string& name, const Args& a, Value* out) {
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    const std::string chars = arg_str(in, a, 0, "chars", kSpace);
    *out = Value::string(strip(s, chars, name != "rstrip", name != "lstrip"));
  } else if (name == "split") {
    const Value* sep = a.get(0, "sep");
    if (sep && !sep->is_none() && (!sep->is_string() || sep->s.empty())) in.error("split: bad separator");
    *out = Value::make_list(split(s, sep, arg_int(in, a, 1, "maxsplit", -1)));
  } else if (name == "startswith" || name == "endswith") {
    const Value* p = a.get(0, "prefix");
    if (!p) in.error("{} needs an argument", name);
    const List options = p->is_list() ? *p->list : List{*p};
    bool r = false;
    for (const Value& o : options) {
      const std::string x = need_str(in, o, name);
      r |= name == "startswith" ? s.compare(0, x.size(), x) == 0 && s.size() >= x.size()
                                : s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0;
    }
    *out = Value::boolean(r);
  } else if (name == "upper" || name == "lower") {
    *out = Value::string(name == "upper" ? ascii_upper(s) : ascii_lower(s));
  } else if (name == "title") {
    *out = Value::string(py_title(s));
  } else if (name == "capitalize") {
    *out = Value::string(capitalize(s));
  } else if (name == "replace") {
    *out = Value::string(replace_all(in, s, arg_str(in, a, 0, "old", ""), arg_str(in, a, 1, "new", ""),
                                     arg_int(in, a, 2, "count", -1)));
  } else if (name == "format") {
    *out = Value::string(py_format(in, s, a));
  } else if (name == "find" || name == "count") {
    const std::string x = arg_str(in, a, 0, "sub", "");
    if (name == "find") {
      const size_t p = s.find(x);
      *out = Value::integer(p == std::string::npos ? -1 : int64_t(utf8_length(s.substr(0, p))));
    } else {
      int64_t n = 0;
      for (size_t p = s.find(x); !x.empty() && p != std::string::npos; p = s.find(x, p + x.size())) ++n;
      *out = Value::integer(x.empty() ? int64_t(utf8_length(s)) + 1 : n);
    }
  } else if (name == "join") {
    std::string r;
    const List items = a.pos.empty() ? List{} : iterate(in, a.pos[0]);
    for (size_t k = 0; k < items.size(); ++k) r += (k ? s : "") + need_str(in, items[k], "str.join");
    *out = Value::string(r);
  } else if (name == "splitlines") {
    List l = split(s, nullptr, -1);
    l.clear();
    for (size_t p = 0; p < s.size();) {
      const size_t e = s.find('\n', p);
      l.push_back(Value::string(s.substr(p, e == std::string::npos ? std::string::npos : e - p)));
      p = e == std::string::npos ? s.size() : e + 1;
    }
    *out = Value::make_list(std::move(l));
  } else if (name == "isdigit" || name == "isalpha" || name == "isspace" || name == "isalnum") {
    auto pred = name == "isdigit" ? ::isdigit : name == "isalpha" ? ::isalpha : name == "isspace" ? ::isspace : ::isalnum;
    *out = Value::boolean(!s.empty() && std::all_of(s.begin(), s.end(), [&](char c) { return pred(static_cast<unsigned char>(c)) != 0; }));
  } else {
    return false;
  }
  return true;
}

bool dict_method(Interp& in, const Value& d, const std::string& name, const Args& a, Value* out) {
  if (name == "get") {
    const Value* k = a.get(0, "key");
    if (!k) in.error("dict.get needs a key");
    const Value* v = d.dict->find(*k);
    const Value* def = a.get(1, "default");
    *out = v ? *v : def ? *def : Value::none();
  } else if (name == "items") {
    *out = dict_items(in, d);
  } else if (name == "keys" || name == "values") {
    List l;
    for (const auto& [k, v] : d.dict->items) l.push_back(name == "keys" ? k : v);
    *out = Value::make_list(std::move(l));
  } else if (name == "update" || name == "pop" || name == "setdefault" || name == "clear") {
    in.error("dict.{}() modifies a dict, which templates may not do (jinja2's immutable sandbox)", name);
  } else {
    return false;
  }
  return true;
}

bool list_method(Interp& in, const Value& l, const std::string& name, const Args& a, Value* out) {
  if (name == "append" || name == "pop" || name == "extend" || name == "insert" ||
      name == "remove" || name == "clear" || name == "sort" || name == "reverse") {
    in.error("list.{}() modifies a list, which templates may not do (jinja2's immutable sandbox)", name);
  } else if (name == "index" || name == "count") {
    const Value* x = a.get(0, "value");
    if (!x) in.error("list.{} needs an argument", name);
    int64_t n = 0;
    for (size_t k = 0; k < l.list->size(); ++k) {
      if (!equal((*l.list)[k], *x)) continue;
      if (name == "index") { *out = Value::integer(int64_t(k)); return true; }
      ++n;
    }
    if (name == "index") in.error("list.index: value is not in the list");
    *out = Value::integer(n);
  } else {
    return false;
  }
  return true;
}

// ---- globals -----------------------------------------------------------------------------------

Value range_fn(Interp& in, const Args& a) {
  int64_t start = 0, stop = 0, step = 1;
  auto num = [&](size_t k) {
    if (a.pos[k].kind != Kind::Int) in.error("range() needs integers");
    return a.pos[k].i;
  };
  if (a.pos.size() == 1) stop = num(0);
  else if (a.pos.size() >= 2) start = num(0), stop = num(1);
  if (a.pos.size() == 3) step = num(2);
  if (a.pos.empty() || a.pos.size() > 3 || step == 0) in.error("range() takes 1 to 3 integers, step not 0");
  List l;
  for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
    in.step();
    l.push_back(Value::integer(k));
    in.check_size(l.size());
  }
  return Value::make_list(std::move(l));
}

const std::map<std::string, Value, std::less<>>& globals() {
  static const std::map<std::string, Value, std::less<>> table = {
      {"range", Value::callable("range", range_fn)},
      {"namespace", Value::callable("namespace", [](Interp& in, const Args& a) {
         Value ns = Value::make_dict();
         ns.dict->is_namespace = true;
         for (const Value& p : a.pos) {
           if (!p.is_dict()) in.error("namespace() takes a mapping or keyword arguments");
           for (const auto& [k, v] : p.dict->items) ns.dict->set(k, v);
         }
         for (const auto& [k, v] : a.kw) ns.dict->set(k, v);
         return ns; })},
      {"dict", Value::callable("dict", [](Interp&, const Args& a) {
         Value d = Value::make_dict();
         for (const auto& [k, v] : a.kw) d.dict->set(k, v);
         return d; })},
      {"raise_exception", Value::callable("raise_exception", [](Interp& in, const Args& a) -> Value {
         throw TemplateRaised(fmt::format("template line {}: raise_exception: {}", in.line,
                                          a.pos.empty() ? "" : to_str(a.pos[0]))); })},
  };
  return table;
}

}  // namespace

Value apply_filter(Interp& in, const std::string& name, const Value& v, const Args& args) {
  static const std::map<std::string, std::string, std::less<>> aliases = {
      {"d", "default"}, {"count", "length"}, {"e", "escape"}};
  const auto a = aliases.find(name);
  const auto& table = filters();
  const auto it = table.find(a != aliases.end() ? a->second : name);
  if (it == table.end()) in.error("unknown filter '{}'", name);
  return it->second(in, v, args);
}

bool apply_test(Interp& in, const std::string& name, const Value& v, const Args& args) {
  static const std::map<std::string, std::string, std::less<>> aliases = {
      {"equalto", "eq"}, {"==", "eq"}, {"!=", "ne"}, {"lessthan", "lt"}, {"greaterthan", "gt"},
      {"<", "lt"}, {">", "gt"}, {"<=", "le"}, {">=", "ge"}};
  const auto a = aliases.find(name);
  const auto& table = tests();
  const auto it = table.find(a != aliases.end() ? a->second : name);
  if (it == table.end()) in.error("unknown test '{}'", name);
  return it->second(in, v, args);
}

bool call_method(Interp& in, const Value& obj, const std::string& name, const Args& args, Value* out) {
  switch (obj.kind) {
    case Kind::String: return string_method(in, obj.s, name, args, out);
    case Kind::Dict:
      if (obj.dict->is_namespace) return false;
      return dict_method(in, obj, name, args, out);
    case Kind::List: return list_method(in, obj, name, args, out);
    default: return false;
  }
}

const Value* builtin_global(const std::string& name) {
  const auto& g = globals();
  const auto it = g.find(name);
  return it == g.end() ? nullptr : &it->second;
}

Value get_attr(Interp& in, const Value& obj, const std::string& name) {
  if (obj.is_undefined()) in.undefined_error(obj);
  if (obj.is_dict()) {
    const Value* v = obj.dict->find(name);
    return v ? *v : Value::undefined(name);
  }
  return Value::undefined(name);
}

Value get_item(Interp& in, const Value& obj, const Value& key) {
  if (obj.is_undefined()) in.undefined_error(obj);
  if (obj.is_dict()) {
    const Value* v = obj.dict->find(key);
    return v ? *v : Value::undefined(to_str(key));
  }
  if ((obj.is_list() || obj.is_string()) && (key.kind == Kind::Int || key.kind == Kind::Bool)) {
    int64_t i = key.kind == Kind::Bool ? key.b : key.i;
    if (obj.is_list()) {
      const auto n = static_cast<int64_t>(obj.list->size());
      if (i < 0) i += n;
      return i >= 0 && i < n ? (*obj.list)[size_t(i)] : Value::undefined();
    }
    const std::vector<std::string> chars = utf8_chars(obj.s);
    const auto n = static_cast<int64_t>(chars.size());
    if (i < 0) i += n;
    return i >= 0 && i < n ? Value::string(chars[size_t(i)]) : Value::undefined();
  }
  if (key.is_string()) return get_attr(in, obj, key.s);
  return Value::undefined();
}

bool less(Interp& in, const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.kind != Kind::Float && b.kind != Kind::Float)
      return (a.kind == Kind::Bool ? a.b : a.i) < (b.kind == Kind::Bool ? b.b : b.i);
    return a.as_double() < b.as_double();
  }
  if (a.is_string() && b.is_string()) return a.s < b.s;
  if (a.is_list() && b.is_list()) {
    for (size_t k = 0; k < a.list->size() && k < b.list->size(); ++k) {
      if (less(in, (*a.list)[k], (*b.list)[k])) return true;
      if (less(in, (*b.list)[k], (*a.list)[k])) return false;
    }
    return a.list->size() < b.list->size();
  }
  if (a.is_undefined()) in.undefined_error(a);
  if (b.is_undefined()) in.undefined_error(b);
  in.error("'<' not supported between '{}' and '{}'", kind_name(a.kind), kind_name(b.kind));
}

List iterate(Interp& in, const Value& v) {
  switch (v.kind) {
    case Kind::List: return *v.list;
    case Kind::Undefined: return {};
    case Kind::String: {
      List l;
      for (std::string& c : utf8_chars(v.s)) l.push_back(Value::string(std::move(c)));
      return l;
    }
    case Kind::Dict: {
      List l;
      for (const auto& [k, x] : v.dict->items) l.push_back(k);
      return l;
    }
    default: in.error("'{}' object is not iterable", kind_name(v.kind));
  }
}

}  // namespace kvlm::tmpl
