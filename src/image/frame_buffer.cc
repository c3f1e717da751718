#include "image/frame_buffer.h"

#include <sys/mman.h>

#include <array>
#include <bit>
#include <cstring>
#include <mutex>
#include <new>
#include <unordered_map>
#include <utility>
#include <vector>

namespace faultline::image {

namespace {

constexpr size_t kClasses = 6;  // slots of 64, 128, 256, 512 KiB, 1 MiB, 2 MiB (a whole chunk)
static_assert((FrameBuffer::kSmallest << (kClasses - 1)) == FrameBuffer::kChunk);

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// The bytes of a slot of class `c`, and the free-slot mask of a chunk of them.
size_t slot_bytes(size_t c) { return FrameBuffer::kSmallest << c; }
uint32_t all_slots(size_t c) {
  const size_t slots = FrameBuffer::kChunk / slot_bytes(c);
  return slots == 32 ? ~0u : ((1u << slots) - 1);
}

// `bytes` (a multiple of kChunk) aligned to kChunk, marked for transparent
// huge pages; null when the kernel refuses the mapping.
char* map_aligned(size_t bytes) {
  const size_t span = bytes + FrameBuffer::kChunk;
  void* m = ::mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  const auto start = reinterpret_cast<uintptr_t>(m);
  const uintptr_t aligned = round_up(start, FrameBuffer::kChunk);
  if (aligned > start) ::munmap(m, aligned - start);
  const uintptr_t end = start + span;
  if (end > aligned + bytes) ::munmap(reinterpret_cast<void*>(aligned + bytes), end - aligned - bytes);
  // EINVAL where the kernel has no transparent huge pages: ordinary pages.
  (void)::madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);
  return reinterpret_cast<char*>(aligned);
}

// The chunks of every FrameBuffer of the process.
class ChunkPool {
 public:
  // A slot of class `c` (size kSmallest << c), or null if no chunk can be
  // mapped.
  char* take(size_t c) {
    std::lock_guard lock(mu_);
    Chunk* chunk = nullptr;
    uintptr_t base = 0;
    if (!partial_[c].empty()) {
      base = partial_[c].back();
      chunk = &chunks_.at(base);
      free_slot_bytes_ -= slot_bytes(c);
    } else {
      if (!empty_.empty()) {
        base = empty_.back();
        empty_.pop_back();
        chunk = &chunks_.at(base);
        chunk->touched = ~0u;  // every slot's memory was written by an earlier frame
      } else {
        char* mem = map_aligned(FrameBuffer::kChunk);
        if (mem == nullptr) return nullptr;
        base = reinterpret_cast<uintptr_t>(mem);
        chunk = &chunks_[base];
        chunk->touched = 0;
        ++totals_.chunk_maps;
        totals_.fresh_bytes += FrameBuffer::kChunk;
      }
      chunk->cls = c;
      chunk->free = all_slots(c);
      partial_[c].push_back(base);
      free_slot_bytes_ += FrameBuffer::kChunk - slot_bytes(c);  // every slot but the one taken now
    }
    const int slot = std::countr_zero(chunk->free);
    chunk->free &= ~(1u << slot);
    if ((chunk->touched & (1u << slot)) != 0) ++totals_.slot_reuses;
    chunk->touched |= 1u << slot;
    if (chunk->free == 0) erase(partial_[c], base);
    return reinterpret_cast<char*>(base + static_cast<size_t>(slot) * slot_bytes(c));
  }

  void give_back(char* p) {
    const auto addr = reinterpret_cast<uintptr_t>(p);
    const uintptr_t base = addr & ~(FrameBuffer::kChunk - 1);
    std::lock_guard lock(mu_);
    Chunk& chunk = chunks_.at(base);
    const size_t c = chunk.cls;
    const bool was_full = chunk.free == 0;
    chunk.free |= 1u << ((addr - base) / slot_bytes(c));
    if (was_full) partial_[c].push_back(base);
    if (chunk.free != all_slots(c)) {
      free_slot_bytes_ += slot_bytes(c);
      return;
    }
    // Its last slot in use: the others were counted free, the chunk is now empty.
    free_slot_bytes_ -= FrameBuffer::kChunk - slot_bytes(c);
    erase(partial_[c], base);
    // Kept only while all frame memory, this chunk included, stays within
    // the limit: chunks in use stay mapped whatever the limit, so counting
    // only the empty ones would let them add a whole limit's worth on top
    // (after the frames held shift to another size, measured: 1.7x a frame
    // cache's budget mapped, a third of it empty chunks).
    if (mapped_bytes() <= keep_empty_) {
      empty_.push_back(base);
      return;
    }
    ::munmap(reinterpret_cast<void*>(base), FrameBuffer::kChunk);
    chunks_.erase(base);
  }

  void release_empty() {
    std::lock_guard lock(mu_);
    unmap_empty_while_mapped_over(0);
  }

  uint64_t keep_empty() {
    std::lock_guard lock(mu_);
    return keep_empty_;
  }
  void set_keep_empty(uint64_t bytes) {
    std::lock_guard lock(mu_);
    keep_empty_ = bytes;
    unmap_empty_while_mapped_over(keep_empty_);
  }

  FrameBuffer::Totals totals() {
    std::lock_guard lock(mu_);
    FrameBuffer::Totals t = totals_;
    t.chunks_mapped = chunks_.size();
    t.chunks_empty = empty_.size();
    t.mapped_bytes = mapped_bytes();
    t.free_slot_bytes = free_slot_bytes_;
    return t;
  }

