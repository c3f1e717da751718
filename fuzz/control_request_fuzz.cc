// Fuzz target: a control-socket request line (the bytes any process that can
// connect to --control sends).
//
// For any input: parse_control_request() returns (no exception, no crash);
// an accepted request names a known command with the fields it needs; every
// error message is printable ASCII (client bytes are escaped, never quoted
// raw); the error reply the daemon would send is one line of valid JSON with
// an "error" string; and the error, logged, gives one clean line in both log
// formats.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "fuzz/fuzz_check.h"
#include "server/control.h"

using namespace faultline;
using faultline::fuzz::printable_ascii;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view line(reinterpret_cast<const char*>(data), size);
  auto request = parse_control_request(line);
  if (request) {
    // What was accepted is what the JSON says.
    auto j = nlohmann::json::parse(line, nullptr, false);
    FUZZ_CHECK(!j.is_discarded() && j.is_object() && j["cmd"].is_string());
    const std::string cmd = j["cmd"];
    switch (request->command) {
      case ControlRequest::Command::kSessions: FUZZ_CHECK(cmd == "sessions"); break;
      case ControlRequest::Command::kPageMap:
        FUZZ_CHECK(cmd == "page_map" && j["session"].is_number_unsigned() && j["session"] == request->session);
        break;
      case ControlRequest::Command::kRecord:
        FUZZ_CHECK(cmd == "record" && j["session"] == request->session && j["name"] == request->name);
        break;
      case ControlRequest::Command::kSnapshot:
        FUZZ_CHECK(cmd == "snapshot" && j["session"] == request->session && j["name"] == request->name &&
                   j["store"] == request->store);
        break;
      case ControlRequest::Command::kAttach:
        FUZZ_CHECK(cmd == "attach" && j["socket"] == request->socket &&
                   (request->image.empty() != request->memory.empty()) &&
                   (request->image.empty() || j["image"] == request->image) &&
                   (request->memory.empty() || j["memory"] == request->memory));
        break;
      case ControlRequest::Command::kDetach: FUZZ_CHECK(cmd == "detach" && j["socket"] == request->socket); break;
      case ControlRequest::Command::kAttachments: FUZZ_CHECK(cmd == "attachments"); break;
    }
    return 0;
  }
  const std::string message = request.error().describe();
  FUZZ_CHECK(printable_ascii(message), message);
  FUZZ_CHECK(message.size() < 512, message);
  const std::string reply = control_error_reply(message);
  FUZZ_CHECK(reply.find('\n') == std::string::npos, reply);
  auto parsed = nlohmann::json::parse(reply, nullptr, false);
  FUZZ_CHECK(!parsed.is_discarded() && parsed.is_object() && parsed["error"].is_string(), reply);
  // The reply is built for any bytes, not only for the parser's messages.
  auto raw = nlohmann::json::parse(control_error_reply(line), nullptr, false);
  FUZZ_CHECK(!raw.is_discarded() && raw["error"].is_string());
  fuzz::check_logged_in_both_formats("control_request_failed", message);
  return 0;
}
