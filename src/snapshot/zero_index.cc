#include "snapshot/zero_index.h"

#include "common/atomic_file.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>

#include "source/file_watch.h"

namespace faultline {

namespace {

constexpr char kMagic[8] = {'F', 'L', 'Z', 'I', 'D', 'X', '\r', '\n'};
constexpr uint64_t kGranule = 4096;
constexpr size_t kHeader = 56;

bool page_is_zero(const uint8_t* p) {
  const auto* w = reinterpret_cast<const uint64_t*>(p);
  uint64_t acc = 0;
  for (size_t i = 0; i < kGranule / 8; ++i) acc |= w[i];
  return acc == 0;
}

// zlib's crc32 takes a 32-bit length: feed it in pieces so an index of a
// very large snapshot is checksummed whole.
uint32_t crc(std::string_view bytes) {
  uLong c = ::crc32(0L, Z_NULL, 0);
  constexpr size_t kPiece = 1u << 30;
  for (size_t at = 0; at < bytes.size(); at += kPiece) {
    const size_t n = std::min(kPiece, bytes.size() - at);
    c = ::crc32(c, reinterpret_cast<const Bytef*>(bytes.data() + at), static_cast<uInt>(n));
  }
  return static_cast<uint32_t>(c);
}

template <typename T>
void put(std::string& out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));  // x86-64: little-endian in memory
  out.append(b, sizeof(T));
}

template <typename T>
T get(std::string_view in, size_t at) {
  T v;
  std::memcpy(&v, in.data() + at, sizeof(T));
  return v;
}

uint64_t bitmap_bytes(uint64_t pages) { return (pages + 7) / 8; }

// "inode 12 -> 14, ctime ... -> ..." for the fields that differ.
std::string identity_difference(const FileIdentity& built_for, const FileIdentity& served) {
  std::string out;
  auto field = [&](const char* name, uint64_t a, uint64_t b) {
    if (a == b) return;
    if (!out.empty()) out += ", ";
    out += std::string(name) + " " + std::to_string(a) + " -> " + std::to_string(b);
  };
  field("device", built_for.device, served.device);
  field("inode", built_for.inode, served.inode);
  field("size", built_for.size, served.size);
  field("mtime_ns", built_for.mtime_ns, served.mtime_ns);
  field("ctime_ns", built_for.ctime_ns, served.ctime_ns);
  return out;
}

}  // namespace

ZeroIndex::ZeroIndex(ZeroIndex&& other) noexcept
    : identity_(other.identity_),
      pages_(other.pages_),
      zero_pages_(other.zero_pages_),
      bits_(std::move(other.bits_)),
      disabled_(other.disabled()) {}

ZeroIndex& ZeroIndex::operator=(ZeroIndex&& other) noexcept {
  identity_ = other.identity_;
  pages_ = other.pages_;
  zero_pages_ = other.zero_pages_;
  bits_ = std::move(other.bits_);
  disabled_.store(other.disabled(), std::memory_order_relaxed);
  return *this;
}

Result<ZeroIndex> ZeroIndex::build(const PageSource& source, const FileIdentity& identity) {
  if (identity.size != source.size()) {
    return fail("memory file " + source.describe() + " changed size since it was opened (" +
                std::to_string(source.size()) + " -> " + std::to_string(identity.size) + " bytes)");
  }
  ZeroIndex z;
  z.identity_ = identity;
  z.pages_ = source.size() / kGranule;
  z.bits_.assign((z.pages_ + 63) / 64, 0);
  constexpr uint64_t kChunk = 8ull << 20;
  std::unique_ptr<uint8_t[]> buf(new uint8_t[kChunk]);
  for (uint64_t off = 0; off < z.pages_ * kGranule; off += kChunk) {
    const uint64_t len = std::min(kChunk, z.pages_ * kGranule - off);
    if (auto s = source.read(off, {buf.get(), len}); !s) return std::unexpected(s.error());
    for (uint64_t p = 0; p < len / kGranule; ++p) {
      if (page_is_zero(buf.get() + p * kGranule)) {
        const uint64_t i = off / kGranule + p;
        z.bits_[i / 64] |= 1ull << (i % 64);
        ++z.zero_pages_;
      }
    }
  }
  return z;
}

Result<ZeroIndex> ZeroIndex::build_from(const MemoryFile& file) {
  // Watch first, then take the identity, then read: a write at any point
  // after the identity was taken is seen (with a lease, before it lands).
  std::atomic<bool> written{false};
  auto watch = FileWatch::start(file, [&](FileWatch::Event e, const std::string&) {
    if (e == FileWatch::Event::kContentChange) written.store(true);
  });
  if (!watch) return std::unexpected(watch.error());
  auto identity = file.identity();
  if (!identity) return std::unexpected(identity.error());
  auto z = build(file, *identity);
  if (!z) return z;
  watch->reset();  // joins the watch thread: every event it saw is reported
  if (written.load()) {
    return fail("memory file " + file.describe() + " was written while it was being indexed; run it again");
  }
  return z;
}

std::string ZeroIndex::serialize() const {
  std::string out(kMagic, sizeof kMagic);
  put<uint32_t>(out, kZeroIndexVersion);
  put<uint32_t>(out, static_cast<uint32_t>(kGranule));
  put<uint64_t>(out, identity_.size);
  put<uint64_t>(out, identity_.device);
  put<uint64_t>(out, identity_.inode);
  put<uint64_t>(out, identity_.mtime_ns);
  put<uint64_t>(out, identity_.ctime_ns);
  out.append(reinterpret_cast<const char*>(bits_.data()), bitmap_bytes(pages_));
  put<uint32_t>(out, crc(out));
  return out;
}

