// Chat templates: a conversation rendered into the prompt text a model was trained on, through
// the model's Jinja template (tokenizer.chat_template) in the environment Hugging Face's
// apply_chat_template and llama.cpp provide: messages, add_generation_prompt, bos_token,
// eos_token, tools and documents as none, raise_exception() and strftime_now().
#pragma once

#include <ctime>
#include <string>
#include <vector>

#include "template/template.h"

namespace kvlm {

struct ChatMessage {
  std::string role;  // "system", "user", "assistant"
  std::string content;
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
  std::string apply(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const;
  // Renders the conversations every chat front end needs, [user] and [system, user] with the
  // generation prompt. Throws when the template cannot render them (kvlm serve refuses to start);
  // returns a note when the template itself refuses only the system turn with raise_exception
  // (Gemma 2's "System role not supported"), "" when both render.
  std::string check() const;

 private:
  tmpl::Template tmpl_;
  ChatEnv env_;
};

// One-shot form of ChatTemplate(tmpl, env).apply(messages, add_generation_prompt).
std::string apply_chat_template(const std::string& tmpl, const std::vector<ChatMessage>& messages,
                                bool add_generation_prompt, const ChatEnv& env = {});

}  // namespace kvlm
