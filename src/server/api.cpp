#include "server/api.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>

#include "base/error.h"
#include "grammar/json_schema.h"
#include "server/tools.h"

namespace kvlm::server {
namespace {

constexpr size_t kMaxStops = 4;  // OpenAI's limit on "stop"
// Bytes of nlohmann's parse error kept: its position and reason (~150 bytes) and the start of
// the token it quotes.
constexpr size_t kMaxParseError = 256;
// OpenAI's default max_tokens for /v1/completions (chat's default is the rest of the context).
constexpr int64_t kCompletionDefaultMaxTokens = 16;

[[noreturn]] void bad(const std::string& param, const std::string& message,
                      const std::string& code = {}) {
  throw HttpError(400, message, param, code);
}

// A client's value for an error message: numbers in full (they are short), strings clipped,
// arrays and objects by their type (dumping one would echo all of it, and recurse per level).
std::string describe(const json& v) {
  if (v.is_number_unsigned()) return fmt::format("{}", v.get<uint64_t>());
  if (v.is_number_integer()) return fmt::format("{}", v.get<int64_t>());
  if (v.is_number()) return fmt::format("{}", v.get<double>());
  if (v.is_string()) return fmt::format("'{}'", clip(v.get_ref<const std::string&>()));
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  return v.type_name();
}

// ---- typed fields: absent and null both mean "not given" ----------------------------------------

const json* field(const json& o, const char* key) {
  auto it = o.find(key);
  return it == o.end() || it->is_null() ? nullptr : &*it;
}

std::optional<bool> get_bool(const json& o, const char* key) {
  const json* v = field(o, key);
  if (!v) return std::nullopt;
  if (!v->is_boolean())
    bad(key, fmt::format("'{}' must be a boolean, got {}", key, v->type_name()));
  return v->get<bool>();
}

std::optional<double> get_number(const json& o, const char* key) {
  const json* v = field(o, key);
  if (!v) return std::nullopt;
  if (!v->is_number()) bad(key, fmt::format("'{}' must be a number, got {}", key, v->type_name()));
  return v->get<double>();
}

// JSON integers only (10.5 and "10" are errors); integers beyond int64 saturate, so a huge value
// fails the range check that follows rather than wrapping.
std::optional<int64_t> get_int(const json& o, const char* key) {
  const json* v = field(o, key);
  if (!v) return std::nullopt;
  if (!v->is_number_integer())
    bad(key, fmt::format("'{}' must be an integer, got {}", key,
                         v->is_number() ? describe(*v) : v->type_name()));
  if (v->is_number_unsigned() && v->get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
    return std::numeric_limits<int64_t>::max();
  return v->get<int64_t>();
}

std::optional<std::string> get_string(const json& o, const char* key) {
  const json* v = field(o, key);
  if (!v) return std::nullopt;
  if (!v->is_string()) bad(key, fmt::format("'{}' must be a string, got {}", key, v->type_name()));
  return v->get<std::string>();
}

double in_range(const json& o, const char* key, double lo, double hi, double dflt) {
  const auto v = get_number(o, key);
  if (!v) return dflt;
  if (!(*v >= lo && *v <= hi))
    bad(key, fmt::format("'{}' must be in [{}, {}], got {}", key, lo, hi, *v));
  return *v;
}

// Features kvlm does not have are refused rather than silently ignored: a client asking for them
// would otherwise get an answer it did not ask for.
void refuse_if(bool given, const char* key, const char* why) {
  if (given) bad(key, fmt::format("'{}' is not supported: {}", key, why), "unsupported_parameter");
}

// The length of the UTF-8 sequence starting at s[i] when its structure (lead and continuation
// bytes) is whole, else 0; the JSON writer replaces anything subtler.
size_t utf8_seq(std::string_view s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  const size_t n = c < 0x80           ? 1
                   : (c >> 5) == 0x6  ? 2
                   : (c >> 4) == 0xE  ? 3
                   : (c >> 3) == 0x1E ? 4
                                      : 0;
  if (n == 0 || i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k)
    if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return 0;
  return n;
}

bool valid_utf8(std::string_view s) {
  for (size_t i = 0, n = 0; i < s.size(); i += n)
    if ((n = utf8_seq(s, i)) == 0) return false;
  return true;
}

// s with each byte that starts no whole sequence as U+FFFD: a token that is part of a character
// gets text of its own, and tokens that differ only there share it (one key in a completion's
// top_logprobs, rather than JSON keys the writer would make equal).
std::string lossy_utf8(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    const size_t n = utf8_seq(s, i);
    out += n ? s.substr(i, n) : std::string_view("\xEF\xBF\xBD");
    i += n ? n : 1;
  }
  return out;
}

// ---- the parts chat and completions share -------------------------------------------------------

// response_format: "text" (or absent) is free text; "json_object" any JSON object (or, as
// llama-server takes it, the object's "schema"); "json_schema" OpenAI's {"json_schema": {"name",
// "schema", "strict"}}. Output is then constrained by the compiled grammar whatever "strict"
// says. Null for free text.
std::shared_ptr<const Grammar> parse_response_format(const json& body) {
  const json* rf = field(body, "response_format");
  if (!rf) return nullptr;
  if (!rf->is_object())
    bad("response_format",
        fmt::format("'response_format' must be an object, got {}", rf->type_name()));
  const auto type = get_string(*rf, "type");
  if (!type) bad("response_format", "'response_format.type' is missing");
  const json* schema = nullptr;
  if (*type == "text") return nullptr;
  if (*type == "json_object") {
    schema = field(*rf, "schema");
  } else if (*type == "json_schema") {
    const json* js = field(*rf, "json_schema");
    if (!js || !js->is_object())
      bad("response_format", "'response_format.json_schema' must be an object");
    const json* name = field(*js, "name");
    if (!name || !name->is_string())
      bad("response_format", "'response_format.json_schema.name' must be a string");
    if (const json* strict = field(*js, "strict"); strict && !strict->is_boolean())
      bad("response_format", "'response_format.json_schema.strict' must be a boolean");
    schema = field(*js, "schema");
  } else {
    bad("response_format", fmt::format("'response_format.type' must be 'text', 'json_object' or "
                                       "'json_schema', got '{}'", clip(*type)));
  }
  try {
    return schema ? compile_json_schema(*schema) : json_object_grammar();
  } catch (const Error& e) {
    bad("response_format", fmt::format("response_format: {}", e.what()), "unsupported_schema");
  }
}

void check_model(const json& body, const ServedModel& m) {
  const auto model = get_string(body, "model");
  if (model && !serves(m, *model))
    throw HttpError(
        404,
        fmt::format("The model '{}' does not exist; this server serves '{}'", clip(*model),
                    clip(m.name())),
        "model", "model_not_found");
}

// OpenAI's logit_bias: {"token id": bias in [-100, 100]}, at most kMaxLogitBias entries, ids of
// this vocabulary.
constexpr size_t kMaxLogitBias = 1024;
std::vector<std::pair<int32_t, float>> parse_logit_bias(const json& lb, int32_t n_vocab) {
  if (!lb.is_object())
    bad("logit_bias", fmt::format("'logit_bias' must be an object, got {}", lb.type_name()));
  if (lb.size() > kMaxLogitBias)
    bad("logit_bias", fmt::format("'logit_bias' has {} entries, at most {}", lb.size(),
                                  kMaxLogitBias));
  std::vector<std::pair<int32_t, float>> out;
  for (const auto& [key, value] : lb.items()) {
    int64_t id = -1;
    const auto [end, ec] = std::from_chars(key.data(), key.data() + key.size(), id);
    if (ec != std::errc() || end != key.data() + key.size() || id < 0 || id >= n_vocab)
      bad("logit_bias", fmt::format("'logit_bias' key '{}' is not a token id in [0, {})",
                                    clip(key), n_vocab));
    if (!value.is_number() || !(value.get<double>() >= -100.0 && value.get<double>() <= 100.0))
      bad("logit_bias", fmt::format("'logit_bias' of token {} must be a number in [-100, 100]", id));
    out.emplace_back(static_cast<int32_t>(id), static_cast<float>(value.get<double>()));
  }
  return out;
}

// Chat: "logprobs" (boolean) and "top_logprobs" (0..kMaxLogprobs, only with logprobs) as
// SamplingParams::n_logprobs (-1: off).
int32_t parse_chat_logprobs(const json& body) {
  const bool on = get_bool(body, "logprobs").value_or(false);
  const auto top = get_int(body, "top_logprobs");
  if (top && !on) bad("top_logprobs", "'top_logprobs' needs 'logprobs': true");
  if (top && !(*top >= 0 && *top <= kMaxLogprobs))
    bad("top_logprobs",
        fmt::format("'top_logprobs' must be in [0, {}], got {}", kMaxLogprobs, *top));
  return on ? static_cast<int32_t>(top.value_or(0)) : -1;
}

// Completions: "logprobs" N in [0, 5] (OpenAI's legacy limit): the sampled token's logprob and
// the N most likely; absent, null or false: off.
constexpr int64_t kMaxCompletionLogprobs = 5;
int32_t parse_completion_logprobs(const json& body) {
  const json* lp = field(body, "logprobs");
  if (!lp || (lp->is_boolean() && !lp->get<bool>())) return -1;
  const int64_t n = *get_int(body, "logprobs");  // `true` fails here: it is not an integer
  if (!(n >= 0 && n <= kMaxCompletionLogprobs))
    bad("logprobs",
        fmt::format("'logprobs' must be in [0, {}], got {}", kMaxCompletionLogprobs, n));
  return static_cast<int32_t>(n);
}

SamplingParams parse_sampling(const json& body, const ServedModel& m, uint64_t random_seed,
                              int32_t n_vocab) {
  SamplingParams p = m.defaults;
  p.temperature = static_cast<float>(in_range(body, "temperature", 0.0, 2.0, p.temperature));
  p.top_p = static_cast<float>(in_range(body, "top_p", 0.0, 1.0, p.top_p));
  p.min_p = static_cast<float>(in_range(body, "min_p", 0.0, 1.0, p.min_p));
  p.repeat_penalty =
      static_cast<float>(in_range(body, "repeat_penalty", 0.01, 100.0, p.repeat_penalty));
  if (auto k = get_int(body, "top_k")) {
    if (*k < 0 || *k > (1 << 30))
      bad("top_k", fmt::format("'top_k' must be in [0, 2^30], got {}", *k));
    p.top_k = static_cast<int32_t>(*k);
  }
  if (auto n = get_int(body, "repeat_last_n")) {
    if (*n < 0 || *n > (1 << 30))
      bad("repeat_last_n", fmt::format("'repeat_last_n' must be in [0, 2^30], got {}", *n));
    p.repeat_last_n = static_cast<int32_t>(*n);
  }
  // Any 64-bit integer; negative seeds are their two's complement.
  const auto seed = get_int(body, "seed");
  p.seed = seed ? static_cast<uint64_t>(*seed) : random_seed;
  // OpenAI's additive penalties, over the same window as repeat_penalty (repeat_last_n).
  p.presence_penalty =
      static_cast<float>(in_range(body, "presence_penalty", -2.0, 2.0, p.presence_penalty));
  p.frequency_penalty =
      static_cast<float>(in_range(body, "frequency_penalty", -2.0, 2.0, p.frequency_penalty));
  if (const json* lb = field(body, "logit_bias")) p.logit_bias = parse_logit_bias(*lb, n_vocab);
  try {
    validate(p);
  } catch (const Error& e) {
    bad("", e.what());
  }
  return p;
}

std::vector<std::string> parse_stop(const json& body) {
  std::vector<std::string> out;
  const json* v = field(body, "stop");
  if (!v) return out;
  if (v->is_string()) {
    out.push_back(v->get<std::string>());
  } else if (v->is_array()) {
    if (v->size() > kMaxStops)
      bad("stop",
          fmt::format("'stop' has {} strings; at most {} are allowed", v->size(), kMaxStops));
    for (const json& s : *v) {
      if (!s.is_string())
        bad("stop", fmt::format("'stop' must hold strings, got {}", s.type_name()));
      out.push_back(s.get<std::string>());
    }
  } else {
    bad("stop",
        fmt::format("'stop' must be a string or an array of strings, got {}", v->type_name()));
  }
  // An empty stop string would match at once; it is read as "no stop string" (as clients that
  // send "" mean it).
  std::erase_if(out, [](const std::string& s) { return s.empty(); });
  return out;
}

int32_t parse_n(const json& body, const ServedModel& m) {
  const int64_t n = get_int(body, "n").value_or(1);
  if (n < 1 || n > m.max_choices)
    bad("n", fmt::format("'n' must be in [1, {}] on this server (choices run at once: at most "
                         "{}, at most kvlm serve -np, 1 with the KIVI cache), got {}",
                         m.max_choices, kMaxChoices, n));
  return static_cast<int32_t>(n);
}

// n > 1: the choices share the prompt's full blocks and each holds its own after them, so the
// pool must hold choices_pool_tokens of them. A max_tokens given that does not fit is refused
// naming n; the default (the rest of the context) shrinks to what fits.
int32_t fit_choices(int32_t max_tokens, bool given, int32_t n, int64_t n_prompt,
                    const ServedModel& m) {
  auto fits = [&](int64_t mt) {
    const int64_t held = m.evicts ? std::min(n_prompt + mt, m.n_ctx) : n_prompt + mt;
    return choices_pool_tokens(n_prompt, held, n, m.block_size) <= m.capacity_tokens;
  };
  if (n == 1 || fits(max_tokens)) return max_tokens;
  if (given || !fits(1))
    bad("n", fmt::format("n = {} choices of {} tokens each after the {}-token prompt need more KV "
                         "cache than the {} tokens the whole pool holds (kvlm serve "
                         "--kv-budget); lower n or max_tokens",
                         n, given ? max_tokens : 1, n_prompt, m.capacity_tokens));
  int64_t lo = 1, hi = max_tokens;  // fits(lo), !fits(hi): the largest default that fits
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (fits(mid))
      lo = mid;
    else
      hi = mid;
  }
  return static_cast<int32_t>(lo);
}

// max_tokens: given -> checked against the context and the pool; absent -> the rest of the
// context, capped at default_cap (0: no cap). prompt_key names the prompt when it alone is too
// long.
int32_t resolve_max_tokens(std::optional<int64_t> given, const char* key, int64_t n_prompt,
                           const char* prompt_key, const ServedModel& m, int64_t default_cap) {
  if (m.evicts) {
    // The window or context shift drops old tokens as new ones come: neither the prompt nor the
    // completion is bounded by the context. Absent, one context's worth (or the cap).
    if (given && *given < 1) bad(key, fmt::format("'{}' must be at least 1, got {}", key, *given));
    if (given && *given > kMaxEvictingTokens)
      bad(key, fmt::format("'{}' is {}, more than the {} tokens one request may generate", key,
                           *given, kMaxEvictingTokens));
    int64_t n = given ? *given : m.n_ctx;
    if (!given && default_cap > 0) n = std::min(n, default_cap);
    return static_cast<int32_t>(n);
  }
  const int64_t limit = std::min(m.n_ctx, m.capacity_tokens);
  if (given) {
    if (*given < 1) bad(key, fmt::format("'{}' must be at least 1, got {}", key, *given));
    if (*given > m.n_ctx)
      bad(key, fmt::format("'{}' is {}, more than the context of {} tokens per sequence (prompt + "
                           "completion; kvlm serve -c)",
                           key, *given, m.n_ctx));
    if (*given > m.capacity_tokens)
      bad(key,
          fmt::format("'{}' is {}, more than the {} tokens the whole KV pool holds (kvlm serve "
                      "--kv-budget)",
                      key, *given, m.capacity_tokens));
  }
  if (n_prompt >= limit || (given && n_prompt + *given > limit))
    bad(given ? key : prompt_key,
        fmt::format("This model's maximum context length is {} tokens. However, you requested {} "
                    "tokens ({} in the prompt, {} in the completion). Please reduce the length of "
                    "the prompt or the completion.",
                    limit, n_prompt + (given ? *given : 1), n_prompt, given ? *given : 1),
        "context_length_exceeded");
  int64_t n = given ? *given : limit - n_prompt;
  if (!given && default_cap > 0) n = std::min(n, default_cap);
  return static_cast<int32_t>(n);
}

void parse_stream(const json& body, GenerationRequest* g) {
  g->stream = get_bool(body, "stream").value_or(false);
  // Ignored when not streaming (OpenAI refuses it; harmless to accept).
  if (const json* so = field(body, "stream_options")) {
    if (!so->is_object())
      bad("stream_options",
          fmt::format("'stream_options' must be an object, got {}", so->type_name()));
    g->include_usage = get_bool(*so, "include_usage").value_or(false);
  }
}

void check_token_ids(const std::vector<int32_t>& ids, const Tokenizer& tok, const char* param) {
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= tok.n_vocab())
      bad(param, fmt::format("{}[{}] = {} is not a token id (the vocabulary has ids 0..{})", param,
                             i, ids[i], tok.n_vocab() - 1));
}

