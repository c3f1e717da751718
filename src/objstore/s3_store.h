// S3Store: an image store in an S3 bucket, under a prefix:
//
//   PREFIX/blobs/sha256/<64 hex>   one object per blob (content-addressed frame)
//   PREFIX/images/<NAME>           one object per manifest
//
// The same layout as a LocalStore directory, so `faultline image push/pull`
// copy objects one to one. S3 makes an object visible whole or not at all,
// which is the all-or-nothing put the Store contract asks for; manifests are
// written after every blob they reference (copy_image in image/transfer.h).
//
// Not offered: the gc lock. A bucket has no lock a fleet of writers would
// honour, so lock_exclusive() (gc) fails with ENOTSUP and lock_shared()
// returns a lock that excludes nothing.
//
// Thread-safety: safe for concurrent use (S3Client is).
#pragma once

#include <memory>
#include <string>

#include "image/store.h"
#include "objstore/s3_client.h"

namespace faultline::objstore {

class S3Store final : public image::Store {
 public:
  // Checks that the bucket answers (a missing bucket or refused credentials
  // are reported here, naming what is missing). `create_bucket`: create it
  // when it does not exist (push).
  static Result<std::unique_ptr<S3Store>> open(std::shared_ptr<S3Client> client, S3Location where,
                                               bool create_bucket);

  // At most a frame's largest compressed size (image::kMaxFrameBytes and
  // zstd's bound): a larger object is not received (EFBIG).
  Result<std::string> get(const image::BlobId& id) override;
  // Exactly `size` bytes, when known: a larger object is not received.
  Result<std::string> get_sized(const image::BlobId& id, uint64_t size) override;
  Status put(const image::BlobId& id, std::string_view bytes) override;
  Result<bool> exists(const image::BlobId& id) override;
  Result<std::vector<image::BlobId>> list() override;
  Status remove(const image::BlobId& id) override;
  std::string describe(const image::BlobId& id) const override;
  std::string identity() const override;

  Result<std::string> read_manifest(const std::string& name) override;
  Result<bool> manifest_exists(const std::string& name) override;
  Status write_manifest(const std::string& name, std::string_view bytes) override;
  Status remove_manifest(const std::string& name) override;
  Result<std::vector<std::string>> list_manifests() override;
  std::string describe_manifest(const std::string& name) const override;

  Result<std::unique_ptr<image::StoreLock>> lock_shared(const std::function<void()>& on_wait) override;
  Result<std::unique_ptr<image::StoreLock>> lock_exclusive(const std::function<void()>& on_wait) override;

  S3Client& client() { return *client_; }
  const S3Location& location() const { return where_; }

 private:
  S3Store(std::shared_ptr<S3Client> client, S3Location where) : client_(std::move(client)), where_(std::move(where)) {}
  std::string key(std::string_view rest) const { return where_.prefix.empty() ? std::string(rest) : where_.prefix + "/" + std::string(rest); }
  std::string blob_key(const image::BlobId& id) const { return key("blobs/sha256/" + id.hex()); }
  std::string manifest_key(const std::string& name) const { return key("images/" + name); }

  std::shared_ptr<S3Client> client_;
  S3Location where_;
};

// Opens a store named the way every command names one: "s3://BUCKET/PREFIX"
// (credentials and endpoint from the environment, S3Config::from_environment)
// or a local directory.
Result<std::unique_ptr<image::Store>> open_store(const std::string& location, bool create);

}  // namespace faultline::objstore
