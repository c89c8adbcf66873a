// The evaluator's state, shared by eval.cpp (statements, expressions) and builtins.cpp (filters,
// tests, methods, global functions). Internal to src/template.
#pragma once

#include <string>
#include <unordered_map>
#include <vector>

#include "base/error.h"
#include "template/ast.h"
#include "template/template.h"
#include "template/value.h"

namespace kvlm::tmpl {

struct Frame {
  std::unordered_map<std::string, Value> vars;
  bool macro = false;  // a macro's frame: names not found here resolve in the template's frame
};

enum class Flow { Normal, Break, Continue };

struct Interp {
  const Limits& limits;
  std::vector<Frame> frames;  // frames[0]: the context and the template's top-level variables
  int64_t steps = 0;
  int depth = 0;  // macro calls in progress
  int line = 0;   // the line of the node being evaluated, for errors

  explicit Interp(const Limits& l) : limits(l) {}

  template <class... A>
  [[noreturn]] void error(fmt::format_string<A...> f, A&&... a) const {
    throw Error("template line " + std::to_string(line) + ": " +
                fmt::format(f, std::forward<A>(a)...));
  }
  void step() {
    if (++steps > limits.max_steps)
      error("the template ran more than {} steps (a loop that does not end?)", limits.max_steps);
  }
  // Strings and lists are bounded like the output, so no expression can exhaust memory.
  void check_size(size_t n) const {
    if (n > limits.max_output)
      error("a value grew past {} bytes, the template output limit", limits.max_output);
  }

  Value lookup(const std::string& name) const;
  void assign(const std::string& name, Value v) { frames.back().vars[name] = std::move(v); }

  void exec_body(const std::vector<NodePtr>& body, std::string& out, Flow* flow);
  Value eval(const Node& n);
  std::string capture(const std::vector<NodePtr>& body);  // renders body into a string
  Value call(const Value& fn, const Args& args);
  Value call_macro(const Node& m, const Args& args, const Value& caller);
  [[noreturn]] void undefined_error(const Value& v) const;
};

// builtins.cpp
Value apply_filter(Interp& in, const std::string& name, const Value& v, const Args& args);
bool apply_test(Interp& in, const std::string& name, const Value& v, const Args& args);
// A method of a str, dict or list (`s.strip()`, `d.get(k)`); false when `obj` has none by that
// name, so the caller falls back to an attribute holding a callable.
bool call_method(Interp& in, const Value& obj, const std::string& name, const Args& args,
                 Value* out);
const Value* builtin_global(const std::string& name);
// Python-like attribute and item access (getattr then getitem, as jinja2's environment does).
Value get_attr(Interp& in, const Value& obj, const std::string& name);
Value get_item(Interp& in, const Value& obj, const Value& key);
// Python's < for numbers and strings; errors for other kinds.
bool less(Interp& in, const Value& a, const Value& b);
// Items of an iterable: list items, dict keys, string characters; Undefined is empty.
List iterate(Interp& in, const Value& v);

}  // namespace kvlm::tmpl
