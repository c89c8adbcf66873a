// The OpenAI-compatible API without HTTP: JSON request bodies -> validated kvlm::Requests, and
// generated tokens -> the JSON objects and stream chunks a client reads. server.cpp only moves
// bytes; every decision about what a request means or what a response says is made here, so it
// is tested without sockets (tests/server/test_api.cpp).
//
// Errors are thrown as HttpError (status + OpenAI's error fields); error_body() renders them as
// {"error": {"message", "type", "param", "code"}}.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "engine/scheduler.h"
#include "sampling/sampler.h"
#include "template/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace kvlm::server {

// Ordered: a request's objects keep the order the client wrote their keys in (a json_schema's
// properties are generated in that order, as OpenAI's strict mode does), and responses list
// their fields in the order they are built.
using json = nlohmann::ordered_json;

// A request the server refuses: the HTTP status and OpenAI's error fields (empty param/code are
// rendered as null; an empty type is derived from the status).
class HttpError : public std::runtime_error {
 public:
  HttpError(int status, const std::string& message, std::string param = {}, std::string code = {},
            std::string type = {})
      : std::runtime_error(message),
        status(status),
        param(std::move(param)),
        code(std::move(code)),
        type(std::move(type)) {}
  int status;
  std::string param, code, type;
};

// Client text quoted in an error message: at most max_bytes, cut at a character boundary with
// "..." and the full size appended, so an error never echoes an attacker-sized string.
inline constexpr size_t kMaxQuoted = 64;
std::string clip(std::string_view s, size_t max_bytes = kMaxQuoted);

// {"error": {"message", "type", "param", "code"}}; type "invalid_request_error" for 4xx,
// "authentication_error" for 401, "server_error" for 5xx unless the error names one.
json error_body(const HttpError& e);
// Serialises compactly; invalid UTF-8 (a detokenized partial character) becomes U+FFFD instead of
// throwing.
std::string dump(const json& j);

// OpenAI's n: choices of one request, at most this many (and at most -np).
inline constexpr int32_t kMaxChoices = 16;

// The largest max_tokens of a server whose cache evicts (no context bound applies): 2^20 tokens,
// about an hour and a half of decoding at 200 tokens/s.
inline constexpr int64_t kMaxEvictingTokens = int64_t{1} << 20;

// What this server serves, as the API describes it.
struct ServedModel {
  std::string id;               // the model file's stem: "SmolLM2-135M-Instruct.Q4_1"
  // --alias (llama-server's -a, vLLM's --served-model-name): the names the model is served
  // under, listed by /v1/models and accepted in "model"; the first is the one responses name.
  // Empty: id.
  std::vector<std::string> aliases;
  std::vector<std::string> names() const {
    return aliases.empty() ? std::vector<std::string>{id} : aliases;
  }
  const std::string& name() const { return aliases.empty() ? id : aliases.front(); }
  int64_t created = 0;          // unix seconds (the file's modification time)
  int64_t n_ctx = 0;            // per-sequence context (prompt + generated), tokens
  int64_t capacity_tokens = 0;  // tokens the whole KV pool holds (blocks x block size)
  int32_t block_size = 16;      // tokens per KV block (the pool's arithmetic for n choices)
  int32_t max_choices = 16;     // n's bound: min(kMaxChoices, -np); 1 with KIVI
  // The cache evicts when a sequence's context is full (--kv-window, --keep): prompts and
  // completions are then not bounded by n_ctx, only max_tokens by kMaxEvictingTokens.
  bool evicts = false;
  // The model's template, --chat-template's, or plain ChatML when the model has none.
  std::shared_ptr<const ChatTemplate> chat_template;
  SamplingParams defaults;      // the server's --temp/--top-k/... (seed unused)
};

// Whether `name` is one the model is served under (ServedModel::names).
bool serves(const ServedModel& m, std::string_view name);