  uint64_t count_free_slot_bytes() {
    std::lock_guard lock(mu_);
    uint64_t bytes = 0;
    for (const auto& [base, chunk] : chunks_) {
      if (chunk.free != all_slots(chunk.cls)) bytes += std::popcount(chunk.free) * slot_bytes(chunk.cls);
    }
    return bytes;
  }

  uint64_t free_slot_bytes() {
    std::lock_guard lock(mu_);
    return free_slot_bytes_;
  }

  // A frame's own mapping (larger than a chunk) was made (+) or unmapped (-).
  void own_mapping(size_t bytes, bool made) {
    std::lock_guard lock(mu_);
    if (made) {
      own_mapped_ += bytes;
      totals_.fresh_bytes += bytes;
    } else {
      own_mapped_ -= bytes;
    }
  }

 private:
  struct Chunk {
    size_t cls = 0;
    uint32_t free = 0;     // bit i: slot i free
    uint32_t touched = 0;  // bit i: slot i handed out before (its memory faulted in)
  };
  // Chunks (in use or kept empty) and own mappings. REQUIRES: mu_ held.
  uint64_t mapped_bytes() const { return chunks_.size() * FrameBuffer::kChunk + own_mapped_; }
  // Unmaps kept empty chunks while the frame memory mapped is over `bytes`
  // (all of them for 0). REQUIRES: mu_ held.
  void unmap_empty_while_mapped_over(uint64_t bytes) {
    while (!empty_.empty() && mapped_bytes() > bytes) {
      ::munmap(reinterpret_cast<void*>(empty_.back()), FrameBuffer::kChunk);
      chunks_.erase(empty_.back());
      empty_.pop_back();
    }
  }
  static void erase(std::vector<uintptr_t>& v, uintptr_t base) {
    for (size_t i = 0; i < v.size(); ++i) {
      if (v[i] == base) {
        v[i] = v.back();
        v.pop_back();
        return;
      }
    }
  }

  std::mutex mu_;
  std::unordered_map<uintptr_t, Chunk> chunks_;           // every chunk mapped, by base address
  std::array<std::vector<uintptr_t>, kClasses> partial_;  // chunks of a class with a free slot
  std::vector<uintptr_t> empty_;                          // chunks with no slot in use, kept
  uint64_t own_mapped_ = 0;                               // bytes of frames' own mappings
  uint64_t free_slot_bytes_ = 0;                          // free slots of the chunks with a slot in use
  uint64_t keep_empty_ = FrameBuffer::kDefaultKeepEmpty;
  FrameBuffer::Totals totals_;
};

// Never destroyed: buffers may be freed by static destructors after main.
ChunkPool& pool() {
  static ChunkPool* p = new ChunkPool;
  return *p;
}

}  // namespace

FrameBuffer FrameBuffer::allocate(size_t size) {
  FrameBuffer b;
  if (size == 0) return b;
  b.size_ = size;
  if (size > kChunk) {
    const size_t bytes = round_up(size, kChunk);
    if (char* m = map_aligned(bytes)) {
      b.data_ = m;
      b.footprint_ = bytes;
      b.kind_ = Kind::kMapping;
      pool().own_mapping(bytes, true);
      return b;
    }
  } else if (size >= kSmallest) {
    const size_t c = static_cast<size_t>(std::countr_zero(std::bit_ceil(size) / kSmallest));
    if (char* p = pool().take(c)) {
      b.data_ = p;
      b.footprint_ = slot_bytes(c);
      b.kind_ = Kind::kSlot;
      return b;
    }
  }
  b.data_ = static_cast<char*>(::operator new(size));
  b.footprint_ = size;
  b.kind_ = Kind::kHeap;
  return b;
}

FrameBuffer FrameBuffer::copy_of(std::string_view bytes) {
  FrameBuffer b = allocate(bytes.size());
  if (!bytes.empty()) std::memcpy(b.data(), bytes.data(), bytes.size());
  return b;
}

FrameBuffer::FrameBuffer(FrameBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      footprint_(std::exchange(other.footprint_, 0)),
      kind_(std::exchange(other.kind_, Kind::kNone)) {}

FrameBuffer& FrameBuffer::operator=(FrameBuffer&& other) noexcept {
  // Move-and-swap: `moved` takes other's memory, then ours, and releases it.
  FrameBuffer moved(std::move(other));
  std::swap(data_, moved.data_);
  std::swap(size_, moved.size_);
  std::swap(footprint_, moved.footprint_);
  std::swap(kind_, moved.kind_);
  return *this;
}

FrameBuffer::~FrameBuffer() { reset(); }

void FrameBuffer::reset() {
  switch (kind_) {
    case Kind::kNone:
      break;
    case Kind::kHeap:
      ::operator delete(data_);
      break;
    case Kind::kSlot:
      pool().give_back(data_);
      break;
    case Kind::kMapping:
      ::munmap(data_, footprint_);
      pool().own_mapping(footprint_, false);
      break;
  }
  data_ = nullptr;
  size_ = footprint_ = 0;
  kind_ = Kind::kNone;
}

FrameBuffer::Totals FrameBuffer::totals() { return pool().totals(); }

uint64_t FrameBuffer::free_slot_bytes() { return pool().free_slot_bytes(); }

uint64_t FrameBuffer::count_free_slot_bytes() { return pool().count_free_slot_bytes(); }

void FrameBuffer::release_empty_chunks() { pool().release_empty(); }

uint64_t FrameBuffer::keep_empty_bytes() { return pool().keep_empty(); }

void FrameBuffer::set_keep_empty_bytes(uint64_t bytes) { pool().set_keep_empty(bytes); }

}  // namespace faultline::image
