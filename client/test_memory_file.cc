#include "client/test_memory_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "common/unique_fd.h"

namespace faultline::client {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

namespace {

// Fills whole qwords with xorshift64* output; `state` must be non-zero.
void fill_xorshift(uint64_t state, uint8_t* out, size_t bytes) {
  if (state == 0) state = 0x2545F4914F6CDD1Dull;
  size_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    uint64_t word = state * 0x2545F4914F6CDD1Dull;
    std::memcpy(out + i, &word, 8);
  }
  for (; i < bytes; ++i) out[i] = static_cast<uint8_t>(splitmix64(state + i));
}

}  // namespace

bool test_page_is_zero(uint64_t page_index, uint64_t seed, double zero_page_fraction) {
  if (zero_page_fraction <= 0) return false;
  if (zero_page_fraction >= 1) return true;
  // Top 53 bits as a uniform double in [0, 1).
  const uint64_t h = splitmix64(seed ^ splitmix64(page_index ^ 0x5A5A5A5A5A5A5A5Aull));
  return static_cast<double>(h >> 11) * 0x1.0p-53 < zero_page_fraction;
}

void fill_test_page(uint64_t page_index, uint64_t seed, double zero_page_fraction,
                    std::span<uint8_t> out) {
  if (test_page_is_zero(page_index, seed, zero_page_fraction)) {
    std::memset(out.data(), 0, out.size());
    return;
  }
  std::memcpy(out.data(), &page_index, 8);
  std::memcpy(out.data() + 8, &seed, 8);
  fill_xorshift(splitmix64(seed * 0x100000001B3ull + page_index) | 1, out.data() + 16, out.size() - 16);
}

void fill_write_pattern(uint64_t tag, uint64_t guest_offset, std::span<uint8_t> out) {
  std::memcpy(out.data(), &tag, 8);
  std::memcpy(out.data() + 8, &guest_offset, 8);
  fill_xorshift(splitmix64(tag ^ splitmix64(guest_offset)) | 1, out.data() + 16, out.size() - 16);
}

Status write_test_memory_file(const std::string& path, uint64_t size, uint64_t seed,
                              double zero_page_fraction) {
  if (size % kTestPageBytes != 0) {
    return fail("memory file size " + std::to_string(size) + " is not a multiple of 4096");
  }
  if (!(zero_page_fraction >= 0 && zero_page_fraction <= 1)) {
    return fail("zero page fraction must be within [0, 1]");
  }
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd) return fail_errno("cannot create memory file " + path);
  // 8 MiB chunks: few syscalls, and the buffer stays cache-unfriendly only once.
  constexpr uint64_t kChunk = 8ull << 20;
  std::vector<uint8_t> chunk(kChunk);
  uint64_t page = 0;
  for (uint64_t done = 0; done < size;) {
    const uint64_t length = std::min(kChunk, size - done);
    for (uint64_t at = 0; at < length; at += kTestPageBytes, ++page) {
      fill_test_page(page, seed, zero_page_fraction, {chunk.data() + at, kTestPageBytes});
    }
    for (uint64_t written = 0; written < length;) {
      ssize_t n = ::pwrite(fd.get(), chunk.data() + written, length - written,
                           static_cast<off_t>(done + written));
      if (n < 0) {
        if (errno == EINTR) continue;
        return fail_errno("write to memory file " + path + " failed");
      }
      written += static_cast<uint64_t>(n);
    }
    done += length;
  }
  if (::close(fd.release()) != 0) return fail_errno("closing memory file " + path + " failed");
  return {};
}

}  // namespace faultline::client
