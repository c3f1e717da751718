// BlobId: the name of a content-addressed blob, the SHA-256 of its bytes.
//
// Two blobs with the same bytes have the same id, so a frame that two images
// (or two layers of one image) share is stored once. Reading a blob always
// re-hashes its bytes and compares them with the id before any byte is used
// (see frame.h), so a damaged or substituted blob is an error, never data.
//
// Thread-safety: plain values and pure functions.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace faultline::image {

struct BlobId {
  std::array<uint8_t, 32> bytes{};

  // 64 lowercase hex digits.
  std::string hex() const;
  static std::optional<BlobId> from_hex(std::string_view hex);
  // SHA-256 (OpenSSL EVP) of `data`.
  static BlobId of(std::string_view data);

  friend bool operator==(const BlobId&, const BlobId&) = default;
  friend auto operator<=>(const BlobId&, const BlobId&) = default;
};

struct BlobIdHash {
  size_t operator()(const BlobId& id) const {
    size_t h = 0;
    for (int i = 0; i < 8; ++i) h = (h << 8) | id.bytes[i];  // already uniformly distributed
    return h;
  }
};

}  // namespace faultline::image