std::vector<int32_t> int_array(const json& a, const char* param) {
  std::vector<int32_t> ids;
  ids.reserve(a.size());
  for (const json& t : a) {
    if (!t.is_number_integer() || t.get<int64_t>() < std::numeric_limits<int32_t>::min() ||
        t.get<int64_t>() > std::numeric_limits<int32_t>::max())
      bad(param,
          fmt::format("'{}' must hold 32-bit integer token ids, got {}", param, describe(t)));
    ids.push_back(static_cast<int32_t>(t.get<int64_t>()));
  }
  return ids;
}

std::string message_content(const json& msg, size_t i, const std::string& role) {
  const std::string param = fmt::format("messages[{}].content", i);
  auto it = msg.find("content");
  if (it == msg.end() || it->is_null()) {
    // An assistant turn that only called tools has no content.
    if (role == "assistant") return {};
    bad(param, fmt::format("'{}' is missing", param));
  }
  if (it->is_string()) return it->get<std::string>();
  if (!it->is_array())
    bad(param, fmt::format("'{}' must be a string or an array of text parts, got {}", param,
                           it->type_name()));
  // Parts joined by newlines, as llama-server renders them for text-only templates.
  std::string text;
  for (size_t k = 0; k < it->size(); ++k) {
    const json& part = (*it)[k];
    const std::string pp = fmt::format("{}[{}]", param, k);
    if (!part.is_object())
      bad(pp, fmt::format("'{}' must be an object, got {}", pp, part.type_name()));
    const auto type = get_string(part, "type");
    if (type != "text")
      bad(pp,
          fmt::format("'{}' has type '{}'; only text parts are supported", pp,
                      clip(type.value_or(""))),
          "unsupported_content_type");
    const auto t = get_string(part, "text");
    if (!t) bad(pp, fmt::format("'{}' is a text part without 'text'", pp));
    if (k) text += '\n';
    text += *t;
  }
  return text;
}

