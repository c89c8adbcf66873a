// `kvlm serve`'s HTTP server: routes (OpenAI-compatible chat and completions, streaming by
// server-sent events, /v1/models, /health, /metrics, /tokenize, /detokenize, the KV view) over one
// Scheduler, on the transport in http.h (Boost.Beast/Asio, which stays inside http.cpp).
//
// Threads: a few I/O threads run every connection asynchronously; a route that parses a body or
// waits (generation, /tokenize, /kv/state) runs on one of a few worker threads, which submits to
// the scheduler and returns. The scheduler thread pushes a request's events into its channel,
// which wakes the connection's strand to turn them into chunks or the response (the scheduler
// never waits for HTTP; no thread waits for a token). A client that goes away is seen by the
// connection's watch on its socket (also while queued or prefilling, when nothing is written), and
// its request is cancelled so its blocks go back to the pool at once.
//
// Shutdown (stop()): no new connections or requests; running ones have shutdown_grace_s to finish;
// then every stream gets a final chunk (finish_reason "cancelled") and [DONE], every non-streaming
// request a 503, and run() returns.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "engine/scheduler.h"
#include "server/api.h"
#include "server/http.h"

namespace kvlm::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                    // 0: any free port (bind() says which)
  std::string api_key;                // non-empty: every route but /health wants "Bearer <key>"
  int n_http_threads = 2;             // I/O threads, and as many worker threads
  http::Limits limits;                // body, headers, deadlines, connections (http.h)
  std::string cors_origin;            // non-empty: CORS for this origin ("*": any), preflight
  double shutdown_grace_s = 5;        // stop(): how long running requests may still finish
  // The access log on stderr, one line per request: "text", "json" or "off".
  std::string log_format = "text";
};

class Server {
 public:
  Server(Scheduler& scheduler, const Tokenizer& tok, ServedModel model, ServerOptions opts);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds the listening socket; returns the port (the real one for port 0). kvlm::Error naming
  // the address when it cannot be bound.
  int bind();
  // Serves until stop(). Call after bind(), once. kvlm::Error if accepting fails otherwise.
  void run();
  // From any thread (a signal handler's thread), any number of times, without waiting: refuses
  // new connections and requests, gives the running ones shutdown_grace_s, then ends them (see
  // above) and makes run() return.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvlm::server
