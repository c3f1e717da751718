// The manifest encoding: round trips, its size for large guests, and
// hostile bytes (damaged files, random input) that must be refused cleanly.
#include "image/manifest.h"

#include <gtest/gtest.h>

#include <random>

namespace faultline::image {
namespace {

std::string with_valid_checksum(std::string bytes);

BlobId fake_id(uint64_t n) {
  BlobId id;
  for (int i = 0; i < 8; ++i) id.bytes[i] = static_cast<uint8_t>(n >> (8 * i));
  return id;
}

// A manifest for `stored` pages laid out in guest order, with frames.
Manifest base_with_runs(uint64_t guest_pages, const std::vector<PageRun>& runs, uint64_t stored) {
  Manifest m;
  m.page_size = kSmallPage;
  m.guest_bytes = guest_pages * kSmallPage;
  m.frame_pages = 128;
  m.stored_pages = stored;
  for (uint64_t first = 0; first < stored; first += m.frame_pages) {
    const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(m.frame_pages, stored - first));
    m.frames.push_back(FrameRef{fake_id(first), 1000, n, 0x9e3779b97f4a7c15ull * (first + 1)});
  }
  m.runs = runs;
  return m;
}

TEST(ImageManifest, RoundTripsAParentFramesAndExplicitRuns) {
  Manifest m = base_with_runs(10, {}, 7);
  m.parent = ParentRef{"base", fake_id(99)};
  // Working-set layout: guest pages 7, 8 stored first (0, 1); the rest (2..6) in guest order.
  m.runs = {{PageKind::kStored, 2, 2}, {PageKind::kZero, 1, 0}, {PageKind::kParent, 1, 0},
            {PageKind::kStored, 3, 4}, {PageKind::kStored, 2, 0}, {PageKind::kParent, 1, 0}};
  auto bytes = serialize_manifest(m);
  ASSERT_TRUE(bytes) << bytes.error().describe();
  auto back = parse_manifest(*bytes, "test");
  ASSERT_TRUE(back) << back.error().describe();
  EXPECT_EQ(*back, m);
}

uint32_t version_of(const std::string& bytes) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = v << 8 | static_cast<uint8_t>(bytes[8 + i]);
  return v;
}

// Version 2 keeps each frame's checksum; a manifest without checksums is
// written and read as version 1, the format older faultlines wrote, and its
// frames carry none (they are then verified by SHA-256).
TEST(ImageManifest, FrameChecksumsRoundTripInVersion2AndVersion1HasNone) {
  Manifest m = base_with_runs(300, {{PageKind::kStored, 200, 0}, {PageKind::kZero, 100, 0}}, 200);
  auto v2 = serialize_manifest(m);
  ASSERT_TRUE(v2) << v2.error().describe();
  EXPECT_EQ(version_of(*v2), 2u);
  auto back = parse_manifest(*v2, "test");
  ASSERT_TRUE(back) << back.error().describe();
  EXPECT_EQ(*back, m);
  ASSERT_TRUE(back->frames[1].checksum);
  EXPECT_EQ(*back->frames[1].checksum, 0x9e3779b97f4a7c15ull * 129);

  for (FrameRef& f : m.frames) f.checksum.reset();
  auto v1 = serialize_manifest(m);
  ASSERT_TRUE(v1) << v1.error().describe();
  EXPECT_EQ(version_of(*v1), 1u);
  EXPECT_EQ(v1->size() + 8 * m.frames.size(), v2->size()) << "8 bytes of checksum per frame";
  back = parse_manifest(*v1, "test");
  ASSERT_TRUE(back) << back.error().describe();
  EXPECT_EQ(*back, m);
  for (const FrameRef& f : back->frames) EXPECT_FALSE(f.checksum);

  m.frames[0].checksum = 1;  // some frames with, some without: not a manifest of either version
  EXPECT_FALSE(serialize_manifest(m));

  std::string future = *v2;
  future[8] = 3;
  auto refused = parse_manifest(with_valid_checksum(future.substr(0, future.size() - 32)), "image f");
  ASSERT_FALSE(refused);
  EXPECT_NE(refused.error().message.find("manifest version 3 is not supported (this faultline reads 1 to 2)"),
            std::string::npos)
      << refused.error().message;
}

