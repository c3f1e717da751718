#include "metrics/exposition.h"

#include <cmath>

#include <gtest/gtest.h>

namespace faultline::metrics {
namespace {

TEST(Exposition, WhatTheWriterRendersParsesBackToTheSameValues) {
  ExpositionWriter w;
  w.family("demo_things_total", "counter", "Things counted.");
  w.sample("demo_things_total", {{"kind", "a"}}, uint64_t{7});
  w.sample("demo_things_total", {{"kind", "b"}}, uint64_t{18446744073709551615ull});
  w.family("demo_level", "gauge", "A level.");
  w.sample("demo_level", {}, 0.25);
  HistogramCounts h;
  h.buckets[0] = 1;
  h.buckets[3] = 2;
  h.buckets[kLatencyBuckets - 1] = 1;
  h.sum_ns = 700 + 2 * 8'000 + 30'000'000'000ull;
  w.family("demo_seconds", "histogram", "Durations.");
  w.histogram("demo_seconds", {{"path", "x"}}, h);

  auto families = parse_exposition(w.text());
  ASSERT_TRUE(families) << families.error().describe() << "\n" << w.text();
  ASSERT_EQ(families->size(), 3u);
  EXPECT_EQ((*families)[0].help, "Things counted.");
  EXPECT_EQ((*families)[0].type, "counter");
  EXPECT_EQ(*sample_value(*families, "demo_things_total", {{"kind", "a"}}), 7);
  EXPECT_EQ(*sample_value(*families, "demo_things_total", {{"kind", "b"}}), 18446744073709551615.0);
  EXPECT_EQ(*sample_value(*families, "demo_level"), 0.25);
  const Family* hist = find_family(*families, "demo_seconds");
  ASSERT_NE(hist, nullptr);
  EXPECT_EQ(hist->samples.size(), kLatencyBuckets + 2);
  auto ok = check_histogram(*hist);
  EXPECT_TRUE(ok) << ok.error().describe();
  EXPECT_EQ(*sample_value(*families, "demo_seconds_bucket", {{"path", "x"}, {"le", "0.000001"}}), 1);
  EXPECT_EQ(*sample_value(*families, "demo_seconds_bucket", {{"path", "x"}, {"le", "0.00001"}}), 3);  // cumulative
  EXPECT_EQ(*sample_value(*families, "demo_seconds_bucket", {{"path", "x"}, {"le", "+Inf"}}), 4);
  EXPECT_EQ(*sample_value(*families, "demo_seconds_count", {{"path", "x"}}), 4);
  EXPECT_DOUBLE_EQ(*sample_value(*families, "demo_seconds_sum", {{"path", "x"}}), 30.0000167);
}

TEST(Exposition, CounterAndGaugeAreAFamilyOfOneUnlabelledSample) {
  ExpositionWriter w;
  w.counter("demo_events_total", "Events seen.", 42);
  w.gauge("demo_bytes", "Bytes held.", 4096);
  EXPECT_EQ(w.text(),
            "# HELP demo_events_total Events seen.\n# TYPE demo_events_total counter\ndemo_events_total 42\n"
            "# HELP demo_bytes Bytes held.\n# TYPE demo_bytes gauge\ndemo_bytes 4096\n");
  ExpositionWriter by_hand;
  by_hand.family("demo_events_total", "counter", "Events seen.");
  by_hand.sample("demo_events_total", {}, uint64_t{42});
  by_hand.family("demo_bytes", "gauge", "Bytes held.");
  by_hand.sample("demo_bytes", {}, uint64_t{4096});
  EXPECT_EQ(w.text(), by_hand.text());
}

TEST(Exposition, LabelValuesAreEscaped) {
  ExpositionWriter w;
  w.family("demo_total", "counter", "Escapes.");
  w.sample("demo_total", {{"v", "a\"b\\c\nd"}}, uint64_t{1});
  EXPECT_NE(w.text().find(R"(demo_total{v="a\"b\\c\nd"} 1)"), std::string::npos) << w.text();
  auto families = parse_exposition(w.text());
  ASSERT_TRUE(families) << families.error().describe();
  EXPECT_EQ((*families)[0].samples[0].label("v"), "a\"b\\c\nd");
}

TEST(Exposition, SpecialValuesAndTimestampsParse) {
  auto families = parse_exposition(
      "# TYPE x gauge\nx{a=\"1\"} +Inf\nx{a=\"2\"} -Inf\nx{a=\"3\"} NaN\nx{a=\"4\"} 1.5e3 1700000000000\n\n# other comment\n");
  ASSERT_TRUE(families) << families.error().describe();
  EXPECT_TRUE(std::isinf(*sample_value(*families, "x", {{"a", "1"}})));
  EXPECT_TRUE(std::isnan(*sample_value(*families, "x", {{"a", "3"}})));
  EXPECT_EQ(*sample_value(*families, "x", {{"a", "4"}}), 1500);
}

// The parser is strict: a scrape that passes it is well-formed.
TEST(Exposition, MalformedTextIsRejectedWithTheLineNamed) {
  const std::vector<std::pair<const char*, std::string>> bad = {
      {"no final newline", "# TYPE x counter\nx 1"},
      {"sample before any TYPE", "x 1\n"},
      {"sample of another family", "# TYPE x counter\ny 1\n"},
      {"counter with a _bucket suffix", "# TYPE x counter\nx_bucket 1\n"},
      {"bad metric name", "# TYPE 1x counter\n1x 1\n"},
      {"bad label name", "# TYPE x counter\nx{1a=\"v\"} 1\n"},
      {"unquoted label value", "# TYPE x counter\nx{a=v} 1\n"},
      {"unterminated label set", "# TYPE x counter\nx{a=\"v\" 1\n"},
      {"unknown escape", "# TYPE x counter\nx{a=\"\\t\"} 1\n"},
      {"label twice", "# TYPE x counter\nx{a=\"1\",a=\"2\"} 1\n"},
      {"value not a number", "# TYPE x counter\nx one\n"},
      {"no value", "# TYPE x counter\nx\n"},
      {"two spaces", "# TYPE x counter\nx  1\n"},
      {"bad timestamp", "# TYPE x counter\nx 1 soon\n"},
      {"duplicate series", "# TYPE x counter\nx{a=\"1\"} 1\nx{a=\"1\"} 2\n"},
      {"unknown type", "# TYPE x meter\nx 1\n"},
      {"second TYPE", "# TYPE x counter\n# TYPE x gauge\nx 1\n"},
      {"TYPE after samples", "# TYPE x counter\nx 1\n# HELP x late\n"},
      {"bucket without le", "# TYPE x histogram\nx_bucket 1\n"},
  };
  for (const auto& [why, text] : bad) {
    auto r = parse_exposition(text);
    EXPECT_FALSE(r) << why << " was accepted:\n" << text;
    if (!r) {
      EXPECT_NE(r.error().message.find("line"), std::string::npos) << why << ": " << r.error().message;
    }
  }
}

Result<std::vector<Family>> parse_ok(const std::string& text) {
  auto r = parse_exposition(text);
  EXPECT_TRUE(r) << r.error().describe();
  return r;
}

TEST(Exposition, HistogramChecksCatchEachBrokenInvariant) {
  const std::string head = "# TYPE h histogram\n";
  auto good = parse_ok(head + "h_bucket{le=\"1\"} 1\nh_bucket{le=\"2\"} 3\nh_bucket{le=\"+Inf\"} 3\nh_sum 4.5\nh_count 3\n");
  ASSERT_TRUE(good);
  EXPECT_TRUE(check_histogram((*good)[0]));

  const std::vector<std::pair<const char*, std::string>> broken = {
      {"decreasing", "h_bucket{le=\"1\"} 3\nh_bucket{le=\"2\"} 2\nh_bucket{le=\"+Inf\"} 3\nh_sum 1\nh_count 3\n"},
      {"no +Inf", "h_bucket{le=\"1\"} 1\nh_bucket{le=\"2\"} 3\nh_sum 4\nh_count 3\n"},
      {"le not ascending", "h_bucket{le=\"2\"} 1\nh_bucket{le=\"1\"} 3\nh_bucket{le=\"+Inf\"} 3\nh_sum 4\nh_count 3\n"},
      {"count differs", "h_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 3\nh_sum 9\nh_count 4\n"},
      // one duration in [0, 1] and two in (1, 2]: 2 <= sum <= 5
      {"sum too small", "h_bucket{le=\"1\"} 1\nh_bucket{le=\"2\"} 3\nh_bucket{le=\"+Inf\"} 3\nh_sum 1.5\nh_count 3\n"},
      {"sum too large", "h_bucket{le=\"1\"} 1\nh_bucket{le=\"2\"} 3\nh_bucket{le=\"+Inf\"} 3\nh_sum 5.5\nh_count 3\n"},
      {"no sum", "h_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n"},
  };
  for (const auto& [why, body] : broken) {
    auto f = parse_ok(head + body);
    ASSERT_TRUE(f) << why;
    EXPECT_FALSE(check_histogram((*f)[0])) << why << " passed";
  }
  // Durations above the last finite bound leave the sum unbounded above.
  auto inf = parse_ok(head + "h_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 100\nh_count 2\n");
  ASSERT_TRUE(inf);
  EXPECT_TRUE(check_histogram((*inf)[0]));
}

}  // namespace
}  // namespace faultline::metrics