// The template chat requests are rendered with: `source` (--chat-template FILE's text) when not
// empty, else the model's tokenizer.chat_template, else plain ChatML (llama-server's fallback;
// tiny test models have none); bos_token and eos_token are the tokenizer's token texts.
// Throws kvlm::Error for a template kvlm cannot parse.
std::shared_ptr<const ChatTemplate> served_chat_template(const Tokenizer& tok,
                                                         const std::string& source = "");
// The tokenizer's BOS and EOS token texts ("" where it has none) for rendering chat templates.
ChatEnv chat_env(const Tokenizer& tok);

// Whether an Authorization header value carries `key` as a bearer token: "Bearer KEY", the scheme
// in any case (RFC 7235: auth-scheme is case-insensitive) and one or more spaces before the token.
// The token is compared in constant time (the time taken says nothing of the key).
bool bearer_matches(std::string_view authorization, std::string_view key);

// {"id": name, "object": "model", "created", "owned_by"}
json model_object(const ServedModel& m, const std::string& name);
json models_list(const ServedModel& m);  // {"object": "list", "data": [a model_object per name]}

enum class Endpoint { Chat, Completion };

struct ToolCallFormat;  // tools.h

// A validated /v1/chat/completions or /v1/completions request.
struct GenerationRequest {
  Endpoint endpoint = Endpoint::Chat;
  Request req;                    // prompt token ids, max_tokens, sampling, ignore_eos
  std::vector<std::string> stop;  // at most 4, none empty
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  // Chat with tools shown to the model (tool_choice not "none"): its call format and the tools'
  // names; each reply is parsed for calls (tools.h). Null: replies are plain text.
  const ToolCallFormat* tool_format = nullptr;
  std::vector<std::string> tool_names;
};

// Arrays and objects nested deeper than this refuse the body. A request needs 4 levels
// (messages[i].content[k]); a deeper value would only reach the recursive walks over a json
// (dump, copy, compare: a stack frame per level), which 100,000 levels overflow.
inline constexpr int kMaxJsonDepth = 64;

// The body as a JSON object; 400 for invalid JSON, another JSON type, nesting deeper than
// kMaxJsonDepth or a number beyond a double's range (param: the body's field where it is found).
json parse_json_body(std::string_view body);
// random_seed: the seed when the request gives none (the server draws one per request).
// HttpError 400 for wrong types, out-of-range values, unsupported features, prompts that do not
// fit the context; 404 (model_not_found) when "model" names another model; 500 when the chat
// template cannot be rendered.
GenerationRequest parse_chat_request(const json& body, const Tokenizer& tok, const ServedModel& m,
                                     uint64_t random_seed);
// A chat body's "messages", validated (400 naming the message and field).
std::vector<ChatMessage> chat_messages(const json& body);
// The conversation rendered by the served template and tokenized, as a chat request's prompt;
// without the generation prompt it ends with the last message. 400 (messages) when the template
// refuses it or it has no tokens, 500 when the template cannot be rendered.
// tools_json: the tools the template renders (ChatTemplate::apply), "" for none.
std::vector<int32_t> render_chat(const std::vector<ChatMessage>& messages, const Tokenizer& tok,
                                 const ServedModel& m, bool add_generation_prompt,
                                 std::string_view tools_json = {});
GenerationRequest parse_completion_request(const json& body, const Tokenizer& tok,
                                           const ServedModel& m, uint64_t random_seed);

// POST /tokenize {"content", "add_special"?: false, "parse_special"?: true, "with_pieces"?:
// false} -> {"tokens": [id, ...]} or, with pieces, {"tokens": [{"id", "piece"}, ...]} (piece: a
// string when the token's bytes are valid UTF-8, else the byte values), as llama-server.
json tokenize_response(const json& body, const Tokenizer& tok);
// POST /detokenize {"tokens": [id, ...]} -> {"content"}; 400 for ids outside the vocabulary.
json detokenize_response(const json& body, const Tokenizer& tok);

// ---- generated text ----------------------------------------------------------------------------

// Cuts text at the first stop string. Text that could be the start of a stop string is held back
// until the next piece shows whether it is one, so a stop string split across tokens is never
// shown. Held text always starts at a character boundary (a stop string's prefix does).
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {}
  // Returns the text now safe to show; once a stop string is found, the text before it, and
  // stopped() turns true (later calls return nothing).
  std::string push(std::string_view text);
  std::string flush();  // the held text, at the end of generation (nothing once stopped)
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
};

