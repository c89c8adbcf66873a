// kvlm chat: interactive multi-turn chat. The cache is kept between turns: each turn prefills only
// the tokens the new user message adds (the previous history is never recomputed). When the
// context fills, it shifts (keeps the system prompt, drops the older half of the rest) instead of
// failing. Commands: /clear, /stats, /save FILE, /load FILE, /quit.
#include <nlohmann/json.hpp>

#include <cstdio>
#include <iostream>
#include <memory>
#include <random>
#include <string>

#include "base/error.h"
#include "base/thread_pool.h"
#include "cli/common.h"
#include "engine/session.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace kvlm::cli {
namespace {

struct ChatArgs {
  std::string model, system;
  std::string chat_template;  // --chat-template FILE ("" : the model's)
  CacheFlags cache;
  int32_t n_predict = 512;
  SamplingParams sampling;
  uint64_t seed = 0;
  bool seed_given = false;
  int threads = 0;
};

struct ChatState {
  std::vector<ChatMessage> messages;  // as rendered so far; the last may be the open reply
  int64_t reused = 0;                 // tokens not recomputed thanks to the kept cache
  int64_t prefilled = 0;              // tokens prefilled over all turns
  int turns = 0;
};

void print_stats(const Session& s, const ChatState& st) {
  const KvStats k = s.kv_stats();
  std::fprintf(stderr,
               "[stats] turns %d | cache %lld of %lld tokens | %s used, %s allocated | tokens "
               "reused %lld, prefilled %lld | evicted %lld\n",
               st.turns, static_cast<long long>(k.n_tokens), static_cast<long long>(k.n_ctx),
               human_bytes(k.bytes_used).c_str(), human_bytes(k.bytes_allocated).c_str(),
               static_cast<long long>(st.reused), static_cast<long long>(st.prefilled),
               static_cast<long long>(k.n_evicted));
}

// Tokens to feed for this turn: the rendered conversation minus what the cache already holds.
// ChatML renders prefix-stably, so the new text is whatever follows the previous rendering plus
// the generated reply, whose tokens end the cache (a context shift drops older tokens from the
// middle but keeps that end). Without such a text (first turn, or texts that disagree), fall
// back to the longest common token prefix.
std::vector<int32_t> turn_tokens(const Tokenizer& tok, Session& s, const std::string& full,
                                 const std::string& held_text, ChatState& st) {
  if (!held_text.empty() && full.compare(0, held_text.size(), held_text) == 0) {
    st.reused += s.n_cached();
    return tok.encode(full.substr(held_text.size()), false, true);
  }
  std::vector<int32_t> ids = tok.encode(full, tok.add_bos_default(), true);
  const auto& held = s.tokens();
  size_t common = 0;
  while (common < held.size() && common < ids.size() && held[common] == ids[common]) ++common;
  if (common == ids.size() && common > 0) --common;  // always run at least one token
  s.truncate(static_cast<int64_t>(common));
  st.reused += static_cast<int64_t>(common);
  return {ids.begin() + static_cast<std::ptrdiff_t>(common), ids.end()};
}

// What /save stores beside the cache: {"messages": [{"role", "content"}, ...], "held_text"}.
struct SavedChat {
  std::vector<ChatMessage> messages;
  std::string held_text;
};

// Every field and its type is checked (a checksum only says the file is as written, not that
// kvlm wrote it); kvlm::Error naming the file and the field otherwise.
SavedChat parse_saved_chat(const std::string& text, const std::string& path) {
  using nlohmann::json;
  const json meta = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (meta.is_discarded() || !meta.is_object())
    fail("{}: session metadata is not a kvlm chat (not a JSON object)", path);
  SavedChat out;
  const auto msgs = meta.find("messages");
  if (msgs == meta.end() || !msgs->is_array())
    fail("{}: session metadata is not a kvlm chat ('messages' is not an array)", path);
  for (size_t i = 0; i < msgs->size(); ++i) {
    const json& m = (*msgs)[i];
    const auto role = m.find("role"), content = m.find("content");  // end() unless an object
    if (role == m.end() || !role->is_string() || content == m.end() || !content->is_string())
      fail("{}: session metadata: messages[{}] is not {{\"role\": string, \"content\": string}}",
           path, i);
    out.messages.push_back({role->get<std::string>(), content->get<std::string>()});
  }
  if (const auto held = meta.find("held_text"); held != meta.end()) {
    if (!held->is_string()) fail("{}: session metadata: 'held_text' is not a string", path);
    out.held_text = held->get<std::string>();
  }
  return out;
}

// Context shift keeps the rendered system prompt (llama.cpp --keep); the user's --keep wins, and
// the KIVI cache does not evict (a full context is then an error, as in generate). With sliding
// windows an eviction leaves kept + window - 1 positions (Eviction::reach), so a context that
// cannot hold the whole system prompt beside the window keeps what fits, and one that cannot
// hold the window turns the shift off: a note, not the --keep refusal for a flag never given.
int64_t implicit_keep(const Tokenizer& tok, const ChatTemplate& tmpl,
                      const std::vector<ChatMessage>& sys, int64_t n_ctx, int32_t max_window) {
  const std::string head =
      tmpl.apply(sys.empty() ? std::vector<ChatMessage>{{"user", ""}} : sys, false);
  const std::string sys_text = sys.empty() ? head.substr(0, head.find("<|im_start|>user")) : head;
  const auto n_sys = static_cast<int64_t>(tok.encode(sys_text, tok.add_bos_default(), true).size());
  const int64_t keep = std::min(n_sys, n_ctx / 2);
  const int64_t most = n_ctx - std::max(0, max_window - 1) - 1;  // leaves room for one token
  if (keep <= most) return keep;
  if (most < 0) {
    std::fprintf(stderr, "kvlm chat: no context shift: this model's sliding window of %d tokens "
                 "needs a context of at least %d, got %lld\n", max_window, max_window,
                 static_cast<long long>(n_ctx));
    return -1;
  }
  std::fprintf(stderr, "kvlm chat: the context shift keeps %lld of the system prompt's %lld "
               "tokens (a context of %lld beside this model's sliding window of %d tokens)\n",
               static_cast<long long>(most), static_cast<long long>(n_sys),
               static_cast<long long>(n_ctx), max_window);
  return most;
}

int run_chat(const ChatArgs& a) {
  SamplingParams sp = a.sampling;
  sp.seed = a.seed_given ? a.seed : std::random_device{}();
  validate(sp);
  auto model = load_model(resolve_model(a.model), a.cache);
  auto tok = Tokenizer::from_gguf(model->gguf());
  const ChatTemplate tmpl = load_chat_template(*tok, a.chat_template);
  KvOptions kvo = to_kv_options(a.cache, model->config());
  ChatState st;
  if (!a.system.empty()) st.messages.push_back({"system", a.system});
  if (!kvo.window && kvo.n_keep < 0 && kvo.kivi_residual < 0)
    kvo.n_keep = implicit_keep(*tok, tmpl, st.messages, kvo.n_ctx, model->config().max_window());
  ThreadPool pool(resolve_threads(a.threads));
  Session session(*model, kvo, pool);
  std::string held_text;  // text whose tokens the cache holds (empty: unknown, compare tokens)

  std::fprintf(stderr, "kvlm chat: %s, K %s / V %s, context %lld. Commands: /clear /stats "
               "/save FILE /load FILE /quit\n",
               model->config().name.c_str(), dtype_name(kvo.dtype_k), dtype_name(kvo.dtype_v),
               static_cast<long long>(kvo.n_ctx));
  std::string line;
  while (true) {
    std::fputs("> ", stderr);
    if (!std::getline(std::cin, line)) break;
    if (line.empty()) continue;
    if (line[0] == '/') {
      const std::string cmd = line.substr(0, line.find(' '));
      const std::string arg = line.find(' ') == std::string::npos ? "" : line.substr(line.find(' ') + 1);
      try {
        if (cmd == "/quit" || cmd == "/exit") break;
        if (cmd == "/clear") {
          session.reset();
          st = ChatState{};
          if (!a.system.empty()) st.messages.push_back({"system", a.system});
          held_text.clear();
          std::fprintf(stderr, "[cleared]\n");
        } else if (cmd == "/stats") {
          print_stats(session, st);
        } else if (cmd == "/save") {
          if (arg.empty()) fail("/save needs a file name");
          nlohmann::json meta = nlohmann::json::array();
          for (const auto& m : st.messages) meta.push_back({{"role", m.role}, {"content", m.content}});
          session.save(arg, nlohmann::json{{"messages", meta}, {"held_text", held_text}}.dump());
          std::fprintf(stderr, "[saved %lld tokens to %s]\n",
                       static_cast<long long>(session.n_cached()), arg.c_str());
        } else if (cmd == "/load") {
          if (arg.empty()) fail("/load needs a file name");
          // The metadata is checked inside load, before the cache changes: a refused file leaves
          // the conversation as it was.
          SavedChat saved;
          session.load(arg, [&](const std::string& meta) { saved = parse_saved_chat(meta, arg); });
          st = ChatState{};
          st.messages = std::move(saved.messages);
          held_text = std::move(saved.held_text);
          std::fprintf(stderr, "[loaded %lld tokens, %zu messages]\n",
                       static_cast<long long>(session.n_cached()), st.messages.size());
        } else {
          fail("unknown command '{}' (commands: /clear /stats /save FILE /load FILE /quit)", cmd);
        }
      } catch (const Error& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
      }
      continue;
    }
    st.messages.push_back({"user", line});
    const std::string full = tmpl.apply(st.messages, true);
    std::vector<int32_t> ids = turn_tokens(*tok, session, full, held_text, st);
    st.prefilled += static_cast<int64_t>(ids.size());
    GenerateOptions opts;
    opts.n_predict = a.n_predict;
    opts.sampling = sp;
    opts.sampling.seed = sp.seed + static_cast<uint64_t>(st.turns);
    StreamDecoder dec(*tok);
    std::string reply;
    int32_t last = -1;
    GenerateStats gs = generate(session, *tok, ids, opts, [&](int32_t id) {
      last = id;
      if (tok->is_eog(id)) return true;
      std::string piece = dec.push(id);
      reply += piece;
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
      return true;
    });
    const std::string rest = dec.flush();
    reply += rest;
    std::fwrite(rest.data(), 1, rest.size(), stdout);
    std::fputs("\n", stdout);
    std::fflush(stdout);
    // generate() never feeds the last sampled token. After an end-of-turn token that is right (the
    // template closes the turn itself); after a length stop the token is part of the reply, so
    // feed it: the cache then holds exactly `full + reply`.
    if (gs.stop != StopReason::Eog && last >= 0) session.feed(std::span<const int32_t>(&last, 1));
    held_text = full + reply;
    st.messages.push_back({"assistant", reply});
    ++st.turns;
    std::fprintf(stderr, "[turn %d: prefilled %zu new tokens in %.0f ms, %lld generated at %.1f tok/s]\n",
                 st.turns, ids.size(), gs.prefill_ms, static_cast<long long>(gs.n_generated),
                 gs.decode_ms > 0 ? gs.n_decode * 1000.0 / gs.decode_ms : 0.0);
  }
  print_stats(session, st);
  return 0;
}

}  // namespace

Command add_chat(CLI::App& app) {
  auto a = std::make_shared<ChatArgs>();
  auto* c = app.add_subcommand("chat", "interactive multi-turn chat on stdin/stdout, cache kept between turns");
  c->add_option("-m,--model", a->model, "GGUF model (default: SmolLM2-135M-Instruct Q4_1)");
  c->add_option("--system", a->system, "system prompt (default: the template's)");
  add_chat_template_flag(c, a->chat_template);
  c->add_option("-n,--n-predict", a->n_predict, "max tokens per reply")->check(CLI::Range(1, 1 << 20));
  add_sampling_flags(c, a->sampling);
  c->add_option("--seed", a->seed, "random seed")->each([a](const std::string&) { a->seed_given = true; });
  add_threads_flag(c, a->threads);
  add_llama_cpp_flags(c);
  add_cache_flags(c, a->cache);
  return {c, [a] { return run_chat(*a); }};
}

}  // namespace kvlm::cli