// An assistant message's "tool_calls": [{"id", "type": "function", "function": {"name",
// "arguments": a JSON object's text (an object is taken too, as some clients send it)}}].
std::vector<ChatToolCall> message_tool_calls(const json& msg, const std::string& param) {
  std::vector<ChatToolCall> out;
  const json* calls = field(msg, "tool_calls");
  if (!calls) return out;
  const std::string p = param + ".tool_calls";
  if (!calls->is_array())
    bad(p, fmt::format("'{}' must be an array, got {}", p, calls->type_name()));
  for (size_t k = 0; k < calls->size(); ++k) {
    const json& c = (*calls)[k];
    const std::string pk = fmt::format("{}[{}]", p, k);
    if (!c.is_object()) bad(pk, fmt::format("'{}' must be an object, got {}", pk, c.type_name()));
    const auto type = get_string(c, "type");
    if (type && *type != "function")
      bad(pk + ".type", fmt::format("'{}.type' must be 'function'", pk));
    const json* fn = field(c, "function");
    if (!fn || !fn->is_object()) bad(pk + ".function", fmt::format("'{}.function' must be an object", pk));
    const auto name = get_string(*fn, "name");
    if (!name) bad(pk + ".function.name", fmt::format("'{}.function.name' must be a string", pk));
    const json* args = field(*fn, "arguments");
    std::string text = "{}";
    if (args && args->is_object()) {
      text = args->dump();
    } else if (args && args->is_string()) {
      text = args->get<std::string>();
    } else if (args) {
      bad(pk + ".function.arguments",
          fmt::format("'{}.function.arguments' must be a JSON object's text", pk));
    }
    out.push_back({get_string(c, "id").value_or(""), *name, std::move(text)});
  }
  return out;
}