TEST(ImageManifest, BaseImageOfA64GiBSparseGuestIsSmall) {
  // 64 GiB of 4 KiB pages, 10 % of them stored in scattered runs of 1..8
  // pages (a worst-ish case: many short runs), the rest zero.
  const uint64_t pages = (64ull << 30) / kSmallPage;
  std::mt19937_64 rng(1);
  std::vector<PageRun> runs;
  uint64_t page = 0, stored = 0;
  while (page < pages) {
    const uint64_t zero = std::min<uint64_t>(pages - page, 1 + rng() % 140);
    runs.push_back({PageKind::kZero, zero, 0});
    page += zero;
    if (page == pages) break;
    const uint64_t data = std::min<uint64_t>(pages - page, 1 + rng() % 8);
    runs.push_back({PageKind::kStored, data, stored});
    stored += data;
    page += data;
  }
  Manifest m = base_with_runs(pages, runs, stored);
  auto bytes = serialize_manifest(m);
  ASSERT_TRUE(bytes) << bytes.error().describe();
  EXPECT_LE(bytes->size(), 2 * pages) << "a base image may cost at most 2 bytes per guest page";
  EXPECT_LT(bytes->size(), 100ull << 20);
  std::printf("64 GiB guest, %llu stored pages in %zu runs: manifest %zu bytes (%.3f bytes/page)\n",
              static_cast<unsigned long long>(stored), runs.size(), bytes->size(),
              static_cast<double>(bytes->size()) / pages);
  auto back = parse_manifest(*bytes, "test");
  ASSERT_TRUE(back) << back.error().describe();
  EXPECT_EQ(back->runs.size(), runs.size());
}

TEST(ImageManifest, WorstCaseAlternatingBaseStaysUnderTwoBytesPerPage) {
  // Every other page stored: the most runs a base image can have.
  const uint64_t pages = 1 << 20;
  std::vector<PageRun> runs;
  for (uint64_t p = 0; p < pages; p += 2) {
    runs.push_back({PageKind::kStored, 1, p / 2});
    runs.push_back({PageKind::kZero, 1, 0});
  }
  auto bytes = serialize_manifest(base_with_runs(pages, runs, pages / 2));
  ASSERT_TRUE(bytes) << bytes.error().describe();
  EXPECT_LE(bytes->size(), 2 * pages);
}

TEST(ImageManifest, DiffCostsInProportionToItsStoredPages) {
  // A 64 GiB guest of which a diff stores 1000 scattered pages.
  const uint64_t pages = (64ull << 30) / kSmallPage;
  std::vector<PageRun> runs;
  uint64_t page = 0;
  for (uint64_t i = 0; i < 1000; ++i) {
    const uint64_t gap = pages / 1000 - 1;
    runs.push_back({PageKind::kParent, gap, 0});
    runs.push_back({PageKind::kStored, 1, i});
    page += gap + 1;
  }
  runs.push_back({PageKind::kParent, pages - page, 0});
  Manifest m = base_with_runs(pages, runs, 1000);
  m.parent = ParentRef{"base", fake_id(1)};
  auto bytes = serialize_manifest(m);
  ASSERT_TRUE(bytes) << bytes.error().describe();
  EXPECT_LT(bytes->size(), 1000 * 16) << "about 6 bytes of map and 0.3 of frame table per stored page, plus fixed";
}

TEST(ImageManifest, EveryTruncationIsRefused) {
  auto bytes = serialize_manifest(base_with_runs(8, {{PageKind::kStored, 4, 0}, {PageKind::kZero, 4, 0}}, 4));
  ASSERT_TRUE(bytes);
  for (size_t n = 0; n < bytes->size(); ++n) {
    auto r = parse_manifest(bytes->substr(0, n), "image t (store/images/t)");
    ASSERT_FALSE(r) << "accepted a manifest cut at " << n;
    EXPECT_NE(r.error().message.find("image t"), std::string::npos) << r.error().message;
  }
}

TEST(ImageManifest, EveryFlippedByteIsRefused) {
  auto bytes = serialize_manifest(base_with_runs(8, {{PageKind::kStored, 4, 0}, {PageKind::kZero, 4, 0}}, 4));
  ASSERT_TRUE(bytes);
  for (size_t i = 0; i < bytes->size(); ++i) {
    std::string damaged = *bytes;
    damaged[i] ^= 0x20;
    EXPECT_FALSE(parse_manifest(damaged, "t")) << "accepted a flip at byte " << i;
  }
}

