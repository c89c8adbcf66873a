#include "server/server.h"

#include <fmt/format.h>
#include <dirent.h>
#include <httplib.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <ctime>
#include <deque>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <unordered_set>

#include "base/error.h"
#include "server/kv_api.h"
#include "server/metrics.h"
#include "server/web_assets.h"

namespace kvlm::server {
namespace {

using Clock = std::chrono::steady_clock;
using HandlerResponse = httplib::Server::HandlerResponse;

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

// One request's events, from the scheduler thread to the request's HTTP thread.
class Channel {
 public:
  // Scheduler thread: a short critical section, never a wait.
  void push(const RequestEvent& e) {
    TimedEvent te{e, Clock::now()};
    {
      std::lock_guard<std::mutex> l(mu_);
      q_.push_back(std::move(te));
    }
    cv_.notify_one();
  }
  // HTTP thread: waits for at least one event and takes all there are.
  std::deque<TimedEvent> take() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return !q_.empty(); });
    std::deque<TimedEvent> out;
    out.swap(q_);
    return out;
  }
  // HTTP thread: as take(), but gives up after `max_wait` (then the result may be empty).
  std::deque<TimedEvent> take_for(Clock::duration max_wait) {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait_for(l, max_wait, [&] { return !q_.empty(); });
    std::deque<TimedEvent> out;
    out.swap(q_);
    return out;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<TimedEvent> q_;
};

// One choice of a request being served (OpenAI's n: each has its own text, stop strings, logprobs
// and finish reason).
struct Choice {
  Choice(const Tokenizer& tok, const GenerationRequest& g, Endpoint ep)
      : text(tok, g.stop, g.req.ignore_eos) {
    if (g.req.sampling.n_logprobs >= 0) logprobs.emplace(tok, ep);
  }
  TextStream text;
  // When the request asked for logprobs: its tokens' not yet sent (end-of-generation tokens left
  // out, as from the text, unless ignore_eos).
  std::optional<LogprobsBuilder> logprobs;
  std::string shown;        // non-streaming: the text so far
  int64_t shown_chars = 0;  // characters of text consume() has returned (text_offset)
  int64_t n_tokens = 0;     // token events taken
  Clock::time_point t_last_token;
  bool done = false;        // no more text: final event or stop string
  std::string finish;       // when done: "stop", "length", "cancelled", "error"
};

// One generation request being served. Touched only by its HTTP thread (the channel aside).
struct Job {
  Job(const Tokenizer& tok, const GenerationRequest& g, ResponseMeta meta)
      : meta(std::move(meta)),
        stream(g.stream),
        include_usage(g.include_usage),
        ignore_eos(g.req.ignore_eos) {
    usage.prompt_tokens = static_cast<int64_t>(g.req.prompt.size());
    choices.reserve(static_cast<size_t>(g.req.n));
    for (int32_t i = 0; i < g.req.n; ++i) choices.emplace_back(tok, g, this->meta.endpoint);
    n_open = g.req.n;
  }
  ResponseMeta meta;
  bool stream, include_usage;
  std::shared_ptr<Channel> ch = std::make_shared<Channel>();
  bool ignore_eos;
  std::vector<Choice> choices;  // [n]
  int32_t n_open = 0;           // choices not done
  RequestId id = 0;
  Clock::time_point t_submit, t_first_token, t_last_token;
  Usage usage;             // completion_tokens: token events taken so far, every choice's
  bool done = false;       // no more text: every choice is done, or the client is gone
  // When done: "cancelled" or "error" when a choice ended so (the request failed), else the
  // last choice's "stop" or "length".
  std::string finish;
  std::string error;       // when finish == "error"
  bool role_sent = false;  // chat streams: the first chunks carry the assistant role
  bool ended = false;      // end() ran
  // The connection's socket (find_client_socket), watched while no event comes: INVALID_SOCKET
  // when it could not be found (then only a failed write notices a client gone).
  socket_t client = INVALID_SOCKET;
};

// ---- the client's socket ------------------------------------------------------------------------

// A non-streaming response is written only once generation ends, so no failed write can tell that
// its client left; the handler watches the socket instead. httplib 0.11.4 gives a handler no
// socket (no Request::is_connection_closed; the Stream stays inside httplib), only the
// connection's two addresses, filled from getpeername() and getsockname() (Request::remote_addr,
// remote_port, local_addr, local_port). A connected TCP socket is the only one with its address
// pair, and httplib closes it only after the handler returns and the response is written, so the
// descriptor found here stays this request's connection while the handler waits.

