// Chat templates: a conversation rendered into the prompt text a model was trained on, through
// the model's Jinja template (tokenizer.chat_template) in the environment Hugging Face's
// apply_chat_template and llama.cpp provide: messages, add_generation_prompt, bos_token,
// eos_token, tools (the request's tool list, or none) and documents as none, raise_exception()
// and strftime_now(). Tool calls and tool results travel in the messages as OpenAI's API has
// them, with a call's arguments parsed into an object (Llama 3.1 iterates `arguments | items`,
// Qwen and Hermes write `arguments | tojson`), as llama.cpp and transformers pass them.
#pragma once

#include <ctime>
#include <string>
#include <string_view>
#include <vector>

#include "template/template.h"

namespace kvlm {

// A call an assistant turn made: arguments is the JSON text the API carries (an object's text
// is given to the template as the object; any other text as the string).
struct ChatToolCall {
  std::string id;
  std::string name;
  std::string arguments;
};

struct ChatMessage {
  std::string role;  // "system", "user", "assistant", "tool"
  std::string content;
  bool content_none = false;  // content is None (an assistant turn that only calls tools)
  std::vector<ChatToolCall> tool_calls = {};  // assistant: its calls (none: no tool_calls key)
  std::string tool_call_id = {};              // tool: the call this is the result of
  std::string name = {};                      // tool: the function's name, when given
};

struct ChatEnv {
  std::string bos_token;  // the tokenizer's BOS/EOS token texts ("" when it has none)
  std::string eos_token;
  std::time_t now = 0;    // the date strftime_now() formats; 0: the current local time
};

class ChatTemplate {
 public:
  // Parses the template; throws kvlm::Error "chat template: template line N: ..." for syntax it
  // cannot read, and for an empty template (a model without tokenizer.chat_template).
  ChatTemplate(const std::string& source, ChatEnv env);
  // Throws kvlm::Error "chat template: template line N: ..." when rendering fails (undefined
  // values, unsupported filters, exceeded limits), tmpl::TemplateRaised when the template's
  // raise_exception refuses the conversation.
  // tools_json: the request's "tools" as JSON text (an array), seen by the template as `tools`
  // (with `functions`, the same list as indented JSON, and `datetime`, for firefunction's
  // template); empty: tools is none. Throws kvlm::Error for text that is not a JSON array.
  std::string apply(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                    std::string_view tools_json = {}) const;
  // Whether the template's source names `var` (tools, tool_calls): a template that never does
  // shows the model no tools.
  bool mentions(std::string_view var) const { return source_.find(var) != std::string::npos; }
  const std::string& source() const { return source_; }
  // Renders the conversations every chat front end needs, [user] and [system, user] with the
  // generation prompt. Throws when the template cannot render them (kvlm serve refuses to start);
  // returns a note when the template itself refuses only the system turn with raise_exception
  // (Gemma 2's "System role not supported"), "" when both render.
  std::string check() const;

 private:
  std::string source_;
  tmpl::Template tmpl_;
  ChatEnv env_;
};

// One-shot form of ChatTemplate(tmpl, env).apply(messages, add_generation_prompt).
std::string apply_chat_template(const std::string& tmpl, const std::vector<ChatMessage>& messages,
                                bool add_generation_prompt, const ChatEnv& env = {});

}  // namespace kvlm