TEST(ImageManifest, SerializeRefusesInconsistentManifests) {
  // Two runs claim the same stored page.
  EXPECT_FALSE(serialize_manifest(base_with_runs(2, {{PageKind::kStored, 1, 0}, {PageKind::kStored, 1, 0}}, 1)));
  // Parent pages without a parent.
  EXPECT_FALSE(serialize_manifest(base_with_runs(2, {{PageKind::kParent, 2, 0}}, 0)));
  // Runs that do not cover the guest.
  EXPECT_FALSE(serialize_manifest(base_with_runs(3, {{PageKind::kZero, 2, 0}}, 0)));
  // Parent names that are not plain, printable file names.
  for (const char* name : {"a/b", "..", ".hidden", "line\nbreak", "esc\x1b[0m", ""}) {
    Manifest m = base_with_runs(2, {{PageKind::kParent, 2, 0}}, 0);
    m.parent = ParentRef{name, fake_id(1)};
    EXPECT_FALSE(serialize_manifest(m)) << name;
  }
}

// A manifest of a few bytes may claim any guest size; a served image's page
// table costs 8 bytes per guest page, so a claim over 1 TiB is refused before
// anything is allocated for it (a 2^40-page claim used to abort inspect).
TEST(ImageManifest, AGuestLargerThanOneTebibyteIsRefused) {
  constexpr uint64_t kPages = kMaxGuestBytes / kSmallPage;
  auto largest = serialize_manifest(base_with_runs(kPages, {{PageKind::kZero, kPages, 0}}, 0));
  ASSERT_TRUE(largest) << largest.error().describe();
  ASSERT_TRUE(parse_manifest(*largest, "largest")) << "1 TiB is allowed";
  for (uint64_t claim : {kMaxGuestBytes + kSmallPage, uint64_t{1} << 52}) {
    std::string bytes = largest->substr(0, largest->size() - 32);
    for (int i = 0; i < 8; ++i) bytes[16 + i] = static_cast<char>(claim >> (8 * i));
    auto parsed = parse_manifest(with_valid_checksum(bytes), "huge");
    ASSERT_FALSE(parsed) << claim;
    EXPECT_EQ(parsed.error().code, EINVAL);
    EXPECT_NE(parsed.error().message.find("larger than an image may be"), std::string::npos) << parsed.error().message;
  }
  EXPECT_FALSE(serialize_manifest(base_with_runs(kPages + 1, {{PageKind::kZero, kPages + 1, 0}}, 0)));
}

// The checksum would stop almost every random input at the door; this test
// appends a valid checksum so the random bytes reach the parser itself.
std::string with_valid_checksum(std::string bytes) {
  if (bytes.size() >= 48) {
    const uint64_t body = bytes.size() - 48;
    for (int i = 0; i < 8; ++i) bytes[40 + i] = static_cast<char>(body >> (8 * i));
  }
  const BlobId sum = BlobId::of(bytes);
  bytes.append(reinterpret_cast<const char*>(sum.bytes.data()), 32);
  return bytes;
}

TEST(ImageManifest, RandomBytesNeverCrashTheParser) {
  auto good = serialize_manifest(base_with_runs(300, {{PageKind::kStored, 200, 0}, {PageKind::kZero, 100, 0}}, 200));
  ASSERT_TRUE(good);
  const std::string header_and_body = good->substr(0, good->size() - 32);
  std::mt19937_64 rng(42);
  int accepted = 0;
  for (int iter = 0; iter < 20000; ++iter) {
    std::string input;
    if (iter % 2 == 0) {
      // Mutations of a valid manifest (deep paths), checksum fixed up.
      input = header_and_body;
      const int flips = 1 + static_cast<int>(rng() % 4);
      for (int f = 0; f < flips; ++f) input[rng() % input.size()] = static_cast<char>(rng());
      if (rng() % 4 == 0) input.resize(rng() % input.size());
    } else {
      input = header_and_body.substr(0, 48);
      input.resize(48 + rng() % 200);
      for (size_t i = 48; i < input.size(); ++i) input[i] = static_cast<char>(rng());
    }
    auto r = parse_manifest(with_valid_checksum(input), "fuzz");
    if (r) {
      ++accepted;
      // Whatever is accepted is consistent: it re-encodes and re-parses to itself.
      auto again = serialize_manifest(*r);
      ASSERT_TRUE(again) << again.error().describe();
      auto back = parse_manifest(*again, "fuzz");
      ASSERT_TRUE(back);
      EXPECT_EQ(*back, *r);
    }
  }
  std::printf("%d of 20000 random manifests were valid\n", accepted);
}

}  // namespace
}  // namespace faultline::image
