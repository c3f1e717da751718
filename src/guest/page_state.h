// PageStateTable: what faultline knows about every guest page, two bytes per
// page, readable and updatable from any thread without a lock.
//
// The state decides where a page's next install comes from: the snapshot only
// while the page has never been removed; zero after any REMOVE. It also
// records whether the page was installed for a write (dirty from the start).
//
// The second byte counts the REMOVEs that covered the page (wrapping). A fault
// carries the count it was read with: a fault served after a REMOVE of its page
// was read may be stale (its thread was woken by an install and went on to
// write and remove the page itself), and serving it would bring a removed page
// back as present zeros. Such a fault is answered with a wake only; a thread
// that still needs the page faults again (see Session::serve).
//
// Thread-safety: every operation is a single atomic access on the page's byte;
// safe for concurrent use. Ordering between a REMOVE and a racing install is
// NOT this table's job: see server/install_fence.h.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

namespace faultline {

enum class PageState : uint8_t {
  kUntouched = 0,  // never installed; the next fault is served from the snapshot
  kSnapshot = 1,   // installed from the snapshot
  kZero = 2,       // installed as zeros (after a REMOVE). The kernel may still zap it: a REMOVE
                   // read just before the install zaps asynchronously, so presence is the
                   // kernel's to say (pagemap), never this table's.
  kRemoved = 3,    // removed since its last install; the next fault is served zero
};
const char* to_string(PageState state);

class PageStateTable {
 public:
  explicit PageStateTable(uint64_t page_count)
      : count_(page_count),
        bytes_(std::make_unique<std::atomic<uint8_t>[]>(page_count)),
        removals_(std::make_unique<std::atomic<uint8_t>[]>(page_count)) {
    for (uint64_t i = 0; i < count_; ++i) {
      bytes_[i].store(0, std::memory_order_relaxed);
      removals_[i].store(0, std::memory_order_relaxed);
    }
  }
  PageStateTable(const PageStateTable&) = delete;
  PageStateTable& operator=(const PageStateTable&) = delete;

  uint64_t size() const { return count_; }

  PageState state(uint64_t page) const { return decode(bytes_[page].load(std::memory_order_acquire)); }
  bool written(uint64_t page) const {
    return (bytes_[page].load(std::memory_order_acquire) & kWrittenBit) != 0;
  }

  // Whether a fault on this page must be served zero: true once it was ever
  // removed, because the guest gave the page back and its snapshot bytes are
  // stale from then on.
  static bool serves_zero(PageState s) { return s == PageState::kZero || s == PageState::kRemoved; }

  // REMOVE: the page reads zero from its next fault on. Clears the written
  // bit (the guest's bytes are gone); keeps the bookkeeping bits; counts the
  // removal before the state changes, so whoever sees the new state sees the
  // new count.
  void mark_removed(uint64_t page) {
    removals_[page].fetch_add(1, std::memory_order_relaxed);
    uint8_t cur = bytes_[page].load(std::memory_order_acquire);
    while (!bytes_[page].compare_exchange_weak(cur, static_cast<uint8_t>((cur & kKeepMask) |
                                                                         static_cast<uint8_t>(PageState::kRemoved)),
                                               std::memory_order_acq_rel)) {
    }
  }

  // How many REMOVEs covered the page, modulo 256 (see the file comment).
  uint8_t removals(uint64_t page) const { return removals_[page].load(std::memory_order_acquire); }

  // Records an install, unless the state moved away from `expected` meanwhile
  // (a REMOVE won the race: keep kRemoved). Returns whether it was recorded.
  // `ahead`: installed ahead of any fault on it (fault-around), see take_ahead().
  bool record_install(uint64_t page, PageState expected, PageState installed, bool for_write, bool ahead = false) {
    uint8_t cur = bytes_[page].load(std::memory_order_acquire);
    while (decode(cur) == expected) {
      const uint8_t next = static_cast<uint8_t>((cur & kKeepMask) | static_cast<uint8_t>(installed) |
                                                (for_write ? kWrittenBit : 0) | (ahead ? kAheadBit : 0));
      if (bytes_[page].compare_exchange_weak(cur, next, std::memory_order_acq_rel)) return true;
    }
    return false;
  }

  // First fault on the page since restore? Sets the touched bit; returns
  // true only for the call that set it (for first-touch recording).
  bool mark_touched(uint64_t page) {
    return (bytes_[page].fetch_or(kTouchedBit, std::memory_order_acq_rel) & kTouchedBit) == 0;
  }
  // The page is in the prefetch plan (for counting faults prefetch was too late for).
  void mark_planned(uint64_t page) { bytes_[page].fetch_or(kPlannedBit, std::memory_order_acq_rel); }
  bool planned(uint64_t page) const { return (bytes_[page].load(std::memory_order_acquire) & kPlannedBit) != 0; }

  // A fault on a page that was installed ahead (its first fault since): true
  // once, for the call that clears the mark. A REMOVE or a later install
  // clears it too (the page's bytes are no longer the ones installed ahead).
  bool take_ahead(uint64_t page) {
    return (bytes_[page].fetch_and(static_cast<uint8_t>(~kAheadBit), std::memory_order_acq_rel) & kAheadBit) != 0;
  }
  // The guest wrote an installed page (a write-protect fault was resolved).
  void mark_written(uint64_t page) { bytes_[page].fetch_or(kWrittenBit, std::memory_order_acq_rel); }

  static constexpr size_t kBytesPerPage = 2;

 private:
  // bits 0-3 state, 4 written, 5 touched (faulted), 6 planned (prefetch),
  // 7 installed ahead (fault-around) and not faulted since
  static constexpr uint8_t kStateMask = 0x0f;
  static constexpr uint8_t kWrittenBit = 0x10;
  static constexpr uint8_t kTouchedBit = 0x20;
  static constexpr uint8_t kPlannedBit = 0x40;
  static constexpr uint8_t kAheadBit = 0x80;
  static constexpr uint8_t kKeepMask = kTouchedBit | kPlannedBit;
  static PageState decode(uint8_t b) { return static_cast<PageState>(b & kStateMask); }

  uint64_t count_;
  std::unique_ptr<std::atomic<uint8_t>[]> bytes_;
  std::unique_ptr<std::atomic<uint8_t>[]> removals_;
};

}  // namespace faultline
