#include "objstore/s3_store.h"

#include <cerrno>

#include "common/atomic_file.h"
#include "image/local_store.h"
#include "image/manifest.h"

namespace faultline::objstore {

namespace {
class NoLock final : public image::StoreLock {};
}  // namespace

Result<std::unique_ptr<S3Store>> S3Store::open(std::shared_ptr<S3Client> client, S3Location where,
                                               bool create_bucket) {
  // One LIST of at most one key: a missing bucket, an unreachable endpoint
  // or refused credentials show here, before any work starts. The bucket is
  // created only when it is missing: credentials that may write objects but
  // not create buckets, or a bucket another account owns, still push into
  // an existing one (CreateBucket would be refused).
  const std::string prefix = where.prefix.empty() ? "images/" : where.prefix + "/images/";
  auto probe = client->list(where.bucket, prefix, 1);
  if (!probe && probe.error().code == ENOENT && create_bucket) {
    if (auto st = client->create_bucket(where.bucket); !st) return std::unexpected(st.error());
    probe = client->list(where.bucket, prefix, 1);
  }
  if (!probe) return std::unexpected(probe.error());
  return std::unique_ptr<S3Store>(new S3Store(std::move(client), std::move(where)));
}

Result<std::string> S3Store::get(const image::BlobId& id) { return get_sized(id, 0); }

Result<std::string> S3Store::get_sized(const image::BlobId& id, uint64_t size) {
  // What zstd may make of the largest frame (ZSTD_compressBound: n + n/256
  // + a little), when the reader does not know the blob's size.
  constexpr uint64_t kLargestBlob = image::kMaxFrameBytes + image::kMaxFrameBytes / 128 + (64 << 10);
  auto r = client_->get(where_.bucket, blob_key(id), std::nullopt, size != 0 ? size : kLargestBlob);
  if (!r && r.error().code == ENOENT) {
    return fail("blob " + id.hex() + " is missing from the store (no " + describe(id) + ")", ENOENT);
  }
  return r;
}

Status S3Store::put(const image::BlobId& id, std::string_view bytes) {
  // Content-addressed: an object already there holds these bytes.
  auto present = exists(id);
  if (!present) return std::unexpected(present.error());
  if (*present) return {};
  return client_->put(where_.bucket, blob_key(id), bytes);
}

Result<bool> S3Store::exists(const image::BlobId& id) {
  auto h = client_->head(where_.bucket, blob_key(id));
  if (!h) return std::unexpected(h.error());
  return h->has_value();
}

Result<std::vector<image::BlobId>> S3Store::list() {
  const std::string prefix = key("blobs/sha256/");
  auto keys = client_->list(where_.bucket, prefix);
  if (!keys) return std::unexpected(keys.error());
  std::vector<image::BlobId> ids;
  for (const std::string& k : *keys) {
    if (auto id = image::BlobId::from_hex(std::string_view(k).substr(prefix.size()))) ids.push_back(*id);
  }
  return ids;
}

Status S3Store::remove(const image::BlobId& id) { return client_->remove(where_.bucket, blob_key(id)); }

std::string S3Store::describe(const image::BlobId& id) const { return "s3://" + where_.bucket + "/" + blob_key(id); }

std::string S3Store::identity() const { return client_->config().endpoint + " " + where_.url(); }

Result<std::string> S3Store::read_manifest(const std::string& name) {
  if (auto st = check_plain_file_name(name); !st) return std::unexpected(st.error());
  auto r = client_->get(where_.bucket, manifest_key(name));
  if (!r && r.error().code == ENOENT) {
    return fail("image " + name + " does not exist (no " + describe_manifest(name) + ")", ENOENT);
  }
  return r;
}

Result<bool> S3Store::manifest_exists(const std::string& name) {
  if (auto st = check_plain_file_name(name); !st) return std::unexpected(st.error());
  auto h = client_->head(where_.bucket, manifest_key(name));
  if (!h) return std::unexpected(h.error());
  return h->has_value();
}

Status S3Store::write_manifest(const std::string& name, std::string_view bytes) {
  // Images are immutable. S3 (and RGW 16) has no create-if-absent PUT: two
  // writers racing on one name can both pass this check, and the later PUT
  // wins; a fleet gives each image one writer.
  auto present = manifest_exists(name);
  if (!present) return std::unexpected(present.error());
  if (*present) return fail("image " + name + " already exists (" + describe_manifest(name) + ")", EEXIST);
  return client_->put(where_.bucket, manifest_key(name), bytes);
}

Status S3Store::remove_manifest(const std::string& name) {
  // S3's DELETE of a missing key succeeds: ask first, for a clear error.
  auto present = manifest_exists(name);
  if (!present) return std::unexpected(present.error());
  if (!*present) return fail("image " + name + " does not exist (no " + describe_manifest(name) + ")", ENOENT);
  return client_->remove(where_.bucket, manifest_key(name));
}

Result<std::vector<std::string>> S3Store::list_manifests() {
  const std::string prefix = key("images/");
  auto keys = client_->list(where_.bucket, prefix);
  if (!keys) return std::unexpected(keys.error());
  std::vector<std::string> names;
  for (const std::string& k : *keys) names.push_back(k.substr(prefix.size()));
  return names;
}

std::string S3Store::describe_manifest(const std::string& name) const {
  return "s3://" + where_.bucket + "/" + manifest_key(name);
}

Result<std::unique_ptr<image::StoreLock>> S3Store::lock_shared(const std::function<void()>&) {
  return std::unique_ptr<image::StoreLock>(new NoLock);
}

Result<std::unique_ptr<image::StoreLock>> S3Store::lock_exclusive(const std::function<void()>&) {
  return fail("gc of an image store in a bucket is not supported (" + where_.url() +
                  "): a bucket has no lock that every writer would honour",
              ENOTSUP);
}

Result<std::unique_ptr<image::Store>> open_store(const std::string& location, bool create) {
  if (!is_s3_url(location)) {
    auto local = image::LocalStore::open(location, create);
    if (!local) return std::unexpected(local.error());
    return std::unique_ptr<image::Store>(std::move(*local));
  }
  auto where = S3Location::parse(location);
  if (!where) return std::unexpected(where.error());
  auto config = S3Config::from_environment();
  if (!config) return std::unexpected(config.error());
  auto client = S3Client::create(std::move(*config));
  if (!client) return std::unexpected(client.error());
  auto store = S3Store::open(std::shared_ptr<S3Client>(std::move(*client)), std::move(*where), create);
  if (!store) return std::unexpected(store.error());
  return std::unique_ptr<image::Store>(std::move(*store));
}

}  // namespace faultline::objstore
