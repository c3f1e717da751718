#include "server/page_installer.h"

#include "guest/layout.h"

namespace faultline {

PageInstaller::Result PageInstaller::install_run(const Run& run) {
  Result result;
  const bool fenced = run.slot != kReaderUnfenced;
  if (fenced) fence_.enter(run.slot);
  // Inside the fence no REMOVE can be read without being recorded first, so
  // the states read here hold until exit(): what is installable now stays so.
  const PageState first_state = pages_.state(run.first_page);
  if (run.demand ? !PageStateTable::serves_zero(first_state) : first_state == PageState::kUntouched) {
    result.eligible = 1;
    while (result.eligible < run.pages && pages_.state(run.first_page + result.eligible) == PageState::kUntouched) {
      ++result.eligible;
    }
  }
  if (result.eligible > 0) {
    const uint64_t len = result.eligible * run.page_size;
    if (run.inject_errno != 0) {
      result.ioctl = kernel::result_for_errno(run.inject_errno);
    } else if (run.staged == nullptr) {
      result.ioctl = uffd_.zeropage(run.address, len, false);
    } else {
      result.ioctl = uffd_.copy(run.address, run.staged, len, run.protect, false);
    }
    // A partial install (a later page present, or a pending event) reports
    // the bytes it did install.
    result.installed =
        result.ioctl.outcome == kernel::IoctlOutcome::kDone ? result.eligible : result.ioctl.bytes / run.page_size;
    for (uint64_t k = 0; k < result.installed; ++k) {
      pages_.record_install(run.first_page + k, k == 0 ? first_state : PageState::kUntouched, PageState::kSnapshot,
                            k == 0 && run.write, run.ahead && (k > 0 || !run.demand));
    }
  }
  if (fenced) fence_.exit(run.slot);
  return result;
}

std::optional<kernel::IoctlResult> PageInstaller::install_zero(const Zero& z) {
  const bool fenced = z.removals && z.slot != kReaderUnfenced;
  if (fenced) fence_.enter(z.slot);
  std::optional<kernel::IoctlResult> r;
  if (!z.removals || pages_.removals(z.page) == *z.removals) {
    if (z.inject_errno != 0) {
      r = kernel::result_for_errno(z.inject_errno);
    } else if (z.protect || z.page_size != kPageSize4K) {
      r = uffd_.copy(z.address, zero_page_, z.page_size, z.protect, false);
    } else {
      r = uffd_.zeropage(z.address, z.page_size, false);
    }
    if (r->outcome == kernel::IoctlOutcome::kDone) pages_.record_install(z.page, z.seen, z.installed, z.write);
  }
  if (fenced) fence_.exit(z.slot);
  return r;
}

}  // namespace faultline
