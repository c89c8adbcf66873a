// Values of kvlm's Jinja interpreter: what Python objects are to jinja2, restricted to the kinds
// chat templates see (none, booleans, integers, floats, strings, lists, dicts, callables) plus
// jinja2's default Undefined. Lists and dicts are shared by reference, as in Python, so that a
// namespace() assigned to two names is one object; dicts keep insertion order, as Python's do.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kvlm::tmpl {

struct Value;
struct Interp;
using List = std::vector<Value>;
struct Dict;

// Arguments of a call: positional, then keyword (name, value) in call order.
struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
  const Value* get(size_t i, std::string_view name) const;  // positional i or keyword name
};

struct Callable {
  std::string name;
  std::function<Value(Interp&, const Args&)> fn;
};

enum class Kind { Undefined, None, Bool, Int, Float, String, List, Dict, Callable };

struct Value {
  Kind kind = Kind::Undefined;
  bool b = false;
  bool tuple = false;  // List: written as Python writes a tuple, (1, 2)
  int64_t i = 0;
  double f = 0;
  std::string s;  // String: the UTF-8 text; Undefined: the name that was looked up (for errors)
  std::shared_ptr<List> list;
  std::shared_ptr<Dict> dict;
  std::shared_ptr<const Callable> fn;

  static Value undefined(std::string name = "") { Value v; v.s = std::move(name); return v; }
  static Value none() { Value v; v.kind = Kind::None; return v; }
  static Value boolean(bool x) { Value v; v.kind = Kind::Bool; v.b = x; return v; }
  static Value integer(int64_t x) { Value v; v.kind = Kind::Int; v.i = x; return v; }
  static Value number(double x) { Value v; v.kind = Kind::Float; v.f = x; return v; }
  static Value string(std::string x) { Value v; v.kind = Kind::String; v.s = std::move(x); return v; }
  static Value make_list(List items = {});
  static Value make_dict();
  static Value callable(std::string name, std::function<Value(Interp&, const Args&)> fn);

  bool is_undefined() const { return kind == Kind::Undefined; }
  bool is_none() const { return kind == Kind::None; }
  bool is_string() const { return kind == Kind::String; }
  bool is_list() const { return kind == Kind::List; }
  bool is_dict() const { return kind == Kind::Dict; }
  bool is_number() const { return kind == Kind::Int || kind == Kind::Float || kind == Kind::Bool; }
  double as_double() const { return kind == Kind::Float ? f : kind == Kind::Bool ? b : double(i); }
};

// Keys are strings in all but rare templates (ByteDance's {0: 0, 512: 128} table); any
// non-container value may be one, compared with Python's == (1, 1.0 and True are one key).
struct Dict {
  std::vector<std::pair<Value, Value>> items;
  bool is_namespace = false;  // namespace(): the only object `set obj.attr = ...` may assign to
  const Value* find(std::string_view key) const;
  const Value* find(const Value& key) const;
  void set(const std::string& key, Value v) { set(Value::string(key), std::move(v)); }
  void set(Value key, Value v);
};

// Python truthiness (Undefined is false).
bool truthy(const Value& v);
// Python's str() (Undefined renders as the empty string); repr() for items inside containers.
std::string to_str(const Value& v);
std::string repr(const Value& v);
// Python == between values (1 == 1.0 == True; lists and dicts compared item by item).
bool equal(const Value& a, const Value& b);
// Python's json.dumps arguments: indent < 0 means None; the separators default to ", " and ": "
// (json.dumps uses "," with an indent: callers pass it).
struct JsonStyle {
  int indent = -1;
  bool sort_keys = false;
  std::string_view item_sep = ", ";
  std::string_view key_sep = ": ";
  bool ensure_ascii = false;
};
// Python's json.dumps(v, ...) in the given style.
std::string to_json(const Value& v, const JsonStyle& style);
// Python float repr (shortest round trip, "1.0" not "1").
std::string float_repr(double x);
const char* kind_name(Kind k);

// UTF-8 helpers: strings are indexed, sliced and measured in code points, as Python's are.
std::vector<std::string> utf8_chars(std::string_view s);
size_t utf8_length(std::string_view s);

}  // namespace kvlm::tmpl
