#include "server/control.h"

#include <exception>
#include <nlohmann/json.hpp>

#include "common/text_escape.h"
#include "server/server.h"

namespace faultline {

namespace {

using nlohmann::json;
using nlohmann::ordered_json;

// Every reply is dumped with invalid UTF-8 replaced (U+FFFD): a session name,
// a path or an error message may quote bytes a client sent.
template <typename J>
std::string dump(const J& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

ordered_json fields_json(const std::vector<LogField>& fields) {
  ordered_json j;
  for (const LogField& f : fields) {
    std::visit([&](const auto& v) { j[std::string(f.key)] = v; }, f.value);
  }
  return j;
}

ordered_json summary_json(const SessionSummary& s) { return fields_json(summary_fields(s)); }

Result<ControlRequest> parse(std::string_view line) {
  // The server cuts a request at 64 KiB before it gets here; the parsed
  // request is never dumped back (nlohmann's serializer recurses once per
  // nesting level, so a hostile "[[[[...]]]]" must never reach it).
  auto req = json::parse(line, nullptr, false);
  if (req.is_discarded() || !req.is_object() || !req.contains("cmd") || !req["cmd"].is_string()) {
    return fail("a request is one JSON object with a \"cmd\" string");
  }
  const std::string& cmd = req["cmd"].get_ref<const std::string&>();
  ControlRequest r;
  if (cmd == "sessions") {
    r.command = ControlRequest::Command::kSessions;
    return r;
  }
  if (cmd == "attachments") {
    r.command = ControlRequest::Command::kAttachments;
    return r;
  }
  // Optional string fields of attach.
  auto optional_string = [&](const char* key, std::string* out) -> Status {
    if (!req.contains(key)) return {};
    if (!req[key].is_string()) return fail(std::string("\"") + key + "\" must be a string");
    *out = req[key].get<std::string>();
    return {};
  };
  if (cmd == "attach" || cmd == "detach") {
    if (!req.contains("socket") || !req["socket"].is_string()) {
      return fail(cmd + " needs \"socket\": a name (or path) in the daemon's --socket-dir");
    }
    r.socket = req["socket"].get<std::string>();
    if (cmd == "detach") {
      r.command = ControlRequest::Command::kDetach;
      return r;
    }
    r.command = ControlRequest::Command::kAttach;
    for (auto [key, out] : {std::pair{"image", &r.image}, {"memory", &r.memory}, {"prefetch", &r.prefetch}}) {
      if (auto st = optional_string(key, out); !st) return std::unexpected(st.error());
    }
    if (r.image.empty() == r.memory.empty()) {
      return fail("attach needs exactly one of \"image\" (STORE/NAME) and \"memory\" (a memory file)");
    }
    return r;
  }
  if (cmd == "snapshot") {
    if (!req.contains("session") || !req["session"].is_number_unsigned()) {
      return fail("snapshot needs \"session\": the id from the session_start log line");
    }
    if (!req.contains("store") || !req["store"].is_string()) {
      return fail("snapshot needs \"store\": the store directory the daemon serves its image from");
    }
    if (!req.contains("name") || !req["name"].is_string()) {
      return fail("snapshot needs \"name\": the name of the new image");
    }
    r.command = ControlRequest::Command::kSnapshot;
    r.session = req["session"].get<uint64_t>();
    r.store = req["store"].get<std::string>();
    r.name = req["name"].get<std::string>();
    return r;
  }
  if (cmd == "page_map" || cmd == "record") {
    if (!req.contains("session") || !req["session"].is_number_unsigned()) {
      return fail(cmd + " needs \"session\": the id from the session_start log line");
    }
    r.session = req["session"].get<uint64_t>();
    if (cmd == "page_map") {
      r.command = ControlRequest::Command::kPageMap;
      if (req.contains("fallback")) {
        if (!req["fallback"].is_boolean()) return fail("\"fallback\" must be true or false");
        r.pagemap_fallback = req["fallback"].get<bool>();
      }
      return r;
    }
    r.command = ControlRequest::Command::kRecord;
    if (!req.contains("name") || !req["name"].is_string()) {
      return fail("record needs \"name\": a file name inside the daemon's --record-dir");
    }
    r.name = req["name"].get<std::string>();
    return r;
  }
  return fail("unknown command \"" + escape_untrusted(cmd, 64) + "\" (known: sessions, page_map, record, snapshot, attach, detach, attachments)");
}

ordered_json attachment_json(const Server::Attachment& a) {
  return ordered_json{{"attachment", a.id},         {"socket", a.socket},
                      {"serves", a.serves},         {"memory_bytes", a.memory_bytes},
                      {"image_layers", a.image_layers}, {"prefetch_pages", a.prefetch_pages},
                      {"prefetch_all", a.prefetch_all}, {"connections", a.connections}};
}

std::string answer(Server& server, const ControlRequest& req) {
  switch (req.command) {
    case ControlRequest::Command::kSessions: {
      ordered_json out;
      out["sessions"] = ordered_json::array();
      for (const SessionSummary& s : server.live_sessions()) out["sessions"].push_back(summary_json(s));
      return dump(out);
    }
    case ControlRequest::Command::kPageMap: {
      auto session = server.session(req.session);
      if (!session) return control_error_reply("no running session " + std::to_string(req.session));
      auto map = session->page_map(req.pagemap_fallback);
      if (!map) return control_error_reply(map.error().describe());
      return map->to_json();
    }
    case ControlRequest::Command::kRecord: {
      auto recorded = server.record(req.session, req.name);
      if (!recorded) return control_error_reply(recorded.error().describe());
      return dump(ordered_json{{"path", recorded->path}, {"pages", recorded->pages}});
    }
    case ControlRequest::Command::kAttach: {
      auto a = server.attach({.socket = req.socket, .image = req.image, .memory = req.memory, .prefetch = req.prefetch});
      if (!a) return control_error_reply(a.error().describe());
      return dump(attachment_json(*a));
    }
    case ControlRequest::Command::kDetach: {
      auto a = server.detach(req.socket);
      if (!a) return control_error_reply(a.error().describe());
      return dump(attachment_json(*a));
    }
    case ControlRequest::Command::kAttachments: {
      ordered_json out;
      out["attachments"] = ordered_json::array();
      for (const Server::Attachment& a : server.attachments()) out["attachments"].push_back(attachment_json(a));
      return dump(out);
    }
    case ControlRequest::Command::kSnapshot: {
      auto r = server.snapshot(req.session, req.store, req.name);
      if (!r) return control_error_reply(r.error().describe());
      return dump(fields_json(snapshot_fields(*r)));
    }
  }
  return control_error_reply("unhandled command");
}

}  // namespace

Result<ControlRequest> parse_control_request(std::string_view line) {
  try {
    return parse(line);
  } catch (const std::exception& e) {
    return fail(std::string("the request could not be processed: ") + e.what());
  }
}

std::string control_error_reply(std::string_view message) {
  try {
    return dump(json{{"error", std::string(message)}});
  } catch (...) {
    return R"({"error":"the error could not be rendered"})";
  }
}

std::string handle_control_request(Server& server, std::string_view line) {
  auto req = parse_control_request(line);
  if (!req) return control_error_reply(req.error().describe());
  try {
    return answer(server, *req);
  } catch (const std::exception& e) {
    return control_error_reply(std::string("internal error: ") + e.what());
  } catch (...) {
    return control_error_reply("internal error");
  }
}

}  // namespace faultline
