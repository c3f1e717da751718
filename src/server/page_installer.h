// PageInstaller: the one path by which snapshot bytes enter a guest, for
// demand faults and prefetch runs alike.
//
// The rules every install keeps (docs/design.md, shared DESIGN.md §6):
//  - snapshot bytes are staged (read from the source) before the install
//    fence is entered, so the event reader never waits on storage;
//  - inside the fence each page's state is read again: a page a REMOVE made
//    zero since the bytes were staged ends the run before it (the bytes are
//    stale; the page serves zero from its next fault);
//  - every page of a run must still be untouched: a run never lands on a
//    present page (the guest may have written it). The one exception is a
//    demand fault's own page, which may be in any state that does not serve
//    zero: if it is present the kernel says EEXIST;
//  - under a WP registration, pages installed for a read are installed
//    write-protected (atomically, UFFDIO_COPY_MODE_WP);
//  - every page installed is recorded in the page-state table inside the
//    fence, from the state it had, so a REMOVE read meanwhile is never lost.
// Zeros are never stale bytes: install_zero(). But zeros for a fault that is
// itself stale (read before a REMOVE of its page, whose thread was woken by an
// install and went on to remove the page) would leave a removed page present:
// a removed page's zeros go in only while the page's REMOVE count is still the
// one the fault was read with, checked inside the fence.
//
// Thread-safety: install_run() and install_zero() from one thread per fence
// slot at a time (slots are the session's workers, prefault(), prefetch
// threads; the event reader uses kReaderUnfenced).
#pragma once

#include <cstdint>
#include <optional>

#include "guest/page_state.h"
#include "kernel/userfaultfd.h"
#include "server/install_fence.h"

namespace faultline {

class PageInstaller {
 public:
  // REQUIRES: every argument outlives the installer; `zero_page` holds at
  // least one page of zeros of the largest page size installed.
  PageInstaller(const kernel::Userfaultfd& uffd, InstallFence& fence, PageStateTable& pages, const uint8_t* zero_page)
      : uffd_(uffd), fence_(fence), pages_(pages), zero_page_(zero_page) {}

  struct Run {
    size_t slot = 0;          // the caller's fence slot
    uint64_t first_page = 0;  // global page index of the first page
    uint64_t address = 0;     // client address of the first page
    uint64_t page_size = 0;
    uint64_t pages = 0;  // pages in the run (contiguous in the client and in the source)
    // Staged bytes, page_size * pages of them; null installs zeros with
    // UFFDIO_ZEROPAGE (4 KiB pages without WP only).
    const uint8_t* staged = nullptr;
    bool protect = false;  // install write-protected (a read under a WP registration)
    bool write = false;    // the first page is installed for a write (it is dirty at once)
    // The first page is a demand fault's own page: it may be present (the
    // kernel then says EEXIST). Otherwise (prefetch) it must be untouched too.
    bool demand = false;
    int inject_errno = 0;  // tests: report this errno instead of issuing the ioctl
    // Fault-around: the pages after a demand fault's own (every page, for a
    // run without `demand`) are installed ahead of any fault on them and
    // marked so (PageStateTable::take_ahead).
    bool ahead = false;
  };
  struct Result {
    // The install's outcome, when one was issued.
    kernel::IoctlResult ioctl{kernel::IoctlOutcome::kDone, 0, 0};
    // Leading pages still installable inside the fence (0: nothing was issued).
    uint64_t eligible = 0;
    // Pages installed and recorded.
    uint64_t installed = 0;
  };

  // The event reader's slot: it installs without the fence, because it
  // records every REMOVE it reads before it serves anything, and a REMOVE it
  // has not read yet makes any install fail with EAGAIN.
  static constexpr size_t kReaderUnfenced = ~size_t{0};

  Result install_run(const Run& run);

  struct Zero {
    size_t slot = kReaderUnfenced;  // the caller's fence slot (used with `removals`)
    uint64_t page = 0;              // global page index
    uint64_t address = 0;           // client address of the page
    uint64_t page_size = 0;
    bool protect = false;
    PageState seen = PageState::kUntouched;       // the state the caller decided on
    PageState installed = PageState::kSnapshot;  // kZero after a REMOVE, kSnapshot for snapshot zeros
    bool write = false;
    int inject_errno = 0;
    // A removed page's zeros for a fault: installed only while the page's
    // REMOVE count is still this one (the count the fault was read with).
    std::optional<uint8_t> removals;
  };
  // Zeros at one page (a removed page, or one the snapshot holds as zeros).
  // Recorded as `installed` from `seen`; a REMOVE recorded in between wins.
  // With `removals` set and a fence slot, the count is checked and the zeros
  // installed inside the fence, so no REMOVE is read in between; the reader
  // (kReaderUnfenced) reads no REMOVE while it serves. nullopt: the count
  // moved (the fault may be stale), nothing was installed.
  // Protected or 2 MiB zeros are a copy of the zero page with MODE_WP:
  // UFFDIO_ZEROPAGE has no WP mode, "zeropage then writeprotect" leaves a
  // window in which a write goes unrecorded, and ZEROPAGE does not exist on
  // hugetlbfs.
  std::optional<kernel::IoctlResult> install_zero(const Zero& zero);

 private:
  const kernel::Userfaultfd& uffd_;
  InstallFence& fence_;
  PageStateTable& pages_;
  const uint8_t* zero_page_;
};

}  // namespace faultline