// The numeric host, as httplib writes Request::remote_addr and local_addr (getnameinfo,
// NI_NUMERICHOST); "" if it has none.
std::string numeric_host(const sockaddr_storage& a, socklen_t len) {
  char host[NI_MAXHOST] = {};
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&a), len, host, sizeof(host), nullptr, 0,
                  NI_NUMERICHOST) != 0)
    return {};
  return host;
}

int port_of(const sockaddr_storage& a) {
  if (a.ss_family == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in&>(a).sin_port);
  if (a.ss_family == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6&>(a).sin6_port);
  return -1;
}

// The descriptor of the connection `req` came on, or INVALID_SOCKET (not found: the request is
// then not watched). Scans this process's descriptors (Linux /proc): tens to a few hundred of
// them, two syscalls each, once per non-streaming request.
socket_t find_client_socket(const httplib::Request& req) {
  if (req.remote_port < 0 || req.local_port < 0) return INVALID_SOCKET;
  DIR* dir = opendir("/proc/self/fd");
  if (!dir) return INVALID_SOCKET;
  socket_t found = INVALID_SOCKET;
  while (const dirent* e = readdir(dir)) {
    char* end = nullptr;
    const long fd = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != '\0' || fd == dirfd(dir)) continue;
    sockaddr_storage peer{}, local{};
    socklen_t peer_len = sizeof(peer), local_len = sizeof(local);
    const socket_t sock = static_cast<socket_t>(fd);
    if (getpeername(sock, reinterpret_cast<sockaddr*>(&peer), &peer_len) != 0 ||
        port_of(peer) != req.remote_port)
      continue;
    if (getsockname(sock, reinterpret_cast<sockaddr*>(&local), &local_len) != 0 ||
        port_of(local) != req.local_port)
      continue;
    if (numeric_host(peer, peer_len) == req.remote_addr &&
        numeric_host(local, local_len) == req.local_addr) {
      found = sock;
      break;
    }
  }
  closedir(dir);
  return found;
}

