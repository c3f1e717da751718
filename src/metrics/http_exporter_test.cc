#include "metrics/http_exporter.h"

#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <thread>

#include <gtest/gtest.h>

#include "common/unique_fd.h"
#include "metrics/http_get.h"

namespace faultline::metrics {
namespace {

using namespace std::chrono_literals;

std::unique_ptr<HttpExporter> start_exporter(HttpExporter::Options o, HttpExporter::RenderFn render) {
  if (o.address.empty()) o.address = "127.0.0.1:0";
  auto e = HttpExporter::start(o, std::move(render));
  EXPECT_TRUE(e) << e.error().describe();
  return e ? std::move(*e) : nullptr;
}

size_t thread_count() {
  size_t n = 0;
  if (DIR* d = ::opendir("/proc/self/task")) {
    while (dirent* e = ::readdir(d)) n += e->d_name[0] != '.';
    ::closedir(d);
  }
  return n;
}

TEST(ListenAddress, ParsesHostPortAndBracketedIpv6) {
  auto a = parse_listen_address("127.0.0.1:9464");
  ASSERT_TRUE(a) << a.error().describe();
  EXPECT_EQ(a->host, "127.0.0.1");
  EXPECT_EQ(a->port, 9464);
  auto b = parse_listen_address("[::1]:80");
  ASSERT_TRUE(b) << b.error().describe();
  EXPECT_EQ(b->host, "::1");
  EXPECT_EQ(b->port, 80);
  EXPECT_EQ(b->to_string(), "[::1]:80");
  auto c = parse_listen_address("localhost:0");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->port, 0);
}

TEST(ListenAddress, RejectsWhatIsNotHostColonPort) {
  for (const char* bad : {"", "9464", ":9464", "127.0.0.1", "127.0.0.1:", "127.0.0.1:65536", "127.0.0.1:-1",
                          "127.0.0.1:94a", "::1:9464", "[::1]", "[::1]9464", "[::1:9464", "[127.0.0.1]:9464"}) {
    auto r = parse_listen_address(bad);
    EXPECT_FALSE(r) << "'" << bad << "' was accepted";
    if (!r) {
      EXPECT_NE(r.error().message.find("HOST:PORT"), std::string::npos) << r.error().message;
    }
  }
}

TEST(HttpExporter, ServesTheRenderedPageOnGetMetricsAsPrometheusText) {
  auto e = start_exporter({}, [] { return std::string("# TYPE x counter\nx 1\n"); });
  ASSERT_TRUE(e);
  EXPECT_NE(e->address().port, 0);
  auto r = http_get(e->address(), "/metrics");
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->status, 200) << r->head;
  EXPECT_EQ(r->header("Content-Type"), "text/plain; version=0.0.4");
  EXPECT_EQ(r->body, "# TYPE x counter\nx 1\n");
  EXPECT_EQ(r->header("Connection"), "close");
  // A query string is not part of the path.
  auto q = http_get(e->address(), "/metrics?name[]=x");
  ASSERT_TRUE(q) << q.error().describe();
  EXPECT_EQ(q->status, 200);
}

TEST(HttpExporter, EveryOtherPathOrMethodIsNotFound) {
  auto e = start_exporter({}, [] { return std::string("x\n"); });
  ASSERT_TRUE(e);
  for (const char* path : {"/", "/metrics/", "/metricsx", "/favicon.ico", "/../metrics"}) {
    auto r = http_get(e->address(), path);
    ASSERT_TRUE(r) << path << ": " << r.error().describe();
    EXPECT_EQ(r->status, 404) << path;
  }
  auto post = http_exchange(e->address(), "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
  ASSERT_TRUE(post) << post.error().describe();
  EXPECT_EQ(post->status, 404);
}

TEST(HttpExporter, ServesIpv6Loopback) {
  auto e = HttpExporter::start({.address = "[::1]:0"}, [] { return std::string("x\n"); });
  if (!e && e.error().code == EADDRNOTAVAIL) GTEST_SKIP() << "no IPv6 loopback here: " << e.error().describe();
  ASSERT_TRUE(e) << e.error().describe();
  EXPECT_EQ((*e)->address().host, "::1");
  auto r = http_get((*e)->address(), "/metrics");
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->status, 200);
}

TEST(HttpExporter, AnAddressItCannotBindIsAClearError) {
  auto first = start_exporter({}, [] { return std::string(); });
  ASSERT_TRUE(first);
  auto second = HttpExporter::start({.address = first->address().to_string()}, [] { return std::string(); });
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error().code, EADDRINUSE) << second.error().describe();
  EXPECT_NE(second.error().describe().find(first->address().to_string()), std::string::npos)
      << second.error().describe();
  // An address not on this host.
  auto foreign = HttpExporter::start({.address = "192.0.2.1:9464"}, [] { return std::string(); });
  ASSERT_FALSE(foreign);
  EXPECT_EQ(foreign.error().code, EADDRNOTAVAIL) << foreign.error().describe();
  auto syntax = HttpExporter::start({.address = "nonsense"}, [] { return std::string(); });
  ASSERT_FALSE(syntax);
}

