#include "server/tools.h"

#include <fmt/format.h>

#include <algorithm>
#include <random>

#include "base/error.h"
#include "grammar/json_schema.h"

namespace kvlm::server {
namespace {

[[noreturn]] void bad(const std::string& param, const std::string& message) {
  throw HttpError(400, message, param);
}

bool is_ws(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

size_t skip_ws(std::string_view s, size_t i) {
  while (i < s.size() && is_ws(s[i])) ++i;
  return i;
}

// OpenAI's rule for a function name: 1 to 64 of a-z, A-Z, 0-9, '_' and '-'.
bool valid_function_name(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '_' || c == '-';
  });
}

void check_tool(const json& t, size_t i, std::vector<std::string>& names) {
  const std::string p = fmt::format("tools[{}]", i);
  if (!t.is_object()) bad(p, fmt::format("'{}' must be an object, got {}", p, t.type_name()));
  const auto type = t.find("type");
  if (type == t.end() || *type != "function")
    bad(p + ".type", fmt::format("'{}.type' must be 'function'", p));
  const auto fn = t.find("function");
  if (fn == t.end() || !fn->is_object())
    bad(p + ".function", fmt::format("'{}.function' must be an object", p));
  const auto name = fn->find("name");
  if (name == fn->end() || !name->is_string() || !valid_function_name(name->get<std::string>()))
    bad(p + ".function.name",
        fmt::format("'{}.function.name' must be a string of 1 to 64 letters, digits, '_' or '-'",
                    p));
  if (std::find(names.begin(), names.end(), name->get<std::string>()) != names.end())
    bad(p + ".function.name", fmt::format("'{}.function.name' '{}' names an earlier tool too", p,
                                          name->get<std::string>()));
  names.push_back(name->get<std::string>());
  if (const auto d = fn->find("description"); d != fn->end() && !d->is_string() && !d->is_null())
    bad(p + ".function.description", fmt::format("'{}.function.description' must be a string", p));
  if (const auto s = fn->find("parameters"); s != fn->end() && !s->is_object() && !s->is_null())
    bad(p + ".function.parameters",
        fmt::format("'{}.function.parameters' must be a JSON schema object", p));
  if (const auto s = fn->find("strict"); s != fn->end() && !s->is_boolean() && !s->is_null())
    bad(p + ".function.strict", fmt::format("'{}.function.strict' must be a boolean", p));
}

ToolChoice parse_choice(const json& c, const std::vector<std::string>& names, std::string& named) {
  if (c.is_string()) {
    const std::string& s = c.get_ref<const std::string&>();
    if (s == "auto") return ToolChoice::Auto;
    if (s == "none") return ToolChoice::None;
    if (s == "required") return ToolChoice::Required;
    bad("tool_choice", fmt::format("'tool_choice' must be 'auto', 'none', 'required' or "
                                   "{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, "
                                   "got '{}'", clip(s)));
  }
  if (!c.is_object())
    bad("tool_choice", fmt::format("'tool_choice' must be a string or an object, got {}",
                                   c.type_name()));
  const auto type = c.find("type");
  const auto fn = c.find("function");
  if (type == c.end() || *type != "function" || fn == c.end() || !fn->is_object() ||
      !fn->contains("name") || !(*fn)["name"].is_string())
    bad("tool_choice",
        "'tool_choice' as an object must be {\"type\": \"function\", \"function\": {\"name\": "
        "...}}");
  named = (*fn)["name"].get<std::string>();
  if (std::find(names.begin(), names.end(), named) == names.end())
    bad("tool_choice",
        fmt::format("'tool_choice' names the function '{}', which is not in 'tools'", clip(named)));
  return ToolChoice::Named;
}

// The end of the JSON object s starts with ('{'): one past its closing brace; npos when s ends
// first; 0 when s does not start with '{'. Strings and escapes are followed so that braces
// inside them do not count; what is between is checked by the JSON parser afterwards.
size_t object_end(std::string_view s) {
  if (s.empty() || s[0] != '{') return 0;
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (in_string) {
      if (c == '\\')
        ++i;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      ++depth;
    } else if (c == '}' || c == ']') {
      if (--depth == 0) return i + 1;
    }
  }
  return std::string_view::npos;
}