// Whether httplib would refuse to write the response: Debian's 0.11.4 checks, before each write
// (SocketStream::write and is_writable, through detail::is_socket_alive), that the socket is not
// readable or that a 1-byte MSG_PEEK still finds data; a read side at its end (the client closed
// or reset the connection) fails the write. The same test, without reading anything: a pipelined
// request waiting in the socket keeps the connection alive, as it does for httplib.
bool client_gone(socket_t sock) {
  pollfd p{sock, POLLIN, 0};
  const int n = ::poll(&p, 1, 0);
  if (n == 0 || (n < 0 && errno == EINTR)) return false;
  if (n < 0 || (p.revents & POLLNVAL)) return true;
  char byte;
  const ssize_t got = ::recv(sock, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  if (got > 0) return false;
  return got == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

// The 413 httplib answered. It has two limits: --max-body (set_payload_max_length), checked
// against Content-Length before the body is read, and, for a Content-Type starting with
// application/x-www-form-urlencoded, CPPHTTPLIB_FORM_URL_ENCODED_PAYLOAD_MAX_LENGTH (8192 bytes,
// compiled into Debian's library as in its header), checked after the body is read; only the
// second leaves a body in the request.
HttpError too_large(const httplib::Request& q, size_t max_body) {
  const size_t form_max = CPPHTTPLIB_FORM_URL_ENCODED_PAYLOAD_MAX_LENGTH;
  if (q.body.size() > form_max &&
      q.get_header_value("Content-Type").starts_with("application/x-www-form-urlencoded"))
    return HttpError(413,
                     fmt::format("a form-encoded request body (Content-Type: "
                                 "application/x-www-form-urlencoded) is limited to {} bytes, this "
                                 "one has {}; this API reads JSON: send Content-Type: "
                                 "application/json (bodies up to {} bytes, kvlm serve --max-body)",
                                 form_max, q.body.size(), max_body),
                     "", "payload_too_large");
  return HttpError(
      413,
      fmt::format("the request body is larger than the limit of {} bytes (kvlm serve --max-body)",
                  max_body),
      "", "payload_too_large");
}

// How often a waiting request looks at its socket when no event comes (queued, prefilling, or a
// non-streaming one generating): a client gone is noticed within this, or at the next token.
constexpr auto kClientPoll = std::chrono::milliseconds(50);

}  // namespace

struct Server::Impl {
  Impl(Scheduler& s, const Tokenizer& t, ServedModel m, ServerOptions o)
      : sched(s), tok(t), model(std::move(m)), opts(std::move(o)) {}

  Scheduler& sched;
  const Tokenizer& tok;
  const ServedModel model;
  const ServerOptions opts;
  httplib::Server http;
  Metrics metrics;
  std::atomic<bool> stopping{false};
  std::atomic<bool> in_run{false};
  socket_t listen_sock = INVALID_SOCKET;  // recorded by the socket-options hook (bind())
  std::mutex active_mu;                  // guards active
  std::unordered_set<RequestId> active;  // submitted, not yet ended (cancelled on stop())
  const Clock::time_point t_start = Clock::now();  // events carry seconds since then
  std::shared_ptr<KvEventHub> hub;  // /kv/events subscribers (shared with the scheduler's watcher)

  void routes();
  void kv_state(httplib::Response& res);
  void kv_events(httplib::Response& res);
  void kv_attention(const httplib::Request& req, httplib::Response& res);
  // One attention map at a time (each is a prefill of its text, on one thread of its own, beside
  // the scheduler's): a second one meanwhile gets a 503.
  std::mutex map_mu;
  std::unique_ptr<ThreadPool> map_pool;  // created by the first map, under map_mu
  void publish_finished(const Job& job);
  void serve_asset(httplib::Response& res, const std::string& name);
  void reply_error(httplib::Response& res, const HttpError& e, bool generation);
  // Wraps a handler: auth, shutdown, and every exception turned into a JSON error.
  httplib::Server::Handler guarded(
      std::function<void(const httplib::Request&, httplib::Response&)> f, bool generation,
      bool open = false);
  void check_auth(const httplib::Request& req) const;

  void generate(const httplib::Request& req, httplib::Response& res, Endpoint ep);
  // Takes one event into its choice; returns the text now safe to show for that choice.
  std::string consume(Job& job, const TimedEvent& te);
  std::string stream_events(Job& job, const std::deque<TimedEvent>& events);
  bool stream_step(Job& job, httplib::DataSink& sink);
  void end(Job& job);
};

void Server::Impl::reply_error(httplib::Response& res, const HttpError& e, bool generation) {
  res.status = e.status;
  if (e.status == 503) res.set_header("Retry-After", "1");
  res.set_content(dump(error_body(e)), "application/json");
  if (generation) metrics.count_rejected();
}

void Server::Impl::check_auth(const httplib::Request& req) const {
  if (opts.api_key.empty()) return;
  if (!req.has_header("Authorization"))
    throw HttpError(
        401,
        "missing API key: send the header 'Authorization: Bearer <key>' (kvlm serve --api-key)", "",
        "invalid_api_key");
  if (!bearer_matches(req.get_header_value("Authorization"), opts.api_key))
    throw HttpError(401, "incorrect API key", "", "invalid_api_key");
}

httplib::Server::Handler Server::Impl::guarded(
    std::function<void(const httplib::Request&, httplib::Response&)> f, bool generation,
    bool open) {
  return [this, f = std::move(f), generation, open](const httplib::Request& req,
                                                    httplib::Response& res) {
    try {
      if (stopping) throw HttpError(503, "the server is shutting down", "", "shutting_down");
      if (!open) check_auth(req);
      f(req, res);
    } catch (const HttpError& e) {
      reply_error(res, e, generation);
    } catch (const Error& e) {
      reply_error(res, HttpError(400, e.what()), generation);
    } catch (const json::exception& e) {
      // api.cpp checks types before reading a value, so this is a check it missed; the request is
      // still what is wrong (a value of a type or range it did not expect), not the server.
      reply_error(res,
                  HttpError(400, "invalid request: " + clip(e.what(), 256), "", "invalid_request"),
                  generation);
    } catch (const std::bad_alloc&) {
      reply_error(res, HttpError(500, "out of memory"), generation);
    } catch (const std::exception& e) {
      reply_error(res, HttpError(500, "internal error: " + clip(e.what(), 256)), generation);
    }
  };
}

// ---- generation
// ----------------------------------------------------------------------------------

void Server::Impl::generate(const httplib::Request& req, httplib::Response& res, Endpoint ep) {
  const json body = parse_json_body(req.body);
  GenerationRequest g = ep == Endpoint::Chat
                            ? parse_chat_request(body, tok, model, random_u64())
                            : parse_completion_request(body, tok, model, random_u64());
  ResponseMeta meta{ep, new_id(ep == Endpoint::Chat ? "chatcmpl-" : "cmpl-"),
                    static_cast<int64_t>(std::time(nullptr)), model.name()};
  auto job = std::make_shared<Job>(tok, g, std::move(meta));
  job->client = find_client_socket(req);
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
    active.insert(job->id);
    if (stopping) sched.cancel(job->id);  // stop() may have swept `active` before the insert
  }
  // Ties the response to its sequence in GET /kv/state and /kv/events (the web page's KV view).
  res.set_header("X-Kvlm-Request-Id", std::to_string(job->id));

  if (!job->stream) {
    bool client_left = false;
    while (!job->done) {
      for (const TimedEvent& te : job->ch->take_for(kClientPoll)) {
        const std::string piece = consume(*job, te);
        if (!piece.empty()) job->choices[static_cast<size_t>(te.ev.index)].shown += piece;
      }
      if (!job->done && job->client != INVALID_SOCKET && client_gone(job->client)) {
        sched.cancel(job->id);  // its blocks go back at the next step, not at max_tokens
        job->done = true;
        job->finish = "cancelled";
        client_left = true;
      }
    }
    end(*job);
    if (client_left) {
      // Never delivered (httplib will not write to this socket); not a 200, and counted as
      // cancelled (end()) rather than rejected.
      reply_error(res,
                  HttpError(499, "the client closed the connection before the response was ready",
                            "", "client_closed"),
                  false);
      return;
    }
    if (job->finish == "cancelled")
      throw HttpError(503, "the server is shutting down", "", "shutting_down");
    if (job->finish == "error") throw HttpError(500, job->error);
    std::vector<ChoiceText> out;
    for (Choice& c : job->choices)
      out.push_back({std::move(c.shown), c.finish, c.logprobs ? c.logprobs->take() : json(nullptr)});
    res.set_content(dump(render_response(job->meta, out, job->usage)), "application/json");
    return;
  }
  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider(
      "text/event-stream",
      [this, job](size_t, httplib::DataSink& sink) { return stream_step(*job, sink); },
      [this, job](bool) {
        // Runs once the response is over, written or not: a stream cut short (client gone,
        // write failed) is cancelled here, so its blocks are freed now rather than at max_tokens.
        if (!job->done) {
          sched.cancel(job->id);
          job->done = true;
          job->finish = "cancelled";
        }
        end(*job);
      });
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

// The SSE chunks of the events taken: each choice's text and logprobs, its finish chunk when it
// ends; once every choice has, the usage chunk (include_usage) and [DONE], or an error event
// when the request failed or was cancelled.
std::string Server::Impl::stream_events(Job& job, const std::deque<TimedEvent>& events) {
  std::string out;
  for (const TimedEvent& te : events) {
    const int32_t i = te.ev.index;
    const bool was_done = i >= 0 && i < static_cast<int32_t>(job.choices.size()) &&
                          job.choices[static_cast<size_t>(i)].done;
    const std::string piece = consume(job, te);
    if (was_done || i < 0 || i >= static_cast<int32_t>(job.choices.size())) continue;
    Choice& c = job.choices[static_cast<size_t>(i)];
    // Each chunk carries its tokens' logprobs; a token whose text is held back (a stop
    // string's start, a split character) still gets its chunk.
    const bool lp = c.logprobs && !c.logprobs->empty();
    if (!piece.empty() || lp)
      out += sse_event(render_chunk(job.meta, piece, "", false, job.include_usage,
                                    lp ? c.logprobs->take() : json(nullptr), i));
    if (c.done && c.finish != "cancelled" && c.finish != "error")
      out += sse_event(render_chunk(job.meta, "", c.finish, false, job.include_usage, nullptr, i));
    if (job.done) break;
  }
  if (!job.done) return out;
  if (job.finish == "cancelled" || job.finish == "error") {
    out += sse_event(
        error_body(job.finish == "error"
                       ? HttpError(500, job.error)
                       : HttpError(503, "the server is shutting down", "", "shutting_down")));
  } else if (job.include_usage) {
    out += sse_event(render_usage_chunk(job.meta, job.usage));
  }
  return out + "data: [DONE]\n\n";
}

bool Server::Impl::stream_step(Job& job, httplib::DataSink& sink) {
  try {
    std::string out;
    if (job.meta.endpoint == Endpoint::Chat && !job.role_sent) {
      // Sent before any token so the client sees the response begin while the prompt is queued
      // or prefilled: one per choice.
      job.role_sent = true;
      for (size_t i = 0; i < job.choices.size(); ++i)
        out += sse_event(render_chunk(job.meta, "", "", true, job.include_usage, nullptr,
                                      static_cast<int32_t>(i)));
    } else {
      // Nothing is written while the request is queued or prefilling, so no failed write would
      // tell that the client left: watch the socket meanwhile. Returning false ends the response;
      // the release callback then cancels the request and its blocks go back.
      std::deque<TimedEvent> events;
      if (job.client == INVALID_SOCKET) {
        events = job.ch->take();
      } else {
        while ((events = job.ch->take_for(kClientPoll)).empty())
          if (client_gone(job.client)) return false;
      }
      out = stream_events(job, events);
    }
    if (!out.empty() && !sink.write(out.data(), out.size())) return false;
    if (job.done) sink.done();
    return true;
  } catch (...) {
    return false;  // an exception must not leave httplib's worker thread
  }
}

void Server::Impl::end(Job& job) {
  if (job.ended) return;
  job.ended = true;
  metrics.count_finish(job.finish);
  publish_finished(job);
  std::lock_guard<std::mutex> l(active_mu);
  active.erase(job.id);
}

// ---- the KV view (docs/SERVER.md) ----------------------------------------------------------------

// How long GET /kv/state waits for the scheduler thread to finish its step and build the
// snapshot: a step with a long prefill chunk takes up to ~1 s on a loaded 2-core machine.
constexpr auto kSnapshotWait = std::chrono::seconds(10);
// How often an idle /kv/events stream writes a comment: a client gone is noticed by the failed
// write within this, and a stream ends within it once the server stops.
constexpr auto kEventsHeartbeat = std::chrono::milliseconds(1000);

void Server::Impl::kv_state(httplib::Response& res) {
  const auto snap = sched.kv_snapshot(kSnapshotWait);
  if (!snap)
    throw HttpError(503, "the scheduler did not answer in time (or is stopping); retry", "",
                    "busy");
  res.set_header("Cache-Control", "no-cache");
  res.set_content(dump(kv_state_json(*snap, sched.stats(), model)), "application/json");
}

void Server::Impl::kv_attention(const httplib::Request& req, httplib::Response& res) {
  const AttentionQuery a =
      parse_attention_request(parse_json_body(req.body), tok, model, sched.model().config());
  std::unique_lock<std::mutex> l(map_mu, std::try_to_lock);
  if (!l) throw HttpError(503, "another attention map is being computed; retry", "", "busy");
  if (!map_pool) map_pool = std::make_unique<ThreadPool>(1);
  const AttentionMap map =
      attention_map(sched.model(), a.tokens, a.layer, a.head, a.n_query, *map_pool);
  res.set_content(dump(attention_map_json(map, a.tokens, tok)), "application/json");
}

void Server::Impl::kv_events(httplib::Response& res) {
  auto sub = hub->subscribe();
  if (!sub)
    throw HttpError(503,
                    fmt::format("too many /kv/events streams: at most {} at once",
                                hub->max_subscribers()),
                    "", "too_many_streams");
  res.set_header("Cache-Control", "no-cache");
  auto first = std::make_shared<bool>(true);
  res.set_chunked_content_provider(
      "text/event-stream",
      [this, sub, first](size_t, httplib::DataSink& sink) {
        // A comment first, so the client sees the stream open before any event.
        std::string out = *first ? std::string(": kvlm kv events\n\n") : sub->take(kEventsHeartbeat);
        *first = false;
        if (stopping || sub->closed()) {
          sink.done();
          return true;
        }
        if (out.empty()) out = ": idle\n\n";
        return sink.write(out.data(), out.size());
      },
      [hub = hub, sub](bool) { hub->unsubscribe(sub); });
}

void Server::Impl::serve_asset(httplib::Response& res, const std::string& name) {
  const WebAsset* a = find_web_asset(name);
  if (!a) throw HttpError(404, fmt::format("no such page file: {}", clip(name)), "", "not_found");
  res.set_content(reinterpret_cast<const char*>(a->data), a->size, a->content_type);
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

// ---- routes
// --------------------------------------------------------------------------------------

void Server::Impl::routes() {
  using Req = httplib::Request;
  using Res = httplib::Response;
  auto json_reply = [](Res& res, const json& j) { res.set_content(dump(j), "application/json"); };

  // method -> path -> handler; every other method on a known path answers 405.
  struct Route {
    const char* method;
    const char* path;  // a regex, matched in full
    httplib::Server::Handler handler;
  };
  std::vector<Route> table = {
      {"POST", "/v1/chat/completions",
       guarded([this](const Req& q, Res& r) { generate(q, r, Endpoint::Chat); }, true)},
      {"POST", "/v1/completions",
       guarded([this](const Req& q, Res& r) { generate(q, r, Endpoint::Completion); }, true)},
      {"GET", "/v1/models",
       guarded([this, json_reply](const Req&, Res& r) { json_reply(r, models_list(model)); },
               false)},
      {"GET", "/v1/models/(.+)",
       guarded(
           [this, json_reply](const Req& q, Res& r) {
             if (!serves(model, q.matches[1].str()))
               throw HttpError(404,
                               fmt::format("The model '{}' does not exist; this server serves '{}'",
                                           clip(q.matches[1].str()), clip(model.name())),
                               "model", "model_not_found");
             json_reply(r, model_object(model, q.matches[1].str()));
           },
           false)},
      {"GET", "/health",
       guarded(
           [json_reply](const Req&, Res& r) {
             json_reply(r, {{"status", "ok"}});
           },
           false, true)},
      {"GET", "/metrics",
       guarded(
           [this](const Req&, Res& r) {
             r.set_content(metrics.render(sched.stats()),
                           "text/plain; version=0.0.4; charset=utf-8");
           },
           false)},
      {"GET", "/kv/state", guarded([this](const Req&, Res& r) { kv_state(r); }, false)},
      {"GET", "/kv/events", guarded([this](const Req&, Res& r) { kv_events(r); }, false)},
      {"POST", "/kv/attention",
       guarded([this](const Req& q, Res& r) { kv_attention(q, r); }, false)},
      // The web page: static files with no data in them, open like /health; the page asks for
      // the API key and sends it with every request it makes.
      {"GET", "/", guarded([this](const Req&, Res& r) { serve_asset(r, "index.html"); }, false, true)},
      {"GET", "/web/(.+)",
       guarded([this](const Req& q, Res& r) { serve_asset(r, q.matches[1].str()); }, false, true)},
      {"POST", "/tokenize",
       guarded(
           [this, json_reply](const Req& q, Res& r) {
             json_reply(r, tokenize_response(parse_json_body(q.body), tok));
           },
           false)},
      {"POST", "/detokenize",
       guarded(
           [this, json_reply](const Req& q, Res& r) {
             json_reply(r, detokenize_response(parse_json_body(q.body), tok));
           },
           false)},
  };
  for (const Route& rt : table) {
    const std::string allow = rt.method;
    auto not_allowed = [this, allow](const Req& q, Res& r) {
      r.set_header("Allow", allow);
      reply_error(
          r,
          HttpError(
              405, fmt::format("{} {}: method not allowed (use {})", q.method, clip(q.path), allow),
              "", "method_not_allowed"),
          false);
    };
    const bool post = std::string_view(rt.method) == "POST";
    if (post) {
      http.Post(rt.path, rt.handler);
      http.Get(rt.path, not_allowed);
    } else {
      http.Get(rt.path, rt.handler);
      http.Post(rt.path, not_allowed);
    }
    http.Put(rt.path, not_allowed);
    http.Patch(rt.path, not_allowed);
    http.Delete(rt.path, not_allowed);
  }

  // Errors httplib answers itself (unknown route, body too large, malformed request) get the
  // same JSON shape; responses our handlers already filled are left alone.
  http.set_error_handler(httplib::Server::HandlerWithResponse([this](const Req& q, Res& r) {
    if (!r.body.empty()) return HandlerResponse::Unhandled;
    const HttpError e =
        r.status == 404
            ? HttpError(404, fmt::format("unknown route: {} {}", q.method, clip(q.path)), "",
                        "not_found")
        : r.status == 413 ? too_large(q, opts.max_body)
        : r.status == 414
            ? HttpError(414,
                        fmt::format("the request line (method, path and query) is longer than {} "
                                    "bytes",
                                    CPPHTTPLIB_REQUEST_URI_MAX_LENGTH),
                        "", "uri_too_long")
            : HttpError(r.status, fmt::format("HTTP {}: malformed request", r.status));
    r.set_content(dump(error_body(e)), "application/json");
    return HandlerResponse::Handled;
  }));
  http.set_exception_handler([this](const Req&, Res& r, std::exception_ptr) {
    reply_error(r, HttpError(500, "internal error"), false);
  });
  // httplib enforces --max-body only on bodies with a Content-Length; a chunked upload would grow
  // without bound, so it is refused before it is read.
  http.set_pre_routing_handler([this](const Req& q, Res& r) {
    if (q.get_header_value("Transfer-Encoding").find("chunked") == std::string::npos)
      return HandlerResponse::Unhandled;
    r.set_header("Connection", "close");  // the unread body must not be parsed as a request
    reply_error(r,
                HttpError(411, "chunked request bodies are not accepted: send a Content-Length", "",
                          "length_required"),
                false);
    return HandlerResponse::Handled;
  });
}

// ---- Server
// --------------------------------------------------------------------------------------

constexpr int kListenBacklog = 1024;  // pending connections the kernel queues before accept()
// /kv/events streams at once: each holds one of the HTTP threads while it lasts (a page open is
// one), so a few cannot starve generation requests of threads.
constexpr int kMaxEventStreams = 8;

Server::Server(Scheduler& scheduler, const Tokenizer& tok, ServedModel model, ServerOptions opts)
    : impl_(std::make_unique<Impl>(scheduler, tok, std::move(model), std::move(opts))) {
  Impl& s = *impl_;
  const size_t n_threads = static_cast<size_t>(std::max(1, s.opts.n_http_threads));
  s.http.new_task_queue = [n_threads] { return new httplib::ThreadPool(n_threads); };
  s.http.set_payload_max_length(s.opts.max_body);
  // Nagle off (accepted sockets inherit it from the listening one on Linux): a stream is many
  // small writes, and Nagle holds each one back until the previous segment is acknowledged, which
  // a client delaying its ACKs (Linux: up to 40 ms) turns into a stall. Measured on a keep-alive
  // connection, a streamed request after a non-streamed one: its first SSE line came 48 ms after
  // the headers with Nagle, 1 ms without; a non-streamed body 44 ms after its headers.
  s.http.set_tcp_nodelay(true);
  // httplib's default also sets SO_REUSEPORT, which would let a second server bind the same port
  // and silently take half its connections; SO_REUSEADDR alone still allows a quick restart.
  s.http.set_socket_options([&s](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    s.listen_sock = sock;
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
  impl_->hub->close();
  impl_->sched.watch_kv({});
}

int Server::bind() {
  Impl& s = *impl_;
  errno = 0;
  int port = s.opts.port;
  if (port == 0)
    port = s.http.bind_to_any_port(s.opts.host);
  else if (!s.http.bind_to_port(s.opts.host, port))
    port = -1;
  if (port <= 0)
    fail("cannot listen on {}:{}{}; choose another --host/--port", s.opts.host, s.opts.port,
         errno ? fmt::format(" ({})", std::strerror(errno)) : std::string());
  // Debian's compiled httplib listens with a backlog of 5 (CPPHTTPLIB_LISTEN_BACKLOG): a burst of
  // 16 or 64 clients connecting at once overflowed it and one got a connection reset
  // (bench/serve_bench.py). listen() again on the bound socket raises the backlog (Linux; capped
  // by net.core.somaxconn).
  if (s.listen_sock != INVALID_SOCKET) ::listen(s.listen_sock, kListenBacklog);
  return port;
}

void Server::run() {
  Impl& s = *impl_;
  s.in_run = true;
  const bool ok = s.stopping || s.http.listen_after_bind();
  s.in_run = false;
  if (!ok && !s.stopping)
    fail("serving on {}:{} failed: accepting connections stopped ({})", s.opts.host, s.opts.port,
         std::strerror(errno));
}

void Server::stop() {
  Impl& s = *impl_;
  s.stopping = true;
  s.hub->close();  // event streams end, so httplib's threads can be joined
  {
    std::lock_guard<std::mutex> l(s.active_mu);
    for (RequestId id : s.active) s.sched.cancel(id);
  }
  // httplib's stop() does nothing until listen has started: wait for run() to get there (or to
  // see `stopping` and return).
  while (s.in_run) {
    if (s.http.is_running()) {
      s.http.stop();
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

}  // namespace kvlm::server
