// kvlm's Jinja interpreter: the subset of Jinja2 that chat templates use, with jinja2's semantics
// (default Undefined, Python's str/repr/truthiness, HF's tojson), written here because Debian 12
// packages no C++ Jinja. Templates come from model files, so everything is bounded: nesting
// depth, evaluation steps (loop iterations and calls) and output and string sizes; a template
// that passes a bound, or uses a construct kvlm does not support, fails with a kvlm::Error whose
// message names the template line ("template line 12: unknown filter 'wordwrap'").
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "base/error.h"
#include "template/value.h"

namespace kvlm::tmpl {

struct Options {
  bool trim_blocks = true;    // drop the first newline after a block tag or comment (HF's setting)
  bool lstrip_blocks = true;  // drop spaces and tabs before a block tag or comment on its line
};

struct Limits {
  int max_depth = 200;                  // nested statements/expressions when parsing, and calls
  int64_t max_steps = 20'000'000;       // expression evaluations and loop iterations per render
  size_t max_output = size_t(16) << 20;  // bytes of output, and of any one string or list value
};

// What raise_exception() throws: the template refusing its input (a conversation it does not
// accept), as opposed to a template kvlm cannot render.
class TemplateRaised : public Error {
 public:
  using Error::Error;
};

struct Node;

class Template {
 public:
  // Throws kvlm::Error "template line N: ..." on syntax errors and unsupported statements.
  static Template parse(std::string_view source, const Options& opt = {},
                        const Limits& limits = {});
  // Renders with the variables of `context` (a dict) over the built-in globals (range,
  // namespace, raise_exception, strftime_now, dict, ...). Throws kvlm::Error naming the line for
  // raise_exception(), undefined attribute access, type errors and exceeded limits.
  std::string render(const Value& context) const;

 private:
  std::shared_ptr<const void> root_;  // the statement list (ast.h)
  Limits limits_;
};

}  // namespace kvlm::tmpl