// Generated token ids -> the text a client sees: end-of-generation tokens are dropped (unless
// ignore_eos), characters split across tokens are completed (StreamDecoder), stop strings cut.
class TextStream {
 public:
  TextStream(const Tokenizer& tok, std::vector<std::string> stop, bool ignore_eos)
      : tok_(tok), dec_(tok), stop_(std::move(stop)), ignore_eos_(ignore_eos) {}
  std::string push(int32_t id);                     // new visible text, possibly empty
  std::string finish();                             // what is still held when generation ends
  bool stopped() const { return stop_.stopped(); }  // a stop string ended the text

 private:
  const Tokenizer& tok_;
  StreamDecoder dec_;
  StopMatcher stop_;
  bool ignore_eos_;
};

// ---- responses ---------------------------------------------------------------------------------

struct Usage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  int64_t cached_tokens = 0;  // prompt tokens served by the prefix cache
};
json usage_json(const Usage& u);

// The fields every response object and chunk of one request shares.
struct ResponseMeta {
  Endpoint endpoint = Endpoint::Chat;
  std::string id;  // "chatcmpl-..." / "cmpl-..."
  int64_t created = 0;
  std::string model;
};

// A request's log-probabilities in OpenAI's shapes, added token by token and taken as one
// choice's "logprobs": chat's {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
// "logprob", "bytes"}]}]}, completions' {"tokens", "token_logprobs", "top_logprobs": [{token:
// logprob}], "text_offset"}. token: the token's text (specials rendered); bytes: its UTF-8 bytes;
// a logprob of -inf (a token that cannot be drawn) is -9999.0, as OpenAI writes it.
class LogprobsBuilder {
 public:
  LogprobsBuilder(const Tokenizer& tok, Endpoint ep) : tok_(tok), ep_(ep) { clear(); }
  // text_offset (completions): the characters of the completion shown before this token.
  void add(const StepLogprobs& lp, int64_t text_offset);
  bool empty() const { return n_ == 0; }
  json take();  // what was added since the last take()

 private:
  void clear();
  const Tokenizer& tok_;
  Endpoint ep_;
  json acc_;
  size_t n_ = 0;
};

// One choice of a response: its text, finish reason and logprobs (null: not asked), and the
// tool calls its reply made (null: none; chat's message then has no "tool_calls").
struct ChoiceText {
  std::string text;
  std::string finish;
  json logprobs = nullptr;
  json tool_calls = nullptr;
};
// chat.completion / text_completion with choices[i].index = i; usage counts the prompt once and
// the completion tokens of every choice (OpenAI's usage for n > 1).
json render_response(const ResponseMeta& m, const std::vector<ChoiceText>& choices,
                     const Usage& u);
json render_response(const ResponseMeta& m, const std::string& text, const std::string& finish,
                     const Usage& u, const json& logprobs = nullptr);
// chat.completion.chunk / text_completion chunk with one choice. Chat: role_delta puts the
// assistant role in the delta (the first chunk); finish empty: "finish_reason": null.
// usage_null adds "usage": null (OpenAI does so on every chunk when include_usage is on).
// logprobs: those of the chunk's tokens (null: none). index: the choice (n > 1).
json render_chunk(const ResponseMeta& m, const std::string& text, const std::string& finish,
                  bool role_delta, bool usage_null, const json& logprobs = nullptr,
                  int32_t index = 0);
// A chat chunk whose choice carries `delta` as given ({"content"} or {"tool_calls"}).
json render_delta_chunk(const ResponseMeta& m, json delta, const std::string& finish,
                        bool usage_null, const json& logprobs = nullptr, int32_t index = 0);
// The last chunk with include_usage: "choices": [] and the usage.
json render_usage_chunk(const ResponseMeta& m, const Usage& u);
// "data: {json}\n\n"
std::string sse_event(const json& j);

}  // namespace kvlm::server
