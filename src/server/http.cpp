#include "server/http.h"

#include <fmt/format.h>
#include <sys/socket.h>

#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cerrno>
#include <list>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include "base/error.h"

namespace kvlm::server::http {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;
using boost::system::error_code;

namespace {

constexpr int kListenBacklog = 1024;  // connections the kernel queues before accept()
// After an error answered before its body was read (413, 415), the rest of the body is read and
// dropped, at most this much: closing with unread data would reset the connection, and a client
// still sending its body would then never read the answer. Bounded, and read into a fixed buffer.
constexpr size_t kDrainMax = size_t{64} << 20;
constexpr size_t kDrainChunk = 16 * 1024;
// How long a connection refused by the connection cap may take to receive its 503.
constexpr auto kRefuseTimeout = std::chrono::seconds(2);
// After an accept error (EMFILE: out of descriptors), wait before accepting again.
constexpr auto kAcceptRetry = std::chrono::milliseconds(100);

std::string reason(int status) {
  const auto r = bhttp::obsolete_reason(bhttp::int_to_status(static_cast<unsigned>(status)));
  return r.empty() ? std::string("Status") : std::string(r);
}

std::string seconds_text(std::chrono::milliseconds d) {
  return fmt::format("{:g}", double(d.count()) / 1000.0);
}

}  // namespace

std::string_view Request::header(std::string_view name) const {
  for (const auto& [k, v] : headers)
    if (beast::iequals(k, name)) return v;
  return {};
}

bool Request::has_header(std::string_view name) const {
  for (const auto& [k, v] : headers)
    if (beast::iequals(k, name)) return true;
  return false;
}

struct HttpServer::Impl : std::enable_shared_from_this<HttpServer::Impl> {
  Impl(Options o, Handler h, ErrorBody e)
      : opts(std::move(o)),
        handler(std::move(h)),
        error_body(std::move(e)),
        acceptor(asio::make_strand(ioc)),
        workers(static_cast<size_t>(std::max(1, opts.n_workers))) {}

  const Options opts;
  const Handler handler;
  const ErrorBody error_body;
  asio::io_context ioc;
  // Keeps run() serving while nothing is pending on the sockets (stop_when_idle() drops it).
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> guard{
      asio::make_work_guard(ioc)};
  tcp::acceptor acceptor;
  asio::thread_pool workers;
  std::atomic<bool> stopping{false};
  std::atomic<int> n_open{0};
  std::mutex mu;                                // guards conns
  std::list<std::weak_ptr<Connection>> conns;  // open connections (stop_accepting tells them)

  void accept();
  void refuse_connection(tcp::socket s);
};

// One client connection. Every member runs on its strand (the socket's executor).
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(std::shared_ptr<HttpServer::Impl> srv, tcp::socket s)
      : srv_(std::move(srv)), socket_(std::move(s)), deadline_(socket_.get_executor()) {}

  void start() { next_request(); }
  const tcp::socket::executor_type& executor() { return socket_.get_executor(); }
  std::list<std::weak_ptr<Connection>>::iterator registry;  // its place in Impl::conns

  // Exchange's calls, on the strand; `seq` says which request they answer.
  void do_reply(uint64_t seq, Response r);
  void do_begin_stream(uint64_t seq, Response head);
  void do_write(uint64_t seq, std::string data);
  void do_end(uint64_t seq);
  // The handler registers on_gone from its worker thread, so the client may already have left
  // (gone() ran with nothing to call): then it is called now, else the request would run on for
  // no one (a queued stream would stay queued).
  void do_on_gone(uint64_t seq, std::function<void()> fn) {
    if (current(seq))
      on_gone_ = std::move(fn);
    else if (closed_ && seq == left_seq_ && fn)
      fn();
  }
  void do_note(uint64_t seq, std::string k, std::string v) {
    if (seq == seq_ && !logged_) log_.notes.emplace_back(std::move(k), std::move(v));
  }
  bool current(uint64_t seq) const { return !closed_ && in_exchange_ && seq == seq_ && !ended_; }
  void on_shutdown();
  void abort() { close(); }  // the server is being destroyed (no I/O thread runs)