std::vector<ChatMessage> parse_messages(const json& body) {
  const json* msgs = field(body, "messages");
  if (!msgs) bad("messages", "'messages' is missing");
  if (!msgs->is_array())
    bad("messages", fmt::format("'messages' must be an array, got {}", msgs->type_name()));
  if (msgs->empty()) bad("messages", "'messages' is empty: give at least one message");
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < msgs->size(); ++i) {
    const json& msg = (*msgs)[i];
    const std::string param = fmt::format("messages[{}]", i);
    if (!msg.is_object())
      bad(param, fmt::format("'{}' must be an object, got {}", param, msg.type_name()));
    auto it = msg.find("role");
    if (it == msg.end() || !it->is_string())
      bad(param + ".role", fmt::format("'{}.role' must be a string", param));
    std::string role = it->get<std::string>();
    if (role == "developer") role = "system";  // OpenAI's newer name for the system role
    if (role != "system" && role != "user" && role != "assistant" && role != "tool")
      bad(param + ".role",
          fmt::format("'{}.role' is '{}'; supported roles: system, user, assistant, tool", param,
                      clip(role)));
    ChatMessage m{role, message_content(msg, i, role)};
    if (role == "assistant") m.tool_calls = message_tool_calls(msg, param);
    // A turn that only calls tools has content None, as templates test it (`if
    // message.content`); other assistant turns without content render as "", as before.
    const json* content = field(msg, "content");
    m.content_none = !m.tool_calls.empty() && !content;
    if (role == "tool") {
      const auto id = get_string(msg, "tool_call_id");
      if (!id) bad(param + ".tool_call_id", fmt::format("'{}.tool_call_id' must be a string", param));
      m.tool_call_id = *id;
    }
    if (role == "tool" || role == "assistant") {
      // The name a legacy client gives a tool result (llama.cpp passes it on); checked anyway.
      if (const json* name = field(msg, "name"); name && !name->is_string())
        bad(param + ".name", fmt::format("'{}.name' must be a string", param));
      if (role == "tool") m.name = get_string(msg, "name").value_or("");
    }
    out.push_back(std::move(m));
  }
  return out;
}

