// Tokens and syntax tree of kvlm's Jinja interpreter (internal to src/template).
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "template/template.h"
#include "template/value.h"

namespace kvlm::tmpl {

enum class Tok {
  Text,        // template text between tags, whitespace control already applied
  VarBegin,    // {{
  VarEnd,      // }}
  BlockBegin,  // {%
  BlockEnd,    // %}
  Name,
  String,      // text holds the unescaped value
  Int,
  Float,
  Op,          // operators and punctuation: + - * / // % ** ~ == != < > <= >= = ( ) [ ] { } , . : |
  Eof,
};

struct Token {
  Tok type;
  std::string text;
  int line;
};

// Splits a template into tokens the way jinja2's lexer does with the given whitespace options
// (newlines normalised to \n, one trailing newline dropped). Throws kvlm::Error naming the line.
std::vector<Token> lex(std::string_view source, const Options& opt);

enum class N {
  // expressions
  Literal, Name, List, Tuple, DictLit, Attr, Item, Slice, Call, Filter, Test, Neg, Pos, Binary,
  And, Or, Not, Compare, CondExpr,
  // statements
  Text, Output, If, For, Set, SetBlock, Macro, CallBlock, FilterBlock, Break, Continue, Scope,
};

struct Node;
using NodePtr = std::shared_ptr<const Node>;

struct Node {
  N kind;
  int line = 0;
  std::string name;  // Name, Attr, Filter/Test name, Binary/Compare operator, Text, Macro name
  Value value;       // Literal
  bool negate = false;                           // Test: `is not`
  NodePtr a, b, c;                               // operands (see parser.cpp for each kind)
  std::vector<NodePtr> args;                     // call/filter/test arguments, list items, ...
  std::vector<std::pair<std::string, NodePtr>> kwargs;  // keyword arguments, macro defaults
  std::vector<std::string> names;                // for/set targets, macro and caller parameters
  std::vector<std::string> ops;                  // Compare: the operators between args
  std::vector<NodePtr> body, else_body;
};

// Parses tokens into the template's statement list. Throws kvlm::Error naming the line.
std::vector<NodePtr> parse(const std::vector<Token>& tokens, const Options& opt);

}  // namespace kvlm::tmpl