 private:
  void next_request();
  void on_header(error_code ec);
  void read_body();
  void on_body(error_code ec);
  void read_failed(error_code ec);
  void dispatch();
  void refuse(int status, const std::string& message, const std::string& code, bool linger);
  void watch();
  void on_readable(error_code ec);
  void gone();
  void queue(std::string bytes);
  void flush();
  void finish_exchange();
  void drain();
  void close();
  void arm(std::chrono::milliseconds d, bool reading);
  void disarm() {
    ++arm_gen_;
    deadline_.cancel();
  }
  std::string head(int status, const Headers& h, const std::string& framing) const;

  std::shared_ptr<HttpServer::Impl> srv_;  // first: the io_context outlives the socket
  tcp::socket socket_;
  asio::steady_timer deadline_;
  uint64_t arm_gen_ = 0;  // a deadline that fired after being re-armed is stale
  bool timed_out_ = false;
  beast::flat_buffer buf_;  // bytes read and not yet parsed (a pipelined request's)
  std::optional<bhttp::request_parser<bhttp::string_body>> parser_;
  bool closed_ = false;
  bool keep_alive_ = true;
  unsigned version_ = 11;
  uint64_t seq_ = 0;            // the request being answered (Exchange::seq_)
  bool in_exchange_ = false;    // a request is being answered
  bool responding_ = false;     // its head is queued
  bool chunked_ = false;        // its body is chunked (a stream on HTTP/1.1)
  bool ended_ = false;          // its last byte is queued
  bool linger_ = false;         // its body was not read: drain it before closing
  bool watching_ = false;       // an async_wait for readability is pending
  bool want_next_ = false;      // read the next request once the wait is cancelled
  std::function<void()> on_gone_;
  uint64_t left_seq_ = 0;  // the request its client left unfinished before on_gone was set
  std::string pending_, writing_;  // queued bytes; bytes being written
  bool write_busy_ = false;
  std::vector<char> scratch_;  // drain()'s buffer
  size_t drained_ = 0;
  AccessRecord log_;                      // the request being answered
  bool logged_ = true;                    // its line is written
  std::chrono::steady_clock::time_point t_request_;  // its headers were in (or its read began)
  void begin_log(std::string method, std::string path, std::string_view id);
  void write_log(bool gone);
};

// ---- Exchange -------------------------------------------------------------------------------------

void Exchange::reply(Response r) {
  asio::dispatch(conn_->executor(),
                 [c = conn_, s = seq_, r = std::move(r)]() mutable { c->do_reply(s, std::move(r)); });
}
void Exchange::begin_stream(Response head) {
  asio::dispatch(conn_->executor(), [c = conn_, s = seq_, h = std::move(head)]() mutable {
    c->do_begin_stream(s, std::move(h));
  });
}
void Exchange::write(std::string data) {
  asio::dispatch(conn_->executor(), [c = conn_, s = seq_, d = std::move(data)]() mutable {
    c->do_write(s, std::move(d));
  });
}
void Exchange::end() {
  asio::dispatch(conn_->executor(), [c = conn_, s = seq_] { c->do_end(s); });
}
void Exchange::post(std::function<void()> fn) { asio::dispatch(conn_->executor(), std::move(fn)); }
void Exchange::post_after(std::chrono::milliseconds delay, std::function<void()> fn) {
  auto t = std::make_shared<asio::steady_timer>(conn_->executor(), delay);
  t->async_wait([t, c = conn_, s = seq_, fn = std::move(fn)](error_code) {
    if (c->current(s)) fn();
  });
}
void Exchange::on_gone(std::function<void()> fn) {
  asio::dispatch(conn_->executor(), [c = conn_, s = seq_, fn = std::move(fn)]() mutable {
    c->do_on_gone(s, std::move(fn));
  });
}
void Exchange::note(std::string key, std::string value) {
  asio::dispatch(conn_->executor(), [c = conn_, s = seq_, k = std::move(key),
                                     v = std::move(value)]() mutable {
    c->do_note(s, std::move(k), std::move(v));
  });
}

