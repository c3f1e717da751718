#include "snapshot/working_set.h"

#include "common/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <cstring>
#include <fstream>
#include <sstream>

namespace faultline {

namespace {

constexpr char kMagic[8] = {'F', 'L', 'W', 'S', 'E', 'T', '\r', '\n'};
constexpr size_t kHeader = 32;

template <typename T>
void put(std::string& out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));  // x86-64: little-endian in memory
  out.append(b, sizeof(T));
}
template <typename T>
T get(const std::string& in, size_t at) {
  T v;
  std::memcpy(&v, in.data() + at, sizeof(T));
  return v;
}

uint32_t crc(const std::string& bytes, size_t len) {
  return static_cast<uint32_t>(::crc32(0L, reinterpret_cast<const Bytef*>(bytes.data()), static_cast<uInt>(len)));
}

}  // namespace

std::string serialize_working_set(const WorkingSet& set) {
  std::string out(kMagic, sizeof kMagic);
  put<uint32_t>(out, kWorkingSetVersion);
  put<uint32_t>(out, set.page_size);
  put<uint64_t>(out, set.memory_file_size);
  put<uint64_t>(out, set.offsets.size());
  for (uint64_t o : set.offsets) put<uint64_t>(out, o);
  put<uint32_t>(out, crc(out, out.size()));
  return out;
}

Result<WorkingSet> parse_working_set(const std::string& in, uint64_t memory_file_size) {
  if (in.size() < kHeader + 4) return fail("working-set file is truncated: " + std::to_string(in.size()) + " bytes");
  if (std::memcmp(in.data(), kMagic, sizeof kMagic) != 0) return fail("not a faultline working-set file (bad magic)");
  const uint32_t version = get<uint32_t>(in, 8);
  if (version != kWorkingSetVersion) {
    return fail("working-set file version " + std::to_string(version) + " is not supported (this build reads " +
                std::to_string(kWorkingSetVersion) + ")");
  }
  WorkingSet set;
  set.page_size = get<uint32_t>(in, 12);
  set.memory_file_size = get<uint64_t>(in, 16);
  const uint64_t count = get<uint64_t>(in, 24);
  if (count > (in.size() - kHeader - 4) / 8 || in.size() != kHeader + count * 8 + 4) {
    return fail("working-set file is truncated or has trailing bytes: header says " + std::to_string(count) +
                " pages, the file holds " + std::to_string(in.size()) + " bytes");
  }
  if (get<uint32_t>(in, in.size() - 4) != crc(in, in.size() - 4)) {
    return fail("working-set file is damaged: checksum mismatch");
  }
  if (set.page_size != 4096 && set.page_size != 2 * 1024 * 1024) {
    return fail("working-set file has page size " + std::to_string(set.page_size));
  }
  if (set.memory_file_size != memory_file_size) {
    return fail("working-set file was recorded on a " + std::to_string(set.memory_file_size) +
                "-byte snapshot, but the memory file has " + std::to_string(memory_file_size) + " bytes");
  }
  set.offsets.resize(count);
  for (uint64_t i = 0; i < count; ++i) {
    const uint64_t o = get<uint64_t>(in, kHeader + i * 8);
    if (o % set.page_size != 0 || o >= memory_file_size) {
      return fail("working-set entry " + std::to_string(i) + " (offset " + std::to_string(o) +
                  ") is not a page of the snapshot");
    }
    set.offsets[i] = o;
  }
  return set;
}

Status write_working_set(const std::string& path, const WorkingSet& set) {
  return write_file_atomically(path, serialize_working_set(set));
}

Result<WorkingSet> read_working_set(const std::string& path, uint64_t memory_file_size) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return fail_errno("cannot open working-set file " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  auto set = parse_working_set(ss.str(), memory_file_size);
  if (!set) return fail(path + ": " + set.error().message, set.error().code);
  return set;
}

}  // namespace faultline
