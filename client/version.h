// FirecrackerVersion: which Firecracker release the test client imitates.
//
// The uffd handshake changed between releases (DESIGN.md §2): v1.1–1.6 send no
// page-size field, v1.7–1.11 send "page_size_kib", v1.12+ send "page_size" and
// "page_size_kib"; before v1.12 Firecracker closes the socket right after
// sending, from v1.12 on it keeps it open for its whole life. This value type
// answers those questions with a proper numeric comparison ("1.9" < "1.12").
//
// A plain value; safe to copy and to share between threads.
#pragma once

#include <compare>
#include <string>
#include <string_view>

#include "common/error.h"

namespace faultline::client {

struct FirecrackerVersion {
  int major = 1;
  int minor = 14;

  // Parses "1.14", "v1.14" or "1.14.2" (the patch level changes nothing the
  // client imitates and is ignored).
  static Result<FirecrackerVersion> parse(std::string_view text);

  // major > M || (major == M && minor >= m): numeric, never textual, so that
  // 1.9 is older than 1.12.
  bool at_least(int m, int n) const { return major > m || (major == m && minor >= n); }

  // v1.7 added "page_size_kib" to the handshake (it holds bytes despite its name).
  bool sends_page_size_kib() const { return at_least(1, 7); }
  // v1.12 added "page_size" beside "page_size_kib".
  bool sends_page_size() const { return at_least(1, 12); }
  // Before v1.12 Firecracker closed its end right after the sendmsg; since
  // v1.12 it never closes it, so EOF tells the server that Firecracker exited.
  bool keeps_socket_open() const { return at_least(1, 12); }

  std::string to_string() const { return std::to_string(major) + "." + std::to_string(minor); }

  friend auto operator<=>(const FirecrackerVersion&, const FirecrackerVersion&) = default;
};

}  // namespace faultline::client
