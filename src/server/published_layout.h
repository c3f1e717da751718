// PublishedLayout: the session's current GuestLayout, replaced by the event
// reader on every UNMAP or REMAP, read lock-free by the session's threads,
// with every layout no thread can still be reading freed.
//
// Why not keep every layout until the session ends: UNMAP/REMAP events come
// from the client (Firecracker never enables them, but a hostile or unusual
// client can send millions), and each layout holds every mapped segment, so
// the history grew without bound (quadratically, when each munmap splits a
// segment). Why not cap the number of changes instead: a cap still lets a
// session hold cap x segments layouts, and ends a client that merely remaps
// often. Here at most the current layout plus those retired while some
// reader was inside a read section are kept.
//
// How (epoch-based reclamation, one slot per reading thread):
//   reader:  e = epoch; slot = e (seq_cst); p = current (seq_cst); use *p; slot = 0 (release)
//   writer:  current = next (seq_cst); r = ++epoch; retire(old, r);
//            free every retired layout whose r <= every non-zero slot
// A slot holding e >= r read the epoch after it was bumped, so after
// `current` changed: it cannot hold a layout retired at r. A slot read as 0
// either finished (its release store orders its reads before the free) or
// has not loaded `current` yet (seq_cst: it will see the new one). A slot
// holding e < r may hold anything older: its layouts are kept.
//
// The fault path pays one seq_cst store (an xchg on x86) per read section.
// Threads with no slot (the control socket, tests) take a snapshot(): shared
// ownership, so a layout they hold outlives its retirement.
//
// Thread-safety: publish() and current_for_writer() from one thread (the
// writer) only; read(slot) from one thread per slot at a time (nested read
// sections on the same thread are fine); snapshot(), retained() from any
// thread.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "guest/layout.h"

namespace faultline {

class PublishedLayout {
 public:
  PublishedLayout(GuestLayout initial, size_t reader_slots);
  PublishedLayout(const PublishedLayout&) = delete;
  PublishedLayout& operator=(const PublishedLayout&) = delete;

  // A read section: the layout it shows stays valid until it is destroyed.
  class Reader {
   public:
    Reader(Reader&& other) noexcept : owner_(std::exchange(other.owner_, nullptr)), slot_(other.slot_), layout_(other.layout_) {}
    Reader(const Reader&) = delete;
    Reader& operator=(const Reader&) = delete;
    Reader& operator=(Reader&&) = delete;
    ~Reader() {
      if (owner_ != nullptr) owner_->leave(slot_);
    }
    const GuestLayout& operator*() const { return *layout_; }
    const GuestLayout* operator->() const { return layout_; }

   private:
    friend class PublishedLayout;
    Reader(const PublishedLayout* owner, size_t slot, const GuestLayout* layout)
        : owner_(owner), slot_(slot), layout_(layout) {}
    const PublishedLayout* owner_;
    size_t slot_;
    const GuestLayout* layout_;
  };

  // Enters a read section on `slot` (0 <= slot < reader_slots).
  Reader read(size_t slot) const {
    Slot& s = slots_[slot];
    if (s.depth++ == 0) {
      s.epoch.store(epoch_.load(std::memory_order_seq_cst), std::memory_order_seq_cst);
    }
    return Reader(this, slot, current_.load(std::memory_order_seq_cst));
  }

  // The writer's view: only the writer replaces layouts, so the current one
  // cannot be freed under it. Writer only.
  const GuestLayout& current_for_writer() const { return *current_.load(std::memory_order_relaxed); }
  // The same as a Reader, for code shared by the writer and slot readers;
  // it costs nothing (no slot is touched). Writer only.
  Reader writer_view() const { return Reader(nullptr, 0, &current_for_writer()); }

  // Makes `next` current, retires the old one and frees what no reader can
  // still hold. Writer only.
  void publish(GuestLayout next);
  // Frees what no reader can still hold (publish() does this too; the writer
  // calls it again later so that a layout pinned by a read section that has
  // since ended does not wait for the next change). Writer only.
  void reclaim();

  // Shared ownership of the current layout, for threads without a slot.
  std::shared_ptr<const GuestLayout> snapshot() const;

  // Layouts still held here: the current one plus retired ones (a
  // snapshot() holder may keep one alive longer).
  size_t retained() const { return retained_.load(std::memory_order_acquire); }
  // The most layouts ever held at once, right after a publish() (before it
  // freed what it could) included.
  size_t peak_retained() const { return peak_retained_.load(std::memory_order_acquire); }
  // How many times publish() replaced the layout.
  uint64_t changes() const { return epoch_.load(std::memory_order_acquire) - 1; }

 private:
  struct alignas(64) Slot {
    std::atomic<uint64_t> epoch{0};  // 0: not reading
    uint32_t depth = 0;              // nested read sections; touched by the slot's thread only
  };
  void leave(size_t slot) const {
    Slot& s = slots_[slot];
    if (--s.depth == 0) s.epoch.store(0, std::memory_order_release);
  }

  std::unique_ptr<Slot[]> slots_;
  size_t slot_count_;
  std::atomic<uint64_t> epoch_{1};
  std::atomic<const GuestLayout*> current_{nullptr};
  mutable std::mutex snapshot_mu_;
  std::shared_ptr<const GuestLayout> owner_;  // GUARDED_BY(snapshot_mu_) for readers; written by the writer
  // Retired layouts and the epoch they were retired at, oldest first. Writer only.
  std::vector<std::pair<uint64_t, std::shared_ptr<const GuestLayout>>> retired_;
  std::atomic<size_t> retained_{1};
  std::atomic<size_t> peak_retained_{1};
};

}  // namespace faultline