// Whatever bytes a client sends, the exporter answers or closes, never
// crashes or hangs, and keeps serving the next scrape.
TEST(HttpExporter, HostileRequestsNeitherCrashNorWedgeIt) {
  HttpExporter::Options o;
  o.deadline = 2s;
  o.max_request_bytes = 4096;
  std::atomic<int> renders{0};
  auto e = start_exporter(o, [&] {
    renders.fetch_add(1);
    return std::string("x 1\n");
  });
  ASSERT_TRUE(e);
  const std::string long_path(20000, 'a');
  std::string header_flood = "GET /metrics HTTP/1.1\r\n";
  for (int i = 0; i < 2000; ++i) header_flood += "X-" + std::to_string(i) + ": y\r\n";
  header_flood += "\r\n";
  const std::vector<std::pair<const char*, std::string>> requests = {
      {"garbage", "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all"},
      {"invalid UTF-8 in the path", "GET /metrics\xff\xfe\xc3\x28 HTTP/1.1\r\nHost: x\r\n\r\n"},
      {"invalid UTF-8 in a header", "GET /metrics HTTP/1.1\r\nHost: \xff\xc0\xaf\r\n\r\n"},
      {"NUL bytes", std::string("GET /met\0rics HTTP/1.1\r\nHost: x\0\r\n\r\n", 36)},
      {"percent garbage", "GET /%zz%00%ff%c3%28 HTTP/1.1\r\nHost: x\r\n\r\n"},
      {"path beyond the URI limit", "GET /" + long_path + " HTTP/1.1\r\nHost: x\r\n\r\n"},
      {"header flood beyond the request limit", header_flood},
      {"huge Content-Length", "GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n"},
      {"negative Content-Length", "GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\nabc"},
      {"body beyond the limit", "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + std::string(100000, 'b')},
      {"bad chunked body", "POST /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzzzz\r\nabc\r\n"},
      {"huge chunk size", "POST /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n"},
      {"huge Range", "GET /metrics HTTP/1.1\r\nHost: x\r\nRange: bytes=99999999999999999999999-99999999999999999999999\r\n\r\n"},
      {"inverted Range", "GET /metrics HTTP/1.1\r\nHost: x\r\nRange: bytes=9-1,-,5-\r\n\r\n"},
      {"many Ranges", "GET /metrics HTTP/1.1\r\nHost: x\r\nRange: bytes=" + std::string(3000, '1') + "\r\n\r\n"},
      {"header without a colon", "GET /metrics HTTP/1.1\r\nthis is not a header\r\n\r\n"},
      {"unknown method", "BREW /metrics HTTP/1.1\r\nHost: x\r\n\r\n"},
      {"HTTP/0.9 request line", "GET /metrics\r\n\r\n"},
      {"HTTP/2 preface", std::string("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")},
      {"bare newlines", "GET /metrics HTTP/1.1\nHost: x\n\n"},
      {"nothing at all", ""},
      {"Expect 100-continue", "PUT /metrics HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n"},
      {"Accept-Encoding gzip", "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip, br, deflate\r\n\r\n"},
  };
  for (const auto& [why, bytes] : requests) {
    auto r = http_exchange(e->address(), bytes, 30s);
    // A reply or a closed connection are both fine; a hang is not.
    EXPECT_TRUE(r) << why << ": " << r.error().describe();
    auto good = http_get(e->address(), "/metrics");
    ASSERT_TRUE(good) << "after " << why << ": " << good.error().describe();
    EXPECT_EQ(good->status, 200) << "after " << why;
  }
  EXPECT_GE(renders.load(), static_cast<int>(requests.size()));
}

// A render that throws (it never should) costs that scrape a 500, not the
// daemon its life.
TEST(HttpExporter, AThrowingRenderIsA500) {
  std::atomic<bool> throw_next{true};
  auto e = start_exporter({}, [&]() -> std::string {
    if (throw_next.exchange(false)) throw std::runtime_error("render failed");
    return "x 1\n";
  });
  ASSERT_TRUE(e);
  auto r = http_get(e->address(), "/metrics");
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->status, 500);
  auto again = http_get(e->address(), "/metrics");
  ASSERT_TRUE(again) << again.error().describe();
  EXPECT_EQ(again->status, 200);
}