// ---- reading a request ----------------------------------------------------------------------------

void Connection::arm(std::chrono::milliseconds d, bool reading) {
  const uint64_t gen = ++arm_gen_;
  timed_out_ = false;
  deadline_.expires_after(d);
  deadline_.async_wait([self = shared_from_this(), gen, reading](error_code ec) {
    if (ec || gen != self->arm_gen_ || self->closed_) return;
    // A read ends with operation_aborted and is answered 408; a write has no one to answer.
    if (reading) {
      self->timed_out_ = true;
      error_code ignored;
      self->socket_.cancel(ignored);
    } else {
      self->close();
    }
  });
}

void Connection::next_request() {
  if (closed_) return;
  // Shutting down: a request already received is answered (503), no new one is waited for.
  if (srv_->stopping && buf_.size() == 0) return close();
  parser_.emplace();
  parser_->header_limit(static_cast<uint32_t>(srv_->opts.limits.max_header));
  parser_->body_limit(static_cast<uint64_t>(srv_->opts.limits.max_body));
  arm(srv_->opts.limits.header_timeout, true);
  t_request_ = std::chrono::steady_clock::now();
  bhttp::async_read_header(socket_, buf_, *parser_,
                           [self = shared_from_this()](error_code ec, size_t) { self->on_header(ec); });
}

void Connection::on_header(error_code ec) {
  disarm();
  if (ec) return read_failed(ec);
  t_request_ = std::chrono::steady_clock::now();  // an idle keep-alive wait is not its time
  const auto& req = parser_->get();
  const Limits& lim = srv_->opts.limits;
  version_ = req.version();
  if (req.target().size() > lim.max_target)
    return refuse(414,
                  fmt::format("the request line (method, path and query) is longer than {} bytes",
                              lim.max_target),
                  "uri_too_long", !parser_->is_done());
  const auto coding = req[bhttp::field::content_encoding];
  if (!coding.empty() && !beast::iequals(coding, "identity"))
    return refuse(415,
                  fmt::format("compressed request bodies (Content-Encoding: {}) are not accepted: "
                              "send the body uncompressed",
                              std::string_view(coding.data(), std::min<size_t>(coding.size(), 32))),
                  "unsupported_media_type", !parser_->is_done());
  if (parser_->is_done()) return dispatch();
  if (beast::iequals(req[bhttp::field::expect], "100-continue")) {
    // The client waits for this before sending its body (curl does for large ones).
    auto msg = std::make_shared<std::string>("HTTP/1.1 100 Continue\r\n\r\n");
    arm(lim.write_timeout, false);
    asio::async_write(socket_, asio::buffer(*msg),
                      [self = shared_from_this(), msg](error_code e, size_t) {
                        self->disarm();
                        if (e) return self->close();
                        self->read_body();
                      });
    return;
  }
  read_body();
}

void Connection::read_body() {
  arm(srv_->opts.limits.body_timeout, true);
  bhttp::async_read(socket_, buf_, *parser_,
                    [self = shared_from_this()](error_code ec, size_t) { self->on_body(ec); });
}

void Connection::on_body(error_code ec) {
  disarm();
  if (ec) return read_failed(ec);
  dispatch();
}