// A call object's text as a call: {"name": a string, args_key or "arguments": an object or an
// object's JSON text}. nullopt for anything else.
std::optional<ToolCall> read_call(const ToolCallFormat& f, std::string_view text,
                                  const std::vector<std::string>& names) {
  const json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return std::nullopt;
  const auto name = j.find("name");
  if (name == j.end() || !name->is_string()) return std::nullopt;
  if (!names.empty() && std::find(names.begin(), names.end(), *name) == names.end())
    return std::nullopt;  // a call to no tool of the request's: the model's text, not a call
  auto args = j.find(std::string(f.args_key));
  if (args == j.end()) args = j.find("arguments");
  if (args == j.end()) return std::nullopt;
  ToolCall call{new_tool_call_id(), name->get<std::string>(), ""};
  if (args->is_object()) {
    call.arguments = args->dump();
  } else if (args->is_string() &&
             json::parse(args->get<std::string>(), nullptr, false).is_object()) {
    call.arguments = args->get<std::string>();
  } else {
    return std::nullopt;
  }
  return call;
}

}  // namespace

// ---- the request --------------------------------------------------------------------------------

ToolsRequest parse_tools(const json& body) {
  ToolsRequest t;
  std::vector<std::string> names;
  if (const auto it = body.find("tools"); it != body.end() && !it->is_null()) {
    if (!it->is_array())
      bad("tools", fmt::format("'tools' must be an array, got {}", it->type_name()));
    if (it->size() > kMaxTools)
      bad("tools", fmt::format("'tools' lists {} tools; at most {} are supported", it->size(),
                               kMaxTools));
    for (size_t i = 0; i < it->size(); ++i) check_tool((*it)[i], i, names);
    t.tools = *it;
  }
  if (const auto it = body.find("tool_choice"); it != body.end() && !it->is_null()) {
    t.choice = parse_choice(*it, names, t.named);
    if (t.choice == ToolChoice::Required && names.empty())
      bad("tool_choice", "'tool_choice' 'required' needs 'tools'");
  }
  if (const auto it = body.find("parallel_tool_calls");
      it != body.end() && !it->is_null() && !it->is_boolean())
    bad("parallel_tool_calls",
        fmt::format("'parallel_tool_calls' must be a boolean, got {}", it->type_name()));
  return t;
}

// ---- formats and prompts ------------------------------------------------------------------------

const ToolCallFormat& tool_call_format(std::string_view template_source) {
  for (const ToolCallFormat& f : kToolCallFormats)
    if (template_source.find(f.detect) != std::string_view::npos) return f;
  return kHermesFormat;
}

bool template_renders_tools(std::string_view template_source) {
  return template_source.find("tools") != std::string_view::npos;
}

std::string tools_system_prompt(const json& tools) {
  std::string s =
      "You can call functions to answer. They are listed here, each as a JSON schema:\n<tools>\n";
  for (const json& t : tools) s += t.dump() + "\n";
  s += "</tools>\nTo call a function, reply with a JSON object holding its name and arguments "
       "inside <tool_call></tool_call> tags, one call per tag:\n<tool_call>\n{\"name\": "
       "\"function name\", \"arguments\": {\"argument name\": value}}\n</tool_call>";
  return s;
}

std::string tool_messages(std::vector<ChatMessage>& messages, const ToolsRequest& t,
                          std::string_view template_source) {
  if (template_source.find("tool_calls") == std::string_view::npos) {
    for (ChatMessage& m : messages) {
      for (const ChatToolCall& c : m.tool_calls) {
        if (!m.content.empty()) m.content += "\n";
        const json args = json::parse(c.arguments, nullptr, false);
        m.content += "<tool_call>\n" +
                     json{{"name", c.name}, {"arguments", args.is_discarded() ? json(c.arguments)
                                                                              : args}}
                         .dump() +
                     "\n</tool_call>";
      }
      if (!m.tool_calls.empty()) m.content_none = false;
      m.tool_calls.clear();
      if (m.role == "tool") {
        m.role = "user";
        m.content = "<tool_response>\n" + m.content + "\n</tool_response>";
        m.tool_call_id.clear();
        m.name.clear();
      }
    }
  }
  if (!t.active()) return "";
  if (template_renders_tools(template_source)) return t.tools.dump();
  const std::string prompt = tools_system_prompt(t.tools);
  if (!messages.empty() && messages[0].role == "system")
    messages[0].content = prompt + "\n\n" + messages[0].content;
  else
    messages.insert(messages.begin(), ChatMessage{"system", prompt});
  return "";
}

std::string new_tool_call_id() {
  thread_local std::mt19937_64 rng(std::random_device{}());
  static constexpr std::string_view kChars =
      "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  std::string id = "call_";
  for (int i = 0; i < 24; ++i) id += kChars[rng() % kChars.size()];
  return id;
}

