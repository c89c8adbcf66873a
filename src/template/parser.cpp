// Recursive-descent parser with jinja2's grammar and precedence (lowest first):
//   a if c else b  <  or  <  and  <  not  <  comparisons, in, not in  <  + -  <  ~  <  * / // %
//   <  **  <  unary - +  <  primary with postfix . [] () and filters | and tests `is`.
// Node fields by kind: Attr a.name; Item a[b]; Slice a[args: start, stop, step (null = absent)];
// Call a(args, kwargs); Filter a|name(args, kwargs); Test a is [not] name(args); Binary a op b;
// Compare args[0] ops[0] args[1] ...; CondExpr a if b else c; For names in a [if b] body else;
// Set names = a (or Attr target b.name = a); Macro name(names, kwargs defaults) body.

#include <string>

#include "base/error.h"
#include "template/ast.h"

namespace kvlm::tmpl {

namespace {

using Mut = std::shared_ptr<Node>;

class Parser {
 public:
  Parser(const std::vector<Token>& t, const Options& opt) : t_(t), opt_(opt) {}

  std::vector<NodePtr> parse_all() {
    std::vector<NodePtr> body = parse_body({});
    if (cur().type != Tok::Eof) error("unexpected '{}'", cur().text);
    return body;
  }

 private:
  // ---- token helpers --------------------------------------------------------------------------
  const Token& cur() const { return t_[pos_]; }
  const Token& peek(size_t k = 1) const { return t_[std::min(pos_ + k, t_.size() - 1)]; }
  bool is_op(std::string_view op) const { return cur().type == Tok::Op && cur().text == op; }
  bool is_name(std::string_view n) const { return cur().type == Tok::Name && cur().text == n; }
  bool skip_op(std::string_view op) { return is_op(op) ? (++pos_, true) : false; }
  bool skip_name(std::string_view n) { return is_name(n) ? (++pos_, true) : false; }
  void expect_op(std::string_view op) {
    if (!skip_op(op)) error("expected '{}', found '{}'", op, describe(cur()));
  }
  std::string expect_name() {
    if (cur().type != Tok::Name) error("expected a name, found '{}'", describe(cur()));
    return t_[pos_++].text;
  }
  void expect_block_end() {
    if (cur().type != Tok::BlockEnd) error("expected '%}}', found '{}'", describe(cur()));
    ++pos_;
  }
  static std::string describe(const Token& t) {
    switch (t.type) {
      case Tok::VarEnd: return "}}";
      case Tok::BlockEnd: return "%}";
      case Tok::Eof: return "end of template";
      default: return t.text;
    }
  }
  template <class... A>
  [[noreturn]] void error(fmt::format_string<A...> f, A&&... a) const {
    throw Error("template line " + std::to_string(cur().line) + ": " +
                fmt::format(f, std::forward<A>(a)...));
  }
  Mut node(N kind) const {
    auto n = std::make_shared<Node>();
    n->kind = kind;
    n->line = cur().line;
    return n;
  }
  struct DepthGuard {
    Parser* p;
    explicit DepthGuard(Parser* p_) : p(p_) {
      if (++p->depth_ > kMaxDepth) p->error("template nested more than {} levels deep", kMaxDepth);
    }
    ~DepthGuard() { --p->depth_; }
  };
  static constexpr int kMaxDepth = 200;

  // ---- statements -----------------------------------------------------------------------------
  // Parses until a block tag whose first name is in `ends` (left unconsumed, after its {%).
  std::vector<NodePtr> parse_body(std::initializer_list<std::string_view> ends) {
    DepthGuard g(this);
    std::vector<NodePtr> body;
    while (cur().type != Tok::Eof) {
      if (cur().type == Tok::Text) {
        Mut n = node(N::Text);
        n->name = t_[pos_++].text;
        body.push_back(n);
      } else if (cur().type == Tok::VarBegin) {
        ++pos_;
        Mut n = node(N::Output);
        n->a = parse_expr();
        if (cur().type != Tok::VarEnd) error("expected '}}}}', found '{}'", describe(cur()));
        ++pos_;
        body.push_back(n);
      } else {
        ++pos_;  // {%
        for (std::string_view e : ends)
          if (is_name(e)) return body;
        body.push_back(parse_statement());
      }
    }
    if (ends.size()) error("missing '{{% {} %}}' before the end of the template", *(ends.end() - 1));
    return body;
  }

