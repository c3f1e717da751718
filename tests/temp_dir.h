// TempDir: a temporary directory for one test, removed with everything in
// it. Header-only, so that the tests of src/, tests/ and client/ share it
// without a library (includes are rooted at the repository).
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>

namespace faultline::testing {

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/faultline-test-XXXXXX";  // unique per test: ctest -j2 runs tests side by side
    const char* made = ::mkdtemp(tmpl);
    EXPECT_NE(made, nullptr) << "mkdtemp: " << std::strerror(errno);
    path_ = made != nullptr ? made : "/nonexistent-faultline-test-dir";
  }
  // Never throws: a process the test started (a daemon removing its socket
  // at exit) may delete an entry while remove_all walks the directory, and
  // the throwing overload then aborts the test binary (CI under TSan saw
  // "cannot remove all: No such file or directory"). A second pass removes
  // what the first left.
  ~TempDir() {
    std::error_code ec;
    for (int pass = 0; pass < 3; ++pass) {
      std::filesystem::remove_all(path_, ec);
      if (!ec) break;
    }
  }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace faultline::testing