void Connection::read_failed(error_code ec) {
  if (closed_) return;
  const Limits& lim = srv_->opts.limits;
  if (timed_out_) {
    // Nothing of a request arrived: an idle keep-alive connection, closed without a word.
    if (!parser_->got_some() && buf_.size() == 0) return close();
    const bool headers_in = parser_->is_header_done();
    return refuse(408,
                  headers_in
                      ? fmt::format("the request body did not arrive within {} s",
                                    seconds_text(lim.body_timeout))
                      : fmt::format("the request headers did not arrive within {} s",
                                    seconds_text(lim.header_timeout)),
                  "request_timeout", false);
  }
  if (ec == bhttp::error::header_limit)
    return refuse(431,
                  fmt::format("the request line and headers are larger than {} bytes",
                              lim.max_header),
                  "request_header_fields_too_large", false);
  if (ec == bhttp::error::body_limit)
    return refuse(413,
                  fmt::format("the request body is larger than the limit of {} bytes (kvlm serve "
                              "--max-body)",
                              lim.max_body),
                  "payload_too_large", true);
  // The client closed or reset the connection, between requests or within one: no one to answer.
  if (ec == bhttp::error::end_of_stream || ec == bhttp::error::partial_message ||
      ec == asio::error::eof || ec == asio::error::connection_reset ||
      ec == asio::error::operation_aborted || ec == asio::error::bad_descriptor)
    return close();
  refuse(400, fmt::format("malformed HTTP request: {}", ec.message()), "bad_request", false);
}

void Connection::dispatch() {
  auto msg = parser_->release();
  keep_alive_ = msg.keep_alive();
  version_ = msg.version();
  Request r;
  r.method = std::string(msg.method_string());
  r.target = std::string(msg.target());
  r.path = r.target.substr(0, r.target.find('?'));
  for (const auto& f : msg) r.headers.emplace_back(f.name_string(), f.value());
  r.body = std::move(msg.body());
  begin_log(r.method, r.path, r.header("X-Request-Id"));
  ++seq_;
  in_exchange_ = true;
  responding_ = ended_ = chunked_ = linger_ = false;
  on_gone_ = nullptr;
  if (srv_->stopping) {
    keep_alive_ = false;
    return do_reply(seq_, Response{503,
                                   {{"Content-Type", "application/json"}, {"Retry-After", "1"}},
                                   srv_->error_body(503, "the server is shutting down",
                                                    "shutting_down")});
  }
  if (!srv_->opts.cors_origin.empty() && r.method == "OPTIONS") {
    // A CORS preflight: answered here, before routing and authentication (browsers send no
    // credentials with it).
    const std::string_view asked = r.header("Access-Control-Request-Headers");
    return do_reply(seq_, Response{204,
                                   {{"Access-Control-Allow-Methods", "GET, POST, OPTIONS"},
                                    {"Access-Control-Allow-Headers",
                                     asked.empty() ? std::string("Authorization, Content-Type")
                                                   : std::string(asked.substr(0, 1024))},
                                    {"Access-Control-Max-Age", "600"}},
                                   {}});
  }
  watch();
  auto ex = std::make_shared<Exchange>(shared_from_this(), seq_);
  try {
    srv_->handler(std::move(r), ex);
  } catch (const std::exception& e) {
    do_reply(seq_, Response{500, {{"Content-Type", "application/json"}},
                            srv_->error_body(500, "internal error", "")});
  }
}

void Connection::refuse(int status, const std::string& message, const std::string& code,
                        bool linger) {
  if (parser_ && parser_->is_header_done()) {
    const auto& h = parser_->get();
    const std::string target(h.target().substr(0, 256));
    begin_log(std::string(h.method_string()), target.substr(0, target.find('?')),
              h["X-Request-Id"]);
  } else {
    begin_log("-", "-", {});
  }
  ++seq_;
  in_exchange_ = true;
  responding_ = ended_ = chunked_ = false;
  keep_alive_ = false;  // what follows in the stream is not a request boundary we can trust
  linger_ = linger;
  on_gone_ = nullptr;
  do_reply(seq_, Response{status, {{"Content-Type", "application/json"}},
                          srv_->error_body(status, message, code)});
}

// ---- watching the client while a request is answered ---------------------------------------------

void Connection::watch() {
  if (watching_ || closed_) return;
  watching_ = true;
  socket_.async_wait(tcp::socket::wait_read,
                     [self = shared_from_this()](error_code ec) { self->on_readable(ec); });
}

