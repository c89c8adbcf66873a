// Tool calling in chat completions (OpenAI's `tools` and `tool_choice`): the request's tools, the
// model's own call format, its output parsed back into `tool_calls` (whole or as stream deltas),
// and the grammar that makes it call a tool when it must.
//
// The format is data (kToolCallFormats), chosen by what the chat template's source says: Llama 3.x
// answers a call with a JSON object {"name", "parameters"} (after <|python_tag|> or alone), Hermes
// and Qwen with <tool_call>{"name", "arguments"}</tool_call>, one or several. A template that does
// not render tools (SmolLM2's ChatML) gets them from kvlm as a system prompt asking for the Hermes
// format, as llama-server gives such templates a generic one.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "grammar/grammar.h"
#include "server/api.h"

namespace kvlm::server {

enum class ToolChoice { Auto, None, Required, Named };

// A request's "tools" and "tool_choice", validated.
struct ToolsRequest {
  json tools = json::array();  // [{"type": "function", "function": {"name", ...}}], as sent
  ToolChoice choice = ToolChoice::Auto;
  std::string named;  // Named: the function the model must call
  // Whether the model is shown the tools and its output parsed for calls. "none": neither (the
  // model answers as without tools; earlier calls and results in the messages still render).
  bool active() const { return !tools.empty() && choice != ToolChoice::None; }
};

inline constexpr size_t kMaxTools = 128;  // tools in one request
// 400 naming "tools" or "tool_choice" (and "parallel_tool_calls" for a non-boolean) for a bad
// value; tool_choice "required" or a named function without tools is a 400 too.
ToolsRequest parse_tools(const json& body);

// How a model writes a tool call.
struct ToolCallFormat {
  std::string_view name;
  std::string_view detect;    // the chat template's source holds this text
  std::string_view open;      // text before each call; "" : the call is a JSON object that opens
                              // the reply (only at its start, after whitespace)
  std::string_view close;     // text after each call ("" : none)
  std::string_view tag;       // a marker that may come before the calls, dropped ("" : none)
  std::string_view args_key;  // the call object's key for the arguments ("arguments" is read
                              // too)
};

inline constexpr ToolCallFormat kToolCallFormats[] = {
    // Llama 3.1/3.2/3.3's templates ask for {"name": function name, "parameters": dictionary}.
    {"llama3", "\"parameters\": dictionary", "", "", "<|python_tag|>", "parameters"},
    // Hermes 2/3, Qwen 2.5/3 and templates after them; also kvlm's own prompt (below).
    {"hermes", "<tool_call>", "<tool_call>", "</tool_call>", "", "arguments"},
};
inline constexpr const ToolCallFormat& kHermesFormat = kToolCallFormats[1];

// The format a template's calls take: the first whose `detect` text the source holds; Hermes for
// templates that name none (kvlm then renders the tools itself, tools_system_prompt).
const ToolCallFormat& tool_call_format(std::string_view template_source);
// Whether a template renders tools itself (its source reads `tools`), else kvlm prepends
// tools_system_prompt to the conversation.
bool template_renders_tools(std::string_view template_source);
// kvlm's system prompt for a template that does not render tools: the tools as JSON and how to
// call them (Hermes's format).
std::string tools_system_prompt(const json& tools);

// Readies a conversation for a template and returns the tools text it renders (ChatTemplate::
// apply's tools_json; "" for none). A template that renders tools gets them as the request has
// them; one that does not gets tools_system_prompt as (the start of) the system message. A
// template that never reads `tool_calls` gets earlier calls written into the assistant's text
// in Hermes's form and tool results as user turns in <tool_response> tags, so that it renders
// them, and the model sees them as it was asked to write them.
std::string tool_messages(std::vector<ChatMessage>& messages, const ToolsRequest& t,
                          std::string_view template_source);

// One call, as OpenAI's API carries it.
struct ToolCall {
  std::string id;         // "call_" + 24 letters and digits
  std::string name;
  std::string arguments;  // a JSON object's text
};
std::string new_tool_call_id();

// A reply's text split into what the model said and the calls it made. Text that looks like a
// call but does not parse as one, or calls a function not in `names` (when not empty), stays
// content; whitespace around calls is dropped.
struct ParsedReply {
  std::string content;
  std::vector<ToolCall> calls;
};
ParsedReply parse_tool_calls(const ToolCallFormat& f, std::string_view text,
                             const std::vector<std::string>& names = {});

// The same, text piece by text piece, as stream deltas: content is sent as it comes, except text
// that could still be the start of a call, which is held until it is known; a call is sent once
// its text is whole, as OpenAI's deltas ({"tool_calls": [{"index", "id", "type", "function":
// {"name", "arguments": ""}}]}, then {"tool_calls": [{"index", "function": {"arguments"}}]}).
class ToolCallStream {
 public:
  ToolCallStream(const ToolCallFormat& f, std::vector<std::string> names)
      : f_(f), names_(std::move(names)) {}
  // Each returned json is one chunk's delta: {"content"} or {"tool_calls"}.
  std::vector<json> push(std::string_view text);
  std::vector<json> finish();  // at the end of the reply: what is still held
  int32_t n_calls() const { return n_calls_; }

 private:
  // Moves what can be decided from held_ to out; `end`: no more text will come.
  void drain(std::vector<json>& out, bool end);
  // held_ starts a call: its length (call text and close marker) and the call when it parses,
  // 0 when held_ cannot be a call, npos while it may still become one.
  size_t match_call(ToolCall& call, bool end) const;
  void emit_content(std::vector<json>& out, std::string_view text);
  void emit_call(std::vector<json>& out, ToolCall call);

  const ToolCallFormat& f_;
  std::vector<std::string> names_;
  std::string held_;      // text not yet sent: a call's start or what may be one
  std::string ws_;        // whitespace not yet sent: dropped when a call follows it
  bool started_ = false;  // content other than whitespace was sent (Llama: no call can follow)
  bool after_call_ = false;  // a call was the last thing sent: whitespace next is dropped
  int32_t n_calls_ = 0;
  std::string content_;          // everything sent as content (parse_tool_calls)
  std::vector<ToolCall> calls_;  // every call sent (parse_tool_calls)
  friend ParsedReply parse_tool_calls(const ToolCallFormat&, std::string_view,
                                      const std::vector<std::string>&);
};

// A reply's choice with its calls split out: content, tool_calls, and finish "tool_calls" when a
// reply that stopped made calls. Unchanged when it made none.
void split_tool_calls(const ToolCallFormat& f, const std::vector<std::string>& names,
                      ChoiceText& choice);

// Streaming a choice whose reply is parsed for calls: the SSE events for its new text `piece`
// (with `logprobs`, its tokens', on the first), and when `finish` is not empty (the choice ended)
// what was held and the finish chunk ("tool_calls" for a reply that stopped after calls; none
// for "cancelled" and "error", which end the stream otherwise).
std::string tool_call_events(ToolCallStream& s, const ResponseMeta& m, std::string_view piece,
                             const std::string& finish, bool usage_null, json logprobs,
                             int32_t index);

// tool_choice "required" or a named function: the grammar of one call in the format, the name one
// of the tools' (or the named one) and the arguments following that tool's parameters schema.
// 400 naming "tools" when a schema uses what the JSON-schema compiler does not take.
std::shared_ptr<const Grammar> tool_call_grammar(const ToolCallFormat& f, const ToolsRequest& t);

}  // namespace kvlm::server