// ---- parsing the reply --------------------------------------------------------------------------

size_t ToolCallStream::match_call(ToolCall& call, bool end) const {
  constexpr size_t kMore = std::string_view::npos;
  const std::string_view s = held_;
  size_t i = skip_ws(s, 0);
  auto prefix_of = [&](std::string_view marker) {  // the rest of s is a proper prefix of marker
    return s.size() - i < marker.size() && marker.substr(0, s.size() - i) == s.substr(i);
  };
  if (i == s.size()) return end ? 0 : kMore;
  const std::string_view open = f_.open.empty() ? f_.tag : f_.open;
  if (!open.empty() && prefix_of(open)) return end ? 0 : kMore;
  if (!open.empty() && s.substr(i, open.size()) == open) {
    i = skip_ws(s, i + open.size());
  } else if (!f_.open.empty()) {
    return 0;
  }
  if (i == s.size()) return end ? 0 : kMore;
  const size_t n = object_end(s.substr(i));
  if (n == 0) return 0;
  if (n == kMore) return end ? 0 : kMore;
  auto parsed = read_call(f_, s.substr(i, n), names_);
  if (!parsed) return 0;
  i += n;
  if (!f_.close.empty()) {
    const size_t j = skip_ws(s, i);
    if (s.substr(j, f_.close.size()) == f_.close) {
      i = j + f_.close.size();
    } else if (!end && (j == s.size() || (s.size() - j < f_.close.size() &&
                                          f_.close.substr(0, s.size() - j) == s.substr(j)))) {
      return kMore;
    }
    // Else the close marker is missing (the reply ended, or other text follows): the call stands.
  }
  call = std::move(*parsed);
  return i;
}

void ToolCallStream::emit_content(std::vector<json>& out, std::string_view text) {
  // Whitespace is held until text follows it: between and around calls it is dropped.
  if (after_call_) text.remove_prefix(std::min(text.find_first_not_of(" \n\t\r"), text.size()));
  if (text.empty()) return;
  const size_t last = text.find_last_not_of(" \n\t\r");
  if (last == std::string_view::npos) {
    ws_ += text;
    return;
  }
  after_call_ = false;
  std::string s = std::move(ws_);
  ws_ = std::string(text.substr(last + 1));
  s += text.substr(0, last + 1);
  started_ = true;
  content_ += s;
  out.push_back({{"content", s}});
}

void ToolCallStream::emit_call(std::vector<json>& out, ToolCall call) {
  ws_.clear();
  after_call_ = true;
  const int32_t index = n_calls_++;
  out.push_back({{"tool_calls",
                  json::array({{{"index", index},
                                {"id", call.id},
                                {"type", "function"},
                                {"function", {{"name", call.name}, {"arguments", ""}}}}})}});
  out.push_back(
      {{"tool_calls",
        json::array({{{"index", index}, {"function", {{"arguments", call.arguments}}}}})}});
  calls_.push_back(std::move(call));
}

void ToolCallStream::drain(std::vector<json>& out, bool end) {
  while (!held_.empty()) {
    if (f_.open.empty() && started_) {  // Llama: calls only open the reply
      emit_content(out, held_);
      held_.clear();
      break;
    }
    if (!f_.open.empty()) {
      // Content up to the next possible start of a call: the open marker, or a tail of held_
      // that may become one.
      size_t p = held_.find(f_.open);
      if (p == std::string::npos) {
        p = held_.size();
        for (size_t k = std::min(held_.size(), f_.open.size() - 1); k > 0; --k)
          if (held_.compare(held_.size() - k, k, f_.open, 0, k) == 0) {
            p = held_.size() - k;
            break;
          }
        if (end) p = held_.size();
      }
      emit_content(out, std::string_view(held_).substr(0, p));
      held_.erase(0, p);
      if (held_.empty()) break;
    }
    ToolCall call;
    const size_t n = match_call(call, end);
    if (n == std::string::npos) break;  // wait for more text
    if (n == 0) {
      // Not a call: Llama's reply is plain text from here; Hermes's open marker is text and the
      // search goes on after it.
      const size_t k = f_.open.empty() ? held_.size() : std::min(f_.open.size(), held_.size());
      emit_content(out, std::string_view(held_).substr(0, k));
      held_.erase(0, k);
      started_ = true;
      continue;
    }
    emit_call(out, std::move(call));
    held_.erase(0, n);
  }
}

