#include "protocol/handshake.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

namespace faultline::protocol {
namespace {

using ::testing::HasSubstr;

// Addresses as Firecracker prints them: mmap results high in the x86-64 user
// address space.
constexpr uint64_t kBase = 140137000000000ull - (140137000000000ull % kPageSize2M);

std::string error_of(std::string_view json) {
  auto result = parse_handshake_json(json);
  EXPECT_FALSE(result.has_value()) << "expected an error for " << json;
  return result.has_value() ? std::string() : result.error().message;
}

std::string region(const std::string& fields) { return "{" + fields + "}"; }

std::string base_fields(uint64_t base, uint64_t size, uint64_t offset) {
  return "\"base_host_virt_addr\":" + std::to_string(base) + ",\"size\":" + std::to_string(size) +
         ",\"offset\":" + std::to_string(offset);
}

// ----- Firecracker generations ---------------------------------------------

TEST(ParseHandshakeJson, ParsesV1_1FormatWithoutPageSizeAs4KiB) {
  std::string json = "[" + region(base_fields(kBase, 128 << 20, 0)) + "]";
  auto parsed = parse_handshake_json(json);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
  EXPECT_EQ(parsed->format, HandshakeFormat::kNoPageSize);
  ASSERT_EQ(parsed->regions.size(), 1u);
  EXPECT_EQ(parsed->regions[0], (GuestRegion{kBase, 128 << 20, 0, kPageSize4K}));
}

TEST(ParseHandshakeJson, ParsesV1_7FormatWithPageSizeKibHoldingBytes) {
  std::string json = "[" + region(base_fields(kBase, 256 << 20, 0) + ",\"page_size_kib\":4096") + "]";
  auto parsed = parse_handshake_json(json);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
  EXPECT_EQ(parsed->format, HandshakeFormat::kPageSizeKibOnly);
  EXPECT_EQ(parsed->regions[0].page_size, kPageSize4K);
}

TEST(ParseHandshakeJson, ParsesV1_12FormatWithBothFields) {
  std::string json =
      "[" + region(base_fields(kBase, 512 << 20, 0) + ",\"page_size\":4096,\"page_size_kib\":4096") + "]";
  auto parsed = parse_handshake_json(json);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
  EXPECT_EQ(parsed->format, HandshakeFormat::kBothFields);
  EXPECT_EQ(parsed->regions[0], (GuestRegion{kBase, 512 << 20, 0, kPageSize4K}));
}

TEST(ParseHandshakeJson, ParsesHugePagesInBothFieldsAsBytes) {
  std::string json = "[" +
                     region(base_fields(kBase, 1ull << 30, 0) +
                            ",\"page_size\":2097152,\"page_size_kib\":2097152") +
                     "]";
  auto parsed = parse_handshake_json(json);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
  EXPECT_EQ(parsed->regions[0].page_size, kPageSize2M);
}

TEST(ParseHandshakeJson, ParsesHugePagesInPageSizeKibOnly) {
  std::string json = "[" + region(base_fields(kBase, 1ull << 30, 0) + ",\"page_size_kib\":2097152") + "]";
  auto parsed = parse_handshake_json(json);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
  EXPECT_EQ(parsed->format, HandshakeFormat::kPageSizeKibOnly);
  EXPECT_EQ(parsed->regions[0].page_size, kPageSize2M);
}

TEST(ParseHandshakeJson, AcceptsPageSizeAloneAsNonFirecrackerFormat) {
  std::string json = "[" + region(base_fields(kBase, 1 << 20, 0) + ",\"page_size\":4096") + "]";
  auto parsed = parse_handshake_json(json);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
  EXPECT_EQ(parsed->format, HandshakeFormat::kPageSizeOnly);
}

TEST(ParseHandshakeJson, ParsesTwoRegionsAroundTheMmioHoleWithCumulativeOffsets) {
  // An x86 VM with 4 GiB: 3 GiB below the MMIO hole, 1 GiB above 4 GiB; the
  // memory file holds them back to back.
  const uint64_t low = 3ull << 30, high = 1ull << 30;
  const uint64_t second_base = kBase + (8ull << 30);
  std::string tail = ",\"page_size\":4096,\"page_size_kib\":4096";
  std::string json = "[" + region(base_fields(kBase, low, 0) + tail) + "," +
                     region(base_fields(second_base, high, low) + tail) + "]";
  auto parsed = parse_handshake_json(json);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
  ASSERT_EQ(parsed->regions.size(), 2u);
  EXPECT_EQ(parsed->regions[0], (GuestRegion{kBase, low, 0, kPageSize4K}));
  EXPECT_EQ(parsed->regions[1], (GuestRegion{second_base, high, low, kPageSize4K}));
}

TEST(ParseHandshakeJson, ParsesThreeRegionsInOrder) {
  std::string json = "[" + region(base_fields(0x10000000, 0x1000, 0)) + "," +
                     region(base_fields(0x20000000, 0x3000, 0x1000)) + "," +
                     region(base_fields(0x30000000, 0x2000, 0x4000)) + "]";
  auto parsed = parse_handshake_json(json);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
  ASSERT_EQ(parsed->regions.size(), 3u);
  EXPECT_EQ(parsed->regions[2].offset, 0x4000u);
  EXPECT_EQ(parsed->regions[2].size, 0x2000u);
}

TEST(ParseHandshakeJson, IgnoresUnknownFields) {
  std::string json = "[" +
                     region("\"future\":{\"nested\":[1,2,\"]\"]},\"name\":\"dram\"," +
                            base_fields(kBase, 4096, 0) + ",\"flags\":-1") +
                     "]";
  auto parsed = parse_handshake_json(json);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
  EXPECT_EQ(parsed->regions[0].size, 4096u);
}

TEST(ParseHandshakeJson, AcceptsWhitespaceAndFieldOrder) {
  std::string json = " [ {\n \"offset\" : 0 ,\t\"size\":8192, \"base_host_virt_addr\": 65536 } ]\n";
  auto parsed = parse_handshake_json(json);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
  EXPECT_EQ(parsed->regions[0], (GuestRegion{65536, 8192, 0, kPageSize4K}));
}

TEST(ParseHandshakeJson, AcceptsValuesUpToUint64MaxWhenTheyDoNotOverflow) {
  // Offsets are u64 in Firecracker; a value this large is unusual but legal.
  const uint64_t offset = UINT64_MAX - 4095 - 4096;
  std::string json = "[" + region(base_fields(kBase, 4096, offset)) + "]";
  auto parsed = parse_handshake_json(json);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
  EXPECT_EQ(parsed->regions[0].offset, offset);
}

TEST(HandshakeFormatName, NamesEveryGeneration) {
  EXPECT_STREQ(to_string(HandshakeFormat::kNoPageSize), "v1.1-1.6 (no page-size field)");
  EXPECT_STREQ(to_string(HandshakeFormat::kPageSizeKibOnly), "v1.7-1.11 (page_size_kib)");
  EXPECT_STREQ(to_string(HandshakeFormat::kBothFields), "v1.12+ (page_size and page_size_kib)");
  EXPECT_NE(to_string(HandshakeFormat::kPageSizeOnly), nullptr);
}

// ----- bad input ------------------------------------------------------------

TEST(ParseHandshakeJson, RejectsMalformedJsonWithTheParseError) {
  EXPECT_THAT(error_of("[{\"size\":,}]"), HasSubstr("not valid JSON"));
  EXPECT_THAT(error_of("[{\"size\":,}]"), HasSubstr("syntax error"));
}

TEST(ParseHandshakeJson, RejectsTruncatedJson) {
  std::string json = "[" + region(base_fields(kBase, 4096, 0)) + "]";
  EXPECT_THAT(error_of(json.substr(0, json.size() / 2)), HasSubstr("not valid JSON"));
  EXPECT_THAT(error_of(""), HasSubstr("not valid JSON"));
}

TEST(ParseHandshakeJson, RejectsNonArray) {
  EXPECT_THAT(error_of(region(base_fields(kBase, 4096, 0))), HasSubstr("must be an array of regions, got object"));
  EXPECT_THAT(error_of("42"), HasSubstr("got number"));
  EXPECT_THAT(error_of("\"[]\""), HasSubstr("got string"));
}

TEST(ParseHandshakeJson, RejectsEmptyArray) { EXPECT_THAT(error_of("[]"), HasSubstr("empty array")); }

TEST(ParseHandshakeJson, RejectsRegionThatIsNotAnObject) {
  std::string json = "[" + region(base_fields(kBase, 4096, 0)) + ",[1,2,3]]";
  std::string message = error_of(json);
  EXPECT_THAT(message, HasSubstr("region 1 is not a JSON object"));
  EXPECT_THAT(message, HasSubstr("an array of 3 elements"));
}

TEST(ParseHandshakeJson, RejectsNegativeNumberNamingRegionAndField) {
  std::string message = error_of("[{\"base_host_virt_addr\":4096,\"size\":-4096,\"offset\":0}]");
  EXPECT_THAT(message, HasSubstr("region 0: field \"size\""));
  EXPECT_THAT(message, HasSubstr("unsigned 64-bit integer, got -4096"));
}

TEST(ParseHandshakeJson, RejectsFloatNumber) {
  EXPECT_THAT(error_of("[{\"base_host_virt_addr\":4096.0,\"size\":4096,\"offset\":0}]"),
              HasSubstr("region 0: field \"base_host_virt_addr\" must be an unsigned 64-bit integer"));
  EXPECT_THAT(error_of("[{\"base_host_virt_addr\":4096,\"size\":4e3,\"offset\":0}]"),
              HasSubstr("field \"size\""));
}

TEST(ParseHandshakeJson, RejectsNumberAsString) {
  EXPECT_THAT(error_of("[{\"base_host_virt_addr\":4096,\"size\":4096,\"offset\":\"0\"}]"),
              HasSubstr("region 0: field \"offset\" must be an unsigned 64-bit integer, got \"0\""));
}

TEST(ParseHandshakeJson, RejectsNullBoolAndObjectValues) {
  EXPECT_THAT(error_of("[{\"base_host_virt_addr\":null,\"size\":4096,\"offset\":0}]"), HasSubstr("got null"));
  EXPECT_THAT(error_of("[{\"base_host_virt_addr\":4096,\"size\":true,\"offset\":0}]"), HasSubstr("got true"));
  EXPECT_THAT(error_of("[{\"base_host_virt_addr\":4096,\"size\":4096,\"offset\":0,\"page_size\":{}}]"),
              HasSubstr("field \"page_size\""));
}

TEST(ParseHandshakeJson, RejectsEachMissingRequiredFieldNamingIt) {
  EXPECT_THAT(error_of("[{\"size\":4096,\"offset\":0}]"),
              HasSubstr("region 0: field \"base_host_virt_addr\" is missing"));
  EXPECT_THAT(error_of("[{\"base_host_virt_addr\":4096,\"offset\":0}]"),
              HasSubstr("region 0: field \"size\" is missing"));
  std::string json = "[" + region(base_fields(kBase, 4096, 0)) + ",{\"base_host_virt_addr\":4096,\"size\":4096}]";
  EXPECT_THAT(error_of(json), HasSubstr("region 1: field \"offset\" is missing"));
}

TEST(ParseHandshakeJson, RejectsPageSizeInKibibytesNamingAllowedValues) {
  std::string message = error_of("[" + region(base_fields(kBase, 4096, 0) + ",\"page_size_kib\":4") + "]");
  EXPECT_THAT(message, HasSubstr("region 0: field \"page_size_kib\" is 4"));
  EXPECT_THAT(message, HasSubstr("4096 and 2097152"));
}

TEST(ParseHandshakeJson, RejectsUnsupportedPageSize) {
  EXPECT_THAT(error_of("[" + region(base_fields(kBase, 1ull << 30, 0) + ",\"page_size\":1073741824,"
                                                                        "\"page_size_kib\":1073741824") + "]"),
              HasSubstr("field \"page_size\" is 1073741824"));
  EXPECT_THAT(error_of("[" + region(base_fields(kBase, 4096, 0) + ",\"page_size\":0") + "]"),
              HasSubstr("field \"page_size\" is 0"));
}

TEST(ParseHandshakeJson, RejectsDisagreeingPageSizeFields) {
  std::string message = error_of(
      "[" + region(base_fields(kBase, 1ull << 30, 0) + ",\"page_size\":4096,\"page_size_kib\":2097152") + "]");
  EXPECT_THAT(message, HasSubstr("region 0: fields \"page_size\" (4096) and \"page_size_kib\" (2097152) disagree"));
}

TEST(ParseHandshakeJson, RejectsRegionsWithDifferentPageSizeFields) {
  std::string json = "[" + region(base_fields(kBase, 4096, 0) + ",\"page_size\":4096,\"page_size_kib\":4096") +
                     "," + region(base_fields(kBase + 8192, 4096, 4096)) + "]";
  EXPECT_THAT(error_of(json), HasSubstr("region 1: page-size fields (no page-size field) differ from region 0"));
}

TEST(ParseHandshakeJson, RejectsZeroSize) {
  EXPECT_THAT(error_of("[" + region(base_fields(kBase, 0, 0)) + "]"), HasSubstr("region 0: field \"size\" is 0"));
}

TEST(ParseHandshakeJson, RejectsValueAboveUint64Max) {
  // 2^64 does not fit a u64: nlohmann reads it as a float, which is rejected.
  EXPECT_THAT(error_of("[{\"base_host_virt_addr\":18446744073709551616,\"size\":4096,\"offset\":0}]"),
              HasSubstr("region 0: field \"base_host_virt_addr\" must be an unsigned 64-bit integer"));
}

TEST(ParseHandshakeJson, RejectsRegionWrappingTheAddressSpace) {
  std::string message = error_of("[" + region(base_fields(UINT64_MAX - 4095, 8192, 0)) + "]");
  EXPECT_THAT(message, HasSubstr("region 0: field \"size\""));
  EXPECT_THAT(message, HasSubstr("overflows 64 bits"));
}

TEST(ParseHandshakeJson, RejectsOffsetPlusSizeOverflow) {
  std::string message = error_of("[" + region(base_fields(kBase, 8192, UINT64_MAX - 4095)) + "]");
  EXPECT_THAT(message, HasSubstr("added to \"offset\""));
}

TEST(ParseHandshakeJson, RejectsUnalignedBaseOrSize) {
  EXPECT_THAT(error_of("[" + region(base_fields(kBase + 1, 4096, 0)) + "]"),
              HasSubstr("region 0: field \"base_host_virt_addr\""));
  EXPECT_THAT(error_of("[" + region(base_fields(kBase, 4097, 0)) + "]"),
              HasSubstr("region 0: field \"size\" (4097) is not a multiple of the page size 4096"));
  EXPECT_THAT(error_of("[" + region(base_fields(kBase, 4096, 0) + ",\"page_size_kib\":2097152") + "]"),
              HasSubstr("not a multiple of the page size 2097152"));
}

TEST(ParseHandshakeJson, RejectsDeeplyNestedInputWithoutCrashing) {
  std::string json(100000, '[');
  json += std::string(100000, ']');
  EXPECT_FALSE(parse_handshake_json(json).has_value());
}

// ----- hostile bytes in error messages --------------------------------------

// Every byte a client sent that ends up in an error message is escaped: the
// message is printable ASCII, so no log format or JSON reply can choke on it.
void expect_printable_ascii(const std::string& message) {
  for (size_t i = 0; i < message.size(); ++i) {
    const auto c = static_cast<unsigned char>(message[i]);
    ASSERT_TRUE(c >= 0x20 && c < 0x7f) << "byte " << int(c) << " at " << i << " of the message";
  }
}

TEST(ParseHandshakeJson, InvalidUtf8IsQuotedEscapedInTheError) {
  const std::string message = error_of("[{\"a\":\"\xff\"}]");
  expect_printable_ascii(message);
  EXPECT_THAT(message, HasSubstr("not valid JSON"));
  EXPECT_THAT(message, HasSubstr("\\xff")) << message;
}

TEST(ParseHandshakeJson, EveryHostileByteSequenceGivesAPrintableAsciiError) {
  const std::vector<std::string> hostile = {
      "[{\"a\":\"\xff\"}]",                                        // invalid UTF-8 in a value
      "[{\"\xff\":1}]",                                            // ... in a key
      "[{\"size\":\xff}]",                                         // ... where a number goes
      "[{\"size\":4\xc3\xa9}]",                                    // valid UTF-8 inside a number
      std::string("[{\"a\":\"\0\"}]", 11),                         // NUL in a string
      std::string("[\0]", 3),                                      // NUL between tokens
      "[{\"a\":\"\xc0\x80\"}]",                                    // overlong NUL
      "[{\"a\":\"\xe0\x80\xaf\"}]",                                // overlong '/'
      "[{\"a\":\"\xed\xa0\x80\"}]",                                // encoded surrogate
      "[{\"a\":\"\\ud800\"}]",                                     // escaped lone surrogate
      "[{\"a\":\"\xf4\x90\x80\x80\"}]",                            // above U+10FFFF
      "[{\"a\":\"\x1b[2J\"}]",                                     // terminal escape, raw
      "[{\"a\":\"" + std::string(1 << 20, 'x') + "\xff\"}]",       // a 1 MiB token
      "[{\"base_host_virt_addr\":\"\\u0000\\u001b\\n\\u2028\",\"size\":4096,\"offset\":0}]",
      "[{\"base_host_virt_addr\":\"" + std::string(1000, 'y') + "\",\"size\":4096,\"offset\":0}]",
      "[1e999999]",                                                // number overflow (out_of_range)
      "\xef\xbb\xbf[{\"a\":1}]",                                   // byte order mark
  };
  for (const std::string& json : hostile) {
    const std::string message = error_of(json);
    expect_printable_ascii(message);
    EXPECT_LT(message.size(), 600u) << "a message must stay one readable line";
    const CompletenessScan scan = scan_json_array(json);
    expect_printable_ascii(scan.reason);
  }
}

TEST(ParseHandshakeJson, RefusesWhatTheSocketScanRefusesANulOrAByteOrderMark) {
  // Found by fuzz/handshake_fuzz.cc: nlohmann alone accepted both.
  const std::string good = "[" + region(base_fields(kBase, 4096, 0)) + "]";
  ASSERT_TRUE(parse_handshake_json(good).has_value());
  EXPECT_THAT(error_of(good + std::string("\0junk", 5)), HasSubstr("NUL byte at byte " + std::to_string(good.size())));
  EXPECT_THAT(error_of("\xef\xbb\xbf" + good), HasSubstr("byte order mark"));
  EXPECT_EQ(json_array_completeness(good + std::string("\0", 1)), Completeness::kInvalid);
  EXPECT_EQ(json_array_completeness("\xef\xbb\xbf" + good), Completeness::kInvalid);
}

TEST(ParseHandshakeJson, StringValuesAreShownEscapedAndCut) {
  const std::string message =
      error_of("[{\"base_host_virt_addr\":\"a\\u0000b\\u001b" + std::string(100, 'z') + "\",\"size\":4096,\"offset\":0}]");
  EXPECT_THAT(message, HasSubstr("got \"a\\x00b\\x1bzzz"));
  EXPECT_THAT(message, HasSubstr("zzz...\""));
}

TEST(ScanJsonArray, ReasonsNameHostileBytesInHex) {
  EXPECT_THAT(scan_json_array("\xff[").reason, HasSubstr("byte 0 is 0xff"));
  EXPECT_THAT(scan_json_array(std::string("[]\0", 3)).reason, HasSubstr("byte 2 is 0x00"));
}

// ----- completeness ----------------------------------------------------------

TEST(JsonArrayCompleteness, EmptyOrWhitespaceIsIncomplete) {
  EXPECT_EQ(json_array_completeness(""), Completeness::kIncomplete);
  EXPECT_EQ(json_array_completeness(" \n\t"), Completeness::kIncomplete);
}

TEST(JsonArrayCompleteness, EveryStrictPrefixOfARealHandshakeIsIncomplete) {
  std::string json = "[" + region(base_fields(kBase, 4096, 0) + ",\"page_size\":4096,\"page_size_kib\":4096") +
                     "," + region(base_fields(kBase + 8192, 4096, 4096) + ",\"page_size\":4096,\"page_size_kib\":4096") +
                     "]";
  for (size_t n = 0; n < json.size(); ++n) {
    EXPECT_EQ(json_array_completeness(std::string_view(json).substr(0, n)), Completeness::kIncomplete) << n;
  }
  EXPECT_EQ(json_array_completeness(json), Completeness::kComplete);
}

TEST(JsonArrayCompleteness, TrailingWhitespaceIsComplete) {
  EXPECT_EQ(json_array_completeness("  [1]\r\n "), Completeness::kComplete);
}

TEST(JsonArrayCompleteness, BracketsInsideStringsDoNotCount) {
  EXPECT_EQ(json_array_completeness("[{\"name\":\"]]]\"}"), Completeness::kIncomplete);
  EXPECT_EQ(json_array_completeness("[{\"name\":\"]]]\"}]"), Completeness::kComplete);
  EXPECT_EQ(json_array_completeness("[\"[[[{{\"]"), Completeness::kComplete);
}

TEST(JsonArrayCompleteness, EscapedQuotesDoNotEndStrings) {
  EXPECT_EQ(json_array_completeness(R"(["a\"]")"), Completeness::kIncomplete);
  EXPECT_EQ(json_array_completeness(R"(["a\"]"])"), Completeness::kComplete);
  // An escaped backslash, then a real closing quote.
  EXPECT_EQ(json_array_completeness(R"(["a\\"])"), Completeness::kComplete);
  EXPECT_EQ(json_array_completeness(R"(["a\\\"]"])"), Completeness::kComplete);
  // Buffer ends right after a backslash: the next byte is escaped, not known yet.
  EXPECT_EQ(json_array_completeness(R"(["a\)"), Completeness::kIncomplete);
}

TEST(JsonArrayCompleteness, NonArrayStartIsInvalid) {
  EXPECT_EQ(json_array_completeness("{\"size\":1}"), Completeness::kInvalid);
  EXPECT_EQ(json_array_completeness(" x"), Completeness::kInvalid);
  EXPECT_EQ(json_array_completeness("]"), Completeness::kInvalid);
  EXPECT_THAT(scan_json_array("  {").reason, HasSubstr("byte 2 is '{'"));
}

TEST(JsonArrayCompleteness, ClosingBeyondTheArrayIsInvalid) {
  EXPECT_EQ(json_array_completeness("[1]]"), Completeness::kInvalid);
  EXPECT_EQ(json_array_completeness("[1] [2]"), Completeness::kInvalid);
  EXPECT_THAT(scan_json_array("[1]x").reason, HasSubstr("after the end of the region array"));
}

TEST(JsonArrayCompleteness, MismatchedBracketIsInvalid) {
  EXPECT_EQ(json_array_completeness("[}"), Completeness::kInvalid);
  EXPECT_EQ(json_array_completeness("[{]"), Completeness::kInvalid);
}

TEST(JsonArrayCompleteness, CompleteDoesNotMeanValid) {
  EXPECT_EQ(json_array_completeness("[1,,]"), Completeness::kComplete);
  EXPECT_FALSE(parse_handshake_json("[1,,]").has_value());
}

}  // namespace
}  // namespace faultline::protocol
