// Writes the seed corpora of the fuzz targets into DIR/{handshake,
// working_set,zero_index}/. Run by hand when a format changes; the output is
// committed (fuzz/corpus/).
//   fuzz_make_seeds fuzz/corpus
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "client/handshake.h"
#include "snapshot/working_set.h"
#include "snapshot/zero_index.h"

using namespace faultline;

namespace {

void write(const std::filesystem::path& path, const std::string& bytes) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// An in-memory snapshot: page p is zero when zero(p).
class SyntheticSource final : public PageSource {
 public:
  SyntheticSource(uint64_t size, std::vector<bool> zero) : size_(size), zero_(std::move(zero)) {}
  Status read(uint64_t offset, std::span<uint8_t> out) const override {
    for (size_t i = 0; i < out.size(); ++i) {
      const uint64_t page = (offset + i) / 4096;
      out[i] = page < zero_.size() && zero_[page] ? 0 : static_cast<uint8_t>(page * 7 + 1);
    }
    return {};
  }
  uint64_t size() const override { return size_; }
  const std::string& describe() const override { return name_; }

 private:
  uint64_t size_;
  std::vector<bool> zero_;
  std::string name_ = "synthetic";
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  const std::filesystem::path dir = argv[1];
  // Addresses as Firecracker's mmap returns them (2 MiB aligned, high user space).
  const uint64_t base = 0x7f0000000000ull;
  for (int minor = 1; minor <= 16; ++minor) {
    const client::FirecrackerVersion v{1, minor};
    const std::string name = "fc-1." + std::to_string(minor);
    const GuestRegion one[] = {{base, 128ull << 20, 0, 4096}};
    write(dir / "handshake" / (name + "-one-region"), client::handshake_json(one, v));
    // An x86 VM above 3 GiB: two regions around the MMIO hole.
    const GuestRegion two[] = {{base, 3ull << 30, 0, 4096}, {base + (4ull << 30), 1ull << 30, 3ull << 30, 4096}};
    write(dir / "handshake" / (name + "-mmio-hole"), client::handshake_json(two, v));
    if (v.at_least(1, 7)) {
      const GuestRegion huge[] = {{base, 256ull << 20, 0, 2ull << 20}};
      write(dir / "handshake" / (name + "-huge-pages"), client::handshake_json(huge, v));
    }
  }

  // Working sets: byte 0 is the target's mode (bit 0: fix the CRC, bit 1:
  // memory size from the header), then the file.
  const std::vector<uint64_t> offsets = {8192, 0, 4096 * 200, 4096, 4096 * 17};
  write(dir / "working_set" / "four-k-mode0", std::string(1, '\0') +
                                                   serialize_working_set({4096, 64ull << 20, offsets}));
  write(dir / "working_set" / "four-k-mode3", std::string(1, '\3') +
                                                   serialize_working_set({4096, 1ull << 30, offsets}));
  write(dir / "working_set" / "huge-mode3",
        std::string(1, '\3') + serialize_working_set({2u << 20, 256ull << 20, {0, 2u << 20, 64u << 20}}));
  write(dir / "working_set" / "empty-mode3", std::string(1, '\3') + serialize_working_set({4096, 4096, {}}));

  // Zero indexes of synthetic snapshots; mode 0 files carry the identity the
  // target uses when it does not read one from the header.
  struct Shape {
    const char* name;
    uint64_t size;
    int zero_every;  // page p is zero when p % zero_every == 0
    uint8_t mode;
  };
  const FileIdentity fixed{2049, 131, 64ull << 20, 1700000000000000000ull, 1700000000000000001ull};
  for (const Shape& s : {Shape{"one-page", 4096, 1, 3}, Shape{"63-pages", 63 * 4096, 3, 3},
                         Shape{"64-pages", 64 * 4096, 2, 3}, Shape{"65-pages", 65 * 4096, 5, 3},
                         Shape{"partial-last-page", 12345, 2, 3}, Shape{"no-zero-page", 40 * 4096, 1000, 3},
                         Shape{"fixed-identity-64MiB", 64ull << 20, 7, 0}}) {
    std::vector<bool> zero(s.size / 4096 + 1);
    for (size_t p = 0; p < zero.size(); ++p) zero[p] = s.zero_every != 1000 && p % s.zero_every == 0;
    SyntheticSource source(s.size, zero);
    FileIdentity id = fixed;
    id.size = s.size;
    auto z = ZeroIndex::build(source, id);
    if (!z) {
      std::fprintf(stderr, "%s\n", z.error().describe().c_str());
      return 1;
    }
    write(dir / "zero_index" / s.name, std::string(1, static_cast<char>(s.mode)) + z->serialize());
  }
  std::printf("seeds written under %s\n", dir.c_str());
  return 0;
}
