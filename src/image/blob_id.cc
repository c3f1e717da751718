#include "image/blob_id.h"

#include <openssl/evp.h>

#include <cstdlib>

#include "common/text_escape.h"

namespace faultline::image {

std::string BlobId::hex() const { return hex_lower(bytes); }

std::optional<BlobId> BlobId::from_hex(std::string_view hex) {
  if (hex.size() != 64) return std::nullopt;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;  // upper case is refused: one spelling per blob file name
  };
  BlobId id;
  for (size_t i = 0; i < 32; ++i) {
    const int hi = nibble(hex[2 * i]), lo = nibble(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    id.bytes[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return id;
}

BlobId BlobId::of(std::string_view data) {
  BlobId id;
  unsigned int len = 0;
  // EVP_Digest with a fixed algorithm fails only on allocation failure; a
  // wrong hash would be a wrong blob name, so that is fatal rather than an error value.
  if (EVP_Digest(data.data(), data.size(), id.bytes.data(), &len, EVP_sha256(), nullptr) != 1 || len != 32) {
    std::abort();
  }
  return id;
}

}  // namespace faultline::image