  NodePtr parse_statement() {
    const std::string kw = cur().type == Tok::Name ? cur().text : describe(cur());
    if (kw == "if") return parse_if();
    if (kw == "for") return parse_for();
    if (kw == "set") return parse_set();
    if (kw == "macro") return parse_macro();
    if (kw == "call") return parse_call_block();
    if (kw == "filter") return parse_filter_block();
    if (kw == "generation") return parse_scope("generation", "endgeneration");
    if (kw == "break" || kw == "continue") {
      Mut n = node(kw == "break" ? N::Break : N::Continue);
      ++pos_;
      expect_block_end();
      return n;
    }
    error("unsupported statement '{{% {} %}}'", kw);
  }

  // Consumes `{% end... %}` (the {% is already consumed and the name is current).
  void end_tag(std::string_view name) {
    if (!skip_name(name)) error("expected '{{% {} %}}'", name);
    expect_block_end();
  }

  // `%}`, the body, then `{% end %}`.
  void block_body(Node& n, std::string_view end) {
    expect_block_end();
    n.body = parse_body({end});
    end_tag(end);
  }

  NodePtr parse_if() {
    Mut n = node(N::If);
    ++pos_;  // if / elif
    n->a = parse_expr();
    expect_block_end();
    n->body = parse_body({"elif", "else", "endif"});
    if (is_name("elif")) {
      n->else_body.push_back(parse_if());
      return n;  // the nested if consumed endif
    }
    if (skip_name("else")) {
      expect_block_end();
      n->else_body = parse_body({"endif"});
    }
    end_tag("endif");
    return n;
  }

  void parse_targets(Node& n) {
    do n.names.push_back(expect_name()); while (skip_op(","));
  }

  NodePtr parse_for() {
    Mut n = node(N::For);
    ++pos_;
    parse_targets(*n);
    if (!skip_name("in")) error("expected 'in' in a for loop");
    n->a = parse_tuple_or_expr(/*with_cond=*/false);
    if (skip_name("if")) n->b = parse_expr();
    if (is_name("recursive")) error("recursive for loops are not supported");
    expect_block_end();
    n->body = parse_body({"else", "endfor"});
    if (skip_name("else")) {
      expect_block_end();
      n->else_body = parse_body({"endfor"});
    }
    end_tag("endfor");
    return n;
  }

  NodePtr parse_set() {
    ++pos_;
    const std::string first = expect_name();
    if (skip_op(".")) {  // set ns.attr = value
      Mut n = node(N::Set);
      Mut target = node(N::Name);
      target->name = first;
      n->b = target;
      n->name = expect_name();
      expect_op("=");
      n->a = parse_tuple_or_expr(true);
      expect_block_end();
      return n;
    }
    Mut n = node(N::Set);
    n->names.push_back(first);
    while (skip_op(",")) n->names.push_back(expect_name());
    if (cur().type == Tok::BlockEnd && n->names.size() == 1) {  // {% set x %}...{% endset %}
      ++pos_;
      n->kind = N::SetBlock;
      n->body = parse_body({"endset"});
      end_tag("endset");
      return n;
    }
    expect_op("=");
    n->a = parse_tuple_or_expr(true);
    expect_block_end();
    return n;
  }

  void parse_params(Node& n) {
    expect_op("(");
    parse_items(")", [&] {
      n.names.push_back(expect_name());
      if (skip_op("=")) n.kwargs.emplace_back(n.names.back(), parse_expr());
    });
  }

  NodePtr parse_macro() {
    Mut n = node(N::Macro);
    ++pos_;
    n->name = expect_name();
    parse_params(*n);
    block_body(*n, "endmacro");
    return n;
  }

  NodePtr parse_call_block() {
    Mut n = node(N::CallBlock);
    ++pos_;
    if (is_op("(")) parse_params(*n);
    n->a = parse_expr();
    if (n->a->kind != N::Call) error("{{% call %}} needs a macro call");
    block_body(*n, "endcall");
    return n;
  }

  NodePtr parse_filter_block() {
    Mut n = node(N::FilterBlock);
    ++pos_;
    Mut f = node(N::Filter);
    f->name = expect_name();
    if (is_op("(")) parse_call_args(*f);
    n->a = f;
    block_body(*n, "endfilter");
    return n;
  }

  NodePtr parse_scope(std::string_view, std::string_view end) {
    Mut n = node(N::Scope);
    ++pos_;
    block_body(*n, end);
    return n;
  }

  // ---- expressions ----------------------------------------------------------------------------
  // `a, b` without parentheses is a tuple (set and for only).
  NodePtr parse_tuple_or_expr(bool with_cond) {
    NodePtr first = with_cond ? parse_expr() : parse_or();
    if (!is_op(",")) return first;
    Mut t = node(N::Tuple);
    t->args.push_back(first);
    while (skip_op(",")) {
      if (cur().type == Tok::BlockEnd || is_name("if")) break;
      t->args.push_back(with_cond ? parse_expr() : parse_or());
    }
    return t;
  }

