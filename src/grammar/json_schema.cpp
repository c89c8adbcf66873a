#include "grammar/json_schema.h"

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "base/error.h"

namespace kvlm {

namespace {

using json = nlohmann::ordered_json;
using Alt = GrammarBuilder::Alt;

const std::set<std::string>& known_keywords() {
  static const std::set<std::string> k = {
      "type",  "properties", "required", "additionalProperties", "items", "minItems",
      "maxItems", "enum", "const", "anyOf", "$ref", "$defs", "definitions",
      // annotations: no effect on what validates
      "title", "description", "default", "examples", "$schema", "$id", "$comment"};
  return k;
}

// Keywords that constrain a value, which anyOf / $ref do not combine with here.
bool is_assertion(const std::string& key) {
  return key == "type" || key == "properties" || key == "required" ||
         key == "additionalProperties" || key == "items" || key == "minItems" ||
         key == "maxItems" || key == "enum" || key == "const";
}

class SchemaCompiler {
 public:
  explicit SchemaCompiler(const json& root) : root_(root) {}

  std::shared_ptr<const Grammar> compile(bool any_object, std::string_view prefix = {},
                                         std::string_view suffix = {}) {
    const uint32_t top = b_.new_rule();
    Alt alt;
    b_.append_literal(alt, prefix);
    alt.push_back(ws());
    alt.push_back(GrammarBuilder::ref(any_object ? any_object_rule() : schema(root_, "", 0)));
    b_.append_literal(alt, suffix);
    b_.define(top, {alt});
    return std::make_shared<const Grammar>(b_.finish(top));
  }

 private:
  // ---- shared rules: JSON's lexical pieces and the unconstrained value -----------------------
  GrammarElem ws() {
    ByteSet s;
    for (char c : {' ', '\t', '\n', '\r'}) s.add(static_cast<uint8_t>(c));
    return b_.bytes(s, 0, kJsonMaxWhitespace);
  }
  uint32_t literal_rule(std::string_view text) {
    const uint32_t r = b_.new_rule();
    Alt a;
    b_.append_literal(a, text);
    b_.define(r, {a});
    return r;
  }
  uint32_t string_rule();
  uint32_t number_rule(bool integer);
  uint32_t any_value_rule();
  uint32_t any_object_rule() { return map_rule(any_value_rule()); }
  uint32_t list_rule(uint32_t item, int64_t min_items, int64_t max_items);  // max < 0: unbounded
  uint32_t map_rule(uint32_t value);  // an object of any keys, each value `value`

  // ---- schemas -------------------------------------------------------------------------------
  uint32_t schema(const json& s, const std::string& path, int depth);
  uint32_t typed(const std::string& type, const json& s, const std::string& path, int depth);
  uint32_t object_rule(const json& s, const std::string& path, int depth);
  uint32_t array_rule(const json& s, const std::string& path, int depth);
  uint32_t ref_rule(const std::string& ref, const std::string& path);
  struct Literal {
    std::string text;  // bytes the output holds
    Alt tail;          // what follows them
  };
  uint32_t literals_rule(std::vector<std::string> texts);  // one of the texts (non-empty list)
  uint32_t literal_node(const std::vector<Literal>& lits, size_t lo, size_t hi, size_t depth);

