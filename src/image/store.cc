#include "image/store.h"

#include <cerrno>

namespace faultline::image {

std::string ImageLease::describe() const {
  return "pid " + std::to_string(pid) + " on " + (host.empty() ? std::string("an unnamed host") : host) + " since " +
         since + " (" + path + ")";
}

Result<std::unique_ptr<StoreLock>> Store::lease(const std::string& name) {
  return fail("this store keeps no leases (image " + name + " is served unleased)", ENOTSUP);
}

Result<std::vector<ImageLease>> Store::live_leases(bool /*remove_stale*/, uint64_t* removed) {
  if (removed != nullptr) *removed = 0;
  return std::vector<ImageLease>{};
}

}  // namespace faultline::image