std::vector<json> ToolCallStream::push(std::string_view text) {
  std::vector<json> out;
  held_ += text;
  drain(out, false);
  return out;
}

std::vector<json> ToolCallStream::finish() {
  std::vector<json> out;
  drain(out, true);
  if (n_calls_ == 0 && !ws_.empty()) {
    content_ += ws_;
    out.push_back({{"content", ws_}});
  }
  ws_.clear();
  return out;
}

ParsedReply parse_tool_calls(const ToolCallFormat& f, std::string_view text,
                             const std::vector<std::string>& names) {
  ToolCallStream s(f, names);
  s.push(text);
  s.finish();
  return {std::move(s.content_), std::move(s.calls_)};
}

void split_tool_calls(const ToolCallFormat& f, const std::vector<std::string>& names,
                      ChoiceText& choice) {
  ParsedReply r = parse_tool_calls(f, choice.text, names);
  if (r.calls.empty()) return;
  choice.text = std::move(r.content);
  choice.tool_calls = json::array();
  for (const ToolCall& c : r.calls)
    choice.tool_calls.push_back({{"id", c.id},
                                 {"type", "function"},
                                 {"function", {{"name", c.name}, {"arguments", c.arguments}}}});
  if (choice.finish == "stop") choice.finish = "tool_calls";
}

std::string tool_call_events(ToolCallStream& s, const ResponseMeta& m, std::string_view piece,
                             const std::string& finish, bool usage_null, json logprobs,
                             int32_t index) {
  std::vector<json> deltas = s.push(piece);
  if (!finish.empty()) {
    std::vector<json> rest = s.finish();
    deltas.insert(deltas.end(), rest.begin(), rest.end());
  }
  // A token whose text is held (a call's start) still gets its logprobs sent.
  if (deltas.empty() && !logprobs.is_null()) deltas.push_back(json::object());
  std::string out;
  for (json& d : deltas) {
    out += sse_event(render_delta_chunk(m, std::move(d), "", usage_null, logprobs, index));
    logprobs = nullptr;
  }
  if (!finish.empty() && finish != "cancelled" && finish != "error")
    out += sse_event(render_delta_chunk(
        m, json::object(), s.n_calls() > 0 && finish == "stop" ? "tool_calls" : finish,
        usage_null, nullptr, index));
  return out;
}

// ---- the grammar of a forced call ---------------------------------------------------------------

std::shared_ptr<const Grammar> tool_call_grammar(const ToolCallFormat& f, const ToolsRequest& t) {
  json any_of = json::array();
  json defs = json::object();
  for (const json& tool : t.tools) {
    const json& fn = tool["function"];
    const std::string name = fn["name"].get<std::string>();
    if (t.choice == ToolChoice::Named && name != t.named) continue;
    json params = fn.contains("parameters") && fn["parameters"].is_object()
                      ? fn["parameters"]
                      : json{{"type", "object"}, {"additionalProperties", false}};
    // A schema's $defs move to the call's root, where its "#/$defs/..." references now point.
    for (const char* key : {"$defs", "definitions"}) {
      if (!params.contains(key)) continue;
      if (!params[key].is_object())
        bad("tools", fmt::format("tool '{}': '{}' must be an object", name, key));
      for (const auto& [k, v] : params[key].items()) {
        if (defs.contains(k) && defs[k] != v)
          bad("tools", fmt::format("tools define '{}' in their $defs differently; a forced call "
                                   "needs them to agree", clip(k)));
        defs[k] = v;
      }
      params.erase(key);
    }
    const std::string args_key(f.args_key);
    any_of.push_back({{"type", "object"},
                      {"properties", {{"name", {{"const", name}}}, {args_key, params}}},
                      {"required", {"name", args_key}},
                      {"additionalProperties", false}});
  }
  json schema = any_of.size() == 1 ? any_of[0] : json{{"anyOf", any_of}};
  if (!defs.empty()) schema["$defs"] = std::move(defs);
  const std::string prefix = f.open.empty() ? "" : std::string(f.open) + "\n";
  const std::string suffix = f.close.empty() ? "" : "\n" + std::string(f.close);
  try {
    return compile_json_schema(schema, prefix, suffix);
  } catch (const Error& e) {
    bad("tools", fmt::format("a forced tool call (tool_choice '{}'): {}",
                             t.choice == ToolChoice::Named ? t.named : "required", e.what()));
  }
}

}  // namespace kvlm::server
