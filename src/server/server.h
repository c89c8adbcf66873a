// `kvlm serve`'s HTTP server: cpp-httplib routes over one Scheduler (OpenAI-compatible chat and
// completions, streaming by server-sent events, /v1/models, /health, /metrics, /tokenize,
// /detokenize). httplib stays inside server.cpp.
//
// Threads: httplib's pool runs one connection per thread; a generation request's thread submits
// to the scheduler and then waits on that request's event channel, which the scheduler thread
// fills (a mutex, a deque and a condition variable: the scheduler never waits for HTTP). A
// streaming client that goes away makes the next write fail; a non-streaming one is seen by
// polling its socket while the handler waits (every 50 ms and at each event). Either way the
// request is then cancelled so its blocks go back to the pool at once.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "engine/scheduler.h"
#include "server/api.h"

namespace kvlm::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                    // 0: any free port (bind() says which)
  std::string api_key;                // non-empty: every route but /health wants "Bearer <key>"
  size_t max_body = size_t{1} << 20;  // bytes; larger request bodies get 413
  int n_http_threads = 72;            // connections served at once; more wait in httplib's queue
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
  // From any thread (a signal handler's thread), any number of times: refuses new requests,
  // cancels the running ones (their streams end at once) and makes run() return.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvlm::server