json base_object(const ResponseMeta& m, bool chunk) {
  const char* object = m.endpoint == Endpoint::Chat
                           ? (chunk ? "chat.completion.chunk" : "chat.completion")
                           : "text_completion";
  return {{"id", m.id}, {"object", object}, {"created", m.created}, {"model", m.model}};
}

json finish_json(const std::string& finish) {
  return finish.empty() ? json(nullptr) : json(finish);
}

}  // namespace

// ---- errors and models --------------------------------------------------------------------------

std::string clip(std::string_view s, size_t max_bytes) {
  if (s.size() <= max_bytes) return std::string(s);
  size_t n = max_bytes;
  while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;  // not mid-character
  return fmt::format("{}... ({} bytes)", s.substr(0, n), s.size());
}

json error_body(const HttpError& e) {
  std::string type = e.type;
  if (type.empty())
    type = e.status == 401   ? "authentication_error"
           : e.status >= 500 ? "server_error"
                             : "invalid_request_error";
  auto opt = [](const std::string& s) { return s.empty() ? json(nullptr) : json(s); };
  return {
      {"error",
       {{"message", e.what()}, {"type", type}, {"param", opt(e.param)}, {"code", opt(e.code)}}}};
}

std::string dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

ChatEnv chat_env(const Tokenizer& tok) {
  ChatEnv env;
  if (tok.bos_id() >= 0) env.bos_token = tok.token_text(tok.bos_id());
  if (tok.eos_id() >= 0) env.eos_token = tok.token_text(tok.eos_id());
  return env;
}

std::shared_ptr<const ChatTemplate> served_chat_template(const Tokenizer& tok,
                                                         const std::string& source) {
  std::string text = !source.empty() ? source : tok.chat_template();
  if (text.empty())
    text = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
           "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|im_start|>assistant\\n' }}{% endif %}";
  return std::make_shared<const ChatTemplate>(text, chat_env(tok));
}

bool bearer_matches(std::string_view authorization, std::string_view key) {
  const size_t space = authorization.find(' ');
  if (space == std::string_view::npos) return false;
  const std::string_view scheme = authorization.substr(0, space);
  const bool bearer =
      scheme.size() == 6 && std::equal(scheme.begin(), scheme.end(), "bearer", [](char a, char b) {
        return (a | 0x20) == b;  // ASCII fold
      });
  std::string_view token = authorization.substr(space);
  token.remove_prefix(std::min(token.find_first_not_of(' '), token.size()));
  // Every byte is compared whatever the first difference, so the time says nothing of the key.
  unsigned diff = token.size() != key.size() || key.empty();
  for (size_t i = 0; i < token.size() && !key.empty(); ++i)
    diff |= static_cast<unsigned char>(token[i] ^ key[i % key.size()]);
  return bearer && diff == 0;
}

bool serves(const ServedModel& m, std::string_view name) {
  const auto n = m.names();
  return std::find(n.begin(), n.end(), name) != n.end();
}

json model_object(const ServedModel& m, const std::string& name) {
  return {{"id", name}, {"object", "model"}, {"created", m.created}, {"owned_by", "kvlm"}};
}

json models_list(const ServedModel& m) {
  json data = json::array();
  for (const std::string& n : m.names()) data.push_back(model_object(m, n));
  return {{"object", "list"}, {"data", data}};
}

