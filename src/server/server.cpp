#include "server/server.h"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <condition_variable>
#include <ctime>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <unordered_map>

#include "base/error.h"
#include "server/http.h"
#include "server/kv_api.h"
#include "server/metrics.h"
#include "server/tools.h"
#include "server/web_assets.h"

namespace kvlm::server {
namespace {

using Clock = std::chrono::steady_clock;
using ExchangePtr = std::shared_ptr<http::Exchange>;

double seconds(Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

uint64_t random_u64() {
  thread_local std::mt19937_64 rng(std::random_device{}());
  return rng();
}

// "chatcmpl-" + 24 hex digits, as OpenAI's ids look.
std::string new_id(const char* prefix) {
  return fmt::format("{}{:016x}{:08x}", prefix, random_u64(), static_cast<uint32_t>(random_u64()));
}

struct TimedEvent {
  RequestEvent ev;
  Clock::time_point at;  // when the scheduler delivered it (TTFT and inter-token latency)
};

// One request's events, from the scheduler thread to the request's connection. The scheduler
// never waits for HTTP: push() queues and, when the queue was not already due to be read, calls
// the wake function, which posts the reading onto the connection's strand.
class Channel {
 public:
  // Scheduler thread: a short critical section, never a wait.
  void push(const RequestEvent& e) {
    std::function<void()> wake;
    {
      std::lock_guard<std::mutex> l(mu_);
      q_.push_back({e, Clock::now()});
      if (!scheduled_ && wake_) {
        scheduled_ = true;
        wake = wake_;
      }
    }
    if (wake) wake();
  }
  // Set once the response can be written (events before it wait); null drops it (the request
  // ended: breaks the job -> channel -> wake -> job cycle).
  void set_wake(std::function<void()> w) {
    std::function<void()> call;
    {
      std::lock_guard<std::mutex> l(mu_);
      wake_ = std::move(w);
      if (wake_ && !q_.empty() && !scheduled_) {
        scheduled_ = true;
        call = wake_;
      }
    }
    if (call) call();
  }
  // The connection's strand: every event queued (possibly none).
  std::deque<TimedEvent> take() {
    std::lock_guard<std::mutex> l(mu_);
    scheduled_ = false;
    std::deque<TimedEvent> out;
    out.swap(q_);
    return out;
  }

 private:
  std::mutex mu_;
  std::deque<TimedEvent> q_;
  std::function<void()> wake_;
  bool scheduled_ = false;  // a wake is posted and has not taken the queue yet
};

// One choice of a request being served (OpenAI's n: each has its own text, stop strings, logprobs
// and finish reason).
struct Choice {
  Choice(const Tokenizer& tok, const GenerationRequest& g, Endpoint ep)
      : text(tok, g.stop, g.req.ignore_eos) {
    if (g.req.sampling.n_logprobs >= 0) logprobs.emplace(tok, ep);
    if (g.tool_format && g.stream) calls.emplace(*g.tool_format, g.tool_names);
  }
  TextStream text;
  std::optional<ToolCallStream> calls;  // streaming with tools: the reply parsed for calls
  // When the request asked for logprobs: its tokens' not yet sent (end-of-generation tokens left
  // out, as from the text, unless ignore_eos).
  std::optional<LogprobsBuilder> logprobs;
  std::string shown;        // non-streaming: the text so far
  int64_t shown_chars = 0;  // characters of text consume() has returned (text_offset)
  int64_t n_tokens = 0;     // token events taken
  Clock::time_point t_last_token;
  bool done = false;        // no more text: final event, stop string or shutdown
  std::string finish;       // when done: "stop", "length", "cancelled", "error"
};

// One generation request being served. After submission touched only on its connection's strand
// (the channel aside).
struct Job {
  Job(const Tokenizer& tok, const GenerationRequest& g, ResponseMeta meta)
      : meta(std::move(meta)),
        stream(g.stream),
        include_usage(g.include_usage),
        ignore_eos(g.req.ignore_eos),
        tool_format(g.tool_format),
        tool_names(g.tool_names) {
    usage.prompt_tokens = static_cast<int64_t>(g.req.prompt.size());
    choices.reserve(static_cast<size_t>(g.req.n));
    for (int32_t i = 0; i < g.req.n; ++i) choices.emplace_back(tok, g, this->meta.endpoint);
    n_open = g.req.n;
  }
  ResponseMeta meta;
  bool stream, include_usage;
  std::shared_ptr<Channel> ch = std::make_shared<Channel>();
  ExchangePtr ex;  // the response
  bool ignore_eos;
  const ToolCallFormat* tool_format;    // replies parsed for tool calls (null: plain text)
  std::vector<std::string> tool_names;
  std::vector<Choice> choices;  // [n]
  int32_t n_open = 0;           // choices not done
  RequestId id = 0;
  Clock::time_point t_submit, t_first_token, t_last_token;
  Usage usage;        // completion_tokens: token events taken so far, every choice's
  bool done = false;  // no more text: every choice is done, or the client is gone
  // When done: "cancelled" or "error" when a choice ended so, else the last choice's "stop" or
  // "length".
  std::string finish;
  std::string error;   // when finish == "error"
  bool ended = false;  // end() ran
};

http::Response json_response(int status, const std::string& body) {
  return http::Response{status, {{"Content-Type", "application/json"}}, body};
}

http::Response error_response(const HttpError& e) {
  http::Response r = json_response(e.status, dump(error_body(e)));
  if (e.status == 503) r.headers.emplace_back("Retry-After", "1");
  return r;
}

HttpError shutting_down() {
  return HttpError(503, "the server is shutting down", "", "shutting_down");
}

// ---- the KV view timing ---------------------------------------------------------------------------

// How long GET /kv/state waits for the scheduler thread to finish its step and build the
// snapshot: a step with a long prefill chunk takes up to ~1 s on a loaded 2-core machine.
constexpr auto kSnapshotWait = std::chrono::seconds(10);
// How often a /kv/events stream looks for new events, and after how many looks with none it
// writes a comment (a client gone is then noticed by the failed write, besides the socket watch).
constexpr auto kEventsPoll = std::chrono::milliseconds(50);
constexpr int kEventsHeartbeatPolls = 20;  // 1 s
// /kv/events streams at once (a page open is one).
constexpr int kMaxEventStreams = 8;
// After the grace period, the streams' final chunks are written within this; then run() returns
// even if some client does not read them.
constexpr auto kShutdownFlush = std::chrono::seconds(5);

}  // namespace

// One route: a path (exact, or a prefix ending in '/' whose rest is the argument), its method.
struct Route {
  const char* method;
  const char* path;
  bool prefix;      // path is a prefix; the rest of the request's path is `arg`
  bool generation;  // errors count as rejected generation requests
  bool open;        // no API key needed
  bool fast;        // answered on the I/O thread (no parsing of a body, no waiting)
  std::function<void(const http::Request&, const ExchangePtr&, const std::string& arg)> fn;
};

struct Server::Impl {
  Impl(Scheduler& s, const Tokenizer& t, ServedModel m, ServerOptions o)
      : sched(s), tok(t), model(std::move(m)), opts(std::move(o)) {}

