// faultline's version and the commit it was built from, for `faultline
// --version` and the daemon's server_start log line: which build a host runs.
//
// Thread-safety: pure functions returning static strings.
#pragma once

namespace faultline {

// The project's version (CMakeLists.txt: project(VERSION)), e.g. "0.1.0".
const char* version();
// `git describe --always --dirty` of the source tree when it was built: the
// commit's hash, with "-dirty" when files differed from it; "unknown" when
// built outside a git checkout.
const char* build_commit();

}  // namespace faultline
