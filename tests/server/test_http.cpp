// The HTTP transport (src/server/http.h) alone, without routes or a model: what a handler that
// works on another thread sees when its client leaves.
#include "server/http.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <future>
#include <string>
#include <thread>

namespace kvlm::server::http {
namespace {

using namespace std::chrono_literals;

// A client connected to the server on `port` that has sent `request`; -1 on failure.
int send_request(int port, const std::string& request) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd < 0 || ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::send(fd, request.data(), request.size(), 0) != static_cast<ssize_t>(request.size()))
    return -1;
  return fd;
}

Options options() {
  Options o;
  o.port = 0;
  o.n_threads = 1;
  o.n_workers = 1;
  return o;
}

// A server whose handler hands each request to a worker, which waits `delay` (a loaded machine's
// scheduling, made certain) before it registers on_gone, then keeps the request unanswered.
struct SlowHandlerServer {
  explicit SlowHandlerServer(std::chrono::milliseconds delay)
      : srv(options(),
            [this, delay](Request&&, std::shared_ptr<Exchange> ex) {
              srv.offload([this, delay, ex] {
                std::this_thread::sleep_for(delay);
                ex->on_gone([this] { gone.set_value(); });
                registered = true;
              });
            },
            [](int, const std::string&, const std::string&) { return std::string("{}"); }) {
    port = srv.bind();
    io = std::thread([this] { srv.run(); });
  }
  ~SlowHandlerServer() {
    srv.force_stop();
    io.join();
  }
  HttpServer srv;
  int port = 0;
  std::thread io;
  std::promise<void> gone;
  std::atomic<bool> registered{false};
};

const std::string kPost = "POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}";

// on_gone registered after the client left (the close was seen first) still runs: a queued
// generation must be cancelled, not left for no one.
TEST(HttpTransport, OnGoneSetAfterTheClientLeftStillRuns) {
  SlowHandlerServer s(300ms);
  const int fd = send_request(s.port, kPost);
  ASSERT_GE(fd, 0);
  ::close(fd);  // at once, before the handler registered on_gone
  auto f = s.gone.get_future();
  EXPECT_EQ(f.wait_for(10s), std::future_status::ready);
  EXPECT_TRUE(s.registered);
}

// The usual order: registered first, then the client leaves.
TEST(HttpTransport, OnGoneSetBeforeTheClientLeftRuns) {
  SlowHandlerServer s(0ms);
  const int fd = send_request(s.port, kPost);
  ASSERT_GE(fd, 0);
  for (int i = 0; i < 1000 && !s.registered; ++i) std::this_thread::sleep_for(10ms);
  ASSERT_TRUE(s.registered);
  ::close(fd);
  auto f = s.gone.get_future();
  EXPECT_EQ(f.wait_for(10s), std::future_status::ready);
}

}  // namespace
}  // namespace kvlm::server::http
