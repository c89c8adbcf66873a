#include "template/chat_template.h"

#include <array>
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

// strftime_now(format): the date formatted as Python's datetime.strftime in the C locale.
tmpl::Value strftime_fn(std::time_t fixed) {
  return tmpl::Value::callable("strftime_now", [fixed](tmpl::Interp&, const tmpl::Args& a) {
    const std::time_t t = fixed ? fixed : std::time(nullptr);
    std::tm tm{};
    localtime_r(&t, &tm);
    std::array<char, 256> buf{};
    const std::string fmt = !a.pos.empty() && a.pos[0].is_string() ? a.pos[0].s : "";
    const size_t n = std::strftime(buf.data(), buf.size(), fmt.c_str(), &tm);
    return tmpl::Value::string(std::string(buf.data(), n));
  });
}

}  // namespace

ChatTemplate::ChatTemplate(const std::string& source, ChatEnv env)
    : tmpl_(parse_chat(source)), env_(std::move(env)) {}

std::string ChatTemplate::apply(const std::vector<ChatMessage>& messages,
                                bool add_generation_prompt) const {
  tmpl::Value ctx = tmpl::Value::make_dict();
  tmpl::List msgs;
  for (const ChatMessage& m : messages) {
    tmpl::Value d = tmpl::Value::make_dict();
    d.dict->set("role", tmpl::Value::string(m.role));
    d.dict->set("content", tmpl::Value::string(m.content));
    msgs.push_back(std::move(d));
  }
  ctx.dict->set("messages", tmpl::Value::make_list(std::move(msgs)));
  ctx.dict->set("add_generation_prompt", tmpl::Value::boolean(add_generation_prompt));
  ctx.dict->set("bos_token", tmpl::Value::string(env_.bos_token));
  ctx.dict->set("eos_token", tmpl::Value::string(env_.eos_token));
  ctx.dict->set("tools", tmpl::Value::none());
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
