// TestFaultServer: the smallest uffd memory server that lets the client's own
// tests run end to end. NOT faultline's server (that lives in src/); it exists
// so the client can be tested before, and independently of, the real one.
//
// It accepts one connection on a Unix stream socket, reads the handshake
// (reading until the JSON array is complete, fds from any piece), and serves
// every fault on one thread: UFFDIO_COPY of the page from the memory file, or
// of zeros for a page inside any range a REMOVE event named. A knob corrupts
// one page on purpose, so tests can show the Verifier catches it.
//
// Thread safety: the accessors may be called from any thread; construction
// and destruction REQUIRE external synchronization. The serving thread is
// owned and joined by the destructor.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/unique_fd.h"
#include "guest/region.h"

namespace faultline::client::testing {

// Reads a handshake from a connected stream socket until the JSON array is
// complete (it may come in pieces; fds may ride on any piece). Every fd
// received is appended to `fds` (the caller owns them); with `piece_sizes`,
// the byte count of each recvmsg too. Fails on EOF before the array is whole.
Result<std::string> read_handshake(int socket, std::vector<int>& fds, std::vector<size_t>* piece_sizes = nullptr);

struct TestFaultServerOptions {
  // Serve this guest page (file offset) with its byte 100 flipped.
  std::optional<uint64_t> corrupt_page_offset;
};

class TestFaultServer {
 public:
  // Binds and listens on `socket_path` (unlinked first), then serves the first
  // client that connects from `memory_path`.
  static Result<std::unique_ptr<TestFaultServer>> listen(const std::string& socket_path,
                                                         const std::string& memory_path,
                                                         TestFaultServerOptions options = {});

  ~TestFaultServer();
  TestFaultServer(const TestFaultServer&) = delete;
  TestFaultServer& operator=(const TestFaultServer&) = delete;

  uint64_t faults_served() const { return faults_.load(); }
  uint64_t remove_events() const { return removes_.load(); }
  // Number of fds that came with the handshake.
  size_t fds_received() const { return fds_received_.load(); }
  std::string handshake_json() const;
  std::vector<GuestRegion> regions() const;
  // First error of the serving thread, or empty.
  std::string error() const;
  // True once the peer's end of the socket reached EOF.
  bool peer_closed() const { return peer_closed_.load(); }

 private:
  TestFaultServer() = default;
  void run();
  Status receive_handshake();
  Status serve();
  void set_error(std::string what);

  TestFaultServerOptions options_;
  UniqueFd listen_socket_;
  UniqueFd connection_;
  UniqueFd memory_file_;
  UniqueFd uffd_;
  UniqueFd stop_;
  std::string socket_path_;
  std::thread thread_;
  std::atomic<uint64_t> faults_{0};
  std::atomic<uint64_t> removes_{0};
  std::atomic<size_t> fds_received_{0};
  std::atomic<bool> peer_closed_{false};
  mutable std::mutex mutex_;
  std::string json_;                  // GUARDED_BY(mutex_)
  std::vector<GuestRegion> regions_;  // GUARDED_BY(mutex_)
  std::string error_;                 // GUARDED_BY(mutex_)
};

}  // namespace faultline::client::testing