// ---- requests -----------------------------------------------------------------------------------

json parse_json_body(std::string_view body) {
  // The body's field whose value is being parsed: the param of an error raised inside it (empty
  // between fields).
  std::string field;
  auto in_field = [&field] { return field.empty() ? "" : fmt::format(" (in '{}')", clip(field)); };
  // nlohmann's parser keeps its own stack on the heap, so nesting is cut off here, before any
  // recursive walk sees it.
  const json::parser_callback_t limit = [&](int depth, json::parse_event_t ev, json& parsed) {
    using Ev = json::parse_event_t;
    if (depth == 1 && ev == Ev::key) field = parsed.get<std::string>();
    if (depth == 1 && (ev == Ev::value || ev == Ev::object_end || ev == Ev::array_end))
      field.clear();
    if ((ev == Ev::object_start || ev == Ev::array_start) && depth >= kMaxJsonDepth)
      throw HttpError(400,
                      fmt::format("the request body nests arrays and objects deeper than {} "
                                  "levels{}",
                                  kMaxJsonDepth, in_field()),
                      clip(field), "json_too_deep");
    return true;
  };
  json j;
  try {
    j = json::parse(body, limit);
  } catch (const json::parse_error& e) {
    std::string what = e.what();
    // "[json.exception.parse_error.101] parse error at line 1, ..." -> "parse error at ...";
    // clipped, as its "last read: '...'" quotes the client's token, which may be a whole string
    // (the position and the reason come first and stay).
    if (auto p = what.find("] "); p != std::string::npos) what = what.substr(p + 2);
    std::replace(what.begin(), what.end(), '\n', ' ');
    throw HttpError(400,
                    fmt::format("invalid JSON in the request body{}: {}", in_field(),
                                clip(what, kMaxParseError)),
                    clip(field), "invalid_json");
  } catch (const json::exception& e) {
    // out_of_range.406: a number literal beyond a double (1e309), which nlohmann does not count
    // as a parse error. Its text is not quoted: it may be a megabyte of digits.
    if (e.id == 406)
      throw HttpError(400,
                      fmt::format("a number in the request body is out of range{}: JSON numbers "
                                  "must be finite doubles (magnitude below 1.8e308)",
                                  in_field()),
                      clip(field), "number_out_of_range");
    throw HttpError(400,
                    fmt::format("invalid JSON in the request body{}: {}", in_field(),
                                clip(e.what(), kMaxParseError)),
                    clip(field), "invalid_json");
  }
  if (!j.is_object())
    throw HttpError(400,
                    fmt::format("the request body must be a JSON object, got {}", j.type_name()));
  return j;
}

std::vector<ChatMessage> chat_messages(const json& body) { return parse_messages(body); }

std::vector<int32_t> render_chat(const std::vector<ChatMessage>& messages, const Tokenizer& tok,
                                 const ServedModel& m, bool add_generation_prompt,
                                 std::string_view tools_json) {
  std::string text;
  try {
    text = m.chat_template->apply(messages, add_generation_prompt, tools_json);
  } catch (const tmpl::TemplateRaised& e) {
    // The template refuses this conversation (roles out of order, a system turn it does not
    // take): the client's messages are what to change.
    bad("messages", e.what());
  } catch (const Error& e) {
    // The template is the model's, not the client's: a server-side limitation.
    throw HttpError(500, e.what(), "", "chat_template_unsupported");
  }
  std::vector<int32_t> ids = tok.encode(text, tok.add_bos_default(), /*parse_special=*/true);
  if (ids.empty()) bad("messages", "the rendered conversation has no tokens");
  return ids;
}

GenerationRequest parse_chat_request(const json& body, const Tokenizer& tok, const ServedModel& m,
                                     uint64_t random_seed) {
  GenerationRequest g;
  g.endpoint = Endpoint::Chat;
  check_model(body, m);
  std::vector<ChatMessage> messages = parse_messages(body);
  g.req.n = parse_n(body, m);
  const json* functions = field(body, "functions");
  refuse_if(functions && !(functions->is_array() && functions->empty()), "functions",
            "use 'tools' (OpenAI's deprecated 'functions' is not taken)");
  const ToolsRequest tools = parse_tools(body);
  g.req.grammar = parse_response_format(body);
  const std::string tools_json = tool_messages(messages, tools, m.chat_template->source());
  if (tools.active()) {
    const ToolCallFormat& format = tool_call_format(m.chat_template->source());
    g.tool_format = &format;
    for (const json& t : tools.tools) g.tool_names.push_back(t["function"]["name"]);
    if (tools.choice == ToolChoice::Required || tools.choice == ToolChoice::Named) {
      if (g.req.grammar)
        bad("tool_choice", "a forced tool call (tool_choice 'required' or a function) cannot be "
                           "combined with 'response_format'");
      g.req.grammar = tool_call_grammar(format, tools);
    }
  }
  g.req.sampling = parse_sampling(body, m, random_seed, tok.n_vocab());
  g.req.sampling.n_logprobs = parse_chat_logprobs(body);
  g.stop = parse_stop(body);
  parse_stream(body, &g);
  g.req.ignore_eos = get_bool(body, "ignore_eos").value_or(false);
  // max_completion_tokens is OpenAI's newer name; it wins when both are given.
  auto max_tokens = get_int(body, "max_tokens");
  const char* max_key = "max_tokens";
  if (auto mct = get_int(body, "max_completion_tokens")) {
    max_tokens = mct;
    max_key = "max_completion_tokens";
  }

  g.req.prompt = render_chat(messages, tok, m, /*add_generation_prompt=*/true, tools_json);
  g.req.max_tokens = resolve_max_tokens(
      max_tokens, max_key, static_cast<int64_t>(g.req.prompt.size()), "messages", m, 0);
  g.req.max_tokens = fit_choices(g.req.max_tokens, max_tokens.has_value(), g.req.n,
                                 static_cast<int64_t>(g.req.prompt.size()), m);
  return g;
}

