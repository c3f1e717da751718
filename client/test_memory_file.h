// A deterministic stand-in for a Firecracker memory snapshot file.
//
// Every 4 KiB page is either all zero (a fraction of them, as in a real
// snapshot of a guest that has not touched all its memory) or distinct from
// every other page: its first qword is the page index, its second the seed,
// the rest xorshift bytes seeded from both. A page installed at the wrong
// offset, from the wrong file or half-copied therefore never passes for the
// right one.
//
// Pure functions; safe to call from any thread.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "common/error.h"

namespace faultline::client {

inline constexpr uint64_t kTestPageBytes = 4096;

// Whether page `page_index` of a file generated with (seed, zero_page_fraction)
// is all zero.
bool test_page_is_zero(uint64_t page_index, uint64_t seed, double zero_page_fraction);

// Fills `out` (kTestPageBytes) with the contents of page `page_index`.
void fill_test_page(uint64_t page_index, uint64_t seed, double zero_page_fraction,
                    std::span<uint8_t> out);

// Creates (or truncates) `path` and writes `size` bytes of test pages.
// REQUIRES: size is a multiple of 4096; 0 <= zero_page_fraction <= 1.
// Writes in large chunks (hundreds of MB/s on the machines this runs on).
Status write_test_memory_file(const std::string& path, uint64_t size, uint64_t seed,
                              double zero_page_fraction);

// The pattern a host thread of the client stamps over a whole guest page it
// writes: first qword `tag`, second qword the page's guest offset (the same 16
// bytes a KVM vCPU writes), then xorshift bytes seeded from both, so the rest
// of the page is checkable too. Fills all of `out`.
void fill_write_pattern(uint64_t tag, uint64_t guest_offset, std::span<uint8_t> out);

// splitmix64: the seed expander used for all of the above.
uint64_t splitmix64(uint64_t x);

}  // namespace faultline::client
