#include "server/control.h"

#include <nlohmann/json.hpp>

#include "server/server.h"

namespace faultline {

namespace {

nlohmann::ordered_json summary_json(const SessionSummary& s) {
  nlohmann::ordered_json j;
  for (const LogField& f : summary_fields(s)) {
    std::visit([&](const auto& v) { j[std::string(f.key)] = v; }, f.value);
  }
  return j;
}

std::string error_json(const std::string& message) { return nlohmann::json{{"error", message}}.dump(); }

}  // namespace

std::string handle_control_request(const Server& server, std::string_view request) {
  auto req = nlohmann::json::parse(request, nullptr, false);
  if (req.is_discarded() || !req.is_object() || !req.contains("cmd") || !req["cmd"].is_string()) {
    return error_json("a request is one JSON object with a \"cmd\" string");
  }
  const std::string cmd = req["cmd"];
  if (cmd == "sessions") {
    nlohmann::ordered_json out;
    out["sessions"] = nlohmann::ordered_json::array();
    for (const SessionSummary& s : server.live_sessions()) out["sessions"].push_back(summary_json(s));
    return out.dump();
  }
  if (cmd == "page_map") {
    if (!req.contains("session") || !req["session"].is_number_unsigned()) {
      return error_json("page_map needs \"session\": the id from the session_start log line");
    }
    auto session = server.session(req["session"].get<uint64_t>());
    if (!session) return error_json("no running session " + std::to_string(req["session"].get<uint64_t>()));
    auto map = session->page_map(req.value("fallback", false));
    if (!map) return error_json(map.error().describe());
    return map->to_json();
  }
  if (cmd == "record") {
    if (!req.contains("session") || !req["session"].is_number_unsigned() || !req.contains("path") ||
        !req["path"].is_string()) {
      return error_json("record needs \"session\" and \"path\"");
    }
    auto session = server.session(req["session"].get<uint64_t>());
    if (!session) return error_json("no running session " + std::to_string(req["session"].get<uint64_t>()));
    if (auto st = session->write_record(req["path"].get<std::string>()); !st) return error_json(st.error().describe());
    return nlohmann::json{{"path", req["path"]}, {"pages", session->recorded_pages()}}.dump();
  }
  return error_json("unknown command \"" + cmd + "\" (known: sessions, page_map, record)");
}

}  // namespace faultline
