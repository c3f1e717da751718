#include "common/text_escape.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace faultline {
namespace {

TEST(TextEscape, JsonQuoteEscapesControlsAndReplacesEachInvalidByte) {
  EXPECT_EQ(json_quote("plain"), "\"plain\"");
  EXPECT_EQ(json_quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
  EXPECT_EQ(json_quote("\n\t\r\b\f"), "\"\\n\\t\\r\\b\\f\"");
  EXPECT_EQ(json_quote(std::string("\0\x01\x1f\x7f", 4)), "\"\\u0000\\u0001\\u001f\\u007f\"");
  EXPECT_EQ(json_quote("\xff"), "\"\\ufffd\"");
  EXPECT_EQ(json_quote("\xc0\x80"), "\"\\ufffd\\ufffd\"");
  EXPECT_EQ(json_quote("\xc2\x85"), "\"\\u0085\"");
  EXPECT_EQ(json_quote("\xe2\x80\xa8\xe2\x80\xa9"), "\"\\u2028\\u2029\"");
  EXPECT_EQ(json_quote("caf\xc3\xa9 \xe2\x82\xac"), "\"caf\xc3\xa9 \xe2\x82\xac\"");
}

TEST(TextEscape, JsonQuoteOfEveryTwoByteSequenceParses) {
  for (int a = 0; a < 256; ++a) {
    for (int b = 0; b < 256; ++b) {
      const std::string in{static_cast<char>(a), static_cast<char>(b)};
      const std::string quoted = json_quote(in);
      ASSERT_TRUE(is_valid_utf8(quoted)) << a << " " << b;
      auto parsed = nlohmann::json::parse(quoted, nullptr, false);
      ASSERT_TRUE(parsed.is_string()) << a << " " << b << " " << escape_untrusted(quoted);
      if (is_valid_utf8(in)) {
        EXPECT_EQ(parsed.get<std::string>(), in) << a << " " << b;
      }
    }
  }
}

TEST(TextEscape, Utf8ValidationFollowsTheUnicodeTable) {
  EXPECT_TRUE(is_valid_utf8(""));
  EXPECT_TRUE(is_valid_utf8("\x7f"));
  EXPECT_TRUE(is_valid_utf8("\xc2\x80"));
  EXPECT_TRUE(is_valid_utf8("\xdf\xbf"));
  EXPECT_TRUE(is_valid_utf8("\xe0\xa0\x80"));
  EXPECT_TRUE(is_valid_utf8("\xed\x9f\xbf"));
  EXPECT_TRUE(is_valid_utf8("\xee\x80\x80"));
  EXPECT_TRUE(is_valid_utf8("\xf0\x90\x80\x80"));
  EXPECT_TRUE(is_valid_utf8("\xf4\x8f\xbf\xbf"));
  EXPECT_FALSE(is_valid_utf8("\x80"));
  EXPECT_FALSE(is_valid_utf8("\xc1\xbf"));          // overlong
  EXPECT_FALSE(is_valid_utf8("\xe0\x9f\xbf"));      // overlong
  EXPECT_FALSE(is_valid_utf8("\xed\xa0\x80"));      // surrogate
  EXPECT_FALSE(is_valid_utf8("\xf0\x8f\xbf\xbf"));  // overlong
  EXPECT_FALSE(is_valid_utf8("\xf4\x90\x80\x80"));  // > U+10FFFF
  EXPECT_FALSE(is_valid_utf8("\xf8\x88\x80\x80\x80"));
  EXPECT_FALSE(is_valid_utf8("\xe2\x82"));          // truncated
}

TEST(TextEscape, EscapeUntrustedIsPrintableAsciiAndKeepsByteValues) {
  EXPECT_EQ(escape_untrusted("[{\"a\":\"\xff\"}]"), "[{\\\"a\\\":\\\"\\xff\\\"}]");
  EXPECT_EQ(escape_untrusted(std::string("a\0\n\x1b", 4)), "a\\x00\\n\\x1b");
  EXPECT_EQ(escape_untrusted("caf\xc3\xa9"), "caf\\xc3\\xa9");
  EXPECT_EQ(escape_untrusted("abcdef", 3), "abc...");
  std::string every;
  for (int b = 0; b < 256; ++b) every += static_cast<char>(b);
  for (char c : escape_untrusted(every, 1000)) {
    EXPECT_TRUE(c >= 0x20 && c < 0x7f) << int(c);
  }
}

TEST(TextEscape, HexLowerIsTwoLowerCaseDigitsPerByte) {
  const uint8_t bytes[] = {0x00, 0x0f, 0xa5, 0xff, 0x10};
  EXPECT_EQ(hex_lower(bytes), "000fa5ff10");
  EXPECT_EQ(hex_lower({}), "");
}

}  // namespace
}  // namespace faultline