  GrammarBuilder b_;
  const json& root_;
  uint32_t string_ = UINT32_MAX, number_ = UINT32_MAX, integer_ = UINT32_MAX,
           any_value_ = UINT32_MAX;
  std::map<std::string, uint32_t> refs_;  // "$ref" value -> its rule
};

// "..." with JSON's escapes. The body is one unbounded byte class, so that the matcher accepts
// whole trie subtrees of plain text at once (matcher.h).
uint32_t SchemaCompiler::string_rule() {
  if (string_ != UINT32_MAX) return string_;
  string_ = b_.new_rule();
  const uint32_t chars = b_.new_rule(), tail = b_.new_rule(), esc = b_.new_rule();
  ByteSet plain;
  plain.add_range(0x20, 0xFF);
  for (int b : {0x22, 0x5C, 0xC0, 0xC1}) plain.w[static_cast<size_t>(b >> 6)] &= ~(uint64_t{1} << (b & 63));
  for (int b = 0xF5; b <= 0xFF; ++b) plain.w[3] &= ~(uint64_t{1} << (b & 63));
  ByteSet simple, hex;
  for (char c : std::string_view("\"\\/bfnrt")) simple.add(static_cast<uint8_t>(c));
  hex.add_range('0', '9');
  hex.add_range('a', 'f');
  hex.add_range('A', 'F');
  b_.define(string_, {{b_.byte('"'), GrammarBuilder::ref(chars), b_.byte('"')}});
  b_.define(chars, {{b_.bytes(plain, 0, kRepUnbounded), GrammarBuilder::ref(tail)}});
  b_.define(tail, {{}, {b_.byte('\\'), GrammarBuilder::ref(esc), GrammarBuilder::ref(chars)}});
  b_.define(esc, {{b_.bytes(simple)}, {b_.byte('u'), b_.bytes(hex, 4, 4)}});
  return string_;
}

// -?(0|[1-9][0-9]{0,15})  then, for numbers, (\.[0-9]{1,16})?([eE][+-]?[0-9]{1,3})?
uint32_t SchemaCompiler::number_rule(bool integer) {
  uint32_t& memo = integer ? integer_ : number_;
  if (memo != UINT32_MAX) return memo;
  memo = b_.new_rule();
  ByteSet digit, nonzero, minus, e, sign;
  digit.add_range('0', '9');
  nonzero.add_range('1', '9');
  minus.add('-');
  e.add('e');
  e.add('E');
  sign.add('+');
  sign.add('-');
  const uint32_t int_part = b_.new_rule();
  b_.define(int_part, {{b_.byte('0')}, {b_.bytes(nonzero), b_.bytes(digit, 0, 15)}});
  Alt whole = {b_.bytes(minus, 0, 1), GrammarBuilder::ref(int_part)};
  if (!integer) {
    const uint32_t frac = b_.new_rule(), exp = b_.new_rule();
    b_.define(frac, {{}, {b_.byte('.'), b_.bytes(digit, 1, 16)}});
    b_.define(exp, {{}, {b_.bytes(e), b_.bytes(sign, 0, 1), b_.bytes(digit, 1, 3)}});
    whole.push_back(GrammarBuilder::ref(frac));
    whole.push_back(GrammarBuilder::ref(exp));
  }
  b_.define(memo, {whole});
  return memo;
}

uint32_t SchemaCompiler::any_value_rule() {
  if (any_value_ != UINT32_MAX) return any_value_;
  any_value_ = b_.new_rule();
  const uint32_t obj = map_rule(any_value_), arr = list_rule(any_value_, 0, -1);
  std::vector<Alt> alts = {{GrammarBuilder::ref(obj)},
                           {GrammarBuilder::ref(arr)},
                           {GrammarBuilder::ref(string_rule())},
                           {GrammarBuilder::ref(number_rule(false))}};
  for (std::string_view lit : {"true", "false", "null"}) {
    alts.emplace_back();
    b_.append_literal(alts.back(), lit);
  }
  b_.define(any_value_, std::move(alts));
  return any_value_;
}

// [ item (, item)* ] with min_items..max_items items: more_i follows the i-th item; past the
// last bound the last one loops (unbounded) or closes.
uint32_t SchemaCompiler::list_rule(uint32_t item, int64_t min_items, int64_t max_items) {
  const uint32_t arr = b_.new_rule();
  if (max_items == 0) {
    b_.define(arr, {{b_.byte('['), ws(), b_.byte(']')}});
    return arr;
  }
  const int64_t n_more = max_items < 0 ? std::max<int64_t>(min_items, 1) : max_items;
  std::vector<uint32_t> more(static_cast<size_t>(n_more) + 1);
  for (int64_t i = 1; i <= n_more; ++i) more[static_cast<size_t>(i)] = b_.new_rule();
  for (int64_t i = 1; i <= n_more; ++i) {
    std::vector<Alt> alts;
    if (i >= min_items) alts.push_back({b_.byte(']')});
    if (max_items < 0 || i < max_items) {
      const uint32_t next = more[static_cast<size_t>(std::min(i + 1, n_more))];
      alts.push_back({b_.byte(','), ws(), GrammarBuilder::ref(item), ws(), GrammarBuilder::ref(next)});
    }
    b_.define(more[static_cast<size_t>(i)], std::move(alts));
  }
  const uint32_t body = b_.new_rule();
  std::vector<Alt> alts;
  if (min_items == 0) alts.push_back({b_.byte(']')});
  alts.push_back({GrammarBuilder::ref(item), ws(), GrammarBuilder::ref(more[1])});
  b_.define(body, std::move(alts));
  b_.define(arr, {{b_.byte('['), ws(), GrammarBuilder::ref(body)}});
  return arr;
}

uint32_t SchemaCompiler::map_rule(uint32_t value) {
  const uint32_t obj = b_.new_rule(), body = b_.new_rule(), more = b_.new_rule();
  auto entry = [&] {
    return Alt{GrammarBuilder::ref(string_rule()), ws(), b_.byte(':'), ws(),
               GrammarBuilder::ref(value), ws(), GrammarBuilder::ref(more)};
  };
  b_.define(obj, {{b_.byte('{'), ws(), GrammarBuilder::ref(body)}});
  b_.define(body, {{b_.byte('}')}, entry()});
  Alt next = entry();
  next.insert(next.begin(), {b_.byte(','), ws()});
  b_.define(more, {{b_.byte('}')}, next});
  return obj;
}

std::string at(const std::string& path) { return path.empty() ? "at the top" : "at " + path; }

int64_t count_keyword(const json& s, const char* key, const std::string& path) {
  const auto it = s.find(key);
  if (it == s.end()) return -1;
  if (!it->is_number_integer() || it->get<int64_t>() < 0)
    fail("JSON schema keyword '{}' must be a non-negative integer ({})", key, at(path));
  const int64_t n = it->get<int64_t>();
  if (n > kJsonSchemaMaxItems)
    fail("JSON schema keyword '{}' is {}; at most {} is supported ({})", key, n,
         kJsonSchemaMaxItems, at(path));
  return n;
}

// A value of enum or const as the bytes the output must hold: JSON, compact.
std::string literal_of(const json& v, const char* key, const std::string& path) {
  std::string text = v.dump();
  if (text.size() > kJsonSchemaMaxLiteral)
    fail("JSON schema keyword '{}' holds a value of {} bytes; at most {} are supported ({})", key,
         text.size(), kJsonSchemaMaxLiteral, at(path));
  return text;
}

// Alternatives of literal texts as a trie of rules: one rule per branching prefix, so the matcher
// holds one stack per next byte rather than one per literal (an enum of 1,000 names would
// otherwise be 1,000 stacks to advance and deduplicate per byte).
uint32_t SchemaCompiler::literals_rule(std::vector<std::string> texts) {
  std::sort(texts.begin(), texts.end());
  texts.erase(std::unique(texts.begin(), texts.end()), texts.end());
  std::vector<Literal> lits;
  for (std::string& t : texts) lits.push_back({std::move(t), {}});
  return literal_node(lits, 0, lits.size(), 0);
}

// lits[lo, hi): distinct texts, sorted, sharing their first `depth` bytes; each is followed by
// its tail.
uint32_t SchemaCompiler::literal_node(const std::vector<Literal>& lits, size_t lo, size_t hi,
                                      size_t depth) {
  const uint32_t r = b_.new_rule();
  std::vector<Alt> alts;
  if (lits[lo].text.size() == depth) {  // sorted: the text that ends here comes first
    alts.push_back(lits[lo].tail);
    ++lo;
  }
  while (lo < hi) {
    size_t end = lo + 1;
    while (end < hi && lits[end].text[depth] == lits[lo].text[depth]) ++end;
    Alt a;
    if (end - lo == 1) {  // one text left: its remaining bytes in a row, then its tail
      b_.append_literal(a, std::string_view(lits[lo].text).substr(depth));
      a.insert(a.end(), lits[lo].tail.begin(), lits[lo].tail.end());
    } else {
      a = {b_.byte(lits[lo].text[depth]), GrammarBuilder::ref(literal_node(lits, lo, end, depth + 1))};
    }
    alts.push_back(std::move(a));
    lo = end;
  }
  b_.define(r, std::move(alts));
  return r;
}

uint32_t SchemaCompiler::schema(const json& s, const std::string& path, int depth) {
  if (depth > kJsonSchemaMaxDepth)
    fail("the JSON schema nests deeper than {} levels ({})", kJsonSchemaMaxDepth, at(path));
  if (s.is_boolean()) {
    if (s.get<bool>()) return any_value_rule();
    fail("the JSON schema 'false' admits no value ({})", at(path));
  }
  if (!s.is_object()) fail("a JSON schema must be an object or a boolean ({})", at(path));
  bool asserts = false;
  for (const auto& [key, _] : s.items()) {
    if (!known_keywords().count(key))
      fail("JSON schema keyword '{}' is not supported ({})", key, at(path));
    asserts |= is_assertion(key);
  }
  if (const auto it = s.find("$ref"); it != s.end()) {
    if (!it->is_string()) fail("JSON schema keyword '$ref' must be a string ({})", at(path));
    if (asserts)
      fail("JSON schema keyword '$ref' beside other constraints is not supported ({})", at(path));
    return ref_rule(it->get<std::string>(), path);
  }
  if (const auto it = s.find("anyOf"); it != s.end()) {
    if (!it->is_array() || it->empty())
      fail("JSON schema keyword 'anyOf' must be a non-empty array ({})", at(path));
    if (it->size() > kJsonSchemaMaxAnyOf)
      fail("JSON schema keyword 'anyOf' lists {} schemas; at most {} are supported ({})",
           it->size(), kJsonSchemaMaxAnyOf, at(path));
    if (asserts)
      fail("JSON schema keyword 'anyOf' beside other constraints is not supported ({})", at(path));
    std::vector<Alt> alts;
    for (size_t i = 0; i < it->size(); ++i)
      alts.push_back({GrammarBuilder::ref(
          schema((*it)[i], fmt::format("{}/anyOf/{}", path, i), depth + 1))});
    const uint32_t r = b_.new_rule();
    b_.define(r, std::move(alts));
    return r;
  }
  if (const auto it = s.find("const"); it != s.end())
    return literals_rule({literal_of(*it, "const", path)});
  if (const auto it = s.find("enum"); it != s.end()) {
    if (!it->is_array() || it->empty())
      fail("JSON schema keyword 'enum' must be a non-empty array ({})", at(path));
    std::vector<std::string> lits;
    for (const json& v : *it) lits.push_back(literal_of(v, "enum", path));
    return literals_rule(std::move(lits));
  }
  const auto type = s.find("type");
  if (type == s.end()) {
    // Untyped: the keywords say which kind it constrains; none: any value.
    if (s.contains("properties") || s.contains("required") || s.contains("additionalProperties"))
      return object_rule(s, path, depth);
    if (s.contains("items") || s.contains("minItems") || s.contains("maxItems"))
      return array_rule(s, path, depth);
    return any_value_rule();
  }
  if (type->is_string()) return typed(type->get<std::string>(), s, path, depth);
  if (!type->is_array() || type->empty())
    fail("JSON schema keyword 'type' must be a string or a non-empty array ({})", at(path));
  std::vector<Alt> alts;
  for (const json& t : *type) {
    if (!t.is_string()) fail("JSON schema keyword 'type' must list strings ({})", at(path));
    alts.push_back({GrammarBuilder::ref(typed(t.get<std::string>(), s, path, depth))});
  }
  const uint32_t r = b_.new_rule();
  b_.define(r, std::move(alts));
  return r;
}

uint32_t SchemaCompiler::typed(const std::string& type, const json& s, const std::string& path,
                               int depth) {
  if (type == "object") return object_rule(s, path, depth);
  if (type == "array") return array_rule(s, path, depth);
  if (type == "string") return string_rule();
  if (type == "number") return number_rule(false);
  if (type == "integer") return number_rule(true);
  if (type == "boolean" || type == "null") {
    const uint32_t r = b_.new_rule();
    std::vector<Alt> alts(type == "null" ? 1 : 2);
    b_.append_literal(alts[0], type == "null" ? "null" : "true");
    if (type == "boolean") b_.append_literal(alts[1], "false");
    b_.define(r, std::move(alts));
    return r;
  }
  fail("JSON schema type '{}' is not one of object, array, string, number, integer, boolean, "
       "null ({})", type.substr(0, 64), at(path));
}

uint32_t SchemaCompiler::array_rule(const json& s, const std::string& path, int depth) {
  const int64_t min_items = std::max<int64_t>(count_keyword(s, "minItems", path), 0);
  const int64_t max_items = count_keyword(s, "maxItems", path);
  if (max_items >= 0 && max_items < min_items)
    fail("JSON schema keywords 'minItems' ({}) above 'maxItems' ({}) admit no array ({})",
         min_items, max_items, at(path));
  const auto items = s.find("items");
  const uint32_t item =
      items == s.end() ? any_value_rule() : schema(*items, path + "/items", depth + 1);
  return list_rule(item, min_items, max_items);
}

// Declared properties in the schema's order, each optional one skippable: rest[i] is what may
// follow once the properties before i are settled (a comma and one of the next ones up to the
// first required one, or the closing brace when no required one is left).
uint32_t SchemaCompiler::object_rule(const json& s, const std::string& path, int depth) {
  const auto props = s.find("properties");
  if (props != s.end() && !props->is_object())
    fail("JSON schema keyword 'properties' must be an object ({})", at(path));
  std::set<std::string> required;
  if (const auto req = s.find("required"); req != s.end()) {
    if (!req->is_array()) fail("JSON schema keyword 'required' must be an array ({})", at(path));
    for (const json& r : *req) {
      if (!r.is_string()) fail("JSON schema keyword 'required' must list strings ({})", at(path));
      if (props == s.end() || !props->contains(r.get<std::string>()))
        fail("JSON schema keyword 'required' names '{}', which is not in 'properties' ({})",
             r.get<std::string>().substr(0, 64), at(path));
      required.insert(r.get<std::string>());
    }
  }
  if (props == s.end() || props->empty()) {
    const auto extra = s.find("additionalProperties");
    if (extra == s.end() || *extra == true) return any_object_rule();
    if (*extra == false) return literal_rule("{}");
    return map_rule(schema(*extra, path + "/additionalProperties", depth + 1));
  }
  if (props->size() > kJsonSchemaMaxProperties)
    fail("JSON schema keyword 'properties' lists {} properties; at most {} are supported ({})",
         props->size(), kJsonSchemaMaxProperties, at(path));
  // In the schema's order: an ordered_json iterates its keys as they were written.
  std::vector<std::string> names;
  std::vector<uint32_t> values;
  std::vector<bool> is_req;
  for (const auto& [name, sub] : props->items()) {
    names.push_back(name);
    values.push_back(schema(sub, path + "/properties/" + name.substr(0, 64), depth + 1));
    is_req.push_back(required.count(name) > 0);
  }
  const size_t n = names.size();
  std::vector<size_t> first_req(n + 1, n);  // first required index >= i
  for (size_t i = n; i-- > 0;) first_req[i] = is_req[i] ? i : first_req[i + 1];
  std::vector<uint32_t> rest(n + 1);
  for (size_t i = 0; i <= n; ++i) rest[i] = b_.new_rule();
  // The keys that may come next from i (up to the first required one) as one trie, each key
  // followed by its value and rest[j + 1]: with many optional properties the matcher then holds
  // one stack per next byte of a key, not one per property.
  auto next_entry = [&](size_t i) {
    std::vector<Literal> keys;
    for (size_t j = i; j < n && j <= first_req[i]; ++j)
      keys.push_back({json(names[j]).dump(),
                      {ws(), b_.byte(':'), ws(), GrammarBuilder::ref(values[j]), ws(),
                       GrammarBuilder::ref(rest[j + 1])}});
    std::sort(keys.begin(), keys.end(),
              [](const Literal& a, const Literal& b) { return a.text < b.text; });
    return literal_node(keys, 0, keys.size(), 0);
  };
  for (size_t i = 0; i <= n; ++i) {
    std::vector<Alt> alts;
    if (first_req[i] == n) alts.push_back({b_.byte('}')});
    if (i < n) alts.push_back({b_.byte(','), ws(), GrammarBuilder::ref(next_entry(i))});
    b_.define(rest[i], std::move(alts));
  }
  const uint32_t body = b_.new_rule(), obj = b_.new_rule();
  std::vector<Alt> alts;
  if (first_req[0] == n) alts.push_back({b_.byte('}')});
  alts.push_back({GrammarBuilder::ref(next_entry(0))});
  b_.define(body, std::move(alts));
  b_.define(obj, {{b_.byte('{'), ws(), GrammarBuilder::ref(body)}});
  return obj;
}

// Local references only; each target is compiled once, so recursive schemas work (the
// matcher's stack bound, kMaxStackDepth, ends what nests too deep).
uint32_t SchemaCompiler::ref_rule(const std::string& ref, const std::string& path) {
  if (const auto it = refs_.find(ref); it != refs_.end()) return it->second;
  const bool local = ref == "#" || ref.rfind("#/$defs/", 0) == 0 || ref.rfind("#/definitions/", 0) == 0;
  if (!local)
    fail("JSON schema keyword '$ref' '{}' is not supported: only '#', '#/$defs/...' and "
         "'#/definitions/...' ({})", ref.substr(0, 64), at(path));
  json::json_pointer ptr;
  try {
    ptr = json::json_pointer(ref.substr(1));
  } catch (const json::exception&) {
    fail("JSON schema keyword '$ref' '{}' is not a valid pointer ({})", ref.substr(0, 64), at(path));
  }
  if (!root_.contains(ptr))
    fail("JSON schema keyword '$ref' '{}' points at nothing ({})", ref.substr(0, 64), at(path));
  const uint32_t r = b_.new_rule();
  refs_[ref] = r;
  b_.define(r, {{GrammarBuilder::ref(schema(root_.at(ptr), ref.substr(1), 0))}});
  return r;
}

}  // namespace

std::shared_ptr<const Grammar> compile_json_schema(const nlohmann::ordered_json& schema) {
  return SchemaCompiler(schema).compile(false);
}

std::shared_ptr<const Grammar> compile_json_schema(const nlohmann::ordered_json& schema,
                                                   std::string_view prefix,
                                                   std::string_view suffix) {
  return SchemaCompiler(schema).compile(false, prefix, suffix);
}

std::shared_ptr<const Grammar> json_object_grammar() {
  static const json empty = json::object();
  return SchemaCompiler(empty).compile(true);
}

}  // namespace kvlm
