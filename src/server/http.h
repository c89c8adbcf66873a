// `kvlm serve`'s HTTP/1.1 transport on Boost.Beast (parser) and Boost.Asio (sockets, timers):
// asynchronous connections on a few threads, every limit enforced while reading. Routes and JSON
// live above it (server.cpp); Boost stays inside http.cpp.
//
// What a connection enforces, before anything is buffered beyond it:
//   - request line + headers: Limits::max_header bytes (431); a request target over max_target
//     bytes gets 414;
//   - body: max_body bytes, by Content-Length before reading and by the bytes received whatever
//     the transfer coding, chunked included (413, naming --max-body);
//   - Content-Encoding other than identity: 415 (a compressed body would inflate past max_body);
//   - deadlines: header_timeout from the first byte a request waits for (an idle keep-alive
//     connection is closed silently, a partial request gets 408), body_timeout for the body
//     (408), write_timeout for each write (the connection is closed);
//   - at most max_connections open connections: one more is answered 503 and closed.
// Keep-alive and pipelining: requests on a connection are answered one after the other, in order.
// While a request is being answered the connection watches its socket, so a client that goes
// away is seen at once (Exchange::on_gone) even when nothing is being written.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kvlm::server::http {

struct Limits {
  size_t max_body = size_t{1} << 20;   // bytes (413)
  size_t max_header = 16 * 1024;       // request line + headers, bytes (431)
  size_t max_target = 8192;            // the request target (path and query), bytes (414)
  std::chrono::milliseconds header_timeout{10'000};  // idle keep-alive / headers (408)
  std::chrono::milliseconds body_timeout{30'000};    // the body once the headers are in (408)
  std::chrono::milliseconds write_timeout{60'000};   // one write to a client that does not read
  int max_connections = 1024;  // open connections; one more gets 503 and is closed
};

using Headers = std::vector<std::pair<std::string, std::string>>;

struct Request {
  std::string method;  // "GET", "POST", ... as sent
  std::string target;  // "/v1/models/x?y=1"
  std::string path;    // the target without its query
  Headers headers;     // as sent, in order
  std::string body;    // at most Limits::max_body bytes, transfer coding removed
  // The first header named `name` (case-insensitive); "" when there is none.
  std::string_view header(std::string_view name) const;
  bool has_header(std::string_view name) const;
};

struct Response {
  int status = 200;
  Headers headers;   // Content-Length, Transfer-Encoding, Connection are the transport's
  std::string body;  // ignored by Exchange::begin_stream
};

class Connection;

// One request's answer. Thread-safe: every call runs on the connection's strand (at once when
// called from it, else posted), in the order called. Either reply() once, or begin_stream(), any
// number of write()s and end(). Calls after the client went away do nothing.
class Exchange {
 public:
  explicit Exchange(std::shared_ptr<Connection> c, uint64_t seq) : conn_(std::move(c)), seq_(seq) {}
  void reply(Response r);
  void begin_stream(Response head);  // a chunked response (HTTP/1.0: a body ended by close)
  void write(std::string data);
  void end();
  // Runs fn on the connection's strand (a stream's work: events to chunks), now when on it.
  void post(std::function<void()> fn);
  // Runs fn on the strand after `delay`, unless the exchange is over by then.
  void post_after(std::chrono::milliseconds delay, std::function<void()> fn);
  // fn runs once on the strand if the client goes away (or a write fails) before the response
  // ended; set it before the first write. Not run when the response ends normally. Set after the
  // client already left (a handler on a worker thread can be that late), it runs at once.
  void on_gone(std::function<void()> fn);
  // A field for this request's access-log line (AccessRecord::notes), in the order noted.
  void note(std::string key, std::string value);

 private:
  std::shared_ptr<Connection> conn_;
  uint64_t seq_;  // which of the connection's requests this answers
};

using Handler = std::function<void(Request&&, std::shared_ptr<Exchange>)>;

// One answered (or abandoned) request, for the access log.
struct AccessRecord {
  std::string id;      // the request's X-Request-Id (echoed in the response), else one made up
  std::string method;  // "-" when the request line was not read
  std::string path;
  int status = 0;      // 0: no answer began (the client went away first)
  bool client_gone = false;  // the client went away before the answer ended
  double total_ms = 0;       // from its headers received to its answer's last byte
  Headers notes;             // Exchange::note's fields
};
// The body of an error the transport answers itself (status, message, OpenAI error code).
using ErrorBody = std::function<std::string(int status, const std::string& message,
                                            const std::string& code)>;

struct Options {
  std::string host = "127.0.0.1";
  int port = 8080;  // 0: any free port
  int n_threads = 2;  // I/O threads: each runs many connections
  int n_workers = 4;  // threads for offload()
  Limits limits;
  // Non-empty: CORS on; every response allows this origin ("*": any) and OPTIONS is answered as
  // a preflight (204) before routing.
  std::string cors_origin;
  // Called once per request on its connection's strand when its answer is written or abandoned.
  std::function<void(const AccessRecord&)> access_log;
};

class HttpServer {
 public:
  // handler runs on an I/O thread, on the connection's strand: it must not block (hand slow work
  // to another thread and answer through the Exchange from there).
  HttpServer(Options opts, Handler handler, ErrorBody error_body);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds and listens; returns the port (the real one for port 0). kvlm::Error naming the
  // address when it cannot.
  int bind();
  // Serves on n_threads threads (this one among them) until stop_when_idle() and every
  // connection has closed, or until force_stop().
  void run();
  // From any thread: no new connections, idle connections closed, new requests on open ones get
  // 503 shutting_down and a close; requests being answered carry on.
  void stop_accepting();
  // From any thread, after stop_accepting(): run() returns once no connection is open (before, it
  // waits even with nothing to do: a worker may still be preparing an answer).
  void stop_when_idle();
  // From any thread: run() returns now; connections still open are dropped.
  void force_stop();
  // Runs fn on one of n_workers threads, for a handler's slow part (JSON, tokenizing, waiting on
  // the scheduler): the I/O threads never block. Queued when all are busy.
  void offload(std::function<void()> fn);
  int open_connections() const;

  struct Impl;  // public only so that http.cpp's connections can name it

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace kvlm::server::http
