#include "template/chat_template.h"

#include <array>
#include <nlohmann/json.hpp>
#include <utility>

#include "base/error.h"

namespace kvlm {

namespace {

tmpl::Template parse_chat(const std::string& source) {
  if (source.empty())
    fail("the model has no chat template (tokenizer.chat_template); pass the prompt as raw text "
         "or give one with --chat-template FILE");
  try {
    return tmpl::Template::parse(source);  // trim_blocks and lstrip_blocks, as HF renders
  } catch (const Error& e) {
    fail("chat template: {}", e.what());
  }
}

std::string format_date(std::time_t fixed, const char* format) {
  const std::time_t t = fixed ? fixed : std::time(nullptr);
  std::tm tm{};
  localtime_r(&t, &tm);
  std::array<char, 256> buf{};
  const size_t n = std::strftime(buf.data(), buf.size(), format, &tm);
  return std::string(buf.data(), n);
}

// strftime_now(format): the date formatted as Python's datetime.strftime in the C locale.
tmpl::Value strftime_fn(std::time_t fixed) {
  return tmpl::Value::callable("strftime_now", [fixed](tmpl::Interp&, const tmpl::Args& a) {
    const std::string fmt = !a.pos.empty() && a.pos[0].is_string() ? a.pos[0].s : "";
    return tmpl::Value::string(format_date(fixed, fmt.c_str()));
  });
}

// A JSON value as the Python object json.loads makes of it (objects keep their key order).
tmpl::Value from_json(const nlohmann::ordered_json& j) {
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null: return tmpl::Value::none();
    case nlohmann::ordered_json::value_t::boolean: return tmpl::Value::boolean(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer:
      return tmpl::Value::integer(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned:
      if (j.get<uint64_t>() <= uint64_t(INT64_MAX)) return tmpl::Value::integer(j.get<int64_t>());
      return tmpl::Value::number(j.get<double>());
    case nlohmann::ordered_json::value_t::number_float: return tmpl::Value::number(j.get<double>());
    case nlohmann::ordered_json::value_t::string: return tmpl::Value::string(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      tmpl::List items;
      for (const auto& v : j) items.push_back(from_json(v));
      return tmpl::Value::make_list(std::move(items));
    }
    case nlohmann::ordered_json::value_t::object: {
      tmpl::Value d = tmpl::Value::make_dict();
      for (const auto& [k, v] : j.items()) d.dict->set(k, from_json(v));
      return d;
    }
    default: return tmpl::Value::none();  // binary and discarded values never come from text
  }
}

// A call's arguments: the object its JSON text holds, else the text itself.
tmpl::Value arguments_value(const std::string& text) {
  const auto j = nlohmann::ordered_json::parse(text, nullptr, /*allow_exceptions=*/false);
  return j.is_object() ? from_json(j) : tmpl::Value::string(text);
}

// {role, content, tool_calls: [{id, type, function: {name, arguments}}], tool_call_id, name}, the
// last three only where the message has them (templates test `'tool_calls' in message`).
tmpl::Value message_value(const ChatMessage& m) {
  tmpl::Value d = tmpl::Value::make_dict();
  d.dict->set("role", tmpl::Value::string(m.role));
  d.dict->set("content", m.content_none ? tmpl::Value::none() : tmpl::Value::string(m.content));
  if (!m.tool_calls.empty()) {
    tmpl::List calls;
    for (const ChatToolCall& c : m.tool_calls) {
      tmpl::Value fn = tmpl::Value::make_dict();
      fn.dict->set("name", tmpl::Value::string(c.name));
      fn.dict->set("arguments", arguments_value(c.arguments));
      tmpl::Value call = tmpl::Value::make_dict();
      call.dict->set("id", tmpl::Value::string(c.id));
      call.dict->set("type", tmpl::Value::string("function"));
      call.dict->set("function", std::move(fn));
      calls.push_back(std::move(call));
    }
    d.dict->set("tool_calls", tmpl::Value::make_list(std::move(calls)));
  }
  if (!m.tool_call_id.empty()) d.dict->set("tool_call_id", tmpl::Value::string(m.tool_call_id));
  if (!m.name.empty()) d.dict->set("name", tmpl::Value::string(m.name));
  return d;
}

}  // namespace

ChatTemplate::ChatTemplate(const std::string& source, ChatEnv env)
    : source_(source), tmpl_(parse_chat(source)), env_(std::move(env)) {}

std::string ChatTemplate::apply(const std::vector<ChatMessage>& messages,
                                bool add_generation_prompt, std::string_view tools_json) const {
  tmpl::Value ctx = tmpl::Value::make_dict();
  tmpl::List msgs;
  for (const ChatMessage& m : messages) msgs.push_back(message_value(m));
  ctx.dict->set("messages", tmpl::Value::make_list(std::move(msgs)));
  ctx.dict->set("add_generation_prompt", tmpl::Value::boolean(add_generation_prompt));
  ctx.dict->set("bos_token", tmpl::Value::string(env_.bos_token));
  ctx.dict->set("eos_token", tmpl::Value::string(env_.eos_token));
  if (tools_json.empty()) {
    ctx.dict->set("tools", tmpl::Value::none());
  } else {
    const auto j = nlohmann::ordered_json::parse(tools_json, nullptr, false);
    if (!j.is_array()) fail("chat template: the tools must be a JSON array");
    tmpl::Value tools = from_json(j);
    // firefunction-v2's variables, as llama.cpp fills them.
    tmpl::JsonStyle indented;  // json.dumps(tools, indent=2)
    indented.indent = 2;
    indented.item_sep = ",";
    ctx.dict->set("functions", tmpl::Value::string(tmpl::to_json(tools, indented)));
    ctx.dict->set("datetime", tmpl::Value::string(format_date(env_.now, "%b %d %Y %H:%M:%S GMT")));
    ctx.dict->set("tools", std::move(tools));
  }
  ctx.dict->set("documents", tmpl::Value::none());
  ctx.dict->set("strftime_now", strftime_fn(env_.now));
  try {
    return tmpl_.render(ctx);
  } catch (const tmpl::TemplateRaised& e) {
    throw tmpl::TemplateRaised(std::string("chat template: ") + e.what());
  } catch (const Error& e) {
    fail("chat template: {}", e.what());
  }
}

std::string ChatTemplate::check() const {
  apply({{"user", "Hello"}}, true);
  try {
    apply({{"system", "You are a helpful assistant."}, {"user", "Hello"}}, true);
  } catch (const tmpl::TemplateRaised& e) {
    return fmt::format("the chat template refuses a system message: {}", e.what());
  }
  return "";
}

std::string apply_chat_template(const std::string& tmpl, const std::vector<ChatMessage>& messages,
                                bool add_generation_prompt, const ChatEnv& env) {
  return ChatTemplate(tmpl, env).apply(messages, add_generation_prompt);
}

}  // namespace kvlm