  Scheduler& sched;
  const Tokenizer& tok;
  const ServedModel model;
  const ServerOptions opts;
  std::unique_ptr<http::HttpServer> http;
  std::vector<Route> table;
  Metrics metrics;
  std::atomic<bool> stopping{false};
  std::atomic<bool> grace_over{false};  // shutdown: running requests are being ended
  std::mutex active_mu;                 // guards active
  std::condition_variable active_cv;    // notified when a job ends
  std::unordered_map<RequestId, std::shared_ptr<Job>> active;  // submitted, not yet ended
  std::thread shutdown_thread;          // stop()'s grace period, then the end of every request
  std::mutex run_mu;
  std::condition_variable run_cv;
  bool run_done = false;
  const Clock::time_point t_start = Clock::now();  // events carry seconds since then
  std::shared_ptr<KvEventHub> hub;  // /kv/events subscribers (shared with the scheduler's watcher)

  void routes();
  void handle(http::Request&& req, const ExchangePtr& ex);
  void guarded(const Route& rt, const http::Request& req, const ExchangePtr& ex,
               const std::string& arg);
  void check_auth(const http::Request& req) const;
  void reply_error(const ExchangePtr& ex, const HttpError& e, bool generation);

  void kv_state(const ExchangePtr& ex);
  void kv_attention(const http::Request& req, const ExchangePtr& ex);
  // One attention map at a time (each is a prefill of its text, on one thread of its own, beside
  // the scheduler's; the worker thread running the route waits for it): a second one meanwhile
  // gets a 503.
  std::mutex map_mu;
  std::unique_ptr<ThreadPool> map_pool;  // created by the first map, under map_mu
  void kv_events(const ExchangePtr& ex);
  void events_tick(const ExchangePtr& ex, const std::shared_ptr<KvSubscriber>& sub, int idle);
  void publish_finished(const Job& job);
  void serve_asset(const ExchangePtr& ex, const std::string& name);

