#include "common/log.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace faultline {
namespace {

TEST(Logger, TextLinesAreLogfmtWithQuotedValuesWhereNeeded) {
  Logger log(LogFormat::kText);
  std::string line = log.format_line(LogLevel::kInfo, "session_end",
                                     {{"session", 3}, {"reason", "peer_exited"}, {"error", "bad \"json\" here"}});
  EXPECT_NE(line.find(" level=info event=session_end session=3 reason=peer_exited"), std::string::npos) << line;
  EXPECT_NE(line.find("error=\"bad \\\"json\\\" here\""), std::string::npos) << line;
}

TEST(Logger, JsonLinesParseAndKeepTypes) {
  Logger log(LogFormat::kJson);
  std::string line = log.format_line(LogLevel::kError, "session_fatal",
                                     {{"session", 7u}, {"killed", true}, {"error", "memory file truncated"}});
  auto j = nlohmann::json::parse(line);
  EXPECT_EQ(j["level"], "error");
  EXPECT_EQ(j["event"], "session_fatal");
  EXPECT_EQ(j["session"], 7);
  EXPECT_EQ(j["killed"], true);
  EXPECT_EQ(j["error"], "memory file truncated");
  EXPECT_TRUE(j.contains("ts"));
}

}  // namespace
}  // namespace faultline
