// Expression evaluation with Python's operator semantics as jinja2 inherits them.

#include <cmath>
#include <string>

#include "template/interp.h"

namespace kvlm::tmpl {

namespace {

int64_t as_int(Interp& in, const Value& v) {
  if (v.kind == Kind::Int) return v.i;
  if (v.kind == Kind::Bool) return v.b;
  in.error("expected an integer, got {}", kind_name(v.kind));
}

Value arith(Interp& in, const std::string& op, const Value& a, const Value& b) {
  if (op == "~") {
    std::string s = to_str(a) + to_str(b);
    in.check_size(s.size());
    return Value::string(std::move(s));
  }
  if (a.is_undefined()) in.undefined_error(a);
  if (b.is_undefined()) in.undefined_error(b);
  if (op == "+" && a.is_string() && b.is_string()) {
    in.check_size(a.s.size() + b.s.size());
    return Value::string(a.s + b.s);
  }
  if (op == "+" && a.is_list() && b.is_list()) {
    in.check_size(a.list->size() + b.list->size());
    List l = *a.list;
    l.insert(l.end(), b.list->begin(), b.list->end());
    return Value::make_list(std::move(l));
  }
  if (op == "*" && (a.is_string() || a.is_list()) && (b.kind == Kind::Int || b.kind == Kind::Bool)) {
    const int64_t n = std::max<int64_t>(0, as_int(in, b));
    const size_t unit = a.is_string() ? a.s.size() : a.list->size();
    if (unit && uint64_t(n) > in.limits.max_output / unit) in.check_size(in.limits.max_output + 1);
    if (a.is_string()) {
      std::string s;
      for (int64_t k = 0; k < n; ++k) s += a.s;
      return Value::string(std::move(s));
    }
    List l;
    for (int64_t k = 0; k < n; ++k) l.insert(l.end(), a.list->begin(), a.list->end());
    return Value::make_list(std::move(l));
  }
  if (!a.is_number() || !b.is_number())
    in.error("unsupported operand types for {}: '{}' and '{}'", op, kind_name(a.kind),
             kind_name(b.kind));
  const bool ints = a.kind != Kind::Float && b.kind != Kind::Float;
  if (op == "/") {
    if (b.as_double() == 0) in.error("division by zero");
    return Value::number(a.as_double() / b.as_double());
  }
  if (ints) {
    const int64_t x = as_int(in, a), y = as_int(in, b);
    int64_t r = 0;
    if (op == "+" && !__builtin_add_overflow(x, y, &r)) return Value::integer(r);
    if (op == "-" && !__builtin_sub_overflow(x, y, &r)) return Value::integer(r);
    if (op == "*" && !__builtin_mul_overflow(x, y, &r)) return Value::integer(r);
    if (op == "//" || op == "%") {
      if (y == 0) in.error("integer division or modulo by zero");
      int64_t q = x / y, m = x % y;
      if (m != 0 && ((m < 0) != (y < 0))) --q, m += y;  // Python floors
      return Value::integer(op == "//" ? q : m);
    }
    if (op == "**" && y >= 0) {
      int64_t p = 1;
      for (int64_t k = 0; k < y; ++k)
        if (__builtin_mul_overflow(p, x, &p)) in.error("integer overflow in **");
      return Value::integer(p);
    }
    if (op != "**") in.error("integer overflow in {}", op);
  }
  const double x = a.as_double(), y = b.as_double();
  if (op == "+") return Value::number(x + y);
  if (op == "-") return Value::number(x - y);
  if (op == "*") return Value::number(x * y);
  if (op == "**") return Value::number(std::pow(x, y));
  if (y == 0) in.error("float division or modulo by zero");
  if (op == "//") return Value::number(std::floor(x / y));
  return Value::number(x - y * std::floor(x / y));
}

bool contains(Interp& in, const Value& item, const Value& seq) {
  switch (seq.kind) {
    case Kind::String:
      if (!item.is_string()) in.error("'in <string>' requires a string, not {}", kind_name(item.kind));
      return seq.s.find(item.s) != std::string::npos;
    case Kind::List:
      for (const Value& v : *seq.list)
        if (equal(v, item)) return true;
      return false;
    case Kind::Dict: return seq.dict->find(item) != nullptr;
    case Kind::Undefined: return false;  // jinja2's Undefined iterates as empty
    default: in.error("argument of type '{}' is not iterable", kind_name(seq.kind));
  }
}

bool compare(Interp& in, const std::string& op, const Value& a, const Value& b) {
  if (op == "==") return equal(a, b);
  if (op == "!=") return !equal(a, b);
  if (op == "in") return contains(in, a, b);
  if (op == "not in") return !contains(in, a, b);
  if (op == "<") return less(in, a, b);
  if (op == ">") return less(in, b, a);
  if (op == "<=") return !less(in, b, a);
  return !less(in, a, b);  // >=
}

int64_t clamp_index(int64_t i, int64_t n, bool neg_step) {
  if (i < 0) i += n;
  if (neg_step) return std::clamp<int64_t>(i, -1, n - 1);
  return std::clamp<int64_t>(i, 0, n);
}

Value slice(Interp& in, const Value& obj, const Value parts[3]) {
  if (obj.is_undefined()) in.undefined_error(obj);
  if (!obj.is_list() && !obj.is_string()) in.error("'{}' object is not subscriptable", kind_name(obj.kind));
  const List items = obj.is_list() ? *obj.list : List{};
  const std::vector<std::string> chars = obj.is_string() ? utf8_chars(obj.s) : std::vector<std::string>{};
  const auto n = static_cast<int64_t>(obj.is_list() ? items.size() : chars.size());
  const int64_t step = parts[2].is_none() || parts[2].is_undefined() ? 1 : as_int(in, parts[2]);
  if (step == 0) in.error("slice step cannot be zero");
  const bool neg = step < 0;
  const auto bound = [&](const Value& v, int64_t def) {
    return v.is_none() || v.is_undefined() ? def : clamp_index(as_int(in, v), n, neg);
  };
  const int64_t start = bound(parts[0], neg ? n - 1 : 0);
  const int64_t stop = bound(parts[1], neg ? -1 : n);
  List out_list;
  std::string out_str;
  for (int64_t k = start; neg ? k > stop : k < stop; k += step) {
    if (obj.is_list()) out_list.push_back(items[size_t(k)]);
    else out_str += chars[size_t(k)];
  }
  return obj.is_list() ? Value::make_list(std::move(out_list)) : Value::string(std::move(out_str));
}

Args eval_args(Interp& in, const Node& n) {
  Args a;
  for (const NodePtr& p : n.args) a.pos.push_back(in.eval(*p));
  for (const auto& [k, p] : n.kwargs) a.kw.emplace_back(k, in.eval(*p));
  return a;
}

Value eval_call(Interp& in, const Node& n) {
  if (n.a->kind == N::Attr) {  // obj.method(...)
    const Value obj = in.eval(*n.a->a);
    if (obj.is_undefined()) in.undefined_error(obj);
    const Args args = eval_args(in, n);
    in.line = n.line;
    Value r;
    if (call_method(in, obj, n.a->name, args, &r)) return r;
    return in.call(get_attr(in, obj, n.a->name), args);
  }
  const Value fn = in.eval(*n.a);
  const Args args = eval_args(in, n);
  in.line = n.line;
  return in.call(fn, args);
}

}  // namespace

Value Interp::eval(const Node& n) {
  step();
  line = n.line;
  switch (n.kind) {
    case N::Literal: return n.value;
    case N::Name: return lookup(n.name);
    case N::List:
    case N::Tuple: {
      List l;
      for (const NodePtr& p : n.args) l.push_back(eval(*p));
      Value v = Value::make_list(std::move(l));
      v.tuple = n.kind == N::Tuple;
      return v;
    }
    case N::DictLit: {
      Value d = Value::make_dict();
      for (size_t k = 0; k + 1 < n.args.size(); k += 2) {
        const Value key = eval(*n.args[k]);
        if (key.is_list() || key.is_dict() || key.is_undefined())
          error("unhashable dict key of type '{}'", kind_name(key.kind));
        d.dict->set(key, eval(*n.args[k + 1]));
      }
      return d;
    }
    case N::Attr: return get_attr(*this, eval(*n.a), n.name);
    case N::Item: {
      const Value obj = eval(*n.a);
      return get_item(*this, obj, eval(*n.b));
    }
    case N::Slice: {
      const Value obj = eval(*n.a);
      Value parts[3];
      for (int k = 0; k < 3; ++k) parts[k] = n.args[k] ? eval(*n.args[k]) : Value::none();
      return slice(*this, obj, parts);
    }
    case N::Call: return eval_call(*this, n);
    case N::Filter: {
      const Value v = eval(*n.a);
      const Args args = eval_args(*this, n);
      line = n.line;
      return apply_filter(*this, n.name, v, args);
    }
    case N::Test: {
      const Value v = eval(*n.a);
      const Args args = eval_args(*this, n);
      line = n.line;
      return Value::boolean(apply_test(*this, n.name, v, args) != n.negate);
    }
    case N::Neg:
    case N::Pos: {
      const Value v = eval(*n.a);
      if (!v.is_number()) error("bad operand type for unary {}: '{}'", n.kind == N::Neg ? '-' : '+', kind_name(v.kind));
      if (n.kind == N::Pos) return v.kind == Kind::Bool ? Value::integer(v.b) : v;
      return v.kind == Kind::Float ? Value::number(-v.f) : Value::integer(-(v.kind == Kind::Bool ? v.b : v.i));
    }
    case N::Binary: {
      const Value a = eval(*n.a);
      const Value b = eval(*n.b);
      line = n.line;
      return arith(*this, n.name, a, b);
    }
    case N::And: {
      Value a = eval(*n.a);
      return truthy(a) ? eval(*n.b) : a;
    }
    case N::Or: {
      Value a = eval(*n.a);
      return truthy(a) ? a : eval(*n.b);
    }
    case N::Not: return Value::boolean(!truthy(eval(*n.a)));
    case N::Compare: {
      Value left = eval(*n.args[0]);
      for (size_t k = 0; k < n.ops.size(); ++k) {
        Value right = eval(*n.args[k + 1]);
        line = n.line;
        if (!compare(*this, n.ops[k], left, right)) return Value::boolean(false);
        left = std::move(right);
      }
      return Value::boolean(true);
    }
    case N::CondExpr:
      if (truthy(eval(*n.b))) return eval(*n.a);
      return n.c ? eval(*n.c) : Value::undefined();
    default: error("internal: statement node used as an expression");
  }
}

}  // namespace kvlm::tmpl