// A client that sends a byte now and then defeats per-read timeouts; the
// exporter's deadline covers the whole request, so it is dropped.
TEST(HttpExporter, AClientThatTricklesItsRequestIsDroppedAtTheDeadline) {
  HttpExporter::Options o;
  o.threads = 1;  // the trickler would otherwise hold the only thread forever
  o.deadline = 500ms;
  auto e = start_exporter(o, [] { return std::string("x 1\n"); });
  ASSERT_TRUE(e);
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(e->address().port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  const std::string start = "GET /metrics HTTP/1.1\r\nX-Slow: ";
  ASSERT_EQ(::send(fd.get(), start.data(), start.size(), MSG_NOSIGNAL), static_cast<ssize_t>(start.size()));
  bool dropped = false;
  // Up to 60 s of trickling (the deadline is 0.5 s): pacing, not ordering.
  for (int i = 0; i < 600 && !dropped; ++i) {
    if (::send(fd.get(), "a", 1, MSG_NOSIGNAL) != 1) {
      dropped = true;
      break;
    }
    char c;
    const ssize_t n = ::recv(fd.get(), &c, 1, MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN)) dropped = true;
    std::this_thread::sleep_for(100ms);
  }
  EXPECT_TRUE(dropped) << "the trickling client was never dropped";
  auto r = http_get(e->address(), "/metrics");
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->status, 200);
}

// A client that asks and never reads the reply cannot hold the one serving
// thread: the next scrape is served once the deadline drops it.
TEST(HttpExporter, AClientThatNeverReadsItsReplyIsDropped) {
  HttpExporter::Options o;
  o.threads = 1;
  o.deadline = 500ms;
  // The first reply is far more than socket buffers hold (the send buffer
  // grows to tcp_wmem's 4 MiB), so writing it blocks; later ones are small,
  // so the second client's read takes no time worth speaking of.
  std::atomic<int> renders{0};
  const std::string big(8 << 20, 'x');
  auto e = start_exporter(o, [&] { return renders.fetch_add(1) == 0 ? big : std::string("x 1\n"); });
  ASSERT_TRUE(e);
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  const int small = 4096;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(e->address().port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  const std::string req = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
  ASSERT_EQ(::send(fd.get(), req.data(), req.size(), MSG_NOSIGNAL), static_cast<ssize_t>(req.size()));
  while (renders.load() == 0) std::this_thread::yield();  // the stalled request is being answered
  // Never read `fd`. With one thread, this scrape is served only after the
  // stalled one was given up.
  auto r = http_get(e->address(), "/metrics", 60s);
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "x 1\n");
  // The stalled client got a part of its reply, then the connection closed.
  std::string got;
  char buf[65536];
  ::fcntl(fd.get(), F_SETFL, 0);
  timeval tv{30, 0};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  for (;;) {
    const ssize_t n = ::recv(fd.get(), buf, sizeof buf, 0);
    if (n <= 0) break;
    got.append(buf, static_cast<size_t>(n));
  }
  EXPECT_LT(got.size(), big.size()) << "the whole reply got through: nothing was stalled";
}

// Many connections that send nothing: the exporter's threads stay what
// they were, and a scrape is served once the idle ones are dropped.
TEST(HttpExporter, AFloodOfIdleConnectionsUsesNoMoreThreads) {
  HttpExporter::Options o;
  o.deadline = 200ms;
  o.max_queued = 4;
  auto e = start_exporter(o, [] { return std::string("x 1\n"); });
  ASSERT_TRUE(e);
  // Let the pool come up: one scrape is served by it.
  ASSERT_TRUE(http_get(e->address(), "/metrics"));
  const size_t threads_before = thread_count();
  std::vector<UniqueFd> idle;
  for (int i = 0; i < 40; ++i) {
    UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(e->address().port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    (void)::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr);  // may be EINPROGRESS
    idle.push_back(std::move(fd));
  }
  EXPECT_EQ(thread_count(), threads_before);
  auto r = http_get(e->address(), "/metrics", 60s);
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(thread_count(), threads_before);
}

TEST(HttpExporter, StopsPromptlyWithConnectionsInProgress) {
  HttpExporter::Options o;
  o.deadline = 60s;  // far longer than the test may take: stopping must not wait for it
  auto e = start_exporter(o, [] { return std::string("x\n"); });
  ASSERT_TRUE(e);
  std::vector<UniqueFd> idle;
  for (int i = 0; i < 4; ++i) {
    UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(e->address().port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    idle.push_back(std::move(fd));
  }
  e.reset();  // returns: the idle connections are dropped, the threads joined
  for (auto& fd : idle) {
    char c;
    // Closed by the server: EOF (or a reset), not a block.
    ::fcntl(fd.get(), F_SETFL, 0);
    timeval tv{30, 0};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    const ssize_t n = ::recv(fd.get(), &c, 1, 0);
    EXPECT_TRUE(n == 0 || (n < 0 && errno == ECONNRESET)) << "n=" << n << " " << std::strerror(errno);
  }
}

TEST(HttpExporter, StartAndStopManyTimesNeverHangs) {
  for (int i = 0; i < 50; ++i) {
    auto e = start_exporter({}, [] { return std::string("x\n"); });
    ASSERT_TRUE(e);
  }
}

}  // namespace
}  // namespace faultline::metrics
