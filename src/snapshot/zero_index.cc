#include "snapshot/zero_index.h"

#include <sys/stat.h>
#include <zlib.h>

#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>

namespace faultline {

namespace {
constexpr char kMagic[8] = {'F', 'L', 'Z', 'I', 'D', 'X', '\r', '\n'};
constexpr uint32_t kVersion = 1;
constexpr uint64_t kGranule = 4096;
constexpr size_t kHeader = 40;

bool page_is_zero(const uint8_t* p) {
  const auto* w = reinterpret_cast<const uint64_t*>(p);
  uint64_t acc = 0;
  for (size_t i = 0; i < kGranule / 8; ++i) acc |= w[i];
  return acc == 0;
}
}  // namespace

Result<FileIdentity> identify_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return fail_errno("cannot stat " + path);
  return FileIdentity{static_cast<uint64_t>(st.st_size),
                      static_cast<uint64_t>(st.st_mtim.tv_sec) * 1000000000ull + st.st_mtim.tv_nsec,
                      static_cast<uint64_t>(st.st_ino)};
}

Result<ZeroIndex> ZeroIndex::build(const PageSource& source, FileIdentity identity) {
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

Status ZeroIndex::save(const std::string& path) const {
  std::string out(kMagic, sizeof kMagic);
  auto put = [&](auto v) { out.append(reinterpret_cast<const char*>(&v), sizeof v); };
  put(kVersion);
  put(static_cast<uint32_t>(kGranule));
  put(identity_.size);
  put(identity_.mtime_ns);
  put(identity_.inode);
  out.append(reinterpret_cast<const char*>(bits_.data()), (pages_ + 7) / 8);
  put(static_cast<uint32_t>(::crc32(0L, reinterpret_cast<const Bytef*>(out.data()), static_cast<uInt>(out.size()))));
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) return fail_errno("cannot create " + tmp);
    f.write(out.data(), static_cast<std::streamsize>(out.size()));
    if (!f) return fail_errno("writing " + tmp + " failed");
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) return fail_errno("renaming " + tmp + " failed");
  return {};
}

Result<ZeroIndex> ZeroIndex::load(const std::string& path, const FileIdentity& identity) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return fail_errno("cannot open zero index " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string in = ss.str();
  auto get64 = [&](size_t at) {
    uint64_t v;
    std::memcpy(&v, in.data() + at, 8);
    return v;
  };
  const uint64_t pages = identity.size / kGranule;
  if (in.size() < kHeader + 4 || std::memcmp(in.data(), kMagic, sizeof kMagic) != 0) {
    return fail("zero index " + path + " is not a faultline zero index");
  }
  uint32_t version, granule, stored_crc;
  std::memcpy(&version, in.data() + 8, 4);
  std::memcpy(&granule, in.data() + 12, 4);
  if (version != kVersion || granule != kGranule) return fail("zero index " + path + " has an unsupported version");
  const FileIdentity stored{get64(16), get64(24), get64(32)};
  if (!(stored == identity)) return fail("zero index " + path + " is stale: the memory file changed since it was built");
  if (in.size() != kHeader + (pages + 7) / 8 + 4) return fail("zero index " + path + " has the wrong length");
  std::memcpy(&stored_crc, in.data() + in.size() - 4, 4);
  if (stored_crc != ::crc32(0L, reinterpret_cast<const Bytef*>(in.data()), static_cast<uInt>(in.size() - 4))) {
    return fail("zero index " + path + " is damaged: checksum mismatch");
  }
  ZeroIndex z;
  z.identity_ = identity;
  z.pages_ = pages;
  z.bits_.assign((pages + 63) / 64, 0);
  std::memcpy(z.bits_.data(), in.data() + kHeader, (pages + 7) / 8);
  for (uint64_t w : z.bits_) z.zero_pages_ += static_cast<uint64_t>(__builtin_popcountll(w));
  return z;
}

bool ZeroIndex::is_zero(uint64_t offset, uint64_t length) const {
  for (uint64_t i = offset / kGranule; i < (offset + length) / kGranule; ++i) {
    if (i >= pages_ || !(bits_[i / 64] & (1ull << (i % 64)))) return false;
  }
  return length > 0;
}

}  // namespace faultline