void Connection::on_readable(error_code ec) {
  watching_ = false;
  if (closed_) return;
  // The answer ended while this wait was pending (cancelled, or completed before the cancel).
  if (want_next_) {
    want_next_ = false;
    return next_request();
  }
  if (ec == asio::error::operation_aborted || !in_exchange_) return;
  if (ec) return gone();
  // Readable: the client closed (a read would return 0), reset, or sent a pipelined request,
  // which stays in the socket until this response is written.
  char byte;
  const ssize_t n = ::recv(socket_.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  if (n > 0) return;
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return watch();
  gone();
}

void Connection::gone() {
  if (closed_) return;
  auto fn = std::move(on_gone_);
  on_gone_ = nullptr;
  const bool unfinished = in_exchange_ && !ended_;
  if (unfinished && !fn) left_seq_ = seq_;
  close();
  if (fn && unfinished) fn();
  if (in_exchange_) write_log(true);
}

// An X-Request-Id the client sent (printable, at most 64 bytes), else 16 random hex digits.
void Connection::begin_log(std::string method, std::string path, std::string_view id) {
  const bool usable = !id.empty() && id.size() <= 64 &&
                      std::all_of(id.begin(), id.end(), [](char c) { return c > 0x20 && c < 0x7f; });
  thread_local std::mt19937_64 rng(std::random_device{}());
  log_ = AccessRecord{};
  log_.id = usable ? std::string(id) : fmt::format("{:016x}", rng());
  log_.method = std::move(method);
  log_.path = path.size() > 256 ? path.substr(0, 256) + "..." : std::move(path);
  logged_ = false;
}

void Connection::write_log(bool gone) {
  if (logged_) return;
  logged_ = true;
  log_.client_gone = gone;
  log_.total_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() -
                                                            t_request_)
                      .count();
  if (srv_->opts.access_log) srv_->opts.access_log(log_);
}

// ---- writing the response -------------------------------------------------------------------------

std::string Connection::head(int status, const Headers& h, const std::string& framing) const {
  std::string out = fmt::format("HTTP/1.{} {} {}\r\n", version_ == 10 ? 0 : 1, status,
                                reason(status));
  if (!logged_) out += fmt::format("X-Request-Id: {}\r\n", log_.id);
  for (const auto& [k, v] : h) out += fmt::format("{}: {}\r\n", k, v);
  const std::string& cors = srv_->opts.cors_origin;
  if (!cors.empty()) {
    out += fmt::format("Access-Control-Allow-Origin: {}\r\n", cors);
    if (cors != "*") out += "Vary: Origin\r\n";
    out += "Access-Control-Expose-Headers: X-Kvlm-Request-Id, X-Request-Id\r\n";
  }
  out += framing;
  if (!keep_alive_)
    out += "Connection: close\r\n";
  else if (version_ == 10)
    out += "Connection: keep-alive\r\n";
  out += "\r\n";
  return out;
}

void Connection::do_reply(uint64_t seq, Response r) {
  if (!current(seq) || responding_) return;
  responding_ = ended_ = true;
  log_.status = r.status;
  std::string bytes =
      head(r.status, r.headers, fmt::format("Content-Length: {}\r\n", r.body.size()));
  bytes += r.body;
  queue(std::move(bytes));
}

void Connection::do_begin_stream(uint64_t seq, Response h) {
  if (!current(seq) || responding_) return;
  responding_ = true;
  log_.status = h.status;
  chunked_ = version_ >= 11;
  if (!chunked_) keep_alive_ = false;  // HTTP/1.0: the body ends with the connection
  queue(head(h.status, h.headers, chunked_ ? "Transfer-Encoding: chunked\r\n" : ""));
}

void Connection::do_write(uint64_t seq, std::string data) {
  if (!current(seq) || !responding_ || data.empty()) return;
  queue(chunked_ ? fmt::format("{:x}\r\n{}\r\n", data.size(), data) : std::move(data));
}

void Connection::do_end(uint64_t seq) {
  if (!current(seq) || !responding_) return;
  ended_ = true;
  queue(chunked_ ? "0\r\n\r\n" : "");
}

