// GuestRegion: one guest memory region as Firecracker describes it in the
// uffd handshake (see shared DESIGN.md §2).
//
// A plain value type. `offset` is the region's byte offset in the memory
// snapshot file; Firecracker lays regions out back to back in order, so the
// file size is the sum of region sizes. `page_size` is in bytes (4096 or
// 2097152) whatever the JSON field name says.
#pragma once

#include <cstdint>

namespace faultline {

inline constexpr uint64_t kPageSize4K = 4096;
inline constexpr uint64_t kPageSize2M = 2ull * 1024 * 1024;

// The most regions one handshake may ever be allowed to carry: the ceiling of
// `faultline serve --max-regions` (the default is far lower, see
// protocol::HandshakeOptions::max_regions). 8192 regions in Firecracker's
// JSON (~117 bytes each with the longest numbers) still fit in the 1 MiB
// handshake limit; no real VMM comes near it.
inline constexpr uint64_t kMaxRegionsCeiling = 8192;

struct GuestRegion {
  uint64_t base_host_virt_addr = 0;  // start of the region in the client's address space
  uint64_t size = 0;                 // bytes
  uint64_t offset = 0;               // byte offset of the region in the memory file
  uint64_t page_size = kPageSize4K;  // bytes

  uint64_t end() const { return base_host_virt_addr + size; }
  bool contains(uint64_t addr) const { return addr >= base_host_virt_addr && addr < end(); }
  friend bool operator==(const GuestRegion&, const GuestRegion&) = default;
};

}  // namespace faultline