Status ZeroIndex::save(const std::string& path) const {
  // A fresh temporary name (two daemons may build the same index at once),
  // fsynced and renamed: see common/atomic_file.h.
  return write_file_atomically(path, serialize());
}

Result<ZeroIndex> ZeroIndex::parse(std::string_view in, const FileIdentity& identity) {
  if (in.size() < kHeader + 4) return fail("is truncated: " + std::to_string(in.size()) + " bytes");
  if (std::memcmp(in.data(), kMagic, sizeof kMagic) != 0) return fail("is not a faultline zero index (bad magic)");
  const auto version = get<uint32_t>(in, 8);
  if (version != kZeroIndexVersion) {
    return fail("has format version " + std::to_string(version) + "; this build reads version " +
                std::to_string(kZeroIndexVersion));
  }
  const auto granule = get<uint32_t>(in, 12);
  if (granule != kGranule) return fail("has granule " + std::to_string(granule) + "; only 4096 is supported");
  const FileIdentity stored{get<uint64_t>(in, 24), get<uint64_t>(in, 32), get<uint64_t>(in, 16),
                            get<uint64_t>(in, 40), get<uint64_t>(in, 48)};
  const uint64_t pages = stored.size / kGranule;
  if (in.size() - kHeader - 4 != bitmap_bytes(pages)) {
    return fail("has the wrong length: " + std::to_string(in.size()) + " bytes for a " + std::to_string(stored.size) +
                "-byte memory file");
  }
  if (get<uint32_t>(in, in.size() - 4) != crc(in.substr(0, in.size() - 4))) {
    return fail("is damaged: checksum mismatch");
  }
  if (!(stored == identity)) {
    return fail("is stale: it was built for another file, or for this one before it changed (" +
                identity_difference(stored, identity) + ")");
  }
  ZeroIndex z;
  z.identity_ = identity;
  z.pages_ = pages;
  z.bits_.assign((pages + 63) / 64, 0);
  if (pages > 0) std::memcpy(z.bits_.data(), in.data() + kHeader, bitmap_bytes(pages));
  if (pages % 64 != 0 && (z.bits_.back() >> (pages % 64)) != 0) {
    // No writer sets them; a file that does was not written by faultline.
    return fail("is damaged: bits are set past the last page");
  }
  for (uint64_t w : z.bits_) z.zero_pages_ += static_cast<uint64_t>(__builtin_popcountll(w));
  return z;
}

Result<ZeroIndex> ZeroIndex::load(const std::string& path, const FileIdentity& identity) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return fail_errno("cannot open zero index " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  auto z = parse(ss.str(), identity);
  if (!z) return fail("zero index " + path + " " + z.error().message, z.error().code);
  return z;
}

Result<ZeroIndex::SampleResult> ZeroIndex::check_sample(const PageSource& source, uint64_t per_class,
                                                        uint64_t seed) const {
  SampleResult result;
  if (pages_ == 0) return result;
  std::mt19937_64 rng(seed);
  std::unique_ptr<uint8_t[]> page(new uint8_t[kGranule]);
  // The first page in [from, to) whose bit is `want`, or pages_ if none.
  const auto find_in = [&](uint64_t from, uint64_t to, bool want) -> uint64_t {
    for (uint64_t p = from; p < to; p = (p / 64 + 1) * 64) {
      const uint64_t here = (want ? bits_[p / 64] : ~bits_[p / 64]) >> (p % 64);
      if (here != 0) {
        // The lowest match of this word; past `to` means none before it.
        const uint64_t found = p + static_cast<uint64_t>(__builtin_ctzll(here));
        return found < to ? found : pages_;
      }
    }
    return pages_;
  };
  // The first page at or after `start`, wrapping around once.
  const auto find_from = [&](uint64_t start, bool want) -> uint64_t {
    const uint64_t found = find_in(start, pages_, want);
    return found < pages_ ? found : find_in(0, start, want);
  };
  for (const bool want_zero : {true, false}) {
    const uint64_t in_class = want_zero ? zero_pages_ : pages_ - zero_pages_;
    const uint64_t n = std::min(per_class, in_class);
    for (uint64_t i = 0; i < n; ++i) {
      const uint64_t p = find_from(rng() % pages_, want_zero);
      if (p >= pages_) break;
      if (auto st = source.read(p * kGranule, {page.get(), kGranule}); !st) return std::unexpected(st.error());
      const bool zero = page_is_zero(page.get());
      if (zero != want_zero) {
        return fail("zero index disagrees with memory file " + source.describe() + ": page " + std::to_string(p) +
                    " (offset " + std::to_string(p * kGranule) + ") is listed as " +
                    (want_zero ? "all zero but holds data" : "holding data but is all zero"));
      }
      ++(want_zero ? result.zero_pages_read : result.data_pages_read);
    }
  }
  return result;
}

bool ZeroIndex::is_zero(uint64_t offset, uint64_t length) const {
  if (length == 0 || disabled()) return false;
  for (uint64_t i = offset / kGranule; i < (offset + length) / kGranule; ++i) {
    if (i >= pages_ || !bit(i)) return false;
  }
  return true;
}

}  // namespace faultline