GenerationRequest parse_completion_request(const json& body, const Tokenizer& tok,
                                           const ServedModel& m, uint64_t random_seed) {
  GenerationRequest g;
  g.endpoint = Endpoint::Completion;
  check_model(body, m);
  const json* prompt = field(body, "prompt");
  if (!prompt) bad("prompt", "'prompt' is missing");
  // One prompt: a string, token ids, or a batch of exactly one of either.
  const json* p = prompt;
  if (p->is_array() && p->size() == 1 && ((*p)[0].is_string() || (*p)[0].is_array())) p = &(*p)[0];
  if (p->is_string()) {
    // Special-token text in the prompt becomes those tokens, as llama-server tokenizes prompts.
    g.req.prompt = tok.encode(p->get<std::string>(), tok.add_bos_default(), /*parse_special=*/true);
  } else if (p->is_array() && (p->empty() || (*p)[0].is_number())) {
    g.req.prompt = int_array(*p, "prompt");
    check_token_ids(g.req.prompt, tok, "prompt");
  } else if (p->is_array()) {
    bad("prompt", fmt::format("'prompt' holds {} prompts; kvlm takes one per request", p->size()),
        "unsupported_parameter");
  } else {
    bad("prompt",
        fmt::format("'prompt' must be a string or an array of token ids, got {}", p->type_name()));
  }
  if (g.req.prompt.empty()) bad("prompt", "'prompt' is empty: nothing to complete");
  g.req.n = parse_n(body, m);
  refuse_if(get_bool(body, "echo").value_or(false), "echo", "the prompt is not echoed");
  refuse_if(field(body, "suffix") != nullptr, "suffix", "kvlm does not fill in the middle");
  refuse_if(get_int(body, "best_of").value_or(1) != 1, "best_of", "one candidate per request");
  g.req.grammar = parse_response_format(body);
  g.req.sampling = parse_sampling(body, m, random_seed, tok.n_vocab());
  g.req.sampling.n_logprobs = parse_completion_logprobs(body);
  g.stop = parse_stop(body);
  parse_stream(body, &g);
  g.req.ignore_eos = get_bool(body, "ignore_eos").value_or(false);
  const auto max_tokens = get_int(body, "max_tokens");
  g.req.max_tokens = resolve_max_tokens(max_tokens, "max_tokens",
                                        static_cast<int64_t>(g.req.prompt.size()), "prompt", m,
                                        kCompletionDefaultMaxTokens);
  g.req.max_tokens = fit_choices(g.req.max_tokens, max_tokens.has_value(), g.req.n,
                                 static_cast<int64_t>(g.req.prompt.size()), m);
  return g;
}

json tokenize_response(const json& body, const Tokenizer& tok) {
  const auto content = get_string(body, "content");
  if (!content) bad("content", "'content' is missing");
  const bool add_special = get_bool(body, "add_special").value_or(false);
  const bool parse_special = get_bool(body, "parse_special").value_or(true);
  const bool with_pieces = get_bool(body, "with_pieces").value_or(false);
  const std::vector<int32_t> ids = tok.encode(*content, add_special, parse_special);
  json tokens = json::array();
  for (int32_t id : ids) {
    if (!with_pieces) {
      tokens.push_back(id);
      continue;
    }
    const std::string piece = tok.token_bytes(id, /*render_special=*/true);
    json pj;
    if (valid_utf8(piece)) {
      pj = piece;
    } else {
      pj = json::array();
      for (char c : piece) pj.push_back(static_cast<unsigned char>(c));
    }
    tokens.push_back({{"id", id}, {"piece", pj}});
  }
  return {{"tokens", tokens}};
}

json detokenize_response(const json& body, const Tokenizer& tok) {
  const json* t = field(body, "tokens");
  if (!t) bad("tokens", "'tokens' is missing");
  if (!t->is_array())
    bad("tokens", fmt::format("'tokens' must be an array, got {}", t->type_name()));
  const std::vector<int32_t> ids = int_array(*t, "tokens");
  check_token_ids(ids, tok, "tokens");
  return {{"content", tok.decode(ids, /*render_special=*/true)}};
}

// ---- generated text -----------------------------------------------------------------------------

