// DelegatingStore: an image::Store that passes the blob and manifest calls
// and the locks to another store; a test derives from it and overrides what
// it wants to watch or break (a blob read that counts, damages or stalls).
// Leases, put_deferred/sync and the hints (useful_concurrent_gets,
// checksum_suffices) keep image::Store's defaults: a wrapped LocalStore
// keeps no leases and its frames are checked by SHA-256.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "image/store.h"

namespace faultline::testing {

class DelegatingStore : public image::Store {
 public:
  explicit DelegatingStore(std::unique_ptr<image::Store> inner) : owned_(std::move(inner)), inner_(owned_.get()) {}
  // Passes to a store the caller keeps (it must outlive this one).
  explicit DelegatingStore(image::Store& inner) : inner_(&inner) {}

  // Blob reads come here: the defaults of get_sized() and get_checked() call
  // get(), so an override of get() sees every read.
  Result<std::string> get(const image::BlobId& id) override { return inner_->get(id); }
  Status put(const image::BlobId& id, std::string_view b) override { return inner_->put(id, b); }
  Result<bool> exists(const image::BlobId& id) override { return inner_->exists(id); }
  Result<std::vector<image::BlobId>> list() override { return inner_->list(); }
  Status remove(const image::BlobId& id) override { return inner_->remove(id); }
  std::string describe(const image::BlobId& id) const override { return inner_->describe(id); }
  std::string identity() const override { return inner_->identity(); }
  Result<std::string> read_manifest(const std::string& n) override { return inner_->read_manifest(n); }
  Result<bool> manifest_exists(const std::string& n) override { return inner_->manifest_exists(n); }
  Status write_manifest(const std::string& n, std::string_view b) override { return inner_->write_manifest(n, b); }
  Result<std::vector<std::string>> list_manifests() override { return inner_->list_manifests(); }
  Status remove_manifest(const std::string& n) override { return inner_->remove_manifest(n); }
  std::string describe_manifest(const std::string& n) const override { return inner_->describe_manifest(n); }
  Result<std::unique_ptr<image::StoreLock>> lock_shared(const std::function<void()>& w) override {
    return inner_->lock_shared(w);
  }
  Result<std::unique_ptr<image::StoreLock>> lock_exclusive(const std::function<void()>& w) override {
    return inner_->lock_exclusive(w);
  }

 private:
  std::unique_ptr<image::Store> owned_;
  image::Store* inner_;
};

}  // namespace faultline::testing