 public:
  NodePtr parse_expr() {
    DepthGuard g(this);
    NodePtr e = parse_or();
    while (is_name("if")) {
      ++pos_;
      Mut n = node(N::CondExpr);
      n->a = e;
      n->b = parse_or();
      if (skip_name("else")) n->c = parse_expr();
      e = n;
    }
    return e;
  }

 private:
  NodePtr binary(N kind, NodePtr a, NodePtr b, std::string op = "") {
    Mut n = node(kind);
    n->a = std::move(a);
    n->b = std::move(b);
    n->name = std::move(op);
    return n;
  }

  NodePtr parse_or() {
    NodePtr e = parse_and();
    while (skip_name("or")) e = binary(N::Or, e, parse_and());
    return e;
  }
  NodePtr parse_and() {
    NodePtr e = parse_not();
    while (skip_name("and")) e = binary(N::And, e, parse_not());
    return e;
  }
  NodePtr parse_not() {
    if (is_name("not")) {
      DepthGuard g(this);
      ++pos_;
      Mut n = node(N::Not);
      n->a = parse_not();
      return n;
    }
    return parse_compare();
  }
  NodePtr parse_compare() {
    NodePtr first = parse_math1();
    Mut n;
    while (true) {
      std::string op;
      if (cur().type == Tok::Op && (cur().text == "==" || cur().text == "!=" || cur().text == "<" ||
                                    cur().text == ">" || cur().text == "<=" || cur().text == ">=")) {
        op = t_[pos_++].text;
      } else if (skip_name("in")) {
        op = "in";
      } else if (is_name("not") && peek().type == Tok::Name && peek().text == "in") {
        pos_ += 2;
        op = "not in";
      } else {
        break;
      }
      if (!n) {
        n = node(N::Compare);
        n->args.push_back(first);
      }
      n->ops.push_back(op);
      n->args.push_back(parse_math1());
    }
    return n ? NodePtr(n) : first;
  }
  NodePtr parse_math1() {
    NodePtr e = parse_concat();
    while (is_op("+") || is_op("-")) {
      const std::string op = t_[pos_++].text;
      e = binary(N::Binary, e, parse_concat(), op);
    }
    return e;
  }
  NodePtr parse_concat() {
    NodePtr e = parse_math2();
    while (skip_op("~")) e = binary(N::Binary, e, parse_math2(), "~");
    return e;
  }
  NodePtr parse_math2() {
    NodePtr e = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const std::string op = t_[pos_++].text;
      e = binary(N::Binary, e, parse_pow(), op);
    }
    return e;
  }
  NodePtr parse_pow() {
    NodePtr e = parse_unary(true);
    while (skip_op("**")) e = binary(N::Binary, e, parse_unary(true), "**");
    return e;
  }
  NodePtr parse_unary(bool with_filter) {
    DepthGuard g(this);
    NodePtr e;
    if (is_op("-") || is_op("+")) {
      Mut n = node(is_op("-") ? N::Neg : N::Pos);
      ++pos_;
      n->a = parse_unary(false);
      e = n;
    } else {
      e = parse_primary();
    }
    e = parse_postfix(e);
    return with_filter ? parse_filters(e) : e;
  }

  NodePtr literal(Value v) {
    Mut n = node(N::Literal);
    n->value = std::move(v);
    ++pos_;
    return n;
  }

  NodePtr parse_primary() {
    const Token& t = cur();
    switch (t.type) {
      case Tok::Name: {
        if (t.text == "true" || t.text == "True") return literal(Value::boolean(true));
        if (t.text == "false" || t.text == "False") return literal(Value::boolean(false));
        if (t.text == "none" || t.text == "None") return literal(Value::none());
        Mut n = node(N::Name);
        n->name = t.text;
        ++pos_;
        return n;
      }
      case Tok::String: {
        std::string s = t.text;
        ++pos_;
        while (cur().type == Tok::String) s += t_[pos_++].text;  // adjacent literals concatenate
        Mut n = node(N::Literal);
        n->value = Value::string(std::move(s));
        return n;
      }
      case Tok::Int:
        try {
          return literal(Value::integer(std::stoll(t.text)));
        } catch (const std::exception&) {
          error("integer literal '{}' out of range", t.text);
        }
      case Tok::Float: return literal(Value::number(std::stod(t.text)));
      case Tok::Op:
        if (t.text == "(") return parse_paren();
        if (t.text == "[") return parse_list();
        if (t.text == "{") return parse_dict();
        break;
      default: break;
    }
    error("unexpected '{}'", describe(t));
  }