std::string StopMatcher::push(std::string_view text) {
  if (stopped_) return {};
  held_ += text;
  size_t first = std::string::npos;
  for (const std::string& s : stops_) first = std::min(first, held_.find(s));
  if (first != std::string::npos) {
    stopped_ = true;
    std::string out = held_.substr(0, first);
    held_.clear();
    return out;
  }
  // Hold the longest tail that is a proper prefix of some stop string.
  size_t keep = 0;
  for (const std::string& s : stops_)
    for (size_t n = std::min(s.size() - 1, held_.size()); n > keep; --n)
      if (held_.compare(held_.size() - n, n, s, 0, n) == 0) {
        keep = n;
        break;
      }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopMatcher::flush() {
  if (stopped_) return {};
  std::string out;
  out.swap(held_);
  return out;
}

std::string TextStream::push(int32_t id) {
  if (!ignore_eos_ && tok_.is_eog(id)) return {};
  return stop_.push(dec_.push(id));
}

std::string TextStream::finish() {
  std::string out = stop_.push(dec_.flush());
  return out + stop_.flush();
}

// ---- responses ----------------------------------------------------------------------------------

json usage_json(const Usage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", u.cached_tokens}}}};
}

void LogprobsBuilder::clear() {
  n_ = 0;
  if (ep_ == Endpoint::Chat)
    acc_ = {{"content", json::array()}};
  else
    acc_ = {{"tokens", json::array()},
            {"token_logprobs", json::array()},
            {"top_logprobs", json::array()},
            {"text_offset", json::array()}};
}

void LogprobsBuilder::add(const StepLogprobs& lp, int64_t text_offset) {
  // -9999.0 where a logprob is -inf: JSON has no infinity.
  auto value = [](float v) { return std::isfinite(v) ? static_cast<double>(v) : -9999.0; };
  auto entry = [&](const TokenLogprob& t) {
    const std::string text = tok_.token_bytes(t.id, /*render_special=*/true);
    json bytes = json::array();
    for (char c : text) bytes.push_back(static_cast<unsigned char>(c));
    return json{{"token", lossy_utf8(text)}, {"logprob", value(t.logprob)}, {"bytes", bytes}};
  };
  ++n_;
  if (ep_ == Endpoint::Chat) {
    json e = entry(lp.chosen);
    json top = json::array();
    for (const TokenLogprob& t : lp.top) top.push_back(entry(t));
    e["top_logprobs"] = std::move(top);
    acc_["content"].push_back(std::move(e));
    return;
  }
  json top = json::object();  // tokens of equal text keep the likelier one (listed first)
  for (const TokenLogprob& t : lp.top)
    top.emplace(lossy_utf8(tok_.token_bytes(t.id, true)), value(t.logprob));
  acc_["tokens"].push_back(lossy_utf8(tok_.token_bytes(lp.chosen.id, true)));
  acc_["token_logprobs"].push_back(value(lp.chosen.logprob));
  acc_["top_logprobs"].push_back(std::move(top));
  acc_["text_offset"].push_back(text_offset);
}

json LogprobsBuilder::take() {
  json out = std::move(acc_);
  clear();
  return out;
}

json render_response(const ResponseMeta& m, const std::vector<ChoiceText>& choices,
                     const Usage& u) {
  json j = base_object(m, false);
  j["choices"] = json::array();
  for (size_t i = 0; i < choices.size(); ++i) {
    const ChoiceText& c = choices[i];
    json choice = {
        {"index", i}, {"logprobs", c.logprobs}, {"finish_reason", finish_json(c.finish)}};
    if (m.endpoint == Endpoint::Chat) {
      // OpenAI: content null when the reply is only calls.
      choice["message"] = {{"role", "assistant"},
                           {"content", c.tool_calls.is_null() || !c.text.empty() ? json(c.text)
                                                                                  : json(nullptr)}};
      if (!c.tool_calls.is_null()) choice["message"]["tool_calls"] = c.tool_calls;
    } else
      choice["text"] = c.text;
    j["choices"].push_back(std::move(choice));
  }
  j["usage"] = usage_json(u);
  return j;
}

json render_response(const ResponseMeta& m, const std::string& text, const std::string& finish,
                     const Usage& u, const json& logprobs) {
  return render_response(m, std::vector<ChoiceText>{{text, finish, logprobs}}, u);
}

json render_chunk(const ResponseMeta& m, const std::string& text, const std::string& finish,
                  bool role_delta, bool usage_null, const json& logprobs, int32_t index) {
  json j = base_object(m, true);
  json choice = {
      {"index", index}, {"logprobs", logprobs}, {"finish_reason", finish_json(finish)}};
  if (m.endpoint == Endpoint::Chat) {
    json delta = json::object();
    if (role_delta) delta["role"] = "assistant";
    if (role_delta || !text.empty()) delta["content"] = text;
    choice["delta"] = delta;
  } else {
    choice["text"] = text;
  }
  j["choices"] = json::array({choice});
  if (usage_null) j["usage"] = nullptr;
  return j;
}

json render_delta_chunk(const ResponseMeta& m, json delta, const std::string& finish,
                        bool usage_null, const json& logprobs, int32_t index) {
  json j = base_object(m, true);
  j["choices"] = json::array({{{"index", index},
                               {"delta", std::move(delta)},
                               {"logprobs", logprobs},
                               {"finish_reason", finish_json(finish)}}});
  if (usage_null) j["usage"] = nullptr;
  return j;
}

json render_usage_chunk(const ResponseMeta& m, const Usage& u) {
  json j = base_object(m, true);
  j["choices"] = json::array();
  j["usage"] = usage_json(u);
  return j;
}

std::string sse_event(const json& j) {
  return "data: " + dump(j) + "\n\n";
}

}  // namespace kvlm::server