void Connection::queue(std::string bytes) {
  pending_ += bytes;
  flush();
}

void Connection::flush() {
  if (write_busy_ || closed_) return;
  if (pending_.empty()) {
    if (in_exchange_ && ended_) finish_exchange();
    return;
  }
  writing_.swap(pending_);
  pending_.clear();
  write_busy_ = true;
  arm(srv_->opts.limits.write_timeout, false);
  asio::async_write(socket_, asio::buffer(writing_),
                    [self = shared_from_this()](error_code ec, size_t) {
                      self->write_busy_ = false;
                      self->disarm();
                      if (ec) return self->gone();
                      self->writing_.clear();
                      self->flush();
                    });
}

void Connection::finish_exchange() {
  write_log(false);
  in_exchange_ = false;
  on_gone_ = nullptr;
  if (!keep_alive_) return linger_ ? drain() : close();
  if (watching_) {
    want_next_ = true;  // the cancelled wait's handler reads the next request
    error_code ignored;
    socket_.cancel(ignored);
    return;
  }
  next_request();
}

// After a refusal whose body was not read: stop sending, read and drop what the client still
// sends (bounded in bytes and time), then close.
void Connection::drain() {
  if (closed_) return;
  if (scratch_.empty()) {
    error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_send, ignored);
    scratch_.resize(kDrainChunk);
    drained_ = buf_.size();
    buf_.consume(buf_.size());
    arm(srv_->opts.limits.body_timeout, false);
  }
  socket_.async_read_some(asio::buffer(scratch_),
                          [self = shared_from_this()](error_code ec, size_t n) {
                            self->drained_ += n;
                            if (ec || self->drained_ > kDrainMax) return self->close();
                            self->drain();
                          });
}

void Connection::close() {
  if (closed_) return;
  closed_ = true;
  disarm();
  error_code ignored;
  socket_.shutdown(tcp::socket::shutdown_both, ignored);
  socket_.close(ignored);
  std::lock_guard<std::mutex> l(srv_->mu);
  srv_->conns.erase(registry);
  --srv_->n_open;
}

void Connection::on_shutdown() {
  if (closed_) return;
  keep_alive_ = false;
  // Waiting for a request that has not begun: nothing to answer.
  if (!in_exchange_ && parser_ && !parser_->got_some() && buf_.size() == 0) close();
}

// ---- the server -------------------------------------------------------------------------------------

void HttpServer::Impl::accept() {
  acceptor.async_accept(asio::make_strand(ioc), [self = shared_from_this()](error_code ec,
                                                                           tcp::socket s) {
    if (!self->acceptor.is_open() || self->stopping) return;
    if (ec) {
      // Out of descriptors (EMFILE) and the like: retry shortly rather than spin.
      auto t = std::make_shared<asio::steady_timer>(self->acceptor.get_executor(), kAcceptRetry);
      t->async_wait([self, t](error_code) { self->accept(); });
      return;
    }
    error_code ignored;
    // Nagle off: a stream is many small writes, which Nagle would hold back while the client
    // delays its ACKs (measured with httplib before: 48 ms to the first SSE line, 1 ms without).
    s.set_option(tcp::no_delay(true), ignored);
    if (self->n_open.load() >= self->opts.limits.max_connections) {
      self->refuse_connection(std::move(s));
    } else {
      auto c = std::make_shared<Connection>(self, std::move(s));
      {
        std::lock_guard<std::mutex> l(self->mu);
        c->registry = self->conns.insert(self->conns.end(), c);
        ++self->n_open;
      }
      asio::dispatch(c->executor(), [c] { c->start(); });
    }
    self->accept();
  });
}