  void generate(const http::Request& req, const ExchangePtr& ex, Endpoint ep);
  // Takes one event into its choice; returns the text now safe to show for that choice.
  std::string consume(Job& job, const TimedEvent& te);
  std::string stream_events(Job& job, const std::deque<TimedEvent>& events);
  void drain(Job& job);
  std::string stream_tail(Job& job);
  void end_by_shutdown(Job& job);
  void end(Job& job);
  void shutdown_sequence();
  void join_shutdown(bool run_ended);
};

void Server::Impl::reply_error(const ExchangePtr& ex, const HttpError& e, bool generation) {
  if (e.status >= 500) ex->note("error", clip(e.what(), 200));  // the access log says why
  ex->reply(error_response(e));
  if (generation) metrics.count_rejected();
}

void Server::Impl::check_auth(const http::Request& req) const {
  if (opts.api_key.empty()) return;
  if (!req.has_header("Authorization"))
    throw HttpError(
        401,
        "missing API key: send the header 'Authorization: Bearer <key>' (kvlm serve --api-key)", "",
        "invalid_api_key");
  if (!bearer_matches(req.header("Authorization"), opts.api_key))
    throw HttpError(401, "incorrect API key", "", "invalid_api_key");
}

// Runs a route: auth, shutdown, and every exception turned into a JSON error.
void Server::Impl::guarded(const Route& rt, const http::Request& req, const ExchangePtr& ex,
                           const std::string& arg) {
  const bool generation = rt.generation;
  try {
    if (stopping) throw shutting_down();
    if (!rt.open) check_auth(req);
    rt.fn(req, ex, arg);
  } catch (const HttpError& e) {
    reply_error(ex, e, generation);
  } catch (const Error& e) {
    reply_error(ex, HttpError(400, e.what()), generation);
  } catch (const json::exception& e) {
    // api.cpp checks types before reading a value, so this is a check it missed; the request is
    // still what is wrong (a value of a type or range it did not expect), not the server.
    reply_error(ex, HttpError(400, "invalid request: " + clip(e.what(), 256), "", "invalid_request"),
                generation);
  } catch (const std::bad_alloc&) {
    reply_error(ex, HttpError(500, "out of memory"), generation);
  } catch (const std::exception& e) {
    reply_error(ex, HttpError(500, "internal error: " + clip(e.what(), 256)), generation);
  }
}

// The transport's handler (an I/O thread): finds the route; slow routes go to a worker thread.
void Server::Impl::handle(http::Request&& req, const ExchangePtr& ex) {
  const Route* found = nullptr;
  std::string allow, arg;
  for (const Route& rt : table) {
    const std::string_view p = rt.path;
    const bool match = rt.prefix ? req.path.size() > p.size() && req.path.starts_with(p)
                                 : req.path == p;
    if (!match) continue;
    if (req.method == rt.method) {
      found = &rt;
      if (rt.prefix) arg = req.path.substr(p.size());
      break;
    }
    allow = rt.method;
  }
  if (!found) {
    if (allow.empty())
      return reply_error(ex,
                         HttpError(404,
                                   fmt::format("unknown route: {} {}", clip(req.method),
                                               clip(req.path)),
                                   "", "not_found"),
                         false);
    http::Response r = error_response(HttpError(
        405,
        fmt::format("{} {}: method not allowed (use {})", clip(req.method), clip(req.path), allow),
        "", "method_not_allowed"));
    r.headers.emplace_back("Allow", allow);
    return ex->reply(std::move(r));
  }
  if (found->fast) return guarded(*found, req, ex, arg);
  auto owned = std::make_shared<http::Request>(std::move(req));
  http->offload([this, found, owned, ex, arg] { guarded(*found, *owned, ex, arg); });
}

// ---- generation ------------------------------------------------------------------------------------

void Server::Impl::generate(const http::Request& req, const ExchangePtr& ex, Endpoint ep) {
  const json body = parse_json_body(req.body);
  GenerationRequest g = ep == Endpoint::Chat
                            ? parse_chat_request(body, tok, model, random_u64())
                            : parse_completion_request(body, tok, model, random_u64());
  ResponseMeta meta{ep, new_id(ep == Endpoint::Chat ? "chatcmpl-" : "cmpl-"),
                    static_cast<int64_t>(std::time(nullptr)), model.name()};
  auto job = std::make_shared<Job>(tok, g, std::move(meta));
  job->ex = ex;
  job->t_submit = Clock::now();
  try {
    job->id =
        sched.submit(std::move(g.req), [ch = job->ch](const RequestEvent& e) { ch->push(e); });
  } catch (const Error& e) {
    if (std::string_view(e.what()).starts_with("queue full"))
      throw HttpError(503, e.what(), "", "queue_full");
    throw HttpError(400, e.what());
  }
  {
    std::lock_guard<std::mutex> l(active_mu);
    active[job->id] = job;
  }
  // A client gone (the connection watches its socket, so also while queued or prefilling, when
  // nothing is written): cancelled at once, so its blocks go back now rather than at max_tokens.
  ex->on_gone([this, job] {
    const bool cancel = !job->done;
    if (cancel) {
      job->done = true;
      job->finish = "cancelled";
    }
    end(*job);  // counted before the scheduler can drop it: /metrics never shows it neither way
    if (cancel) sched.cancel(job->id);
  });
  // Ties the response to its sequence in GET /kv/state and /kv/events (the web page's KV view).
  const std::string rid = std::to_string(job->id);
  if (job->stream) {
    ex->begin_stream(http::Response{200,
                                    {{"Content-Type", "text/event-stream"},
                                     {"Cache-Control", "no-cache"},
                                     {"X-Kvlm-Request-Id", rid}},
                                    {}});
    // Sent before any token so the client sees the response begin while the prompt is queued or
    // prefilled: one per choice.
    if (ep == Endpoint::Chat) {
      std::string roles;
      for (size_t i = 0; i < job->choices.size(); ++i)
        roles += sse_event(render_chunk(job->meta, "", "", true, job->include_usage, nullptr,
                                        static_cast<int32_t>(i)));
      ex->write(std::move(roles));
    }
  }
  job->ch->set_wake([this, job] { job->ex->post([this, job] { drain(*job); }); });
  // stop() may have swept `active` before this job was in it.
  if (grace_over) ex->post([this, job] { end_by_shutdown(*job); });
}

// The connection's strand, woken by the channel: the events so far become text, stream chunks, or
// (non-streaming, once done) the response.
void Server::Impl::drain(Job& job) {
  if (job.ended) return;
  if (job.stream) {
    std::string out = stream_events(job, job.ch->take());
    if (job.done) out += stream_tail(job);
    if (!out.empty()) job.ex->write(std::move(out));
    if (job.done) {
      job.ex->end();
      end(job);
    }
    return;
  }
  for (const TimedEvent& te : job.ch->take()) {
    const std::string piece = consume(job, te);
    if (!piece.empty()) job.choices[static_cast<size_t>(te.ev.index)].shown += piece;
    if (job.done) break;
  }
  if (!job.done) return;
  if (job.finish == "cancelled") {
    job.ex->reply(error_response(shutting_down()));
  } else if (job.finish == "error") {
    job.ex->reply(error_response(HttpError(500, job.error)));
  } else {
    std::vector<ChoiceText> out;
    for (Choice& c : job.choices) {
      out.push_back({std::move(c.shown), c.finish, c.logprobs ? c.logprobs->take() : json(nullptr)});
      if (job.tool_format) split_tool_calls(*job.tool_format, job.tool_names, out.back());
    }
    http::Response r = json_response(200, dump(render_response(job.meta, out, job.usage)));
    r.headers.emplace_back("X-Kvlm-Request-Id", std::to_string(job.id));
    job.ex->reply(std::move(r));
  }
  end(job);
}

// The SSE chunks of the events taken: each choice's text and logprobs, and its finish chunk when
// it ends (stream_tail adds the usage and [DONE] once every choice has).
std::string Server::Impl::stream_events(Job& job, const std::deque<TimedEvent>& events) {
  std::string out;
  const auto n = static_cast<int32_t>(job.choices.size());
  for (const TimedEvent& te : events) {
    const int32_t i = te.ev.index;
    const bool was_done = i < 0 || i >= n || job.choices[static_cast<size_t>(i)].done;
    const std::string piece = consume(job, te);
    if (was_done) continue;
    Choice& c = job.choices[static_cast<size_t>(i)];
    // Each chunk carries its tokens' logprobs; a token whose text is held back (a stop
    // string's start, a split character) still gets its chunk.
    const bool lp = c.logprobs && !c.logprobs->empty();
    if (c.calls) {
      out += tool_call_events(*c.calls, job.meta, piece, c.done ? c.finish : "", job.include_usage,
                              lp ? c.logprobs->take() : json(nullptr), i);
      if (job.done) break;
      continue;
    }
    if (!piece.empty() || lp)
      out += sse_event(render_chunk(job.meta, piece, "", false, job.include_usage,
                                    lp ? c.logprobs->take() : json(nullptr), i));
    if (c.done && c.finish != "error")
      out += sse_event(render_chunk(job.meta, "", c.finish, false, job.include_usage, nullptr, i));
    if (job.done) break;
  }
  return out;
}

// A finished stream's last events, once: the usage chunk when asked (every choice's finish chunk
// came before), or an error event when a choice failed; then [DONE].
std::string Server::Impl::stream_tail(Job& job) {
  std::string out;
  if (job.finish == "error")
    out += sse_event(error_body(HttpError(500, job.error)));
  else if (job.include_usage)
    out += sse_event(render_usage_chunk(job.meta, job.usage));
  return out + "data: [DONE]\n\n";
}

// Shutdown, once the grace period is over (the strand): a stream gets its held text, a final
// chunk with finish_reason "cancelled" and [DONE]; a non-streaming request a 503.
void Server::Impl::end_by_shutdown(Job& job) {
  if (job.ended) return;
  if (!job.done) {
    sched.cancel(job.id);  // every choice
    std::string out;
    // Events already queued first (text the client has not seen; they may end the request),
    // then every open choice's held text and a final chunk.
    if (job.stream) out = stream_events(job, job.ch->take());
    for (size_t k = 0; k < job.choices.size() && !job.done; ++k) {
      Choice& c = job.choices[k];
      if (c.done) continue;
      c.done = true;
      const auto i = static_cast<int32_t>(k);
      if (const std::string held = c.text.finish(); job.stream && !held.empty())
        out += sse_event(render_chunk(job.meta, held, "", false, job.include_usage, nullptr, i));
      if (job.stream)
        out += sse_event(render_chunk(job.meta, "", "cancelled", false, job.include_usage,
                                      nullptr, i));
    }
    if (!job.done && job.finish != "error") job.finish = "cancelled";
    job.done = true;
    if (job.stream) job.ex->write(out + stream_tail(job));
  }
  if (job.stream)
    job.ex->end();
  else
    job.ex->reply(error_response(shutting_down()));
  end(job);
}

void Server::Impl::end(Job& job) {
  if (job.ended) return;
  job.ended = true;
  job.ch->set_wake(nullptr);
  // The request's access-log line (written once its answer is).
  const bool any = job.usage.completion_tokens > 0;
  job.ex->note("prompt_tokens", std::to_string(job.usage.prompt_tokens));
  job.ex->note("cached_tokens", std::to_string(job.usage.cached_tokens));
  job.ex->note("completion_tokens", std::to_string(job.usage.completion_tokens));
  job.ex->note("ttft_ms", any ? fmt::format("{:.1f}", seconds(job.t_first_token - job.t_submit) * 1e3)
                              : std::string("-"));
  job.ex->note("finish", job.finish);
  if (job.finish == "error") job.ex->note("error", clip(job.error, 200));
  metrics.count_finish(job.finish);
  publish_finished(job);
  std::lock_guard<std::mutex> l(active_mu);
  active.erase(job.id);
  active_cv.notify_all();
}

// ---- the KV view (docs/SERVER.md) ----------------------------------------------------------------

void Server::Impl::kv_state(const ExchangePtr& ex) {
  const auto snap = sched.kv_snapshot(kSnapshotWait);
  if (!snap)
    throw HttpError(503, "the scheduler did not answer in time (or is stopping); retry", "",
                    "busy");
  http::Response r = json_response(200, dump(kv_state_json(*snap, sched.stats(), model)));
  r.headers.emplace_back("Cache-Control", "no-cache");
  ex->reply(std::move(r));
}

void Server::Impl::kv_attention(const http::Request& req, const ExchangePtr& ex) {
  const AttentionQuery a =
      parse_attention_request(parse_json_body(req.body), tok, model, sched.model().config());
  // The lock is released before the reply is sent: a client that asks again as soon as it has
  // the answer must not find this map still holding it.
  const AttentionMap map = [&] {
    std::unique_lock<std::mutex> l(map_mu, std::try_to_lock);
    if (!l) throw HttpError(503, "another attention map is being computed; retry", "", "busy");
    if (!map_pool) map_pool = std::make_unique<ThreadPool>(1);
    return attention_map(sched.model(), a.tokens, a.layer, a.head, a.n_query, *map_pool);
  }();
  ex->reply(json_response(200, dump(attention_map_json(map, a.tokens, tok))));
}

void Server::Impl::kv_events(const ExchangePtr& ex) {
  auto sub = hub->subscribe();
  if (!sub)
    throw HttpError(503,
                    fmt::format("too many /kv/events streams: at most {} at once",
                                hub->max_subscribers()),
                    "", "too_many_streams");
  ex->on_gone([hub = hub, sub] { hub->unsubscribe(sub); });
  ex->begin_stream(http::Response{
      200, {{"Content-Type", "text/event-stream"}, {"Cache-Control", "no-cache"}}, {}});
  // A comment first, so the client sees the stream open before any event.
  ex->write(": kvlm kv events\n\n");
  events_tick(ex, sub, 0);
}

// Every kEventsPoll on the connection's strand: the events queued, or a comment when idle; the
// stream ends once the server stops.
void Server::Impl::events_tick(const ExchangePtr& ex, const std::shared_ptr<KvSubscriber>& sub,
                               int idle) {
  ex->post_after(kEventsPoll, [this, ex, sub, idle] {
    if (stopping || sub->closed()) {
      ex->end();
      hub->unsubscribe(sub);
      return;
    }
    std::string out = sub->take(std::chrono::milliseconds(0));
    int next = out.empty() ? idle + 1 : 0;
    if (next >= kEventsHeartbeatPolls) {
      out = ": idle\n\n";
      next = 0;
    }
    if (!out.empty()) ex->write(std::move(out));
    events_tick(ex, sub, next);
  });
}

void Server::Impl::serve_asset(const ExchangePtr& ex, const std::string& name) {
  const WebAsset* a = find_web_asset(name);
  if (!a) throw HttpError(404, fmt::format("no such page file: {}", clip(name)), "", "not_found");
  ex->reply(http::Response{200,
                           {{"Content-Type", a->content_type}},
                           std::string(reinterpret_cast<const char*>(a->data), a->size)});
}

std::string Server::Impl::consume(Job& job, const TimedEvent& te) {
  const RequestEvent& e = te.ev;
  if (job.done || e.index < 0 || e.index >= static_cast<int32_t>(job.choices.size())) return {};
  Choice& c = job.choices[static_cast<size_t>(e.index)];
  if (c.done) return {};  // tokens in flight after a stop string
  job.usage.prompt_tokens = e.n_prompt > 0 ? e.n_prompt : job.usage.prompt_tokens;
  job.usage.cached_tokens = e.n_cached;
  std::string out;
  if (e.token >= 0) {
    if (job.usage.completion_tokens == 0) {
      metrics.observe_ttft(seconds(te.at - job.t_submit));
      job.t_first_token = te.at;
    }
    if (c.n_tokens > 0) metrics.observe_itl(seconds(te.at - c.t_last_token));  // per choice
    c.t_last_token = job.t_last_token = te.at;
    ++c.n_tokens;
    ++job.usage.completion_tokens;
    if (c.logprobs && e.logprobs && (job.ignore_eos || !tok.is_eog(e.token)))
      c.logprobs->add(*e.logprobs, c.shown_chars);
    out = c.text.push(e.token);
    if (c.text.stopped()) {
      c.done = true;
      c.finish = "stop";
      sched.cancel(job.id, e.index);  // this choice only; its tokens in flight are ignored
    }
  }
  if (e.done && !c.done) {
    c.done = true;
    c.finish = finish_reason_name(e.finish);
    out += c.text.finish();
    if (c.finish == "error") job.error = e.error.empty() ? "generation failed" : e.error;
  }
  if (c.done) {
    // A failed or cancelled choice fails the request; else it ends as its last choice did.
    if (job.finish != "error" && job.finish != "cancelled") job.finish = c.finish;
    if (--job.n_open == 0) {
      job.done = true;
      metrics.observe_e2e(seconds(te.at - job.t_submit));
    }
  }
  // Characters, not bytes: the lead bytes (a text offset as a client's string indexes it).
  c.shown_chars += std::count_if(out.begin(), out.end(), [](char ch) {
    return (static_cast<unsigned char>(ch) & 0xC0) != 0x80;
  });
  return out;
}

void Server::Impl::publish_finished(const Job& job) {
  if (!hub->watched() || job.id == 0) return;
  const bool any = job.usage.completion_tokens > 0;
  const double ttft = any ? seconds(job.t_first_token - job.t_submit) : 0;
  const double decode = any ? seconds(job.t_last_token - job.t_first_token) : 0;
  hub->publish({{"type", "finished"},
                {"id", job.id},
                {"t", seconds(Clock::now() - t_start)},
                {"finish", job.finish},
                {"prompt_tokens", job.usage.prompt_tokens},
                {"cached_tokens", job.usage.cached_tokens},
                {"completion_tokens", job.usage.completion_tokens},
                {"ttft_s", ttft},
                // Decode speed: the tokens after the first over the time since the first.
                {"tokens_per_s",
                 decode > 0 ? double(job.usage.completion_tokens - 1) / decode : 0.0}});
}

// ---- routes --------------------------------------------------------------------------------------

void Server::Impl::routes() {
  using Req = http::Request;
  auto reply_json = [](const ExchangePtr& ex, const json& j) {
    ex->reply(json_response(200, dump(j)));
  };
  auto gen = [this](Endpoint ep) {
    return [this, ep](const Req& q, const ExchangePtr& ex, const std::string&) {
      generate(q, ex, ep);
    };
  };
  table = {
      {"POST", "/v1/chat/completions", false, true, false, false, gen(Endpoint::Chat)},
      {"POST", "/v1/completions", false, true, false, false, gen(Endpoint::Completion)},
      {"GET", "/v1/models", false, false, false, true,
       [this, reply_json](const Req&, const ExchangePtr& ex, const std::string&) {
         reply_json(ex, models_list(model));
       }},
      {"GET", "/v1/models/", true, false, false, true,
       [this, reply_json](const Req&, const ExchangePtr& ex, const std::string& name) {
         if (!serves(model, name))
           throw HttpError(404,
                           fmt::format("The model '{}' does not exist; this server serves '{}'",
                                       clip(name), clip(model.name())),
                           "model", "model_not_found");
         reply_json(ex, model_object(model, name));
       }},
      {"GET", "/health", false, false, true, true,
       [reply_json](const Req&, const ExchangePtr& ex, const std::string&) {
         reply_json(ex, {{"status", "ok"}});
       }},
      {"GET", "/metrics", false, false, false, true,
       [this](const Req&, const ExchangePtr& ex, const std::string&) {
         ex->reply(http::Response{200,
                                  {{"Content-Type", "text/plain; version=0.0.4; charset=utf-8"}},
                                  metrics.render(sched.stats())});
       }},
      {"GET", "/kv/state", false, false, false, false,
       [this](const Req&, const ExchangePtr& ex, const std::string&) { kv_state(ex); }},
      {"GET", "/kv/events", false, false, false, true,
       [this](const Req&, const ExchangePtr& ex, const std::string&) { kv_events(ex); }},
      // Not fast: a worker thread waits for the map (the I/O threads never do).
      {"POST", "/kv/attention", false, false, false, false,
       [this](const Req& q, const ExchangePtr& ex, const std::string&) { kv_attention(q, ex); }},
      // The web page: static files with no data in them, open like /health; the page asks for
      // the API key and sends it with every request it makes.
      {"GET", "/", false, false, true, true,
       [this](const Req&, const ExchangePtr& ex, const std::string&) {
         serve_asset(ex, "index.html");
       }},
      {"GET", "/web/", true, false, true, true,
       [this](const Req&, const ExchangePtr& ex, const std::string& name) {
         serve_asset(ex, name);
       }},
      {"POST", "/tokenize", false, false, false, false,
       [this, reply_json](const Req& q, const ExchangePtr& ex, const std::string&) {
         reply_json(ex, tokenize_response(parse_json_body(q.body), tok));
       }},
      {"POST", "/detokenize", false, false, false, false,
       [this, reply_json](const Req& q, const ExchangePtr& ex, const std::string&) {
         reply_json(ex, detokenize_response(parse_json_body(q.body), tok));
       }},
  };
}

// ---- shutdown --------------------------------------------------------------------------------------

// stop()'s thread: the grace period for running requests, then the end of those still running,
// then the transport's end (forced if a client does not read its last bytes).
void Server::Impl::shutdown_sequence() {
  const auto grace = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(std::max(0.0, opts.shutdown_grace_s)));
  std::unique_lock<std::mutex> l(active_mu);
  active_cv.wait_for(l, grace, [&] { return active.empty(); });
  grace_over = true;
  for (const auto& [id, job] : active) job->ex->post([this, job = job] { end_by_shutdown(*job); });
  active_cv.wait_for(l, kShutdownFlush, [&] { return active.empty(); });
  l.unlock();
  http->stop_when_idle();
  std::unique_lock<std::mutex> r(run_mu);
  if (!run_cv.wait_for(r, kShutdownFlush, [&] { return run_done; })) http->force_stop();
}

// Takes stop()'s thread under the lock stop() starts it under (stop() runs on the signal thread,
// run() and the destructor on others), then joins it.
void Server::Impl::join_shutdown(bool run_ended) {
  std::thread t;
  {
    std::lock_guard<std::mutex> l(run_mu);
    if (run_ended) run_done = true;
    t = std::move(shutdown_thread);
  }
  run_cv.notify_all();
  if (t.joinable()) t.join();
}

// One line per request on stderr: "kvlm serve: ID METHOD PATH STATUS key=value... total_ms=N", or
// the same fields as one JSON object.
void write_access_log(const http::AccessRecord& r, bool as_json) {
  static std::mutex mu;
  std::string line;
  if (as_json) {
    json j = {{"id", r.id}, {"method", r.method}, {"path", r.path}, {"status", r.status}};
    if (r.client_gone) j["client_gone"] = true;
    for (const auto& [k, v] : r.notes) {
      char* end = nullptr;
      const double d = std::strtod(v.c_str(), &end);
      j[k] = !v.empty() && *end == '\0' ? json(d) : json(v);
    }
    j["total_ms"] = std::round(r.total_ms * 10) / 10;
    line = dump(j);
  } else {
    line = fmt::format("kvlm serve: {} {} {} {}", r.id, r.method, r.path, r.status);
    if (r.client_gone) line += " client_gone";
    for (const auto& [k, v] : r.notes)
      line += fmt::format(" {}={}", k, v.find(' ') == std::string::npos ? v : dump(json(v)));
    line += fmt::format(" total_ms={:.1f}", r.total_ms);
  }
  line += '\n';
  std::lock_guard<std::mutex> l(mu);
  std::fwrite(line.data(), 1, line.size(), stderr);
}

// ---- Server ------------------------------------------------------------------------------------

Server::Server(Scheduler& scheduler, const Tokenizer& tok, ServedModel model, ServerOptions opts)
    : impl_(std::make_unique<Impl>(scheduler, tok, std::move(model), std::move(opts))) {
  Impl& s = *impl_;
  http::Options ho;
  ho.host = s.opts.host;
  ho.port = s.opts.port;
  ho.n_threads = std::max(1, s.opts.n_http_threads);
  ho.n_workers = std::max(1, s.opts.n_http_threads);
  ho.cors_origin = s.opts.cors_origin;
  ho.limits = s.opts.limits;
  if (s.opts.log_format != "off")
    ho.access_log = [as_json = s.opts.log_format == "json"](const http::AccessRecord& r) {
      write_access_log(r, as_json);
    };
  s.http = std::make_unique<http::HttpServer>(
      ho, [&s](http::Request&& req, ExchangePtr ex) { s.handle(std::move(req), ex); },
      [](int status, const std::string& message, const std::string& code) {
        return dump(error_body(HttpError(status, message, "", code)));
      });
  // Event tracking costs the scheduler only while someone watches /kv/events.
  s.hub = std::make_shared<KvEventHub>(kMaxEventStreams, [&s](bool on) {
    if (!on) return s.sched.watch_kv({});
    std::weak_ptr<KvEventHub> weak = s.hub;
    s.sched.watch_kv([weak, t0 = s.t_start](const std::vector<KvEvent>& events) {
      const auto hub = weak.lock();
      if (!hub) return;
      const double t = seconds(Clock::now() - t0);
      for (const KvEvent& e : events) {
        json j = kv_event_json(e);
        j["t"] = t;
        hub->publish(j);
      }
    });
  });
  s.routes();
}

Server::~Server() {
  Impl& s = *impl_;
  s.hub->close();
  s.sched.watch_kv({});
  s.join_shutdown(false);
  // Jobs a forced stop left: their channels stop waking connections.
  std::lock_guard<std::mutex> l(s.active_mu);
  for (const auto& [id, job] : s.active) job->ch->set_wake(nullptr);
}

int Server::bind() { return impl_->http->bind(); }

void Server::run() {
  Impl& s = *impl_;
  s.http->run();
  s.join_shutdown(true);
}

void Server::stop() {
  Impl& s = *impl_;
  if (s.stopping.exchange(true)) return;
  s.hub->close();  // event streams end
  s.http->stop_accepting();
  std::lock_guard<std::mutex> l(s.run_mu);
  s.shutdown_thread = std::thread([&s] { s.shutdown_sequence(); });
}

}  // namespace kvlm::server
