// The evaluator: statements write into an output string, expressions produce Values, with
// jinja2's scoping (a for loop's body and a macro have their own variables; if does not; set in a
// loop does not leak out, which is why templates use namespace()).

#include <cmath>
#include <string>

#include "template/interp.h"

namespace kvlm::tmpl {

// ---- template ----------------------------------------------------------------------------------

Template Template::parse(std::string_view source, const Options& opt, const Limits& limits) {
  auto body = std::make_shared<std::vector<NodePtr>>(tmpl::parse(lex(source, opt), opt));
  Template t;
  t.root_ = body;
  t.limits_ = limits;
  return t;
}

std::string Template::render(const Value& context) const {
  Interp in(limits_);
  in.frames.emplace_back();
  if (context.is_dict())
    for (const auto& [k, v] : context.dict->items) in.frames[0].vars[to_str(k)] = v;
  std::string out;
  Flow flow = Flow::Normal;
  in.exec_body(*static_cast<const std::vector<NodePtr>*>(root_.get()), out, &flow);
  if (flow != Flow::Normal) in.error("'break' or 'continue' outside a for loop");
  return out;
}

// ---- names -------------------------------------------------------------------------------------

Value Interp::lookup(const std::string& name) const {
  for (size_t k = frames.size(); k-- > 0;) {
    if (auto it = frames[k].vars.find(name); it != frames[k].vars.end()) return it->second;
    if (frames[k].macro && k > 0) {
      if (auto it = frames[0].vars.find(name); it != frames[0].vars.end()) return it->second;
      break;
    }
  }
  if (const Value* g = builtin_global(name)) return *g;
  return Value::undefined(name);
}

void Interp::undefined_error(const Value& v) const {
  if (v.s.empty()) error("a value is undefined");
  error("'{}' is undefined", v.s);
}

// ---- statements --------------------------------------------------------------------------------

namespace {

void append_out(Interp& in, std::string& out, std::string_view s) {
  out += s;
  if (out.size() > in.limits.max_output)
    in.error("the template output passed {} bytes", in.limits.max_output);
}

void assign_targets(Interp& in, const std::vector<std::string>& names, const Value& v) {
  if (names.size() == 1) return in.assign(names[0], v);
  const List items = iterate(in, v);
  if (items.size() != names.size())
    in.error("cannot unpack {} values into {} names", items.size(), names.size());
  for (size_t k = 0; k < names.size(); ++k) in.assign(names[k], items[k]);
}

Value make_loop(const List& items, size_t k) {
  Value loop = Value::make_dict();
  const auto n = static_cast<int64_t>(items.size());
  const auto i = static_cast<int64_t>(k);
  Dict& d = *loop.dict;
  d.set("index", Value::integer(i + 1));
  d.set("index0", Value::integer(i));
  d.set("revindex", Value::integer(n - i));
  d.set("revindex0", Value::integer(n - i - 1));
  d.set("first", Value::boolean(i == 0));
  d.set("last", Value::boolean(i == n - 1));
  d.set("length", Value::integer(n));
  d.set("depth", Value::integer(1));
  d.set("depth0", Value::integer(0));
  d.set("previtem", k > 0 ? items[k - 1] : Value::undefined("previtem"));
  d.set("nextitem", k + 1 < items.size() ? items[k + 1] : Value::undefined("nextitem"));
  d.set("cycle", Value::callable("cycle", [i](Interp& in, const Args& a) {
          if (a.pos.empty()) in.error("loop.cycle() needs at least one value");
          return a.pos[size_t(i) % a.pos.size()];
        }));
  return loop;
}

void exec_for(Interp& in, const Node& n, std::string& out) {
  const Value seq = in.eval(*n.a);
  if (seq.is_none() || seq.kind == Kind::Int || seq.kind == Kind::Float || seq.kind == Kind::Bool)
    in.error("'{}' object is not iterable", kind_name(seq.kind));
  List items = iterate(in, seq);
  in.frames.emplace_back();
  if (n.b) {  // {% for x in xs if cond %}: filtered before loop.* is computed
    List kept;
    for (const Value& it : items) {
      assign_targets(in, n.names, it);
      if (truthy(in.eval(*n.b))) kept.push_back(it);
    }
    items = std::move(kept);
  }
  for (size_t k = 0; k < items.size(); ++k) {
    in.step();
    assign_targets(in, n.names, items[k]);
    in.assign("loop", make_loop(items, k));
    Flow flow = Flow::Normal;
    in.exec_body(n.body, out, &flow);
    if (flow == Flow::Break) break;
  }
  in.frames.pop_back();
  if (items.empty()) {
    Flow flow = Flow::Normal;
    in.exec_body(n.else_body, out, &flow);
  }
}

void exec_set(Interp& in, const Node& n) {
  Value v = in.eval(*n.a);
  if (!n.b) return assign_targets(in, n.names, v);
  const Value obj = in.eval(*n.b);
  if (!obj.is_dict() || !obj.dict->is_namespace)
    in.error("cannot assign attribute '{}' on a {} (only on a namespace())", n.name,
             kind_name(obj.kind));
  obj.dict->set(n.name, std::move(v));
}

Value macro_value(const NodePtr& m) {
  return Value::callable(m->name, [m](Interp& in, const Args& a) {
    const Value* caller = nullptr;
    for (const auto& [k, v] : a.kw)
      if (k == "caller") caller = &v;
    return in.call_macro(*m, a, caller ? *caller : Value::undefined("caller"));
  });
}

}  // namespace

void Interp::exec_body(const std::vector<NodePtr>& body, std::string& out, Flow* flow) {
  for (const NodePtr& p : body) {
    const Node& n = *p;
    line = n.line;
    step();
    switch (n.kind) {
      case N::Text: append_out(*this, out, n.name); break;
      case N::Output: {
        const Value v = eval(*n.a);
        append_out(*this, out, to_str(v));
        break;
      }
      case N::If:
        exec_body(truthy(eval(*n.a)) ? n.body : n.else_body, out, flow);
        break;
      case N::For: exec_for(*this, n, out); break;
      case N::Set: exec_set(*this, n); break;
      case N::SetBlock: assign(n.names[0], Value::string(capture(n.body))); break;
      case N::Macro: assign(n.name, macro_value(p)); break;
      case N::CallBlock: {
        auto caller = std::make_shared<Node>(n);
        caller->name = "caller";
        Args args;
        for (const NodePtr& a : n.a->args) args.pos.push_back(eval(*a));
        for (const auto& [k, a] : n.a->kwargs) args.kw.emplace_back(k, eval(*a));
        args.kw.emplace_back("caller", macro_value(caller));
        append_out(*this, out, to_str(call(eval(*n.a->a), args)));
        break;
      }
      case N::FilterBlock: {
        Args args;
        for (const NodePtr& a : n.a->args) args.pos.push_back(eval(*a));
        for (const auto& [k, a] : n.a->kwargs) args.kw.emplace_back(k, eval(*a));
        const Value v = apply_filter(*this, n.a->name, Value::string(capture(n.body)), args);
        append_out(*this, out, to_str(v));
        break;
      }
      case N::Scope:
        frames.emplace_back();
        exec_body(n.body, out, flow);
        frames.pop_back();
        break;
      case N::Break: *flow = Flow::Break; return;
      case N::Continue: *flow = Flow::Continue; return;
      default: error("internal: expression node used as a statement");
    }
    if (*flow != Flow::Normal) return;
  }
}

std::string Interp::capture(const std::vector<NodePtr>& body) {
  std::string s;
  Flow flow = Flow::Normal;
  exec_body(body, s, &flow);
  if (flow != Flow::Normal) error("'break' or 'continue' outside a for loop");
  return s;
}

Value Interp::call_macro(const Node& m, const Args& args, const Value& caller) {
  if (++depth > limits.max_depth) error("macro calls nested more than {} deep", limits.max_depth);
  if (args.pos.size() > m.names.size())
    error("macro '{}' takes {} arguments, {} given", m.name, m.names.size(), args.pos.size());
  Frame f;
  f.macro = true;
  frames.push_back(std::move(f));
  for (size_t k = 0; k < m.names.size(); ++k) {
    const Value* v = args.get(k, m.names[k]);
    if (v) {
      assign(m.names[k], *v);
      continue;
    }
    Value def = Value::undefined(m.names[k]);
    for (const auto& [name, expr] : m.kwargs)
      if (name == m.names[k]) def = eval(*expr);
    assign(m.names[k], def);
  }
  for (const auto& [k, v] : args.kw) {
    bool known = k == "caller";
    for (const std::string& p : m.names) known |= p == k;
    if (!known) error("macro '{}' has no parameter '{}'", m.name, k);
  }
  if (!caller.is_undefined()) assign("caller", caller);
  const std::string s = capture(m.body);
  frames.pop_back();
  --depth;
  return Value::string(s);
}

Value Interp::call(const Value& fn, const Args& args) {
  if (fn.is_undefined()) undefined_error(fn);
  if (fn.kind != Kind::Callable) error("'{}' object is not callable", kind_name(fn.kind));
  const int saved = line;
  Value r = fn.fn->fn(*this, args);
  line = saved;
  return r;
}

}  // namespace kvlm::tmpl