// One connection over the cap: a 503 it can read, then closed (within kRefuseTimeout).
void HttpServer::Impl::refuse_connection(tcp::socket s) {
  const std::string body = error_body(
      503,
      fmt::format("too many open connections (at most {}, kvlm serve --max-connections); retry",
                  opts.limits.max_connections),
      "too_many_connections");
  auto msg = std::make_shared<std::string>(fmt::format(
      "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: "
      "1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
      body.size(), body));
  auto sock = std::make_shared<tcp::socket>(std::move(s));
  auto timer = std::make_shared<asio::steady_timer>(sock->get_executor(), kRefuseTimeout);
  timer->async_wait([sock](error_code ec) {
    if (!ec) sock->close(ec);
  });
  asio::async_write(*sock, asio::buffer(*msg), [sock, msg, timer](error_code ec, size_t) {
    timer->cancel();
    sock->shutdown(tcp::socket::shutdown_both, ec);
    sock->close(ec);
  });
}

HttpServer::HttpServer(Options opts, Handler handler, ErrorBody error_body)
    : impl_(std::make_shared<Impl>(std::move(opts), std::move(handler), std::move(error_body))) {}

HttpServer::~HttpServer() {
  impl_->workers.join();
  impl_->ioc.stop();
  // Every handler still pending in the stopped context holds its connection, and every
  // connection holds this Impl (so the context): a cycle that would leak them all. Closing the
  // sockets (no I/O thread runs now) makes their operations complete as aborted; running those
  // handlers drops the last references.
  std::vector<std::shared_ptr<Connection>> open;
  {
    std::lock_guard<std::mutex> l(impl_->mu);
    for (const auto& w : impl_->conns)
      if (auto c = w.lock()) open.push_back(std::move(c));
  }
  for (const auto& c : open) c->abort();
  open.clear();
  error_code ignored;
  impl_->acceptor.close(ignored);
  impl_->guard.reset();
  impl_->ioc.restart();
  impl_->ioc.run_for(std::chrono::seconds(1));
}

int HttpServer::bind() {
  Impl& s = *impl_;
  error_code ec;
  tcp::resolver resolver(s.ioc);
  const auto found = resolver.resolve(s.opts.host, std::to_string(s.opts.port),
                                      tcp::resolver::passive | tcp::resolver::numeric_service, ec);
  if (ec || found.empty())
    fail("cannot listen on {}:{} ({}); choose another --host/--port", s.opts.host, s.opts.port,
         ec ? ec.message() : "no such address");
  const tcp::endpoint ep = found.begin()->endpoint();
  s.acceptor.open(ep.protocol(), ec);
  // SO_REUSEADDR allows a quick restart; SO_REUSEPORT is not set, so a second server cannot bind
  // the same port and silently take half its connections.
  if (!ec) s.acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) s.acceptor.bind(ep, ec);
  if (!ec) s.acceptor.listen(kListenBacklog, ec);
  if (ec)
    fail("cannot listen on {}:{} ({}); choose another --host/--port", s.opts.host, s.opts.port,
         ec.message());
  return s.acceptor.local_endpoint().port();
}

void HttpServer::run() {
  Impl& s = *impl_;
  asio::dispatch(s.acceptor.get_executor(), [self = impl_] { self->accept(); });
  std::vector<std::thread> threads;
  for (int i = 1; i < std::max(1, s.opts.n_threads); ++i) threads.emplace_back([&s] { s.ioc.run(); });
  s.ioc.run();
  for (auto& t : threads) t.join();
}

void HttpServer::stop_accepting() {
  Impl& s = *impl_;
  if (s.stopping.exchange(true)) return;
  asio::post(s.acceptor.get_executor(), [self = impl_] {
    error_code ignored;
    self->acceptor.close(ignored);
  });
  std::lock_guard<std::mutex> l(s.mu);
  for (const auto& w : s.conns)
    if (auto c = w.lock()) asio::post(c->executor(), [c] { c->on_shutdown(); });
}

void HttpServer::stop_when_idle() {
  asio::post(impl_->ioc, [self = impl_] { self->guard.reset(); });
}

void HttpServer::force_stop() { impl_->ioc.stop(); }

void HttpServer::offload(std::function<void()> fn) { asio::post(impl_->workers, std::move(fn)); }

int HttpServer::open_connections() const { return impl_->n_open.load(); }

}  // namespace kvlm::server::http
