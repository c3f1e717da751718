#include "server/published_layout.h"

#include <algorithm>
#include <limits>

namespace faultline {

PublishedLayout::PublishedLayout(GuestLayout initial, size_t reader_slots)
    : slots_(std::make_unique<Slot[]>(reader_slots)),
      slot_count_(reader_slots),
      owner_(std::make_shared<const GuestLayout>(std::move(initial))) {
  current_.store(owner_.get(), std::memory_order_seq_cst);
}

void PublishedLayout::publish(GuestLayout next) {
  auto fresh = std::make_shared<const GuestLayout>(std::move(next));
  retired_.reserve(retired_.size() + 1);  // so that nothing below can throw once `current_` changed
  current_.store(fresh.get(), std::memory_order_seq_cst);
  std::shared_ptr<const GuestLayout> old;
  {
    std::lock_guard lock(snapshot_mu_);
    old = std::exchange(owner_, std::move(fresh));
  }
  // Readers that see this epoch or a later one loaded `current_` after the
  // store above.
  const uint64_t retired_at = epoch_.fetch_add(1, std::memory_order_seq_cst) + 1;
  retired_.emplace_back(retired_at, std::move(old));
  peak_retained_.store(std::max(peak_retained_.load(std::memory_order_relaxed), 1 + retired_.size()),
                       std::memory_order_release);
  reclaim();
}

void PublishedLayout::reclaim() {
  if (!retired_.empty()) {
    uint64_t oldest_reader = std::numeric_limits<uint64_t>::max();
    for (size_t i = 0; i < slot_count_; ++i) {
      const uint64_t e = slots_[i].epoch.load(std::memory_order_seq_cst);
      if (e != 0) oldest_reader = std::min(oldest_reader, e);
    }
    // Retired in epoch order: free the prefix no reader can hold.
    auto keep = std::find_if(retired_.begin(), retired_.end(),
                             [&](const auto& r) { return r.first > oldest_reader; });
    retired_.erase(retired_.begin(), keep);
  }
  retained_.store(1 + retired_.size(), std::memory_order_release);
}

std::shared_ptr<const GuestLayout> PublishedLayout::snapshot() const {
  std::lock_guard lock(snapshot_mu_);
  return owner_;
}

}  // namespace faultline
