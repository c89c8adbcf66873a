// Chat templates without a Jinja interpreter: the template text is only inspected to recognise
// its family, and the family's rendering is written out here. Supported is ChatML
//
//   <|im_start|>{role}\n{content}<|im_end|>\n ... [<|im_start|>assistant\n]
//
// optionally with a default system message that templates such as SmolLM2's and Qwen2's insert
// when the conversation does not start with one:
//
//   {% if loop.first and messages[0]['role'] != 'system' %}
//   {{ '<|im_start|>system\nYou are ...<|im_end|>\n' }}{% endif %}
//
// Goldens rendered by jinja2 itself check the output (tools/gen_tokenizer_goldens.py).

#include <string>
#include <string_view>

#include "base/error.h"
#include "tokenizer/tokenizer.h"

namespace kvlm {

namespace {

constexpr std::string_view kStart = "<|im_start|>";
constexpr std::string_view kEnd = "<|im_end|>";

bool contains(std::string_view s, std::string_view what) {
  return s.find(what) != std::string_view::npos;
}

// The first few characters of a template, one line, for error messages.
std::string excerpt(std::string_view tmpl) {
  std::string out;
  for (char c : tmpl.substr(0, 60)) out += c == '\n' ? std::string("\\n") : std::string(1, c);
  return tmpl.size() > 60 ? out + "..." : out;
}

// Undoes the escapes of a Jinja string literal that can occur in a system prompt.
std::string unescape_jinja(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size()) {
      const char c = s[++i];
      out += c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : c;
    } else {
      out += s[i];
    }
  }
  return out;
}

// The literal default system prompt of the template, if it has one: the text of a
// "<|im_start|>system" turn written out in full inside one string literal, in a template that
// tests whether the first message is a system message. Turns assembled from expressions (the
// user's own system message) contain quotes or braces and are skipped.
bool find_default_system(std::string_view tmpl, std::string* prompt) {
  if (!contains(tmpl, "!= 'system'") && !contains(tmpl, "!= \"system\"")) return false;
  const std::string_view head = "<|im_start|>system";
  for (size_t p = tmpl.find(head); p != std::string_view::npos; p = tmpl.find(head, p + 1)) {
    size_t q = p + head.size();
    if (q < tmpl.size() && tmpl[q] == '\n') {
      q += 1;  // a real newline inside the literal (SmolLM2's GGUF template)
    } else if (tmpl.substr(q, 2) == "\\n") {
      q += 2;  // an escaped one (Qwen2's)
    } else {
      continue;
    }
    const size_t e = tmpl.find(kEnd, q);
    if (e == std::string_view::npos) return false;
    const std::string_view raw = tmpl.substr(q, e - q);
    if (raw.find_first_of("'\"{}") != std::string_view::npos) continue;
    *prompt = unescape_jinja(raw);
    return true;
  }
  return false;
}

}  // namespace

std::string apply_chat_template(const std::string& tmpl, const std::vector<ChatMessage>& messages,
                                bool add_generation_prompt) {
  if (tmpl.empty())
    fail("the model has no chat template (tokenizer.chat_template); pass the prompt as raw text");
  const bool chatml = contains(tmpl, kStart) && contains(tmpl, kEnd) &&
                      (contains(tmpl, "message['role']") || contains(tmpl, "message[\"role\"]") ||
                       contains(tmpl, "message.role"));
  if (!chatml)
    fail(
        "chat template '{}' is not a ChatML template (<|im_start|>role ... <|im_end|>), the only "
        "family kvlm renders; pass the prompt as raw text instead",
        excerpt(tmpl));
  // A template that reshapes the content would render differently from plain ChatML.
  if (contains(tmpl, "trim"))
    fail("chat template '{}' trims message content, which kvlm's ChatML renderer does not do",
         excerpt(tmpl));

  std::string default_system;
  const bool has_default_system = find_default_system(tmpl, &default_system);

  std::string out;
  auto turn = [&](std::string_view role, std::string_view content) {
    out += kStart;
    out += role;
    out += '\n';
    out += content;
    out += kEnd;
    out += '\n';
  };
  // Jinja's loop.first: the default system turn needs at least one message.
  if (has_default_system && !messages.empty() && messages.front().role != "system")
    turn("system", default_system);
  for (const ChatMessage& msg : messages) turn(msg.role, msg.content);
  if (add_generation_prompt) {
    out += kStart;
    out += "assistant\n";
  }
  return out;
}

}  // namespace kvlm
