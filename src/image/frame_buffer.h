// FrameBuffer: the memory one decompressed frame lives in.
//
// A cold image restore decompresses every frame it needs into memory the
// process has never used. On the nested VMs this project runs on, the first
// write of a fresh 4 KiB page costs 10-25 us (docs/performance.md, "Image
// serving"), so faulting in a 2 MiB frame page by page costs 4-8 ms, several
// times what hashing and decompressing it cost. A transparent huge page is
// faulted in with one fault: the same 2 MiB cost ~0.2 ms there (measured,
// docs/performance.md "Frame memory").
//
// So frames of at least kSmallest bytes live in 2 MiB-aligned chunks marked
// MADV_HUGEPAGE: a frame of up to 1 MiB takes a slot of a chunk split into
// equal power-of-two slots (64 KiB to 1 MiB: 512 KiB frames of the default
// image take a quarter of a chunk), a frame of up to 2 MiB a whole chunk, a
// larger one a mapping of its own rounded up to 2 MiB. A freed slot is reused
// by the next frame of its size (memory already faulted in), and a chunk whose
// slots are all free is kept for reuse by any size while all frame memory
// mapped, chunks in use included, stays within keep_empty_bytes() (default
// kDefaultKeepEmpty, the default frame cache size; a Server raises it to its
// frame cache's capacity); beyond that it is unmapped. A
// daemon's frame cache frees frames only to make room for others, whose load
// takes the freed slot at once; chunks fall empty when a cache is dropped
// (a Server stopped in a process that goes on), and the next one reuses them
// as a long-running daemon would, instead of first-touching new memory. Smaller frames (a few pages of a diff) come
// from the heap. Where transparent huge pages are off, the chunks are ordinary
// memory and the reuse still saves the first-touch cost.
//
// footprint() is the memory a buffer holds (its slot, chunk or mapping):
// what the frame cache counts against its budget, so the budget bounds memory,
// not only decompressed bytes. Not counted: the free slots of chunks partly in
// use. A new frame takes a free slot of its size before a new chunk is mapped,
// so a size's chunks hold at most its peak of live slots rounded up to a chunk;
// but a chunk whose slots of one size were freed unevenly cannot serve another
// size until it is empty: while the sizes of the frames held shift (images
// with other frame sizes), the old size's chunks stay mapped for their last
// frames. The frame cache counts those free slots (free_slot_bytes()) against
// its budget beyond an allowance of one chunk per slot size, so frame memory
// stays within the budget plus 12 MiB (and what callers hold); without that,
// 1.25-1.72x a 64 MiB cache's budget was measured. Once the old frames are
// gone their chunks are empty and, not being kept beyond the limit, unmapped
// (frame_cache_test, FrameMemoryStaysNearTheBudgetWhileTheFramesHeldShift...).
// The faultline_frame_memory_bytes gauge shows what is mapped.
//
// Thread-safety: allocate() and the destructor may run on any thread (one
// mutex guards the chunk lists); one buffer is not synchronized.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace faultline::image {

class FrameBuffer {
 public:
  static constexpr size_t kChunk = 2u << 20;
  static constexpr size_t kSmallest = 64u << 10;  // smaller frames: the heap
  static constexpr uint64_t kDefaultKeepEmpty = 256ull << 20;

  FrameBuffer() = default;
  // `size` bytes, uninitialized.
  static FrameBuffer allocate(size_t size);
  static FrameBuffer copy_of(std::string_view bytes);

  FrameBuffer(FrameBuffer&& other) noexcept;
  FrameBuffer& operator=(FrameBuffer&& other) noexcept;
  FrameBuffer(const FrameBuffer&) = delete;
  FrameBuffer& operator=(const FrameBuffer&) = delete;
  ~FrameBuffer();

  char* data() { return data_; }
  const char* data() const { return data_; }
  size_t size() const { return size_; }
  size_t footprint() const { return footprint_; }
  std::string_view view() const { return {data_, size_}; }
  char operator[](size_t i) const { return data_[i]; }

  // Process-wide figures of frame memory (chunks and own mappings; not the
  // heap buffers of small frames), for metrics, tests and the bench.
  struct Totals {
    uint64_t chunks_mapped = 0;  // chunks mapped now (in use or kept empty)
    uint64_t chunks_empty = 0;   // of those, kept empty for reuse
    uint64_t chunk_maps = 0;     // chunks ever mapped (fresh memory)
    uint64_t slot_reuses = 0;    // allocations served from memory used before
    uint64_t mapped_bytes = 0;   // chunks and own mappings held now
    uint64_t fresh_bytes = 0;    // ever mapped: memory a frame first-touched
    uint64_t free_slot_bytes = 0;  // free slots of chunks with a slot in use (free_slot_bytes())
  };
  static Totals totals();
  // Frame memory mapped that no buffer uses and only buffers of the same slot
  // size can: the free slots of chunks that have a slot in use (not the
  // chunks kept empty, which serve any size). The frame cache counts it
  // against its budget, so that frames shifting in size cannot leave it
  // holding its capacity plus the old size's sparse chunks.
  static uint64_t free_slot_bytes();
  // The same, counted over every chunk now rather than kept as a running
  // count (tests check the one against the other).
  static uint64_t count_free_slot_bytes();
  // Unmaps the chunks kept empty (tests, the bench's fresh-daemon figures).
  static void release_empty_chunks();
  // Empty chunks are kept for reuse only while all frame memory of the
  // process (chunks in use and kept, own mappings) stays within this many
  // bytes. Lowering it unmaps the kept chunks beyond it.
  static uint64_t keep_empty_bytes();
  static void set_keep_empty_bytes(uint64_t bytes);

 private:
  enum class Kind : uint8_t { kNone, kHeap, kSlot, kMapping };
  void reset();

  char* data_ = nullptr;
  size_t size_ = 0;
  size_t footprint_ = 0;
  Kind kind_ = Kind::kNone;
};

}  // namespace faultline::image
