#include "image/store.h"

#include <unistd.h>

#include <cerrno>

namespace faultline::image {

DeferredPuts::~DeferredPuts() {
  for (const auto& [temporary, final_path] : pending_) ::unlink(temporary.c_str());
}

void DeferredPuts::add(std::string temporary, std::string final_path) {
  std::lock_guard lock(mu_);
  pending_.emplace_back(std::move(temporary), std::move(final_path));
}

std::vector<std::pair<std::string, std::string>> DeferredPuts::take() {
  std::lock_guard lock(mu_);
  return std::exchange(pending_, {});
}

ImageHold hold_image(Store& store, const std::string& name, std::string_view use, const HoldOptions& options) {
  const auto unleased = [&](const Error& e) {
    if (e.code != ENOTSUP && options.on_unleased) options.on_unleased(e);
  };
  ImageHold hold;
  if (auto locked = store.lock_shared(options.on_lock_wait)) {
    hold.lock = std::move(*locked);
  } else {
    unleased(locked.error());
  }
  if (auto leased = store.lease(name, use)) {
    hold.lease = std::move(*leased);
  } else {
    unleased(leased.error());
  }
  return hold;
}

std::string ImageLease::describe() const {
  return "pid " + std::to_string(pid) + " on " + (host.empty() ? std::string("an unnamed host") : host) + " since " +
         since + " (" + path + ")";
}

Result<std::unique_ptr<StoreLock>> Store::lease(const std::string& name, std::string_view /*use*/) {
  return fail("this store keeps no leases (image " + name + " is served unleased)", ENOTSUP);
}

Result<std::vector<ImageLease>> Store::live_leases(bool /*remove_stale*/, uint64_t* removed) {
  if (removed != nullptr) *removed = 0;
  return std::vector<ImageLease>{};
}

}  // namespace faultline::image