  // Comma-separated items up to `close` (a trailing comma allowed), the opener already consumed;
  // returns whether there was a comma (`(x)` is x, `(x,)` a tuple).
  template <class F>
  bool parse_items(std::string_view close, F&& item) {
    bool comma = false;
    for (bool first = true; !skip_op(close); first = false) {
      if (!first) {
        expect_op(",");
        comma = true;
        if (skip_op(close)) break;
      }
      item();
    }
    return comma;
  }

  NodePtr parse_paren() {
    Mut t = node(N::Tuple);
    ++pos_;
    const bool comma = parse_items(")", [&] { t->args.push_back(parse_expr()); });
    if (t->args.size() == 1 && !comma) return t->args[0];
    return t;
  }
  NodePtr parse_list() {
    Mut l = node(N::List);
    ++pos_;
    parse_items("]", [&] { l->args.push_back(parse_expr()); });
    return l;
  }
  NodePtr parse_dict() {
    Mut d = node(N::DictLit);
    ++pos_;
    parse_items("}", [&] {
      d->args.push_back(parse_expr());
      expect_op(":");
      d->args.push_back(parse_expr());
    });
    return d;
  }

  NodePtr parse_postfix(NodePtr e) {
    while (true) {
      if (is_op(".")) {
        ++pos_;
        Mut n = node(N::Attr);
        n->a = e;
        if (cur().type == Tok::Int) {  // x.0 is x[0]
          n->kind = N::Item;
          n->b = literal(Value::integer(std::stoll(cur().text)));
        } else {
          n->name = expect_name();
        }
        e = n;
      } else if (is_op("[")) {
        e = parse_subscript(e);
      } else if (is_op("(")) {
        e = parse_call(e);
      } else {
        return e;
      }
    }
  }

  NodePtr parse_subscript(NodePtr e) {
    ++pos_;  // [
    NodePtr parts[3];
    int n_colon = 0;
    while (!is_op("]")) {
      if (skip_op(":")) {
        if (++n_colon > 2) error("too many ':' in a slice");
        continue;
      }
      if (parts[n_colon]) error("expected ']' or ':' in a subscript");
      parts[n_colon] = parse_expr();
    }
    ++pos_;
    Mut n = node(n_colon ? N::Slice : N::Item);
    n->a = e;
    if (n_colon) {
      n->args = {parts[0], parts[1], parts[2]};
    } else {
      if (!parts[0]) error("empty subscript");
      n->b = parts[0];
    }
    return n;
  }

  NodePtr parse_call(NodePtr callee) {
    Mut n = node(N::Call);
    n->a = std::move(callee);
    parse_call_args(*n);
    return n;
  }

  void parse_call_args(Node& n) {
    expect_op("(");
    parse_items(")", [&] {
      if (cur().type == Tok::Name && peek().type == Tok::Op && peek().text == "=") {
        std::string k = t_[pos_].text;
        pos_ += 2;
        n.kwargs.emplace_back(std::move(k), parse_expr());
      } else {
        if (!n.kwargs.empty()) error("positional argument after a keyword argument");
        n.args.push_back(parse_expr());
      }
    });
  }

  NodePtr parse_filters(NodePtr e) {
    while (true) {
      if (skip_op("|")) {
        Mut f = node(N::Filter);
        f->a = e;
        f->name = expect_name();
        while (skip_op(".")) {
          f->name += '.';
          f->name += expect_name();
        }
        if (is_op("(")) parse_call_args(*f);
        e = f;
      } else if (is_name("is")) {
        ++pos_;
        Mut t = node(N::Test);
        t->a = e;
        t->negate = skip_name("not");
        t->name = expect_name();
        if (is_op("(")) {
          parse_call_args(*t);
        } else if ((cur().type == Tok::Name && !is_name("else") && !is_name("or") &&
                    !is_name("and") && !is_name("if") && !is_name("is") && !is_name("in") &&
                    !is_name("not")) ||
                   cur().type == Tok::String || cur().type == Tok::Int ||
                   cur().type == Tok::Float || is_op("[") || is_op("{")) {
          t->args.push_back(parse_postfix(parse_primary()));  // `x is divisibleby 3`
        }
        e = t;
      } else if (is_op("(")) {
        e = parse_call(e);
      } else {
        return e;
      }
    }
  }

  const std::vector<Token>& t_;
  [[maybe_unused]] const Options& opt_;
  size_t pos_ = 0;
  int depth_ = 0;
};

}  // namespace

std::vector<NodePtr> parse(const std::vector<Token>& tokens, const Options& opt) {
  Parser p(tokens, opt);
  return p.parse_all();
}

}  // namespace kvlm::tmpl
